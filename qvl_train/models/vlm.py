"""The vision-language model: ViT → merger → visual tokens scattered into the LLM's embeddings.

`VLM.forward(batch: PackedBatch)` is the whole model contract of the engine:

* first pipeline stage (`pre_process`): embed `input_ids`; if the micro-batch has media, run the
  ViT + merger and put the visual embeddings (in order) at the positions of the image-pad /
  video-pad tokens; then this stage's decoder layers;
* middle stages: their layers on the activation set by `set_input_tensor`;
* last stage (`post_process`): final norm, vocab-parallel logits and the per-token cross entropy
  `[L]` float32 (`tensor_parallel.vocab_parallel_cross_entropy`, 0 where `labels == -100`); with the
  multi-token-prediction head (`model.mtp_loss_weight > 0`, Qwen3.5, `models/mtp.py`) in training mode
  `[2, L]`: row 0 that loss, row 1 the MTP head's per-token loss (predicting the token after the next).
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
from megatron.core.transformer.module import MegatronModule

from data_pipelines.schema import IGNORE_INDEX, PackedBatch
from qvl_train.config import ModelConfig, ParallelConfig
from qvl_train.models.common import Execution, without_sequence_parallel
from qvl_train.models.language import Qwen2LanguageModel
from qvl_train.models.mtp import mtp_layers_built
from qvl_train.models.projector import DeepStackProjector, PatchMerger
from qvl_train.models.rope import mrope_freqs
from qvl_train.models.vision.qwen2_vl import Qwen2VisionTransformer
from qvl_train.parallel.context import ContextPackedSeqParams

__all__ = ["VLM", "Qwen3VLM", "Qwen3_5VLM"]


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
            mtp_layers=mtp_layers_built(cfg),  # Qwen3.5's MTP head: built when trained (or kept by import-hf)
        )
        super().__init__(config=llm.config)  # the schedules read `config` (hidden size, pipeline dtype)
        self.model_type = ModelType.encoder_or_decoder  # the schedules read it too
        self.vp_stage = vp_stage  # model chunk index on this rank (interleaved schedule), else None
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.head_dim = cfg.llm.head_dim or cfg.llm.hidden_size // cfg.llm.num_attention_heads
        # partial rotary (Qwen3.5: 0.25): the first `rotary_dim` channels of each head rotate, the rest pass
        # (megatron's `apply_rotary_pos_emb` rotates as many channels as the angles have; HF `apply_rotary_pos_emb`)
        self.rotary_dim = int(self.head_dim * cfg.llm.partial_rotary_factor)
        if pre_process:
            self.vision = vision_cls(
                cfg.vision, tp=parallel.tp, dtype=dtype, attention_backend=cfg.attention_backend, spec_backend=spec_backend,
                execution=execution,
            )
            self.projector = projector_cls(without_sequence_parallel(self.vision.config), cfg.vision, cfg.llm.hidden_size)
        self.llm = llm
        self.context_parallel = None  # parallel.cp: a `ContextParallel`, set by the engine (parallel/context.py)

    def media_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Indices of the tokens that take visual embeddings: `model.image_token_id` (one per merged image
        token) and `model.video_token_id`, the generation tokenizer's pads unless the config sets them."""
        ids = [i for i in (self.cfg.image_pad_id, self.cfg.video_pad_id) if i is not None]
        return torch.nonzero(torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))).squeeze(1)

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
        vis_VH = self.encode_media(batch, lambda pix, grid: self.projector(self.vision(pix, grid)))
        pos = self.media_positions(batch.input_ids)
        if pos.numel() != vis_VH.shape[0]:
            raise ValueError(
                f"{pos.numel()} image/video pad tokens but {vis_VH.shape[0]} visual embeddings "
                f"(grid_thw={batch.grid_thw.tolist()}): the text and the pixels do not match"
            )
        h_LH = h_L1H.squeeze(1).index_put((pos,), vis_VH.to(h_L1H.dtype))
        return h_LH.unsqueeze(1)

    def encode_media(self, batch: PackedBatch, encode) -> torch.Tensor:
        """`encode(pixel_values, grid_thw) → [n_vis, D]` over the micro-batch's media; under parallel.cp
        each CP rank encodes its share and the rows are all-gathered (the ViT work is not repeated).
        A loader batch not yet normalised (uint8 codes; `PackedBatch.to` normalises) is normalised here."""
        batch = batch.normalised()
        if self.context_parallel is None:
            return encode(batch.pixel_values, batch.grid_thw)
        return self.context_parallel.encode_media(encode, batch.pixel_values, batch.grid_thw, self.config.params_dtype)

    def embed_for_llm(self, batch: PackedBatch):
        """(`[L, 1, H]` embeddings, DeepStack features or None): what the first stage feeds the LLM."""
        return self.embed(batch), None

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """Vocab-parallel logits `[L, V/tp]` of every slot (evaluation and parity tools; pp = 1 only)."""
        if not (self.pre_process and self.post_process):
            raise ValueError("VLM.logits needs the whole model on one stage (pp=1)")
        rope, packed = self._rope_and_packing(batch)
        return self.llm(self.embed(batch), rope, packed).squeeze(1)

    def _rope_and_packing(self, batch: PackedBatch, split=None):
        """RoPE angles and packed params: "sbhd", so megatron applies the per-token M-RoPE angles as
        they are (no per-sample restart as on the "thd" path); VarlenAttention reads cu_seqlens (or,
        under parallel.cp, this rank's zigzag `split`) from the params."""
        cu = batch.cu_seqlens.to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        packed = ContextPackedSeqParams(
            qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest,
            context_split=split,
        )
        positions = batch.position_ids if split is None else split.positions(batch.position_ids)
        rope = mrope_freqs(
            positions, self.rotary_dim, self.cfg.llm.rope_theta, list(self.cfg.llm.mrope_section),
            interleaved=self.cfg.llm.mrope_interleaved,
        )
        return rope, packed

    @staticmethod
    def _padding_rows(batch: PackedBatch, split=None) -> torch.Tensor:
        """`[L]` bool, True at rows that hold no sample's token: the pack's tail past `cu_seqlens[-1]`, or
        under parallel.cp the split's padding rows. MoE routers leave them out of the load-balancing
        loss (and the engine out of the expert load), so both count the same tokens in every layout."""
        device = batch.input_ids.device
        if split is not None:
            return split.src.to(device) < 0
        return torch.arange(batch.input_ids.shape[0], device=device) >= batch.cu_seqlens[-1].to(device)

    def forward(self, batch: PackedBatch, return_logits: bool = False) -> torch.Tensor:
        """Per-token loss `[L]` float32 on the last stage (vocab-parallel logits `[L, V/tp]` of every
        slot with `return_logits`: the parity tools under pipeline parallelism), else hidden states `[L, 1, H]`.

        Under parallel.cp the first stage embeds the whole row (visual embeddings in place), then keeps
        this rank's zigzag rows; `L` is then this rank's row count and the losses are of its rows.
        """
        split = self.context_parallel.split(batch.cu_seqlens) if self.context_parallel is not None else None
        if split is not None and return_logits:
            raise ValueError("per-slot logits of the whole row are not available under parallel.cp; use parallel.cp=1")
        rope, packed = self._rope_and_packing(batch, split)
        padding = self._padding_rows(batch, split) if self.cfg.llm.num_experts else None
        hidden, deepstack = self.embed_for_llm(batch) if self.pre_process else (None, None)
        if split is not None and self.pre_process:
            hidden, deepstack = split.take(hidden), split.localize(deepstack)
        if not self.post_process:
            return self.llm(hidden, rope, packed, deepstack=deepstack, padding_mask=padding)
        if return_logits:
            return self.llm(hidden, rope, packed, deepstack=deepstack, padding_mask=padding).squeeze(1)
        # Logits only where a label is: the same per-token losses at a fraction of the output-layer cost.
        labels = batch.labels if split is None else split.labels(batch.labels)
        targets = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
        if self.llm.mtp is not None and self.training and self.cfg.mtp_loss_weight > 0:  # the MTP head (models/mtp.py)
            from qvl_train.models.mtp import mtp_targets

            next_ids, mtp_labels = mtp_targets(batch.input_ids, labels, batch.cu_seqlens)
            mtp_pos = torch.nonzero(mtp_labels != IGNORE_INDEX).squeeze(1)
            logits_n1V, mtp_m1V = self.llm(
                hidden, rope, packed, output_positions=targets, deepstack=deepstack, padding_mask=padding,
                mtp=(next_ids, mtp_pos),
            )
            return torch.stack([_per_token_ce(logits_n1V, labels, targets), _per_token_ce(mtp_m1V, mtp_labels, mtp_pos)])
        logits_n1V = self.llm(hidden, rope, packed, output_positions=targets, deepstack=deepstack, padding_mask=padding)
        return _per_token_ce(logits_n1V, labels, targets)


def _per_token_ce(logits_n1V: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel cross entropy of the logits at `positions` → `[L]` float32, 0 elsewhere."""
    loss_n1 = tensor_parallel.vocab_parallel_cross_entropy(logits_n1V.float(), labels[positions].unsqueeze(1))
    loss_L = torch.zeros(labels.shape[0], dtype=torch.float32, device=loss_n1.device)
    return loss_L.index_put((positions,), loss_n1.squeeze(1))


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
        hidden = self.cfg.llm.hidden_size
        both = self.encode_media(batch, self._encode_with_deepstack)  # [n_vis, H·(1 + deepstack layers)]
        vis_VH, deep = both[:, :hidden], (list(both[:, hidden:].split(hidden, dim=1)) if both.shape[1] > hidden else [])
        pos = self.media_positions(batch.input_ids)
        if pos.numel() != vis_VH.shape[0]:
            raise ValueError(
                f"{pos.numel()} image/video pad tokens but {vis_VH.shape[0]} visual embeddings "
                f"(grid_thw={batch.grid_thw.tolist()}): the text and the pixels do not match"
            )
        h_LH = h_L1H.squeeze(1).index_put((pos,), vis_VH.to(h_L1H.dtype))
        deepstack = (pos, deep) if deep else None
        return h_LH.unsqueeze(1), deepstack

    def _encode_with_deepstack(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged visual tokens and the merged DeepStack features side by side: `[n_vis, H·(1 + k)]`."""
        vis, deep = self.vision(pixel_values, grid_thw)
        return torch.cat([self.projector(vis), *(self.projector.project_deepstack(deep) if deep else [])], dim=1)

    def embed_for_llm(self, batch: PackedBatch):
        return self.embed_with_deepstack(batch)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.embed_with_deepstack(batch)[0]

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        if not (self.pre_process and self.post_process):
            raise ValueError("VLM.logits needs the whole model on one stage (pp=1)")
        rope, packed = self._rope_and_packing(batch)
        hidden, deepstack = self.embed_with_deepstack(batch)
        return self.llm(hidden, rope, packed, deepstack=deepstack).squeeze(1)


class Qwen3_5VLM(Qwen3VLM):
    """Qwen3.5 / Qwen3.6 (dense and MoE): Qwen3-VL's ViT without DeepStack (`vision.deepstack_visual_indexes`
    empty) and merger, and the hybrid LLM (`model.llm.layer_types`: Gated DeltaNet and gated-attention
    layers, `language.hybrid_block_spec`) with partial interleaved M-RoPE (`model.llm.partial_rotary_factor`).
    transformers 5.25 `models/qwen3_5/modeling_qwen3_5.py` (`Qwen3_5ForConditionalGeneration`)."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig, **kw):
        if cfg.vision.deepstack_visual_indexes:
            raise ValueError("Qwen3.5 has no DeepStack: set model.vision.deepstack_visual_indexes=[]")
        super().__init__(cfg, parallel, **kw)
