"""Model FLOPs of a packed micro-batch (Qwen-VL, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and MFU.

Counted analytically from the config and the batch's real structure (`grid_thw`, `cu_seqlens`,
label count), so images of different sizes, windows and sample lengths cost what they cost:

ViT (P patches = Σ t·h·w over `grid_thw`):
  * patch embed: a linear C·T·p·p → Hv per patch: 2·P·(C·T·p·p)·Hv.
  * per block: qkv 2·P·Hv·3Hv, proj 2·P·Hv·Hv, MLP 2·P·Hv·I·2 (QuickGELU fc1/fc2) or 2·P·Hv·I·3
    (SwiGLU gate/up/down).
  * attention, bidirectional, within each segment of s patches: QKᵀ 2·s²·Hv + AV 2·s²·Hv = 4·s²·Hv.
    Segments are frames (h·w patches per temporal patch) for Qwen2-VL and for Qwen2.5-VL's
    `fullatt_block_indexes`; Qwen2.5-VL's other blocks use windows of `window_size/patch/merge`
    merged tokens per side (edge windows partial), exactly as the model cuts them.
Merger (P/m² tokens of width W = m²·Hv): 2·(P/m²)·W·W + 2·(P/m²)·W·H.
LLM (T = real tokens = cu_seqlens[-1]; padding slots are not counted: they are not model work):
  * per layer: q and o 2·T·H·H each, k and v 2·T·H·(g·d) each (GQA, g query groups of head dim
    d), SwiGLU 2·T·H·F·3; a MoE layer (Qwen3-VL-MoE) instead its router 2·T·H·E and the k
    active experts 2·T·H·I·3·k (k = moe_router_topk, I = moe_ffn_hidden_size): active work only.
  * attention, causal, within each sample of s tokens: **the causal half is counted**,
    QKᵀ + AV = 2·(s²/2)·(n·d)·2 = 2·s²·(n·d) for n query heads — what a causal kernel
    (flash-attention) computes. Counting the full square would double this term.
  * Gated DeltaNet layers (Qwen3.5: `layer_types[i] == "linear_attention"`, `models/gdn.py`) in place
    of q/k/v/o and attention: projections 2·T·H·(2·Hk·Dk + 2·Hv·Dv + 2·Hv) (qkv, z, b, a) and
    2·T·Hv·Dv·H (out) in `llm_linear`; in `llm_attention` the depthwise conv 2·T·K·(2·Hk·Dk + Hv·Dv)
    and the chunked delta rule per token and value head: state reads and write 3·2·Dk·Dv plus the
    intra-chunk work of chunks of C = 64 (K_βKᵀ and QKᵀ 2·C·Dk each, the two triangular solves
    C·(Dk + Dv), scores·values 2·C·Dv) = 6·Dk·Dv + C·(5·Dk + 3·Dv): linear in the sample length.
  * output layer only at the label positions (the model computes logits only there):
    2·label_tokens·H·V. The embedding lookup is free.
Norms, biases, activations, RoPE and softmax are not counted (a few tenths of a percent).
Qwen3-VL configs are counted by the same rules (its `head_dim`, and one merger per DeepStack tap
assumed the size of the main merger); the learned position-embedding interpolation is not counted.
Qwen-VL (`_qwen_vl_vision`): the same ViT rules with an exact-GELU MLP and one attention segment
per image, and its resampler in place of the merger.

Training = 3 × forward (backward = 2 × forward for every matmul), whatever the stage freezes: the
usual MFU convention, so stage 3 (frozen ViT) and stage 1 report the work of full training, which
overstates the real work of the frozen towers. Activation recompute would add about one more
forward on the recomputed layers; it is *not* counted (MFU counts model FLOPs, not hardware FLOPs).

MFU = achieved model FLOP/s per device ÷ peak dense FLOP/s per device (`train.peak_tflops`, or
`PEAK_TFLOPS` by `torch.cuda.get_device_name()`: bf16 dense tensor-core peaks).

One FLOP model, three users
---------------------------
These rules are the framework's only FLOP arithmetic:
* MFU (`engines/megatron.py`, `benchmarks/gpu_check.py`): `packed_batch_flops` of each micro-batch;
* the packer's compute balancing (`data_pipelines/packing.py`): the data side never imports
  `qvl_train`, so the training side hands it `SampleFlops(cfg.model)`, a picklable callable
  `(grid_thw, tokens, label_tokens) -> forward FLOPs` of ONE sample = `batch_flops` of that sample
  alone. The packer then balances the work of the model actually trained (its ViT windows, DeepStack
  mergers, resampler, MoE router + top-k experts), not the shapes of some other model;
* the layout planner (`qvl_train/tools/planner.py`): `expected_flops` of a micro-batch described by
  averages (sample length, image size, visual and label shares), built from `batch_flops` calls.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

from qvl_train import generations
from qvl_train.config import ModelConfig

__all__ = [
    "Flops", "SampleFlops", "batch_flops", "expected_flops", "packed_batch_flops", "peak_tflops", "routed_expert_flops",
    "PEAK_TFLOPS",
]

GDN_CHUNK = 64  # the chunk length of the chunked gated delta rule (models/gdn.py CHUNK_SIZE, fla's kernel)

# bf16 dense peak TFLOP/s per device (datasheets; no sparsity). Matched in order against the CUDA
# device name, so the specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)


@dataclass
class Flops:
    """Forward FLOPs of one micro-batch, by part (Python ints: exact)."""

    vision_linear: int = 0  # patch embed + qkv/proj/MLP of every block
    vision_attention: int = 0
    projector: int = 0
    llm_linear: int = 0  # q/k/v/o and SwiGLU of every layer
    llm_attention: int = 0
    output: int = 0  # the output layer at label positions

    @property
    def forward(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def training(self) -> int:
        """Forward + backward model FLOPs (3 × forward; recompute not counted)."""
        return 3 * self.forward

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def scaled(self, k: float) -> "Flops":
        """Every part times `k` (floats: expectations, as the planner's `expected_flops` forms them)."""
        return Flops(**{f.name: getattr(self, f.name) * k for f in fields(self)})


def _window_sq_sum(extent: int, window: int) -> int:
    """Σ of squared window extents along one axis of `extent` merged tokens (last one partial)."""
    full, rest = divmod(extent, window)
    return full * window * window + rest * rest


def _qwen_vl_vision(cfg: ModelConfig, grid_thw: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """Qwen-VL: every image is S = h·w patches (1024) through the ViT (full attention per image), then
    the resampler: kv_proj 2·S·Hv·H, k/v projections 2·2·S·H², q projection, out_proj and proj
    2·Q·H² each, cross-attention QKᵀ + AV 2·2·Q·S·H (Q queries, H the LLM width)."""
    v, h, q = cfg.vision, cfg.llm.hidden_size, cfg.vision.num_queries
    hv, inner = v.hidden_size, v.intermediate_size or int(v.hidden_size * v.mlp_ratio)
    linear = attention = projector = 0
    for t, gh, gw in grid_thw:
        s = t * gh * gw
        linear += 2 * s * v.in_channels * v.patch_size**2 * hv + v.depth * 2 * s * hv * (4 * hv + 2 * inner)
        attention += v.depth * 4 * s * s * hv
        projector += 2 * s * hv * h + 4 * s * h * h + 6 * q * h * h + 4 * q * s * h
    return linear, attention, projector


def _vision(cfg: ModelConfig, grid_thw: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    if generations.get(cfg.generation).projector == "resampler":  # Qwen-VL
        return _qwen_vl_vision(cfg, grid_thw)
    v = cfg.vision
    hv, m = v.hidden_size, v.spatial_merge_size
    unit = m * m
    inner = v.intermediate_size or int(hv * v.mlp_ratio)
    patches = sum(t * h * w for t, h, w in grid_thw)
    if patches == 0:
        return 0, 0, 0
    embed = 2 * patches * v.in_channels * v.temporal_patch_size * v.patch_size**2 * hv
    per_block = 2 * patches * hv * (3 * hv + hv + inner * (3 if v.mlp == "swiglu" else 2))
    linear = embed + v.depth * per_block

    frame_sq = sum(t * (h * w) ** 2 for t, h, w in grid_thw)  # Σ s² over frames, in patches
    if v.window_size is None:
        attention = v.depth * 4 * frame_sq * hv
    else:
        win = v.window_size // v.patch_size // m  # merged tokens per window side
        # A window of a×b merged tokens holds a·b·m² patches; Σ over the a×b grid of windows of
        # (a·b)² factorises into (Σ a²)(Σ b²) per frame.
        window_sq = sum(
            t * unit * unit * _window_sq_sum(h // m, win) * _window_sq_sum(w // m, win) for t, h, w in grid_thw
        )
        full = len(set(v.fullatt_block_indexes))
        attention = 4 * hv * (full * frame_sq + (v.depth - full) * window_sq)

    tokens, width = patches // unit, hv * unit
    mergers = 1 + len(v.deepstack_visual_indexes)  # Qwen3-VL DeepStack: one merger per tapped block
    projector = mergers * (2 * tokens * width * width + 2 * tokens * width * cfg.llm.hidden_size)
    return linear, attention, projector


def _mlp_weights(cfg: ModelConfig) -> tuple[int, int]:
    """(weights every token multiplies, weights of the routed experts it passes) of one LLM MLP:
    a dense SwiGLU is (3·H·F, 0); a MoE layer is its router H·E and k experts of 3·H·I each."""
    l = cfg.llm
    if l.num_experts:
        return l.hidden_size * l.num_experts, l.moe_router_topk * 3 * l.hidden_size * l.moe_ffn_hidden_size
    return 3 * l.hidden_size * l.ffn_hidden_size, 0


def routed_expert_flops(cfg: ModelConfig, tokens: float) -> float:
    """Forward FLOPs of the routed experts over `tokens` LLM tokens (part of `Flops.llm_linear`; 0 for
    a dense LLM). The planner slows this share down when each expert sees few tokens."""
    return cfg.llm.num_layers * 2 * tokens * _mlp_weights(cfg)[1]


def _gdn_flops(cfg: ModelConfig, tokens: float) -> tuple[float, float]:
    """(projections, conv + chunked delta rule) forward FLOPs of ONE Gated DeltaNet layer over `tokens`."""
    l = cfg.llm
    hk, hv, dk, dv = l.linear_num_key_heads, l.linear_num_value_heads, l.linear_key_head_dim, l.linear_value_head_dim
    projections = 2 * tokens * l.hidden_size * (2 * hk * dk + 2 * hv * dv + 2 * hv + hv * dv)
    conv = 2 * tokens * l.linear_conv_kernel_dim * (2 * hk * dk + hv * dv)
    delta_rule = tokens * hv * (6 * dk * dv + GDN_CHUNK * (5 * dk + 3 * dv))
    return projections, conv + delta_rule


def batch_flops(
    cfg: ModelConfig, grid_thw: Sequence[Sequence[int]], seq_lens: Sequence[int], label_tokens: int
) -> Flops:
    """Forward FLOPs of one packed micro-batch: media grids `[k, 3]`, per-sample token counts, labels."""
    l = cfg.llm
    h, heads = l.hidden_size, l.num_attention_heads
    d = l.head_dim or h // heads
    q, kv = heads * d, l.num_query_groups * d
    tokens = sum(seq_lens)
    mlp = sum(_mlp_weights(cfg))  # dense SwiGLU, or the router + the top-k experts a token passes
    gdn = sum(t == "linear_attention" for t in l.layer_types)  # Gated DeltaNet layers (Qwen3.5)
    full = l.num_layers - gdn
    gdn_linear, gdn_mixing = _gdn_flops(cfg, tokens)
    linear = 2 * tokens * (h * q + 2 * h * kv + q * h) * full + 2 * tokens * mlp * l.num_layers
    attention = full * 2 * sum(s * s for s in seq_lens) * heads * d + gdn * gdn_mixing  # causal half
    vision_linear, vision_attention, projector = _vision(cfg, grid_thw)
    return Flops(
        vision_linear=vision_linear,
        vision_attention=vision_attention,
        projector=projector,
        llm_linear=linear + gdn * gdn_linear,
        llm_attention=attention,
        output=2 * label_tokens * h * l.vocab_size,
    )


def packed_batch_flops(cfg: ModelConfig, batch) -> Flops:
    """`batch_flops` of a `data_pipelines.schema.PackedBatch`."""
    cu = [int(x) for x in batch.cu_seqlens.tolist()]
    seq_lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    grids = [tuple(int(x) for x in row) for row in batch.grid_thw.reshape(-1, 3).tolist()]
    return batch_flops(cfg, grids, seq_lens, int(batch.num_label_tokens))


@dataclass(frozen=True, eq=False)
class SampleFlops:
    """The packer's FLOP model of `cfg`: forward FLOPs of ONE sample, `batch_flops` of it alone.

    `SampleFlops(cfg.model)(grid_thw, tokens, label_tokens)`: its media grids `(t, h, w)` in patches
    (images t = 1), its LLM tokens (text + visual) and its label tokens. This is the callable the
    training side passes to `data_pipelines.stream.StepLoader(..., flop_model=...)` (the data side
    cannot import this module): it balances compute across dp ranks by exactly the FLOPs MFU counts.
    The ×3 of training cancels in every ratio the packer forms, so the forward is returned. A plain
    dataclass of a `ModelConfig`, so it pickles (loader worker processes, plan-ahead threads).
    """

    model: ModelConfig

    def __call__(self, grid_thw: Sequence[Sequence[int]], tokens: int, label_tokens: int) -> float:
        return float(batch_flops(self.model, grid_thw, [tokens], label_tokens).forward)


def expected_flops(
    cfg: ModelConfig, tokens: float, *, sample_tokens: float, visual_share: float, label_share: float,
    image_grid: Sequence[int], image_tokens: int,
) -> Flops:
    """Forward FLOPs of `tokens` LLM tokens described by averages, for the layout planner.

    Samples of `sample_tokens` tokens (at most `tokens`; for causal attention the right length is
    E[s²]/E[s]), a `visual_share` of the tokens from images of patch grid `image_grid` giving
    `image_tokens` LLM tokens each, a `label_share` carrying loss. Every part is a `batch_flops` of one
    sample / one image scaled by how many fit in `tokens`: the same per-operation rules as MFU and the
    packer, in expectation (so the result has float parts).
    """
    s = max(1.0, min(float(sample_tokens), float(tokens)))
    llm = batch_flops(cfg, [], [s], 0).scaled(tokens / s)
    out = batch_flops(cfg, [], [], label_share * tokens)
    images = visual_share * tokens / image_tokens if image_tokens else 0.0
    media = batch_flops(cfg, [tuple(image_grid)], [], 0).scaled(images) if images else Flops()
    return llm + out + media


def peak_tflops(configured: float = 0.0, device_name: Optional[str] = None) -> Optional[float]:
    """Peak dense TFLOP/s per device: `configured` if > 0, else the table entry for this GPU, else None
    (CPU or an unknown GPU: MFU is then not reported)."""
    if configured > 0:
        return float(configured)
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, peak in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None
