"""JPEG bytes -> pixel_values per core: ours vs transformers' slow Qwen2VLImageProcessor, with a floor.

    python benchmarks/preprocess.py [--seconds 3] [--generation qwen2_5_vl]

Same images, same run, one thread (`torch.set_num_threads(1)`, OMP/BLAS threads 1): the number is
per core. Per size bucket (640x480, 1280x960, 4000x3000 JPEGs of smooth gradients + noise, quality 90):

* `floor`: decode (PIL) + the bicubic resize to the smart_resize target — work any exact
  implementation must do (the parity requires PIL's bicubic on uint8);
* `ours`: `decode_image` + `data_pipelines.vision.preprocess_image` (what the loader runs);
* `hf`: `Image.open` + `Qwen2VLImageProcessor(images=[img], return_tensors="np")` with the same
  mean/std/pixel bounds (transformers 4.57, slow PIL/numpy path).
The outputs of ours and hf are checked equal within 1e-5 once per bucket before timing.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from data_pipelines.vision import decode_image, preprocess_image, smart_resize, vision_spec

SIZES = [(640, 480), (1280, 960), (4000, 3000)]


def make_jpegs(w: int, h: int, n: int, seed: int = 0) -> list[bytes]:
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


def rate(fn, blobs: list[bytes], seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        for b in blobs:
            fn(b)
            n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--generation", default="qwen2_5_vl")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    spec = vision_spec(args.generation)
    hf = Qwen2VLImageProcessor(
        image_mean=list(spec.mean), image_std=list(spec.std), min_pixels=spec.min_pixels, max_pixels=spec.max_pixels,
        patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size, merge_size=spec.merge_size,
    )

    def floor(b: bytes):
        img = Image.open(io.BytesIO(b)).convert("RGB")
        rh, rw = smart_resize(img.size[1], img.size[0], spec.factor, spec.min_pixels, spec.max_pixels)
        return np.asarray(img.resize((rw, rh), resample=Image.BICUBIC))

    def ours(b: bytes):
        return preprocess_image(decode_image(b), args.generation)[0]

    def ref(b: bytes):
        return hf(images=[Image.open(io.BytesIO(b))], return_tensors="np")["pixel_values"]

    print(f"generation {args.generation}, pixels {spec.min_pixels}..{spec.max_pixels}, 1 thread, "
          f"{args.seconds:.0f} s per cell; images/s")
    print(f"{'size':>10} {'target':>10} {'floor':>8} {'ours':>8} {'hf':>8} {'ours/hf':>8} {'floor/hf':>9} {'max|diff|':>10}")
    for w, h in SIZES:
        blobs = make_jpegs(w, h, 4)
        diff = float(np.abs(ours(blobs[0]).numpy() - ref(blobs[0])).max())
        assert diff < 1e-5, diff
        rh, rw = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
        r_floor, r_ours, r_hf = (rate(f, blobs, args.seconds) for f in (floor, ours, ref))
        print(f"{w}x{h:<5} {rw}x{rh:<5} {r_floor:>8.1f} {r_ours:>8.1f} {r_hf:>8.1f} {r_ours / r_hf:>7.2f}x "
              f"{r_floor / r_hf:>8.2f}x {diff:>10.1e}", flush=True)


if __name__ == "__main__":
    main()
