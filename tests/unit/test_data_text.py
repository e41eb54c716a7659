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


def _render(messages, counts):
    """Reference rendering of Qwen2-VL's HF chat template as a string."""
    out, k = "", 0
    if messages[0]["role"] != "system":
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
    assert tok.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == "Hello<|im_end|>"
    # index counting: no pads, but vision start/end
    with_img = [{"role": "user", "content": [{"type": "image", "name": "a.png"}, {"type": "text", "text": "x"}]}]
    assert tok.count_text_tokens(with_img) + 7 == len(tok.encode_conversation(with_img, [7])[0])
