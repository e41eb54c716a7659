"""The vision-language model: ViT → merger → visual tokens scattered into the LLM's embeddings.

`VLM.forward(batch: PackedBatch)` is the whole model contract of the engine:

* first pipeline stage (`pre_process`): embed `input_ids`; if the micro-batch has media, run the
  ViT + merger and put the visual embeddings (in order) at the positions of the image-pad /
  video-pad tokens; then this stage's decoder layers;
* middle stages: their layers on the activation set by `set_input_tensor`;
* last stage (`post_process`): final norm, vocab-parallel logits and the per-token cross entropy
  `[L]` float32 (`tensor_parallel.vocab_parallel_cross_entropy`, 0 where `labels == -100`).
  Reduction (sum / num_label_tokens, …) is the loss module's job, not the model's.

A micro-batch without media skips the ViT: its parameters get no gradient this step. TP ranks of
one group see the same batch, so they skip together and the collectives stay matched; DP ranks
that differ do not share any collective inside the forward.

Packing: one row `[L, 1, H]`; the LLM attends causally inside each `cu_seqlens` segment, the
padding tail after `cu_seqlens[-1]` attends to nothing (zeros out of attention) and carries no loss.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from data_pipelines.schema import IGNORE_INDEX, PackedBatch
from qvl_train.config import ModelConfig, ParallelConfig
from qvl_train.models.common import Execution, without_sequence_parallel
from qvl_train.models.language import Qwen2LanguageModel
from qvl_train.models.projector import DeepStackProjector, PatchMerger
from qvl_train.models.rope import mrope_freqs
from qvl_train.models.vision.qwen2_vl import Qwen2VisionTransformer

__all__ = ["VLM", "Qwen3VLM", "IMAGE_PAD_ID", "VIDEO_PAD_ID"]

IMAGE_PAD_ID = 151655
"""`<|image_pad|>`: one per merged image token (Qwen2-VL / 2.5-VL tokenizer)."""
VIDEO_PAD_ID = 151656
"""`<|video_pad|>`: one per merged video token."""


class VLM(MegatronModule):
    """Qwen2-VL / Qwen2.5-VL as megatron modules; parameters under `vision.`, `projector.`, `llm.`.

    `vision_cls` is the ViT of the generation (`pixel_values, grid_thw → [P, Hv]` patch features in
    `pixel_values` row order); the merger and the LLM are shared.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        parallel: ParallelConfig,
        *,
        pre_process: bool,
        post_process: bool,
        dtype: torch.dtype = torch.float32,
        spec_backend: str = "local",
        vision_cls: type = Qwen2VisionTransformer,
        projector_cls: type = PatchMerger,
        execution: Execution = Execution(),
        vp_stage: Optional[int] = None,
    ):
        llm = Qwen2LanguageModel(
            cfg.llm,
            parallel,
            pre_process=pre_process,
            post_process=post_process,
            dtype=dtype,
            attention_backend=cfg.attention_backend,
            spec_backend=spec_backend,
            execution=execution,
            vp_stage=vp_stage,
        )
        super().__init__(config=llm.config)  # the schedules read `config` (hidden size, pipeline dtype)
        self.model_type = ModelType.encoder_or_decoder  # the schedules read it too
        self.vp_stage = vp_stage  # model chunk index on this rank (interleaved schedule), else None
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.head_dim = cfg.llm.head_dim or cfg.llm.hidden_size // cfg.llm.num_attention_heads
        if pre_process:
            self.vision = vision_cls(
                cfg.vision, tp=parallel.tp, dtype=dtype, attention_backend=cfg.attention_backend, spec_backend=spec_backend,
                execution=execution,
            )
            self.projector = projector_cls(without_sequence_parallel(self.vision.config), cfg.vision, cfg.llm.hidden_size)
        self.llm = llm

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the received activation here (a list with one tensor)."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "VLM takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self.llm.set_input_tensor(input_tensor)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Token embeddings with the visual embeddings in place: `[L, 1, H]`."""
        h_L1H = self.llm.embed(batch.input_ids)
        if batch.pixel_values.numel() == 0:
            return h_L1H
        vis = self.vision(batch.pixel_values, batch.grid_thw)
        vis_VH = self.projector(vis)
        pos = torch.nonzero((batch.input_ids == IMAGE_PAD_ID) | (batch.input_ids == VIDEO_PAD_ID)).squeeze(1)
        if pos.numel() != vis_VH.shape[0]:
            raise ValueError(
                f"{pos.numel()} image/video pad tokens but {vis_VH.shape[0]} visual embeddings "
                f"(grid_thw={batch.grid_thw.tolist()}): the text and the pixels do not match"
            )
        h_LH = h_L1H.squeeze(1).index_put((pos,), vis_VH.to(h_L1H.dtype))
        return h_LH.unsqueeze(1)

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """Vocab-parallel logits `[L, V/tp]` of every slot (evaluation and parity tools; pp = 1 only)."""
        if not (self.pre_process and self.post_process):
            raise ValueError("VLM.logits needs the whole model on one stage (pp=1)")
        rope, packed = self._rope_and_packing(batch)
        return self.llm(self.embed(batch), rope, packed).squeeze(1)

    def _rope_and_packing(self, batch: PackedBatch):
        cu = batch.cu_seqlens.to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        packed = PackedSeqParams(
            qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
        )
        rope = mrope_freqs(
            batch.position_ids, self.head_dim, self.cfg.llm.rope_theta, list(self.cfg.llm.mrope_section),
            interleaved=self.cfg.llm.mrope_interleaved,
        )
        return rope, packed

    def forward(self, batch: PackedBatch, return_logits: bool = False) -> torch.Tensor:
        """Per-token loss `[L]` float32 on the last stage (vocab-parallel logits `[L, V/tp]` of every
        slot with `return_logits`: the parity tools under pipeline parallelism), else hidden states `[L, 1, H]`."""
        cu = batch.cu_seqlens.to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        packed = PackedSeqParams(
            # "sbhd": megatron applies the per-token M-RoPE angles as they are (no per-sample
            # restart as on the "thd" path); VarlenAttention still reads cu_seqlens from here.
            qkv_format="sbhd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
        rope = mrope_freqs(
            batch.position_ids, self.head_dim, self.cfg.llm.rope_theta, list(self.cfg.llm.mrope_section),
            interleaved=self.cfg.llm.mrope_interleaved,
        )
        hidden: Optional[torch.Tensor] = self.embed(batch) if self.pre_process else None
        if not self.post_process:
            return self.llm(hidden, rope, packed)
        if return_logits:
            return self.llm(hidden, rope, packed).squeeze(1)
        # Logits only where a label is: the same per-token losses at a fraction of the output-layer cost.
        targets = torch.nonzero(batch.labels != IGNORE_INDEX).squeeze(1)
        logits_n1V = self.llm(hidden, rope, packed, output_positions=targets)
        loss_n1 = tensor_parallel.vocab_parallel_cross_entropy(logits_n1V.float(), batch.labels[targets].unsqueeze(1))
        loss_L = torch.zeros(batch.labels.shape[0], dtype=torch.float32, device=loss_n1.device)
        return loss_L.index_put((targets,), loss_n1.squeeze(1))


class Qwen3VLM(VLM):
    """Qwen3-VL (dense): the `VLM` plus DeepStack.

    The ViT (`vision/qwen3_vl.py`) also returns the patch features of its `deepstack_visual_indexes`
    blocks; `projector.deepstack.{i}` merges them to `[n_vis, H]`, and the LLM adds feature i to its
    hidden states at the visual token positions after decoder layer i (HF `_deepstack_process`).
    Those layers must be on the first pipeline stage (checked at build time). Under tensor
    parallelism the merged features are replicated per TP rank and the addition is local; under
    sequence parallelism each rank adds its slice of the sequence.
    """

    def __init__(
        self, cfg: ModelConfig, parallel: ParallelConfig, *, pre_process: bool, post_process: bool, dtype=torch.float32,
        spec_backend: str = "local", execution: Execution = Execution(), vp_stage: Optional[int] = None,
    ):
        from qvl_train.models.vision.qwen3_vl import Qwen3VisionTransformer

        n_deep = len(cfg.vision.deepstack_visual_indexes)
        if parallel.pp > 1 and n_deep:
            first = (parallel.first_stage_layers or cfg.llm.num_layers // parallel.pp) // parallel.vpp  # chunk 0 of rank 0
            if n_deep > first:
                where = "pipeline stage" if parallel.vpp == 1 else "model chunk (first stage's layers / parallel.vpp)"
                raise ValueError(
                    f"Qwen3-VL DeepStack adds ViT features after LLM layers 0..{n_deep - 1}, but the first {where} "
                    f"holds {first} layers; set parallel.first_stage_layers >= {n_deep * parallel.vpp}"
                )
        super().__init__(
            cfg, parallel, pre_process=pre_process, post_process=post_process, dtype=dtype, spec_backend=spec_backend,
            vision_cls=Qwen3VisionTransformer, projector_cls=DeepStackProjector, execution=execution, vp_stage=vp_stage,
        )

    def embed_with_deepstack(self, batch: PackedBatch):
        """(`[L, 1, H]` embeddings with the visual tokens in place, DeepStack `(positions, features)` or None)."""
        h_L1H = self.llm.embed(batch.input_ids)
        if batch.pixel_values.numel() == 0:
            return h_L1H, None
        vis, deep = self.vision(batch.pixel_values, batch.grid_thw)
        vis_VH = self.projector(vis)
        pos = torch.nonzero((batch.input_ids == IMAGE_PAD_ID) | (batch.input_ids == VIDEO_PAD_ID)).squeeze(1)
        if pos.numel() != vis_VH.shape[0]:
            raise ValueError(
                f"{pos.numel()} image/video pad tokens but {vis_VH.shape[0]} visual embeddings "
                f"(grid_thw={batch.grid_thw.tolist()}): the text and the pixels do not match"
            )
        h_LH = h_L1H.squeeze(1).index_put((pos,), vis_VH.to(h_L1H.dtype))
        deepstack = (pos, self.projector.project_deepstack(deep)) if deep else None
        return h_LH.unsqueeze(1), deepstack

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.embed_with_deepstack(batch)[0]

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        if not (self.pre_process and self.post_process):
            raise ValueError("VLM.logits needs the whole model on one stage (pp=1)")
        rope, packed = self._rope_and_packing(batch)
        hidden, deepstack = self.embed_with_deepstack(batch)
        return self.llm(hidden, rope, packed, deepstack=deepstack).squeeze(1)

    def forward(self, batch: PackedBatch, return_logits: bool = False) -> torch.Tensor:
        """As `VLM.forward`, with DeepStack."""
        rope, packed = self._rope_and_packing(batch)
        hidden, deepstack = self.embed_with_deepstack(batch) if self.pre_process else (None, None)
        if not self.post_process:
            return self.llm(hidden, rope, packed, deepstack=deepstack)
        if return_logits:
            return self.llm(hidden, rope, packed, deepstack=deepstack).squeeze(1)
        targets = torch.nonzero(batch.labels != IGNORE_INDEX).squeeze(1)
        logits_n1V = self.llm(hidden, rope, packed, output_positions=targets, deepstack=deepstack)
        loss_n1 = tensor_parallel.vocab_parallel_cross_entropy(logits_n1V.float(), batch.labels[targets].unsqueeze(1))
        loss_L = torch.zeros(batch.labels.shape[0], dtype=torch.float32, device=loss_n1.device)
        return loss_L.index_put((targets,), loss_n1.squeeze(1))
