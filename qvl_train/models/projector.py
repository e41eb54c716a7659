"""The Qwen2-VL patch merger: ViT patch features → LLM tokens (HF `PatchMerger`).

LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL) over each patch feature (`ln_q`), then every `merge²` consecutive rows — one 2×2 block,
contiguous thanks to the (t, h-block, w-block, mh, mw) row order of `pixel_values` — are joined
into one `merge²·Hv` vector and mapped by an MLP `merge²·Hv → merge²·Hv → GELU → H_llm`.
The MLP is tensor-parallel (column → row), like an MLP block of the towers.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule

from qvl_train.config import VisionConfig

__all__ = ["PatchMerger"]


def _no_init(w: torch.Tensor) -> None:
    """megatron needs an init_method; `init_weights` initialises for real (layout-independent)."""


class PatchMerger(MegatronModule):
    """`[P, Hv]` → `[P / merge², H_llm]`."""

    def __init__(self, config, cfg: VisionConfig, llm_hidden_size: int, postshuffle_norm: bool = False):
        super().__init__(config=config)
        self.merge = cfg.spatial_merge_size**2
        width = cfg.hidden_size * self.merge
        norm = torch.nn.RMSNorm if cfg.norm == "rmsnorm" else torch.nn.LayerNorm  # Qwen2.5-VL: RMSNorm
        # Qwen3-VL DeepStack mergers normalise the joined m²·Hv vector (HF use_postshuffle_norm).
        self.postshuffle_norm = postshuffle_norm
        self.ln_q = norm(width if postshuffle_norm else cfg.hidden_size, eps=cfg.norm_eps, dtype=config.params_dtype)
        self.linear_fc1 = ColumnParallelLinear(
            width, width, config=config, init_method=_no_init, bias=True, gather_output=False
        )
        self.linear_fc2 = RowParallelLinear(
            width, llm_hidden_size, config=config, init_method=_no_init, bias=True, input_is_parallel=True, skip_bias_add=False
        )

    def forward(self, x_PD: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.ln_q(x_PD.reshape(-1, 1, x_PD.shape[-1] * self.merge))
        else:
            x = self.ln_q(x_PD).reshape(-1, 1, x_PD.shape[-1] * self.merge)  # [P/m², 1, m²·Hv]
        x, _ = self.linear_fc1(x)
        x = torch.nn.functional.gelu(x)  # exact (erf) GELU, as HF nn.GELU()
        x, _ = self.linear_fc2(x)
        return x.squeeze(1)


class DeepStackProjector(PatchMerger):
    """Qwen3-VL: the main merger (this module, LayerNorm before the shuffle) plus one merger per
    DeepStack ViT layer (`deepstack.{i}`, LayerNorm after the shuffle; HF `deepstack_merger_list`).

    All under `projector.` so stage freezing treats every merger alike.
    """

    def __init__(self, config, cfg: VisionConfig, llm_hidden_size: int):
        super().__init__(config, cfg, llm_hidden_size)
        self.deepstack = torch.nn.ModuleList(
            PatchMerger(config, cfg, llm_hidden_size, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron's default treats a plain `ModuleList` as replicated tensors: under tensor
        parallelism each rank would save (and `init_weights` would fill) its *shard* of the DeepStack
        mergers as if it were the whole tensor. Each merger gives its own TP-aware entries instead."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        head = f"{prefix}deepstack."
        sd = {k: v for k, v in sd.items() if not k.startswith(head)}
        for i, merger in enumerate(self.deepstack):
            sd.update(merger.sharded_state_dict(f"{head}{i}.", sharded_offsets, metadata))
        return sd

    def project_deepstack(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Patch features of the DeepStack layers `[P, Hv]` each → `[P / merge², H_llm]` each."""
        return [m(f) for m, f in zip(self.deepstack, feats)]
