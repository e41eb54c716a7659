"""Analytic layout planner: memory per GPU and step time of a parallel layout, before any GPU is rented.

    python launch/plan.py +experiment=qwen3vl_235b_thinking cluster.gpus=256 cluster.gpu=h100

Context parallelism is modelled as `qvl_train/parallel/context.py` runs it (each rank holds 1/cp of the
tokens and encodes ~1/cp of the patches; optimizer state sharded over dp·cp); training runs cp with tp (+ sp),
pp (and vpp) and MoE models alike.

A layout is (tp, pp, vpp, ep, etp, cp, dp, recompute) at the run's micro-batch (`data.max_tokens`
tokens per packed micro-batch) and global batch (`train.global_batch_tokens`). The model is megatron's
as this framework runs it: bf16 weights, fp32 gradient buffer, AdamW with fp32 master weights and
moments sharded over data-parallel ranks (distributed optimizer), sequence parallelism whenever tp > 1,
flash/varlen attention (no s² scores stored), the ViT and projector on the first pipeline stage.

Memory per GPU, on the most loaded stage (the first: ViT + its LLM layers + the most in-flight
micro-batches under 1F1B):
* weights 2 B, gradients 4 B per parameter of this GPU's shard (dense parts / tp, experts / (ep·etp));
* optimizer 12 B per parameter (fp32 master + two moments), divided by the data-parallel ranks that
  share that parameter (dp·cp for dense parts, the expert-data-parallel size for experts);
* activations: the tensors each LLM layer keeps for backward, per token (`_layer_activation_elements`:
  norm inputs/outputs, q/k/v, unfused RoPE, attention output, SwiGLU; MoE layers keep each routed
  copy), in the activation dtype, divided by tp (sequence parallel) and cp. Full recompute keeps only
  each layer's input plus one layer's working set; selective recompute drops the RoPE and attention
  internals. Times the micro-batches in flight on the first stage: pp under 1F1B,
  pp·(1 + (pp−1)/(pp·vpp)) interleaved;
* the ViT's activations for the micro-batch's visual tokens (4 patches per token), the loss' fp32
  logits at label positions on the last stage, and a fixed 4 GiB for the CUDA context, NCCL buffers
  and allocator fragmentation.

Step time: model FLOPs at `MATMUL_EFFICIENCY` of the GPU's bf16 peak (× 4/3 with full recompute). The
FLOPs are the ones MFU and the packer count (`qvl_train/monitor/flops.py`, `expected_flops`): a
micro-batch of `data.max_tokens` tokens in samples of `Workload.sample_tokens` (causal attention in
each sample's own length), a `visual_share` of them from images of `image_patches` patches (ViT with
its windows, mergers or resampler), logits at the `label_share` positions, MoE layers at their router +
top-k experts; times 3 for training. The routed experts' share runs slower when each expert
sees few tokens per micro-batch (t / (t + `EXPERT_GEMM_HALF`), t = tokens per expert on a rank, which
expert parallelism raises); plus the pipeline bubble (pp−1)/(m·vpp), plus exposed
communication: tensor-parallel all-gather/reduce-scatter per layer (NVLink within a node, the network
beyond), expert all-to-all per MoE layer, the data-parallel gradient reduce-scatter and parameter
all-gather (overlapped with backward except `DP_EXPOSED`; the expert all-to-all except `EP_EXPOSED`).
These are estimates meant to rank layouts
and to catch the ones that cannot fit; `benchmarks/plan_memory.py` checks the memory model against
tensor bytes counted during a real step.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Optional

from qvl_train.config import ModelConfig
from qvl_train.models.params import count_parameters, llm_parts
from qvl_train.monitor.flops import expected_flops, routed_expert_flops

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak
    nvlink_gbs: float  # per GPU, one direction, achievable
    network_gbs: float  # per GPU across nodes (e.g. 400 Gb/s InfiniBand = 50 GB/s)


GPUS = {
    "h100": GPU("H100 80GB SXM", 80, 989, 360, 45),
    "h200": GPU("H200 141GB SXM", 141, 989, 360, 45),
    "a100": GPU("A100 80GB SXM", 80, 312, 240, 22),
    "b200": GPU("B200 192GB", 180, 2250, 720, 90),
}
MATMUL_EFFICIENCY = 0.55  # share of the bf16 peak large transformer GEMMs reach in megatron-core
DP_EXPOSED = 0.2  # share of the data-parallel gradient/parameter traffic not hidden behind backward
EP_EXPOSED = 0.5  # share of the expert all-to-all not overlapped with compute (megatron's a2a overlap)
EXPERT_GEMM_HALF = 256  # tokens per expert GEMM at which grouped GEMMs reach half their large-GEMM speed
FIXED_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
FIT_FRACTION = 0.92  # a layout fits when its prediction is under this share of the GPU's memory


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter (weights, gradients, optimizer state) and per activation element."""

    weights: int = 2
    grads: int = 4
    optimizer: int = 12
    activation: int = 2


BF16_MIXED = Precision()  # bf16 weights, fp32 grads, fp32 master + moments (megatron, GPU runs)
FP32 = Precision(4, 4, 8, 4)  # fp32 weights and grads, AdamW moments (this framework's CPU runs)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: int
    ep: int
    etp: int
    cp: int
    dp: int
    recompute: str  # none | selective | full

    def __str__(self) -> str:
        s = f"tp{self.tp} pp{self.pp}"
        s += f" vpp{self.vpp}" if self.vpp > 1 else ""
        s += f" ep{self.ep}" if self.ep > 1 else ""
        s += f" etp{self.etp}" if self.etp > 1 else ""
        s += f" cp{self.cp}" if self.cp > 1 else ""
        return s + f" dp{self.dp} recompute={self.recompute}"


@dataclass
class Prediction:
    layout: Layout
    memory_gib: dict[str, float]  # weights, grads, optimizer, activations, vision, logits, fixed, total
    step_s: float
    time_s: dict[str, float]  # compute, bubble, tp_comm, ep_comm, dp_comm
    tokens_per_gpu_s: float
    mfu: float
    fits: bool
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes (from the run's data/train config)."""

    micro_tokens: int  # tokens of one packed micro-batch (data.max_tokens)
    global_tokens: int  # tokens of one optimizer step (train.global_batch_tokens)
    visual_share: float = 0.5  # share of LLM tokens that are visual (ViT work: merge² patches each)
    label_share: float = 0.5  # share of tokens carrying loss (logits computed only there)
    sample_tokens: float = 1024  # tokens of one packed sample, E[s²]/E[s] (attention FLOPs; CPU-path memory)
    image_patches: float = 1024  # ViT patches of one image (ViT attention FLOPs; CPU-path memory)


# --------------------------------------------------------------------------- model arithmetic
def _llm_parts(cfg: ModelConfig) -> dict[str, float]:
    """Per-layer attention / dense-MLP / expert parameter counts and the embedding + output size."""
    l = cfg.llm
    h = l.hidden_size
    d = l.head_dim or h // l.num_attention_heads
    q, kv = l.num_attention_heads * d, l.num_query_groups * d
    p = llm_parts(cfg)  # per-layer averages over the layer pattern (Gated DeltaNet and attention layers, shared expert)
    # embedding + output layer + final norm (and an MTP head, on the last stage)
    return {"attn": p["mixer"] + p["norms"], "dense_mlp": p["mlp"], "experts": p["experts"], "embed": p["outside"] + p["mtp"],
            "q": q, "kv": kv}


def _layer_activation_elements(cfg: ModelConfig, recompute: str, attention: str = "flash", sample_tokens: float = 1024) -> float:
    """Activation elements one LLM layer keeps for backward, per token, as this framework's layers
    (megatron-core local spec, unfused RMSNorm / RoPE / SwiGLU) store them — itemised from the tensors
    `benchmarks/plan_memory.py` sees autograd save — before dividing by tp·cp:

    * each RMSNorm keeps its input, the normalised tensor and its output (the next matmul's input): 6h;
    * RoPE keeps cos and sin for q and k: 4·head_dim; the output projection keeps the attention output: q;
    * attention: `flash` (GPU kernels) keeps q, k, v: q + 2kv; `math` (the CPU per-sample SDPA path)
      keeps q, the GQA-expanded k and v and a transposed k copy (3q, the output counted above) and the
      softmax probabilities, heads × the sample's length per token;
    * SwiGLU keeps the fc1 output (2f) and three f-wide products of the unfused gate: 5f; a MoE layer
      keeps, per routed copy (top-k), the permuted token (h), the same 5f of its expert and its output (h).
    Full recompute keeps only the layer input (h); selective recompute drops the attention's own
    tensors (recomputed from the q/k/v projection).
    """
    l = cfg.llm
    h, p = l.hidden_size, _llm_parts(cfg)
    q, kv = p["q"], p["kv"]
    d = l.head_dim or h // l.num_attention_heads
    if recompute == "full":
        return h
    if l.num_experts:
        mlp = l.moe_router_topk * (2 * h + 5 * l.moe_ffn_hidden_size)
    else:
        mlp = 5 * l.ffn_hidden_size
    core = q + 2 * kv if attention == "flash" else 3 * q + l.num_attention_heads * sample_tokens
    full = 6 * h + 4 * d + q + core + mlp
    return full - core if recompute == "selective" else full


def _vision_elements_per_patch(
    cfg: ModelConfig, recompute: str = "none", in_flight: float = 1.0, attention: str = "flash", image_patches: float = 1024
) -> float:
    """ViT activation elements per patch (all blocks), itemised like an LLM layer: two LayerNorms keep
    input and output (4h, h = the ViT width) and the output projection its input (h); RoPE cos/sin
    (4·head_dim); attention q, k, v (3h) with `flash`, or q, k, v, a transposed k (4h) and the
    probabilities (heads × the image's patches) with `math`; the MLP its fc1 output and the activation
    output (2 × inner; SwiGLU: 5 × inner); plus the patch embedding's input row (C·T·P·P pixels); times
    the micro-batches in flight. Full recompute keeps each block's input and one block's working set."""
    v = cfg.vision
    hv = v.hidden_size
    inner = v.intermediate_size or int(hv * v.mlp_ratio)
    d = hv // v.num_heads
    core = 3 * hv if attention == "flash" else 4 * hv + v.num_heads * image_patches
    per_block = 5 * hv + 4 * d + core + (5 if v.mlp == "swiglu" else 2) * inner
    pixels = v.in_channels * v.temporal_patch_size * v.patch_size**2
    if recompute == "full":
        return in_flight * (v.depth * hv + pixels) + per_block
    return in_flight * (v.depth * per_block + pixels)


def _image(cfg: ModelConfig, patches: float) -> tuple[tuple[int, int, int], int]:
    """A representative image of about `patches` patches: its grid (1, h, w) and its LLM tokens. A
    fixed-size input (`vision.image_size`, Qwen-VL) has its own grid; a resampler gives `num_queries`
    tokens, a merger one per merge² patches."""
    v = cfg.vision
    m = v.spatial_merge_size
    if v.image_size:
        side = v.image_size // v.patch_size
    else:
        side = max(m, round(math.sqrt(patches) / m) * m)
    return (1, side, side), v.num_queries or side * side // (m * m)


def _step_flops(cfg: ModelConfig, work: Workload) -> float:
    """Model FLOPs (forward + backward) of one optimizer step: 3 × `expected_flops` of its tokens."""
    grid, image_tokens = _image(cfg, work.image_patches)
    f = expected_flops(cfg, work.global_tokens, sample_tokens=min(work.sample_tokens, work.micro_tokens),
                       visual_share=work.visual_share, label_share=work.label_share, image_grid=grid,
                       image_tokens=image_tokens)
    return 3 * f.forward


# --------------------------------------------------------------------------- prediction
def predict(
    cfg: ModelConfig, layout: Layout, work: Workload, gpu: GPU, gpus_per_node: int = 8, precision: Precision = BF16_MIXED,
    attention: str = "flash",
) -> Prediction:
    """Memory per GPU (first pipeline stage) and step time of `layout` (`attention="math"`: the CPU
    per-sample SDPA path, which keeps the softmax probabilities; GPU kernels keep none)."""
    L, lo = cfg.llm.num_layers, layout
    counts, parts = count_parameters(cfg), _llm_parts(cfg)
    layers_first = math.ceil(L / lo.pp)
    edp = max(1, lo.dp * lo.tp * lo.cp // (lo.ep * lo.etp))  # expert data-parallel size
    dense = (layers_first * (parts["attn"] + parts["dense_mlp"]) + parts["embed"] / (2 if lo.pp > 1 else 1)
             + counts["vision"] + counts["projector"]) / lo.tp
    experts = layers_first * parts["experts"] / (lo.ep * lo.etp)
    pr, act = precision, precision.activation
    mem = {
        "weights": pr.weights * (dense + experts),
        "grads": pr.grads * (dense + experts),
        "optimizer": pr.optimizer * (dense / (lo.dp * lo.cp) + experts / edp),
    }
    tokens_per_rank = work.micro_tokens / lo.cp
    in_flight = lo.pp * (1 + (lo.pp - 1) / (lo.pp * lo.vpp)) if lo.vpp > 1 else lo.pp
    in_flight = min(in_flight, _micro_batches(work, lo))
    elements = partial(_layer_activation_elements, cfg, attention=attention, sample_tokens=work.sample_tokens)
    per_layer = act * elements(lo.recompute) * tokens_per_rank / lo.tp
    working = act * elements("none") * tokens_per_rank / lo.tp if lo.recompute == "full" else 0.0
    mem["activations"] = per_layer * layers_first * in_flight + working
    patches = 4 * work.visual_share * tokens_per_rank
    vit = _vision_elements_per_patch(cfg, lo.recompute, in_flight, attention, work.image_patches)
    mem["vision"] = act * vit * patches / lo.tp
    # the loss keeps megatron's fp32 softmax of the logits at label positions for backward
    mem["logits"] = 0.0 if lo.pp > 1 else 4 * work.label_share * tokens_per_rank * cfg.llm.vocab_size / lo.tp
    mem = {k: v / GiB for k, v in mem.items()}
    mem["fixed"] = FIXED_GIB
    mem["total"] = sum(mem.values())

    world = lo.tp * lo.pp * lo.cp * lo.dp
    flops = _step_flops(cfg, work)
    l = cfg.llm
    expert_flops = 3 * routed_expert_flops(cfg, work.global_tokens)
    slowdown = 1.0
    if l.num_experts:  # tokens one expert GEMM sees: this rank's routed copies, gathered over EP, per local expert
        per_expert = work.micro_tokens / lo.cp * l.moe_router_topk * lo.ep / l.num_experts
        slowdown = (per_expert + EXPERT_GEMM_HALF) / per_expert
    effective = flops - expert_flops + expert_flops * slowdown
    compute = effective * (4 / 3 if lo.recompute == "full" else 1.0) / (world * gpu.bf16_tflops * 1e12 * MATMUL_EFFICIENCY)
    m = _micro_batches(work, lo)
    bubble = compute * (lo.pp - 1) / (m * lo.vpp)
    h = cfg.llm.hidden_size
    tp_bw = (gpu.nvlink_gbs if lo.tp <= gpus_per_node else gpu.network_gbs) * 1e9
    # SP: 2 all-gathers + 2 reduce-scatters per layer forward, as many backward + 2 re-gathers for the weight gradients
    tp_comm = 0.0 if lo.tp == 1 else 10 * (lo.tp - 1) / lo.tp * tokens_per_rank * h * 2 * (L / lo.pp) * m / tp_bw
    ep_comm = 0.0
    if cfg.llm.num_experts and lo.ep > 1:
        inside = min(1.0, gpus_per_node / (lo.tp * lo.ep))  # EP peers spaced by tp: this share is on the node
        per_byte = inside / (gpu.nvlink_gbs * 1e9) + (1 - inside) / (gpu.network_gbs * 1e9)
        ep_comm = (EP_EXPOSED * 4 * (lo.ep - 1) / lo.ep * tokens_per_rank / lo.tp * cfg.llm.moe_router_topk * h * 2
                   * (L / lo.pp) * m * per_byte)
    dp_bytes = (dense * (lo.dp * lo.cp > 1) + experts * (edp > 1)) * (4 + 2)  # fp32 grad reduce-scatter + bf16 param all-gather
    dp_comm = DP_EXPOSED * dp_bytes / (gpu.network_gbs * 1e9)
    step = compute + bubble + tp_comm + ep_comm + dp_comm
    times = {"compute": compute, "bubble": bubble, "tp_comm": tp_comm, "ep_comm": ep_comm, "dp_comm": dp_comm}
    return Prediction(
        layout=lo, memory_gib=mem, step_s=step, time_s=times,
        tokens_per_gpu_s=work.global_tokens / step / world,
        mfu=flops / step / (world * gpu.bf16_tflops * 1e12),
        fits=mem["total"] <= FIT_FRACTION * gpu.memory_gib,
    )


def _micro_batches(work: Workload, lo: Layout) -> int:
    """Micro-batches each data-parallel rank runs per step."""
    return max(1, work.global_tokens // (work.micro_tokens * lo.dp))


def check_layout(cfg: ModelConfig, lo: Layout, work: Workload, gpus_per_node: int = 8) -> Optional[str]:
    """Why `lo` cannot run this model / workload (None when it can)."""
    l, L = cfg.llm, cfg.llm.num_layers
    if l.num_attention_heads % lo.tp or l.num_query_groups % lo.tp:
        return f"tp={lo.tp} does not divide the {l.num_attention_heads} heads and {l.num_query_groups} kv groups"
    if cfg.vision.num_heads % lo.tp:
        return f"tp={lo.tp} does not divide the ViT's {cfg.vision.num_heads} heads"
    if lo.cp > 1 and "linear_attention" in l.layer_types:
        return f"cp={lo.cp}: context parallelism does not run Gated DeltaNet (linear_attention) layers"
    if L < lo.pp * lo.vpp:
        return f"pp·vpp={lo.pp * lo.vpp} exceeds the {L} layers"
    if lo.vpp > 1 and L % (lo.pp * lo.vpp):
        return f"{L} layers do not split into pp·vpp={lo.pp * lo.vpp} equal chunks"
    if lo.ep > 1 and (not l.num_experts or l.num_experts % lo.ep):
        return f"ep={lo.ep} does not divide the {l.num_experts} experts"
    world = lo.tp * lo.pp * lo.cp * lo.dp
    if (lo.tp * lo.cp * lo.dp) % (lo.ep * lo.etp):
        return f"ep·etp={lo.ep * lo.etp} does not divide the tp·cp·dp={lo.tp * lo.cp * lo.dp} ranks of a pipeline stage"
    if world % (lo.ep * lo.etp * lo.pp):
        return f"ep·etp·pp={lo.ep * lo.etp * lo.pp} does not divide the world size {world}"
    if work.global_tokens % (work.micro_tokens * lo.dp):
        return (f"the global batch of {work.global_tokens} tokens is not a whole number of "
                f"{work.micro_tokens}-token micro-batches per dp rank")
    if lo.vpp > 1 and _micro_batches(work, lo) % lo.pp:
        return "the interleaved schedule needs the micro-batches per rank to be a multiple of pp"
    return None


def candidates(cfg: ModelConfig, world: int, work: Workload, gpus_per_node: int = 8) -> Iterable[Layout]:
    """Every valid layout of `world` GPUs (tp within a node, powers of two, etp=1, cp ≤ 2)."""
    pow2 = [2**i for i in range(0, 11)]
    experts = cfg.llm.num_experts
    for tp, pp, vpp, cp in itertools.product(
        [t for t in pow2 if t <= gpus_per_node], [p for p in range(1, 33) if world % p == 0], [1, 2, 4, 8], [1, 2]
    ):
        if world % (tp * pp * cp):
            continue
        dp = world // (tp * pp * cp)
        for ep in ([e for e in pow2 if e <= experts] if experts else [1]):
            for recompute in ("none", "selective", "full"):
                lo = Layout(tp, pp, vpp, ep, 1, cp, dp, recompute)
                if check_layout(cfg, lo, work, gpus_per_node) is None:
                    yield lo


def plan(cfg: ModelConfig, world: int, work: Workload, gpu: GPU, gpus_per_node: int = 8, top: int = 5) -> list[Prediction]:
    """The `top` fastest layouts that fit, fastest first (and nothing when none fits)."""
    preds = [predict(cfg, lo, work, gpu, gpus_per_node) for lo in candidates(cfg, world, work, gpus_per_node)]
    fitting = sorted((p for p in preds if p.fits), key=lambda p: (p.step_s, p.memory_gib["total"]))
    return fitting[:top]


def table(preds: list[Prediction], gpu: GPU) -> str:
    """Markdown table of predictions."""
    head = "| layout | mem GiB (w / g / opt / act / vit / logits) | fits | step s | tok/s/GPU | MFU | bubble | comm s (tp / ep / dp) |"
    lines = [head, "|" + "---|" * 8]
    for p in preds:
        m, t = p.memory_gib, p.time_s
        lines.append(
            f"| {p.layout} | {m['total']:.1f} ({m['weights']:.1f} / {m['grads']:.1f} / {m['optimizer']:.1f} / "
            f"{m['activations']:.1f} / {m['vision']:.1f} / {m['logits']:.1f}) | "
            f"{'yes' if p.fits else f'NO (> {FIT_FRACTION:.0%} of {gpu.memory_gib:g})'} | "
            f"{p.step_s:.2f} | {p.tokens_per_gpu_s:,.0f} | {p.mfu:.1%} | {t['bubble'] / p.step_s:.0%} | "
            f"{t['tp_comm']:.2f} / {t['ep_comm']:.2f} / {t['dp_comm']:.2f} |"
        )
    return "\n".join(lines)
