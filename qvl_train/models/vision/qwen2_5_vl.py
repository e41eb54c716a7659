"""The Qwen2.5-VL vision transformer (HF `Qwen2_5_VisionTransformerPretrainedModel`) on megatron blocks.

Differences from Qwen2-VL's tower (`qwen2_vl.py`), all switched by `VisionConfig`:

* RMSNorm instead of LayerNorm (`norm: rmsnorm`), SwiGLU MLP with biases (`mlp: swiglu`,
  `intermediate_size`): megatron's `MLP` with `gated_linear_unit=True` (`linear_fc1 = [gate; up]`).
* **Window attention.** The merged-token grid of each frame is cut into windows of
  `window_size / patch_size / spatial_merge_size` merged tokens per side (112 / 14 / 2 = 4, i.e.
  4×4 merged tokens = 8×8 patches); windows at the right and bottom edges are partial. Before the
  blocks the patches are reordered window by window (the 2×2 merge groups stay contiguous, so the
  permutation acts on whole merge groups, HF `get_window_index`), the 2-D RoPE angles with them.
  Blocks in `fullatt_block_indexes` attend within each frame (the reordering never moves a patch
  out of its frame, so frames stay contiguous), the others within each window. Both are plain
  `cu_seqlens` segments for `VarlenAttention`.
* After the blocks the permutation is undone *at patch level* here, so the tower returns features
  in `pixel_values` row order and the shared `PatchMerger` (with RMSNorm `ln_q`) follows. HF undoes
  it after the merger; since the merger maps each merge group on its own, both orders give the
  same numbers.

Blocks run one by one (not through `TransformerBlock.forward`) because each needs its own
segments; the `TransformerBlock` still owns the layers, so names and sharding are megatron's.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from qvl_train.models.common import Execution, SequenceShards, run_layer
from qvl_train.models.fp8 import fp8_row_multiple
from qvl_train.models.rope import vision_rope_freqs
from qvl_train.models.vision.qwen2_vl import Qwen2VisionTransformer, frame_cu_seqlens

__all__ = ["Qwen2_5VisionTransformer", "window_index"]


def window_index(grid_thw: torch.Tensor, window: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window order of the merge groups and the window boundaries (in patches).

    `grid_thw [k, 3]` (patch grid per image/video), `window` = merged tokens per window side,
    `merge` = spatial merge size. Returns `order [G]` — for each position of the reordered sequence
    the index of its merge group in `pixel_values` order (G = P / merge²) — and `cu [W+1]` (int32)
    of the non-empty windows, in patches. Windows run (t, window row, window col); inside a window
    merge groups run row-major; edge windows hold fewer groups.
    """
    unit = merge * merge
    order, lens = [], []
    base = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        nwh, nww = -(-gh // window), -(-gw // window)
        for ti in range(t):
            for wi in range(nwh):
                for wj in range(nww):
                    blk = idx[ti, wi * window : (wi + 1) * window, wj * window : (wj + 1) * window].flatten()
                    order.append(blk + base)
                    lens.append(blk.numel() * unit)
        base += t * gh * gw
    cu = torch.nn.functional.pad(torch.tensor(lens, dtype=torch.long).cumsum(0), (1, 0))
    return torch.cat(order), cu.to(torch.int32)


def _packed(cu: torch.Tensor) -> PackedSeqParams:
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest)


class Qwen2_5VisionTransformer(Qwen2VisionTransformer):
    """pixel_values `[P, C·T·p·p]`, grid_thw `[k, 3]` → patch features `[P, Hv]` (row order kept)."""

    def __init__(
        self, cfg, *, tp: int, dtype: torch.dtype, attention_backend: str = "auto", spec_backend: str = "local",
        execution: Execution = Execution(),
    ):
        if cfg.window_size is None:
            raise ValueError("Qwen2.5-VL's ViT needs model.vision.window_size (112 for the released models)")
        super().__init__(cfg, tp=tp, dtype=dtype, attention_backend=attention_backend, spec_backend=spec_backend, execution=execution)
        self.window = cfg.window_size // cfg.patch_size // cfg.spatial_merge_size
        self.full_blocks = frozenset(cfg.fullatt_block_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        m = self.cfg.spatial_merge_size
        unit = m * m
        h_PD = self.patch_embed(pixel_values)
        P, D = h_PD.shape
        order, cu_win = window_index(grid_thw.cpu(), self.window, m)
        order = order.to(h_PD.device)
        h_PD = h_PD.reshape(P // unit, unit, D)[order].reshape(P, D)
        rope = vision_rope_freqs(grid_thw, self.head_dim, m).to(h_PD.device)
        rope = rope.reshape(P // unit, unit, -1)[order].reshape(P, 1, 1, -1)
        windows = _packed(cu_win.to(h_PD.device))
        frames = _packed(frame_cu_seqlens(grid_thw).to(h_PD.device))

        shards = SequenceShards(self.config, P, fp8_row_multiple(self.config))  # parallel.sp: window-ordered rows split over TP ranks
        h, rope = shards.scatter(h_PD.unsqueeze(1)), shards.pad_rows(rope)  # [P/tp, 1, D]
        for i, layer in enumerate(self.decoder.layers):
            packed = frames if i in self.full_blocks else windows
            h = run_layer(layer, h, rope, packed)
        inverse = torch.argsort(order)
        return shards.gather(h).squeeze(1).reshape(P // unit, unit, D)[inverse].reshape(P, D)
