"""The torch FP8 backend on CPU (emulated GEMMs): scaling, backward, coverage of every spec linear, loss vs fp32."""

from __future__ import annotations

import pytest
import torch

from qvl_train.config import ParallelConfig
from qvl_train.models import build_model, init_weights
from qvl_train.models.common import Execution, SequenceShards
from qvl_train.models.fp8 import (
    E4M3,
    E5M2,
    FP8_MAX,
    Fp8ColumnParallelLinear,
    Fp8Recipe,
    Fp8RowParallelLinear,
    _pad_to,
    fp8_linear,
    fp8_row_multiple,
    quantize,
)
from qvl_train.models.tiny import packed_batch, tiny_qwen2_5_vl_config, tiny_qwen3_vl_config, tiny_qwen3_vl_moe_config
from tests.conftest import megatron_one_rank_world


# ------------------------------------------------------------------------------------------ scaling
def test_scale_maps_amax_to_the_format_maximum():
    x = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.25, -0.125]])
    q, inv = quantize(x, E4M3)
    assert inv.dim() == 0 and float(inv) == pytest.approx(2.0 / 448.0)
    assert float(q.float().abs().max()) == 448.0  # the amax element lands exactly on FP8_MAX
    q, inv = quantize(x, E4M3, rowwise=True)
    assert inv.shape == (2, 1)
    assert torch.allclose(inv.squeeze(1), torch.tensor([2.0, 0.25]) / 448.0)
    assert torch.equal(q.float().abs().amax(dim=1), torch.tensor([448.0, 448.0]))
    q, inv = quantize(x, E5M2)
    assert float(inv) == pytest.approx(2.0 / FP8_MAX[E5M2]) and q.dtype == E5M2


def test_zero_tensor_and_zero_rows_get_scale_one():
    q, inv = quantize(torch.zeros(3, 4), E4M3)
    assert float(inv) == 1.0 and torch.count_nonzero(q.float()) == 0
    q, inv = quantize(torch.tensor([[0.0, 0.0], [1.0, -3.0]]), E4M3, rowwise=True)
    assert inv[0, 0] == 1.0 and torch.isfinite(q.float()).all()


def test_saturation_and_nonfinite():
    # dequantised values never exceed the input range; an inf input gives NaN (the step is then skipped), not a clip
    x = torch.tensor([1e-30, 3.0, -1e30])
    q, inv = quantize(x, E4M3)
    assert torch.isfinite(q.float()).all() and float(q.float().abs().max()) <= 448.0
    assert float((q.float() * inv)[2]) == pytest.approx(-1e30, rel=0.07)
    q, _ = quantize(torch.tensor([1.0, float("inf")]), E4M3)
    assert torch.isnan(q.float()).all()


def test_quantisation_error_is_fp8_rounding():
    torch.manual_seed(0)
    x = torch.randn(64, 32) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows spanning six decades
    for rowwise, bound in ((True, 2**-4), (False, None)):
        q, inv = quantize(x, E4M3, rowwise)
        err = (q.float() * inv - x).abs()
        if rowwise:  # e4m3: 3 mantissa bits → relative error <= 2^-4 for normal values of each row
            big = x.abs() > x.abs().amax(dim=1, keepdim=True) * 2**-6
            assert float((err[big] / x.abs()[big]).max()) <= bound
    # per-tensor scaling flushes the small rows, row-wise keeps them: why row-wise is the default
    qt, it = quantize(x, E4M3)
    qr, ir = quantize(x, E4M3, True)
    small = slice(0, 8)
    assert (qr.float() * ir - x)[small].abs().max() < (qt.float() * it - x)[small].abs().max()


def test_pad_keeps_fp8_values():
    q, _ = quantize(torch.randn(5, 7), E4M3)
    p = _pad_to(q, 16, 16)
    assert p.shape == (16, 16) and p.dtype == E4M3
    assert torch.equal(p[:5, :7].float(), q.float()) and torch.count_nonzero(p[5:].float()) == 0


# ------------------------------------------------------------------------------------------ GEMMs
@pytest.mark.parametrize("recipe", [Fp8Recipe(), Fp8Recipe("e4m3", "tensor")])
def test_linear_forward_backward_match_the_quantised_reference(recipe):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 48, requires_grad=True)  # 15 token rows: not a multiple of 16
    w = (torch.randn(40, 48) * 0.05).requires_grad_()
    g = torch.randn(3, 5, 40)
    y = fp8_linear(x, w, recipe)
    y.backward(g)

    def dq(t, dtype, rowwise=False):
        q, inv = quantize(t, dtype, rowwise)
        return q.float() * inv

    rw = recipe.scaling == "rowwise"
    x2, g2 = x.detach().reshape(-1, 48), g.reshape(-1, 40)
    ref_y = dq(x2, E4M3, rw) @ dq(w.detach(), E4M3, rw).t()
    ref_gx = dq(g2, recipe.grad_dtype) @ dq(w.detach().t().contiguous(), E4M3).t()
    ref_gw = dq(g2.t().contiguous(), recipe.grad_dtype) @ dq(x2.t().contiguous(), E4M3).t()
    assert torch.allclose(y.reshape(-1, 40), ref_y, atol=1e-6)
    assert torch.allclose(x.grad.reshape(-1, 48), ref_gx, atol=1e-6)
    assert torch.allclose(w.grad, ref_gw, atol=1e-6)
    # and against the exact fp32 product: within FP8 rounding (relative to the output scale)
    exact_y, exact_gx, exact_gw = x2 @ w.detach().t(), g2 @ w.detach(), g2.t() @ x2
    tol = 0.08 if recipe.grad_format == "e5m2" else 0.05
    for got, exact in ((y.reshape(-1, 40), exact_y), (x.grad.reshape(-1, 48), exact_gx), (w.grad, exact_gw)):
        assert float((got - exact).norm() / exact.norm()) < tol
        assert float((got - exact).norm() / exact.norm()) > 1e-4  # it really is quantised


def test_frozen_weight_and_empty_input():
    w = torch.randn(8, 16)
    x = torch.randn(4, 16, requires_grad=True)
    fp8_linear(x, w, Fp8Recipe()).sum().backward()
    assert x.grad is not None and w.grad is None
    empty = torch.zeros(0, 16, requires_grad=True)
    assert fp8_linear(empty, w, Fp8Recipe()).shape == (0, 8)


# ------------------------------------------------------------------------------------------ coverage
def _build(cfg, fp8_torch=None):
    torch.manual_seed(0)
    m = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True,
                    execution=Execution(fp8_torch=fp8_torch))
    init_weights(m, seed=1, std=0.02)
    return m


@pytest.mark.parametrize("make", [tiny_qwen2_5_vl_config, tiny_qwen3_vl_config, tiny_qwen3_vl_moe_config],
                         ids=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_every_block_linear_runs_fp8(make, monkeypatch):
    """Every attention / MLP / expert linear of the ViT blocks (window-attention and DeepStack loops) and the LLM
    layers goes through the FP8 GEMM; mergers, the router and the output layer do not."""
    megatron_one_rank_world()
    cfg = make()
    m = _build(cfg, Fp8Recipe())
    block_linears = {n: mod for n, mod in m.named_modules() if isinstance(mod, (Fp8ColumnParallelLinear, Fp8RowParallelLinear))}
    assert block_linears and all(mod.config.torch_fp8 == Fp8Recipe() for mod in block_linears.values())
    assert any(".experts." in n for n in block_linears) == (make is tiny_qwen3_vl_moe_config)
    assert not any(n.startswith("projector") or "output_layer" in n or "router" in n for n in block_linears)

    called: set[int] = set()
    import qvl_train.models.fp8 as fp8_mod

    real = fp8_mod.fp8_linear

    def spy(x, w, recipe):
        called.add(id(w))
        return real(x, w, recipe)

    monkeypatch.setattr(fp8_mod, "fp8_linear", spy)
    b = packed_batch(cfg)
    m(b).sum().backward()
    missed = [n for n, mod in block_linears.items() if id(mod.weight) not in called]
    if make is tiny_qwen3_vl_moe_config:  # an expert no token reached this batch is legitimately idle
        missed = [n for n in missed if ".experts." not in n]
    assert not missed, f"linears that ran without FP8: {missed}"


def test_fp8_loss_tracks_fp32_over_steps():
    """A few AdamW steps of the tiny Qwen3-VL MoE: the FP8 loss stays within FP8 rounding of the fp32 loss."""
    megatron_one_rank_world()
    cfg = tiny_qwen3_vl_moe_config()
    b = packed_batch(cfg)
    curves = []
    for recipe in (None, Fp8Recipe()):
        m = _build(cfg, recipe)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        losses = []
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            loss = m(b).sum() / b.num_label_tokens
            loss.backward()
            opt.step()
            losses.append(float(loss))
        curves.append(losses)
    ref, got = curves
    assert ref[-1] < ref[0] and got[-1] < got[0]  # both learn
    for r, g in zip(ref, got):
        assert abs(g - r) / r < 0.02, (ref, got)
    assert ref != got  # the FP8 path is really different arithmetic


def test_te_fp8_pads_vit_rows_to_16(monkeypatch):
    """Under Transformer Engine FP8 the ViT rows are padded to 16 (its GEMMs need it); without FP8 nothing is padded."""
    megatron_one_rank_world()

    class Cfg:
        sequence_parallel = False
        fp8 = "hybrid"

    assert fp8_row_multiple(Cfg) == 16 and fp8_row_multiple(object()) == 1
    shards = SequenceShards(Cfg, 37, fp8_row_multiple(Cfg))
    h = torch.randn(37, 1, 8, requires_grad=True)
    padded = shards.scatter(h)
    assert padded.shape[0] == 48 and shards.pad_rows(torch.zeros(37, 4)).shape[0] == 48
    assert shards.mask(torch.zeros(37, dtype=torch.bool)).sum() == 11
    assert torch.equal(shards.gather(padded), h)
    Cfg.fp8 = None
    assert SequenceShards(Cfg, 37, fp8_row_multiple(Cfg)).pad == 0


# ------------------------------------------------------------------------------------------ tensor parallel
def test_tp2_sp_equals_tp1_with_the_torch_backend(tmp_path, data_root):
    """One training step of the tiny Qwen3-VL with torch FP8: tp=2 + sp (one 2-process launch) gives the one-process
    FP8 loss and gradients within FP8 rounding (row-parallel weights are scaled per shard), and FP8 really ran."""
    from tests.conftest import ROOT, run_probe

    probe, base = ROOT / "tests" / "distributed" / "fp8_probe.py", ["+experiment=tiny_qwen3_vl", "data.max_tokens=512",
                                                                      "train.global_batch_tokens=1024"]
    one = run_probe(probe, tmp_path / "tp1.pt", 1, str(data_root), *base)
    two = run_probe(probe, tmp_path / "tp2.pt", 2, str(data_root), *base, "parallel.tp=2", "parallel.sp=true")
    exact = run_probe(ROOT / "tests" / "distributed" / "grad_probe.py", tmp_path / "fp32.pt", 1, str(data_root), *base)
    assert two["sequence_parallel"]["llm"] and not one["sequence_parallel"]["llm"]
    assert two["loss"] == pytest.approx(one["loss"], rel=5e-3)
    assert one["grads"].keys() == two["grads"].keys()
    worst = max(float((two["grads"][k] - one["grads"][k]).norm() / one["grads"][k].norm().clamp_min(1e-12))
                for k in one["grads"])
    assert worst < 0.1, worst
    fp8_vs_fp32 = float(abs(one["loss"] - exact["loss"]) / exact["loss"])
    assert 0 < fp8_vs_fp32 < 0.02, (one["loss"], exact["loss"])
