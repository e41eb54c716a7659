"""3-D M-RoPE position ids of one sample, as Qwen2-VL computes them (`get_rope_index`).

Text tokens get t = h = w = a running index. The LLM tokens of an image (after the merge, a grid of
t x (h/merge) x (w/merge)) get `st + (t_idx, h_idx, w_idx)`, where `st` is the position the first
image token would have had as text; the text after the image continues at `max(all ids so far) + 1`.
The `<|vision_start|>` and `<|vision_end|>` markers are ordinary text positions.

This matches `transformers.Qwen2VLModel.get_rope_index` (4.57.x) for one unpadded sample; in a packed
micro-batch each sample's ids restart at 0 (see PackedBatch). Videos (`<|video_pad|>`) are handled
identically with their own grids. Qwen2.5-VL (`video_second_per_grid`): a video's temporal ids are
absolute time, `t_idx * second_per_grid * tokens_per_second`, as `Qwen2_5_VLModel.get_rope_index`
computes them — including its cast of `second_per_grid` to an integer (int64) before the product
(transformers 4.57.6: 0.5 s per grid gives 0, 1.0 gives 1, 1.5 gives 1), so positions equal the
reference. Qwen3-VL: `qwen3_vl_position_ids` (images as Qwen2-VL; a video's grid split into one grid
per frame).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data_pipelines.text import IMAGE_PAD_ID, VIDEO_PAD_ID


def mrope_position_ids(
    input_ids: Sequence[int] | torch.Tensor,
    image_grid_thw: Sequence[Sequence[int]] | torch.Tensor = (),
    video_grid_thw: Sequence[Sequence[int]] | torch.Tensor = (),
    merge_size: int = 2,
    image_token_id: int = IMAGE_PAD_ID,
    video_token_id: int = VIDEO_PAD_ID,
    video_second_per_grid: Sequence[float] | None = None,
    tokens_per_second: int = 2,
) -> torch.Tensor:
    """Position ids [3, n] (int64) for one sample.

    Grids are in patches (as `grid_thw` in PackedBatch); each run of pad tokens must hold exactly
    t*h*w/merge^2 tokens of the next image (or video) in order — a mismatch raises ValueError.
    `video_second_per_grid` (one per video; Qwen2.5-VL) turns video temporal ids into absolute time
    (module docstring); None keeps Qwen2-VL's `t_idx`.
    """
    ids = np.asarray(input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
    n = ids.shape[0]
    grids = {
        image_token_id: [tuple(int(v) for v in g) for g in _rows(image_grid_thw)],
        video_token_id: [tuple(int(v) for v in g) for g in _rows(video_grid_thw)],
    }
    used = {image_token_id: 0, video_token_id: 0}
    out = np.empty((3, n), dtype=np.int64)
    is_media = (ids == image_token_id) | (ids == video_token_id)
    media_pos = np.flatnonzero(is_media)

    pos = 0  # next index into ids
    next_id = 0  # position id the next text token gets
    k = 0  # index into media_pos
    while pos < n:
        if k >= len(media_pos):  # trailing text
            out[:, pos:] = np.arange(next_id, next_id + n - pos)
            break
        ed = int(media_pos[k])
        text_len = ed - pos
        out[:, pos:ed] = np.arange(next_id, next_id + text_len)
        st = next_id + text_len
        tok = int(ids[ed])
        if used[tok] >= len(grids[tok]):
            raise ValueError("more media token runs than grids")
        t, h, w = grids[tok][used[tok]]
        used[tok] += 1
        lh, lw = h // merge_size, w // merge_size
        cnt = t * lh * lw
        if ed + cnt > n or not np.all(ids[ed : ed + cnt] == tok):
            raise ValueError(f"media run at {ed} shorter than its grid needs ({cnt} tokens)")
        t_ids = np.arange(t)
        if tok == video_token_id and video_second_per_grid is not None:
            t_ids = t_ids * int(video_second_per_grid[used[tok] - 1]) * tokens_per_second
        tt, hh, ww = np.meshgrid(t_ids, np.arange(lh), np.arange(lw), indexing="ij")
        out[0, ed : ed + cnt] = tt.reshape(-1) + st
        out[1, ed : ed + cnt] = hh.reshape(-1) + st
        out[2, ed : ed + cnt] = ww.reshape(-1) + st
        next_id = int(out[:, ed : ed + cnt].max()) + 1
        pos = ed + cnt
        k += int(np.searchsorted(media_pos[k:], pos))  # skip the pads just consumed
    if used[image_token_id] != len(grids[image_token_id]) or used[video_token_id] != len(grids[video_token_id]):
        raise ValueError("fewer media token runs than grids")
    return torch.from_numpy(out)


def qwen3_vl_position_ids(
    input_ids: Sequence[int] | torch.Tensor,
    image_grid_thw: Sequence[Sequence[int]] | torch.Tensor = (),
    video_grid_thw: Sequence[Sequence[int]] | torch.Tensor = (),
    merge_size: int = 2,
    image_token_id: int = IMAGE_PAD_ID,
    video_token_id: int = VIDEO_PAD_ID,
) -> torch.Tensor:
    """Position ids [3, n] for one Qwen3-VL sample (`Qwen3VLModel.get_rope_index`, transformers 4.57).

    Images (and text) get exactly Qwen2-VL's ids. A video of grid (t, h, w) is written as t
    frames, each its own `<|vision_start|>` + h·w/merge² pads + `<|vision_end|>` run preceded by a
    text timestamp (`<0.5 seconds>`), so HF splits its grid into t grids of (1, h, w): every frame
    starts at temporal id `st` and the timestamp text between frames advances the ids. Here the
    same split is made and `mrope_position_ids` does the rest. (The interleaving of t/h/w over the
    rotary channels is the model's business: `mrope_interleaved`.)
    """
    frames = [(1, int(h), int(w)) for t, h, w in _rows(video_grid_thw) for _ in range(int(t))]
    return mrope_position_ids(input_ids, image_grid_thw, frames, merge_size, image_token_id, video_token_id)


def sequential_position_ids(input_ids) -> torch.Tensor:
    """1-D RoPE (Qwen-VL): every token, image pads included, gets its index, in all three rows."""
    return torch.arange(len(input_ids), dtype=torch.int64).expand(3, -1).contiguous()


def position_ids_for(
    generation: str, input_ids, image_grid_thw=(), video_grid_thw=(), merge_size: int = 2,
    video_second_per_grid: Sequence[float] | None = None, tokens_per_second: int = 2,
) -> torch.Tensor:
    """Position ids [3, n] of one sample for `generation` (its `DataSpec.positions`).

    `video_second_per_grid` (one per video) is used by Qwen2.5-VL only (absolute-time M-RoPE)."""
    from data_pipelines import generations

    return generations.get(generation).positions(
        input_ids, image_grid_thw, video_grid_thw, merge_size, video_second_per_grid, tokens_per_second
    )


def _rows(grid: Sequence[Sequence[int]] | torch.Tensor) -> list:
    if isinstance(grid, torch.Tensor):
        return grid.tolist()
    return list(grid)
