"""Qwen3.5 / Qwen3.5-MoE against transformers 5.25 (the `.venv-ref` reference environment), fp32.

Tiny random HF checkpoints (`configs/model/qwen3_5{,_moe}/tiny.yaml` written as `config.json` by the registry's
`hf_config`, every parameter drawn from N(0, 0.05²) — the zero-centred norms, Gated DeltaNet decays and the
shared-expert gate included) are built and saved by `hf_parity.random_checkpoint` in the reference environment.
Then:

* `python -m qvl_train.tools.hf_parity` on both: one-image, multi-image, video, text-only and packed logits within
  1e-5 relative (the HF side in the reference environment: one subprocess per checkpoint), in one process and with
  the framework model at tp=2 · pp=2 · ep=2 (one launch of 4 processes for both checkpoints);
* `launch/convert.py import-hf` → `export-hf`: the export loads in transformers 5.25, gives the source's logits and
  generates the same tokens (greedy).

Skipped when the reference environment is absent (`make setup` builds it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvl_train import generations
from qvl_train.tools import hf_parity
from qvl_train.tools.reference import reference_available, run_reference
from tests.conftest import clean_env
from tests.unit.test_model_params import load_model_config

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("qwen3_5", "qwen3_5_moe")
KINDS = {"one_image", "multi_image", "video", "text_only", "packed"}
_ok, _why = reference_available()
pytestmark = pytest.mark.skipif(not _ok, reason=_why)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("qwen3_5_hf")
    dirs = {}
    for seed, name in enumerate(NAMES):
        spec = generations.get(name)
        dirs[name] = out / name
        run_reference("random_checkpoint", {}, {
            "config": spec.hf_config(load_model_config(f"{name}/tiny"), "float32"), "architecture": spec.hf_architecture,
            "out_dir": str(dirs[name]), "seed": seed,
        }, file=hf_parity.__file__)
    return dirs


def _run(*args) -> str:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**clean_env(), "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("layout", [[], ["--tp", "2", "--pp", "2", "--ep", "2"]], ids=["one_process", "tp2_pp2_ep2"])
def test_hf_parity_tool_passes(checkpoints, layout):
    lines = _run("-m", "qvl_train.tools.hf_parity", "--hf-dir", *checkpoints.values(), *layout).strip().splitlines()
    tp, pp, ep = (2, 2, 2) if layout else (1, 1, 1)
    assert lines[-1].startswith("PASS") and lines[-1].endswith(f"tp={tp} pp={pp} ep={ep})"), lines
    assert {line.split()[0] for line in lines[:-1]} == {f"{n}/{k}" for n in NAMES for k in KINDS}
    errors = [float(line.split("=")[-1]) for line in lines[:-1]]
    assert max(errors) <= 1e-5 and min(errors) > 0  # a real comparison: the two sides are computed apart


def test_import_export_loads_and_generates_in_transformers_5(checkpoints, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from qvl_train.tools.convert import load_hf_state_dict

    gen = torch.Generator().manual_seed(0)
    # the released checkpoints carry the MTP head (mtp.*, mtp_num_hidden_layers 1; vLLM's qwen3_5_mtp.py names), which
    # 5.25 ignores: import-hf loads it into models/mtp.py's head, export-hf writes it back bit for bit (the MoE's
    # head a MoE layer: router, experts in the source's layout, gated shared expert)
    for name in ("qwen3_5", "qwen3_5_moe"):
        src = shutil.copytree(checkpoints[name], tmp_path / f"{name}_mtp")
        conf = json.loads((src / "config.json").read_text())
        conf["text_config"]["mtp_num_hidden_layers"] = 1
        (src / "config.json").write_text(json.dumps(conf))
        src_sd = load_hf_state_dict(src)
        full = "model.language_model.layers.3."  # the tiny's full-attention layer: the MTP layer has its tensors' shapes
        mtp = {"mtp.layers.0." + k[len(full):]: torch.randn(v.shape, generator=gen) for k, v in src_sd.items() if k.startswith(full)}
        mtp["mtp.fc.weight"] = torch.randn(64, 128, generator=gen)
        for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):  # zero-centred, as every Qwen3.5 norm
            mtp[f"mtp.{norm}.weight"] = 0.1 * torch.randn(64, generator=gen)
        save_file(mtp, str(src / "mtp.safetensors"))
        ckpt, exported = tmp_path / f"{name}_ckpt", tmp_path / f"{name}_hf"
        _run(ROOT / "launch" / "convert.py", "import-hf", "--hf-dir", src, "--out", ckpt)
        _run(ROOT / "launch" / "convert.py", "export-hf", "--ckpt", ckpt, "--out", exported, "--dtype", "fp32")
        back = {k: v for f in exported.glob("*.safetensors") for k, v in load_file(str(f)).items() if k.startswith("mtp.")}
        assert set(back) == set(mtp), sorted(set(back) ^ set(mtp))[:6]
        assert any(".mlp.experts." in k for k in mtp) == (name == "qwen3_5_moe")
        for k in mtp:  # bit for bit, but the zero-centred norms: w + 1 - 1 rounds in fp32 (as the main norms)
            torch.testing.assert_close(back[k], mtp[k], rtol=0, atol=1e-6 if "norm" in k else 0, msg=k)
        assert json.loads((exported / "config.json").read_text())["text_config"]["mtp_num_hidden_layers"] == 1
        ids = torch.randint(0, 150000, (1, 12), generator=gen)
        out = run_reference("export_generates", {"input_ids": ids}, {
            "source_dir": str(src), "export_dir": str(exported), "architecture": generations.get(name).hf_architecture,
        }, file=ROOT / "tests" / "parity" / "qwen3_5_reference.py")
        assert float(out["max_diff"]) <= 1e-6 * float(out["max_ref"]), (name, float(out["max_diff"]))
        assert out["export"].shape[1] == 12 + 6 and torch.equal(out["source"], out["export"]), name
