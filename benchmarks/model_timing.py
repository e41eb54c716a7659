"""Forward+backward time of the framework model vs the HF model, per tiny generation, same inputs.

    python benchmarks/model_timing.py [--reps 10] [--threads 1] [--generations qwen2_vl,qwen2_5_vl,qwen3_vl,qwen3_vl_moe]

For each generation: a tiny random HF model (`qvl_train.models.tiny` configs through
`hf_config_dict`), our model with its weights (`hf_to_ours`), and one packed sequence of four samples
(an image, two images, a two-frame video, text only; `hf_parity.packed_pair`). One step of each side
is forward, the sum of token cross-entropies over the label positions (text tokens; visual pads
carry no label), and backward. Repetitions interleave the sides (rotating which one goes first) after
two warm-up steps each; the table shows medians and ours / HF.

Same output positions on both sides: ours computes logits only at label positions (`VLM.forward`),
so HF is timed as `hf.model` then `hf.lm_head` at those same positions (Qwen2-VL's class in 4.57 has no
`logits_to_keep`). HF's own forward computes logits at every position; at these tiny widths the
151,936-word output layer is most of that step, so comparing with it measures the output positions,
not the model: it is only checked (same loss) and, with `--all-positions`, timed in a separate column
marked as not comparable. Copy the table into benchmarks/RESULTS.md with the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GENERATIONS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def _models(generation: str):
    """(cfg, HF model, our model) with the same random weights."""
    import transformers

    from qvl_train.config import ParallelConfig
    from qvl_train.models import build_model
    from qvl_train.models.hf_convert import hf_to_ours
    from qvl_train.models.tiny import tiny_model_config, tiny_qwen2_5_vl_config, tiny_qwen3_vl_config, tiny_qwen3_vl_moe_config
    from qvl_train.tools.convert import hf_config_dict

    cfg = {
        "qwen2_vl": tiny_model_config, "qwen2_5_vl": tiny_qwen2_5_vl_config, "qwen3_vl": tiny_qwen3_vl_config,
        "qwen3_vl_moe": tiny_qwen3_vl_moe_config,
    }[generation]()
    conf = hf_config_dict(cfg, "float32")
    arch = conf["architectures"][0]
    conf_cls = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(conf_cls(**conf)).float()
    hf.config._attn_implementation = "sdpa"
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.copy_(1.0 + 0.1 * torch.randn_like(p))
    ours = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    missing, unexpected = ours.load_state_dict(hf_to_ours(hf.state_dict(), cfg), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return cfg, hf.train(), ours.train()


def _steps(generation: str):
    """Two closures, one forward+backward step each (gradients dropped after each), and the loss check."""
    from data_pipelines.text import IMAGE_PAD_ID, VIDEO_PAD_ID
    from qvl_train.tools.hf_parity import packed_pair, packed_sample_segments

    cfg, hf, ours = _models(generation)
    gen = torch.Generator().manual_seed(1)
    hf_kw, batch = packed_pair(cfg, packed_sample_segments(), gen)
    if generation.startswith("qwen3_vl"):
        hf_kw.pop("second_per_grid_ts", None)
    labels = torch.randint(0, 151000, batch.input_ids.shape, generator=gen)
    labels[(batch.input_ids == IMAGE_PAD_ID) | (batch.input_ids == VIDEO_PAD_ID)] = -100
    batch.labels = labels

    def hf_step() -> float:
        loss = F.cross_entropy(hf(**hf_kw).logits[0].float(), labels, ignore_index=-100, reduction="sum")
        loss.backward()
        hf.zero_grad(set_to_none=True)
        return float(loss)

    keep = torch.nonzero(labels != -100).squeeze(1)

    def hf_kept_step() -> float:  # HF's decoder, then its output layer only where a label is, as ours
        hidden = hf.model(**hf_kw).last_hidden_state[0, keep]
        logits = hf.lm_head(hidden).float()
        loss = F.cross_entropy(logits, labels[keep], reduction="sum")
        loss.backward()
        hf.zero_grad(set_to_none=True)
        return float(loss)

    def ours_step() -> float:
        loss = ours(batch).sum()
        loss.backward()
        ours.zero_grad(set_to_none=True)
        return float(loss)

    steps = {"hf_all": hf_step, "hf": hf_kept_step, "ours": ours_step}
    return steps, int(batch.input_ids.numel()), int(batch.pixel_values.shape[0]), int(keep.numel())


def _time(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def measure(generation: str, reps: int, all_positions: bool = False) -> dict:
    steps, tokens, patches, labels = _steps(generation)
    losses = {name: step() for name, step in steps.items()}  # also the first warm-up step
    if max(abs(v - losses["hf"]) for v in losses.values()) > 1e-4 * abs(losses["hf"]):
        raise RuntimeError(f"{generation}: losses differ {losses}; the sides do not compute the same thing")
    if not all_positions:
        del steps["hf_all"]
    for step in steps.values():
        step()
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):  # interleaved, and the order rotates so no side always runs first
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(_time(steps[n]))
    ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    return {"generation": generation, "tokens": tokens, "patches": patches, "labels": labels, **ms}


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10, help="timed steps per side (interleaved)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--generations", default=",".join(GENERATIONS))
    ap.add_argument("--all-positions", action="store_true",
                    help="also time HF's own forward (logits at every position; not comparable with ours)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from qvl_train.tools.convert import _single_process_world

    _single_process_world()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.reps} interleaved reps, load {os.getloadavg()[0]:.1f}")
    extra = " HF, logits at every position ms (not comparable) |" if args.all_positions else ""
    print("| generation | tokens | ViT patches | label positions | HF ms | ours ms | ours / HF |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
    for g in args.generations.split(","):
        r = measure(g, args.reps, args.all_positions)
        print(f"| {g} | {r['tokens']} | {r['patches']} | {r['labels']} | {r['hf']:.0f} | {r['ours']:.0f} | "
              f"{r['ours'] / r['hf']:.2f} |" + (f" {r['hf_all']:.0f} |" if extra else ""), flush=True)
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
