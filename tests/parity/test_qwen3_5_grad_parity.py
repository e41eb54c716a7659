"""Gradient parity of Qwen3.5 / Qwen3.5-MoE with transformers 5.25 (the `.venv-ref` reference environment), fp32.

As `test_grad_parity.py` does for the older generations: the parity tool's four samples (an image, two images of
different sizes, a video of two temporal patches, text only) with random labels on their text positions. Ours
runs them packed into one sequence and backpropagates the sum of its per-token cross-entropies; HF
(`reference_side.hf_model_grads`, ONE subprocess call per model) runs each sample alone (its Gated DeltaNet layers
carry their state across packed sequences) and backpropagates the same sum. Both models hold the same weights:
ours drawn (every vector perturbed too — norms, biases, A_log, dt_bias — so a conversion that drops a +1 shows)
and written to HF's runtime names by `ours_to_hf` (experts fused as 5.x keeps them). HF's gradients come back per
parameter and are mapped by the linear part of `hf_to_ours` (`hf_to_ours(g) − hf_to_ours(0)`: the zero-centred
norms' +1 is not a gradient's); every parameter within `max|Δgrad| / max|grad_ref| ≤ 1e-5`.

HF's GDN layers run transformers' own `torch_recurrent_gated_delta_rule` here, not its chunked fallback: that
fallback takes the log-decay prefix sums in fp32, which puts the gradients of A_log and dt_bias ~1e-4 off (our
chunked form sums in fp64, `models/gdn.py`; `tests/unit/test_gdn.py` checks both HF forms against ours).
The MoE's load-balancing loss is off (HF adds none without `output_router_logits`).
Skipped when the reference environment is absent (`make setup` builds it).
"""

from __future__ import annotations

import re

import pytest
import torch

from qvl_train.tools.reference import reference_available, run_reference

_ok, _why = reference_available()
pytestmark = pytest.mark.skipif(not _ok, reason=_why)
TOLERANCE = 1e-5


def _fused_experts(hf: dict) -> dict:
    """Per-expert HF keys (`….mlp.experts.{j}.gate_proj/up_proj/down_proj.weight`, as the released checkpoints
    store them) → transformers 5.x's runtime parameters `….mlp.experts.gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`."""
    out, experts = {}, {}
    for key, value in hf.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", key)
        if m is None:
            out[key] = value
        else:
            experts.setdefault(m[1], {})[(int(m[2]), m[3])] = value
    for base, parts in experts.items():
        n = 1 + max(j for j, _ in parts)
        out[f"{base}.gate_up_proj"] = torch.stack([torch.cat([parts[j, "gate_proj"], parts[j, "up_proj"]]) for j in range(n)])
        out[f"{base}.down_proj"] = torch.stack([parts[j, "down_proj"] for j in range(n)])
    return out


@pytest.mark.parametrize("size", ["qwen3_5/tiny", "qwen3_5_moe/tiny"])
def test_gradients_match_hf(size):
    from data_pipelines import generations as data_generations
    from qvl_train import generations
    from qvl_train.config import ParallelConfig
    from qvl_train.models import build_model, init_weights
    from qvl_train.models.hf_convert import hf_to_ours, ours_to_hf
    from qvl_train.tools.hf_parity import _hf_inputs, _packed_batch, build_sample, packed_sample_segments
    from tests.conftest import megatron_one_rank_world
    from tests.parity.test_grad_parity import _labels, relative_grad_errors
    from tests.unit.test_model_params import load_model_config

    megatron_one_rank_world()
    cfg = load_model_config(size)
    cfg.llm.moe_aux_loss_coeff = 0.0
    cfg.attention_backend = "sdpa_loop"
    spec = generations.get(cfg.generation)
    ours = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    init_weights(ours, seed=7, std=0.02)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    hf_weights = _fused_experts(ours_to_hf(state, cfg, style="runtime"))

    samples = [build_sample(segments, cfg, gen) for segments in packed_sample_segments()]
    batch = _packed_batch(samples, cfg)
    batch.labels = _labels(batch.input_ids, gen)
    bounds = batch.cu_seqlens.tolist()
    timestamps = data_generations.get(cfg.generation).video.timestamps
    tensors = {f"w.{k}": v for k, v in hf_weights.items()}
    names = []
    for i, s in enumerate(samples):
        name = f"s{i}"
        names.append(name)
        explicit = timestamps and "video" in s["kinds"]  # our positions: the sample has no timestamp text
        for key, value in _hf_inputs([s], packed=False, explicit_positions=explicit).items():
            if torch.is_tensor(value):
                tensors[f"{name}.{key}"] = value
        tensors[f"{name}.labels"] = batch.labels[bounds[i]:bounds[i + 1]]
    assert len(samples) == 4 and bounds[-1] == batch.num_tokens

    ref = run_reference("hf_model_grads", tensors, {
        "config": spec.hf_config(cfg, "float32"), "architecture": spec.hf_architecture, "samples": names,
        "gdn_form": "recurrent", "dtypes": ["float32"],
    })
    loss = ours(batch).sum()
    loss.backward()
    assert float(loss) == pytest.approx(float(ref["float32.loss"]), rel=1e-5)
    hf = {k.removeprefix("float32.g."): v for k, v in ref.items() if k.startswith("float32.g.")}
    offset = hf_to_ours({k: torch.zeros_like(v) for k, v in hf.items()}, cfg)  # the affine part (norm + 1)
    errors = relative_grad_errors(ours, {k: v - offset[k] for k, v in hf_to_ours(hf, cfg).items()})
    assert any(".self_attention.A_log" in n for n in errors) and any("linear_qkv" in n for n in errors)
    worst = max(errors, key=errors.get)
    print(f"{size}: {len(errors)} parameters, worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= TOLERANCE, f"{worst}: {errors[worst]:.2e} (tolerance {TOLERANCE:g})"
