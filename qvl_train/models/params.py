"""Analytic parameter counts of a `ModelConfig` (no model is built): for size checks and MFU.

Counts are those of the HF checkpoint (= ours: the conversion is a bijection of tensors); tied
embeddings are counted once, as the safetensors totals on the model pages do.
"""

from __future__ import annotations

from qvl_train import generations
from qvl_train.config import LLMConfig, ModelConfig

__all__ = ["count_parameters", "llm_parts", "full_attention_params", "gated_deltanet_params", "mlp_params"]


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """`{"vision", "projector", "llm", "total", "active", "mtp"}` parameter counts of the model `cfg` describes
    (`active`: what one token passes through; = `total` for dense models; `mtp`: the multi-token-prediction
    head, not in `llm` / `total` — see `llm_parts`)."""
    v, l = cfg.vision, cfg.llm
    hv = v.hidden_size
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2 * hv + (hv if v.patch_bias else 0)
    patch += (v.num_position_embeddings or 0) * hv  # Qwen3-VL learned position table
    norm = hv if v.norm == "rmsnorm" else 2 * hv
    attn = hv * 3 * hv + 3 * hv + hv * hv + hv
    inner = v.intermediate_size or int(hv * v.mlp_ratio)
    if v.mlp == "swiglu":
        mlp = 2 * (hv * inner + inner) + inner * hv + hv
    else:
        mlp = hv * inner + inner + inner * hv + hv
    vision = patch + v.depth * (2 * norm + attn + mlp)
    width = hv * v.spatial_merge_size**2
    projector = norm + width * width + width + width * l.hidden_size + l.hidden_size
    if generations.get(cfg.generation).projector == "resampler":  # Qwen-VL: + ln_pre; the resampler, no merger
        vision += 2 * hv
        projector = _qwen_vl_resampler(v.num_queries, hv, l.hidden_size)
    # Qwen3-VL DeepStack mergers: the same MLP with a LayerNorm over the joined width
    projector += len(v.deepstack_visual_indexes) * (2 * width + width * width + width + width * l.hidden_size + l.hidden_size)

    parts = llm_parts(cfg)
    llm = parts["outside"] + parts["layers"]
    active = vision + projector + parts["outside"] + parts["active_layers"]
    return {"vision": vision, "projector": projector, "llm": llm, "total": vision + projector + llm, "active": active,
            "mtp": parts["mtp"]}


def full_attention_params(l: LLMConfig) -> int:
    """One (gated) softmax-attention block: q (Qwen3.5: q and its output gate, `attn_output_gate`), k, v, o
    projections, biases (Qwen2) and the per-head q/k RMSNorms (Qwen3)."""
    h = l.hidden_size
    d = l.head_dim or h // l.num_attention_heads
    kv = l.num_query_groups * d
    q = l.num_attention_heads * d
    q_out = 2 * q if l.attn_output_gate else q
    return h * q_out + 2 * h * kv + (q_out + 2 * kv if l.qkv_bias else 0) + q * h + (2 * d if l.qk_norm else 0)


def gated_deltanet_params(l: LLMConfig) -> int:
    """One Gated DeltaNet block as transformers 5.25 builds it (`Qwen3_5GatedDeltaNet` in
    models/qwen3_5/modeling_qwen3_5.py): `in_proj_qkv` (h → 2·key + value), `in_proj_z` (h → value),
    `in_proj_b` and `in_proj_a` (h → value heads each), the depthwise causal `conv1d` over q/k/v (no bias),
    `dt_bias` and `A_log` (one per value head), the gated RMSNorm over one value head, `out_proj`; no biases."""
    h = l.hidden_size
    key = l.linear_num_key_heads * l.linear_key_head_dim
    value = l.linear_num_value_heads * l.linear_value_head_dim
    conv = 2 * key + value
    return (h * conv + h * value + 2 * h * l.linear_num_value_heads + conv * l.linear_conv_kernel_dim
            + 2 * l.linear_num_value_heads + l.linear_value_head_dim + value * h)


def mlp_params(l: LLMConfig) -> tuple[int, int]:
    """(all, active per token) parameters of one layer's MLP: the dense SwiGLU, or the router + routed SwiGLU
    experts (top-k of them active) + Qwen3.5's shared SwiGLU expert and its 1-output sigmoid gate."""
    h = l.hidden_size
    if not l.num_experts:
        return 3 * h * l.ffn_hidden_size, 3 * h * l.ffn_hidden_size
    shared = 3 * h * l.shared_expert_ffn_hidden_size + h if l.shared_expert_ffn_hidden_size else 0
    expert = 3 * h * l.moe_ffn_hidden_size
    router = h * l.num_experts
    return router + l.num_experts * expert + shared, router + l.moe_router_topk * expert + shared


def llm_parts(cfg: ModelConfig) -> dict[str, int]:
    """The language model's parameters by part (for `count_parameters` and the planner's memory model):

    * `layers` / `active_layers`: all decoder layers (token mixer per `llm.layer_types`: Gated DeltaNet for
      `linear_attention`, softmax attention otherwise; MLP; two RMSNorms), all or active-per-token parameters;
    * `mixer` / `mlp` / `experts` / `norms`: the per-layer average of the token mixers, of the always-active MLP
      part (dense MLP, or router + shared expert), of the routed experts, and the 2h RMSNorm weights;
    * `outside`: the embedding (+ untied output layer) and the final norm;
    * `mtp`: the multi-token-prediction head of the checkpoint (`llm.mtp_num_layers`): per layer the input
      projection `fc` (2h → h, no bias), two pre-projection RMSNorms, one full-attention decoder layer, a final
      norm (it shares the embedding and output layer). HF checkpoints store it as `mtp.*` (vLLM's
      `qwen3_next_mtp.py` loads those names); transformers 5.25 does not build it, and the published sizes
      (27B, 397B) do not count it, so `total` leaves it out.
    """
    l = cfg.llm
    h, n = l.hidden_size, l.num_layers
    types = list(l.layer_types) or ["full_attention"] * n
    full, gdn = full_attention_params(l), (gated_deltanet_params(l) if "linear_attention" in types else 0)
    mixers = sum(gdn if t == "linear_attention" else full for t in types)
    mlp_all, mlp_active = mlp_params(l)
    experts = l.num_experts * 3 * h * l.moe_ffn_hidden_size
    embed = l.vocab_size * h
    mtp = l.mtp_num_layers * (2 * h * h + 2 * h + full + mlp_all + 2 * h + h)
    return {
        "layers": mixers + n * (mlp_all + 2 * h), "active_layers": mixers + n * (mlp_active + 2 * h),
        "mixer": mixers / n, "mlp": mlp_all - experts, "experts": experts, "norms": 2 * h,
        "outside": embed + h + (0 if l.tie_word_embeddings else embed), "mtp": mtp,
    }


def _qwen_vl_resampler(queries: int, hv: int, h: int) -> int:
    """query + sin-cos table, kv_proj (no bias), packed in_proj + out_proj with biases, ln_q/ln_kv/ln_post, proj."""
    return 2 * queries * h + hv * h + (3 * h * h + 3 * h) + (h * h + h) + 3 * 2 * h + h * h
