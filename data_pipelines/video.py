"""Video preprocessing for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: PyAV decoding, frame sampling, resize, patchify.

Public API::

    feats = preprocess_video("clip.mp4" | raw_bytes, "qwen3_vl", fps=None, min_pixels=None, max_pixels=None,
                             min_frames=None, max_frames=None)
    feats.pixel_values      # torch.float32 [t*h*w, C*T*p*p], rows (t, h-block, w-block, mh, mw)
    feats.grid_thw          # (t, h, w) in patches; t = temporal patches (T = 2 frames each)
    feats.frame_indices     # the decoded frames' indices in the stream
    feats.frame_timestamps  # seconds of each temporal patch (Qwen3-VL's `<t seconds>` text)
    feats.second_per_grid   # seconds one temporal patch spans (Qwen2.5-VL's absolute-time positions)

This reproduces the transformers 4.57.6 video processors with `do_sample_frames=True` and the video's
own metadata (`container.streams.video[0].frames` and `.average_rate`, exactly as transformers'
PyAV reader takes them), tested against golden fixtures made with the HF classes
(tests/fixtures/video/make_fixtures.py):

* `qwen2_vl`, `qwen2_5_vl`: `Qwen2VLVideoProcessor` (Qwen2.5-VL has no class of its own).
  Frames: `n = total / video_fps * fps`, clamped to [min_frames, min(max_frames, total) rounded down
  to a multiple of T] and rounded down to a multiple of T; indices `arange(0, total, total / n).int()`
  (float32, as torch computes it). Size: the image `smart_resize` per frame with the video pixel
  bounds (default 128*28*28 .. 28*28*768). `second_per_grid = T / fps` (the sampling fps, as
  `Qwen2_5_VLProcessor` computes it).
* `qwen3_vl`: `Qwen3VLVideoProcessor`. Frames: `n = int(total / video_fps * fps)` clamped to
  [min_frames, max_frames] and to `total` (not rounded to T: an odd count repeats its last frame);
  indices `linspace(0, total - 1, n).round()`. Size: Qwen3-VL's own `smart_resize` whose pixel budget
  covers all frames (`t * h * w` within 128*32*32 .. 32*32*768 by default). Timestamps: each frame's
  `index / video_fps`, averaged over the frames of one temporal patch (`_calculate_timestamps`).

Then, for all: resize every frame with torch's native uint8 antialiased bicubic (what torchvision's
`F.resize` runs for a uint8 tensor on CPU), normalise with the generation's mean/std (fused
`(x - 255*mean) / (255*std)` in float32, as the fast processors do) and patchify with
`vision.patchify`. Note the resize differs from the image processor's PIL bicubic:
a video frame and the same picture as an image do not give identical pixels, in HF either. The loader
ships the uint8 patches before the normalisation (`video_codes`, all T frames of each temporal patch);
`video_norm_lut(mean, std)` is the [3, 256] table that the training device applies to them.

Token and patch counts follow from the container metadata alone (`probe_video`, `video_plan`), so
shards are indexed and planned without decoding frames. Decoding stops after the last sampled frame
but decodes every frame before it (inter-frame codecs need them): it dominates the cost (a 10 s
640x360 H.264 clip at 30 fps: ~0.5 s on one core, ~75% decode).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Union

import numpy as np
import torch

from data_pipelines import generations
from data_pipelines.vision import MAX_ASPECT_RATIO, MAX_SOURCE_PIXELS, apply_lut, patchify, smart_resize, vision_spec

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview]
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768


MAX_VIDEO_FRAME_PIXELS = MAX_SOURCE_PIXELS
"""Decompression-bomb guard for one frame, the images' cap: width × height from the container's header."""
MAX_VIDEO_TOTAL_PIXELS = 8 * 1024**3
"""Frames × width × height a video may claim (~2 min of 1080p at 30 fps): decoding walks every frame up
to the last one sampled, so this bounds the decode work of one read. Checked from the header."""


class BadVideo(ValueError):
    """A video that cannot be decoded or sampled; the stream skips the sample, make_shards rejects it."""


class VideoTooLarge(BadVideo):
    """A video whose header claims more pixels per frame or in all than the caps (never decoded)."""


def video_rules(generation: str) -> generations.VideoRules:
    """`generation`'s video rules (`DataSpec.video`); BadVideo when it takes no video."""
    rules = generations.get(generation).video
    if rules is None:
        raise BadVideo(f"{generation} takes no video")
    return rules


@dataclass(frozen=True)
class VideoMeta:
    """What the container header says: frame count, frame rate and frame size (no frame decoded)."""

    total_frames: int
    fps: float
    height: int
    width: int

    def as_index(self) -> list:
        """Compact index entry `[frames, fps, h, w]` (shards.py)."""
        return [self.total_frames, self.fps, self.height, self.width]

    @classmethod
    def from_index(cls, row) -> "VideoMeta":
        frames, fps, h, w = row
        return cls(int(frames), float(fps), int(h), int(w))


@dataclass(frozen=True)
class VideoSettings:
    """Sampling and resolution settings of one run (defaults: the generation's HF processor)."""

    fps: float = DEFAULT_FPS
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None

    @classmethod
    def from_config(cls, cfg) -> "VideoSettings":
        """The `data.video_*` keys of a DataConfig."""
        return cls(float(cfg.video_fps), int(cfg.video_min_frames), int(cfg.video_max_frames),
                   cfg.video_min_pixels, cfg.video_max_pixels)

    def pixels(self, generation: str) -> tuple[int, int]:
        lo, hi = video_rules(generation).pixels
        return (lo if self.min_pixels is None else int(self.min_pixels),
                hi if self.max_pixels is None else int(self.max_pixels))


@dataclass
class VideoPlan:
    """Which frames to decode and the grid they become, from the metadata alone."""

    frame_indices: np.ndarray  # [n] int64 indices into the stream's frames
    grid_thw: tuple[int, int, int]  # in patches
    resized: tuple[int, int]  # (h, w) every frame is resized to
    frame_timestamps: list[float]  # seconds, one per temporal patch
    second_per_grid: float  # seconds one temporal patch spans

    def token_count(self, merge_size: int) -> int:
        """LLM tokens that carry the video (`<|video_pad|>`s)."""
        t, h, w = self.grid_thw
        return t * h * w // (merge_size * merge_size)

    def extra_text_tokens(self, generation: str) -> int:
        """Template tokens of the video beyond the `<|vision_start|><|vision_end|>` the shard index counts:
        none for Qwen2/2.5-VL; for Qwen3-VL the `<t seconds>` text of every temporal patch (one token per
        character of the number, plus `<`, ` seconds` and `>`: exact standalone, an upper bound next to
        other text) and a start/end pair per further temporal patch."""
        if not video_rules(generation).timestamps:
            return 0
        stamps = sum(len(f"{s:.1f}") + 3 for s in self.frame_timestamps)
        return stamps + 2 * (len(self.frame_timestamps) - 1)


@dataclass
class VideoFeatures:
    """Model inputs of one video (module docstring)."""

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    second_per_grid: float
    frame_timestamps: list[float]
    frame_indices: np.ndarray
    video_fps: float


# ------------------------------------------------------------------------------------ container
def _open(src: VideoSource):
    import av

    if isinstance(src, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(bytes(src)))
    return av.open(os.fspath(src))


def probe_video(src: VideoSource, max_frame_pixels: int = MAX_VIDEO_FRAME_PIXELS,
                max_total_pixels: int = MAX_VIDEO_TOTAL_PIXELS) -> VideoMeta:
    """Container metadata of the first video stream. Raises BadVideo when it cannot be opened, has no
    video stream or 0 frames, VideoTooLarge when its frames (width × height) or all of it (frames ×
    width × height) claim more than the caps, before any frame is decoded. When the header lacks a
    frame count the packets are counted (demuxed, not decoded)."""
    try:
        with _open(src) as container:
            if not container.streams.video:
                raise BadVideo("no video stream")
            st = container.streams.video[0]
            total = int(st.frames or 0)
            rate = float(st.average_rate) if st.average_rate else 0.0
            h, w = int(st.height or 0), int(st.width or 0)
            if w * h > max_frame_pixels:
                raise VideoTooLarge(f"video frames of {w}x{h} = {w * h} pixels > {max_frame_pixels} (the pixel cap of images)")
            if total <= 0:
                total = sum(1 for p in container.demux(st) if p.size)
    except BadVideo:
        raise
    except Exception as e:  # av.error.*, OSError, ...
        raise BadVideo(f"unreadable video: {type(e).__name__}: {e}") from e
    if total <= 0:
        raise BadVideo("video has 0 frames")
    if rate <= 0:
        raise BadVideo("video stream has no frame rate")
    if h < 1 or w < 1:
        raise BadVideo(f"video frames of {w}x{h} pixels")
    if total * w * h > max_total_pixels:
        raise VideoTooLarge(f"video of {total} frames of {w}x{h} = {total * w * h} pixels > {max_total_pixels} in all")
    return VideoMeta(total, rate, h, w)


def decode_frames(src: VideoSource, indices: np.ndarray) -> np.ndarray:
    """Decode the frames at `indices` (sorted, may repeat) → uint8 [n, H, W, 3] RGB; stops after the last one."""
    wanted = set(int(i) for i in indices)
    got: dict[int, np.ndarray] = {}
    try:
        with _open(src) as container:
            last = max(wanted)
            for i, frame in enumerate(container.decode(video=0)):
                if i > last:
                    break
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
    except Exception as e:
        raise BadVideo(f"undecodable video: {type(e).__name__}: {e}") from e
    missing = sorted(wanted - got.keys())
    if missing:
        raise BadVideo(f"video ended before frame {missing[0]} (header promised more frames)")
    return np.stack([got[int(i)] for i in indices])


def encode_video(frames: np.ndarray, fps: int) -> bytes:
    """uint8 RGB frames [n, H, W, 3] → MP4 bytes (H.264, lossless yuv444p, one thread: the same bytes
    every time). For synthetic data and tests."""
    import av

    n, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=Fraction(fps))
        st.width, st.height, st.pix_fmt = w, h, "yuv444p"
        st.options = {"crf": "0", "preset": "ultrafast", "threads": "1"}
        for k in range(n):
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[k]), format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return buf.getvalue()


# -------------------------------------------------------------------------------------- sampling
def sample_frame_indices(meta: VideoMeta, generation: str, s: VideoSettings, temporal_patch_size: int = 2) -> np.ndarray:
    """Indices of the frames the generation's HF video processor samples (module docstring)."""
    total, T = meta.total_frames, temporal_patch_size
    if video_rules(generation).timestamps:
        n = int(total / meta.fps * s.fps)
        n = min(min(max(n, s.min_frames), s.max_frames), total)
        return np.linspace(0, total - 1, n).round().astype(np.int64)
    max_frames = math.floor(min(s.max_frames, total) / T) * T
    n = total / meta.fps * s.fps
    n = min(min(max(n, s.min_frames), max_frames), total)
    n = math.floor(n / T) * T
    if n < T:
        raise BadVideo(f"video of {total} frames is shorter than one temporal patch ({T} frames)")
    return torch.arange(0, total, total / n).int().numpy().astype(np.int64)


def qwen3_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video `smart_resize`: like the image rule, with the pixel budget over all frames."""
    if height < factor or width < factor:
        raise BadVideo(f"video frames of {width}x{height} pixels are smaller than {factor} pixels a side (Qwen3-VL's minimum)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise BadVideo(f"video frames of {width}x{height} pixels have an aspect ratio over {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_timestamps(indices, video_fps: float, merge_size: int = 2) -> list[float]:
    """Seconds per temporal patch: `index / fps`, first and last frame of each patch averaged (Qwen3-VL)."""
    idx = [int(i) for i in indices]
    if len(idx) % merge_size:
        idx.extend(idx[-1] for _ in range(merge_size - len(idx) % merge_size))
    ts = [i / video_fps for i in idx]
    return [(ts[i] + ts[i + merge_size - 1]) / 2 for i in range(0, len(ts), merge_size)]


def timestamp_text(seconds: float) -> str:
    """The text Qwen3-VL's processor puts before each temporal patch, e.g. `<1.5 seconds>`."""
    return f"<{seconds:.1f} seconds>"


def video_plan(
    meta: VideoMeta, generation: str, settings: VideoSettings = VideoSettings(), *, patch_size: Optional[int] = None,
    merge_size: Optional[int] = None, temporal_patch_size: Optional[int] = None,
) -> VideoPlan:
    """Frames, resized size and grid of a video from its metadata alone (no decoding)."""
    spec = vision_spec(generation)
    p = patch_size or spec.patch_size
    m = merge_size or spec.merge_size
    T = temporal_patch_size or spec.temporal_patch_size
    lo, hi = settings.pixels(generation)
    if hi < lo:
        raise ValueError(f"video max_pixels={hi} must be >= min_pixels={lo}")
    indices = sample_frame_indices(meta, generation, settings, T)
    n = len(indices)
    try:
        if video_rules(generation).timestamps:  # Qwen3-VL: the pixel budget over all frames
            rh, rw = qwen3_smart_resize(n, meta.height, meta.width, T, p * m, lo, hi)
        else:
            rh, rw = smart_resize(meta.height, meta.width, p * m, lo, hi)
    except BadVideo:
        raise
    except ValueError as e:
        raise BadVideo(str(e)) from e
    grid = (-(-n // T), rh // p, rw // p)
    return VideoPlan(indices, grid, (rh, rw), frame_timestamps(indices, meta.fps, m), T / settings.fps)


# --------------------------------------------------------------------------------- pixels
_VIDEO_LUTS: dict[tuple, np.ndarray] = {}


def video_norm_lut(mean: tuple, std: tuple) -> np.ndarray:
    """[3, 256] float32: uint8 v → (v - f32(mean)*255) / (f32(std)*255), the fast processors' fused
    rescale+normalise in float32."""
    key = (mean, std)
    lut = _VIDEO_LUTS.get(key)
    if lut is None:
        v = np.arange(256, dtype=np.float32)
        m = np.asarray(mean, dtype=np.float32) * np.float32(255.0)
        sd = np.asarray(std, dtype=np.float32) * np.float32(255.0)
        lut = np.ascontiguousarray(((v[None, :] - m[:, None]) / sd[:, None]).astype(np.float32))
        _VIDEO_LUTS[key] = lut
    return lut


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [n, H, W, 3] → uint8 [n, 3, height, width]: torchvision's `F.resize` of a uint8 tensor with
    BICUBIC and antialias on CPU, i.e. torch's native uint8 antialiased bicubic on contiguous NCHW
    (frames already of the target size are kept as they are, as torchvision does)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    if x.shape[-2:] == (height, width):
        return x.numpy()
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return y.numpy()


_ARITH_EXACT: dict[tuple, bool] = {}


def normalise_codes(codes: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    """uint8 codes [N, C, T, K] → float32 `video_norm_lut(mean, std)[c, code]`, computed as one float32
    conversion and an in-place `(x - 255·mean) / (255·std)` per channel (torch, the fast processors' own
    arithmetic): ~35% less CPU than the table gather at 720p. The result equals the table bit for bit —
    checked for all 256 values of every channel at first use of a (mean, std); otherwise the table is used."""
    key = (tuple(mean), tuple(std))
    lut = video_norm_lut(*key)
    if key not in _ARITH_EXACT:
        every = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, lut.shape[0], 1, 256)).copy()
        _ARITH_EXACT[key] = np.array_equal(_normalise_arith(every, lut.shape[0], *key).view(np.uint32),
                                           apply_lut(every, lut).view(np.uint32))
    if not _ARITH_EXACT[key]:
        return apply_lut(codes, lut)
    return _normalise_arith(codes, lut.shape[0], *key)


def _normalise_arith(codes: np.ndarray, channels: int, mean: tuple, std: tuple) -> np.ndarray:
    m = (torch.tensor(mean, dtype=torch.float32) * torch.tensor(255.0, dtype=torch.float32)).view(1, channels, 1, 1)
    sd = (torch.tensor(std, dtype=torch.float32) * torch.tensor(255.0, dtype=torch.float32)).view(1, channels, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(codes)).to(torch.float32)
    return x.sub_(m).div_(sd).numpy()


def video_pixels(frames: np.ndarray, plan: VideoPlan, *, patch_size: int, merge_size: int, temporal_patch_size: int,
                 mean: tuple, std: tuple) -> np.ndarray:
    """Decoded frames → pixel_values float32 [t*h*w, C*T*p*p] for `plan`."""
    codes = video_codes(frames, plan, patch_size=patch_size, merge_size=merge_size,
                        temporal_patch_size=temporal_patch_size)
    return normalise_codes(codes, tuple(mean), tuple(std)).reshape(codes.shape[0], -1)


def video_codes(frames: np.ndarray, plan: VideoPlan, *, patch_size: int, merge_size: int,
                temporal_patch_size: int) -> np.ndarray:
    """Decoded frames → uint8 codes [t*h*w, C, T, p*p] for `plan` (what the loader ships; the T frames of
    a temporal patch differ, so they are all kept): `video_norm_lut(mean, std)[c, code]` is the float value."""
    rh, rw = plan.resized
    u8 = resize_frames(frames, rh, rw)  # [n, 3, rh, rw]
    codes, grid = patchify(u8, patch_size, temporal_patch_size, merge_size)
    if grid != plan.grid_thw:  # cannot happen unless plan and pixels disagree on the rules
        raise AssertionError(f"patchified grid {grid} != planned {plan.grid_thw}")
    return codes.reshape(codes.shape[0], 3, temporal_patch_size, patch_size * patch_size)


def preprocess_video(
    src: VideoSource, generation: str, *, fps: Optional[float] = None, min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None, min_frames: Optional[int] = None, max_frames: Optional[int] = None,
) -> VideoFeatures:
    """Video file path or encoded bytes → `VideoFeatures` for `generation` (module docstring).

    Defaults are the HF video processor's (fps 2, 4..768 frames, the generation's `VideoRules.pixels`). Raises BadVideo for an
    unreadable, empty or too short video, ValueError for an unknown generation.
    """
    spec = vision_spec(generation)
    settings = VideoSettings(
        fps=DEFAULT_FPS if fps is None else float(fps),
        min_frames=DEFAULT_MIN_FRAMES if min_frames is None else int(min_frames),
        max_frames=DEFAULT_MAX_FRAMES if max_frames is None else int(max_frames),
        min_pixels=min_pixels, max_pixels=max_pixels,
    )
    return preprocess_video_with(src, generation, settings, patch_size=spec.patch_size, merge_size=spec.merge_size,
                                 temporal_patch_size=spec.temporal_patch_size)


def preprocess_video_with(
    src: VideoSource, generation: str, settings: VideoSettings, *, patch_size: int, merge_size: int,
    temporal_patch_size: int, meta: Optional[VideoMeta] = None, as_codes: bool = False,
) -> VideoFeatures:
    """`preprocess_video` with explicit settings (the stream passes its config's). `as_codes=True`: the
    loader's form, `pixel_values` = uint8 codes [t*h*w, C, T, p*p] (`video_codes`) instead of floats."""
    if settings.fps <= 0 or settings.min_frames < 1 or settings.max_frames < settings.min_frames:
        raise ValueError(f"video settings {settings}: need fps > 0 and 1 <= min_frames <= max_frames")
    spec = vision_spec(generation)
    meta = meta or probe_video(src)
    plan = video_plan(meta, generation, settings, patch_size=patch_size, merge_size=merge_size,
                      temporal_patch_size=temporal_patch_size)
    frames = decode_frames(src, plan.frame_indices)
    sizes = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)
    pv = video_codes(frames, plan, **sizes) if as_codes else video_pixels(frames, plan, **sizes, mean=spec.mean, std=spec.std)
    return VideoFeatures(torch.from_numpy(pv), plan.grid_thw, plan.second_per_grid, plan.frame_timestamps,
                         plan.frame_indices, meta.fps)
