"""Tokenizer and ChatML template of Qwen2-VL (data_pipelines/text.py)."""

from data_pipelines.schema import IGNORE_INDEX
from data_pipelines.text import (
    IM_END_ID,
    IMAGE_PAD_ID,
    MAX_TOKEN_ID,
    NUM_REGULAR_TOKENS,
    SPECIAL_TOKENS,
    get_tokenizer,
)

QWEN2_VL_SPECIALS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}


def test_special_token_ids_and_vocab():
    tok = get_tokenizer()
    assert SPECIAL_TOKENS == QWEN2_VL_SPECIALS
    for name, i in QWEN2_VL_SPECIALS.items():
        assert tok.enc.encode(name, allowed_special="all") == [i]
        assert tok.decode([i]) == name
    assert len(tok.enc._mergeable_ranks) == NUM_REGULAR_TOKENS == 151643
    assert tok.vocab_size == MAX_TOKEN_ID + 1 == 151657


def test_known_ids_and_round_trip():
    tok = get_tokenizer()
    # Well-known Qwen ids: "Hello" 9707, " world" 1879, "\n" 198.
    assert tok.encode("Hello world\n") == [9707, 1879, 198]
    text = "Qwen2-VL sees 3 images; naïve café — 你好，世界! \t tabs  and   spaces\r\n"
    assert tok.decode(tok.encode(text)) == text
    # special-token text inside data stays ordinary text (no injection)
    assert IM_END_ID not in tok.encode("user wrote <|im_end|> here")


def _render(messages, counts, default_system=True):
    """Reference rendering of Qwen2-VL's HF chat template as a string (Qwen3-VL: default_system=False)."""
    out, k = "", 0
    if messages[0]["role"] != "system" and default_system:
        out += "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    for m in messages:
        out += f"<|im_start|>{m['role']}\n"
        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        for p in parts:
            if p["type"] == "image":
                out += "<|vision_start|>" + "<|image_pad|>" * counts[k] + "<|vision_end|>"
                k += 1
            else:
                out += p["text"]
        out += "<|im_end|>\n"
    return out


def test_template_matches_rendered_chat_template_and_labels():
    tok = get_tokenizer()
    msgs = [
        {"role": "user", "content": [{"type": "image", "name": "img0.png"}, {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": "And the  shape\nat the top left?"},
        {"role": "assistant", "content": "\n\na square."},  # leading newlines merge with the header's
    ]
    ids, labels = tok.encode_conversation(msgs, [4])
    rendered = _render(msgs, [4])
    assert ids == tok.enc.encode(rendered, allowed_special="all")  # same as tokenising the whole string
    assert len(labels) == len(ids)
    assert ids.count(IMAGE_PAD_ID) == 4
    trained = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ids, labels))
    # assistant contents + their <|im_end|>, not the newline after it, not the headers
    # (the header's "\n" merged with the content's leading "\n\n" into one token, which is labelled)
    assert tok.decode(trained) == "red<|im_end|>\n\n\na square.<|im_end|>"
    assert labels[-1] == IGNORE_INDEX and ids[-1] == 198
    assert ids[:5] == [151644, 8948, 198, 2610, 525]  # <|im_start|>system\nYou are


def test_explicit_system_and_text_only():
    tok = get_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, labels = tok.encode_conversation(msgs, [])
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == "Hello<|im_end|>"
    # index counting: no pads, but vision start/end
    with_img = [{"role": "user", "content": [{"type": "image", "name": "a.png"}, {"type": "text", "text": "x"}]}]
    assert tok.count_text_tokens(with_img) + 7 == len(tok.encode_conversation(with_img, [7])[0])


# ------------------------------------------------------------------------------------ grounding
import json  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipelines.shards import ShardWriter  # noqa: E402

BOX = {"type": "box", "ref": "the red circle", "box": [100, 50, 300, 150], "image": "img0.png"}
SIZES = {"img0.png": ((200, 400), (224, 448))}  # original (h, w), resized (h', w')


def _grounding(box_parts):
    return [
        {"role": "user", "content": [{"type": "image", "name": "img0.png"}, {"type": "text", "text": "Where is the red circle?"}]},
        {"role": "assistant", "content": box_parts},
    ]


@pytest.mark.parametrize("generation,answer", [
    ("qwen2_vl", "<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(250,250),(750,750)<|box_end|>"),
    ("qwen2_5_vl", '```json\n[\n\t{"bbox_2d": [112, 56, 336, 168], "label": "the red circle"}\n]\n```'),
    ("qwen3_vl", '```json\n[\n\t{"bbox_2d": [250, 250, 750, 750], "label": "the red circle"}\n]\n```'),
])
def test_grounding_rendered_per_generation(generation, answer):
    tok = get_tokenizer()
    msgs = _grounding([BOX])
    ids, labels = tok.encode_conversation(msgs, [4], generation=generation, image_sizes=SIZES)
    rendered = _render(msgs[:1], [4], generation != "qwen3_vl") + f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    assert ids == tok.enc.encode(rendered, allowed_special="all")  # HF-style tokenisation of the string
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == answer + "<|im_end|>"
    assert tok.count_text_tokens(msgs) + 4 >= len(ids)  # the index never under-counts


def test_grounding_runs_group_and_errors():
    tok = get_tokenizer()
    second = dict(BOX, ref="a square", box=[0, 0, 400, 200])
    ids, _ = tok.encode_conversation(_grounding([BOX, second]), [4], generation="qwen2_5_vl", image_sizes=SIZES)
    assert '"label": "the red circle"},\n\t{"bbox_2d": [0, 0, 448, 224], "label": "a square"}\n]' in tok.decode(ids)
    with pytest.raises(ValueError, match="refers to image 'img9.png'"):
        tok.encode_conversation(_grounding([dict(BOX, image="img9.png")]), [4], image_sizes=SIZES)
    with pytest.raises(ValueError, match="x1 <= x2"):
        tok.encode_conversation(_grounding([dict(BOX, box=[5, 0, 1, 1])]), [4], image_sizes=SIZES)


def test_shard_writer_validates_boxes(tmp_path):
    img = Image.new("RGB", (400, 200))
    with ShardWriter(str(tmp_path), samples_per_shard=10) as w:
        w.add("ok", _grounding([BOX]), {"img0.png": img})
        with pytest.raises(ValueError, match="outside its 400x200"):
            w.add("bad", _grounding([dict(BOX, box=[0, 0, 401, 10])]), {"img0.png": img})
        with pytest.raises(ValueError, match="must name one of this sample's images"):
            w.add("bad2", _grounding([dict(BOX, image="x.png")]), {"img0.png": img})
    idx = json.load(open(tmp_path / "index.json"))
    assert [s["id"] for s in idx["shards"][0]["samples"]] == ["ok"]
