"""Synthetic vision-language samples whose answers are known by construction.

Every sample is a function of `(seed, index)` only (its own `random.Random`), so a data set is
reproducible byte for byte and any sample can be regenerated alone. Kinds:

* `shapes`  — 1–3 coloured circles/squares/triangles in distinct quadrants of a plain background;
              "What colour is the circle?" / "What shape is at the top left?" (one or two turns).
* `text`    — a word drawn with Pillow's default font; "What word is written in the image?".
* `chart`   — a bar chart with labelled bars; "Which bar is tallest?".
* `two_images` — two shape images; "Which picture shows a <shape>, the first or the second?".
* `grounding`  — a quarter of the `shapes` samples: "Where is the red circle?" answered with one
                 canonical box part (pixel coordinates, rendered per generation by text.py).
* `text_only`  — arithmetic or spelling with no image (keeps text-only packing exercised).
* thinking     — a fifth of the `chart` and arithmetic `text_only` samples (~5% of all) carry a short
                 chain of thought in the assistant turn's `reasoning` ("Bar heights: A 4, B 9, C 2.
                 The tallest is B."), rendered as a `<think>` block by text.py. Decided by its own
                 random stream, so every other sample is byte-identical with or without it.
* `video`      — opt-in (`video_fraction`, default 0): a shape moving across 6–12 frames at 4 fps,
                 stored as lossless H.264 MP4; "Which way does the red circle move?". The choice uses
                 its own random stream, so the other samples are the same with or without videos.

Image sides are drawn independently from [min_side, max_side], so aspect ratios vary and the
dynamic-resolution path (different grids per image) is exercised. Images are stored as PNG
(compress_level=1: fast to write, lossless so answers stay readable).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.shards import ShardWriter
from data_pipelines.video import encode_video

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "black": (15, 15, 15),
}
BACKGROUNDS = [(255, 255, 255), (235, 235, 235), (250, 245, 225), (220, 235, 250)]
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
WORDS = (
    "cat dog sun tree house river apple train light stone cloud music paper green seven water "
    "bird moon road book fish door star rain snow hill lamp ship"
).split()
KIND_WEIGHTS = {"shapes": 0.35, "text": 0.2, "chart": 0.2, "two_images": 0.1, "text_only": 0.15}
THINKING_FRACTION = 0.2
"""Fraction of the chart and arithmetic samples whose answer comes with `reasoning`."""

_FONTS: dict[int, Any] = {}


def _font(size: int):
    """Pillow's built-in font at `size` (Pillow >= 10.1 ships a scalable FreeType default)."""
    size = max(8, int(size))
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def _canvas(rng: random.Random, min_side: int, max_side: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    img = Image.new("RGB", (w, h), rng.choice(BACKGROUNDS))
    return img, ImageDraw.Draw(img)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _shapes_image(rng: random.Random, min_side: int, max_side: int, n: int, boxes: list | None = None):
    """Image with n shapes in distinct quadrants → (image, [(shape, colour, quadrant)]); the shapes'
    pixel boxes [x1, y1, x2, y2] are appended to `boxes` when given."""
    img, draw = _canvas(rng, min_side, max_side)
    w, h = img.size
    objs = []
    for quad, shape, colour in zip(
        rng.sample(QUADRANTS, n), rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)
    ):
        qx = 0 if "left" in quad else w // 2
        qy = 0 if "top" in quad else h // 2
        side = max(6, int(min(w, h) / 2 * rng.uniform(0.5, 0.8)))
        x0 = qx + rng.randint(1, max(1, w // 2 - side - 1))
        y0 = qy + rng.randint(1, max(1, h // 2 - side - 1))
        _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
        if boxes is not None:
            boxes.append([x0, y0, min(w, x0 + side), min(h, y0 + side)])
        objs.append((shape, colour, quad))
    return img, objs


def _user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def _assistant(text: str, reasoning: str | None = None) -> dict:
    turn = {"role": "assistant", "content": [{"type": "text", "text": text}]}
    if reasoning is not None:
        turn["reasoning"] = reasoning
    return turn


def _text(s: str) -> dict:
    return {"type": "text", "text": s}


def _image(name: str) -> dict:
    return {"type": "image", "name": name}


def _video_sample(rng: random.Random, min_side: int, max_side: int) -> tuple[list, dict]:
    """A shape moving in one direction → (messages, {"vid0.mp4": MP4 bytes})."""
    lo = max(32, min_side)  # Qwen3-VL needs video frames of at least 32 px a side
    w, h = rng.randint(lo, max(lo, max_side)), rng.randint(lo, max(lo, max_side))
    n, shape, colour = rng.randint(6, 12), rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != "black"])
    direction = rng.choice(("to the right", "to the left", "down", "up"))
    bg = rng.choice(BACKGROUNDS)
    size = max(6, min(w, h) // 4)
    frames = []
    for k in range(n):
        img = Image.new("RGB", (w, h), bg)
        f = k / (n - 1)
        along = {"to the right": f, "to the left": 1 - f, "down": f, "up": 1 - f}[direction]
        if direction in ("to the right", "to the left"):
            x, y = int(along * (w - size)), (h - size) // 2
        else:
            x, y = (w - size) // 2, int(along * (h - size))
        _draw_shape(ImageDraw.Draw(img), shape, (x, y, x + size, y + size), COLOURS[colour])
        frames.append(np.asarray(img))
    messages = [_user({"type": "video", "name": "vid0.mp4"}, _text(f"Which way does the {colour} {shape} move?")),
                _assistant(direction)]
    return messages, {"vid0.mp4": encode_video(np.stack(frames), fps=4)}


def make_sample(
    seed: int, index: int, min_side: int = 56, max_side: int = 224, video_fraction: float = 0.0,
) -> tuple[str, list, dict]:
    """Sample `index` of the data set with `seed` → (kind, messages, {name: PIL image | video bytes})."""
    vrng = random.Random(f"qvl-synth-video:{seed}:{index}")
    if video_fraction > 0 and vrng.random() < video_fraction:
        messages, media = _video_sample(vrng, min_side, max_side)
        return "video", messages, media
    rng = random.Random(f"qvl-synth:{seed}:{index}")
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    images: dict[str, Image.Image] = {}
    messages: list[dict] = []
    if rng.random() < 0.1:
        messages.append({"role": "system", "content": [_text("You answer questions about images briefly.")]})

    # A quarter of the shapes samples ask for a box instead ("Where is the red circle?"); the choice
    # uses its own stream so every other sample is unchanged by its existence.
    grounding = kind == "shapes" and random.Random(f"qvl-synth-ground:{seed}:{index}").random() < 0.25
    thinking = random.Random(f"qvl-synth-think:{seed}:{index}").random() < THINKING_FRACTION
    if grounding:
        boxes: list = []
        img, objs = _shapes_image(rng, min_side, max_side, rng.randint(1, 3), boxes)
        images["img0.png"] = img
        k = rng.randrange(len(objs))
        shape, colour, _ = objs[k]
        ref = f"the {colour} {shape}"
        messages.append(_user(_image("img0.png"), _text(f"Where is {ref}?")))
        messages.append({"role": "assistant", "content": [
            {"type": "box", "ref": ref, "box": boxes[k], "image": "img0.png"}]})
        kind = "grounding"
    elif kind == "shapes":
        img, objs = _shapes_image(rng, min_side, max_side, rng.randint(1, 3))
        images["img0.png"] = img
        qa = []
        for shape, colour, quad in objs:
            qa.append((f"What colour is the {shape}?", colour))
            qa.append((f"What shape is at the {quad}?", shape))
        rng.shuffle(qa)
        turns = qa[: rng.randint(1, 2)]
        img_first = rng.random() < 0.8
        q0 = _text(turns[0][0])
        messages.append(_user(_image("img0.png"), q0) if img_first else _user(q0, _image("img0.png")))
        messages.append(_assistant(turns[0][1]))
        for q, a in turns[1:]:
            messages += [_user(_text(q)), _assistant(a)]
    elif kind == "text":
        img, draw = _canvas(rng, min_side, max_side)
        word = rng.choice(WORDS)
        w, h = img.size
        font = _font(min(h * 0.5, w / (0.65 * len(word))))
        l, t, r, b = draw.textbbox((0, 0), word, font=font)
        draw.text(((w - (r - l)) // 2 - l, (h - (b - t)) // 2 - t), word, fill=COLOURS[rng.choice(["black", "blue", "red"])], font=font)
        images["img0.png"] = img
        messages += [_user(_image("img0.png"), _text("What word is written in the image?")), _assistant(word)]
    elif kind == "chart":
        img, draw = _canvas(rng, min_side, max_side)
        w, h = img.size
        n = rng.randint(3, 5)
        labels = [chr(ord("A") + i) for i in range(n)]
        values = rng.sample(range(2, 11), n)  # distinct → a unique tallest bar
        font = _font(max(8, h // 10))
        base, top = h - max(10, h // 8), max(2, h // 20)
        slot = w / n
        for i, (lab, v) in enumerate(zip(labels, values)):
            x0 = int(i * slot + slot * 0.2)
            x1 = int((i + 1) * slot - slot * 0.2)
            y0 = int(base - (base - top) * v / 10)
            draw.rectangle((x0, y0, max(x0 + 1, x1), base), fill=COLOURS["blue"])
            draw.text((x0, base + 1), lab, fill=(0, 0, 0), font=font)
        images["img0.png"] = img
        tallest = labels[values.index(max(values))]
        why = f"Bar heights: {', '.join(f'{l} {v}' for l, v in zip(labels, values))}. The tallest is {tallest}."
        messages += [
            _user(_image("img0.png"), _text("Which bar is tallest?")), _assistant(tallest, why if thinking else None),
        ]
    elif kind == "two_images":
        shape = rng.choice(SHAPES)
        first_has = rng.random() < 0.5
        for name, has in (("img0.png", first_has), ("img1.png", not first_has)):
            while True:  # redraw until the shape is present exactly where it should be
                img, objs = _shapes_image(rng, min_side, max_side, rng.randint(1, 2))
                if (shape in [o[0] for o in objs]) == has:
                    break
            images[name] = img
        messages += [
            _user(
                _text("Picture 1: "), _image("img0.png"), _text("Picture 2: "), _image("img1.png"),
                _text(f"Which picture shows a {shape}, the first or the second?"),
            ),
            _assistant("the first" if first_has else "the second"),
        ]
    else:  # text_only
        if rng.random() < 0.5:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            why = f"{a} + {b}: {a} plus {b // 10 * 10} is {a + b // 10 * 10}, plus {b % 10} is {a + b}."
            messages += [_user(_text(f"What is {a} + {b}?")), _assistant(str(a + b), why if thinking else None)]
        else:
            word = rng.choice(WORDS)
            messages += [_user(_text(f"Spell '{word}' backwards.")), _assistant(word[::-1])]
    return kind, messages, images


def generate(
    out_dir: str, num_samples: int, *, seed: int = 0, samples_per_shard: int = 500, min_side: int = 56,
    max_side: int = 224, video_fraction: float = 0.0,
) -> dict[str, Any]:
    """Write `num_samples` synthetic samples as shards + index.json into `out_dir`; returns a summary."""
    if not 1 <= min_side <= max_side:
        raise ValueError("need 1 <= min_side <= max_side")
    if not 0.0 <= video_fraction <= 1.0:
        raise ValueError(f"video_fraction={video_fraction} must be within [0, 1]")
    kinds: Counter = Counter()
    n_images = n_thinking = 0
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard) as writer:
        for i in range(num_samples):
            kind, messages, media = make_sample(seed, i, min_side, max_side, video_fraction)
            videos = {k: v for k, v in media.items() if isinstance(v, bytes)}
            images = {k: v for k, v in media.items() if k not in videos}
            writer.add(f"synth-{seed}-{i:07d}", messages, images, videos)
            kinds[kind] += 1
            n_images += len(images)
            n_thinking += any("reasoning" in m for m in messages)
    return {"samples": num_samples, "images": n_images, "shards": writer.shard_names, "kinds": dict(kinds),
            "thinking": n_thinking}
