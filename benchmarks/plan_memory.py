"""Check the layout planner's memory model against a real training step.

    python benchmarks/plan_memory.py [--layers 6] [--hidden 1024] [--tokens 2048] [--device cpu]

Builds a Qwen2-VL-shaped model of a few hundred million parameters (the 151,936-row embedding is most
of it), runs one megatron-engine training step on one packed micro-batch with images (the step that
allocates AdamW's moments), then profiles the second step with the torch profiler's memory events.
Gradients are freed before the profile (the step frees them first anyway), so every block the step
frees was allocated inside the profile; the peak of live tensor bytes = what was live when the profile
started (parameters and AdamW moments, counted tensor by tensor) + the highest running allocation total
the profiler saw.
`qvl_train.tools.planner.predict` is asked for the same model, layout (one process), precision and
micro-batch; the table compares the two, component by component where they can be separated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 2**30


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from qvl_train.config import LLMConfig, ModelConfig, OptimConfig, ParallelConfig, StageConfig, VisionConfig
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.models.params import count_parameters
    from qvl_train.parallel.dims import ParallelDims
    from qvl_train.tools.hf_parity import synthetic_packed_batch
    from qvl_train.tools.planner import FP32, GPU, Layout, Workload, predict

    h = args.hidden
    cfg = ModelConfig(
        generation="qwen2_vl",
        vision=VisionConfig(depth=4, hidden_size=512, num_heads=8, mlp_ratio=4.0),
        llm=LLMConfig(num_layers=args.layers, hidden_size=h, ffn_hidden_size=int(2.75 * h) // 64 * 64,
                      num_attention_heads=h // 64, num_query_groups=max(1, h // 256), vocab_size=151936,
                      mrope_section=[8, 12, 12], tie_word_embeddings=True),
        attention_backend="sdpa_loop" if args.device == "cpu" else "auto",
    )
    dims = ParallelDims.from_config(ParallelConfig(), 1)
    dims.initialize()
    engine = MegatronEngine(cfg, ParallelConfig(), OptimConfig(lr=1e-5, warmup_steps=0), StageConfig(), dims,
                            seed=0, max_steps=4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)  # text + a 448×448 image per sample (256 visual tokens)
    batch = synthetic_packed_batch(cfg, args.tokens, [("text", 120), ("image", (1, 32, 32)), ("text", 200)], gen)
    visual = int((batch.input_ids == 151655).sum())
    engine.train_step([batch], 0)  # allocates the AdamW moments

    for p in engine.model.parameters():  # the step frees them first anyway; freed here, every block the
        p.grad = None                     # profiled step frees was allocated inside the profile
    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    moments = sum(t.numel() * t.element_size() for st in engine.optimizer.state.values() for t in st.values() if torch.is_tensor(t))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        engine.train_step([batch], 1)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    saved = _saved_by_part(engine, batch)
    running = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    peak = params + moments + max(running)
    dims.destroy()

    n = count_parameters(cfg)["total"]
    cpu = GPU("this CPU", 24, 1.0, 1.0, 1.0)
    cu = batch.cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    grids = batch.grid_thw.reshape(-1, 3).prod(-1).tolist()
    work = Workload(args.tokens, args.tokens, visual_share=visual / batch.num_tokens,
                    label_share=batch.num_label_tokens / batch.num_tokens,
                    sample_tokens=sum(n * n for n in lengths) / sum(lengths),  # E[s²]/E[s]: attention per token
                    image_patches=sum(n * n for n in grids) / sum(grids))
    attention = "math" if cfg.attention_backend == "sdpa_loop" else "flash"
    pred = predict(cfg, Layout(1, 1, 1, 1, 1, 1, 1, "none"), work, cpu, precision=FP32, attention=attention)
    m = {k: v * GiB for k, v in pred.memory_gib.items()}
    dynamic_pred = m["grads"] + m["activations"] + m["vision"] + m["logits"]
    static_pred = m["weights"] + m["optimizer"]
    rows = [
        ("parameters (count)", n, sum(p.numel() for p in engine.model.parameters())),
        ("weights + AdamW moments (live before the step), GiB", static_pred / GiB, (params + moments) / GiB),
        ("gradients + activations + ViT + logits at the peak, GiB", dynamic_pred / GiB, max(running) / GiB),
        ("peak live tensors, GiB", (static_pred + dynamic_pred) / GiB, peak / GiB),
    ]
    print(f"# planner memory model vs a real step: {n / 1e6:.0f}M parameters, {args.tokens}-token micro-batch "
          f"({batch.num_tokens} real, {visual} visual), fp32, one process, {args.device}\n")
    print("| quantity | predicted | measured | predicted / measured |\n|---|---|---|---|")
    for name, p, q in rows:
        fmt = (lambda x: f"{x:,.0f}") if "count" in name else (lambda x: f"{x:.3f}")
        print(f"| {name} | {fmt(p)} | {fmt(q)} | {p / q:.3f} |")
    from qvl_train.tools.planner import _layer_activation_elements, _vision_elements_per_patch

    patches = int(batch.grid_thw.prod(-1).sum())
    parts = [
        ("one LLM layer, bytes per token",
         4 * _layer_activation_elements(cfg, "none", attention, work.sample_tokens),
         saved["llm_layer"] / cfg.llm.num_layers / args.tokens),
        ("ViT, bytes per patch", 4 * _vision_elements_per_patch(cfg, attention=attention, image_patches=work.image_patches),
         saved["vision"] / patches),
        ("loss (output layer + cross-entropy), bytes per label token", 4 * cfg.llm.vocab_size,
         saved["loss"] / batch.num_label_tokens),
    ]
    print("\nTensors saved for backward (saved_tensors_hooks, parameters excluded), by part:\n")
    print("| part | predicted | measured | predicted / measured |\n|---|---|---|---|")
    for name, p, q in parts:
        print(f"| {name} | {p:,.0f} | {q:,.0f} | {p / q:.3f} |")
    within = abs((static_pred + dynamic_pred) / peak - 1) <= 0.15
    print(f"\npeak within 15%: {'yes' if within else 'NO'}")
    return 0 if within else 1


def _saved_by_part(engine, batch) -> dict[str, int]:
    """Bytes of the tensors autograd saves for backward in one forward, by part of the model: the ViT
    (+ projector), the LLM decoder layers, the rest (the output layer and the loss); parameters and
    tensors already counted (views of one storage) are skipped."""
    import torch.nn as nn

    params = {p.untyped_storage().data_ptr() for p in engine.model.parameters()}
    seen: set[int] = set()
    totals = {"vision": 0, "llm_layer": 0, "loss": 0}
    where = ["loss"]

    def tag(name):
        def pre(module, args):
            where.append(name)

        def post(module, args, out):
            where.pop()
        return pre, post

    handles = []
    model = engine.model
    targets: list[tuple[nn.Module, str]] = [(model.vision, "vision"), (model.projector, "vision")]
    targets += [(layer, "llm_layer") for layer in model.llm.decoder.layers]
    for module, name in targets:
        pre, post = tag(name)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            totals[where[-1]] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch).sum()
    del loss
    for h in handles:
        h.remove()
    return totals


if __name__ == "__main__":
    sys.exit(main())
