"""HF parity in fp32: a tiny random HF Qwen2_5_VLForConditionalGeneration vs our megatron VLM.

The ViT has 4 blocks (1 and 3 full attention, 0 and 2 in 112-pixel windows = 4×4 merged tokens)
and the images are sized so that windows at the right/bottom edges are partial, one of them has
two temporal patches (windows per frame). Three samples are packed into one sequence; HF runs with
attention_mask=None, 4-row position_ids (row 0 restarting per sample) and use_cache=False.
Per-token losses must agree within 1e-4; the ViT output alone (after undoing the window order)
within 1e-5. Pinned reference: transformers 4.57.x.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from qvl_train.config import ParallelConfig  # noqa: E402
from qvl_train.models import build_model  # noqa: E402
from qvl_train.models.hf_convert import hf_to_ours, ours_to_hf  # noqa: E402
from qvl_train.models.tiny import packed_batch, tiny_qwen2_5_vl_config  # noqa: E402
from qvl_train.models.vision.qwen2_5_vl import window_index  # noqa: E402
from tests.conftest import megatron_one_rank_world  # noqa: E402

GRIDS = [(1, 12, 20), (2, 8, 12), (1, 10, 6)]  # merged 6×10, 4×6 (×2 frames), 5×3: partial windows
TEXTS = [(5, 7), (3, 4), (2, 6)]


@pytest.fixture(scope="module")
def mp_state():
    megatron_one_rank_world()
    yield


def hf_config(cfg):
    from transformers import Qwen2_5_VLConfig

    v, l = cfg.vision, cfg.llm
    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, hidden_act="silu",
            num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size, out_hidden_size=l.hidden_size,
            spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
            window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=2,
        ),
        text_config=dict(
            vocab_size=l.vocab_size, hidden_size=l.hidden_size, intermediate_size=l.ffn_hidden_size,
            num_hidden_layers=l.num_layers, num_attention_heads=l.num_attention_heads,
            num_key_value_heads=l.num_query_groups, rms_norm_eps=l.norm_eps, rope_theta=l.rope_theta,
            rope_scaling={"type": "mrope", "mrope_section": list(l.mrope_section)},
            tie_word_embeddings=l.tie_word_embeddings, max_position_embeddings=4096,
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        tie_word_embeddings=l.tie_word_embeddings, attn_implementation="sdpa",
    )


def hf_model(cfg, seed: int = 0):
    """Tiny random HF model; weights redrawn with a larger spread than the default init."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(cfg)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_q" in name):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    return model


def _ours(cfg, hf):
    ours = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    missing, unexpected = ours.load_state_dict(hf_to_ours(hf.state_dict(), cfg), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return ours.eval()


def test_window_index_matches_hf(mp_state):
    cfg = tiny_qwen2_5_vl_config()
    hf = hf_model(cfg)
    grid = torch.tensor(GRIDS)
    ref_idx, ref_cu = hf.model.visual.get_window_index(grid)
    order, cu = window_index(grid, 4, 2)
    assert torch.equal(order, ref_idx)
    assert cu.tolist() == torch.unique_consecutive(torch.tensor(ref_cu)).tolist()
    assert len(set((cu[1:] - cu[:-1]).tolist())) > 1  # partial windows present


def test_vit_matches_hf(mp_state):
    cfg = tiny_qwen2_5_vl_config()
    hf = hf_model(cfg)
    ours = _ours(cfg, hf)
    batch = packed_batch(cfg, grids=GRIDS, texts=TEXTS)
    with torch.no_grad():
        ref = hf.model.visual(batch.pixel_values, grid_thw=batch.grid_thw)
        got = ours.projector(ours.vision(batch.pixel_values, batch.grid_thw))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_hf_parity_per_token_loss(mp_state):
    cfg = tiny_qwen2_5_vl_config()
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
    labels = batch.labels[:n]
    hf_loss = F.cross_entropy(hf_logits, labels.clamp(min=0), reduction="none").masked_fill(labels == -100, 0.0)
    assert torch.isfinite(ours_loss).all()
    torch.testing.assert_close(ours_loss[:n], hf_loss, rtol=1e-4, atol=1e-4)
    assert torch.all(ours_loss[n:] == 0)


def test_hf_roundtrip_state_dict(mp_state):
    """hf_to_ours then ours_to_hf gives back every HF tensor bit for bit, in both key spellings."""
    from qvl_train.models.hf_convert import detect_style

    cfg = tiny_qwen2_5_vl_config()
    sd = hf_model(cfg).state_dict()
    assert detect_style(sd) == "runtime"
    back = ours_to_hf(hf_to_ours(sd, cfg), cfg, style="runtime")
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
