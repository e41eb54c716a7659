"""JPEG bytes -> pixel_values per core: HF's image processors against our float path (the headline, like for
like), and separately our uint8 path plus the normalisation a device does.

    python benchmarks/preprocess.py [--seconds 20] [--generation qwen2_5_vl] [--fast]

Like for like: HF's processors return float32 `pixel_values` on the CPU; so does our float path
(`preprocess_image`), so `hf/float` is the headline ratio. The loader's own path stops earlier (uint8
codes; the float values are made on the training device by `PackedBatch.to`), so it is reported on its
own row with its normalisation timed here on the CPU (`u8 path` = loader + pack + norm on this CPU; on a
GPU `norm` is one gather, `benchmarks/gpu_check.py` part 4). HF's fast (torchvision) processor is timed
where torchvision imports; where it does not, the row says why.

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
* `fast` (with `--fast`): `loader` with `decode_image(..., fast_decode=True)` (JPEG draft decoding);
* `hf_fast`: `Qwen2VLImageProcessorFast` (torchvision, `device="cpu"`) when torchvision imports.

The machine is shared, so the methods are interleaved image by image (round robin, order rotated each
round) and each call is timed by the CPU time of this thread (`time.thread_time`: time spent waiting
for a core while other jobs run is not counted); the table gives medians in ms per image. Speedups
are ratios of medians; `hf/float 1st|2nd` repeats the ratio on the first and second half of the
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


def hf_fast_processor(**kwargs):
    """(HF's fast torchvision image processor, None) or (None, why it cannot run here)."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl_fast import Qwen2VLImageProcessorFast

        return Qwen2VLImageProcessorFast(**kwargs), None
    except Exception as e:  # torchvision missing, or a wheel built for another torch (see RESULTS.md)
        return None, f"{type(e).__name__}: {e}".splitlines()[0]


def build_methods(generation: str, fast: bool = False) -> tuple[dict, str | None]:
    """(name -> fn(jpeg bytes) for the compared steps (module docstring), why `hf_fast` is missing or
    None); `pack` and `norm` start from the image's codes, made once per image beforehand (`codes_of`)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    spec = vision_spec(generation)
    bounds = dict(factor=spec.factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    sizes = dict(patch_size=spec.patch_size, merge_size=spec.merge_size, min_pixels=spec.min_pixels,
                 max_pixels=spec.max_pixels)
    settings = dict(sizes, temporal_patch_size=spec.temporal_patch_size, mean=spec.mean, std=spec.std)
    hf_kwargs = dict(
        image_mean=list(spec.mean), image_std=list(spec.std), min_pixels=spec.min_pixels, max_pixels=spec.max_pixels,
        patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size, merge_size=spec.merge_size,
    )
    hf = Qwen2VLImageProcessor(**hf_kwargs)
    hf_fast, why = hf_fast_processor(**hf_kwargs)
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
    if hf_fast is not None:
        fns["hf_fast"] = lambda b: hf_fast(images=[Image.open(io.BytesIO(b))], return_tensors="pt", device="cpu")["pixel_values"]
    return fns, why


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


VIDEO_SIZES = [(640, 360), (1280, 720)]
VIDEO_GENERATIONS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def make_clip(path: str, w: int, h: int, seconds: float = 4.0, fps: int = 30) -> None:
    """A web-like H.264 clip (yuv420p, crf 23, GOP 60): moving gradients + noise, `seconds` at `fps`."""
    from fractions import Fraction

    import av

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    with av.open(path, "w") as out:
        st = out.add_stream("libx264", rate=Fraction(fps))
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"crf": "23", "g": "60"}
        for i in range(int(seconds * fps)):
            base = np.stack([128 + 100 * np.sin((xx + 4 * i) / 57), 128 + 100 * np.cos((yy + 3 * i) / 43),
                             128 + 100 * np.sin((xx + yy - 2 * i) / 91)], axis=-1)
            img = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
            for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)


def video_methods(generation: str) -> tuple[dict, str | None]:
    """(name -> fn(video path) -> float pixel_values, why HF's video processor is missing or None): `hf_video`
    is transformers' own path (`load_video(..., backend="pyav")` with the processor's frame sampling, then
    the video processor: torchvision resize + normalise), `float_video` our `preprocess_video` (PyAV
    decode, the same frames, torch's uint8 antialiased bicubic, patchify, normalising table)."""
    from functools import partial

    from data_pipelines.video import preprocess_video

    fns = {"float_video": lambda path: preprocess_video(path, generation).pixel_values}
    try:
        from transformers.video_utils import load_video

        if generation == "qwen3_vl":
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as Proc
        else:
            from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as Proc
        vp = Proc()
    except Exception as e:  # the HF video processors need torchvision
        return fns, f"{type(e).__name__}: {e}".splitlines()[0]
    kw = {} if generation == "qwen3_vl" else {"temporal_patch_size": vp.temporal_patch_size}
    sample = partial(vp.sample_frames, fps=2.0, **kw)

    def hf(path: str):
        frames, meta = load_video(path, backend="pyav", sample_indices_fn=sample)
        return vp(videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")["pixel_values_videos"]

    return {"hf_video": hf, **fns}, None


def video_rows(seconds: float) -> None:
    """Per generation and size: median process CPU ms and wall ms per clip, HF / ours (video float path)."""
    import tempfile

    from data_pipelines.video import preprocess_video

    print("video: 4 s clips at 30 fps (H.264 yuv420p crf 23), fps 2 sampling, float pixel_values; median of "
          "process CPU ms (all threads: FFmpeg decodes with its own) and wall ms per clip")
    print(f"{'generation':<11} {'size':>9} {'frames':>6} {'hf cpu':>8} {'ours cpu':>8} {'hf/ours cpu':>11} "
          f"{'hf wall':>8} {'ours wall':>9} {'hf/ours wall':>12} {'max |diff|':>10}")
    with tempfile.TemporaryDirectory() as d:
        for w, h in VIDEO_SIZES:
            path = os.path.join(d, f"clip_{w}x{h}.mp4")
            make_clip(path, w, h)
            for gen in VIDEO_GENERATIONS:
                fns, why = video_methods(gen)
                if why:
                    print(f"{gen:<11} {w}x{h:<4} HF video processor not timed: {why}")
                    continue
                ours, want = fns["float_video"](path), fns["hf_video"](path)
                diff = float((ours.float() - want.float()).abs().max())
                cpu: dict = {k: [] for k in fns}
                wall: dict = {k: [] for k in fns}
                names, t_start, rnd = list(fns), time.perf_counter(), 0
                while rnd < 3 or time.perf_counter() - t_start < seconds:
                    for name in names[rnd % 2:] + names[:rnd % 2]:
                        c0, w0 = time.process_time(), time.perf_counter()
                        fns[name](path)
                        cpu[name].append(time.process_time() - c0)
                        wall[name].append(time.perf_counter() - w0)
                    rnd += 1
                c, wl = {k: med_ms(v) for k, v in cpu.items()}, {k: med_ms(v) for k, v in wall.items()}
                frames = len(preprocess_video(path, gen).frame_indices)
                print(f"{gen:<11} {w}x{h:<4} {frames:>6} {c['hf_video']:>8.1f} {c['float_video']:>8.1f} "
                      f"{c['hf_video'] / c['float_video']:>10.2f}x {wl['hf_video']:>8.1f} {wl['float_video']:>9.1f} "
                      f"{wl['hf_video'] / wl['float_video']:>11.2f}x {diff:>10.2e}", flush=True)


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="timing budget per size bucket")
    ap.add_argument("--images", type=int, default=4, help="distinct JPEGs per bucket")
    ap.add_argument("--generation", default="qwen2_5_vl")
    ap.add_argument("--fast", action="store_true", help="also time data.fast_decode (JPEG draft decoding)")
    ap.add_argument("--video", action="store_true", help="only the video rows: HF's video processors (they need "
                    "torchvision) against our video float path, 360p and 720p, every generation")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.video:
        video_rows(args.seconds)
        return
    spec = vision_spec(args.generation)
    fns, why = build_methods(args.generation, args.fast)
    names = list(fns)
    print(f"generation {args.generation}, pixels {spec.min_pixels}..{spec.max_pixels}, 1 thread, "
          f"~{args.seconds:.0f} s per bucket, {args.images} images per bucket; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; median CPU ms per image")
    if why:
        print(f"hf_fast (torchvision) not timed: {why}")
    print(f"{'size':>10} {'target':>9} " + " ".join(f"{k:>7}" for k in names)
          + f" | {'hf/float':>8} {'1st|2nd':>11} | {'u8 path':>7} {'hf/u8path':>9} | {'hf/floor':>8}"
          + (f" {'hf_fast/float':>13}" if "hf_fast" in fns else "") + f" {'bytes u8|f32':>17}")
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
        r1 = med_ms(cpu["hf"][:half]) / med_ms(cpu["float"][:half])
        r2 = med_ms(cpu["hf"][half:]) / med_ms(cpu["float"][half:])
        u8 = m["loader"] + m["pack"] + m["norm"]
        print(f"{w}x{h:<5} {rw}x{rh:<4} " + " ".join(f"{m[k]:>7.1f}" for k in names)
              + f" | {m['hf'] / m['float']:>7.2f}x {r1:>5.2f}|{r2:<5.2f} | {u8:>7.1f} {m['hf'] / u8:>8.2f}x | "
              f"{m['hf'] / m['floor']:>7.2f}x" + (f" {m['hf_fast'] / m['float']:>12.2f}x" if "hf_fast" in m else "")
              + f" {sent:>17}", flush=True)
        walls.append((f"{w}x{h}", {k: med_ms(v) for k, v in wall.items()}, len(cpu["hf"])))
    print("wall-clock medians (ms per image; affected by other jobs on the machine):")
    for size, m, n in walls:
        print(f"{size:>10} " + " ".join(f"{k} {m[k]:.1f}" for k in names)
              + f"  hf/float {m['hf'] / m['float']:.2f}x  ({n} calls per method)")
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
