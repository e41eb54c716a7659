"""Context parallelism's split and attention (qvl_train/parallel/context.py), every CP rank simulated in
one process: the zigzag shares of a packed row (a sample whose image crosses the chunk boundary, a
text-only sample, the padding tail) cover each real token exactly once with its original M-RoPE
position and label, and attention over the all-gathered keys reproduces plain per-sample causal
attention — outputs and the gradients of q, k, v. The two-process version (autograd through the real
all-gathers, the ViT shared out, gradients over dp×cp) is the cp=2 case of the distributed suites."""

from __future__ import annotations

import math

import pytest
import torch

from data_pipelines.schema import IGNORE_INDEX
from qvl_train.models.attention import varlen_sdpa
from qvl_train.parallel.context import ContextParallel, attend_gathered, zigzag_rows, zigzag_split

# Sample 0: 13 tokens, text 0-2, a 2×3 image (6 tokens) at 3-8 (M-RoPE t=3, h=3..4, w=3..5), text 9-12
# (positions restart at 6 after the image). Sample 1: 7 text tokens. Sample 2: 17 text tokens. Tail: 3 slots.
CU = torch.tensor([0, 13, 20, 37], dtype=torch.int32)
L = 40


def _positions() -> torch.Tensor:
    img_h = torch.tensor([3, 3, 3, 4, 4, 4])
    img_w = torch.tensor([3, 4, 5, 3, 4, 5])
    s0 = torch.stack([
        torch.cat([torch.arange(3), torch.full((6,), 3), torch.arange(6, 10)]),
        torch.cat([torch.arange(3), img_h, torch.arange(6, 10)]),
        torch.cat([torch.arange(3), img_w, torch.arange(6, 10)]),
    ])
    text = lambda n: torch.arange(n).expand(3, n)  # noqa: E731
    return torch.cat([s0, text(7), text(17), torch.zeros(3, L - 37, dtype=torch.long)], dim=1)


@pytest.mark.parametrize("cp, multiple", [(2, 1), (2, 4), (3, 2)])
def test_zigzag_shares_cover_every_token_once(cp, multiple):
    positions = _positions()
    labels = torch.arange(L) * 7 % 11
    labels[37:] = IGNORE_INDEX
    seen = []
    for rank in range(cp):
        split = zigzag_split(CU, cp, rank, multiple)
        assert split.rows % multiple == 0 and split.rows == zigzag_split(CU, cp, 0, multiple).rows
        real = split.src >= 0
        seen += split.src[real].tolist()
        assert torch.equal(split.positions(positions)[:, real], positions[:, split.src[real]])
        assert torch.equal(split.positions(positions)[:, ~real], torch.zeros(3, int((~real).sum()), dtype=torch.long))
        taken = split.labels(labels)
        assert torch.equal(taken[real], labels[split.src[real]]) and (taken[~real] == IGNORE_INDEX).all()
        # zigzag: rank r holds chunks r and 2cp-1-r of every sample
        for i, (off, c, n) in enumerate(split.samples):
            q = split.query_positions(i)
            assert q[:c].min() == rank * c and q[c:].min() == (2 * cp - 1 - rank) * c
    assert sorted(seen) == list(range(37))  # every real token once; the tail belongs to nobody


def test_image_crossing_the_split_keeps_its_positions():
    """Sample 0's image tokens (3-8) straddle the chunk boundary at 4 (13 tokens → 16 = 4 chunks of 4 at cp=2)."""
    positions = _positions()
    owners = {}
    for rank in range(2):
        split = zigzag_split(CU, 2, rank)
        for row, s in enumerate(split.src.tolist()):
            if 3 <= s <= 8:
                owners[s] = rank
                assert split.positions(positions)[:, row].tolist() == positions[:, s].tolist()
    assert set(owners.values()) == {0, 1} and sorted(owners) == list(range(3, 9))


def test_deepstack_features_follow_their_tokens():
    pos = torch.arange(3, 9)  # the image's token rows in the full row
    feats = [torch.arange(6.0)[:, None].expand(6, 4) + 100 * k for k in range(2)]
    got = {}
    for rank in range(2):
        split = zigzag_split(CU, 2, rank)
        local_pos, local_feats = split.localize((pos, feats))
        for p, f0, f1 in zip(local_pos.tolist(), local_feats[0], local_feats[1]):
            s = int(split.src[p])
            got[s] = (float(f0[0]), float(f1[0]))
    assert got == {int(p): (float(i), 100.0 + i) for i, p in enumerate(pos)}


@pytest.mark.parametrize("cp", [2, 3])
def test_attention_over_gathered_keys_matches_per_sample_causal(cp):
    torch.manual_seed(0)
    hq, hkv, d = 4, 2, 8
    q, k, v = (torch.randn(L, h, d, dtype=torch.float64, requires_grad=True) for h in (hq, hkv, hkv))
    scale = 1 / math.sqrt(d)
    weight = torch.randn(L, hq, d, dtype=torch.float64)
    weight[37:] = 0  # the padding tail carries no loss
    ref = varlen_sdpa(q, k, v, CU, True, scale)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))

    splits = [zigzag_split(CU, cp, r, multiple=2) for r in range(cp)]
    k_all = torch.cat([s.take(k) for s in splits])  # what the all-gather over the CP group returns
    v_all = torch.cat([s.take(v) for s in splits])
    total = 0.0
    for split in splits:
        out = attend_gathered(split.take(q), k_all, v_all, split, True, scale)
        real = split.src >= 0
        assert torch.allclose(out[real], ref[split.src[real]], atol=1e-12)
        assert (out[sum(2 * c for _, c, _ in split.samples):] == 0).all()  # rows after the last sample
        total = total + (out * split.take(weight)).sum()
    grads = torch.autograd.grad(total, (q, k, v))
    for g, g_ref, name in zip(grads, ref_grads, "qkv"):
        assert torch.allclose(g, g_ref, atol=1e-12), name


def test_pipelined_step_pads_every_micro_batch_to_its_largest_share():
    """Under pipeline parallelism every micro-batch of a step gets the same local row count (the stages
    exchange one activation shape): the largest share of the step; padding rows take no token."""
    short = torch.tensor([0, 5, 9], dtype=torch.int32)  # 4 + 2 rows per CP rank at cp=2; CU's: 8 + 4 + 10
    cp = ContextParallel(2, 1, None, multiple=2)
    assert [zigzag_rows(cu, 2, 2) for cu in (CU, short)] == [zigzag_split(CU, 2, 1, 2).rows, 6] == [22, 6]
    rows = cp.step_rows([short, CU])
    assert rows == 22
    cp.rows = rows
    own, padded = zigzag_split(short, 2, 1, 2), cp.split(short)
    assert padded.rows == 22 and torch.equal(padded.src[: own.rows], own.src) and (padded.src[own.rows :] == -1).all()
    assert padded.samples == own.samples
    with pytest.raises(ValueError, match="needs 22 local rows"):
        zigzag_split(CU, 2, 0, 2, rows=6)


def test_media_share_is_contiguous_and_balanced():
    grid = torch.tensor([[1, 8, 8], [1, 4, 4], [1, 4, 4], [2, 8, 8], [1, 4, 4]])
    shares = [ContextParallel(2, r, None).media_share(grid) for r in range(2)]
    assert shares[0][0] == 0 and shares[0][1] == shares[1][0] and shares[1][1] == 5
    patches = grid.prod(1)
    a, b = (int(patches[s0:s1].sum()) for s0, s1 in shares)
    assert abs(a - b) <= int(patches.max())
    one = torch.tensor([[1, 4, 4]])  # fewer items than ranks: one rank encodes nothing
    assert [ContextParallel(2, r, None).media_share(one) for r in range(2)] in ([(0, 1), (1, 1)], [(0, 0), (0, 1)])


def _two_rank_worker(rank: int, world: int) -> None:
    """The real collectives: attention over all-gathered keys and the shared-out media encoding, each
    output and gradient (summed over the ranks, as the engine's dp×cp all-reduce does) against one process."""
    import torch.distributed as dist

    from qvl_train.parallel.context import ContextParallel, context_attention

    group = dist.group.WORLD
    cp = ContextParallel(world, rank, group)
    torch.manual_seed(0)
    q, k, v = (torch.randn(L, h, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    weight = torch.randn(L, 4, 8, dtype=torch.float64)
    weight[37:] = 0
    ref = varlen_sdpa(q, k, v, CU, True, 0.125)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    split = cp.split(CU)
    out = context_attention(split.take(q), split.take(k), split.take(v), split, True, 0.125)
    real = split.src >= 0
    assert torch.allclose(out[real], ref[split.src[real]], atol=1e-12)
    grads = torch.autograd.grad((out * split.take(weight)).sum(), (q, k, v))
    for g, g_ref in zip(grads, ref_grads):
        g = g.contiguous()
        dist.all_reduce(g)
        assert torch.allclose(g, g_ref, atol=1e-12)

    # media: 4 patch rows → 1 visual token; one image (rank 1 encodes nothing) and three images
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    encode = lambda pix, grid: (pix @ w).reshape(-1, 4, 5).sum(1)  # noqa: E731
    for grid in (torch.tensor([[1, 2, 4]]), torch.tensor([[1, 2, 4], [1, 2, 2], [2, 2, 2]])):
        pix = torch.randn(int(grid.prod(1).sum()), 6, dtype=torch.float64)
        ref = encode(pix, grid)
        (ref_grad,) = torch.autograd.grad((ref * torch.arange(ref.numel()).reshape(ref.shape)).sum(), (w,))
        got = cp.encode_media(encode, pix, grid, torch.float64)
        assert torch.allclose(got, ref, atol=1e-12)
        w.grad = None
        mine = (torch.arange(got.shape[0]) % world == rank)[:, None]  # each rank's loss uses its own rows, as the split does
        (got * torch.arange(got.numel()).reshape(got.shape) * mine).sum().backward()  # as the schedules do: every leaf
        g = torch.zeros_like(w) if w.grad is None else w.grad
        dist.all_reduce(g)
        assert torch.allclose(g, ref_grad, atol=1e-10)


def test_two_ranks_gather_keys_and_share_media():
    from qvl_train.compat.megatron_cpu import spawn_gloo

    spawn_gloo(_two_rank_worker, 2)
