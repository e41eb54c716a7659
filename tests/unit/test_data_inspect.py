"""`python -m data_pipelines.inspect` shows samples as the model sees them."""

import re

import pytest

from data_pipelines.inspect import main, render_tokens
from data_pipelines.schema import IGNORE_INDEX
from data_pipelines.synth import generate
from data_pipelines.text import IMAGE_PAD_ID, get_tokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("insp")
    generate(str(d), 12, seed=5, samples_per_shard=6)
    return str(d)


def test_inspect_prints_tokens_pads_loss_grids_cost(shards, capsys):
    assert main([shards, "--n", "12"]) == 0
    out = capsys.readouterr().out
    assert out.count("── sample synth-5-") == 12
    assert "<|im_start|>system\n   You are a helpful assistant.<|im_end|>" in out
    pads = [int(n) for n in re.findall(r"<\|vision_start\|><\|image_pad\|>×(\d+)<\|vision_end\|>", out)]
    grids = re.findall(r"grid \(t,h,w\)=\((\d+),(\d+),(\d+)\) patches, \d+ ViT patches, (\d+) LLM tokens", out)
    assert pads and len(pads) == len(grids)
    assert pads == [int(t) * int(h) * int(w) // 4 for t, h, w, _ in grids] == [int(g[3]) for g in grids]
    assert "<|image_pad|><|image_pad|>" not in out  # runs are collapsed
    assert re.search(r"<\|im_start\|>assistant\n   ⟦[^⟧]+<\|im_end\|>⟧", out)  # answer + stop token trained
    for planned, built in re.findall(r"cost estimate \(index\): (\d+) tokens \(text \d+\); built: (\d+)", out):
        assert int(planned) >= int(built)  # exact except grounding boxes (upper bound)
    # one tar, other generation and pixel bounds
    assert main([shards + "/shard-000001.tar", "--n", "1", "--generation", "qwen2_5_vl", "--max-pixels", "3136"]) == 0
    out = capsys.readouterr().out
    assert out.count("── sample") == 1 and "qwen2_5_vl" in out and "key 000000006" in out
    with pytest.raises(SystemExit, match="neither a shard directory"):
        main([shards + "/index.json"])


def test_render_tokens_marks_label_spans():
    tok = get_tokenizer()
    ids = tok.encode("Hi") + [IMAGE_PAD_ID] * 3 + tok.encode(" there")
    labels = [IGNORE_INDEX] * (len(ids) - 1) + ids[-1:]
    assert render_tokens(ids, labels) == "Hi<|image_pad|>×3⟦ there⟧"
