"""Gated DeltaNet (models/gdn.py): chunked == recurrent == HF on packed inputs, the layer == HF's, TP=2 == TP=1.

The HF side (transformers 5.25 `Qwen3_5GatedDeltaNet`, `torch_chunk_gated_delta_rule`,
`torch_recurrent_gated_delta_rule`) runs in `.venv-ref` through `qvl_train/tools/reference.py`,
per sample (HF has no packed path), in one subprocess per test.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from qvl_train.models.gdn import (
    GatedDeltaNet,
    chunk_gated_delta_rule,
    gated_delta_rule,
    hf_to_local,
    local_to_hf,
    packed_causal_conv1d,
    recurrent_gated_delta_rule,
    sample_positions,
)
from qvl_train.tools.reference import reference_available, run_reference
from tests.conftest import megatron_one_rank_world

REF_OK, REF_WHY = reference_available()
needs_ref = pytest.mark.skipif(not REF_OK, reason=f"no transformers 5.x reference env: {REF_WHY}")

LENS = [5, 70, 1, 130, 64]  # odd lengths, one crossing two chunk boundaries, one exactly a chunk
HK, HV, DK, DV = 2, 4, 8, 6
NAMES = ("q", "k", "v", "g", "beta")


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lens=LENS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lens)
    return {"q": torch.randn(1, t, HK, DK, generator=gen), "k": torch.randn(1, t, HK, DK, generator=gen),
            "v": torch.randn(1, t, HV, DV, generator=gen), "g": -torch.rand(1, t, HV, generator=gen) * 2,
            "beta": torch.rand(1, t, HV, generator=gen)}


def _run(fn, inputs, cu, grad_out, **kw):
    leaves = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    out, final = fn(*(leaves[n] for n in NAMES), cu_seqlens=cu, **kw)
    (out * grad_out).sum().backward()
    return {"out": out.detach(), **{f"d{n}": leaves[n].grad for n in NAMES}}, final


def test_chunked_equals_recurrent_packed_with_grads():
    inputs, cu = _inputs(), _cu(LENS)
    grad_out = torch.randn_like(inputs["v"])
    chunk, fc = _run(chunk_gated_delta_rule, inputs, cu, grad_out, output_final_state=True)
    rec, fr = _run(recurrent_gated_delta_rule, inputs, cu, grad_out, output_final_state=True)
    for name in chunk:
        torch.testing.assert_close(chunk[name], rec[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert fc.shape == (len(LENS), HV, DK, DV)
    torch.testing.assert_close(fc, fr, rtol=1e-5, atol=1e-5)
    assert all(chunk[f"d{n}"].abs().sum() > 0 for n in NAMES)
    # the CPU dispatcher is the chunked form
    torch.testing.assert_close(gated_delta_rule(*(inputs[n] for n in NAMES), cu_seqlens=cu)[0], chunk["out"])


def test_strong_decay_gradients_are_accurate_in_fp32():
    """The released decay range (A_log up to log 16, g ≈ -20 per token): the fp32 chunked form's gradient of
    the decay parameters within 1e-6 of the same form in fp64 (an fp32 prefix sum of g put it ~1e-4 off, and
    tensor-parallel runs ~7e-4 apart from one process)."""
    gen = torch.Generator().manual_seed(4)
    inputs, cu = _inputs(seed=4), _cu(LENS)
    t = inputs["g"].shape[1]
    a_log = torch.empty(HV).uniform_(0.01, 16, generator=gen).log()
    a = torch.randn(1, t, HV, generator=gen)
    grad_out = torch.randn_like(inputs["v"])

    def d_a_log(dtype):
        leaf = a_log.to(dtype).requires_grad_(True)
        g = -leaf.exp() * torch.nn.functional.softplus(a.to(dtype) + 1.0)
        x = {n: inputs[n].to(dtype) for n in ("q", "k", "v", "beta")}
        out, _ = chunk_gated_delta_rule(x["q"], x["k"], x["v"], g, x["beta"], cu_seqlens=cu)
        (out * grad_out.to(dtype)).sum().backward()
        return leaf.grad.double()

    exact = d_a_log(torch.float64)
    assert float((d_a_log(torch.float32) - exact).norm() / exact.norm()) <= 1e-6


def test_initial_state_continues_a_sample():
    """Splitting a sample in two and passing the first half's final state = running it whole."""
    inputs = _inputs([100])
    whole, _ = chunk_gated_delta_rule(*(inputs[n] for n in NAMES), output_final_state=True)
    a, state = chunk_gated_delta_rule(*(inputs[n][:, :37] for n in NAMES), output_final_state=True)
    b, _ = recurrent_gated_delta_rule(*(inputs[n][:, 37:] for n in NAMES), initial_state=state)
    torch.testing.assert_close(torch.cat([a, b], dim=1), whole, rtol=1e-5, atol=1e-5)


def test_state_resets_at_sample_boundaries():
    """A sample's outputs do not depend on its neighbours: change them and its rows stay bit-close."""
    inputs, cu = _inputs(), _cu(LENS)
    other = _inputs(seed=1)
    s0, s1 = int(cu[3]), int(cu[4])  # the 130-token sample
    mixed = {n: other[n].clone() for n in NAMES}
    for n in NAMES:
        mixed[n][:, s0:s1] = inputs[n][:, s0:s1]
    for fn in (chunk_gated_delta_rule, recurrent_gated_delta_rule):
        ref = fn(*(inputs[n] for n in NAMES), cu_seqlens=cu)[0][:, s0:s1]
        got = fn(*(mixed[n] for n in NAMES), cu_seqlens=cu)[0][:, s0:s1]
        alone = fn(*(inputs[n][:, s0:s1] for n in NAMES))[0]
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(alone, ref, rtol=1e-5, atol=1e-5)


def test_packed_conv_equals_per_sample_conv1d():
    lens = [3, 1, 9]
    x = torch.randn(sum(lens) + 2, 5)  # 2 rows of padding tail
    w = torch.randn(5, 4)
    got = packed_causal_conv1d(x, w, sample_positions(_cu(lens), x.shape[0]))
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3, bias=False)
    conv.weight.data = w[:, None]
    bounds = [*_cu(lens).tolist(), x.shape[0]]
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        ref = conv(x[s0:s1].T[None])[0, :, : s1 - s0].T
        torch.testing.assert_close(got[s0:s1], ref, rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_named():
    inputs = _inputs([10])
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_gated_delta_rule(*(inputs[n] for n in NAMES), cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="multiple of key heads"):
        chunk_gated_delta_rule(inputs["q"], inputs["k"], inputs["v"][:, :, :3], inputs["g"][..., :3],
                               inputs["beta"][..., :3])


@needs_ref
def test_kernels_match_hf_reference():
    inputs, cu = _inputs(), _cu(LENS)
    grad_out = torch.randn_like(inputs["v"])
    ref = run_reference("hf_gated_delta_rule", {**inputs, "cu_seqlens": cu, "grad_out": grad_out})
    for kind, fn in (("chunk", chunk_gated_delta_rule), ("recurrent", recurrent_gated_delta_rule)):
        ours, _ = _run(fn, inputs, cu, grad_out)
        for name, value in ours.items():
            torch.testing.assert_close(value, ref[f"{kind}_{name}"], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{kind} {name}: {m}")


# ---------------------------------------------------------------------------------------------- the layer

HIDDEN, K = 64, 4
LAYER_LENS = [7, 70, 1, 20]


def _config(tp: int = 1, sp: bool = False):
    from qvl_train.models.common import Execution, make_transformer_config

    return make_transformer_config(dtype=torch.float32, tp=tp, pp=1, execution=Execution(sequence_parallel=sp),
                                   num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, layernorm_epsilon=1e-6)


def hf_layer_state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    return {"in_proj_qkv.weight": rnd(2 * HK * DK + HV * DV, HIDDEN), "in_proj_z.weight": rnd(HV * DV, HIDDEN),
            "in_proj_b.weight": rnd(HV, HIDDEN), "in_proj_a.weight": rnd(HV, HIDDEN),
            "conv1d.weight": rnd(2 * HK * DK + HV * DV, 1, K, scale=0.5), "dt_bias": rnd(HV, scale=1.0),
            "A_log": torch.rand(HV, generator=gen).mul(3).log1p(), "norm.weight": 1 + rnd(DV),
            "out_proj.weight": rnd(HIDDEN, HV * DV)}


def build_layer(config, hf_state: dict | None = None) -> GatedDeltaNet:
    layer = GatedDeltaNet(config, 1, num_key_heads=HK, num_value_heads=HV, key_head_dim=DK, value_head_dim=DV,
                          conv_kernel=K)
    if hf_state is not None:
        full = hf_to_local(hf_state, HK, DK)
        layer.load_state_dict(_shard(full, config.tensor_model_parallel_size), strict=True)
    return layer


def _shard(full: dict, tp: int) -> dict:
    """This rank's part of a full local state (or of its gradients): whole key-head groups, contiguous."""
    rank = torch.distributed.get_rank() if tp > 1 else 0
    split_dim = {"out_proj.weight": 1, "norm_weight": None}
    return {n: v if split_dim.get(n, 0) is None else v.chunk(tp, dim=split_dim.get(n, 0))[rank] for n, v in full.items()}


def packed_params(lens, total):
    cu = _cu(lens)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens),
                           max_seqlen_kv=max(lens))


def test_hf_conversion_roundtrip_and_tp_guard():
    hf = hf_layer_state()
    back = local_to_hf(hf_to_local(hf, HK, DK), HK, DK)
    assert back.keys() == hf.keys()
    for name in hf:
        assert torch.equal(back[name], hf[name]), name
    with pytest.raises(KeyError, match="in_proj_z"):
        hf_to_local({k: v for k, v in hf.items() if k != "in_proj_z.weight"}, HK, DK)
    megatron_one_rank_world()
    with pytest.raises(ValueError, match="must divide linear_num_key_heads"):
        GatedDeltaNet(_config(tp=2), 1, num_key_heads=3, num_value_heads=6, key_head_dim=DK, value_head_dim=DV)


@needs_ref
def test_layer_matches_hf_on_packed_input():
    megatron_one_rank_world()
    hf = hf_layer_state()
    layer = build_layer(_config(), hf)
    total = sum(LAYER_LENS)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(total, HIDDEN, generator=gen)
    grad_out = torch.randn(total, HIDDEN, generator=gen)
    xs = x[:, None].clone().requires_grad_(True)
    out, bias = layer(xs, attention_mask=None, packed_seq_params=packed_params(LAYER_LENS, total))
    assert bias is None
    (out[:, 0] * grad_out).sum().backward()
    ref = run_reference("hf_gated_deltanet_layer",
                        {"x": x, "cu_seqlens": _cu(LAYER_LENS), "grad_out": grad_out,
                         **{f"w.{k}": v for k, v in hf.items()}},
                        {"hidden_size": HIDDEN, "num_k_heads": HK, "num_v_heads": HV, "head_k_dim": DK,
                         "head_v_dim": DV, "conv_kernel": K, "eps": 1e-6})
    # fp32 sums in another order: both sides sit ~3e-6 (relative to the largest value) from an fp64 run
    assert _rel(out[:, 0], ref["out"]) <= 1e-5
    assert _rel(xs.grad[:, 0], ref["dx"]) <= 1e-5
    grads = local_to_hf({n: p.grad for n, p in layer.named_parameters()}, HK, DK)
    for name, g in grads.items():
        assert _rel(g, ref[f"d.{name}"]) <= 1e-5, name


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got − ref| / max|ref| (the parity measure of tools/hf_parity.py)."""
    return float((got.detach() - ref).abs().max() / ref.abs().max())


def _tp_worker(rank: int, world_size: int) -> None:
    """tp=1, then tp=2 without and with sequence parallelism, in the same 2 processes; tp=2 == tp=1."""
    from megatron.core import parallel_state

    hf = hf_layer_state(seed=3)
    total = sum(LAYER_LENS) + 2  # two rows of padding tail past the last boundary
    gen = torch.Generator().manual_seed(7)
    x, grad_out = torch.randn(total, 1, HIDDEN, generator=gen), torch.randn(total, 1, HIDDEN, generator=gen)
    params = packed_params(LAYER_LENS, total)

    def run(tp, sp):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        layer = build_layer(_config(tp, sp))
        init = {n: getattr(layer, n).detach().clone() for n in ("conv_weight", "A_log", "dt_bias")}
        layer.load_state_dict(_shard(hf_to_local(hf, HK, DK), tp), strict=True)
        rows = slice(rank * total // 2, (rank + 1) * total // 2) if sp else slice(None)
        xs = x[rows].clone().requires_grad_(True)
        out, _ = layer(xs, packed_seq_params=params)
        (out * grad_out[rows]).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        if tp > 1:  # checkpoint shards: global shape = the tp=1 shape, this rank's rows at rank·local
            sharded = layer.sharded_state_dict()
            for name, p in layer.named_parameters():
                st, dim = sharded[name], 1 if name == "out_proj.weight" else 0
                full_shape = list(p.shape)
                if name != "norm_weight":
                    full_shape[dim] *= tp
                assert list(st.global_shape) == full_shape, name
                assert st.global_offset[dim] == (0 if name == "norm_weight" else rank * p.shape[dim]), name
        parallel_state.destroy_model_parallel()
        return rows, out.detach(), xs.grad, grads, init

    _, out1, dx1, grads1, init1 = run(1, False)
    for sp in (False, True):
        rows, out2, dx2, grads2, init2 = run(2, sp)
        for name, value in _shard(init1, 2).items():  # the layer's own init is the same model at every tp
            assert torch.equal(init2[name], value), name
        assert _rel(out2, out1[rows]) <= 1e-5 and _rel(dx2, dx1[rows]) <= 1e-5, f"sp={sp}"
        for name, g in _shard(grads1, 2).items():
            assert grads2[name].shape == g.shape and _rel(grads2[name], g) <= 1e-5, f"sp={sp} d{name}"


def test_tp2_and_sequence_parallel_match_tp1():
    from qvl_train.compat.megatron_cpu import spawn_gloo

    spawn_gloo(_tp_worker, 2)


def test_flops_count_gdn_layers_by_hand():
    from qvl_train.config import LLMConfig, ModelConfig, VisionConfig
    from qvl_train.monitor.flops import batch_flops

    llm = dict(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=1,
               vocab_size=10, mrope_section=[1, 1, 0])
    vision = VisionConfig(depth=1, hidden_size=8, num_heads=2, patch_size=2, temporal_patch_size=2,
                          spatial_merge_size=2, in_channels=1)
    hybrid = ModelConfig(generation="qwen2_vl", vision=vision, llm=LLMConfig(
        **llm, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=4, linear_value_head_dim=2, linear_conv_kernel_dim=4))
    dense = ModelConfig(generation="qwen2_vl", vision=vision, llm=LLMConfig(**llm))
    f, g = batch_flops(hybrid, [], [5, 3], 0), batch_flops(dense, [], [5, 3], 0)
    # T = 8, H = 8, d = 4, kv width 4, F = 16. Full-attention layer: 2·T·(3·H·F) MLP + 2·T·(H·H + 2·H·4 + H·H)
    # = 16·384 + 16·192; its attention 2·(5² + 3²)·8 = 544.
    # GDN layer (Hk = 1, Hv = 2, Dk = 4, Dv = 2, K = 4): MLP 16·384; projections
    # 2·T·H·(2·4 + 2·4 + 2·2 + 2·2) = 16·8·24 = 3072; conv 2·T·K·(2·4 + 4) = 64·12 = 768;
    # delta rule T·Hv·(6·Dk·Dv + 64·(5·Dk + 3·Dv)) = 16·(48 + 64·26) = 16·1712 = 27392.
    assert f.llm_linear == 2 * 16 * 384 + 16 * 192 + 3072
    assert f.llm_attention == 544 + 768 + 27392
    assert (g.llm_linear, g.llm_attention) == (2 * 16 * 384 + 2 * 16 * 192, 2 * 544)


def test_drop_in_for_self_attention_in_transformer_layer():
    """As the `self_attention` of megatron's `TransformerLayer` (our local spec): packed samples stay independent,
    and the sharded state dict has the layer's parameters under `self_attention.`."""
    from dataclasses import replace

    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from qvl_train.config import LLMConfig
    from qvl_train.models.gdn import gdn_spec_params
    from qvl_train.models.specs import layer_spec

    megatron_one_rank_world()
    llm = LLMConfig(num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    vocab_size=10, layer_types=["linear_attention"], linear_num_key_heads=HK,
                    linear_num_value_heads=HV, linear_key_head_dim=DK, linear_value_head_dim=DV)
    spec = layer_spec(causal=True)
    spec.submodules = replace(spec.submodules, self_attention=ModuleSpec(module=GatedDeltaNet,
                                                                         params=gdn_spec_params(llm)))
    config = replace(_config(), ffn_hidden_size=128, normalization="RMSNorm", perform_initialization=True)
    torch.manual_seed(0)
    layer = build_module(spec, config=config, layer_number=1)
    assert isinstance(layer.self_attention, GatedDeltaNet)
    lens = [9, 30, 5]
    total = sum(lens)
    x = torch.randn(total, 1, HIDDEN)
    out = layer(hidden_states=x, attention_mask=None, packed_seq_params=packed_params(lens, total))[0]
    s0, s1 = lens[0], lens[0] + lens[1]
    alone = layer(hidden_states=x[s0:s1], attention_mask=None, packed_seq_params=packed_params([lens[1]], s1 - s0))[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[s0:s1], alone, rtol=1e-5, atol=1e-5)
    keys = set(layer.sharded_state_dict().keys())
    assert {f"self_attention.{n}" for n in ("in_proj.weight", "conv_weight", "A_log", "dt_bias", "norm_weight",
                                             "out_proj.weight")} <= keys


def test_fla_dispatch_passes_the_documented_arguments(monkeypatch):
    """The CUDA path, with a stand-in for fla-core 0.6.0's `chunk_gated_delta_rule` (no GPU here): packed [1, T, ...]
    tensors, key heads not repeated (fla groups value heads itself), int64 cu_seqlens on the device and on the CPU,
    the L2 norm left to the kernel; the stand-in computes with our chunked form, so the result must match it."""
    from qvl_train.models import gdn

    seen = {}

    def stand_in(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                 use_qk_l2norm_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None):
        seen.update(q=q.shape, k=k.shape, cu=cu_seqlens.dtype, cu_cpu=cu_seqlens_cpu.device.type,
                    l2=use_qk_l2norm_in_kernel)
        return chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens, initial_state, output_final_state, scale,
                                      use_qk_l2norm_in_kernel)

    monkeypatch.setattr(gdn, "_fla_kernel_for", lambda q: stand_in)
    inputs, cu = _inputs(), _cu(LENS)
    out, final = gated_delta_rule(*(inputs[n][0] for n in NAMES), cu_seqlens=cu, output_final_state=True)
    total = sum(LENS)
    assert seen == {"q": (1, total, HK, DK), "k": (1, total, HK, DK), "cu": torch.int64, "cu_cpu": "cpu", "l2": True}
    ref, ref_final = chunk_gated_delta_rule(*(inputs[n] for n in NAMES), cu_seqlens=cu, output_final_state=True)
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(final, ref_final)


def test_reference_runner_refuses_bad_calls(monkeypatch, tmp_path):
    """tools/reference.py: a missing interpreter names `make setup`; only identifiers and repo files are run."""
    from qvl_train.tools import reference

    monkeypatch.setenv(reference.ENV_VAR, str(tmp_path / "no-python"))
    assert not reference.reference_available()[0]
    with pytest.raises(reference.ReferenceUnavailable, match="make setup"):
        reference.run_reference("hf_gated_delta_rule", {})
    monkeypatch.delenv(reference.ENV_VAR)
    with pytest.raises(ValueError, match="identifier"):
        reference.run_reference("os.system", {})
    outside = tmp_path / "evil.py"
    outside.write_text("def f(tensors):\n    return {}\n")
    if REF_OK:
        with pytest.raises(ValueError, match="outside the repository"):
            reference.run_reference("f", {}, file=outside)
        with pytest.raises(TypeError, match="JSON"):
            reference.run_reference("hf_gated_delta_rule", {}, {"x": object()})
