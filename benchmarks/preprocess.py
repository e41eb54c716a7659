"""JPEG bytes -> pixel_values per core: the loader's uint8 path, the float path and the HF image processor.

    python benchmarks/preprocess.py [--seconds 20] [--generation qwen2_5_vl] [--fast]

Same images, same run, one thread (`torch.set_num_threads(1)`, OMP/BLAS threads 1): the numbers are
per core. Per size bucket (640x480, 1280x960, 4000x3000 JPEGs of smooth gradients + noise, quality 90):

* `hf`: `Image.open` + `Qwen2VLImageProcessor(images=[img], return_tensors="np")` with the same
  mean/std/pixel bounds (transformers 4.57, slow PIL/numpy path);
* `loader`: `decode_image` + `image_codes`: JPEG -> uint8 patch codes, one frame — what a decode worker
  does per image (then ships the codes, `bytes` below, to the rank process);
* `pack`: the rank process writing those codes T times into the batch (`stream.pack_codes`);
* `norm`: `PackedBatch` normalisation of the packed codes (`schema.normalise_pixels`, the gather that
  `PackedBatch.to(device)` runs) timed here on the CPU for reference — a GPU does it instead;
* `float`: `decode_image` + `patchify_image`, the full CPU float path (`preprocess_image`; what the
  loader ran before it shipped codes);
* `floor`: PIL decode + the bicubic resize to the smart_resize target + `np.asarray` — work any exact
  implementation must do (the parity requires PIL's bicubic on uint8);
* `fast` (with `--fast`): `loader` with `decode_image(..., fast_decode=True)` (JPEG draft decoding).

The machine is shared, so the methods are interleaved image by image (round robin, order rotated each
round) and each call is timed by the CPU time of this thread (`time.thread_time`: time spent waiting
for a core while other jobs run is not counted); the table gives medians in ms per image. Speedups
are ratios of medians; `hf/loader 1st|2nd` repeats the ratio on the first and second half of the
rounds to show how stable it is. Wall-clock medians are printed below for reference. Before timing,
the loader's codes, packed and normalised, are checked equal to HF's pixel_values bit for bit, and so
is the float path. `bytes`: what one image sends from a worker to the rank process, uint8 codes now
against the float32 pixel_values (T = 2 frames) before.
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

from data_pipelines.schema import DataConfig, normalise_pixels
from data_pipelines.stream import pack_codes, pixel_lut
from data_pipelines.vision import decode_image, image_codes, patchify_image, smart_resize, vision_spec

SIZES = [(640, 480), (1280, 960), (4000, 3000)]


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


def build_methods(generation: str, fast: bool = False) -> dict:
    """name -> fn(jpeg bytes) for the compared steps (module docstring); `pack` and `norm` start from the
    image's codes, made once per image beforehand (`codes_of`)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    spec = vision_spec(generation)
    bounds = dict(factor=spec.factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    sizes = dict(patch_size=spec.patch_size, merge_size=spec.merge_size, min_pixels=spec.min_pixels,
                 max_pixels=spec.max_pixels)
    settings = dict(sizes, temporal_patch_size=spec.temporal_patch_size, mean=spec.mean, std=spec.std)
    hf = Qwen2VLImageProcessor(
        image_mean=list(spec.mean), image_std=list(spec.std), min_pixels=spec.min_pixels, max_pixels=spec.max_pixels,
        patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size, merge_size=spec.merge_size,
    )
    cfg = DataConfig(generation=generation, patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
                     merge_size=spec.merge_size, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    lut = pixel_lut(generation)
    codes_of: dict[bytes, tuple] = {}  # jpeg -> (one-frame codes, packed codes, grid)

    def codes(b: bytes) -> tuple:
        if b not in codes_of:
            one, grid = image_codes(decode_image(b), **sizes)
            codes_of[b] = (one, pack_codes(cfg, [one]), torch.tensor([grid]))
        return codes_of[b]

    def floor(b: bytes):
        img = Image.open(io.BytesIO(b))
        rh, rw = smart_resize(img.size[1], img.size[0], spec.factor, spec.min_pixels, spec.max_pixels)
        return np.asarray(img.resize((rw, rh), resample=Image.BICUBIC))

    fns = {
        "hf": lambda b: hf(images=[Image.open(io.BytesIO(b))], return_tensors="np")["pixel_values"],
        "loader": lambda b: image_codes(decode_image(b), **sizes)[0],
        "pack": lambda b: pack_codes(cfg, [codes(b)[0]]),
        "norm": lambda b: normalise_pixels(codes(b)[1], lut, codes(b)[2]),
        "float": lambda b: patchify_image(decode_image(b), **settings)[0],
        "floor": floor,
    }
    if fast:
        fns["fast"] = lambda b: image_codes(decode_image(b, fast_decode=True, **bounds), **sizes)[0]
    return fns


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
    ap.add_argument("--fast", action="store_true", help="also time data.fast_decode (JPEG draft decoding)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    spec = vision_spec(args.generation)
    fns = build_methods(args.generation, args.fast)
    names = list(fns)
    print(f"generation {args.generation}, pixels {spec.min_pixels}..{spec.max_pixels}, 1 thread, "
          f"~{args.seconds:.0f} s per bucket, {args.images} images per bucket; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; median CPU ms per image")
    print(f"{'size':>10} {'target':>9} " + " ".join(f"{k:>7}" for k in names)
          + f" {'hf/loader':>9} {'1st|2nd':>11} {'hf/float':>8} {'hf/floor':>8} {'bytes u8|f32':>17}")
    walls = []
    for w, h in SIZES:
        blobs = make_jpegs(w, h, args.images)
        for b in blobs:  # exactness first: codes packed + normalised, and the float path, equal HF bit for bit
            want = fns["hf"](b)
            assert np.array_equal(fns["norm"](b).numpy(), want) and np.array_equal(fns["float"](b), want)
        one, packed = fns["loader"](blobs[0]), fns["pack"](blobs[0])
        sent = f"{one.nbytes / 1e6:.1f}|{packed.numel() * 4 / 1e6:.1f} MB"
        rh, rw = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
        cpu, wall = time_interleaved(fns, blobs, args.seconds)
        m = {k: med_ms(v) for k, v in cpu.items()}
        half = len(cpu["hf"]) // 2
        r1 = med_ms(cpu["hf"][:half]) / med_ms(cpu["loader"][:half])
        r2 = med_ms(cpu["hf"][half:]) / med_ms(cpu["loader"][half:])
        print(f"{w}x{h:<5} {rw}x{rh:<4} " + " ".join(f"{m[k]:>7.1f}" for k in names)
              + f" {m['hf'] / m['loader']:>8.2f}x {r1:>5.2f}|{r2:<5.2f} {m['hf'] / m['float']:>7.2f}x "
              f"{m['hf'] / m['floor']:>7.2f}x {sent:>17}", flush=True)
        walls.append((f"{w}x{h}", {k: med_ms(v) for k, v in wall.items()}, len(cpu["hf"])))
    print("wall-clock medians (ms per image; affected by other jobs on the machine):")
    for size, m, n in walls:
        print(f"{size:>10} " + " ".join(f"{k} {m[k]:.1f}" for k in names)
              + f"  hf/loader {m['hf'] / m['loader']:.2f}x  ({n} calls per method)")
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
