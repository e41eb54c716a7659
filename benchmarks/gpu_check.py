"""GPU checks, run on a lent GPU by `benchmarks/gpu_check.sh` (under 8 minutes; builds nothing).

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--json OUT.json]

1. HF parity on the device: tiny random Qwen2-VL and Qwen2.5-VL (HF classes, random weights) against
   the framework model with the same weights, fp32 (parity bound 1e-5) and bf16 (reported), through
   `qvl_train.tools.hf_parity` with PyTorch's kernels (the lent GPUs have no TE / flash-attn).
2. Packed attention kernels: the per-sample SDPA loop vs FlexAttention (eager and compiled) on a
   16k-token pack of 40 documents: max difference and time per call, side by side in one run.
3. Training throughput: a ~0.5B Qwen2-VL-shaped model in bf16, megatron engine, world of one,
   8k-token packed micro-batches with images: tokens/s and step time.

Prints one table per part and writes everything to --json. `--device cpu --quick` is the smoke test
that keeps this script working on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _tiny_hf_dir(generation: str, out: Path, width: int) -> Path:
    """A random (not default-initialised) small HF model of `generation`, saved as safetensors."""
    import transformers

    from qvl_train.models.tiny import tiny_model_config, tiny_qwen2_5_vl_config
    from qvl_train.tools.convert import hf_config_dict

    cfg = tiny_model_config() if generation == "qwen2_vl" else tiny_qwen2_5_vl_config()
    scale = width // cfg.llm.hidden_size
    cfg.llm.hidden_size *= scale
    cfg.llm.ffn_hidden_size *= scale
    cfg.llm.mrope_section = [x * scale for x in cfg.llm.mrope_section]
    cls = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[generation]
    conf = {"qwen2_vl": transformers.Qwen2VLConfig, "qwen2_5_vl": transformers.Qwen2_5_VLConfig}[generation]
    torch.manual_seed(0)
    model = cls(conf(**hf_config_dict(cfg, "float32"))).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.copy_(1.0 + 0.1 * torch.randn_like(p))
    path = out / generation
    model.save_pretrained(path, safe_serialization=True)
    return path


def check_parity(device: str, quick: bool) -> list[dict]:
    from qvl_train.tools import hf_parity

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for generation in ("qwen2_vl", "qwen2_5_vl"):
            hf_dir = _tiny_hf_dir(generation, Path(tmp), width=64 if quick else 128)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                errs = hf_parity.run(str(hf_dir), device=device, dtype=dtype)
                bound = hf_parity.TOLERANCE if name == "fp32" else hf_parity.BF16_TOLERANCE
                worst = max(errs.values())
                rows.append({"generation": generation, "dtype": name, **errs, "worst": worst,
                             "verdict": "PASS" if worst <= bound else "FAIL"})
    return rows


def check_attention(device: str, quick: bool) -> list[dict]:
    """Every packed-attention backend usable here on one pack: forward and forward+backward time,
    max difference to the per-sample SDPA loop (forward output and q gradient)."""
    from qvl_train.models.attention import _flash_attn, _torch_varlen, varlen_flash, varlen_flex, varlen_sdpa, varlen_torch

    gen = torch.Generator().manual_seed(0)
    total = 2048 if quick else 16384
    lengths = torch.randint(total // 80, total // 20, (400,), generator=gen)
    lengths = lengths[torch.cumsum(lengths, 0) <= total]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)]).to(torch.int32)
    heads, kv, d = (4, 2, 64) if quick else (28, 4, 128)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(total, heads, d, generator=gen).to(device, dtype)
    k = torch.randn(total, kv, d, generator=gen).to(device, dtype)
    v = torch.randn(total, kv, d, generator=gen).to(device, dtype)
    grad_out = torch.randn(total, heads, d, generator=gen).to(device, dtype)
    cu = cu.to(device)
    scale = d ** -0.5

    backends = {"sdpa_loop": varlen_sdpa, "flex": varlen_flex}
    if device != "cpu" and _torch_varlen() is not None:
        backends["varlen"] = varlen_torch
    if device != "cpu" and _flash_attn() is not None:
        backends["flash_attn"] = varlen_flash

    def fwd_bwd(fn):
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        out = fn(qq, kk, vv, cu, True, scale)
        out.backward(grad_out)
        return out.detach(), qq.grad

    def timed(call) -> float:
        call()  # warm-up (and compile)
        _sync(device)
        times = []
        for _ in range(3 if quick else 10):
            t0 = time.perf_counter()
            call()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    ref_out, ref_dq = fwd_bwd(varlen_sdpa)
    rows = []
    for name, fn in backends.items():
        try:
            out, dq = fwd_bwd(fn)
            fwd_ms = timed(lambda: fn(q, k, v, cu, True, scale))
            fwd_bwd_ms = timed(lambda: fwd_bwd(fn))
        except Exception as exc:  # a backend that fails here is reported, not fatal to the other parts
            rows.append({"backend": name, "tokens": total, "docs": int(lengths.numel()), "fwd_ms": float("nan"),
                         "fwd_bwd_ms": float("nan"), "max_abs_diff_out": float("nan"), "max_abs_diff_dq": float("nan"),
                         "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        rows.append({"backend": name, "tokens": total, "docs": int(lengths.numel()), "fwd_ms": fwd_ms,
                     "fwd_bwd_ms": fwd_bwd_ms, "max_abs_diff_out": float((out.float() - ref_out.float()).abs().max()),
                     "max_abs_diff_dq": float((dq.float() - ref_dq.float()).abs().max()), "error": ""})
    return rows


def check_throughput(device: str, quick: bool, attention_backend: str = "auto") -> dict:
    from data_pipelines.schema import PackedBatch
    from qvl_train.config import LLMConfig, ModelConfig, OptimConfig, ParallelConfig, StageConfig, VisionConfig
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.parallel.dims import ParallelDims
    from qvl_train.tools.hf_parity import synthetic_packed_batch

    if quick:
        vision = VisionConfig(depth=2, hidden_size=64, num_heads=4, mlp_ratio=2.0)
        llm = LLMConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                        num_query_groups=2, vocab_size=151936, mrope_section=[4, 2, 2])
        max_tokens, steps = 1024, 3
    else:
        vision = VisionConfig(depth=8, hidden_size=1024, num_heads=16, mlp_ratio=4.0)
        llm = LLMConfig(num_layers=12, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                        num_query_groups=2, vocab_size=151936)
        max_tokens, steps = 8192, 10
    cfg = ModelConfig(generation="qwen2_vl", vision=vision, llm=llm, attention_backend=attention_backend)
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():  # the parity part ran in a one-rank world of its own
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    dims = ParallelDims.from_config(ParallelConfig(), 1)
    dims.initialize()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    engine = MegatronEngine(cfg, ParallelConfig(), OptimConfig(lr=1e-4, warmup_steps=0), StageConfig(), dims,
                            seed=0, max_steps=steps, dtype=dtype)
    n_params = sum(p.numel() for p in engine.model.parameters())

    gen = torch.Generator().manual_seed(0)  # text + one image per sample, ~1k tokens each
    batch: PackedBatch = synthetic_packed_batch(cfg, max_tokens, [("text", 300), ("image", (1, 28, 28)), ("text", 500)], gen)
    batch.pixel_values = batch.pixel_values.to(dtype)
    used = batch.num_tokens
    times = []
    for step in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        result = engine.train_step([batch], step)
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    from qvl_train.monitor.flops import packed_batch_flops, peak_tflops

    flops = packed_batch_flops(cfg, batch)
    tflops = flops.training / step_s / 1e12
    peak = peak_tflops(0.0, torch.cuda.get_device_name() if device.startswith("cuda") else "cpu")
    from qvl_train.models.attention import resolve_backend

    out = {"attention": resolve_backend(attention_backend), "params": n_params, "tokens_per_step": used, "step_time_s": step_s, "tokens_per_s": used / step_s,
           "model_tflops": tflops, "mfu": tflops / peak if peak else float("nan"),
           "loss_last": float(result.loss), "dtype": str(dtype).replace("torch.", "")}
    if device.startswith("cuda"):
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    dims.destroy()
    return out


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3e}" if isinstance(v, float) and (abs(v) < 1e-2 or abs(v) > 1e5) else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    print(f"# gpu_check on {env['device']} (torch {env['torch']})")
    report = {"env": env}
    t0 = time.perf_counter()
    failed = []

    def part(key: str, title: str, fn) -> None:
        try:
            rows = fn()
        except Exception:  # one broken part must not hide the others' figures
            import traceback

            traceback.print_exc()
            failed.append(key)
            return
        report[key] = rows
        print(f"\n## {title}\n" + _table(rows if isinstance(rows, list) else [rows]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))

    part("attention", "Packed attention (bf16 on GPU)", lambda: check_attention(args.device, args.quick))
    part("parity", "HF parity (max|Δlogits| / max|ref|)", lambda: check_parity(args.device, args.quick))
    backends = ["auto"] if args.quick else ["auto", "flex"]
    part("throughput", "Training step", lambda: [check_throughput(args.device, args.quick, b) for b in backends])
    report["wall_s"] = time.perf_counter() - t0
    print(f"\nwall {report['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    ok = not failed and all(r["verdict"] == "PASS" for r in report["parity"] if r["dtype"] == "fp32")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
