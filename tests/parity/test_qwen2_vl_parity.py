"""HF parity in fp32: a tiny random HF Qwen2VLForConditionalGeneration vs our megatron VLM.

The HF weights are converted with `hf_to_ours`; both models run the same packed input of two
samples with one image each (HF: attention_mask=None, 4-row position_ids whose row 0 restarts per
sample, which makes HF build a block-causal mask). Per-token losses must agree within 1e-4.
HF must run with use_cache=False (with a KV cache it ignores the packing).
Pinned reference: transformers 4.57.x (5.x changed video positions; images are unaffected).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from qvl_train.config import ParallelConfig  # noqa: E402
from qvl_train.models import build_model  # noqa: E402
from qvl_train.models.hf_convert import hf_to_ours  # noqa: E402
from qvl_train.models.tiny import packed_batch, tiny_model_config  # noqa: E402
from tests.conftest import megatron_one_rank_world  # noqa: E402


@pytest.fixture(scope="module")
def mp_state():
    megatron_one_rank_world()
    yield


def _hf_model(cfg):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    v, l = cfg.vision, cfg.llm
    hf_cfg = Qwen2VLConfig(
        vision_config=dict(
            depth=v.depth, embed_dim=v.hidden_size, hidden_size=l.hidden_size, hidden_act="quick_gelu",
            mlp_ratio=v.mlp_ratio, num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
            spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
        ),
        text_config=dict(
            vocab_size=l.vocab_size, hidden_size=l.hidden_size, intermediate_size=l.ffn_hidden_size,
            num_hidden_layers=l.num_layers, num_attention_heads=l.num_attention_heads,
            num_key_value_heads=l.num_query_groups, rms_norm_eps=l.norm_eps, rope_theta=l.rope_theta,
            rope_scaling={"type": "mrope", "mrope_section": list(l.mrope_section)}, tie_word_embeddings=False,
            max_position_embeddings=4096,
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(hf_cfg).float().eval()
    with torch.no_grad():  # random init with a larger std, so that a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    return model


def test_hf_parity_per_token_loss(mp_state):
    cfg = tiny_model_config()
    hf = _hf_model(cfg)
    ours = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    missing, unexpected = ours.load_state_dict(hf_to_ours(hf.state_dict(), cfg), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    ours.eval()

    batch = packed_batch(cfg)
    n = batch.num_tokens
    cu = batch.cu_seqlens.tolist()
    text_pos = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
    pos4 = torch.cat([text_pos[None], batch.position_ids[:, :n]])[:, None, :]  # [4, 1, n]
    with torch.no_grad():
        hf_logits = hf(
            input_ids=batch.input_ids[None, :n], attention_mask=None, position_ids=pos4,
            pixel_values=batch.pixel_values, image_grid_thw=batch.grid_thw,
            use_cache=False,  # with a cache HF skips packed-sequence detection and attends across samples
        ).logits[0].float()
        ours_loss = ours(batch)
    labels = batch.labels[:n]
    hf_loss = F.cross_entropy(hf_logits, labels.clamp(min=0), reduction="none").masked_fill(labels == -100, 0.0)
    assert torch.isfinite(ours_loss).all()
    torch.testing.assert_close(ours_loss[:n], hf_loss, rtol=1e-4, atol=1e-4)
    assert torch.all(ours_loss[n:] == 0)
    # the check is sharp: a model with a wrong M-RoPE section order would differ by far more
    assert (hf_loss[labels != -100] > 0).all()


def test_hf_parity_second_sample_unaffected_by_first(mp_state):
    """Packing isolation: the second sample alone gives the same losses as inside the pack."""
    cfg = tiny_model_config()
    ours = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    ours.load_state_dict(hf_to_ours(_hf_model(cfg).state_dict(), cfg), strict=False)
    full = packed_batch(cfg)
    alone = packed_batch(cfg, grids=[(1, 4, 4), (1, 4, 6)], texts=[(5, 7), (3, 9)], seed=0)
    with torch.no_grad():
        a = ours(full)
    # rebuild the pack with sample 1 only (same tokens / pixels)
    c0, c1, c2 = full.cu_seqlens.tolist()
    p0 = 16
    from data_pipelines.schema import PackedBatch

    second = PackedBatch(
        input_ids=alone.input_ids[c1:c2], labels=alone.labels[c1:c2], position_ids=alone.position_ids[:, c1:c2],
        cu_seqlens=torch.tensor([0, c2 - c1], dtype=torch.int32), pixel_values=alone.pixel_values[p0:],
        grid_thw=alone.grid_thw[1:], sample_ids=["s1"], num_tokens=c2 - c1,
    )
    with torch.no_grad():
        b = ours(second)
    torch.testing.assert_close(a[c1:c2], b, rtol=1e-5, atol=1e-5)
