"""Qwen3.5 / Qwen3.6 size configs (configs/model/qwen3_5, qwen3_6): parameter counts against HF's own modules
and the published totals, composition, the cluster experiments and the planner's fit of the 397B-A17B.

Counting is checked exactly against transformers 5.25's `Qwen3_5ForConditionalGeneration` /
`Qwen3_5MoeForConditionalGeneration` (built tiny, in the `.venv-ref` environment), then applied to the full
sizes (too big to build). Published totals: the model names (Qwen3.5-27B, Qwen3.5-122B-A10B, Qwen3.5-397B-A17B,
Qwen3.5-35B-A3B: total and active parameters in billions), without the MTP head (`count_parameters` keeps it
apart); the active figure is checked for the two large MoE models, where the name's rounding is within 5%.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from qvl_train.config import LLMConfig, VisionConfig
from qvl_train.models.params import count_parameters

ROOT = Path(__file__).resolve().parents[2]
SIZES = {
    "qwen3_5": ["0_8b", "2b", "4b", "9b", "27b", "35b_a3b", "122b_a10b", "397b_a17b"],
    "qwen3_6": ["27b", "35b_a3b"],
}
# name → (total, active or None); the names' own numbers
PUBLISHED = {
    "qwen3_5/27b": (27e9, None),
    "qwen3_6/27b": (27e9, None),
    "qwen3_5/35b_a3b": (35e9, None),
    "qwen3_6/35b_a3b": (35e9, None),
    "qwen3_5/122b_a10b": (122e9, 10e9),
    "qwen3_5/397b_a17b": (397e9, 17e9),
}


def _yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())


def _counted(d: dict, generation: str) -> dict:
    """Counts of a config dict; `generation` only names the projector kind (Qwen3.5's is Qwen3-VL's merger)."""
    cfg = SimpleNamespace(generation=generation, vision=VisionConfig(**d["vision"]), llm=LLMConfig(**d["llm"]))
    return count_parameters(cfg)


def test_every_size_exists_with_a_consistent_layer_pattern():
    for family, sizes in SIZES.items():
        assert sorted(p.stem for p in (ROOT / "configs" / "model" / family).glob("*.yaml") if p.stem != "tiny") == sorted(sizes)
        for size in sizes:
            llm = _yaml(f"{family}/{size}")["llm"]
            types = llm["layer_types"]
            assert len(types) == llm["num_layers"] and llm["vocab_size"] == 248320
            assert types == ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(len(types))]
            rotary_pairs = llm["head_dim"] * llm["partial_rotary_factor"] / 2
            assert sum(llm["mrope_section"]) == rotary_pairs, size
            assert llm["linear_num_value_heads"] % llm["linear_num_key_heads"] == 0


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_totals(name):
    d = _yaml(name)
    c = _counted(d, "qwen3_vl_moe" if d["llm"].get("num_experts") else "qwen3_vl")
    total, active = PUBLISHED[name]
    assert abs(c["total"] - total) / total < 0.02, (name, c["total"] / 1e9)
    if active:
        assert abs(c["active"] - active) / active < 0.05, (name, c["active"] / 1e9)
    assert c["mtp"] > 0 and c["total"] == c["vision"] + c["projector"] + c["llm"]


_HF_COUNT = r"""
import json, sys
from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
v, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
moe = "num_experts" in t
cls, conf = (Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeConfig) if moe else (Qwen3_5ForConditionalGeneration, Qwen3_5Config)
m = cls(conf(vision_config=v, text_config=t, tie_word_embeddings=t["tie_word_embeddings"]))
print(sum(p.numel() for p in m.parameters()))
"""


@pytest.mark.parametrize("moe", [False, True])
def test_counts_equal_the_hf_reference_modules(moe):
    """Gated DeltaNet, gated attention, shared expert and its gate, tied/untied output: exact, per transformers 5.25."""
    python = ROOT / ".venv-ref" / "bin" / "python"
    if not python.exists():
        pytest.skip(".venv-ref (transformers 5.25) is not built: make setup")
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, num_position_embeddings=16,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
    text = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                linear_conv_kernel_dim=4, tie_word_embeddings=not moe)
    text.update(dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40)
                if moe else dict(intermediate_size=80))
    out = subprocess.run([str(python), "-c", _HF_COUNT, json.dumps(vision), json.dumps(text)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    d = {
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, norm="layernorm", mlp="gelu_tanh", patch_size=16,
                       temporal_patch_size=2, spatial_merge_size=2, patch_bias=True, num_position_embeddings=16,
                       deepstack_visual_indexes=[]),
        "llm": dict(vocab_size=1000, hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2, head_dim=16,
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                    linear_conv_kernel_dim=4, layer_types=["linear_attention"] * 3 + ["full_attention"], attn_output_gate=True,
                    qkv_bias=False, qk_norm=True, tie_word_embeddings=not moe, mtp_num_layers=1,
                    **(dict(num_experts=6, moe_router_topk=2, moe_ffn_hidden_size=24, shared_expert_ffn_hidden_size=40)
                       if moe else dict(ffn_hidden_size=80))),
    }
    assert _counted(d, "qwen3_vl_moe" if moe else "qwen3_vl")["total"] == int(out.stdout.split()[-1])


def _registered() -> bool:
    from data_pipelines import generations

    return {"qwen3_5", "qwen3_5_moe"} <= set(generations.NAMES)


needs_registry = pytest.mark.skipif(not _registered(), reason="the qwen3_5 / qwen3_5_moe generations are not registered yet")


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from qvl_train.config import register_configs, to_train_config

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=overrides))


@needs_registry
def test_every_size_composes_and_validates(tmp_path):
    """`model=qwen3_5/<size>` composes into typed configs; with the Qwen3.5 test tokenizer the ids fit."""
    from tests.fixtures.qwen3_5_tokenizer import write_qwen3_5_tokenizer

    tok = write_qwen3_5_tokenizer(str(tmp_path / "tok"))
    for family, sizes in SIZES.items():
        for size in sizes:
            cfg = _compose([f"model={family}/{size}", f"data.tokenizer={tok}"])
            cfg.validate(world_size=1)
            assert cfg.model.image_pad_id == 248056


@needs_registry
def test_experiments_compose_and_the_397b_fits_h100s(tmp_path):
    from qvl_train.config import ConfigError
    from qvl_train.tools.planner import GPUS, Layout, Workload, check_layout, predict

    with pytest.raises(ConfigError, match="data.tokenizer=.*missing is not a directory"):
        _compose(["+experiment=qwen3_5", f"data.tokenizer={tmp_path / 'missing'}"]).validate(world_size=32)
    for name, gpus in (("qwen3_5", 32), ("qwen3_5_moe", 256)):
        cfg = _compose([f"+experiment={name}"])  # the bundled Qwen3.5 vocabulary
        assert cfg.cluster.gpus == gpus and cfg.cluster.gpu == "h100"
        cfg.validate(world_size=gpus)
        p = cfg.parallel
        lo = Layout(p.tp, p.pp, p.vpp, p.ep, p.etp, p.cp, gpus // (p.tp * p.pp * p.cp), cfg.train.recompute)
        work = Workload(cfg.data.max_tokens, cfg.train.global_batch_tokens, 0.5, 0.5, sample_tokens=cfg.data.max_tokens)
        assert check_layout(cfg.model, lo, work) is None
        pred = predict(cfg.model, lo, work, GPUS["h100"])
        assert pred.fits and pred.memory_gib["total"] < 80, (name, pred.memory_gib)
    assert "Gated DeltaNet" in check_layout(cfg.model, Layout(2, 8, 1, 16, 1, 2, 8, "full"), work)
