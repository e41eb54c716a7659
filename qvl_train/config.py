"""Typed configuration: one dataclass per component, registered in Hydra's ConfigStore.

`launch/train.py` composes the YAML groups under `configs/`, turns the result into a `TrainConfig`
once (`OmegaConf.to_object`), and hands every component only its own sub-config. Each dataclass
validates itself in `__post_init__`; checks that need several components (world size vs layout,
heads vs tp) live in `TrainConfig.validate(world_size)` and run before any process group exists.
Every message names the key to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from data_pipelines.schema import DataConfig, DataSource
from qvl_train import generations

STAGES = ("stage1_align", "stage2_multitask", "stage3_sft")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
DECAY_STYLES = ("linear", "cosine", "sqrt")
RECOMPUTE = ("none", "selective", "full")
FP8_MODES = ("off", "auto", "hybrid", "e4m3")
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")
LORA_MODULES = ("llm", "projector", "vision")


class ConfigError(ValueError):
    """A configuration a run cannot start with; the message says which key to change."""


@dataclass
class VisionConfig:
    """The vision transformer: 2-D RoPE, Conv3d patch embed; LayerNorm + QuickGELU MLP (Qwen2-VL) or
    RMSNorm + SwiGLU MLP + window attention (Qwen2.5-VL) by the fields below."""

    depth: int = 32
    """Number of ViT blocks."""
    hidden_size: int = 1280
    """ViT width."""
    num_heads: int = 16
    """ViT attention heads (must be divisible by parallel.tp)."""
    mlp_ratio: float = 4.0
    """ViT MLP width = mlp_ratio · hidden_size."""
    patch_size: int = 14
    """Patch side in pixels."""
    temporal_patch_size: int = 2
    """Frames per patch (images are repeated this many times)."""
    spatial_merge_size: int = 2
    """The merger joins spatial_merge_size² neighbouring patches into one LLM token."""
    in_channels: int = 3
    """Image channels."""
    norm_eps: float = 1e-6
    """LayerNorm / RMSNorm epsilon (ViT blocks and the merger's ln_q)."""
    norm: str = "layernorm"
    """Norm of the ViT blocks and the merger: layernorm (Qwen2-VL) | rmsnorm (Qwen2.5-VL)."""
    mlp: str = "quick_gelu"
    """ViT MLP: quick_gelu (fc1 → QuickGELU → fc2, Qwen2-VL) | swiglu (gate/up/down with biases,
    Qwen2.5-VL) | gelu_tanh (fc1 → tanh-approximated GELU → fc2, Qwen3-VL) | gelu (exact GELU, Qwen-VL)."""
    intermediate_size: Optional[int] = None
    """ViT MLP inner width; None = mlp_ratio · hidden_size (Qwen2-VL). Qwen2.5-VL sets it (3420)."""
    window_size: Optional[int] = None
    """Window-attention side in pixels (Qwen2.5-VL: 112 = 4×4 merged tokens); None = every block
    attends over the whole frame (Qwen2-VL)."""
    fullatt_block_indexes: list[int] = field(default_factory=list)
    """With window_size: the blocks that attend over the whole frame (Qwen2.5-VL: [7, 15, 23, 31])."""
    tokens_per_second: int = 2
    """Qwen2.5-VL video: temporal M-RoPE ids advance tokens_per_second per second of video
    (recorded for HF export; the data side computes the ids)."""
    patch_bias: bool = False
    """Bias on the Conv3d patch embedding (Qwen3-VL: true; Qwen2/2.5-VL: false)."""
    num_position_embeddings: Optional[int] = None
    """Qwen3-VL: rows of the learned absolute position embedding (a square grid, 2304 = 48²),
    bilinearly interpolated to each image's patch grid and added after the patch embedding;
    None = no absolute position embedding (Qwen2/2.5-VL). Qwen-VL: 256 rows (16×16), bicubically
    interpolated to its fixed 32×32 patch grid."""
    deepstack_visual_indexes: list[int] = field(default_factory=list)
    """Qwen3-VL DeepStack: ViT blocks whose outputs pass their own mergers (LayerNorm after the
    2×2 shuffle) and are added to the hidden states after LLM layer i (i-th entry) at the visual
    token positions ([8, 16, 24] for the released 4B/8B)."""
    image_size: Optional[int] = None
    """Qwen-VL: the fixed square input side in pixels (448: 32×32 patches of 14); None = dynamic
    resolution (Qwen2-VL and later)."""
    num_queries: int = 0
    """Qwen-VL resampler: learnable queries = LLM tokens per image (256, a square); 0 = no resampler."""
    resampler_heads: int = 0
    """Qwen-VL resampler attention heads; 0 = LLM hidden_size / 128 (32 for Qwen-7B), as released."""


@dataclass
class LLMConfig:
    """The Qwen2 language model (RMSNorm, SwiGLU, GQA with qkv bias, M-RoPE)."""

    num_layers: int = 28
    """Decoder layers."""
    hidden_size: int = 3584
    """Model width."""
    ffn_hidden_size: int = 18944
    """SwiGLU inner width."""
    num_attention_heads: int = 28
    """Query heads (must be divisible by parallel.tp)."""
    num_query_groups: int = 4
    """Key/value heads (GQA); must be divisible by parallel.tp."""
    vocab_size: int = 152064
    """Embedding rows (the Qwen vocabulary 151,643 + specials, padded)."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    """Frequency pairs for t | h | w (sums to head_dim / 2)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qkv_bias: bool = True
    """Bias on the q/k/v projections (Qwen2)."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer (2B) or not (7B/72B)."""
    head_dim: Optional[int] = None
    """Attention head width (megatron kv_channels); None = hidden_size / num_attention_heads.
    Qwen3 sets it (128) independently of the width (e.g. 4B: 2560 / 32 heads)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3)."""
    mrope_interleaved: bool = False
    """Qwen3-VL M-RoPE: rotary pairs take t/h/w positions interleaved (t,h,w,t,h,w,…; HF
    `apply_interleaved_mrope`) instead of in contiguous t | h | w blocks (Qwen2/2.5-VL)."""
    num_experts: int = 0
    """Mixture of experts (Qwen3-VL MoE): routed experts per layer; 0 = dense SwiGLU MLP."""
    moe_ffn_hidden_size: int = 0
    """SwiGLU inner width of one expert."""
    moe_router_topk: int = 0
    """Experts each token is routed to (softmax over all experts, top-k, weights renormalised over the k)."""
    moe_aux_loss_coeff: float = 0.001
    """Load-balancing (Switch-style) aux loss coefficient per MoE layer, as megatron-core computes it
    (Qwen3-VL-MoE's `router_aux_loss_coef`, 0.001); 0 = off. Reported as `loss/moe_aux`, never
    mixed into the reported LM loss."""
    shared_expert_ffn_hidden_size: int = 0
    """Qwen3.5-MoE: SwiGLU width of the shared expert every token goes through besides its routed experts,
    scaled by a per-token sigmoid gate (HF `shared_expert_intermediate_size`); 0 = no shared expert."""
    layer_types: list[str] = field(default_factory=list)
    """Qwen3.5 hybrid LLM: per layer `linear_attention` (Gated DeltaNet) or `full_attention` (HF
    `config.layer_types`); empty = every layer full attention (the older generations)."""
    linear_num_key_heads: int = 0
    """Gated DeltaNet query/key heads (HF `linear_num_key_heads`)."""
    linear_num_value_heads: int = 0
    """Gated DeltaNet value heads (HF `linear_num_value_heads`; a multiple of the key heads)."""
    linear_key_head_dim: int = 128
    """Gated DeltaNet query/key head width."""
    linear_value_head_dim: int = 128
    """Gated DeltaNet value head width."""
    linear_conv_kernel_dim: int = 4
    """Width of the Gated DeltaNet short causal depthwise convolution over q/k/v."""
    attn_output_gate: bool = False
    """Qwen3.5 gated attention: q_proj also emits a per-channel gate; attention output × sigmoid(gate)."""
    partial_rotary_factor: float = 1.0
    """Fraction of each attention head's channels that RoPE rotates (Qwen3.5: 0.25)."""
    mtp_num_layers: int = 0
    """Multi-token-prediction layers of the checkpoint (Qwen3.5: 1; HF `mtp_num_hidden_layers`); 0 = none."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (`models/lora.py`): `W x + (alpha / rank) · B A x` on the chosen linear layers,
    base weights frozen. Off while rank = 0; `model.lora.rank=8` turns it on."""

    rank: int = 0
    """Adapter rank r (A: `[r, in]`, B: `[out, r]`); 0 = no adapters (full-parameter training)."""
    alpha: float = 16.0
    """Scaling numerator: the adapter's output is multiplied by alpha / rank (as PEFT's `lora_alpha`)."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers that get adapters, by megatron name: linear_qkv, linear_proj (attention), linear_fc1,
    linear_fc2 (MLP; in the projector its two layers), in_proj, out_proj (the projections of Qwen3.5's Gated
    DeltaNet layers, `models/gdn.py`; nothing in other models)."""
    modules: list[str] = field(default_factory=lambda: ["llm", "projector"])
    """Towers whose target layers get adapters: llm, projector, vision. Everything else is frozen, the ViT
    included unless listed here."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"model.lora.rank={self.rank} must be > 0 to train adapters (or 0 for none)")
        if not self.enabled:
            return
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha={self.alpha} must be > 0 (the adapter scale is alpha / rank)")
        for key, given, valid in (("targets", self.targets, LORA_TARGETS), ("modules", self.modules, LORA_MODULES)):
            unknown = [x for x in given if x not in valid]
            if unknown or not given or len(set(given)) != len(given):
                raise ConfigError(
                    f"model.lora.{key}={list(given)}: give a non-empty list without repeats of {', '.join(valid)}"
                    + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else "")
                )


@dataclass
class ModelConfig:
    """Which model to build and how to initialise it (config group `model/`)."""

    generation: str = "qwen2_vl"
    """A registered generation (`qvl_train/generations/`): qwen_vl, qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision encoder."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Language model."""
    init_std: float = 0.02
    """Std of the normal init of weight matrices (norms start at 1, biases at 0)."""
    init_from: Optional[str] = None
    """Checkpoint step directory or checkpoint root to take weights from when the run has none yet."""
    attention_backend: str = "auto"
    """Core attention for packed sequences: auto | sdpa_loop (CPU) | flex | varlen (CUDA, PyTorch flash varlen)
    | flash_attn (CUDA, the flash-attn package) | te (CUDA, Transformer Engine's fused attention); auto takes
    te, else flash_attn, else varlen, else flex on CUDA where each is installed."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters (off by default); with them only the adapters train."""
    image_token_id: Optional[int] = None
    """Id of the token whose positions take the image embeddings; None = the generation tokenizer's
    image pad (`DataSpec.image_tokens`: `<|image_pad|>`, Qwen-VL's `<imgpad>`)."""
    video_token_id: Optional[int] = None
    """Id of the token whose positions take the video embeddings; None = the tokenizer's `<|video_pad|>`
    (stays None for a generation without video)."""
    mtp_loss_weight: float = 0.0
    """Weight w of the multi-token-prediction loss (Qwen3.5's MTP head, `models/mtp.py`; needs
    `llm.mtp_num_layers = 1`): the objective is LM loss + w · MTP loss, both global per-token means over
    their own label counts; `loss` in metrics.jsonl stays the LM loss, the MTP loss is `loss/mtp`. The head
    is built (and import-hf loads the checkpoint's `mtp.*`, export-hf writes them back) only when w > 0;
    at w = 0 the model has no head, import skips `mtp.*` with a warning and an export carries none
    (train with a small w to keep the head through a run). engine=megatron, dense models, parallel.cp=1."""
    mtp_head: bool = False
    """Build the MTP head although `mtp_loss_weight` = 0 (it is then not run): set by import-hf for a dense
    checkpoint that carries `mtp.*`, so import → export round-trips the head and a run with
    `model.mtp_loss_weight > 0` starts from it. A training run refuses it at w = 0 (an untrained head
    would take weight decay); leave it false in run configs."""

    @property
    def image_pad_id(self) -> int:
        """`image_token_id`, or the generation tokenizer's image pad (`DataSpec.image_tokens[1]`).

        Resolved here rather than written into the field: the field's default must stay None in the
        config schema, whichever generation a run composes."""
        from data_pipelines import generations as data_generations

        if self.image_token_id is not None:
            return self.image_token_id
        data = data_generations.get(self.generation)
        return data.special_tokens()[data.image_tokens[1]]

    @property
    def video_pad_id(self) -> Optional[int]:
        """`video_token_id`, or the tokenizer's video pad; None for a generation without video."""
        from data_pipelines import generations as data_generations

        if self.video_token_id is not None:
            return self.video_token_id
        data = data_generations.get(self.generation)
        return None if data.video is None else data.special_tokens()[data.video_tokens[1]]

    def __post_init__(self) -> None:
        try:
            spec = generations.get(self.generation)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.attention_backend not in ("auto", "sdpa_loop", "flex", "varlen", "flash_attn", "te"):
            raise ConfigError(
                f"model.attention_backend={self.attention_backend!r}; valid: auto, sdpa_loop, flex, varlen, flash_attn, te"
            )
        llm = self.llm
        head_dim, rem = divmod(llm.hidden_size, llm.num_attention_heads)
        if rem and llm.head_dim is None:
            raise ConfigError("model.llm.hidden_size must be divisible by model.llm.num_attention_heads")
        head_dim = llm.head_dim or head_dim
        rotary = int(head_dim * llm.partial_rotary_factor)  # Qwen3.5 rotates a quarter of each head
        if 2 * sum(llm.mrope_section) != rotary:
            raise ConfigError(
                f"model.llm.mrope_section={list(llm.mrope_section)} must sum to head_dim·partial_rotary_factor/2 = {rotary // 2}"
            )
        if llm.num_attention_heads % llm.num_query_groups:
            raise ConfigError("model.llm.num_attention_heads must be a multiple of model.llm.num_query_groups")
        if self.vision.hidden_size % self.vision.num_heads:
            raise ConfigError("model.vision.hidden_size must be divisible by model.vision.num_heads")
        if self.vision.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"model.vision.norm={self.vision.norm!r}; valid: layernorm, rmsnorm")
        if self.vision.mlp not in ("quick_gelu", "swiglu", "gelu_tanh", "gelu"):
            raise ConfigError(f"model.vision.mlp={self.vision.mlp!r}; valid: quick_gelu, swiglu, gelu_tanh, gelu")
        if self.mtp_loss_weight < 0:
            raise ConfigError(f"model.mtp_loss_weight={self.mtp_loss_weight} must be >= 0 (0 = no MTP head)")
        if (self.mtp_loss_weight > 0 or self.mtp_head) and llm.mtp_num_layers <= 0:
            raise ConfigError(
                f"model.mtp_loss_weight={self.mtp_loss_weight} trains a multi-token-prediction head, but "
                f"model.llm.mtp_num_layers={llm.mtp_num_layers}: set model.llm.mtp_num_layers=1 (a generation with "
                "an MTP head: Qwen3.5 / 3.6) or model.mtp_loss_weight=0"
            )
        if spec.check is not None:
            spec.check(self)
        if self.vision.window_size is not None:
            unit = self.vision.patch_size * self.vision.spatial_merge_size
            if self.vision.window_size % unit:
                raise ConfigError(
                    f"model.vision.window_size={self.vision.window_size} must be a multiple of "
                    f"patch_size·spatial_merge_size = {unit}"
                )
        bad_ds = [i for i in self.vision.deepstack_visual_indexes if not 0 <= i < self.vision.depth]
        ds = list(self.vision.deepstack_visual_indexes)
        if bad_ds or len(ds) > llm.num_layers or ds != sorted(set(ds)):
            raise ConfigError(
                f"model.vision.deepstack_visual_indexes={list(self.vision.deepstack_visual_indexes)}: each must be in "
                f"0..depth-1={self.vision.depth - 1}, strictly increasing, and at most num_layers={llm.num_layers} of them"
            )
        if llm.num_experts and not (0 < llm.moe_router_topk <= llm.num_experts and llm.moe_ffn_hidden_size > 0):
            raise ConfigError(
                f"model.llm.num_experts={llm.num_experts} needs 0 < model.llm.moe_router_topk <= num_experts "
                f"(got {llm.moe_router_topk}) and model.llm.moe_ffn_hidden_size > 0 (got {llm.moe_ffn_hidden_size})"
            )
        if (llm.num_experts > 0) != spec.experts:
            moe = [n for n in generations.NAMES if generations.get(n).experts]
            raise ConfigError(
                f"model.generation={self.generation!r} with model.llm.num_experts={llm.num_experts}: only "
                f"{', '.join(moe)} have experts (num_experts > 0) and they must have them"
            )
        if llm.moe_aux_loss_coeff < 0:
            raise ConfigError("model.llm.moe_aux_loss_coeff must be >= 0 (0 = no load-balancing loss)")
        bad = [i for i in self.vision.fullatt_block_indexes if not 0 <= i < self.vision.depth]
        if bad:
            raise ConfigError(f"model.vision.fullatt_block_indexes {bad} are outside 0..depth-1={self.vision.depth - 1}")


@dataclass
class ParallelConfig:
    """Process layout (config group `parallel/`). world = tp · pp · cp · dp."""

    tp: int = 1
    """Tensor-parallel size (heads, MLP and vocabulary split across ranks)."""
    sp: bool = False
    """Sequence parallelism with tp > 1 (megatron's): norms, residuals and dropout-free activations
    between the attention and MLP blocks are split along the sequence over the TP ranks, in the LLM
    and in the ViT, cutting their activation memory by tp. No effect at tp = 1."""
    pp: int = 1
    """Pipeline-parallel stages (ViT + projector on the first stage)."""
    dp: Optional[int] = None
    """Data-parallel size; derived as world / (tp·pp·cp) when omitted."""
    cp: int = 1
    """Context-parallel size: every packed sample's tokens are split over cp ranks (zigzag: 2·cp chunks,
    rank r keeps chunks r and 2·cp-1-r), keys/values all-gathered in the LLM's attention, the ViT's
    images shared out among the cp ranks (see qvl_train/parallel/context.py). Combines with tp (and sp),
    dp, pp (and vpp: each micro-batch of a step is padded to the step's largest CP share, so stages
    exchange one activation shape) and MoE models (each CP rank routes its own tokens; the
    load-balancing loss counts the tokens of the whole sequence, padding left out, and expert
    gradients are summed over megatron's expert-data-parallel group, which spans the CP ranks)."""
    ep: int = 1
    """Expert-parallel size for MoE models: the experts of each layer are split over ep ranks, tokens
    travel by all-to-all. Not an extra factor of the world: ep·etp·pp must divide the world size.
    Combines with tp (with sp), pp, vpp and optim.distributed (expert gradients and optimizer state
    over the expert-data-parallel group: world / (ep·etp·pp) ranks holding the same experts)."""
    etp: int = 1
    """Tensor-parallel size inside experts (1 = each expert whole on its rank)."""
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank: megatron's interleaved 1F1B schedule,
    which shrinks the pipeline bubble by vpp. Needs pp > 1; each rank's layers split into vpp chunks
    (model.llm.num_layers / (pp·vpp) per chunk, or first_stage_layers / vpp on rank 0), layers
    dealt round-robin: with 4 layers, pp=2, vpp=2 rank 0 holds [0] [2], rank 1 [1] [3]. The ViT,
    projector and embedding are in chunk 0 of rank 0, the output layer in the last chunk of the
    last rank. Micro-batches per step and data-parallel rank must be a multiple of pp. Works for MoE
    models too (with ep and optim.distributed; each chunk's routers get the step's aux-loss scale)."""
    first_stage_layers: Optional[int] = None
    """LLM layers on the first pipeline stage (it also carries the ViT); None = even split."""

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "cp", "ep", "etp", "vpp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key} must be >= 1")

    def check_available(self) -> None:
        """Layout rules that need no other config group (before any process group)."""
        if self.vpp > 1 and self.pp < 2:
            raise ConfigError(f"parallel.vpp={self.vpp} interleaves model chunks over pipeline stages and needs "
                              "parallel.pp >= 2; set parallel.pp or parallel.vpp=1")


@dataclass
class StageConfig:
    """Which modules train (config group `stage/`)."""

    name: str = "stage2_multitask"
    """stage1_align (projector only) | stage2_multitask (all) | stage3_sft (ViT frozen)."""

    def __post_init__(self) -> None:
        if self.name not in STAGES:
            raise ConfigError(f"stage={self.name!r} is unknown; valid: {', '.join(STAGES)}")

    @property
    def trainable(self) -> tuple[str, ...]:
        return {
            "stage1_align": ("projector",),
            "stage2_multitask": ("vision", "projector", "llm"),
            "stage3_sft": ("projector", "llm"),
        }[self.name]


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (config group `optim/`)."""

    lr: float = 1e-5
    """Peak learning rate (of the LLM, and of the ViT / projector unless lr_vit / lr_projector say otherwise)."""
    lr_vit: Optional[float] = None
    """Peak learning rate of the vision encoder (`vision.*`); None = optim.lr. 0 keeps it fixed
    while it still gets gradients (unlike a frozen stage)."""
    lr_projector: Optional[float] = None
    """Peak learning rate of the projector / merger (`projector.*`); None = optim.lr."""
    min_lr: float = 0.0
    """Floor of the decay for optim.lr; a module with its own peak decays to min_lr · peak / lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    schedule: str = "cosine"
    """cosine | linear | constant decay after warmup, or wsd: warmup → stable at the peak → decay over
    the last decay_fraction of train.max_steps (shape decay_style), reaching min_lr at the last step."""
    decay_fraction: float = 0.1
    """schedule=wsd: share of train.max_steps spent decaying (0 < f <= 1)."""
    decay_style: str = "linear"
    """schedule=wsd: shape of the decay: linear | cosine | sqrt (1 - sqrt(progress), as MiniCPM's WSD)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    distributed: bool = False
    """megatron-core DistributedDataParallel (bucketed fp32 grad buffers, reduce-scatter) and its
    DistributedOptimizer: AdamW moments (and, with train.dtype=bf16, the fp32 master weights) sharded
    over data-parallel ranks (ZeRO-1), 1/dp of the optimizer memory per rank; for MoE models the routed
    experts' state over the expert-data-parallel ranks (world / (ep·etp·pp)). Off by default because a
    checkpoint's optimizer state is written in the format of the optimizer that wrote it: runs resume
    only with the setting they started with (the weights load either way through model.init_from)."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.decay_style not in DECAY_STYLES:
            raise ConfigError(f"optim.decay_style={self.decay_style!r}; valid: {', '.join(DECAY_STYLES)}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction} must be in (0, 1], e.g. 0.1")
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0")
        for key in ("lr_vit", "lr_projector"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"optim.{key}={value} must be >= 0 (or null to use optim.lr)")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps must be >= 0")

    def peak_lrs(self) -> dict[str, float]:
        """Peak learning rate per module (vision / projector / llm)."""
        return {
            "vision": self.lr if self.lr_vit is None else self.lr_vit,
            "projector": self.lr if self.lr_projector is None else self.lr_projector,
            "llm": self.lr,
        }

    def wsd_decay_steps(self, max_steps: int) -> int:
        """schedule=wsd: number of final steps that decay (at least 1)."""
        return max(1, round(self.decay_fraction * max_steps))


@dataclass
class TrainLoopConfig:
    """Length and batch of the run (config group key `train`)."""

    max_steps: int = 1000
    """Total optimizer steps of the run (not the remaining ones)."""
    global_batch_tokens: int = 65536
    """Token slots of one optimizer step over all micro-batches and data-parallel ranks."""
    log_every: int = 1
    """Write metrics every N steps."""
    dtype: str = "fp32"
    """Parameter dtype: fp32 (CPU default) | bf16."""
    max_bad_steps: int = 5
    """Stop the run (non-zero exit, no new checkpoint) after this many consecutive steps skipped for a
    non-finite loss or gradient; the last good checkpoint stays `latest`. 0 = never stop."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU; 0 = look the GPU up (bf16 dense: H100/H200/A100),
    none on CPU (then `mfu` is not reported)."""
    collective_timeout_s: int = 600
    """A collective that waits longer fails the run (every rank first writes its stacks to
    output_dir/stacks/); a step that runs longer has its stacks written by a watchdog."""
    straggler_threshold: float = 1.25
    """Warn about a rank whose own step time (data + forward/backward) exceeded this × the median over
    ranks in most of the last `straggler_window` logged steps; 0 = no warning (the `straggler/*`
    metrics are written at every logged step anyway)."""
    straggler_window: int = 20
    """Logged steps a straggler verdict looks back over; a rank is named at most once per window."""
    recompute: str = "none"
    """Activation recomputation (ViT and LLM): none | selective (core attention is recomputed in the
    backward: saves the attention inputs only) | full (each transformer layer keeps only its input
    and is recomputed in the backward: least memory, ~1/3 more compute)."""
    fp8: str = "off"
    """FP8 GEMMs in every ViT block, LLM layer and MoE expert: off | auto (on, as hybrid, on a GPU with FP8
    tensor cores — compute capability >= 8.9 — where `fp8_backend` can run; otherwise off, logged once) |
    hybrid (E4M3 forward, E5M2 gradients) | e4m3 (E4M3 both). Explicit modes fail at start where FP8 cannot run."""
    fp8_backend: str = "te"
    """te (Transformer Engine's linears, TE spec; not with LoRA or parallel.cp, which use the local spec) |
    torch (our own FP8 GEMM on `torch._scaled_mm` in the local spec's linears, no Transformer Engine; see
    qvl_train/models/fp8.py)."""
    fp8_scaling: str = "rowwise"
    """torch backend: rowwise (forward scales per activation row and weight output channel) | tensor (one per tensor)."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError("train.max_steps must be >= 1")
        if self.collective_timeout_s < 10:
            raise ConfigError("train.collective_timeout_s must be >= 10 seconds")
        if self.straggler_threshold < 0 or 0 < self.straggler_threshold <= 1:
            raise ConfigError("train.straggler_threshold must be > 1 (e.g. 1.25) or 0 (off)")
        if self.straggler_window < 1:
            raise ConfigError("train.straggler_window must be >= 1 logged steps (e.g. 20)")
        if self.max_bad_steps < 0:
            raise ConfigError("train.max_bad_steps must be >= 0 (0 = never stop on skipped steps)")
        if self.peak_tflops < 0:
            raise ConfigError("train.peak_tflops must be >= 0 (0 = look up the GPU)")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"train.dtype={self.dtype!r}; valid: fp32, bf16")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"train.recompute={self.recompute!r}; valid: {', '.join(RECOMPUTE)}")
        if self.fp8 not in FP8_MODES:
            raise ConfigError(f"train.fp8={self.fp8!r}; valid: {', '.join(FP8_MODES)}")
        if self.fp8_backend not in ("te", "torch"):
            raise ConfigError(f"train.fp8_backend={self.fp8_backend!r}; valid: te, torch")
        if self.fp8_scaling not in ("rowwise", "tensor"):
            raise ConfigError(f"train.fp8_scaling={self.fp8_scaling!r}; valid: rowwise, tensor")


@dataclass
class ProfileConfig:
    """torch profiler traces (config group key `profile`)."""

    steps: list[int] = field(default_factory=list)
    """`[A, B]`: trace steps A..B (1-based) on every rank into output_dir/profile/; [] = off."""

    def __post_init__(self) -> None:
        if self.steps and (len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]):
            raise ConfigError(f"profile.steps={list(self.steps)}; give [A, B] with 1 <= A <= B, e.g. profile.steps=[5,6]")


@dataclass
class CheckpointConfig:
    """When and where to save (config group key `checkpoint`)."""

    every: int = 100
    """Save every N steps (and at the last step); 0 = only at the end."""
    resume: str = "auto"
    """auto: continue from output_dir/checkpoints/latest if present (a checkpoint that fails its
    manifest check is skipped for the previous complete one) | never."""
    keep_last: int = 0
    """Keep only the newest N complete step directories after each save; 0 = keep all. The one
    `latest` names and any that model.init_from points into are never removed."""
    async_save: bool = False
    """Write checkpoints in a background process while training goes on (tensors are staged first);
    the checkpoint becomes `complete`/`latest` once every rank's files are on disk."""

    def __post_init__(self) -> None:
        if self.resume not in ("auto", "never"):
            raise ConfigError(f"checkpoint.resume={self.resume!r}; valid: auto, never")
        if self.keep_last < 0:
            raise ConfigError("checkpoint.keep_last must be >= 0 (0 = keep all)")


@dataclass
class EvalConfig:
    """Held-out evaluation during training (config group key `eval`; sources: `data.valid`)."""

    every: int = 0
    """Evaluate every N steps (forward only, loss per `data.valid` source); 0 = off."""
    max_batches: int = 8
    """Packed micro-batches (of data.max_tokens) per source and evaluation, over all data-parallel
    ranks; the same ones every time (a multiple of the data-parallel size)."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError("eval.every must be >= 0 (0 = no evaluation)")
        if self.max_batches < 1:
            raise ConfigError("eval.max_batches must be >= 1")


@dataclass
class WandbConfig:
    """Weights & Biases logging (config group key `wandb`)."""

    mode: str = "offline"
    """offline (default, synced later with `wandb sync`) | online | disabled."""
    project: str = "qvl-train"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team); None = your default."""
    name: Optional[str] = None
    """Run name; None = the output directory's name."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"wandb.mode={self.mode!r}; valid: offline, online, disabled")


@dataclass
class EngineConfig:
    """Training engine (config group `engine/`)."""

    name: str = "megatron"
    """megatron (megatron-core schedules and layers) | deepspeed (the same model under DeepSpeed ZeRO,
    data parallelism only; see engines/deepspeed.py)."""
    zero_stage: int = 2
    """engine=deepspeed: 2 (optimizer state and gradients partitioned over ranks) | 3 (parameters too)."""
    offload_optimizer: str = "none"
    """engine=deepspeed: none | cpu (optimizer state and step in host memory; torch AdamW)."""
    param_persistence_threshold: int = 100000
    """engine=deepspeed, zero_stage=3: parameters with fewer elements stay whole on every rank (DeepSpeed's
    stage3_param_persistence_threshold; 0 partitions everything)."""

    def __post_init__(self) -> None:
        if self.name not in ("megatron", "deepspeed"):
            raise ConfigError(f"engine={self.name!r} is unknown; valid: megatron, deepspeed")
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"engine.zero_stage={self.zero_stage}; valid: 2, 3")
        if self.offload_optimizer not in ("none", "cpu"):
            raise ConfigError(f"engine.offload_optimizer={self.offload_optimizer!r}; valid: none, cpu")
        if self.param_persistence_threshold < 0:
            raise ConfigError("engine.param_persistence_threshold must be >= 0")

    def check_layout(self, cfg: "TrainConfig") -> None:
        """engine=deepspeed runs data parallelism only, on dense models without LoRA or FP8."""
        if self.name != "deepspeed":
            return
        p = cfg.parallel
        for key in ("tp", "pp", "cp", "ep", "etp", "vpp"):
            if getattr(p, key) != 1:
                raise ConfigError(
                    f"parallel.{key}={getattr(p, key)} with engine=deepspeed: the DeepSpeed engine shards with ZeRO over "
                    f"data-parallel ranks only; set parallel.{key}=1, or use engine=megatron for model parallelism"
                )
        unsupported = [
            (cfg.model.llm.num_experts > 0, "a mixture-of-experts model", "engine=megatron"),
            (cfg.model.lora.enabled, "model.lora", "engine=megatron or model.lora.rank=0"),
            (cfg.train.fp8 in ("hybrid", "e4m3"), f"train.fp8={cfg.train.fp8}", "train.fp8=off"),
            (cfg.optim.distributed, "optim.distributed=true", "optim.distributed=false (ZeRO shards the optimizer)"),
            (cfg.model.mtp_loss_weight > 0, f"model.mtp_loss_weight={cfg.model.mtp_loss_weight} (the MTP head)",
             "engine=megatron or model.mtp_loss_weight=0"),
        ]
        for bad, what, fix in unsupported:
            if bad:
                raise ConfigError(f"{what} is not available with engine=deepspeed; use {fix}")


@dataclass
class ClusterConfig:
    """Where things live on a cluster (config group `cluster/`)."""

    name: str = "local"
    """Cluster profile name."""
    data_root: str = "data"
    """Root that relative shard paths are resolved against."""
    gpus: int = 0
    """GPUs of the whole job (launch/plan.py); 0 = not given."""
    gpus_per_node: int = 8
    """GPUs per node: tensor parallelism beyond a node goes over the slower network (planner)."""
    gpu: str = "h100"
    """GPU kind for the planner's memory and speed figures: h100 | h200 | a100 | b200."""


@dataclass
class TrainConfig:
    """The whole run. Keys: see README ("Configuration")."""

    output_dir: str = "outputs/run"
    """Everything the run writes: metrics.jsonl, checkpoints/, wandb/, config.yaml."""
    seed: int = 1234
    """Model init and dropout seed (the data stream has data.seed)."""
    dry_run: bool = False
    """Compose, validate and print the config and layout; build nothing."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self, world_size: int) -> None:
        """Cross-component checks; run before any process group is created."""
        p, llm, vit = self.parallel, self.model.llm, self.model.vision
        self.engine.check_layout(self)
        p.check_available()
        try:
            generations.check_data_matches(self.model.generation, self.data.generation)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._check_tokenizer()
        model_parallel = p.tp * p.pp * p.cp
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tp·pp·cp = {p.tp}·{p.pp}·{p.cp}; "
                "change parallel.tp/parallel.pp or the number of processes"
            )
        dp = p.dp if p.dp is not None else world_size // model_parallel
        if model_parallel * dp != world_size:
            raise ConfigError(
                f"world size {world_size} != parallel.tp·pp·cp·dp = {p.tp}·{p.pp}·{p.cp}·{dp}; "
                "fix parallel.dp (or omit it to derive it)"
            )
        for name, heads in (
            ("model.llm.num_attention_heads", llm.num_attention_heads),
            ("model.llm.num_query_groups", llm.num_query_groups),
            ("model.vision.num_heads", vit.num_heads),
        ):
            if heads % p.tp:
                raise ConfigError(f"{name}={heads} is not divisible by parallel.tp={p.tp}; change parallel.tp")
        if "linear_attention" in llm.layer_types:  # Qwen3.5's Gated DeltaNet layers (models/gdn.py)
            if p.cp > 1:
                raise ConfigError(
                    f"parallel.cp={p.cp}: context parallelism is not implemented for Gated DeltaNet layers (model.llm."
                    "layer_types has linear_attention; their recurrent state would have to pass between CP ranks); "
                    "set parallel.cp=1 and shard with parallel.tp/sp/pp instead"
                )
            if llm.linear_num_key_heads % p.tp:
                raise ConfigError(
                    f"model.llm.linear_num_key_heads={llm.linear_num_key_heads} is not divisible by parallel.tp={p.tp} "
                    "(each TP rank holds whole Gated DeltaNet key-head groups); change parallel.tp"
                )
        if self.model.mtp_head and not self.model.mtp_loss_weight:
            raise ConfigError(
                "model.mtp_head=true with model.mtp_loss_weight=0: a training run builds the MTP head only to train it; "
                "set model.mtp_loss_weight > 0 (e.g. 0.3) or model.mtp_head=false"
            )
        if self.model.mtp_loss_weight > 0 and p.cp > 1:
            raise ConfigError(
                f"model.mtp_loss_weight={self.model.mtp_loss_weight} with parallel.cp={p.cp}: the MTP head shifts each "
                "sample by one token, across the zigzag split of context parallelism; set parallel.cp=1"
            )
        self._validate_experts(world_size)
        if llm.vocab_size % p.tp:
            raise ConfigError(f"model.llm.vocab_size={llm.vocab_size} is not divisible by parallel.tp={p.tp}")
        if p.sp and p.tp > 1 and self.data.max_tokens % p.tp:
            raise ConfigError(
                f"parallel.sp splits each packed sequence of data.max_tokens={self.data.max_tokens} slots over "
                f"parallel.tp={p.tp} ranks; set data.max_tokens to a multiple of {p.tp}"
            )
        if p.pp > llm.num_layers:
            raise ConfigError(
                f"parallel.pp={p.pp} pipeline stages but only model.llm.num_layers={llm.num_layers}; "
                "lower parallel.pp"
            )
        if p.first_stage_layers is not None:
            rest = llm.num_layers - p.first_stage_layers
            if p.pp < 2 or p.first_stage_layers < 1 or rest < p.pp - 1 or rest % (p.pp - 1):
                raise ConfigError(
                    f"parallel.first_stage_layers={p.first_stage_layers} leaves {rest} layers that do not "
                    f"split evenly over the other {p.pp - 1} stages; change it or drop it"
                )
        elif llm.num_layers % p.pp:
            raise ConfigError(
                f"model.llm.num_layers={llm.num_layers} does not split evenly over parallel.pp={p.pp}; "
                "change parallel.pp or set parallel.first_stage_layers"
            )
        micro, rem = divmod(self.train.global_batch_tokens, self.data.max_tokens)
        if rem or micro < 1:
            raise ConfigError(
                f"train.global_batch_tokens={self.train.global_batch_tokens} must be a positive multiple of "
                f"data.max_tokens={self.data.max_tokens}"
            )
        if micro % dp:
            raise ConfigError(
                f"{micro} micro-batches per step (train.global_batch_tokens / data.max_tokens) are not "
                f"divisible by the data-parallel size {dp}; change train.global_batch_tokens"
            )
        self._validate_lora()
        self._validate_eval(dp)
        self._validate_interleaved(dp)

    def _check_tokenizer(self) -> None:
        """The tokenizer in use (`data.tokenizer`, else the bundled Qwen BPE), the generation's template tokens and
        `model.llm.vocab_size` agree (`data_pipelines/tokenizer_check.py`). With `data.tokenizer` set, unset
        `model.image_token_id` / `video_token_id` take that tokenizer's pad ids."""
        from data_pipelines.tokenizer_check import TokenizerMismatch, check_tokenizer, tokenizer_pad_ids

        m, d = self.model, self.data
        try:
            if d.tokenizer is not None:
                image, video = tokenizer_pad_ids(d.generation, d.tokenizer)
                m.image_token_id = image if m.image_token_id is None else m.image_token_id
                m.video_token_id = video if m.video_token_id is None else m.video_token_id
            check_tokenizer(d.generation, d.tokenizer, m.llm.vocab_size, m.image_pad_id, m.video_pad_id)
        except TokenizerMismatch as e:
            raise ConfigError(str(e)) from None

    def _validate_lora(self) -> None:
        lora = self.model.lora
        if lora.enabled and self.train.fp8 in ("hybrid", "e4m3") and self.train.fp8_backend == "te":
            raise ConfigError(
                f"train.fp8={self.train.fp8} with model.lora: adapters run on the local spec, where Transformer Engine's "
                "FP8 does not reach; set train.fp8_backend=torch (FP8 GEMMs in the local layers) or train.fp8=off"
            )
        if lora.enabled and self.parallel.sp and self.parallel.tp > 1:
            raise ConfigError(
                f"model.lora with parallel.sp=true (tp={self.parallel.tp}): adapters take the full sequence and "
                "sequence parallelism splits it; set parallel.sp=false (tensor parallelism alone works with LoRA)"
            )
        if lora.enabled and not set(lora.modules) & set(self.stage.trainable):
            raise ConfigError(
                f"model.lora.modules={list(lora.modules)} has no module that stage={self.stage.name} trains "
                f"({', '.join(self.stage.trainable)}): nothing would train; change model.lora.modules or the stage"
            )

    def _validate_interleaved(self, dp: int) -> None:
        """parallel.vpp > 1: every chunk gets whole layers, and megatron's interleaved schedule gets a
        micro-batch count per data-parallel rank that is a multiple of pp (its depth-first order
        runs micro-batches in groups of pp per chunk and refuses a partial group)."""
        p, llm = self.parallel, self.model.llm
        if p.vpp == 1:
            return
        chunks = p.pp * p.vpp
        if p.first_stage_layers is None and llm.num_layers % chunks:
            raise ConfigError(
                f"model.llm.num_layers={llm.num_layers} does not split into parallel.pp·vpp = {p.pp}·{p.vpp} "
                "model chunks of whole layers; change parallel.vpp or parallel.pp"
            )
        if p.first_stage_layers is not None:
            rest = (llm.num_layers - p.first_stage_layers) // (p.pp - 1)
            if p.first_stage_layers % p.vpp or rest % p.vpp:
                raise ConfigError(
                    f"parallel.first_stage_layers={p.first_stage_layers} and the {rest} layers of each other stage "
                    f"must both be multiples of parallel.vpp={p.vpp} (each rank's layers split into vpp chunks)"
                )
        n_deep, chunk0 = len(self.model.vision.deepstack_visual_indexes), (p.first_stage_layers or llm.num_layers // p.pp) // p.vpp
        if n_deep > chunk0:
            raise ConfigError(
                f"Qwen3-VL DeepStack adds ViT features after LLM layers 0..{n_deep - 1}, which must all be in model chunk 0 "
                f"of the first stage; it holds {chunk0} layers (first stage's layers / parallel.vpp): set "
                f"parallel.first_stage_layers to a multiple of {p.vpp} that is >= {n_deep * p.vpp}"
            )
        per_rank = self.micro_batches_per_step() // dp
        if per_rank % p.pp:
            raise ConfigError(
                f"parallel.vpp={p.vpp}: the interleaved schedule needs the micro-batches per step and data-parallel "
                f"rank ({per_rank} = train.global_batch_tokens / data.max_tokens / dp) to be a multiple of "
                f"parallel.pp={p.pp}; change train.global_batch_tokens"
            )
        if self.eval.every and (self.eval.max_batches // dp) % p.pp:
            raise ConfigError(
                f"parallel.vpp={p.vpp}: eval.max_batches / dp = {self.eval.max_batches // dp} must be a multiple of "
                f"parallel.pp={p.pp} (the interleaved schedule's micro-batch groups); change eval.max_batches"
            )

    def _validate_experts(self, world_size: int) -> None:
        """Expert parallelism: megatron's rule (ep·etp·pp divides the world; experts divide over ep)."""
        p, llm = self.parallel, self.model.llm
        if (p.ep > 1 or p.etp > 1) and not llm.num_experts:
            raise ConfigError(
                f"parallel.ep={p.ep} / parallel.etp={p.etp} need a mixture-of-experts model "
                f"(model.generation={self.model.generation!r} has none); set parallel.ep=1 parallel.etp=1"
            )
        if world_size % (p.ep * p.etp * p.pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.ep·etp·pp = {p.ep}·{p.etp}·{p.pp} "
                "(megatron's expert layout); change parallel.ep/parallel.etp or the number of processes"
            )
        if llm.num_experts % p.ep:
            raise ConfigError(
                f"model.llm.num_experts={llm.num_experts} is not divisible by parallel.ep={p.ep}; change parallel.ep"
            )
        if llm.num_experts and p.etp > 1 and llm.moe_ffn_hidden_size % p.etp:
            raise ConfigError(
                f"model.llm.moe_ffn_hidden_size={llm.moe_ffn_hidden_size} is not divisible by parallel.etp={p.etp}"
            )
        if llm.num_experts and self.model.lora.enabled and (p.tp > 1 or p.etp > 1):
            raise ConfigError(
                f"model.lora with a mixture-of-experts model runs at parallel.tp=1 parallel.etp=1 (got tp={p.tp}, "
                f"etp={p.etp}): megatron's MoE layers need sequence parallelism under tensor parallelism, and "
                "adapters take the full sequence; split the experts with parallel.ep and the layers with parallel.pp"
            )
        if llm.num_experts and p.tp > 1 and not p.sp:
            raise ConfigError(
                f"parallel.tp={p.tp} with a mixture-of-experts model needs sequence parallelism (megatron-core's MoE "
                "layers take sequence-parallel activations under tensor parallelism); add parallel.sp=true"
            )

    def _validate_eval(self, dp: int) -> None:
        if self.eval.every and not self.data.valid:
            raise ConfigError(
                f"eval.every={self.eval.every} but data.valid is empty; add held-out sources "
                "(data.valid=[{path: DIR}]) or set eval.every=0"
            )
        if self.eval.every and self.eval.max_batches % dp:
            raise ConfigError(
                f"eval.max_batches={self.eval.max_batches} is not divisible by the data-parallel size {dp}; "
                "change eval.max_batches"
            )

        self._validate_optim_and_precision()

    def _validate_optim_and_precision(self) -> None:
        """WSD phases fit in the run; an explicit FP8 mode has Transformer Engine and a GPU; TE's FP8 gets the
        packed lengths and layers it can run (`_validate_te_fp8_layout`)."""
        o, t = self.optim, self.train
        if o.schedule == "wsd" and o.warmup_steps > t.max_steps - o.wsd_decay_steps(t.max_steps):
            raise ConfigError(
                f"optim.warmup_steps={o.warmup_steps} overlaps the WSD decay (the last {o.wsd_decay_steps(t.max_steps)} "
                f"of train.max_steps={t.max_steps}); lower optim.warmup_steps or optim.decay_fraction"
            )
        if t.fp8 in ("hybrid", "e4m3"):
            from qvl_train.models.specs import fp8_missing

            if t.fp8_backend == "te" and self.parallel.cp > 1:
                raise ConfigError(
                    f"train.fp8={t.fp8} with parallel.cp={self.parallel.cp}: context parallelism runs the local spec, "
                    "where Transformer Engine's FP8 does not reach; set train.fp8_backend=torch or train.fp8=off"
                )
            missing = fp8_missing(t.fp8_backend)
            if missing:
                raise ConfigError(
                    f"train.fp8={t.fp8} (train.fp8_backend={t.fp8_backend}) needs {' and '.join(missing)}; use train.fp8=off "
                    "(or train.fp8=auto to use FP8 only where it is available)"
                )
        self._validate_te_fp8_layout()

    def _validate_te_fp8_layout(self) -> None:
        """What Transformer Engine's FP8 needs of the model and its batches, checked where it would run:
        an explicit `train.fp8` with `train.fp8_backend=te`, or `auto` where it would turn on (TE and an
        FP8 GPU present, no LoRA / context parallelism forcing the local spec).

        * The LLM's GEMMs run over the packed length (`data.max_tokens` slots, every micro-batch, eval
          included), split into `max_tokens / tp` rows per rank under sequence parallelism; TE's FP8
          GEMMs need that row count in multiples of 16 (it asserts). Padding it silently would change
          the token budget the data side plans with, so the run is refused with the value to use. (The
          ViT pads its own patch rows to 16; the torch backend pads every operand inside its GEMM.)
        * Hybrid LLM layers (`model.llm.layer_types`: Gated DeltaNet and gated attention) are always built
          on the local spec (`models/language.py:hybrid_block_spec`), where TE's FP8 does not reach: those
          layers would silently stay bf16."""
        t, p = self.train, self.parallel
        if t.fp8_backend != "te" or t.fp8 == "off":
            return
        if t.fp8 == "auto":
            from qvl_train.models.specs import fp8_missing

            if fp8_missing("te") or self.model.lora.enabled or p.cp > 1:
                return  # auto stays off (specs.resolve_fp8 logs why)
        what = f"train.fp8={t.fp8} (train.fp8_backend=te)"
        if self.model.llm.layer_types:
            raise ConfigError(
                f"{what} with hybrid LLM layers (model.llm.layer_types): those layers are built on the local spec, "
                "where Transformer Engine's FP8 does not reach, so they would stay bf16; set train.fp8_backend=torch "
                "(FP8 GEMMs in the local layers) or train.fp8=off"
            )
        rows = 16 * (p.tp if p.sp and p.tp > 1 else 1)
        if self.data.max_tokens % rows:
            per = " (data.max_tokens / parallel.tp rows per rank under parallel.sp)" if rows > 16 else ""
            fix = -(-self.data.max_tokens // rows) * rows
            raise ConfigError(
                f"{what} needs the packed length in multiples of 16{per}: data.max_tokens={self.data.max_tokens}; "
                f"set data.max_tokens={fix} (a multiple of {rows}, keeping train.global_batch_tokens a multiple of it) "
                "or train.fp8_backend=torch (which pads inside its GEMMs)"
            )

    def check_inputs(self, overrides: Optional[list[str]] = None, configs_dir: Optional[str] = None) -> list[str]:
        """What the run reads from outside, checked before any model is built or process group started:
        every `data.sources` / `data.valid` index, and the model of the checkpoint it will load
        (`checkpoint/manager.check_checkpoint_model`; with `model.init_from` on a checkpoint that carries its
        own model config and no architecture key among the Hydra `overrides`, `self.model` becomes that one).
        Returns lines to print (what was taken, warnings); raises ConfigError."""
        from pathlib import Path

        from qvl_train.checkpoint.manager import (
            ModelMismatchError,
            check_checkpoint_model,
            complete_step_dirs,
            resolve_checkpoint,
        )

        self._check_data_paths()
        own = Path(self.output_dir) / "checkpoints"
        resumes = self.checkpoint.resume == "auto" and bool(resolve_checkpoint(own) or complete_step_dirs(own))
        if self.model.init_from and not resumes and resolve_checkpoint(self.model.init_from) is None:
            raise ConfigError(
                f"model.init_from={self.model.init_from} holds no complete checkpoint: give a step directory with a "
                "'complete' file, a checkpoint root with 'latest' (an import-hf --out directory), or a training output_dir"
            )
        configs = Path(configs_dir) if configs_dir else Path(__file__).resolve().parents[1] / "configs"
        try:
            return check_checkpoint_model(self, arch_overridden=any(map(is_arch_override, overrides or [])),
                                          configs_dir=configs / "model")
        except ModelMismatchError as err:
            raise ConfigError(str(err)) from None

    def _check_data_paths(self) -> None:
        """Each source's index is read (and validated) as the loader will; local shards must exist."""
        import os

        from data_pipelines.schema import is_url
        from data_pipelines.sources import resolve_source

        for key, sources in (("data.sources", self.data.sources), ("data.valid", self.data.valid)):
            for i, src in enumerate(sources):
                name = f"{key}[{i}].path={src.path}" + (f" (index {src.index})" if src.index else "")
                try:
                    resolved = resolve_source(src.path, src.index, ".")
                except FileNotFoundError as err:
                    local = src.path if not is_url(src.path) else "DIR"
                    gone = not is_url(src.path) and not os.path.exists(src.path)
                    where = f"{src.path} does not exist" if gone else f"{str(err).split(' not found')[0]} is missing"
                    raise ConfigError(
                        f"{name}: no shard index ({where}; relative paths start at {os.getcwd()}).\n"
                        f"Make shards from your data with `python -m data_pipelines.make_shards --format llava "
                        f"--input FILE.jsonl --out {local}`, or synthetic ones with `python -m data_pipelines.synth "
                        f"--out {local} --num-samples 400`; or fix the path (see docs/data.md)"
                    ) from None
                except (ValueError, OSError) as err:
                    raise ConfigError(f"{name}: {err}") from None
                missing = [u for u in resolved.shard_urls if not is_url(u) and not os.path.isfile(u)]
                if missing:
                    raise ConfigError(
                        f"{name}: {len(missing)} of the {len(resolved.shard_urls)} shards its index names are missing "
                        f"(first: {missing[0]}); copy them back or rebuild the shards (make_shards --overwrite)"
                    )

    def micro_batches_per_step(self) -> int:
        return self.train.global_batch_tokens // self.data.max_tokens


ARCH_SECTIONS = ("generation", "vision", "llm")


def is_arch_override(override: str) -> bool:
    """A Hydra override that chooses the model's architecture: `model=…`, `model.generation=…`,
    `model.vision…`, `model.llm…` (with or without a leading +, ++ or ~)."""
    key = override.lstrip("+~").split("=", 1)[0].strip()
    parts = key.split(".")
    return parts[0] == "model" and (len(parts) == 1 or parts[1] in ARCH_SECTIONS)


def model_choice_error(overrides: list[str], configs_dir: str) -> Optional[str]:
    """The message for a `model=GEN/SIZE` override that names no file under configs/model (Hydra's own
    error lists no choices for a nested group): the valid sizes of that generation, or the generations."""
    from pathlib import Path

    root = Path(configs_dir) / "model"
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key.strip() != "model" or not value or (root / f"{value.strip()}.yaml").is_file():
            continue
        gen, _, size = value.strip().partition("/")
        if (root / gen).is_dir():
            sizes = sorted(p.stem for p in (root / gen).glob("*.yaml"))
            return (f"model={value}: {gen} has no size {size!r}" if size else f"model={value} needs a size") + (
                f"; valid: {', '.join(f'{gen}/{s}' for s in sizes)} (files under configs/model/{gen}/)")
        gens = sorted(p.name for p in root.iterdir() if p.is_dir())
        return (f"model={value}: no model generation {gen!r}; valid: {', '.join(gens)} "
                "(as model=GENERATION/SIZE, e.g. model=qwen2_vl/7b; sizes: the files under configs/model/GENERATION/)")
    return None


def register_configs() -> None:
    """Register the schema so Hydra type-checks every group against these dataclasses."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: Any) -> TrainConfig:
    """Composed DictConfig → TrainConfig (runs every __post_init__)."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):  # composed without the structured schema
        raise ConfigError("configs/train.yaml must list train_schema first in its defaults")
    return obj


__all__ = [
    "ConfigError",
    "is_arch_override",
    "model_choice_error",
    "DataConfig",
    "DataSource",
    "TrainConfig",
    "ModelConfig",
    "LoRAConfig",
    "VisionConfig",
    "LLMConfig",
    "ParallelConfig",
    "StageConfig",
    "OptimConfig",
    "TrainLoopConfig",
    "CheckpointConfig",
    "EvalConfig",
    "WandbConfig",
    "EngineConfig",
    "ClusterConfig",
]
