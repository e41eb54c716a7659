"""Logits parity of the framework model against the HF reference, for a Qwen2-VL / 2.5-VL / 3-VL (MoE) checkpoint.

    python -m qvl_train.tools.hf_parity --hf-dir SRC [SRC ...] [--kinds one_image,video,...] [--seed 0] [--tp N --pp N --ep N]

Builds inputs of every kind — `one_image`, `multi_image` (two images of different sizes in one
sample), `video` (two temporal patches), `text_only`, and `packed` (those four samples packed into
one sequence) — runs the HF model loaded from SRC (`from_pretrained`, fp32, sdpa) and the framework
model with SRC's weights converted by `hf_convert.hf_to_ours` (the same conversion as
`launch/convert.py import-hf`), and prints for each kind `max|Δlogits| / max|ref logits|`. The last
line is `PASS` or `FAIL` with the worst value; the exit status is 0 only if every kind is ≤ 1e-5.

The two sides share nothing but the token ids, the pixel rows and the grids: for single samples HF
computes its own M-RoPE ids (`get_rope_index`), ours come from `mrope_ids` below, so positions are
checked too. For `packed`, HF gets `attention_mask=None` and 4-row position ids (row 0 = text
position restarting per sample), which makes it attend block-causally (HF needs `use_cache=False`).
Image sizes are chosen so Qwen2.5-VL's 112-px windows are partial at the edges. Videos take
`second_per_grid_ts = 1` (transformers 4.57 truncates it to an integer before scaling by
`tokens_per_second`; we follow 4.57). Pixels are random: this checks the model, not the image
processor (the data side has its own HF test). With `--tp N --pp N` the framework model runs in that
layout on tp·pp processes the tool starts (`tools/layout.py`: sharded weights, megatron's pipeline
schedule, gathered vocabulary shards); the HF model stays in this process. Several `--hf-dir`s (e.g.
one per generation) are checked in one launch of the layout's processes; the lines then read
`<dir name>/<kind>` and the verdict covers them all.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from data_pipelines.schema import PackedBatch

TOLERANCE = 1e-5
BF16_TOLERANCE = 5e-2
"""bf16 rounds every activation to 8 bits of mantissa: a sanity bound, not a parity check."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KINDS = ("one_image", "multi_image", "video", "text_only", "packed")


def _segments(kind: str) -> list:
    """A sample as segments: ("text", n) | ("image", (t, h, w)) | ("video", (t, h, w)) (patch grids)."""
    return {
        "one_image": [("text", 6), ("image", (1, 12, 20)), ("text", 9)],
        "multi_image": [("text", 3), ("image", (1, 10, 6)), ("text", 4), ("image", (1, 18, 12)), ("text", 7)],
        "video": [("text", 4), ("video", (2, 8, 12)), ("text", 8)],
        "text_only": [("text", 23)],
    }[kind]


def packed_sample_segments() -> list:
    """Segment lists of the `packed` kind's samples: one of each single kind, in `KINDS` order."""
    return [_segments(k) for k in KINDS if k != "packed"]


def mrope_ids(segments, merge: int, video_scale: int) -> torch.Tensor:
    """3-D M-RoPE ids `[3, n]` of one sample (Qwen2-VL / Qwen2.5-VL `get_rope_index`, 4.57).

    Text runs on at `max + 1`; media tokens get `start + (t·video_scale, h, w)` of their merged
    grid (images: scale 1; Qwen2.5-VL videos: `int(second_per_grid) · tokens_per_second`).
    """
    out, nxt = [], 0
    for kind, arg in segments:
        if kind == "text":
            out.append(torch.arange(arg).expand(3, -1) + nxt)
            nxt += arg
            continue
        out.append(torch.tensor([[nxt], [nxt], [nxt]]))  # <|vision_start|>
        nxt += 1
        t, h, w = arg[0], arg[1] // merge, arg[2] // merge
        scale = video_scale if kind == "video" else 1
        tt = (torch.arange(t) * scale).view(-1, 1, 1).expand(t, h, w).flatten()
        hh = torch.arange(h).view(1, -1, 1).expand(t, h, w).flatten()
        ww = torch.arange(w).view(1, 1, -1).expand(t, h, w).flatten()
        p = torch.stack([tt, hh, ww]) + nxt
        out.append(p)
        nxt = int(p.max()) + 1
        out.append(torch.tensor([[nxt], [nxt], [nxt]]))  # <|vision_end|>
        nxt += 1
    return torch.cat(out, dim=1)


def build_sample(segments, cfg, gen: torch.Generator) -> dict:
    """Token ids, pixel rows per media (in order), grids and kinds of one sample."""
    from data_pipelines import generations as data_generations

    v = cfg.vision
    special = data_generations.get(cfg.generation).special_tokens()
    start, end = special["<|vision_start|>"], special["<|vision_end|>"]
    cols = v.in_channels * v.temporal_patch_size * v.patch_size**2
    ids, pix, grids, kinds = [], [], [], []
    for kind, arg in segments:
        if kind == "text":
            ids.append(torch.randint(0, 151000, (arg,), generator=gen))
            continue
        t, h, w = arg
        n_tok = t * h * w // v.spatial_merge_size**2
        pad = cfg.image_pad_id if kind == "image" else cfg.video_pad_id
        ids += [torch.tensor([start]), torch.full((n_tok,), pad), torch.tensor([end])]
        pix.append(torch.randn(t * h * w, cols, generator=gen))
        grids.append(arg)
        kinds.append(kind)
    video_scale = v.tokens_per_second if data_generations.get(cfg.generation).video_absolute_time else 1
    return {
        "input_ids": torch.cat(ids),
        "position_ids": mrope_ids(segments, v.spatial_merge_size, video_scale),
        "pixels": pix, "grids": grids, "kinds": kinds,
    }


def _packed_batch(samples, cfg):
    from data_pipelines.schema import PackedBatch

    v = cfg.vision
    cols = v.in_channels * v.temporal_patch_size * v.patch_size**2
    ids = torch.cat([s["input_ids"] for s in samples])
    lens = [s["input_ids"].numel() for s in samples]
    pix = [p for s in samples for p in s["pixels"]]
    grids = [g for s in samples for g in s["grids"]]
    return PackedBatch(
        input_ids=ids, labels=torch.full_like(ids, -100),
        position_ids=torch.cat([s["position_ids"] for s in samples], dim=1),
        cu_seqlens=torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32),
        pixel_values=torch.cat(pix) if pix else torch.zeros(0, cols),
        grid_thw=torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
        sample_ids=[f"s{i}" for i in range(len(samples))], num_tokens=ids.numel(),
    )


def synthetic_samples(cfg, max_tokens: int, segments, gen: torch.Generator) -> list[dict]:
    """Random samples (`build_sample`) of `segments` until the next one would pass `max_tokens` in all.

    `segments` is one sample's segment list (every sample alike) or a list of them, taken in turn
    (cycling): a mix of image sizes, multi-image and text-only samples in one pack."""
    mix = segments if segments and isinstance(segments[0], list) else [segments]
    samples, used = [], 0
    while True:
        s = build_sample(mix[len(samples) % len(mix)], cfg, gen)
        n = s["input_ids"].numel()
        if used + n > max_tokens:
            return samples
        samples.append(s)
        used += n


def synthetic_packed_batch(cfg, max_tokens: int, segments, gen: torch.Generator, samples=None):
    """A `PackedBatch` of `max_tokens` slots filled with random samples of `segments` (whole samples,
    see `synthetic_samples`, or the given `samples`; the padding tail has no labels), for benchmarks
    that need realistic shapes without data."""
    samples = synthetic_samples(cfg, max_tokens, segments, gen) if samples is None else samples
    used = sum(s["input_ids"].numel() for s in samples)
    batch = _packed_batch(samples, cfg)
    pad = max_tokens - used
    batch.input_ids = torch.cat([batch.input_ids, torch.full((pad,), 151643)])
    batch.labels = torch.cat([batch.input_ids[1:used], torch.full((pad + 1,), -100)])
    batch.position_ids = torch.cat([batch.position_ids, torch.zeros(3, pad, dtype=torch.int64)], dim=1)
    batch.num_tokens, batch.num_label_tokens = used, int((batch.labels != -100).sum())
    return batch


def _hf_inputs(samples, packed: bool, explicit_positions: bool = False) -> dict:
    ids = torch.cat([s["input_ids"] for s in samples])
    # One sample: an all-ones mask and HF's own position ids (its get_rope_index). Without a mask,
    # transformers 4.57's Qwen3-VL builds the causal mask from position row 0 (t), where the repeated
    # t of an image's tokens reads as a new packed sequence at every visual token.
    # `explicit_positions` (Qwen3-VL video): our position ids, as for packed input (the tool's video
    # sample has no per-frame timestamp text, which 4.57's get_rope_index expects).
    packed = packed or explicit_positions
    mask = None if packed else torch.ones_like(ids)[None]
    kw: dict = {"input_ids": ids[None], "attention_mask": mask, "use_cache": False}
    for kind, pix_key, grid_key in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
        pix = [p for s in samples for p, k in zip(s["pixels"], s["kinds"]) if k == kind]
        grids = [g for s in samples for g, k in zip(s["grids"], s["kinds"]) if k == kind]
        if pix:
            kw[pix_key] = torch.cat(pix)
            kw[grid_key] = torch.tensor(grids, dtype=torch.long)
            if kind == "video":
                kw["second_per_grid_ts"] = torch.ones(len(grids))
    if packed:  # 4 rows: per-sample text position (restarts → block-causal mask), then t/h/w
        text = torch.cat([torch.arange(s["input_ids"].numel()) for s in samples])
        pos3 = torch.cat([s["position_ids"] for s in samples], dim=1)
        kw["position_ids"] = torch.cat([text[None], pos3])[:, None, :]
    return kw


def packed_pair(cfg, sample_segments, gen: torch.Generator) -> tuple[dict, "PackedBatch"]:
    """The same samples packed into one sequence, for both sides: (HF `forward` kwargs, our `PackedBatch`).

    `sample_segments` lists one segment list per sample (see `_segments`). HF gets the packed form
    of `_hf_inputs` (block-causal through restarting text positions), ours the `PackedBatch`
    (labels all -100: callers set their own). Used by the gradient parity test and the timing benchmark.
    """
    samples = [build_sample(segs, cfg, gen) for segs in sample_segments]
    return _hf_inputs(samples, packed=True), _packed_batch(samples, cfg)


def run(
    hf_dir: str, kinds=KINDS, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, tp: int = 1, pp: int = 1,
    ep: int = 1,
) -> dict[str, float]:
    """Relative max logit error per input kind (see module docstring), both models on `device` in `dtype`;
    the framework model in the (tp, pp, ep) layout on processes it starts (`tools/layout.py`)."""
    return run_many([hf_dir], kinds, seed, device, dtype, tp, pp, ep)[str(hf_dir)]


def run_many(
    hf_dirs, kinds=KINDS, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, tp: int = 1, pp: int = 1,
    ep: int = 1,
) -> dict[str, dict[str, float]]:
    """`run` for several checkpoints (e.g. one per generation) → `{hf_dir: {kind: error}}`; in a layout
    all of them go through ONE launch of its processes. Each checkpoint gets the inputs `run` gives it alone."""
    # fp32 means fp32: cuDNN's default TF32 convolutions (HF's Conv3d patch embedding) would put ~1e-4 into the reference
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    backend = "sdpa_loop" if not torch.cuda.is_available() else "auto"
    prepared = {str(d): _prepare(Path(d), kinds, seed, backend) for d in hf_dirs}
    if tp * pp * ep > 1:
        ours = _layout_logits({d: batches for d, (_, _, batches) in prepared.items()}, backend, dtype, tp, pp, ep)
    else:
        ours = {d: _one_process_logits(Path(d), cfg, batches, device, dtype) for d, (cfg, _, batches) in prepared.items()}
    return {d: _compare(Path(d), cfg, per_kind, ours[d], device, dtype) for d, (cfg, per_kind, _) in prepared.items()}


def _prepare(hf_dir: Path, kinds, seed: int, attention_backend: str):
    """(model config from SRC's config.json, samples per kind, our `PackedBatch` per kind)."""
    from data_pipelines.tokenizer_check import check_checkpoint_ids
    from qvl_train.tools.convert import model_config_from_hf

    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    cfg.attention_backend = attention_backend
    check_checkpoint_ids(str(hf_dir), cfg.generation, cfg.llm.vocab_size, cfg.image_pad_id, cfg.video_pad_id, 151000)
    gen = torch.Generator().manual_seed(seed)
    singles = {k: build_sample(_segments(k), cfg, gen) for k in KINDS if k != "packed"}
    per_kind = {k: list(singles.values()) if k == "packed" else [singles[k]] for k in kinds}
    return cfg, per_kind, {k: _packed_batch(samples, cfg) for k, samples in per_kind.items()}


def _one_process_logits(hf_dir: Path, cfg, batches: dict, device: str, dtype: torch.dtype) -> dict:
    """The framework's logits per kind from a tp = pp = ep = 1 model in this process."""
    from qvl_train.config import ParallelConfig
    from qvl_train.models import build_model
    from qvl_train.models.hf_convert import hf_to_ours
    from qvl_train.tools.convert import _single_process_world, load_hf_state_dict

    _single_process_world()
    ours = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True, dtype=dtype)
    sd = {k: v.to(dtype) for k, v in hf_to_ours(load_hf_state_dict(hf_dir), cfg).items()}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    ours.to(device).eval()
    logits = {}
    with torch.no_grad():
        for kind, batch in batches.items():
            batch = batch.to(device)
            batch.pixel_values = batch.pixel_values.to(dtype)
            logits[kind] = ours.logits(batch).float()
    return logits


def hf_class(hf_dir: Path):
    """The transformers class of the checkpoint in `hf_dir`: the registry's `hf_architecture` of its
    config.json `model_type` (transformers 4.57's `save_pretrained` may write `architectures` only
    inside `text_config`, which `import-hf` accepts too)."""
    import transformers

    from qvl_train import generations

    model_type = json.loads((Path(hf_dir) / "config.json").read_text()).get("model_type")
    return getattr(transformers, generations.from_hf_model_type(model_type).hf_architecture)


def _compare(hf_dir: Path, cfg, per_kind: dict, ours_logits: dict, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Run the HF model of SRC on each kind's samples → `max|Δlogits| / max|ref logits|` per kind."""
    from data_pipelines import generations as data_generations

    video = data_generations.get(cfg.generation).video
    timestamps = video is not None and video.timestamps  # Qwen3-VL: `<t seconds>` text before each temporal patch
    if not _in_main_env(hf_dir):
        refs = _reference_env_logits(hf_dir, per_kind, timestamps, dtype)
        return {k: float((ours_logits[k].float().cpu() - ref).abs().max() / ref.abs().max()) for k, ref in refs.items()}
    hf = hf_class(hf_dir).from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    results = {}
    with torch.no_grad():
        for kind, samples in per_kind.items():
            explicit = kind == "video" and timestamps  # our positions: the sample has no timestamp text
            hf_in = _hf_inputs(samples, packed=kind == "packed", explicit_positions=explicit)
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in hf_in.items()}
            inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
            ref = hf(**inputs).logits[0].float()
            got = ours_logits[kind].to(ref.device)
            results[kind] = float((got - ref).abs().max() / ref.abs().max())
    return results


def _architecture(hf_dir: Path) -> str:
    from qvl_train import generations

    model_type = json.loads((Path(hf_dir) / "config.json").read_text()).get("model_type")
    return generations.from_hf_model_type(model_type).hf_architecture


def _in_main_env(hf_dir: Path) -> bool:
    """Whether this environment's transformers has the checkpoint's class (4.57: Qwen2-VL … Qwen3-VL-MoE); else
    the reference runs in the transformers 5.x environment (`.venv-ref`, Qwen3.5/3.6) through `tools/reference.py`."""
    import transformers

    return hasattr(transformers, _architecture(hf_dir))


def _reference_env_logits(hf_dir: Path, per_kind: dict, timestamps: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF logits per kind from the reference environment, in ONE subprocess call (`reference_logits` below).

    Every sample runs alone (a packed kind's reference is its samples' logits in order): transformers 5.25's
    Gated DeltaNet layers carry their recurrent state across packed sequences (its torch path takes no sample
    bounds), so a packed HF forward is not a reference for packing; ours runs the samples packed."""
    from qvl_train.tools.reference import run_reference

    tensors, order, plan = {}, {}, {}
    for kind, samples in per_kind.items():
        plan[kind] = []
        for s in samples:
            if id(s) not in order:  # the packed kind reuses the single kinds' samples: run each once
                name = order[id(s)] = f"s{len(order)}"
                explicit = timestamps and "video" in s["kinds"]  # our positions: the sample has no timestamp text
                for key, value in _hf_inputs([s], packed=False, explicit_positions=explicit).items():
                    if torch.is_tensor(value):
                        tensors[f"{name}.{key}"] = value
            plan[kind].append(order[id(s)])
    out = run_reference("reference_logits", tensors, {
        "hf_dir": str(Path(hf_dir).resolve()), "architecture": _architecture(hf_dir), "samples": sorted(set(order.values())),
        "dtype": str(dtype).removeprefix("torch."),
    }, file=Path(__file__))
    return {kind: torch.cat([out[name] for name in names]).float() for kind, names in plan.items()}


def reference_logits(tensors: dict, hf_dir: str, architecture: str, samples: list, dtype: str = "float32") -> dict:
    """Runs in the reference environment (`tools/reference.py`; imports only torch and transformers): the
    checkpoint's HF model on each sample's forward arguments (`<sample>.<argument>` tensors) → `<sample>` logits."""
    import transformers

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = getattr(transformers, architecture).from_pretrained(hf_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model.eval()
    out = {}
    with torch.no_grad():
        for name in samples:
            kw = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}
            kw.pop("second_per_grid_ts", None)  # Qwen2.5-VL only
            kw = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in kw.items()}
            if "position_ids" not in kw and ("image_grid_thw" in kw or "video_grid_thw" in kw):
                ids = kw["input_ids"]  # transformers 5.x M-RoPE reads the media tokens from their type (image 1, video 2)
                kw["mm_token_type_ids"] = ((ids == model.config.image_token_id).int()
                                           + 2 * (ids == model.config.video_token_id).int())
            out[name] = model(**kw, use_cache=False).logits[0].float().contiguous()
    return out


def random_checkpoint(tensors: dict, config: dict, architecture: str, out_dir: str, seed: int = 0, std: float = 0.05) -> dict:
    """Runs in the reference environment: a random HF model of `config` (a `config.json` dict, e.g. a
    generation's `hf_config`) with EVERY parameter drawn from N(0, std²) — norms, Gated DeltaNet decays and
    biases included, so a conversion that drops a +1 or swaps two tensors shows — saved to `out_dir`
    (`save_pretrained`, safetensors). Returns no tensors."""
    import transformers

    torch.manual_seed(seed)
    cfg = dict(config)
    hf_config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = getattr(transformers, architecture)(hf_config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    model.save_pretrained(out_dir)
    return {}


def _layout_logits(batches: dict, attention_backend: str, dtype: torch.dtype, tp: int, pp: int, ep: int) -> dict:
    """The framework's logits `{hf_dir: {kind: logits}}` from ONE (tp, pp, ep) launch over every checkpoint."""
    import tempfile

    from qvl_train.tools.layout import launch

    with tempfile.TemporaryDirectory(prefix="qvl_parity_") as tmp:
        names = [f"{tmp}/{i}" for i in range(len(batches))]
        for name, per_kind in zip(names, batches.values()):
            torch.save(per_kind, f"{name}.batches.pt")
        launch(
            "logits", tp, pp, "--hf-dir", *batches, "--batches", *(f"{n}.batches.pt" for n in names),
            "--out", *(f"{n}.logits.pt" for n in names),
            "--dtype", str(dtype).removeprefix("torch."), "--attention-backend", attention_backend, ep=ep,
        )
        return {d: torch.load(f"{n}.logits.pt", weights_only=True) for d, n in zip(batches, names)}


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, nargs="+",
                   help="HF checkpoint directory (config.json + safetensors); several: all checked, in one launch of a layout")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens and pixels")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="fp32 (the parity check) | bf16 (reported, loose bound)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the framework model (starts tp·pp processes)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages of the framework model")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE checkpoints)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        p.error(f"unknown kinds {bad}; valid: {', '.join(KINDS)}")
    per_dir = run_many(args.hf_dir, kinds, args.seed, device=args.device, dtype=DTYPES[args.dtype], tp=args.tp, pp=args.pp, ep=args.ep)
    tolerance = TOLERANCE if args.dtype == "fp32" else BF16_TOLERANCE
    results = {}
    names = [Path(d).name for d in per_dir]
    for (hf_dir, errors), name in zip(per_dir.items(), names):  # several: "<dir name>/<kind>" (the path if names repeat)
        prefix = "" if len(per_dir) == 1 else f"{name if names.count(name) == 1 else hf_dir}/"
        results.update({prefix + kind: err for kind, err in errors.items()})
    width = max(12, *map(len, results))
    for kind, err in results.items():
        print(f"{kind:{width}s} max|Δlogits|/max|ref| = {err:.3e}")
    worst_kind = max(results, key=results.get)
    worst = results[worst_kind]
    verdict = "PASS" if worst <= tolerance else "FAIL"
    layout = f"tp={args.tp} pp={args.pp} ep={args.ep}"
    print(f"{verdict} worst {worst:.3e} ({worst_kind}, tolerance {tolerance:g}, {args.dtype}, {args.device}, {layout})")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
