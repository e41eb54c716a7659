"""M-RoPE position ids: parity with transformers 4.57 Qwen2VLModel.get_rope_index."""

import torch
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from data_pipelines.positions import mrope_position_ids
from data_pipelines.text import get_tokenizer


def _tiny_model():
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, spatial_merge_size=2, patch_size=14),
    )
    return Qwen2VLModel(cfg).eval()


def test_positions_match_hf_get_rope_index():
    tok = get_tokenizer()
    grids = [(1, 6, 4), (1, 2, 10)]  # patches; different shapes and aspect ratios
    counts = [t * h * w // 4 for t, h, w in grids]
    msgs = [
        {"role": "user", "content": [
            {"type": "text", "text": "Picture 1: "}, {"type": "image", "name": "a.png"},
            {"type": "text", "text": "Picture 2: "}, {"type": "image", "name": "b.png"},
            {"type": "text", "text": "Which one is wider?"}]},
        {"role": "assistant", "content": "the second"},
    ]
    ids, _ = tok.encode_conversation(msgs, counts)
    ours = mrope_position_ids(ids, grids)
    model = _tiny_model()
    ref, _ = model.get_rope_index(torch.tensor([ids]), image_grid_thw=torch.tensor(grids))
    assert ours.shape == (3, len(ids))
    assert torch.equal(ours, ref[:, 0, :])

    # text-only: t = h = w = running index
    ids2, _ = tok.encode_conversation([{"role": "user", "content": "hi"}], [])
    assert torch.equal(mrope_position_ids(ids2), torch.arange(len(ids2)).expand(3, -1))
