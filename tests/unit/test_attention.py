"""VarlenAttention: per-segment attention equals a per-sample reference; padding ignored; flex == sdpa."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from qvl_train.models.attention import VarlenAttention, varlen_flex, varlen_sdpa

HQ, HKV, D = 4, 2, 8
CU = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
L = 24  # 4 padding slots


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, HQ, D, generator=g), torch.randn(L, HKV, D, generator=g), torch.randn(L, HKV, D, generator=g))


def _reference(q, k, v, causal):
    """Naive softmax attention per sample, GQA by explicit head → group mapping."""
    out = torch.zeros_like(q)
    for s0, s1 in zip(CU[:-1].tolist(), CU[1:].tolist()):
        n = s1 - s0
        for h in range(HQ):
            g = h // (HQ // HKV)
            scores = q[s0:s1, h] @ k[s0:s1, g].T / math.sqrt(D)
            if causal:
                scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
            out[s0:s1, h] = scores.softmax(-1) @ v[s0:s1, g]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_loop_matches_reference(causal):
    q, k, v = _qkv()
    out = varlen_sdpa(q, k, v, CU, causal, 1 / math.sqrt(D))
    torch.testing.assert_close(out, _reference(q, k, v, causal), rtol=1e-5, atol=1e-5)
    assert torch.all(out[20:] == 0)


def test_padding_tail_and_other_samples_do_not_leak():
    q, k, v = _qkv()
    out = varlen_sdpa(q, k, v, CU, True, 1 / math.sqrt(D))
    k2, v2 = k.clone(), v.clone()
    k2[20:], v2[20:] = 1e3, 1e3  # garbage in the padding tail
    k2[:5], v2[:5] = -7.0, 3.0  # a different first sample
    out2 = varlen_sdpa(q, k2, v2, CU, True, 1 / math.sqrt(D))
    torch.testing.assert_close(out2[5:], out[5:])


@pytest.mark.parametrize("causal", [True, False])
def test_flex_matches_sdpa_loop(causal):
    q, k, v = _qkv(1)
    ref = varlen_sdpa(q, k, v, CU, causal, 0.3)
    torch.testing.assert_close(varlen_flex(q, k, v, CU, causal, 0.3), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa_loop", "flex"])
def test_module_signature_and_shapes(backend):
    cfg = TransformerConfig(
        num_layers=1, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=HKV, kv_channels=D, attention_dropout=0.0
    )
    attn = VarlenAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, backend=backend)
    q, k, v = _qkv(2)
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=CU, cu_seqlens_kv=CU, max_seqlen_q=8, max_seqlen_kv=8)
    out = attn(q[:, None], k[:, None], v[:, None], None, packed_seq_params=packed)
    assert out.shape == (L, 1, HQ * D)
    torch.testing.assert_close(out[:, 0].reshape(L, HQ, D), _reference(q, k, v, True), rtol=1e-4, atol=1e-4)


def test_backend_resolution_on_cpu():
    from qvl_train.models.attention import resolve_backend

    assert resolve_backend("auto") == "sdpa_loop"
    assert resolve_backend("flex") == "flex"
    with pytest.raises(ValueError, match="varlen needs CUDA"):
        resolve_backend("varlen")
    with pytest.raises(ValueError, match="valid: auto, sdpa_loop, flex, varlen"):
        resolve_backend("flash")


def test_varlen_torch_takes_fp32_through_the_exact_loop():
    from qvl_train.models.attention import varlen_torch

    q, k, v = _qkv()
    torch.testing.assert_close(varlen_torch(q, k, v, CU, True, 0.3), varlen_sdpa(q, k, v, CU, True, 0.3), rtol=0, atol=0)


def test_flash_attn_backend_needs_cuda_and_the_package():
    from qvl_train.models.attention import resolve_backend

    with pytest.raises(ValueError, match="flash_attn needs CUDA and the flash-attn package"):
        resolve_backend("flash_attn")


def test_varlen_flash_calls_flash_attn_varlen_func_as_documented(monkeypatch):
    """flash-attn is a GPU extra: a stand-in with its documented signature (q, k, v, cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal; unpadded rows; k/v with
    their own kv heads) checks what the backend hands the kernel and what it makes of the result."""
    import qvl_train.models.attention as attention

    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append((q.shape, k.shape, cu_q.dtype, max_q, dropout_p, softmax_scale, causal))
        assert torch.equal(cu_q, cu_k) and max_q == max_k
        full = torch.zeros(L, *q.shape[1:], dtype=q.dtype)
        padded = (torch.cat([x, full[: L - x.shape[0], : x.shape[1]]]) for x in (q, k, v))
        return varlen_sdpa(*padded, cu_q, causal, softmax_scale)[: q.shape[0]]

    monkeypatch.setattr(attention, "_flash_attn", lambda: flash_attn_varlen_func)
    q, k, v = (x.bfloat16() for x in _qkv(3))
    out = attention.varlen_flash(q, k, v, CU, True, 0.3)
    assert calls == [((20, HQ, D), (20, HKV, D), torch.int32, 8, 0.0, 0.3, True)]
    assert out.shape == q.shape and torch.all(out[20:] == 0)
    torch.testing.assert_close(out, varlen_sdpa(q, k, v, CU, True, 0.3))
    # fp32 (parity checks) takes the exact loop without calling the kernel
    torch.testing.assert_close(attention.varlen_flash(*_qkv(3), CU, True, 0.3), varlen_sdpa(*_qkv(3), CU, True, 0.3))
    assert len(calls) == 1


def test_te_backend_builds_te_attention_in_thd_format(monkeypatch):
    """Transformer Engine is a GPU extra: a stand-in `DotProductAttention` with TE's documented
    constructor and "thd" forward keywords checks how the module builds and calls it, GQA unexpanded."""
    import qvl_train.models.attention as attention

    built, calls = [], []

    class DotProductAttention(torch.nn.Module):
        def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                     qkv_format="sbhd", attn_mask_type="causal", softmax_scale=None):
            super().__init__()
            built.append((num_attention_heads, kv_channels, num_gqa_groups, qkv_format, attn_mask_type, softmax_scale))
            self.scale = softmax_scale

        def forward(self, q, k, v, qkv_format=None, cu_seqlens_q=None, cu_seqlens_kv=None,
                    max_seqlen_q=None, max_seqlen_kv=None, attn_mask_type=None):
            calls.append((q.shape, k.shape, qkv_format, cu_seqlens_q.dtype, max_seqlen_q, attn_mask_type))
            pad = torch.zeros(L - q.shape[0], *q.shape[1:], dtype=q.dtype)
            full = [torch.cat([x, pad[:, : x.shape[1]]]) for x in (q, k, v)]
            out = varlen_sdpa(*full, cu_seqlens_q, attn_mask_type == "padding_causal", self.scale)
            return out[: q.shape[0]].reshape(q.shape[0], -1)  # TE returns [t, heads·dim]

    monkeypatch.setattr(attention, "_te_attention", lambda: DotProductAttention)
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)
    assert attention.resolve_backend("auto") == "te"
    cfg = TransformerConfig(
        num_layers=1, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=HKV, kv_channels=D, attention_dropout=0.0
    )
    attn = VarlenAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, backend="te")
    assert built == [(HQ, D, HKV, "thd", "padding_causal", 1 / math.sqrt(D))]
    assert not list(attn.state_dict())  # nothing of TE's in checkpoints
    q, k, v = (x.bfloat16() for x in _qkv(4))
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=CU, cu_seqlens_kv=CU, max_seqlen_q=8, max_seqlen_kv=8)
    out = attn(q[:, None], k[:, None], v[:, None], None, packed_seq_params=packed)
    assert calls == [((20, HQ, D), (20, HKV, D), "thd", torch.int32, 8, "padding_causal")]
    assert out.shape == (L, 1, HQ * D) and torch.all(out[20:] == 0)
    torch.testing.assert_close(out[:, 0].reshape(L, HQ, D), varlen_sdpa(q, k, v, CU, True, 1 / math.sqrt(D)))
    attn(q[:, None], k[:, None], v[:, None], None, attn_mask_type=AttnMaskType.no_mask, packed_seq_params=packed)
    assert calls[-1][-1] == "padding"


@pytest.mark.parametrize("causal", [True, False])
def test_te_context_parallel_attention_gets_the_zigzag_layout(monkeypatch, causal):
    """parallel.cp with the te backend hands this rank's zigzag rows to Transformer Engine's own CP
    attention. A stand-in with TE's documented contract (`set_context_parallel_group(group, ranks,
    stream, comm_type)`; "thd" rows of each sequence padded to `cu_seqlens_*_padded`, split into 2·cp
    chunks with rank r holding chunks r and 2·cp-1-r; keys past `cu_seqlens_*` never attended) holds
    the full sequences, checks that the rows it is given are exactly that partition, and answers with
    the full attention's rows: the module's output must then equal the per-sample reference."""
    import qvl_train.models.attention as attention
    from qvl_train.parallel.context import ContextPackedSeqParams, zigzag_split

    cp, group = 2, object()
    q, k, v = (x.bfloat16() for x in _qkv(5))
    full = _reference(*(x.float() for x in (q, k, v)), causal)
    groups, calls = [], []

    class DotProductAttention(torch.nn.Module):
        def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                     qkv_format="sbhd", attn_mask_type="causal", softmax_scale=None):
            super().__init__()

        def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type="p2p"):
            groups.append((cp_group, cp_global_ranks, cp_comm_type))

        def forward(self, lq, lk, lv, qkv_format=None, cu_seqlens_q=None, cu_seqlens_kv=None, cu_seqlens_q_padded=None,
                    cu_seqlens_kv_padded=None, max_seqlen_q=None, max_seqlen_kv=None, attn_mask_type=None):
            calls.append((qkv_format, attn_mask_type, cu_seqlens_q.tolist(), cu_seqlens_q_padded.tolist(), max_seqlen_q))
            assert torch.equal(cu_seqlens_q, cu_seqlens_kv) and torch.equal(cu_seqlens_q_padded, cu_seqlens_kv_padded)
            rows = []  # TE's partition of the padded sequences: global row of each local row, -1 = padding
            for s0, s1, p0, p1 in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(),
                                      cu_seqlens_q_padded[:-1].tolist(), cu_seqlens_q_padded[1:].tolist()):
                c = (p1 - p0) // (2 * cp)
                assert (p1 - p0) % (2 * cp) == 0 and s1 - s0 <= p1 - p0
                for chunk in (rank, 2 * cp - 1 - rank):
                    rows += [s0 + p if p < s1 - s0 else -1 for p in range(chunk * c, (chunk + 1) * c)]
            assert lq.shape[0] == len(rows) == cu_seqlens_q_padded[-1] // cp
            real = torch.tensor([i for i, r in enumerate(rows) if r >= 0])
            src = torch.tensor([r for r in rows if r >= 0])
            for local, whole in ((lq, q), (lk, k), (lv, v)):
                assert torch.equal(local[real], whole[src])
            out = torch.zeros(lq.shape[0], HQ, D, dtype=lq.dtype)
            out[real] = full[src].to(lq.dtype)
            return out.reshape(lq.shape[0], -1)

    monkeypatch.setattr(attention, "_te_attention", lambda: DotProductAttention)
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "_cp_stream", lambda: None)
    monkeypatch.setattr(attention.dist, "get_process_group_ranks", lambda g: [0, 1])
    cfg = TransformerConfig(
        num_layers=1, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=HKV, kv_channels=D, attention_dropout=0.0
    )
    attn = VarlenAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal if causal else AttnMaskType.no_mask, backend="te")
    for rank in range(cp):
        split = zigzag_split(CU, cp, rank, multiple=4, group=group)  # rows past the samples: the TP multiple
        packed = ContextPackedSeqParams(qkv_format="sbhd", cu_seqlens_q=CU, cu_seqlens_kv=CU, context_split=split)
        local = [split.take(x)[:, None] for x in (q, k, v)]
        out = attn(*local, None, packed_seq_params=packed)[:, 0].reshape(-1, HQ, D)
        torch.testing.assert_close(out.float(), split.take(full), atol=1e-2, rtol=1e-2)
        # fp32 (parity runs) keeps the exact all-gather path and never calls TE
        assert attention.context_te(None, *(x.float()[:, 0] for x in local), split, causal) is None
    assert groups == [(group, [0, 1], "p2p")]  # set once per group
    assert calls[0] == ("thd", "padding_causal" if causal else "padding", [0, 5, 12, 20], [0, 8, 16, 24], 8)
