"""`python -m qvl_train.tools.hf_parity`: PASS on tiny random checkpoints, in one process and with the
framework model at tp=2 and at pp=2 for EVERY HF generation (processes the tool starts).

Runs the CLI in a subprocess (its own process group) on tiny HF models saved with `save_pretrained`;
every input kind must be within 1e-5 relative (fp32) and the exit status 0. The layout cases pass all
four checkpoints to one call, so each layout costs one launch of its processes: Qwen2-VL with tied
embeddings (split across stages at pp=2), Qwen2.5-VL's window-attention ViT, Qwen3-VL (DeepStack into
LLM layers 0 and 1, so pp=2 takes an uneven first stage of 2 of its 3 layers; tied embeddings) and
Qwen3-VL MoE (3 layers for the same reason; sequence parallel under tp=2). Expert parallelism is
checked in `test_qwen3_vl_moe_parity.py`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("transformers.models.qwen3_vl_moe")

from qvl_train.models.tiny import tiny_qwen3_vl_config, tiny_qwen3_vl_moe_config  # noqa: E402
from qvl_train.tools.layout import first_stage_layers  # noqa: E402
from tests.conftest import clean_env  # noqa: E402
from tests.parity.test_qwen3_vl_moe_parity import hf_model as moe_hf_model  # noqa: E402
from tests.parity.test_qwen3_vl_parity import hf_model as qwen3_hf_model  # noqa: E402
from tests.unit.test_convert import _cfg, _hf_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"one_image", "multi_image", "video", "text_only", "packed"}
GENERATIONS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def _save(generation: str, out: Path) -> Path:
    if generation == "qwen3_vl":
        model = qwen3_hf_model(tiny_qwen3_vl_config(), seed=3)
    elif generation == "qwen3_vl_moe":
        cfg = tiny_qwen3_vl_moe_config()
        cfg.llm.num_layers = 3  # DeepStack feeds layers 0-1: pp=2 needs a stage after them
        model = moe_hf_model(cfg, seed=3)
    else:
        model = _hf_model(_cfg(generation), seed=3)
    model.to(torch.float32).save_pretrained(out / generation, safe_serialization=True)
    return out / generation


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("hf_parity")
    return [_save(g, out) for g in GENERATIONS]


def _tool(*args) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "qvl_train.tools.hf_parity", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**clean_env(), "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


def test_hf_parity_tool_passes_one_process(checkpoints):
    lines = _tool("--hf-dir", checkpoints[1])
    assert lines[-1].startswith("PASS") and lines[-1].endswith("tp=1 pp=1 ep=1)")
    assert {line.split()[0] for line in lines[:-1]} == KINDS


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_hf_parity_tool_every_generation_in_a_layout(checkpoints, layout):
    lines = _tool("--hf-dir", *checkpoints, *layout)
    tp, pp = (2, 1) if layout[0] == "--tp" else (1, 2)
    assert lines[-1].startswith("PASS") and lines[-1].endswith(f"tp={tp} pp={pp} ep=1)"), lines[-1]
    assert {line.split()[0] for line in lines[:-1]} == {f"{g}/{k}" for g in GENERATIONS for k in KINDS}


def test_first_stage_layers():
    assert first_stage_layers(4, 2) is None and first_stage_layers(36, 2, deepstack=3) is None
    assert first_stage_layers(3, 2, deepstack=2) == 2  # the tiny Qwen3-VL
    assert first_stage_layers(80, 3) == 26  # 26 + 27 + 27
    assert first_stage_layers(5, 3, deepstack=3) == 3
    with pytest.raises(ValueError, match="fewer stages"):
        first_stage_layers(2, 2, deepstack=2)


def test_hf_parity_tool_without_top_level_architectures(checkpoints, tmp_path):
    """A config.json with `architectures` only inside `text_config` (as transformers 4.57's
    `save_pretrained` can write it, and `import-hf` accepts): the class comes from `model_type`."""
    import json
    import shutil

    src = shutil.copytree(checkpoints[0], tmp_path / "no_architectures")
    conf = json.loads((src / "config.json").read_text())
    arch = conf.pop("architectures")
    conf.setdefault("text_config", {})["architectures"] = arch
    (src / "config.json").write_text(json.dumps(conf))
    lines = _tool("--hf-dir", src, "--kinds", "text_only,one_image")
    assert lines[-1].startswith("PASS"), lines
    assert {line.split()[0] for line in lines[:-1]} == {"text_only", "one_image"}
