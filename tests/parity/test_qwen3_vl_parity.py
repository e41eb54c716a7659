"""HF parity in fp32: a tiny random HF Qwen3VLForConditionalGeneration vs our megatron VLM.

Tiny model (`tiny_qwen3_vl_config`): ViT 3 blocks with patch 16 and an 8×8 learned position table
(interpolated up to grids of 12×20 patches), DeepStack from blocks 0 and 1 into LLM layers 0 and 1;
Qwen3 LLM with head_dim 32 ≠ 64/4, q/k RMSNorm, interleaved M-RoPE, tied embeddings. Three samples
with images (one of two temporal patches) are packed into one sequence; HF runs with
attention_mask=None, 4-row position_ids (row 0 restarting per sample — transformers 4.57's
Qwen3VLTextModel splits row 0 off as the text positions the packed causal mask is built from) and
use_cache=False. Per-token losses must agree within 1e-4; the ViT + mergers (main and DeepStack)
within 1e-5. Pinned reference: transformers 4.57.x.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.qwen3_vl")

from qvl_train.config import ParallelConfig  # noqa: E402
from qvl_train.models import build_model  # noqa: E402
from qvl_train.models.hf_convert import hf_to_ours, ours_to_hf  # noqa: E402
from qvl_train.models.rope import mrope_freqs  # noqa: E402
from qvl_train.models.tiny import packed_batch, tiny_qwen3_vl_config  # noqa: E402
from tests.conftest import megatron_one_rank_world  # noqa: E402

GRIDS = [(1, 12, 20), (2, 8, 12), (1, 6, 4)]
TEXTS = [(5, 7), (3, 4), (2, 6)]


@pytest.fixture(scope="module")
def mp_state():
    megatron_one_rank_world()
    yield


def hf_config(cfg):
    from transformers import Qwen3VLConfig

    v, l = cfg.vision, cfg.llm
    return Qwen3VLConfig(
        vision_config=dict(
            depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            hidden_act="gelu_pytorch_tanh", num_heads=v.num_heads, in_channels=v.in_channels,
            patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
            temporal_patch_size=v.temporal_patch_size, out_hidden_size=l.hidden_size,
            num_position_embeddings=v.num_position_embeddings,
            deepstack_visual_indexes=list(v.deepstack_visual_indexes),
        ),
        text_config=dict(
            vocab_size=l.vocab_size, hidden_size=l.hidden_size, intermediate_size=l.ffn_hidden_size,
            num_hidden_layers=l.num_layers, num_attention_heads=l.num_attention_heads,
            num_key_value_heads=l.num_query_groups, head_dim=l.head_dim, rms_norm_eps=l.norm_eps,
            rope_theta=l.rope_theta, attention_bias=l.qkv_bias,
            rope_scaling={"rope_type": "default", "mrope_section": list(l.mrope_section), "mrope_interleaved": True},
            tie_word_embeddings=l.tie_word_embeddings, max_position_embeddings=4096,
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=l.tie_word_embeddings, attn_implementation="sdpa",
    )


def hf_model(cfg, seed: int = 0):
    """Tiny random HF model; weights redrawn with a larger spread than the default init."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    return randomize(Qwen3VLForConditionalGeneration(hf_config(cfg)).float().eval())


@torch.no_grad()
def randomize(model, wide: tuple[str, ...] = ("pos_embed",)):
    """Redraw every weight: norms ~1 ± 0.1, biases ± 0.1, names containing `wide` with std 0.5, the rest 0.05."""
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn_like(p))
        elif any(w in name for w in wide):
            p.normal_(0.0, 0.5)
        else:
            p.normal_(0.0, 0.05)
    return model


def _ours(cfg, hf):
    ours = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    missing, unexpected = ours.load_state_dict(hf_to_ours(hf.state_dict(), cfg), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return ours.eval()


def test_interleaved_mrope_matches_hf():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    cfg = tiny_qwen3_vl_config()
    rot = Qwen3VLTextRotaryEmbedding(hf_config(cfg).text_config)
    pos = torch.randint(0, 500, (3, 1, 40))
    cos, _ = rot(torch.zeros(1, dtype=torch.float32), pos)
    ours = mrope_freqs(pos[:, 0], cfg.llm.head_dim, cfg.llm.rope_theta, list(cfg.llm.mrope_section), interleaved=True)
    torch.testing.assert_close(ours[:, 0, 0].cos(), cos[0], rtol=0, atol=1e-6)


def test_vit_and_deepstack_match_hf(mp_state):
    cfg = tiny_qwen3_vl_config()
    hf = hf_model(cfg)
    ours = _ours(cfg, hf)
    batch = packed_batch(cfg, grids=GRIDS, texts=TEXTS)
    with torch.no_grad():
        ref, ref_deep = hf.model.visual(batch.pixel_values, grid_thw=batch.grid_thw)
        vis, deep = ours.vision(batch.pixel_values, batch.grid_thw)
        got, got_deep = ours.projector(vis), ours.projector.project_deepstack(deep)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(got_deep) == len(ref_deep) == 2
    for g, r in zip(got_deep, ref_deep):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_hf_parity_per_token_loss(mp_state):
    cfg = tiny_qwen3_vl_config()
    hf = hf_model(cfg)
    ours = _ours(cfg, hf)
    batch = packed_batch(cfg, grids=GRIDS, texts=TEXTS)
    n = batch.num_tokens
    cu = batch.cu_seqlens.tolist()
    text_pos = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
    pos4 = torch.cat([text_pos[None], batch.position_ids[:, :n]])[:, None, :]
    with torch.no_grad():
        hf_logits = hf(
            input_ids=batch.input_ids[None, :n], attention_mask=None, position_ids=pos4,
            pixel_values=batch.pixel_values, image_grid_thw=batch.grid_thw, use_cache=False,
        ).logits[0].float()
        ours_loss = ours(batch)
        ours_logits = ours.logits(batch)[:n]
    labels = batch.labels[:n]
    hf_loss = F.cross_entropy(hf_logits, labels.clamp(min=0), reduction="none").masked_fill(labels == -100, 0.0)
    assert torch.isfinite(ours_loss).all()
    torch.testing.assert_close(ours_loss[:n], hf_loss, rtol=1e-4, atol=1e-4)
    assert torch.all(ours_loss[n:] == 0)
    assert (ours_logits - hf_logits).abs().max() / hf_logits.abs().max() < 1e-5


def test_deepstack_matters(mp_state):
    """Without DeepStack the losses differ: the injection path is exercised, not bypassed."""
    cfg = tiny_qwen3_vl_config()
    hf = hf_model(cfg)
    ours = _ours(cfg, hf)
    batch = packed_batch(cfg, grids=GRIDS, texts=TEXTS)
    with torch.no_grad():
        full = ours(batch)
        for m in ours.projector.deepstack:
            m.linear_fc2.weight.zero_()
            m.linear_fc2.bias.zero_()
        plain = ours(batch)
    assert (full - plain).abs().max() > 1e-3


def test_deepstack_layer_off_first_stage_is_an_error(mp_state):
    cfg = tiny_qwen3_vl_config()
    with pytest.raises(ValueError, match="first_stage_layers"):
        from qvl_train.models.vlm import Qwen3VLM

        Qwen3VLM(cfg, ParallelConfig(pp=3, first_stage_layers=1), pre_process=True, post_process=False)


def test_hf_roundtrip_state_dict(mp_state):
    """hf_to_ours then ours_to_hf gives back every HF tensor bit for bit, in both key spellings."""
    from qvl_train.models.hf_convert import detect_style

    cfg = tiny_qwen3_vl_config()
    sd = hf_model(cfg).state_dict()
    assert detect_style(sd) == "runtime"
    ours = hf_to_ours(sd, cfg)
    back = ours_to_hf(ours, cfg, style="runtime", write_tied_lm_head="lm_head.weight" in sd)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    hub = ours_to_hf(ours, cfg, style="hub")
    assert hf_to_ours(hub, cfg).keys() == ours.keys()
