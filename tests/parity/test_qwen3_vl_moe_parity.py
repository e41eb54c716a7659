"""HF parity in fp32 for Qwen3-VL MoE: a tiny random HF `Qwen3VLMoeForConditionalGeneration` vs our VLM
whose LLM layers are megatron's `MoELayer` (TopKRouter in fp32, SequentialMLP experts, alltoall dispatcher).

Tiny model (`tiny_qwen3_vl_moe_config`): the tiny Qwen3-VL ViT with DeepStack, a 2-layer Qwen3 LLM of
width 64 with 4 experts of width 48, top-2. The HF model is saved with `save_pretrained` and compared
through `qvl_train.tools.hf_parity` (every input kind it builds: one image, several images, a video,
text only, all packed) — logits within 1e-5 relative. The conversion reads both expert layouts (hub
`gate_up_proj [E, H, 2I]` and the transposed one) and writes back the one it read, bit for bit.
Pinned reference: transformers 4.57.x.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.qwen3_vl_moe")

from qvl_train.models.hf_convert import detect_expert_layout, hf_to_ours, ours_to_hf  # noqa: E402
from qvl_train.models.tiny import tiny_qwen3_vl_moe_config  # noqa: E402
from tests.parity.test_qwen3_vl_parity import hf_config as dense_hf_config, randomize  # noqa: E402


def hf_config(cfg):
    """The dense Qwen3-VL test's config with the MoE text fields (every layer sparse, top-k renormalised)."""
    from transformers import Qwen3VLMoeConfig

    d = dense_hf_config(cfg).to_dict()
    l = cfg.llm
    d["text_config"].update(
        num_experts=l.num_experts, moe_intermediate_size=l.moe_ffn_hidden_size, num_experts_per_tok=l.moe_router_topk,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=l.moe_aux_loss_coeff,
    )
    for sub in ("text_config", "vision_config"):
        d[sub].pop("model_type", None)
    return Qwen3VLMoeConfig(
        text_config=d["text_config"], vision_config=d["vision_config"], image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=l.tie_word_embeddings,
    )


def hf_model(cfg, seed: int = 0):
    """Tiny random HF model; every weight redrawn (router spread wide enough that routing varies per token)."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    return randomize(Qwen3VLMoeForConditionalGeneration(hf_config(cfg)).float().eval(), wide=("pos_embed", "mlp.gate.weight"))


def _transposed(sd: dict) -> dict:
    """The same checkpoint with the experts in the transposed (transformers 5.x) layout."""
    return {k: v.transpose(1, 2).contiguous() if k.endswith(("gate_up_proj", "down_proj")) else v for k, v in sd.items()}


def test_hf_parity_tool_every_input_kind(tmp_path):
    """`hf_parity.run` on the saved tiny MoE checkpoint: every input kind ≤ 1e-5 relative (fp32)."""
    from qvl_train.tools import hf_parity

    cfg = tiny_qwen3_vl_moe_config()
    hf_model(cfg, seed=1).save_pretrained(tmp_path / "hf", safe_serialization=True)
    results = hf_parity.run(str(tmp_path / "hf"))
    assert set(results) == set(hf_parity.KINDS)
    assert max(results.values()) <= hf_parity.TOLERANCE, results


def test_expert_layouts_roundtrip_bit_exact():
    """Both expert layouts import to the same weights and export back to the layout they came in."""
    cfg = tiny_qwen3_vl_moe_config()
    hub = hf_model(cfg).state_dict()
    gate_up = next(v for k, v in hub.items() if k.endswith("gate_up_proj"))
    assert tuple(gate_up.shape) == (4, 64, 96)  # hub: [E, H, 2I]
    assert detect_expert_layout(hub, cfg) == "hub"
    ours = hf_to_ours(hub, cfg)
    assert "llm.decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight" in ours
    for layout, src in (("hub", hub), ("transposed", _transposed(hub))):
        assert detect_expert_layout(src, cfg) == layout
        imported = hf_to_ours(src, cfg)
        assert all(torch.equal(imported[k], ours[k]) for k in ours), layout
        back = ours_to_hf(imported, cfg, style="runtime", expert_layout=layout)
        assert set(back) == set(src)
        for k, v in src.items():
            assert torch.equal(back[k], v), (layout, k)


def test_config_json_round_trip():
    """config.json written for the tiny and the released MoE configs reads back to the same config."""
    from qvl_train.tools.convert import hf_config_dict, model_config_from_hf
    from tests.unit.test_model_params import PUBLISHED_MOE, load_model_config

    for cfg in [tiny_qwen3_vl_moe_config()] + [load_model_config(n) for n in PUBLISHED_MOE]:
        back = model_config_from_hf(hf_config_dict(cfg))
        assert (back.generation, back.llm, back.vision) == (cfg.generation, cfg.llm, cfg.vision)


def test_convert_cli_keeps_the_transposed_expert_layout(tmp_path):
    """`launch/convert.py import-hf` then `export-hf` on a checkpoint with transposed experts writes
    every tensor back bit for bit, experts in the layout the source used; transformers loads it."""
    import json

    from safetensors.torch import load_file, save_file

    from tests.unit.test_convert import _convert

    cfg = tiny_qwen3_vl_moe_config()
    model = hf_model(cfg, seed=2)
    model.save_pretrained(tmp_path / "hub", safe_serialization=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    sd = _transposed({k: v.contiguous() for k, v in model.state_dict().items()})
    save_file(sd, str(src / "model.safetensors"))
    _convert("import-hf", "--hf-dir", src, "--out", tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "hf_import.json").read_text())["expert_layout"] == "transposed"
    _convert("export-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "out")
    back = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        back.update(load_file(str(f)))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_expert_parallel_layouts_parity_and_import(tmp_path):
    """The framework side under expert parallelism, in processes the tools start: `hf_parity` at
    (tp, pp, ep) = (1, 1, 2) and (2, 1, 2) within 1e-5 of HF for every input kind, and `import-hf`
    through a model built at tp=2 × ep=2 (each rank saving its experts) exports back bit for bit."""
    import subprocess
    import sys

    from qvl_train.tools import hf_parity
    from qvl_train.tools.convert import load_hf_state_dict
    from tests.conftest import ROOT, clean_env

    cfg = tiny_qwen3_vl_moe_config()
    hf_model(cfg, seed=1).save_pretrained(tmp_path / "hf", safe_serialization=True)
    for tp, ep in ((1, 2), (2, 2)):
        results = hf_parity.run(str(tmp_path / "hf"), tp=tp, ep=ep)
        assert set(results) == set(hf_parity.KINDS)
        assert max(results.values()) <= hf_parity.TOLERANCE, (tp, ep, results)
    for cmd in (
        ["import-hf", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ckpt", "--tp", "2", "--ep", "2"],
        ["export-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back"],
    ):
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), *map(str, cmd)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600, env={**clean_env(), "PYTHONWARNINGS": "ignore"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    src, back = load_hf_state_dict(tmp_path / "hf"), load_hf_state_dict(tmp_path / "back")
    assert sorted(src) == sorted(back)
    assert all(torch.equal(src[k], back[k]) for k in src)
