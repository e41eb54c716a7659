"""JPEG bytes -> pixel_values per core: ours (exact and fast_decode) vs transformers' slow image processor.

    python benchmarks/preprocess.py [--seconds 20] [--generation qwen2_5_vl]

Same images, same run, one thread (`torch.set_num_threads(1)`, OMP/BLAS threads 1): the numbers are
per core. Per size bucket (640x480, 1280x960, 4000x3000 JPEGs of smooth gradients + noise, quality 90):

* `hf`: `Image.open` + `Qwen2VLImageProcessor(images=[img], return_tensors="np")` with the same
  mean/std/pixel bounds (transformers 4.57, slow PIL/numpy path);
* `ours`: `decode_image` + `patchify_image` (what the loader runs; `preprocess_image` is the same);
* `fast`: the same with `decode_image(..., fast_decode=True)` (JPEG draft decoding, `data.fast_decode`);
* `floor`: PIL decode + the bicubic resize to the smart_resize target + `np.asarray` — work any exact
  implementation must do (the parity requires PIL's bicubic on uint8).

The machine is shared, so the methods are interleaved image by image (round robin, order rotated each
round) and each call is timed by the CPU time of this thread (`time.thread_time`: time spent waiting
for a core while other jobs run is not counted); the table gives medians in ms per image. Speedups
are ratios of medians; `hf/ours 1st|2nd` repeats the ratio on the first and second half of the rounds
to show how stable it is. Wall-clock medians are printed below for reference. `ours` is checked equal
to HF within 1e-5 on every image before timing; `fast max|mean` is the largest and the mean absolute
difference of the fast_decode pixel_values from the exact ones over the bucket's images.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image

from data_pipelines.vision import decode_image, patchify_image, smart_resize, vision_spec

SIZES = [(640, 480), (1280, 960), (4000, 3000)]
METHODS = ("hf", "ours", "fast", "floor")


def make_jpegs(w: int, h: int, n: int, seed: int = 0) -> list[bytes]:
    """n synthetic photos-like JPEGs (smooth gradients + noise, quality 90) of w x h."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.stack([128 + 100 * np.sin(xx * a / 97 + yy * b / 131),
                         128 + 100 * np.cos(yy * c / 83),
                         128 + 100 * np.sin((xx + yy) * a / 211)], axis=-1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_methods(generation: str) -> dict:
    """name -> fn(jpeg bytes) -> pixel_values (numpy) for the four compared pipelines."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    spec = vision_spec(generation)
    bounds = dict(factor=spec.factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    settings = dict(patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
                    merge_size=spec.merge_size, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels,
                    mean=spec.mean, std=spec.std)
    hf = Qwen2VLImageProcessor(
        image_mean=list(spec.mean), image_std=list(spec.std), min_pixels=spec.min_pixels, max_pixels=spec.max_pixels,
        patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size, merge_size=spec.merge_size,
    )

    def floor(b: bytes):
        img = Image.open(io.BytesIO(b))
        rh, rw = smart_resize(img.size[1], img.size[0], spec.factor, spec.min_pixels, spec.max_pixels)
        return np.asarray(img.resize((rw, rh), resample=Image.BICUBIC))

    return {
        "hf": lambda b: hf(images=[Image.open(io.BytesIO(b))], return_tensors="np")["pixel_values"],
        "ours": lambda b: patchify_image(decode_image(b), **settings)[0],
        "fast": lambda b: patchify_image(decode_image(b, fast_decode=True, **bounds), **settings)[0],
        "floor": floor,
    }


def time_interleaved(fns: dict, blobs: list[bytes], seconds: float, min_rounds: int = 4) -> tuple[dict, dict]:
    """Per method: lists of (cpu, wall) seconds per call, methods interleaved image by image."""
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    names = list(fns)
    t_start, rnd = time.perf_counter(), 0
    while rnd < min_rounds or time.perf_counter() - t_start < seconds:
        for i, b in enumerate(blobs):
            shift = (rnd + i) % len(names)
            for name in names[shift:] + names[:shift]:
                c0, w0 = time.thread_time(), time.perf_counter()
                fns[name](b)
                cpu[name].append(time.thread_time() - c0)
                wall[name].append(time.perf_counter() - w0)
        rnd += 1
    return cpu, wall


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="timing budget per size bucket")
    ap.add_argument("--images", type=int, default=4, help="distinct JPEGs per bucket")
    ap.add_argument("--generation", default="qwen2_5_vl")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    spec = vision_spec(args.generation)
    fns = build_methods(args.generation)
    print(f"generation {args.generation}, pixels {spec.min_pixels}..{spec.max_pixels}, 1 thread, "
          f"~{args.seconds:.0f} s per bucket, {args.images} images per bucket; median CPU ms per image")
    head = (f"{'size':>10} {'target':>9} {'hf':>7} {'ours':>7} {'fast':>7} {'floor':>7} {'hf/ours':>8} "
            f"{'1st|2nd':>11} {'hf/fast':>8} {'hf/floor':>8} {'ours-hf':>8} {'fast max|mean diff':>19}")
    print(head)
    walls = []
    for w, h in SIZES:
        blobs = make_jpegs(w, h, args.images)
        diff = max(float(np.abs(fns["ours"](b) - fns["hf"](b)).max()) for b in blobs)
        assert diff < 1e-5, f"ours differs from HF by {diff}"
        fast_d = [np.abs(fns["fast"](b) - fns["ours"](b)) for b in blobs]
        fast_max, fast_mean = max(float(d.max()) for d in fast_d), float(np.mean([d.mean() for d in fast_d]))
        rh, rw = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
        cpu, wall = time_interleaved(fns, blobs, args.seconds)
        m = {k: med_ms(v) for k, v in cpu.items()}
        half = len(cpu["hf"]) // 2
        r1 = med_ms(cpu["hf"][:half]) / med_ms(cpu["ours"][:half])
        r2 = med_ms(cpu["hf"][half:]) / med_ms(cpu["ours"][half:])
        print(f"{w}x{h:<5} {rw}x{rh:<4} {m['hf']:>7.1f} {m['ours']:>7.1f} {m['fast']:>7.1f} {m['floor']:>7.1f} "
              f"{m['hf'] / m['ours']:>7.2f}x {r1:>5.2f}|{r2:<5.2f} {m['hf'] / m['fast']:>7.2f}x "
              f"{m['hf'] / m['floor']:>7.2f}x {diff:>8.1e} {fast_max:>9.3f}|{fast_mean:<.4f}", flush=True)
        walls.append((f"{w}x{h}", {k: med_ms(v) for k, v in wall.items()}, len(cpu["hf"])))
    print("wall-clock medians (ms per image; affected by other jobs on the machine):")
    for size, m, n in walls:
        print(f"{size:>10} " + " ".join(f"{k} {m[k]:.1f}" for k in METHODS)
              + f"  hf/ours {m['hf'] / m['ours']:.2f}x  ({n} calls per method)")


if __name__ == "__main__":
    main()
