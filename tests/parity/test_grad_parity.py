"""Gradient parity in fp32: the framework model's parameter gradients match the HF model's.

One packed sequence of four samples (the parity tool's `packed` kind: an image, two images of
different sizes, a video of two temporal patches, text only) goes through a tiny random HF model of
each generation and through our model with the same weights (`hf_to_ours`). Both sides
backpropagate the same scalar: the sum of token cross-entropies over the label positions (HF: its
logits with our labels; ours: the sum of its per-token loss). HF's gradients are mapped to our
parameter names with the same `hf_to_ours` (a pure re-layout: the qkv / gate-up fusions and splits
are linear), and every parameter must agree within `max|Δgrad| / max|grad_ref| ≤ 1e-5`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from data_pipelines.text import IMAGE_PAD_ID, VIDEO_PAD_ID  # noqa: E402
from qvl_train.config import ParallelConfig  # noqa: E402
from qvl_train.models import build_model, init_weights  # noqa: E402
from qvl_train.models.hf_convert import hf_to_ours  # noqa: E402
from qvl_train.models.tiny import tiny_model_config, tiny_qwen2_5_vl_config, tiny_qwen3_vl_config  # noqa: E402
from qvl_train.tools.hf_parity import packed_pair, packed_sample_segments  # noqa: E402
from tests.conftest import megatron_one_rank_world  # noqa: E402

TOLERANCE = 1e-5


def _hf_model(generation: str):
    if generation == "qwen2_vl":
        from tests.parity.test_qwen2_vl_parity import _hf_model as make

        return tiny_model_config(), make(tiny_model_config())
    if generation == "qwen2_5_vl":
        from tests.parity.test_qwen2_5_vl_parity import hf_model as make

        return tiny_qwen2_5_vl_config(), make(tiny_qwen2_5_vl_config())
    if generation == "qwen3_vl_moe":  # no load-balancing loss: HF adds none without output_router_logits
        from qvl_train.models.tiny import tiny_qwen3_vl_moe_config
        from tests.parity.test_qwen3_vl_moe_parity import hf_model as make_moe

        cfg = tiny_qwen3_vl_moe_config()
        cfg.llm.moe_aux_loss_coeff = 0.0
        return cfg, make_moe(cfg)
    from tests.parity.test_qwen3_vl_parity import hf_model as make

    return tiny_qwen3_vl_config(), make(tiny_qwen3_vl_config())


def _labels(input_ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random targets on text positions; -100 on visual pads (as a chat template's prompt masks them)."""
    labels = torch.randint(0, 151000, input_ids.shape, generator=gen)
    labels[(input_ids == IMAGE_PAD_ID) | (input_ids == VIDEO_PAD_ID)] = -100
    labels[0] = -100
    return labels


def relative_grad_errors(ours, ref: dict) -> dict[str, float]:
    """Parameter name → `max|grad − ref| / max|ref|` for every parameter of `ours` (`ref`: HF's gradients under
    our names); an expert no token was routed to has no gradient and a zero reference, and is left out."""
    errors = {}
    for name, p in ours.named_parameters():
        r = ref[name]
        if p.grad is None and ".experts." in name and not r.any():  # an expert no token was routed to (HF: zeros)
            continue
        assert p.grad is not None, f"{name} got no gradient"
        errors[name] = float((p.grad - r).abs().max() / r.abs().max().clamp(min=1e-30))
    return errors


@pytest.mark.parametrize("generation", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_gradients_match_hf(generation):
    megatron_one_rank_world()
    pytest.importorskip(f"transformers.models.{generation}")
    cfg, hf = _hf_model(generation)
    ours = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    missing, unexpected = ours.load_state_dict(hf_to_ours(hf.state_dict(), cfg), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    ours.eval()

    gen = torch.Generator().manual_seed(1)
    hf_kw, batch = packed_pair(cfg, packed_sample_segments(), gen)
    if generation.startswith("qwen3_vl"):  # Qwen3-VL times videos by text timestamps, not this argument
        hf_kw.pop("second_per_grid_ts", None)
    batch.labels = _labels(batch.input_ids, gen)
    assert batch.grid_thw.shape[0] == 4 and int((batch.input_ids == VIDEO_PAD_ID).sum()) > 0

    hf_logits = hf(**hf_kw).logits[0].float()
    hf_loss = F.cross_entropy(hf_logits, batch.labels, ignore_index=-100, reduction="sum")
    hf_loss.backward()
    ours_loss = ours(batch).sum()
    ours_loss.backward()
    torch.testing.assert_close(ours_loss, hf_loss, rtol=1e-5, atol=0)

    errors = relative_grad_errors(ours, hf_to_ours({n: p.grad for n, p in hf.named_parameters()}, cfg))
    assert len(errors) > 20
    worst = max(errors, key=errors.get)
    print(f"{generation}: {len(errors)} parameters, worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= TOLERANCE, f"{worst}: {errors[worst]:.2e} (tolerance {TOLERANCE:g})"


@pytest.mark.parametrize("generation", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_gradients_equal_one_by_one(generation):
    """The packed sequence of four samples and the same samples run one by one give the same
    gradients, for the LLM and for the ViT separately (per-sample attention: a packing leak into the
    ViT's windows or the LLM's causal mask would show here)."""
    from qvl_train.tools.hf_parity import _packed_batch, build_sample

    megatron_one_rank_world()
    cfg = {"qwen2_vl": tiny_model_config, "qwen2_5_vl": tiny_qwen2_5_vl_config, "qwen3_vl": tiny_qwen3_vl_config}[generation]()
    model = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    init_weights(model, seed=3, std=0.02)
    gen = torch.Generator().manual_seed(2)
    samples = [build_sample(segments, cfg, gen) for segments in packed_sample_segments()]
    packed = _packed_batch(samples, cfg)
    packed.labels = _labels(packed.input_ids, gen)
    bounds = packed.cu_seqlens.tolist()

    def grads() -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out

    model(packed).sum().backward()
    together = grads()
    for i, sample in enumerate(samples):
        single = _packed_batch([sample], cfg)
        single.labels = packed.labels[bounds[i]:bounds[i + 1]].clone()
        model(single).sum().backward()
    apart = grads()
    for tower in ("llm", "vision"):
        names = [n for n in together if n.startswith(f"{tower}.")]
        a = torch.cat([together[n].flatten() for n in names]).double()
        b = torch.cat([apart[n].flatten() for n in names]).double()
        cosine = float(F.cosine_similarity(a, b, dim=0))
        rel = float((a - b).norm() / b.norm())
        print(f"{generation} {tower}: cosine {cosine:.8f}, relative difference {rel:.1e}")
        assert cosine >= 0.9999 and rel <= 1e-5, f"{tower}: cosine {cosine}, relative difference {rel:.2e}"
