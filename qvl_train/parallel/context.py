"""Context parallelism (`parallel.cp`): each packed micro-batch's LLM sequence split over cp ranks.

What is split, what is shared (the model calls the hooks below; model files stay single-device):

* **Zigzag split of every sample.** A sample of n tokens is padded to n' (a multiple of 2·cp) and cut
  into 2·cp chunks of c = n'/(2·cp); CP rank r keeps chunks r and 2·cp-1-r. Under causal attention
  chunk j costs ~j, so every rank gets the same work (chunk r early, chunk 2cp-1-r late). A rank's
  local row holds, sample after sample, its two chunks; the padding tail of the `PackedBatch` (past
  `cu_seqlens[-1]`) is dropped, and the local row is padded at its end to a multiple of `multiple`
  (tp under sequence parallelism). Embeddings (with the visual embeddings already in place), RoPE /
  M-RoPE position ids (the original per-sample positions) and labels are all taken with the same
  index; padding rows carry position 0, no label, and are no key of any query.
* **Attention** (`context_attention`): keys and values are all-gathered over the CP group
  (`gather_kv`: autograd-correct, the backward sums the K/V gradients of every rank's queries and
  keeps this rank's rows), then every local query of sample i attends causally to the keys of sample i
  at positions <= its own global position (a `[2c, n_i]` mask per sample, one SDPA per sample: no
  L × L mask). All-gather rather than a ring: one collective per layer, simple and exact. Where
  Transformer Engine runs (the `te` backend, bf16), its own CP attention takes these rows instead: a
  ring exchange of K/V chunks that never holds every key at once (`models/attention.context_te`).
* **The ViT is shared, not repeated** (`encode_media`): the images / videos of the micro-batch are
  dealt to CP ranks in contiguous blocks (balanced by patch count); each rank runs the ViT + merger
  (and the DeepStack mergers) on its block only, and the merged embeddings are all-gathered
  (`gather_rows`: the backward sums every rank's gradient and keeps this rank's rows). Every rank then
  scatters all visual embeddings into its full-length embedding row *before* the split.
* **Loss** stays the global per-token mean: each rank's per-token losses cover its own label tokens,
  the denominator is the full micro-batch's label count (known before the split), and gradients are
  summed over the data-parallel × context-parallel group (parameters are replicated over CP ranks).

* **Pipeline parallelism** (`parallel.pp`, also with `parallel.vpp`): megatron's schedules send
  activations of one shape between stages, but a zigzag share's length varies per micro-batch (each
  sample rounds up to a multiple of 2·cp). The engine pads every micro-batch of a step to the
  step's largest share (`ContextParallel.step_rows`, set as `rows`; padding rows as above). Every
  stage reads the same micro-batches and computes the split from `cu_seqlens` alone, so each stage
  knows the local rows, positions and labels of each micro-batch without any message. Chosen over
  megatron's `variable_seq_lengths=True`, which precedes every stage-to-stage send with a blocking
  shape exchange (plus a device synchronize): extra latency on the critical path of each
  micro-batch, for a saving of ~1–3 % of the rows (packs of 512–4096 slots of short synthetic
  samples at cp = 2–8; less for long-context packs of a few long samples). The shape exchange is also
  always batched, which under the interleaved schedule at pp = 2 pairs an activation's shape with a
  gradient's on gloo (a size-mismatch abort), where the fixed shape needs nothing.

The CP ranks of one data-parallel rank receive the same micro-batches (megatron's dp rank is the same
for them; the data deal is per dp rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams

from data_pipelines.schema import IGNORE_INDEX

__all__ = [
    "ContextParallel", "ZigzagSplit", "ContextPackedSeqParams", "zigzag_split", "zigzag_rows", "context_attention", "attend_gathered",
    "gather_ragged",
]


@dataclass
class ZigzagSplit:
    """One CP rank's share of a packed row (see the module docstring); all index tensors are long."""

    cp: int
    rank: int
    src: torch.Tensor  # [S] row of the original packed sequence each local row takes; -1 = padding
    rows: int  # S: local rows (equal on every CP rank)
    samples: list[tuple[int, int, int]]  # per sample: (local offset, chunk length c, true length n)
    group: Optional[object] = None  # the CP process group (None: single-process simulation)

    def take(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """Rows of `x` (dim 0 = the packed sequence) for this rank; padding rows get `fill`."""
        pad = torch.full((1,) + tuple(x.shape[1:]), fill, dtype=x.dtype, device=x.device)
        index = torch.where(self.src >= 0, self.src, x.shape[0]).to(x.device)
        return torch.cat([x, pad]).index_select(0, index)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self.take(labels, IGNORE_INDEX)

    def positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """`[3, L]` position ids → `[3, S]` (the original per-sample positions; padding 0)."""
        return self.take(position_ids.t()).t()

    def localize(self, deepstack):
        """DeepStack `(positions in the full row, [features [n, H], …])` → the same for local rows."""
        if deepstack is None:
            return None
        positions, features = deepstack
        rows = torch.nonzero(self.src >= 0).squeeze(1).to(positions.device)
        size = int(max(positions.max() if positions.numel() else 0, self.src.max())) + 1
        local = torch.full((size,), -1, dtype=torch.long, device=positions.device)
        local[self.src.to(positions.device)[rows]] = rows
        mine = local[positions]
        sel = torch.nonzero(mine >= 0).squeeze(1)
        return mine[sel], [f.index_select(0, sel) for f in features]

    def key_rows(self, sample: int) -> torch.Tensor:
        """Rows of the all-gathered (rank-major) sequence that hold sample `sample`'s keys, in order."""
        off, c, n = self.samples[sample]
        p = torch.arange(n)
        j = p // c
        owner = torch.where(j < self.cp, j, 2 * self.cp - 1 - j)
        second = (j >= self.cp).long()
        return owner * self.rows + off + second * c + p % c

    def query_positions(self, sample: int) -> torch.Tensor:
        """Global (within-sample) positions of this rank's 2c rows of sample `sample`."""
        _, c, _ = self.samples[sample]
        r, last = self.rank, 2 * self.cp - 1 - self.rank
        return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange(last * c, (last + 1) * c)])


def zigzag_rows(cu_seqlens: torch.Tensor, cp: int, multiple: int = 1) -> int:
    """Local rows of the zigzag split of `cu_seqlens` (equal on every CP rank): 2·ceil(n / 2cp) per
    sample of n > 0 tokens, the sum rounded up to a multiple of `multiple` (at least one row)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    used = sum(2 * -(-int(n) // (2 * cp)) for n in lengths if n > 0)
    return -(-max(used, 1) // multiple) * multiple


def zigzag_split(
    cu_seqlens: torch.Tensor, cp: int, rank: int, multiple: int = 1, group=None, rows: Optional[int] = None
) -> ZigzagSplit:
    """Rank `rank`'s zigzag share of the samples delimited by `cu_seqlens` (see the module docstring);
    `rows` pads the local row to that length (pipeline parallelism: one shape for every micro-batch)."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    src, samples, off = [], [], 0
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        n = s1 - s0
        if n <= 0:
            continue
        c = -(-n // (2 * cp))
        for chunk in (rank, 2 * cp - 1 - rank):
            p = torch.arange(chunk * c, (chunk + 1) * c)
            src.append(torch.where(p < n, s0 + p, -1))
        samples.append((off, c, n))
        off += 2 * c
    needed = zigzag_rows(cu_seqlens, cp, multiple)
    if rows is not None and (rows < needed or rows % multiple):
        raise ValueError(f"the zigzag split needs {needed} local rows (a multiple of {multiple}), asked to pad to {rows}")
    rows = needed if rows is None else rows
    src_S = torch.cat(src + [torch.full((rows - off,), -1, dtype=torch.long)]) if src else torch.full((rows,), -1, dtype=torch.long)
    return ZigzagSplit(cp=cp, rank=rank, src=src_S.long(), rows=rows, samples=samples, group=group)


@dataclass
class ContextPackedSeqParams(PackedSeqParams):
    """megatron's packed params plus this rank's zigzag split: `VarlenAttention` sees it and attends
    over the all-gathered keys (megatron's own code ignores the extra field)."""

    context_split: Optional[ZigzagSplit] = None


class _GatherRows(torch.autograd.Function):
    """All-gather equal-sized row blocks over `group` (rank-major); backward: sum over ranks, own block."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rows = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[r * ctx.rows : (r + 1) * ctx.rows], None


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd-correct all-gather of `[rows, ...]` blocks of equal size (rank-major result)."""
    return _GatherRows.apply(x, group)


def attend_gathered(q, k_all, v_all, split: ZigzagSplit, causal: bool, scale: float) -> torch.Tensor:
    """q `[S, hq, d]` (this rank's rows), k/v `[cp·S, hkv, d]` (every rank's rows, rank-major) → `[S, hq, d]`.

    Each local query of sample i attends to sample i's keys at global positions <= its own (causal)
    or to all of them; padding keys (past the sample's length) are never attended, padding rows
    after the last sample get zeros.
    """
    out = q.new_zeros(q.shape)
    rep = q.shape[1] // k_all.shape[1]
    for i, (off, c, n) in enumerate(split.samples):
        qpos = split.query_positions(i).to(q.device)
        kv_rows = split.key_rows(i).to(q.device)
        if causal:  # keys past this rank's last query position are masked anyway
            kv_rows = kv_rows[: min(n, int(qpos.max()) + 1)]
        kpos = torch.arange(kv_rows.numel(), device=q.device)
        mask = kpos[None, :] <= qpos[:, None] if causal else None
        qs = q[off : off + 2 * c].transpose(0, 1)  # [hq, 2c, d]
        ks = k_all.index_select(0, kv_rows).transpose(0, 1)
        vs = v_all.index_select(0, kv_rows).transpose(0, 1)
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, dim=0), vs.repeat_interleave(rep, dim=0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[off : off + 2 * c] = o.transpose(0, 1)
    return out


def context_attention(q, k, v, split: ZigzagSplit, causal: bool, scale: float) -> torch.Tensor:
    """Core attention under CP: q/k/v `[S, heads, d]` of this rank → `[S, hq, d]` (see module docstring)."""
    k_all = gather_rows(k, split.group)
    v_all = gather_rows(v, split.group)
    return attend_gathered(q, k_all, v_all, split, causal, scale)


def _gather_ragged(x: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """All-gather `[n_r, ...]` blocks whose row counts differ per rank: (rank-major rows, counts)."""
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(counts) - x.shape[0]))
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), counts


def gather_ragged(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather `[n_r, ...]` blocks whose row counts differ per rank (no autograd): rank-major rows."""
    return _gather_ragged(x, group)[0]


class _GatherVarRows(torch.autograd.Function):
    """`gather_ragged` with autograd; backward: sum over ranks, keep this rank's block."""

    @staticmethod
    def forward(ctx, x, group):
        out, counts = _gather_ragged(x, group)
        rank = dist.get_rank(group)
        ctx.group, ctx.start, ctx.rows = group, sum(counts[:rank]), counts[rank]
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.rows], None


@dataclass
class ContextParallel:
    """This rank's place in its CP group; handed to the model by the engine (`VLM.context_parallel`)."""

    size: int
    rank: int
    group: object
    multiple: int = 1  # local rows padded to a multiple of this (tp under sequence parallelism)
    rows: Optional[int] = None  # pipeline parallelism: every micro-batch of the step padded to these local rows

    def split(self, cu_seqlens: torch.Tensor) -> ZigzagSplit:
        return zigzag_split(cu_seqlens, self.size, self.rank, self.multiple, self.group, rows=self.rows)

    def step_rows(self, cu_seqlens: list[torch.Tensor]) -> int:
        """The local row count of a pipelined step: the most any of its micro-batches needs (see the
        module docstring, "Pipeline parallelism"); the same on every stage, which reads the same batches."""
        return max(zigzag_rows(cu, self.size, self.multiple) for cu in cu_seqlens)

    def media_share(self, grid_thw: torch.Tensor) -> tuple[int, int]:
        """[first, last) media items this rank encodes: contiguous blocks with about equal patch counts."""
        patches = grid_thw.prod(dim=1).tolist()
        total, bounds, acc, k = sum(patches), [0], 0, 0
        for r in range(1, self.size):
            while k < len(patches) and (acc + patches[k] / 2) <= total * r / self.size:
                acc += patches[k]
                k += 1
            bounds.append(k)
        bounds.append(len(patches))
        return bounds[self.rank], bounds[self.rank + 1]

    def encode_media(self, encode: Callable, pixel_values: torch.Tensor, grid_thw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`encode(pixel_values, grid_thw) → [n_vis, D]` of all media, each CP rank encoding its share.

        Pixel rows follow `grid_thw` (t·h·w rows per item); the embeddings' row counts differ per share
        (and per model: visual tokens per item), so they travel with the rows (`gather_ragged`).
        """
        first, last = self.media_share(grid_thw)
        rows = torch.cat([grid_thw.new_zeros(1), grid_thw.prod(dim=1).cumsum(0)]).tolist()
        if rows[-1] != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but grid_thw covers {rows[-1]}")
        mine = encode(pixel_values[rows[first] : rows[last]], grid_thw[first:last]) if last > first else None
        width = torch.tensor([0 if mine is None else mine.shape[1]], dtype=torch.long, device=pixel_values.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=self.group)
        if mine is None:  # nothing to encode here: an empty block, still in the graph (its backward joins the collective)
            mine = pixel_values.new_zeros((0, int(width)), dtype=dtype).requires_grad_()
        return _GatherVarRows.apply(mine, self.group)
