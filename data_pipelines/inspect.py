"""Print shard samples exactly as the model will see them.

    python -m data_pipelines.inspect SHARD_DIR_OR_TAR [--generation G] [--n 5] [--min-pixels A --max-pixels B]

For each of the first N samples: its id, shard and key; the rendered token sequence decoded with its
special tokens, where every run of visual pad tokens is collapsed to ``<|image_pad|>×N``; the tokens
that carry loss wrapped in ``⟦…⟧`` (before the next-token shift: ``⟦red<|im_end|>⟧`` means the model is
trained to produce "red" and then stop); each image's source size, resized size, patch grid (t, h, w)
and LLM token count (each video's frame count, fps, size and sampled frames too); and the cost
estimate the packer uses (text tokens + visual tokens, from the index) next to the real count.

It uses the same code as training (`stream.SampleBuilder`) with the generation's own patch, merge and
temporal sizes and pixel bounds (its `DataSpec`, the values its model configs train with), so what it
prints is what a run packs; pass ``--min-pixels`` / ``--max-pixels`` when the run caps pixels
(``data.min_pixels`` / ``data.max_pixels``, e.g. the tiny experiments' 50176).
`tests/unit/test_data_inspect.py` checks the numbers against the loader for every generation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
from typing import Any, Iterator, Optional

from data_pipelines import generations
from data_pipelines.packing import entry_video_plans
from data_pipelines.schema import IGNORE_INDEX, DataConfig
from data_pipelines.shards import INDEX_NAME, read_index, text_tokens
from data_pipelines.stream import SampleBuilder, SkipSample
from data_pipelines.text import IMAGE_PAD_ID, QWEN_VL_SPECIAL_TOKENS, VIDEO_PAD_ID, get_tokenizer
from data_pipelines.video import BadVideo
from data_pipelines.vision import planned_image_tokens

LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of a shard in file order; members grouped by the key before the first dot."""
    key, members = None, {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = os.path.basename(info.name)
            k, _, ext = base.partition(".")
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[ext.lower()] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


_PADS = (IMAGE_PAD_ID, VIDEO_PAD_ID, QWEN_VL_SPECIAL_TOKENS["<imgpad>"])
_PAD_NAMES = ("<|image_pad|>", "<|video_pad|>", "<imgpad>")


def render_tokens(ids: list[int], labels: list[int], tok=None) -> str:
    """Decode ids with special tokens (`tok`: the tokenizer that made them, default the bundled one);
    collapse pad runs; wrap loss-carrying spans in ⟦…⟧."""
    tok = tok or get_tokenizer()
    pads = _PADS if tok is get_tokenizer() else {tok.special_tokens[t] for t in _PAD_NAMES if t in tok.special_tokens}
    out: list[str] = []
    i, n = 0, len(ids)
    while i < n:
        trained = labels[i] != IGNORE_INDEX
        j = i
        if ids[i] in pads:
            while j < n and ids[j] == ids[i]:
                j += 1
            text = f"{tok.decode([ids[i]])}×{j - i}"
        else:
            while j < n and ids[j] not in pads and (labels[j] != IGNORE_INDEX) == trained:
                j += 1
            text = tok.decode(ids[i:j])
        out.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if trained else text)
        i = j
    return "".join(out)


def describe_sample(builder: SampleBuilder, members: dict[str, bytes], entry: Optional[dict[str, Any]],
                    where: str) -> str:
    cfg = builder.cfg
    try:
        s = builder.build(members)
    except SkipSample as e:
        return f"── {where}: SKIPPED by the loader ({e})"
    ids, labels = s["input_ids"], s["labels"]
    merge2 = cfg.merge_size * cfg.merge_size
    lines = [f"── sample {s['id']}  ({where})"]
    n_label = sum(1 for l in labels if l != IGNORE_INDEX)
    lines.append(
        f"   tokens {len(ids)} = text {len(ids) - s['visual_tokens']} + visual {s['visual_tokens']}; "
        f"loss on {n_label} tokens"
    )
    kinds = s.get("kinds", [0] * len(s["grids"]))
    image_sizes = iter(entry["images"] if entry else [])
    video_rows = iter(entry.get("videos", []) if entry else [])
    n_img = n_vid = 0
    for grid, kind in zip(s["grids"], kinds):
        t, gh, gw = grid
        size = f"{gw * cfg.patch_size}x{gh * cfg.patch_size} px"
        if kind == 0:
            hw = next(image_sizes, None)
            src = f"{hw[1]}x{hw[0]} px (w x h) → {size}, " if hw else ""
            label, n_img = f"image {n_img}", n_img + 1
        else:
            row = next(video_rows, None)
            src = (f"{row[0]} frames at {row[1]:g} fps, {row[3]}x{row[2]} px (w x h) → {t * cfg.temporal_patch_size} "
                   f"frames of {size}, " if row else "")
            label, n_vid = f"video {n_vid}", n_vid + 1
        lines.append(f"   {label}: {src}grid (t,h,w)=({t},{gh},{gw}) patches, {t * gh * gw} ViT patches, "
                     f"{generations.get(cfg.generation).fixed_image_tokens or t * gh * gw // merge2} LLM tokens")
    if entry is not None:
        n_text = text_tokens(entry, cfg.generation)
        planned = n_text + sum(
            planned_image_tokens(cfg.generation, h, w, patch_size=cfg.patch_size, merge_size=cfg.merge_size,
                              min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels) for h, w in entry["images"])
        try:
            planned += sum(p.token_count(cfg.merge_size) + p.extra_text_tokens(cfg.generation)
                           for p in entry_video_plans(cfg, entry))
        except BadVideo as e:
            lines.append(f"   the planner skips this sample: {e}")
        lines.append(f"   cost estimate (index): {planned} tokens (text {n_text}); built: {len(ids)}")
    lines.append("   " + render_tokens(ids, labels, builder.tok).replace("\n", "\n   "))
    return "\n".join(lines)


def _index(directory: str) -> dict[str, Any]:
    """The validated index of a shard directory (shard names checked as training checks them)."""
    try:
        return read_index(directory)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def inspect(path: str, generation: str = "qwen2_vl", n: int = 5, min_pixels: Optional[int] = None,
            max_pixels: Optional[int] = None, tokenizer: Optional[str] = None) -> str:
    """The text `python -m data_pipelines.inspect` prints (`tokenizer`: a `data.tokenizer` directory)."""
    try:
        image = generations.get(generation).image
    except ValueError as e:
        raise SystemExit(f"error: --generation: {e}") from None
    kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    # exactly what training sees: the generation's patch, merge and temporal sizes and pixel bounds
    kw = {"min_pixels": image.min_pixels, "max_pixels": image.max_pixels, **kw, "patch_size": image.patch_size,
          "temporal_patch_size": image.temporal_patch_size, "merge_size": image.merge_size}
    cfg = DataConfig(generation=generation, tokenizer=tokenizer, **kw)
    try:
        builder = SampleBuilder(cfg, get_tokenizer(tokenizer, generation))
    except ValueError as e:
        raise SystemExit(f"error: --tokenizer: {e}") from None
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, INDEX_NAME)):
            raise SystemExit(f"error: {path} has no {INDEX_NAME}; pass a shard directory or one .tar shard")
        index = _index(path)
        tars = [(os.path.join(path, sh["name"]), {s["key"]: s for s in sh["samples"]}) for sh in index["shards"]]
    elif os.path.isfile(path) and path.endswith(".tar"):
        entries: dict[str, Any] = {}
        idx_path = os.path.join(os.path.dirname(path) or ".", INDEX_NAME)
        if os.path.isfile(idx_path):
            for sh in _index(os.path.dirname(path) or ".")["shards"]:
                if sh["name"] == os.path.basename(path):
                    entries = {s["key"]: s for s in sh["samples"]}
        tars = [(path, entries)]
    else:
        raise SystemExit(f"error: {path} is neither a shard directory nor a .tar shard")
    header = (f"{path}: generation {generation}, pixels {cfg.min_pixels}..{cfg.max_pixels}, patch {cfg.patch_size}, "
              f"merge {cfg.merge_size}; {LOSS_OPEN}…{LOSS_CLOSE} = tokens with loss")
    out = [header]
    shown = 0
    for tar_path, entries in tars:
        try:
            for key, members in iter_tar_samples(tar_path):
                if shown >= n:
                    break
                where = f"{os.path.basename(tar_path)} key {key}"
                out.append(describe_sample(builder, members, entries.get(key), where))
                shown += 1
        except (tarfile.TarError, OSError) as e:
            out.append(f"── {tar_path}: unreadable after {shown} samples ({type(e).__name__}: {e})")
        if shown >= n:
            break
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipelines.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="a shard directory (with index.json) or one .tar shard")
    ap.add_argument("--generation", default="qwen2_vl", help=f"one of {', '.join(generations.NAMES)}")
    ap.add_argument("--n", type=int, default=5, help="samples to show")
    ap.add_argument("--min-pixels", type=int, default=None)
    ap.add_argument("--max-pixels", type=int, default=None)
    ap.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (data.tokenizer of the run); "
                    "default: the bundled Qwen BPE")
    args = ap.parse_args(argv)
    text = inspect(args.path, args.generation, args.n, args.min_pixels, args.max_pixels, args.tokenizer)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
