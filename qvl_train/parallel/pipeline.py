"""Interleaved pipeline (`parallel.vpp`): this rank's model chunks as one module.

With `parallel.vpp = v > 1` each pipeline rank holds v model chunks and megatron-core's interleaved
1F1B schedule runs them (`get_forward_backward_func` picks it when `initialize_model_parallel` was
given `virtual_pipeline_model_parallel_size`; the model goes in as the list of chunks, each with its
own data iterator). Chunk k of rank r is built with `vp_stage=k`: megatron's `TransformerBlock`
then builds that chunk's layers with global numbers from `get_transformer_layer_offset`, dealt
round-robin — 4 layers, pp=2, v=2: rank 0 holds [0] [2], rank 1 holds [1] [3] — so an activation
goes rank 0 → 1 → 0 → 1. The ViT, projector and embedding are in chunk 0 of rank 0 (`pre_process`),
the final norm and output layer in chunk v-1 of the last rank (`post_process`); with tied
embeddings that output weight is the secondary replica of the embedding, as at vpp = 1.

`ModelChunks` lets the engine treat the chunks as one model: parameter and state-dict names are the
chunk's own with its index in front (`1.llm.decoder.layers.0.…`, `local_name` strips it), while the
sharded state dict keeps each chunk's global checkpoint keys and layer offsets — a checkpoint written
at pp=2 vpp=2 loads at pp=1 and the other way round.
"""

from __future__ import annotations

import torch

__all__ = ["ModelChunks", "local_name"]


def local_name(name: str) -> str:
    """`1.llm.decoder…` (a name inside `ModelChunks`) → `llm.decoder…`; other names unchanged."""
    head, _, rest = name.partition(".")
    return rest if head.isdigit() and rest else name


class ModelChunks(torch.nn.ModuleList):
    """This pipeline rank's `vpp` model chunks (`VLM`s built with `vp_stage` 0..vpp-1), in order."""

    @property
    def config(self):
        """The first chunk's LLM `TransformerConfig` (the schedule reads `model[0]`'s)."""
        return self[0].config

    @property
    def llm(self):
        """The last chunk's LLM: it holds the output layer on the last stage (evaluation hooks it)."""
        return self[-1].llm

    @property
    def vision(self):
        return self[0].vision

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Every chunk's sharded tensors under their global keys; the dict keys carry the chunk index
        (what `load_state_dict` of this module expects), the checkpoint keys do not."""
        return {
            f"{i}.{key}": value
            for i, chunk in enumerate(self)
            for key, value in chunk.sharded_state_dict(prefix, sharded_offsets, metadata).items()
        }
