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


def _tiny_qwen3_vl():
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=8,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
    )
    return Qwen3VLModel(cfg).eval()


def test_qwen3_vl_positions_match_hf_get_rope_index():
    """2-image Qwen3-VL conversation and a 3-frame video with timestamps."""
    from data_pipelines.positions import qwen3_vl_position_ids
    from data_pipelines.text import VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID

    tok = get_tokenizer()
    model = _tiny_qwen3_vl()
    grids = [(1, 6, 4), (1, 2, 10)]
    msgs = [
        {"role": "user", "content": [
            {"type": "image", "name": "a.png"}, {"type": "text", "text": "and"},
            {"type": "image", "name": "b.png"}, {"type": "text", "text": "Which one is wider?"}]},
        {"role": "assistant", "content": "the second"},
    ]
    ids, _ = tok.encode_conversation(msgs, [t * h * w // 4 for t, h, w in grids], generation="qwen3_vl")
    ours = qwen3_vl_position_ids(ids, grids)
    ref, _ = model.get_rope_index(torch.tensor([ids]), image_grid_thw=torch.tensor(grids))
    assert torch.equal(ours, ref[:, 0, :])

    # video of 3 temporal patches: "<t seconds>" + one vision_start/pads/vision_end run per frame
    vid = (3, 4, 6)
    ids = tok.encode("Watch: ")
    for k in range(vid[0]):
        ids += tok.encode(f"<{k + 0.5:.1f} seconds>") + [VISION_START_ID] + [VIDEO_PAD_ID] * 6 + [VISION_END_ID]
    ids += tok.encode("What moves?")
    ours = qwen3_vl_position_ids(ids, video_grid_thw=[vid])
    ref, _ = model.get_rope_index(torch.tensor([ids]), video_grid_thw=torch.tensor([vid]))
    assert torch.equal(ours, ref[:, 0, :])

    ids2, _ = tok.encode_conversation([{"role": "user", "content": "hi"}], [], generation="qwen3_vl")
    assert torch.equal(qwen3_vl_position_ids(ids2), torch.arange(len(ids2)).expand(3, -1))
    assert tok.special("<think>") == 151667 and tok.decode([151667, 151668]) == "<think></think>"


# ------------------------------------------------------------------------------------- videos
_VIDEO_MSGS = [
    {"role": "user", "content": [
        {"type": "image", "name": "a.png"}, {"type": "text", "text": "Then this clip:"},
        {"type": "video", "name": "vid0.mp4"}, {"type": "text", "text": "and another"},
        {"type": "video", "name": "vid1.mp4"}, {"type": "text", "text": "What changes?"}]},
    {"role": "assistant", "content": "The square moves right."},
]
_IMG = (1, 4, 6)
_VIDS = [(3, 4, 4), (2, 2, 6)]  # patches; 3 and 2 temporal patches


def test_qwen2_vl_video_positions_match_hf():
    tok = get_tokenizer()
    ids, _ = tok.encode_conversation(_VIDEO_MSGS, [6], videos=[(g, None) for g in _VIDS])
    assert ids.count(151656) == sum(t * h * w // 4 for t, h, w in _VIDS)
    ref, _ = _tiny_model().get_rope_index(
        torch.tensor([ids]), image_grid_thw=torch.tensor([_IMG]), video_grid_thw=torch.tensor(_VIDS))
    assert torch.equal(mrope_position_ids(ids, [_IMG], _VIDS), ref[:, 0, :])


def test_qwen2_5_vl_absolute_time_video_positions_match_hf():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    from data_pipelines.positions import position_ids_for

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0], tokens_per_second=2),
    )
    model = Qwen2_5_VLModel(cfg).eval()
    tok = get_tokenizer()
    ids, _ = tok.encode_conversation(_VIDEO_MSGS, [6], generation="qwen2_5_vl", videos=[(g, None) for g in _VIDS])
    for spg in ([1.0, 2.0], [0.5, 1.5], [4.0, 1.0]):
        ref, _ = model.get_rope_index(
            torch.tensor([ids]), image_grid_thw=torch.tensor([_IMG]), video_grid_thw=torch.tensor(_VIDS),
            second_per_grid_ts=torch.tensor(spg))
        ours = position_ids_for("qwen2_5_vl", ids, [_IMG], _VIDS, video_second_per_grid=spg)
        assert torch.equal(ours, ref[:, 0, :]), spg
    # absolute time really differs from Qwen2-VL's t index (2 s per grid → t ids 0, 4, 8)
    assert not torch.equal(position_ids_for("qwen2_5_vl", ids, [_IMG], _VIDS, video_second_per_grid=[2.0, 2.0]),
                           mrope_position_ids(ids, [_IMG], _VIDS))


def test_qwen3_vl_video_positions_with_timestamps_match_hf():
    from data_pipelines.positions import position_ids_for

    tok = get_tokenizer()
    stamps = [[0.25, 1.25, 2.25], [0.5, 10.5]]
    ids, labels = tok.encode_conversation(
        _VIDEO_MSGS, [6], generation="qwen3_vl", videos=list(zip(_VIDS, stamps)))
    text = tok.decode(ids)
    assert "Then this clip:<0.2 seconds><|vision_start|>" in text and "<10.5 seconds>" in text
    assert text.count("<|vision_start|>") == 1 + 3 + 2
    assert all(lab == -100 for i, lab in zip(ids, labels) if i == 151656)
    ref, _ = _tiny_qwen3_vl().get_rope_index(
        torch.tensor([ids]), image_grid_thw=torch.tensor([_IMG]), video_grid_thw=torch.tensor(_VIDS))
    assert torch.equal(position_ids_for("qwen3_vl", ids, [_IMG], _VIDS), ref[:, 0, :])
