"""The analytic FLOP counter: by hand on a tiny config, against 6·N·T, and against the model's windows."""

from __future__ import annotations

import pytest
import torch

from qvl_train.config import LLMConfig, ModelConfig, VisionConfig
from qvl_train.models.params import count_parameters
from qvl_train.monitor.flops import Flops, batch_flops, packed_batch_flops, peak_tflops


def _tiny(**vision) -> ModelConfig:
    v = dict(depth=1, hidden_size=8, num_heads=2, mlp_ratio=2.0, patch_size=2, temporal_patch_size=2,
             spatial_merge_size=2, in_channels=1)
    v.update(vision)
    llm = LLMConfig(num_layers=1, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=1,
                    vocab_size=10, mrope_section=[1, 1, 0])
    return ModelConfig(generation="qwen2_vl", vision=VisionConfig(**v), llm=llm)


def test_qwen2_vl_by_hand():
    cfg = _tiny()
    # One image, grid (t, h, w) = (1, 2, 4): P = 8 patches, 2 merged tokens; samples of 5 and 3 tokens; 4 labels.
    f = batch_flops(cfg, [(1, 2, 4)], [5, 3], label_tokens=4)
    # ViT, Hv = 8, I = 2·8 = 16, patch features C·T·p·p = 1·2·2·2 = 8:
    #   patch embed 2·P·8·Hv = 2·8·8·8 = 1024
    #   block: 2·P·Hv·(3Hv + Hv + 2I) = 2·8·8·(24 + 8 + 32) = 8192          → linear 9216
    #   attention over the frame (s = 8): 4·s²·Hv = 4·64·8 = 2048
    assert (f.vision_linear, f.vision_attention) == (1024 + 8192, 2048)
    # Merger: 2 tokens of width W = 4·8 = 32: 2·2·32·32 + 2·2·32·8 = 4096 + 1024
    assert f.projector == 5120
    # LLM, H = 8, d = 4, GQA 1 group → kv width 4, F = 16, T = 8:
    #   2·T·(H·H + 2·H·4 + H·H + 3·H·F) = 16·(64 + 64 + 64 + 384) = 9216
    #   causal attention: 2·(5² + 3²)·(2 heads·4) = 2·34·8 = 544
    #   output at 4 labels: 2·4·H·V = 2·4·8·10 = 640
    assert (f.llm_linear, f.llm_attention, f.output) == (9216, 544, 640)
    assert f.forward == 26784 and f.training == 3 * 26784


def test_qwen2_5_vl_windows_by_hand():
    # window_size 4 px = 1 merged token = 4 patches per window; block 1 attends over the whole frame.
    cfg = _tiny(depth=2, window_size=4, fullatt_block_indexes=[1], norm="rmsnorm", mlp="swiglu", intermediate_size=16)
    f = batch_flops(cfg, [(1, 2, 4)], [8], label_tokens=0)
    # block 0: 2 windows of 4 patches → 4·(4² + 4²)·8 = 1024; block 1: frame of 8 → 4·8²·8 = 2048
    assert f.vision_attention == 1024 + 2048
    # SwiGLU MLP: 3 matmuls of Hv·I: 2·8·8·(24 + 8 + 3·16) = 10240 per block, 2 blocks, + embed 1024
    assert f.vision_linear == 1024 + 2 * 10240


def test_windows_match_the_model():
    from qvl_train.models.vision.qwen2_5_vl import window_index

    cfg = _tiny(depth=3, window_size=16, fullatt_block_indexes=[2], norm="rmsnorm", mlp="swiglu", intermediate_size=16)
    grids = [(1, 14, 22), (2, 6, 4), (1, 2, 2)]  # partial edge windows, a video, a one-window image
    _, cu = window_index(torch.tensor(grids), window=16 // 2 // 2, merge=2)
    lens = (cu[1:] - cu[:-1]).tolist()
    frames = [h * w for t, h, w in grids for _ in range(t)]
    want = 4 * 8 * (2 * sum(s * s for s in lens) + sum(s * s for s in frames))
    assert batch_flops(cfg, grids, [1], 0).vision_attention == want


def test_llm_only_batch_is_six_n_t():
    """No images, every token labelled, attention left out: 3·forward = 6·N·T with N the matmul weights."""
    cfg = ModelConfig()  # Qwen2-VL 7B
    seq_lens = [4096, 1500, 2500]
    T = sum(seq_lens)
    f = batch_flops(cfg, [], seq_lens, label_tokens=T)
    assert f.vision_linear == f.vision_attention == f.projector == 0
    n = count_parameters(cfg)["llm"] - cfg.llm.vocab_size * cfg.llm.hidden_size  # input embedding: a lookup
    no_attention = f.training - 3 * f.llm_attention
    # The only difference: norms and biases are parameters but not matmul FLOPs (~5e-5 of N).
    assert no_attention < 6 * n * T
    assert no_attention == pytest.approx(6 * n * T, rel=1e-4)


def test_packed_batch_and_sum():
    from data_pipelines.schema import PackedBatch

    cfg = _tiny()
    batch = PackedBatch(
        input_ids=torch.zeros(10, dtype=torch.long), labels=torch.zeros(10, dtype=torch.long),
        position_ids=torch.zeros(3, 10, dtype=torch.long), cu_seqlens=torch.tensor([0, 5, 8], dtype=torch.int32),
        pixel_values=torch.zeros(8, 8), grid_thw=torch.tensor([[1, 2, 4]]), sample_ids=["a", "b"],
        num_tokens=8, num_label_tokens=4, num_visual_tokens=2,
    )
    f = packed_batch_flops(cfg, batch)
    assert f == batch_flops(cfg, [(1, 2, 4)], [5, 3], 4)  # padding slots 8..9 are not counted
    assert (f + f).forward == 2 * f.forward and Flops().forward == 0


def test_peak_table():
    assert peak_tflops(123.0, "anything") == 123.0
    assert peak_tflops(0, "NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops(0, "NVIDIA H100 PCIe") == 756.0
    assert peak_tflops(0, "NVIDIA H200") == 989.0
    assert peak_tflops(0, "NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops(0, "Tesla T4") is None


def _tiny_qwen3() -> ModelConfig:
    v = VisionConfig(depth=2, hidden_size=8, num_heads=2, intermediate_size=12, norm="layernorm", mlp="gelu_tanh",
                     patch_size=16, temporal_patch_size=2, spatial_merge_size=2, in_channels=1, patch_bias=True,
                     num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    llm = LLMConfig(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=1,
                    head_dim=8, vocab_size=10, mrope_section=[2, 1, 1], mrope_interleaved=True, qkv_bias=False,
                    qk_norm=True, tie_word_embeddings=True)
    return ModelConfig(generation="qwen3_vl", vision=v, llm=llm)


def test_qwen3_vl_by_hand():
    """Patch-16 ViT with a tanh-GELU MLP, a main merger + one DeepStack merger per tapped block, and a
    Qwen3 LLM whose head_dim (8) is not hidden / heads (4); q/k norms, the position-embedding
    interpolation and RoPE are not matmul FLOPs."""
    cfg = _tiny_qwen3()
    # One image, grid (1, 2, 4): P = 8 patches, 2 merged tokens; samples of 5 and 3 tokens; 4 labels.
    f = batch_flops(cfg, [(1, 2, 4)], [5, 3], label_tokens=4)
    # ViT, Hv = 8, I = 12, patch features C·T·p·p = 1·2·16·16 = 512:
    #   patch embed 2·P·512·Hv = 2·8·512·8 = 65536
    #   block: 2·P·Hv·(3Hv + Hv + 2I) = 2·8·8·(24 + 8 + 24) = 7168, 2 blocks → 14336
    #   attention over the frame (s = 8): 4·s²·Hv = 2048 per block → 4096
    assert (f.vision_linear, f.vision_attention) == (65536 + 14336, 4096)
    # Mergers: main + DeepStack from blocks 0 and 1 = 3, each 2 tokens of width W = 4·8 = 32:
    #   2·2·32·32 + 2·2·32·8 = 5120 each → 15360
    assert f.projector == 15360
    # LLM, H = 8, 2 heads of d = 8 → q width 16, 1 kv group → kv width 8, F = 16, T = 8:
    #   2·T·(H·16 + 2·H·8 + 16·H + 3·H·F) = 16·(128 + 128 + 128 + 384) = 12288 per layer → 24576
    #   causal attention: 2 layers · 2·(5² + 3²)·(2 heads · 8) = 2·2·34·16 = 2176
    #   output at 4 labels: 2·4·H·V = 640
    assert (f.llm_linear, f.llm_attention, f.output) == (24576, 2176, 640)
    assert f.forward == 65536 + 14336 + 4096 + 15360 + 24576 + 2176 + 640


def test_qwen3_vl_linear_parts_match_the_built_model():
    """Independent count: 2·tokens·(weight elements) over every matmul weight of the real tiny Qwen3-VL
    model (ViT blocks and patch embed at P patches, mergers at P/m² tokens, LLM layers at T tokens)."""
    from qvl_train.config import ParallelConfig
    from qvl_train.models import build_model
    from qvl_train.models.tiny import tiny_qwen3_vl_config
    from tests.conftest import megatron_one_rank_world

    megatron_one_rank_world()
    cfg = tiny_qwen3_vl_config()
    model = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    grids, seq_lens = [(1, 12, 20), (2, 8, 12)], [150, 60, 7]
    patches = sum(t * h * w for t, h, w in grids)
    tokens = {"vision.": patches, "projector.": patches // cfg.vision.spatial_merge_size**2, "llm.decoder.": sum(seq_lens)}
    want = {part: 0 for part in tokens}
    for name, p in model.named_parameters():
        part = next((k for k in tokens if name.startswith(k)), None)
        if part is None or p.dim() != 2 or name == "vision.pos_embed":  # embedding / position table: lookups
            continue
        want[part] += 2 * tokens[part] * p.numel()
    assert want["projector."] > 0 and len(cfg.vision.deepstack_visual_indexes) == 2
    f = batch_flops(cfg, grids, seq_lens, label_tokens=0)
    assert (f.vision_linear, f.projector, f.llm_linear) == (want["vision."], want["projector."], want["llm.decoder."])


def test_qwen_vl_by_hand():
    """Qwen-VL: fixed 4×4-patch input, exact-GELU ViT, a 4-query resampler instead of the merger."""
    cfg = _tiny(patch_size=2, temporal_patch_size=1, spatial_merge_size=1, intermediate_size=16, mlp="gelu",
                image_size=8, num_position_embeddings=4, num_queries=4, resampler_heads=2)
    cfg.generation = "qwen_vl"
    f = batch_flops(cfg, [(1, 4, 4)], [5, 3], label_tokens=4)
    # ViT, S = 16 patches, Hv = 8, I = 16, patch features C·p·p = 4:
    #   patch embed 2·16·4·8 = 1024; block 2·S·Hv·(4Hv + 2I) = 2·16·8·64 = 16384
    #   attention over the image: 4·S²·Hv = 4·256·8 = 8192
    assert (f.vision_linear, f.vision_attention) == (1024 + 16384, 8192)
    # Resampler, Q = 4 queries, H = 8: kv_proj 2·S·Hv·H = 2048; k and v 2·2·S·H² = 4096;
    #   q, out_proj and proj 3·2·Q·H² = 1536; cross-attention QKᵀ + AV 2·2·Q·S·H = 2048
    assert f.projector == 2048 + 4096 + 1536 + 2048
    # the LLM as in test_qwen2_vl_by_hand
    assert (f.llm_linear, f.llm_attention, f.output) == (9216, 544, 640)
    assert f.forward == 17408 + 8192 + 9728 + 9216 + 544 + 640


def test_moe_layers_count_the_router_and_the_active_experts():
    """Qwen3-VL MoE: per token and layer 2·H·E for the router plus 2·3·H·I per routed expert (top-k)."""
    from qvl_train.models.tiny import tiny_qwen3_vl_moe_config

    cfg = tiny_qwen3_vl_moe_config()
    l = cfg.llm
    top2 = batch_flops(cfg, [], [10, 6], 0).llm_linear
    l.moe_router_topk = 1
    top1 = batch_flops(cfg, [], [10, 6], 0).llm_linear
    assert top2 - top1 == l.num_layers * 2 * 16 * 3 * l.hidden_size * l.moe_ffn_hidden_size
    l.num_experts, l.moe_router_topk = 0, 0
    l.ffn_hidden_size = l.moe_ffn_hidden_size  # a dense layer as wide as one expert, without the router
    assert top1 - batch_flops(cfg, [], [10, 6], 0).llm_linear == l.num_layers * 2 * 16 * l.hidden_size * 4


def test_sample_flops_is_batch_flops_of_one_sample():
    """`SampleFlops` (what the packer balances by) is `batch_flops` of the sample alone, and a packed
    micro-batch's `batch_flops` is the sum of its samples' (sample-local attention, no cross terms)."""
    import pickle

    from qvl_train.models.tiny import tiny_qwen3_vl_moe_config
    from qvl_train.monitor.flops import SampleFlops

    for cfg in (_tiny(), _tiny_qwen3(), tiny_qwen3_vl_moe_config()):
        f = SampleFlops(cfg)
        a, b = ([(1, 2, 4)], 5, 3), ([(1, 4, 4), (2, 2, 2)], 9, 2)
        assert f(*a) == batch_flops(cfg, a[0], [a[1]], a[2]).forward
        assert f(*a) + f(*b) == batch_flops(cfg, a[0] + b[0], [a[1], b[1]], a[2] + b[2]).forward
        assert pickle.loads(pickle.dumps(f))(*b) == f(*b)


def test_expected_flops_and_routed_experts():
    """The planner's `expected_flops` is `batch_flops` in expectation: whole samples and images give the
    exact count of the micro-batch they describe; the routed-expert share is the top-k experts' work."""
    from qvl_train.models.tiny import tiny_qwen3_vl_moe_config
    from qvl_train.monitor.flops import expected_flops, routed_expert_flops

    cfg = tiny_qwen3_vl_moe_config()
    # 4 samples of 64 tokens = 256 tokens; 25% visual = 64 tokens = 4 images of 16 tokens (grid 8×8 / 2²);
    # labels on half the tokens
    want = batch_flops(cfg, [(1, 8, 8)] * 4, [64] * 4, 128)
    got = expected_flops(cfg, 256, sample_tokens=64, visual_share=0.25, label_share=0.5, image_grid=(1, 8, 8),
                         image_tokens=16)
    assert got.forward == pytest.approx(want.forward, rel=1e-12)
    l = cfg.llm
    assert routed_expert_flops(cfg, 256) == l.num_layers * 2 * 256 * l.moe_router_topk * 3 * l.hidden_size * l.moe_ffn_hidden_size
    assert routed_expert_flops(_tiny(), 256) == 0
