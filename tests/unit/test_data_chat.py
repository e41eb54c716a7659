"""Conversation rendering per generation and thinking samples (data_pipelines/text.py).

The expected strings are written out literally: they are what the released chat templates of
Qwen2-VL-7B-Instruct, Qwen2.5-VL-7B-Instruct, Qwen3-VL-8B-Instruct and Qwen3-VL-8B-Thinking render
for these conversations (image placeholders expanded to the image's pad tokens, as the HF processors
do), so any change in rendering fails here.
"""

import functools

import pytest
import tiktoken

from data_pipelines.schema import IGNORE_INDEX
from data_pipelines.text import (
    QWEN3_SPECIAL_TOKENS,
    QWEN_PAT_STR,
    SPECIAL_TOKENS,
    THINK_END_ID,
    THINK_START_ID,
    get_tokenizer,
    think_blocks,
)

PADS = "<|image_pad|><|image_pad|>"  # 2 LLM tokens per image in these tests

CHAT = [
    {"role": "system", "content": "You read charts."},
    {"role": "user", "content": [{"type": "image", "name": "img0.png"}, {"type": "text", "text": "Which bar is tallest?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "B"}]},
    {"role": "user", "content": "And the shortest?"},
    {"role": "assistant", "content": "C"},
]
CHAT_NO_SYSTEM = CHAT[1:]

RENDERED = {
    # Qwen2-VL and Qwen2.5-VL share one template: it adds the default system turn.
    ("qwen2_vl", "system"): (
        "<|im_start|>system\nYou read charts.<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{PADS}<|vision_end|>Which bar is tallest?<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>user\nAnd the shortest?<|im_end|>\n"
        "<|im_start|>assistant\nC<|im_end|>\n"
    ),
    ("qwen2_vl", "no_system"): (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{PADS}<|vision_end|>Which bar is tallest?<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>user\nAnd the shortest?<|im_end|>\n"
        "<|im_start|>assistant\nC<|im_end|>\n"
    ),
    # Qwen3-VL: no default system turn.
    ("qwen3_vl", "system"): (
        "<|im_start|>system\nYou read charts.<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{PADS}<|vision_end|>Which bar is tallest?<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>user\nAnd the shortest?<|im_end|>\n"
        "<|im_start|>assistant\nC<|im_end|>\n"
    ),
    ("qwen3_vl", "no_system"): (
        f"<|im_start|>user\n<|vision_start|>{PADS}<|vision_end|>Which bar is tallest?<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>user\nAnd the shortest?<|im_end|>\n"
        "<|im_start|>assistant\nC<|im_end|>\n"
    ),
}
RENDERED[("qwen2_5_vl", "system")] = RENDERED[("qwen2_vl", "system")]
RENDERED[("qwen2_5_vl", "no_system")] = RENDERED[("qwen2_vl", "no_system")]


@functools.lru_cache(maxsize=1)
def _qwen3_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(name="qwen3_vl_test", pat_str=QWEN_PAT_STR,
                             mergeable_ranks=get_tokenizer().enc._mergeable_ranks,
                             special_tokens={**SPECIAL_TOKENS, **QWEN3_SPECIAL_TOKENS})


def _hf_encode(text: str) -> list[int]:
    """The HF tokenizer's split: special/added tokens (Qwen3's <think> too) first, BPE in between."""
    return _qwen3_encoding().encode(text, allowed_special="all")


@pytest.mark.parametrize("generation", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("variant", ["system", "no_system"])
def test_rendering_per_generation(generation, variant):
    tok = get_tokenizer()
    msgs = CHAT if variant == "system" else CHAT_NO_SYSTEM
    ids, labels = tok.encode_conversation(msgs, [2], generation=generation)
    want = RENDERED[(generation, variant)]
    assert tok.decode(ids) == want
    assert ids == _hf_encode(want)
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]) == "B<|im_end|>C<|im_end|>"
    assert tok.count_text_tokens(msgs) + 2 >= len(ids)  # the index never under-counts


THINKING = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42", "reasoning": "12 plus 30 is 42."},
    {"role": "user", "content": [{"type": "image", "name": "img0.png"}, {"type": "text", "text": "Which bar is tallest?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "\nB"}], "reasoning": "\nBars: A 3, B 9.\n"},
]

THINKING_RENDERED = {
    # Qwen3-VL-Thinking: reasoning before the last user turn is dropped; the last turn's block is
    # strip('\n')-ed and the answer after it lstrip('\n')-ed.
    "qwen3_vl": (
        "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
        "<|im_start|>assistant\n42<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{PADS}<|vision_end|>Which bar is tallest?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nBars: A 3, B 9.\n</think>\n\nB<|im_end|>\n"
    ),
    # Qwen2-VL / Qwen2.5-VL: the same rule and text, the tags as ordinary BPE tokens.
    "qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
        "<|im_start|>assistant\n42<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{PADS}<|vision_end|>Which bar is tallest?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nBars: A 3, B 9.\n</think>\n\nB<|im_end|>\n"
    ),
}


@pytest.mark.parametrize("generation", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_thinking_rendering(generation):
    tok = get_tokenizer()
    ids, labels = tok.encode_conversation(THINKING, [2], generation=generation)
    want = THINKING_RENDERED["qwen3_vl" if generation == "qwen3_vl" else "qwen2_vl"]
    assert tok.decode(ids) == want
    if generation == "qwen3_vl":
        assert ids == _hf_encode(want)
        assert ids.count(THINK_START_ID) == ids.count(THINK_END_ID) == 1
    else:
        assert ids == tok.enc.encode(want, allowed_special="all")  # "<think>" is plain text here
        assert THINK_START_ID not in ids
    trained = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert trained == "42<|im_end|><think>\nBars: A 3, B 9.\n</think>\n\nB<|im_end|>"
    assert tok.count_text_tokens(THINKING) + 2 >= len(ids)


def test_think_block_rule():
    u = {"role": "user", "content": "q"}
    a = {"role": "assistant", "content": "a"}
    r = dict(a, reasoning="r")
    assert think_blocks([u, a]) == [None, None]  # no reasoning anywhere: Instruct rendering
    assert think_blocks([u, r, u, r]) == [None, None, None, "r"]  # history loses its reasoning
    assert think_blocks([u, r, a]) == [None, "r", ""]  # after the last query; the last turn gets an empty block
    assert think_blocks([u, r, dict(a, reasoning=""), a]) == [None, "r", None, ""]
    tool = {"role": "user", "content": "<tool_response>\n7\n</tool_response>"}
    assert think_blocks([u, r, tool, r]) == [None, "r", None, "r"]  # a tool response is not a query
    assert think_blocks([r]) == [None]  # no user query: the template renders no block
    with pytest.raises(ValueError, match="assistant turn"):
        think_blocks([dict(u, reasoning="x"), a])
    with pytest.raises(ValueError, match="must be a string"):
        think_blocks([u, dict(a, reasoning=["x"])])
    tok = get_tokenizer()
    ids, _ = tok.encode_conversation([u, r, a], [], generation="qwen3_vl")
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\nr\n</think>\n\na<|im_end|>\n"
                                    "<|im_start|>assistant\n<think>\n\n</think>\n\na<|im_end|>\n")


def test_thinking_loss_mask_token_by_token():
    tok = get_tokenizer()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 2."},
        {"role": "assistant", "content": "4", "reasoning": "2 plus 2"},
    ]
    ids, labels = tok.encode_conversation(msgs, [], generation="qwen3_vl")
    got = [(tok.decode([i]), l != IGNORE_INDEX) for i, l in zip(ids, labels)]
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ids, labels))
    assert got == [
        ("<|im_start|>", False), ("system", False), ("\n", False), ("Be", False), (" brief", False),
        (".", False), ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("user", False), ("\n", False), ("Add", False), (" ", False), ("2", False),
        (" and", False), (" ", False), ("2", False), (".", False), ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("assistant", False), ("\n", False),
        ("<think>", True), ("\n", True), ("2", True), (" plus", True), (" ", True), ("2", True), ("\n", True),
        ("</think>", True), ("\n\n", True), ("4", True), ("<|im_end|>", True), ("\n", False),
    ]


def test_shard_writer_rejects_bad_reasoning(tmp_path):
    from data_pipelines.shards import ShardWriter

    with ShardWriter(str(tmp_path), samples_per_shard=4) as w:
        w.add("ok", THINKING[:2], {})
        with pytest.raises(ValueError, match="sample bad: 'reasoning' must be a string on an assistant turn"):
            w.add("bad", [dict(THINKING[0], reasoning="no"), THINKING[1]], {})


def test_index_counts_per_generation_are_exact(tmp_path):
    """The planner's cost (from index.json) equals the built length for every generation."""
    from PIL import Image

    from data_pipelines.schema import DataConfig, DataSource
    from data_pipelines.shards import ShardWriter, read_index, text_tokens
    from data_pipelines.stream import StepLoader

    tok = get_tokenizer()
    counts = tok.text_token_counts(CHAT_NO_SYSTEM)
    for g in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        assert counts[g] == len(tok.encode_conversation(CHAT_NO_SYSTEM, [0], generation=g)[0])
    assert counts["qwen2_vl"] - counts["qwen3_vl"] == 11  # Qwen2-VL's default system turn
    with ShardWriter(str(tmp_path), samples_per_shard=8) as w:
        w.add("chat", CHAT_NO_SYSTEM, {"img0.png": Image.new("RGB", (56, 84), (9, 9, 9))})
        w.add("system", CHAT, {"img0.png": Image.new("RGB", (56, 84), (9, 9, 9))})
        w.add("thinking", THINKING, {"img0.png": Image.new("RGB", (84, 56), (9, 9, 9))})
    entries = {s["id"]: s for s in read_index(str(tmp_path))["shards"][0]["samples"]}
    assert entries["chat"]["n_text_tokens_by_generation"] == {"qwen3_vl": counts["qwen3_vl"]}
    assert "n_text_tokens_by_generation" not in entries["system"]  # the same count everywhere
    assert text_tokens(entries["chat"], "qwen3_vl_moe") == counts["qwen3_vl"]
    assert text_tokens(entries["chat"], "qwen2_5_vl") == entries["chat"]["n_text_tokens"] == counts["qwen2_vl"]
    for g in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        cfg = DataConfig(sources=[DataSource(path=str(tmp_path))], generation=g, max_tokens=256, shuffle=False,
                         pack_lookahead=1)
        loader = StepLoader(cfg, micro_batches_per_step=3, dp_rank=0, dp_size=1)
        batches = loader.next_step()
        planned = loader.last_step_stats()["packing_efficiency"] * 3 * cfg.max_tokens
        assert round(planned) == sum(b.num_tokens for b in batches), g
