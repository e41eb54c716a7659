"""Qwen-VL (v1) data side: fixed 448² preprocessing as the released torchvision transform, `<img>` + 256
`<imgpad>` + `</img>` and `<ref>`/`<box>` with the Qwen-VL token ids (checked against a tiktoken encoder
built with the released tokenizer's special-token list), ChatML loss mask, 1-D positions, and the
loader's samples from the synthetic shards (images, grounding) with the planner's cost."""

from __future__ import annotations

import numpy as np
import pytest
import tiktoken
import torch
from PIL import Image

from data_pipelines.positions import position_ids_for
from data_pipelines.schema import IGNORE_INDEX, DataConfig
from data_pipelines.stream import SampleBuilder, pack
from data_pipelines.text import QWEN_PAT_STR, QWEN_VL_SPECIAL_TOKENS, get_tokenizer
from data_pipelines.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess_image, preprocess_qwen_vl


def _torchvision_reference(img: Image.Image) -> torch.Tensor:
    """`convert("RGB")` → Resize((448, 448), BICUBIC) → ToTensor → Normalize, as torchvision computes it on PIL."""
    x = torch.from_numpy(np.array(img.convert("RGB").resize((448, 448), Image.BICUBIC), copy=True))
    x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    return x.sub(mean[:, None, None]).div(std[:, None, None])


@pytest.mark.parametrize("mode,size", [("RGB", (300, 17)), ("RGB", (448, 448)), ("L", (1, 1)), ("RGBA", (640, 480)), ("P", (97, 203))])
def test_preprocess_equals_the_released_transform(mode, size):
    rng = np.random.default_rng(sum(size))
    arr = rng.integers(0, 256, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB")
    img = img.convert(mode) if mode in ("L", "P") else img
    pv, grid = preprocess_qwen_vl(img)
    assert grid == (1, 32, 32) and pv.shape == (1024, 3 * 14 * 14) and pv.dtype == np.float32
    ref = _torchvision_reference(img)  # [3, 448, 448] → patch (i, j) = ref[:, 14i:14i+14, 14j:14j+14]
    assert np.array_equal(pv[5 * 32 + 7].reshape(3, 14, 14), ref[:, 70:84, 98:112].numpy())
    rows = ref.reshape(3, 32, 14, 32, 14).permute(1, 3, 0, 2, 4).reshape(1024, -1)
    assert np.array_equal(pv, rows.numpy())
    pv2, grid2 = preprocess_image(img, "qwen_vl")
    assert grid2 == grid and torch.equal(pv2, torch.from_numpy(pv))


def _qwen_vl_encoding() -> tiktoken.Encoding:
    """The released tokenizer's layout: <|endoftext|>, <|im_start|>, <|im_end|>, 205 extras, then the image tags."""
    tok = get_tokenizer()
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    names += ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"]
    specials = {n: 151643 + i for i, n in enumerate(names)}
    return tiktoken.Encoding("qwen_vl", pat_str=QWEN_PAT_STR, mergeable_ranks=tok.enc._mergeable_ranks, special_tokens=specials)


def test_special_token_ids_follow_the_released_list():
    enc = _qwen_vl_encoding()
    assert {n: enc.encode_single_token(n) for n in QWEN_VL_SPECIAL_TOKENS} == QWEN_VL_SPECIAL_TOKENS


def test_chatml_image_and_grounding_ids_labels_positions():
    tok = get_tokenizer()
    msgs = [
        {"role": "user", "content": [{"type": "image", "name": "img0.png"}, {"type": "text", "text": "Where is the red circle?"}]},
        {"role": "assistant", "content": [{"type": "box", "ref": "the red circle", "box": [100, 50, 300, 150]}]},
    ]
    sizes = {"img0.png": ((200, 400), (448, 448))}  # original (h, w) → fixed 448²
    ids, labels = tok.encode_conversation(msgs, [256], generation="qwen_vl", image_sizes=sizes)
    answer = "<ref>the red circle</ref><box>(250,250),(750,750)</box>"
    rendered = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<img>" + "<imgpad>" * 256
                + f"</img>Where is the red circle?<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n")
    assert ids == _qwen_vl_encoding().encode(rendered, allowed_special="all")
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == answer + "<|im_end|>"
    assert tok.count_text_tokens(msgs) + 256 >= len(ids)  # the index never under-counts
    pos = position_ids_for("qwen_vl", ids)
    assert pos.shape == (3, len(ids)) and torch.equal(pos[0], torch.arange(len(ids))) and torch.equal(pos[0], pos[2])


def test_loader_samples_from_the_synthetic_shards(data_root):
    from data_pipelines.inspect import iter_tar_samples

    cfg = DataConfig(generation="qwen_vl", patch_size=14, temporal_patch_size=1, merge_size=1, min_pixels=200704,
                     max_pixels=200704, max_tokens=1024)
    builder = SampleBuilder(cfg, get_tokenizer())
    shard = sorted((data_root / "synth").glob("*.tar"))[0]
    built, boxes = [], 0
    for _, members in iter_tar_samples(str(shard)):
        s = builder.build(members)
        n_img = len(s["grids"])
        assert s["grids"] == [(1, 32, 32)] * n_img and s["visual_tokens"] == 256 * n_img
        assert s["input_ids"].count(QWEN_VL_SPECIAL_TOKENS["<imgpad>"]) == 256 * n_img
        assert s["input_ids"].count(QWEN_VL_SPECIAL_TOKENS["<img>"]) == n_img
        boxes += s["input_ids"].count(QWEN_VL_SPECIAL_TOKENS["<box>"])
        built.append(s)
        if len(built) == 40:
            break
    assert boxes > 0  # grounding samples render <ref>…</ref><box>…</box>
    with_images = [s for s in built if s["grids"]][:3]
    b = pack(cfg, with_images)
    assert b.pixel_values.shape == (1024 * sum(len(s["grids"]) for s in with_images), 588)
    assert b.num_visual_tokens == int((b.input_ids == QWEN_VL_SPECIAL_TOKENS["<imgpad>"]).sum())
