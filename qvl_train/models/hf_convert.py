"""HF ⇄ ours weight mapping for Qwen-VL, Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense), in both directions, as rule tables.

Qwen-VL has no transformers class: its "HF" names are those of the released remote code (`rules_qwen_vl`).

`hf_to_ours(hf_sd, cfg)` gives the full (tp = pp = 1) state dict of our `VLM` (keys as
`model.state_dict()`, without megatron's `_extra_state`); `ours_to_hf(sd, cfg, style=...)` gives
the HF state dict back. Each rule names our key, the HF key(s) and a reversible transform, so a
round trip reproduces every tensor bit for bit (the transforms are reshapes and concatenations).

Transforms that are more than a rename:
* `linear_qkv` is fused and grouped per query group (megatron's layout: for each of the `ng` kv
  groups its `nh/ng` query heads, then its k head, then its v head). HF: separate q/k/v (LLM) or
  one `[q; k; v]` matrix (ViT, ng = nh).
* SwiGLU `linear_fc1` = `[gate; up]` on the output dim (LLM; Qwen2.5-VL's ViT also for the bias).
* the Conv3d patch embedding `[Hv, C, T, p, p]` is our linear `[Hv, C·T·p·p]` (same element order).

HF key spellings (`style`): ``hub`` — the released checkpoints and what transformers 4.57's
`save_pretrained` writes (`visual.*`, `model.layers.*`, `model.embed_tokens.*`, `lm_head.*`);
``runtime`` — the module names of transformers ≥ 4.52 (`model.visual.*`, `model.language_model.*`).
Both are read; `detect_style` tells which one a checkpoint used, so export can write it back.
"""

from __future__ import annotations

import logging
import re

import torch

from qvl_train.config import ModelConfig

__all__ = [
    "hf_to_ours", "ours_to_hf", "lora_to_hf", "detect_style", "detect_expert_layout", "EXPERT_LAYOUTS", "fuse_qkv", "split_qkv",
    "rules_dynamic_vit", "rules_qwen_vl", "rules_qwen3_vl", "rules_qwen3_5",
]

EXPERT_LAYOUTS = ("hub", "transposed")
log = logging.getLogger(__name__)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """Separate q `[nh·d, …]`, k/v `[ng·d, …]` → megatron's grouped `[ng·(nh/ng + 2)·d, …]`."""
    d = q.shape[0] // num_heads
    rest = q.shape[1:]
    qg = q.reshape(num_groups, (num_heads // num_groups) * d, *rest)
    kg = k.reshape(num_groups, d, *rest)
    vg = v.reshape(num_groups, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest).contiguous()


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    rest = qkv.shape[1:]
    per = num_heads // num_groups
    d = qkv.shape[0] // (num_groups * (per + 2))
    g = qkv.reshape(num_groups, (per + 2) * d, *rest)
    q, k, v = g.split([per * d, d, d], dim=1)
    return (x.reshape(-1, *rest).contiguous() for x in (q, k, v))  # type: ignore[return-value]


def detect_style(keys) -> str:
    """``runtime`` if the keys use transformers ≥ 4.52 module names, else ``hub``."""
    return "runtime" if any(k.startswith(("model.visual.", "model.language_model.")) for k in keys) else "hub"


def _to_canonical(key: str) -> str:
    """Either spelling → `visual.*` / `lm.*` / `lm_head.*`."""
    for old, new in (("model.visual.", "visual."), ("model.language_model.", "lm."), ("model.", "lm.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _from_canonical(key: str, style: str) -> str:
    if style == "hub":
        return "model." + key[3:] if key.startswith("lm.") else key
    if key.startswith("lm."):
        return "model.language_model." + key[3:]
    if key.startswith("visual."):
        return "model." + key
    return key


def _rules(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """(our key, canonical HF keys, transform) for every tensor of the model: the generation's
    `ModelSpec.hf_rules` (one of the rule sets below)."""
    from qvl_train import generations

    return generations.get(cfg.generation).hf_rules(cfg)


def rules_dynamic_vit(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """Qwen2-VL / Qwen2.5-VL: ViT blocks (LayerNorm + QuickGELU or RMSNorm + SwiGLU), merger, Qwen2 LLM."""
    vit, llm = cfg.vision, cfg.llm
    rms = vit.norm == "rmsnorm"
    R: list[tuple[str, tuple[str, ...], str]] = [("vision.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",), "patch")]
    for i in range(vit.depth):
        s, d = f"visual.blocks.{i}.", f"vision.decoder.layers.{i}."
        norm_parts = ("weight",) if rms else ("weight", "bias")
        for part in norm_parts:
            R.append((d + f"input_layernorm.{part}", (s + f"norm1.{part}",), "id"))
            R.append((d + f"pre_mlp_layernorm.{part}", (s + f"norm2.{part}",), "id"))
        for part in ("weight", "bias"):
            R.append((d + f"self_attention.linear_qkv.{part}", (s + f"attn.qkv.{part}",), "qkv_vit"))
            R.append((d + f"self_attention.linear_proj.{part}", (s + f"attn.proj.{part}",), "id"))
            if vit.mlp == "swiglu":
                R.append((d + f"mlp.linear_fc1.{part}", (s + f"mlp.gate_proj.{part}", s + f"mlp.up_proj.{part}"), "cat"))
                R.append((d + f"mlp.linear_fc2.{part}", (s + f"mlp.down_proj.{part}",), "id"))
            else:
                R.append((d + f"mlp.linear_fc1.{part}", (s + f"mlp.fc1.{part}",), "id"))
                R.append((d + f"mlp.linear_fc2.{part}", (s + f"mlp.fc2.{part}",), "id"))
    for part in ("weight",) if rms else ("weight", "bias"):
        R.append((f"projector.ln_q.{part}", (f"visual.merger.ln_q.{part}",), "id"))
    for part in ("weight", "bias"):
        R.append((f"projector.linear_fc1.{part}", (f"visual.merger.mlp.0.{part}",), "id"))
        R.append((f"projector.linear_fc2.{part}", (f"visual.merger.mlp.2.{part}",), "id"))
    R.append(("llm.embedding.weight", ("lm.embed_tokens.weight",), "id"))
    for i in range(llm.num_layers):
        s, d = f"lm.layers.{i}.", f"llm.decoder.layers.{i}."
        R.append((d + "input_layernorm.weight", (s + "input_layernorm.weight",), "id"))
        R.append((d + "pre_mlp_layernorm.weight", (s + "post_attention_layernorm.weight",), "id"))
        for part in ("weight", "bias") if llm.qkv_bias else ("weight",):
            R.append((d + f"self_attention.linear_qkv.{part}", tuple(s + f"self_attn.{n}_proj.{part}" for n in "qkv"), "qkv_llm"))
        R.append((d + "self_attention.linear_proj.weight", (s + "self_attn.o_proj.weight",), "id"))
        R.append((d + "mlp.linear_fc1.weight", (s + "mlp.gate_proj.weight", s + "mlp.up_proj.weight"), "cat"))
        R.append((d + "mlp.linear_fc2.weight", (s + "mlp.down_proj.weight",), "id"))
    R.append(("llm.decoder.final_layernorm.weight", ("lm.norm.weight",), "id"))
    if not llm.tie_word_embeddings:
        R.append(("llm.output_layer.weight", ("lm_head.weight",), "id"))
    return R


def rules_qwen_vl(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """Qwen-VL: the names of its public remote code (`modeling_qwen.py` + `visual.py` of Qwen/Qwen-VL).

    ViT blocks: `attn.in_proj` is already per head [q|k|v] (megatron's layout for ng = nh); the
    LLM's `c_attn` is [q; k; v] over all heads; its MLP computes `w1(x) * silu(w2(x))`, so our
    `[gate; up]` is `[w2; w1]`; the resampler's attention is a `nn.MultiheadAttention`.
    """
    vit, llm = cfg.vision, cfg.llm
    V, P = "transformer.visual.", "projector."
    R: list[tuple[str, tuple[str, ...], str]] = [
        ("vision.patch_embed.weight", (V + "conv1.weight",), "patch2d"),
        ("vision.positional_embedding", (V + "positional_embedding",), "id"),
    ]
    R += [(f"vision.ln_pre.{p}", (V + f"ln_pre.{p}",), "id") for p in ("weight", "bias")]
    block = {  # ours → released, each with weight and bias
        "input_layernorm": "ln_1", "pre_mlp_layernorm": "ln_2", "self_attention.linear_qkv": "attn.in_proj",
        "self_attention.linear_proj": "attn.out_proj", "mlp.linear_fc1": "mlp.c_fc", "mlp.linear_fc2": "mlp.c_proj",
    }
    for i in range(vit.depth):
        s, d = V + f"transformer.resblocks.{i}.", f"vision.decoder.layers.{i}."
        R += [(d + f"{o}.{p}", (s + f"{h}.{p}",), "id") for o, h in block.items() for p in ("weight", "bias")]
    A = V + "attn_pool."
    R += [(P + n, (A + n,), "id") for n in ("query", "pos_embed", "kv_proj.weight")]
    R += [(P + f"attn.in_proj.{p}", (A + f"attn.in_proj_{p}",), "id") for p in ("weight", "bias")]
    R += [(P + f"attn.out_proj.{p}", (A + f"attn.out_proj.{p}",), "id") for p in ("weight", "bias")]
    R += [(P + f"{n}.{p}", (A + f"{n}.{p}",), "id") for n in ("ln_q", "ln_kv") for p in ("weight", "bias")]
    R += [(P + f"ln_post.{p}", (V + f"ln_post.{p}",), "id") for p in ("weight", "bias")]
    R.append((P + "proj", (V + "proj",), "id"))
    R.append(("llm.embedding.weight", ("transformer.wte.weight",), "id"))
    for i in range(llm.num_layers):
        s, d = f"transformer.h.{i}.", f"llm.decoder.layers.{i}."
        R.append((d + "input_layernorm.weight", (s + "ln_1.weight",), "id"))
        R.append((d + "pre_mlp_layernorm.weight", (s + "ln_2.weight",), "id"))
        for part in ("weight", "bias"):
            R.append((d + f"self_attention.linear_qkv.{part}", (s + f"attn.c_attn.{part}",), "qkv_packed_llm"))
        R.append((d + "self_attention.linear_proj.weight", (s + "attn.c_proj.weight",), "id"))
        R.append((d + "mlp.linear_fc1.weight", (s + "mlp.w2.weight", s + "mlp.w1.weight"), "cat"))
        R.append((d + "mlp.linear_fc2.weight", (s + "mlp.c_proj.weight",), "id"))
    R.append(("llm.decoder.final_layernorm.weight", ("transformer.ln_f.weight",), "id"))
    R.append(("llm.output_layer.weight", ("lm_head.weight",), "id"))
    return R


def rules_qwen3_vl(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """Qwen3-VL (HF `Qwen3VLForConditionalGeneration`, 4.57): ViT with patch bias, `pos_embed`,
    LayerNorm blocks with `mlp.linear_fc1/linear_fc2`; merger `norm`/`linear_fc1`/`linear_fc2`;
    `deepstack_merger_list.{j}`; Qwen3 LLM (no qkv bias, `q_norm`/`k_norm` per head)."""
    vit, llm = cfg.vision, cfg.llm
    R: list[tuple[str, tuple[str, ...], str]] = [("vision.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",), "patch")]
    if vit.patch_bias:
        R.append(("vision.patch_embed.proj.bias", ("visual.patch_embed.proj.bias",), "id"))
    R.append(("vision.pos_embed", ("visual.pos_embed.weight",), "id"))
    for i in range(vit.depth):
        s, d = f"visual.blocks.{i}.", f"vision.decoder.layers.{i}."
        for part in ("weight", "bias"):
            R.append((d + f"input_layernorm.{part}", (s + f"norm1.{part}",), "id"))
            R.append((d + f"pre_mlp_layernorm.{part}", (s + f"norm2.{part}",), "id"))
            R.append((d + f"self_attention.linear_qkv.{part}", (s + f"attn.qkv.{part}",), "qkv_vit"))
            R.append((d + f"self_attention.linear_proj.{part}", (s + f"attn.proj.{part}",), "id"))
            R.append((d + f"mlp.linear_fc1.{part}", (s + f"mlp.linear_fc1.{part}",), "id"))
            R.append((d + f"mlp.linear_fc2.{part}", (s + f"mlp.linear_fc2.{part}",), "id"))
    mergers = [("projector.", "visual.merger.")] + [
        (f"projector.deepstack.{j}.", f"visual.deepstack_merger_list.{j}.") for j in range(len(vit.deepstack_visual_indexes))
    ]
    for ours, hf in mergers:
        for part in ("weight", "bias"):
            R.append((ours + f"ln_q.{part}", (hf + f"norm.{part}",), "id"))
            R.append((ours + f"linear_fc1.{part}", (hf + f"linear_fc1.{part}",), "id"))
            R.append((ours + f"linear_fc2.{part}", (hf + f"linear_fc2.{part}",), "id"))
    R.append(("llm.embedding.weight", ("lm.embed_tokens.weight",), "id"))
    for i in range(llm.num_layers):
        s, d = f"lm.layers.{i}.", f"llm.decoder.layers.{i}."
        R.append((d + "input_layernorm.weight", (s + "input_layernorm.weight",), "id"))
        R.append((d + "pre_mlp_layernorm.weight", (s + "post_attention_layernorm.weight",), "id"))
        for part in ("weight", "bias") if llm.qkv_bias else ("weight",):
            R.append((d + f"self_attention.linear_qkv.{part}", tuple(s + f"self_attn.{n}_proj.{part}" for n in "qkv"), "qkv_llm"))
        if llm.qk_norm:
            R.append((d + "self_attention.q_layernorm.weight", (s + "self_attn.q_norm.weight",), "id"))
            R.append((d + "self_attention.k_layernorm.weight", (s + "self_attn.k_norm.weight",), "id"))
        R.append((d + "self_attention.linear_proj.weight", (s + "self_attn.o_proj.weight",), "id"))
        if llm.num_experts:
            R.extend(_expert_rules(d, s, llm.num_experts))
        else:
            R.append((d + "mlp.linear_fc1.weight", (s + "mlp.gate_proj.weight", s + "mlp.up_proj.weight"), "cat"))
            R.append((d + "mlp.linear_fc2.weight", (s + "mlp.down_proj.weight",), "id"))
    R.append(("llm.decoder.final_layernorm.weight", ("lm.norm.weight",), "id"))
    if not llm.tie_word_embeddings:
        R.append(("llm.output_layer.weight", ("lm_head.weight",), "id"))
    return R


def rules_qwen3_5(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """Qwen3.5 / Qwen3.6 (HF `Qwen3_5(Moe)ForConditionalGeneration`, transformers 5.25 `modeling_qwen3_5.py`):
    Qwen3-VL's ViT and merger without DeepStack; per LLM layer either `linear_attn.*` (Gated DeltaNet, our
    `self_attention.*` of `models/gdn.py`) or `self_attn.*` with `q_proj` rows `[head, (query | gate), d]`
    (kind `qkv_gated`: megatron's gated layout per query group); MLP or routed experts + shared expert.

    Every LLM RMSNorm of Qwen3.5 is zero-centred (`Qwen3_5RMSNorm`: x̂ · (1 + w), init 0): our norms are
    plain `torch.nn.RMSNorm` (x̂ · w), so the weights convert as w + 1 (kind `norm1p`, exact in fp32: HF
    adds the 1 in fp32 too). The Gated DeltaNet's gated norm (`Qwen3_5RMSNormGated`, init 1) is plain.

    The MTP head (`mtp.*`, when the model builds it: `mtp.mtp_layers_built`): `mtp.fc` as is, its three norms
    zero-centred like the rest, `mtp.layers.{j}.*` by the same per-layer rules as a full-attention layer.
    Names as vLLM's `qwen3_5_mtp.py` loads them from the released checkpoints (transformers 5.25 has no MTP
    module and ignores them)."""
    llm = cfg.llm
    vit_cfg = cfg.vision
    R = [r for r in rules_qwen3_vl(cfg) if not r[0].startswith("llm.") and not r[0].startswith("projector.deepstack")]
    assert not vit_cfg.deepstack_visual_indexes
    R.append(("llm.embedding.weight", ("lm.embed_tokens.weight",), "id"))
    for i, kind in enumerate(llm.layer_types):
        R.extend(_qwen3_5_layer_rules(cfg, f"lm.layers.{i}.", f"llm.decoder.layers.{i}.", kind))
    R.append(("llm.decoder.final_layernorm.weight", ("lm.norm.weight",), "norm1p"))
    if not llm.tie_word_embeddings:
        R.append(("llm.output_layer.weight", ("lm_head.weight",), "id"))
    from qvl_train.models.mtp import mtp_layers_built

    if mtp_layers_built(cfg):  # the multi-token-prediction head (models/mtp.py; vLLM `qwen3_5_mtp.py` names)
        R.append(("llm.mtp.fc.weight", ("mtp.fc.weight",), "id"))
        for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            R.append((f"llm.mtp.{norm}.weight", (f"mtp.{norm}.weight",), "norm1p"))
        for j in range(mtp_layers_built(cfg)):  # a full-attention layer with the model's MLP / MoE
            R.extend(_qwen3_5_layer_rules(cfg, f"mtp.layers.{j}.", f"llm.mtp.layers.{j}.", "full_attention"))
    return R


def _qwen3_5_layer_rules(cfg: ModelConfig, s: str, d: str, kind: str) -> list[tuple[str, tuple[str, ...], str]]:
    """One Qwen3.5 decoder layer (HF prefix `s`, ours `d`) of layer type `kind`: the main LLM's layers and the
    MTP head's (`mtp.layers.{j}.*`, full attention) share these names below their prefix."""
    llm = cfg.llm
    R: list[tuple[str, tuple[str, ...], str]] = []
    R.append((d + "input_layernorm.weight", (s + "input_layernorm.weight",), "norm1p"))
    R.append((d + "pre_mlp_layernorm.weight", (s + "post_attention_layernorm.weight",), "norm1p"))
    if kind == "linear_attention":
        a, g = s + "linear_attn.", d + "self_attention."
        R.append((g + "in_proj.weight", tuple(a + n for n in _GDN_IN_PROJ), "gdn_in_proj"))
        R.append((g + "conv_weight", (a + "conv1d.weight",), "gdn_conv"))
        for ours, hf in (("A_log", "A_log"), ("dt_bias", "dt_bias"), ("norm_weight", "norm.weight"),
                         ("out_proj.weight", "out_proj.weight")):
            R.append((g + ours, (a + hf,), "id"))
    else:
        R.append((d + "self_attention.linear_qkv.weight", tuple(s + f"self_attn.{n}_proj.weight" for n in "qkv"), "qkv_gated"))
        R.append((d + "self_attention.q_layernorm.weight", (s + "self_attn.q_norm.weight",), "norm1p"))
        R.append((d + "self_attention.k_layernorm.weight", (s + "self_attn.k_norm.weight",), "norm1p"))
        R.append((d + "self_attention.linear_proj.weight", (s + "self_attn.o_proj.weight",), "id"))
    if llm.num_experts:
        R.append((d + "mlp.router.weight", (s + "mlp.gate.weight",), "id"))
        for j in range(llm.num_experts):  # per expert, as the released checkpoints and 5.25's save_pretrained
            e, x = d + f"mlp.experts.local_experts.{j}.", s + f"mlp.experts.{j}."
            R.append((e + "linear_fc1.weight", (x + "gate_proj.weight", x + "up_proj.weight"), "cat"))
            R.append((e + "linear_fc2.weight", (x + "down_proj.weight",), "id"))
        if llm.shared_expert_ffn_hidden_size:
            e = s + "mlp.shared_expert."
            R.append((d + "mlp.shared_experts.linear_fc1.weight", (e + "gate_proj.weight", e + "up_proj.weight"), "cat"))
            R.append((d + "mlp.shared_experts.linear_fc2.weight", (e + "down_proj.weight",), "id"))
            R.append((d + "mlp.shared_experts.gate_weight", (s + "mlp.shared_expert_gate.weight",), "id"))
    else:
        R.append((d + "mlp.linear_fc1.weight", (s + "mlp.gate_proj.weight", s + "mlp.up_proj.weight"), "cat"))
        R.append((d + "mlp.linear_fc2.weight", (s + "mlp.down_proj.weight",), "id"))
    return R


_GDN_IN_PROJ = ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight")


def _gdn_layer(cfg: ModelConfig, given: dict[str, torch.Tensor], to_local: bool) -> dict[str, torch.Tensor]:
    """`models/gdn.py`'s one-layer `hf_to_local` / `local_to_hf` on the tensors of one rule; the layer's other
    tensors (which other rules convert as they are) are filled with zeros of their shape."""
    from qvl_train.models import gdn

    l = cfg.llm
    hk, hv, dk, dv, h = l.linear_num_key_heads, l.linear_num_value_heads, l.linear_key_head_dim, l.linear_value_head_dim, l.hidden_size
    conv_rows = 2 * hk * dk + hv * dv
    shapes = {"A_log": (hv,), "dt_bias": (hv,)}
    if to_local:
        shapes.update({"in_proj_qkv.weight": (conv_rows, h), "in_proj_z.weight": (hv * dv, h), "in_proj_b.weight": (hv, h),
                       "in_proj_a.weight": (hv, h), "conv1d.weight": (conv_rows, 1, l.linear_conv_kernel_dim),
                       "norm.weight": (dv,), "out_proj.weight": (h, hv * dv)})
    else:
        shapes.update({"in_proj.weight": (hk * (2 * dk + 2 * (hv // hk) * dv + 2 * (hv // hk)), h),
                       "conv_weight": (conv_rows, l.linear_conv_kernel_dim), "norm_weight": (dv,), "out_proj.weight": (h, hv * dv)})
    like = next(iter(given.values()))
    full = {k: given[k] if k in given else like.new_zeros(shape) for k, shape in shapes.items()}
    return (gdn.hf_to_local if to_local else gdn.local_to_hf)(full, hk, dk)


def fuse_gated_qkv(q_gate: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """HF gated `q_proj` rows `[nh, (query d | gate d)]` + k/v → megatron's gated grouped layout (0.16.1
    `SelfAttention.get_query_key_value_tensors(output_gate=True)`): per query group its nh/ng query heads,
    their nh/ng gates, its k head, its v head."""
    rest = q_gate.shape[1:]
    d = k.shape[0] // num_groups
    per = num_heads // num_groups
    qg = q_gate.reshape(num_groups, per, 2, d, *rest)
    parts = [qg[:, :, 0].reshape(num_groups, per * d, *rest), qg[:, :, 1].reshape(num_groups, per * d, *rest),
             k.reshape(num_groups, d, *rest), v.reshape(num_groups, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest).contiguous()


def split_gated_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_gated_qkv`: (HF q_proj with the gates interleaved per head, k, v)."""
    rest = qkv.shape[1:]
    per = num_heads // num_groups
    d = qkv.shape[0] // (num_groups * (2 * per + 2))
    g = qkv.reshape(num_groups, (2 * per + 2) * d, *rest)
    q, gate, k, v = g.split([per * d, per * d, d, d], dim=1)
    q_gate = torch.stack([q.reshape(num_groups, per, d, *rest), gate.reshape(num_groups, per, d, *rest)], dim=2)
    return q_gate.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(), v.reshape(-1, *rest).contiguous()


def _expert_rules(d: str, s: str, num_experts: int) -> list[tuple[str, tuple[str, ...], str]]:
    """Qwen3-VL-MoE layer MLP: router `mlp.gate` (ours `mlp.router`) and the experts, which HF stores
    fused per layer (`gate_up_proj` / `down_proj` with a leading expert dim) and megatron's
    `SequentialMLP` per expert (`experts.local_experts.{j}.linear_fc1` = [gate; up], `linear_fc2`);
    kind `expert_fc1:j` / `expert_fc2:j` is expert j's slice of the fused tensor."""
    R = [(d + "mlp.router.weight", (s + "mlp.gate.weight",), "id")]
    for j in range(num_experts):
        e = d + f"mlp.experts.local_experts.{j}."
        R.append((e + "linear_fc1.weight", (s + "mlp.experts.gate_up_proj",), f"expert_fc1:{j}"))
        R.append((e + "linear_fc2.weight", (s + "mlp.experts.down_proj",), f"expert_fc2:{j}"))
    return R


def detect_expert_layout(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> str | None:
    """Which layout a Qwen3-VL-MoE checkpoint stores its experts in (None without experts).

    ``hub`` (the released checkpoints, transformers 4.x): `gate_up_proj [E, H, 2I]`, `down_proj
    [E, I, H]`; ``transposed`` (transformers 5.x runtime): `gate_up_proj [E, 2I, H]`, `down_proj
    [E, H, I]`. Told apart by shape; where H = 2I and I = H cannot both hold, one of the two shapes
    decides (a model with H = 2I and I = H does not exist)."""
    h, inner = cfg.llm.hidden_size, cfg.llm.moe_ffn_hidden_size
    for key, t in hf_state_dict.items():
        if key.endswith("mlp.experts.gate_up_proj") and h != 2 * inner:
            return "hub" if t.shape[1] == h else "transposed"
        if key.endswith("mlp.experts.down_proj") and h != inner:
            return "hub" if t.shape[1] == inner else "transposed"
    return None


def _unfuse_experts(src: dict[str, torch.Tensor], rules: list, layout: str) -> None:
    """Fused expert tensors (`mlp.experts.gate_up_proj` / `down_proj`, a transformers 5.x runtime state dict)
    → per-expert `mlp.experts.{j}.gate_proj/up_proj/down_proj`, in place, where the rules read per-expert keys
    (Qwen3.5-MoE: the released checkpoints and 5.25's `save_pretrained` store experts one by one)."""
    wanted = {k for _, hf_keys, _ in rules for k in hf_keys}
    for key in [k for k in src if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        base = key.rsplit(".", 1)[0]
        if f"{base}.0.down_proj.weight" not in wanted:
            continue
        fused = src.pop(key)
        for j in range(fused.shape[0]):
            w = _expert_slice(fused, j, layout)
            if key.endswith("gate_up_proj"):
                src[f"{base}.{j}.gate_proj.weight"], src[f"{base}.{j}.up_proj.weight"] = w.chunk(2, dim=0)
            else:
                src[f"{base}.{j}.down_proj.weight"] = w


def _expert_slice(fused: torch.Tensor, j: int, layout: str) -> torch.Tensor:
    """Expert j of a fused HF tensor as megatron's `[out, in]` weight."""
    return fused[j] if layout == "transposed" else fused[j].t()


def _fuse_experts(weights: list[torch.Tensor], layout: str) -> torch.Tensor:
    """Inverse of `_expert_slice` over all experts of a layer."""
    return torch.stack([w if layout == "transposed" else w.t() for w in weights])


def hf_to_ours(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict (either spelling) → full state dict of our `VLM` at tp = pp = 1."""
    src = {_to_canonical(k): v for k, v in hf_state_dict.items()}
    vit, llm = cfg.vision, cfg.llm
    layout = detect_expert_layout(src, cfg) or "hub"
    rules = _rules(cfg)
    _unfuse_experts(src, rules, layout)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, hf_keys, kind in rules:
        missing = [k for k in hf_keys if k not in src]
        if missing and missing[0].startswith("mtp."):
            raise KeyError(f"hf_to_ours: HF tensor {missing[0]!r} missing: config.json sets mtp_num_hidden_layers="
                           f"{llm.mtp_num_layers} but the checkpoint lacks its multi-token-prediction head; set "
                           "text_config.mtp_num_hidden_layers to 0 in config.json to import it without one")
        if missing:
            raise KeyError(f"hf_to_ours: HF tensor {missing[0]!r} missing (config mismatch?)")
        used.update(hf_keys)
        t = [src[k] for k in hf_keys]
        if kind == "id":
            out[ours] = t[0]
        elif kind in ("patch", "patch2d"):
            out[ours] = t[0].reshape(t[0].shape[0], -1)
        elif kind == "qkv_vit":
            q, k, v = t[0].chunk(3, dim=0)
            out[ours] = fuse_qkv(q, k, v, vit.num_heads, vit.num_heads)
        elif kind == "qkv_llm":
            out[ours] = fuse_qkv(*t, llm.num_attention_heads, llm.num_query_groups)
        elif kind == "qkv_packed_llm":  # Qwen-VL c_attn: [q; k; v] (multi-head: k, v as wide as q)
            out[ours] = fuse_qkv(*t[0].chunk(3, dim=0), llm.num_attention_heads, llm.num_query_groups)
        elif kind == "cat":
            out[ours] = torch.cat(t)
        elif kind == "norm1p":  # zero-centred RMSNorm weight (Qwen3.5) → plain
            out[ours] = t[0] + 1
        elif kind == "qkv_gated":
            out[ours] = fuse_gated_qkv(*t, llm.num_attention_heads, llm.num_query_groups)
        elif kind == "gdn_in_proj":
            out[ours] = _gdn_layer(cfg, dict(zip(_GDN_IN_PROJ, t)), to_local=True)["in_proj.weight"]
        elif kind == "gdn_conv":
            out[ours] = _gdn_layer(cfg, {"conv1d.weight": t[0]}, to_local=True)["conv_weight"]
        elif kind.startswith("expert_"):
            out[ours] = _expert_slice(t[0], int(kind.split(":")[1]), layout)
        else:  # pragma: no cover
            raise AssertionError(kind)
    if llm.tie_word_embeddings:
        used.add("lm_head.weight")  # a tied checkpoint may carry a copy of the embedding
    mtp = sorted(k for k in src if k.startswith("mtp.") and k not in used) if llm.mtp_num_layers else []
    if mtp:  # Qwen3.5's multi-token-prediction head where the model does not build it (several MTP layers)
        log.warning("hf_to_ours: %d multi-token-prediction tensors (%s, …) are not imported: this model builds no MTP "
                    "head (models/mtp.py: model.llm.mtp_num_layers=1); an export carries none", len(mtp), mtp[0])
        used.update(mtp)
    unused = [k for k in src if k not in used and not re.search(r"rotary_emb|inv_freq", k)]
    if unused:
        raise ValueError(f"hf_to_ours: HF tensors not mapped (config mismatch?): {unused[:8]}")
    return {k: v.contiguous() for k, v in out.items()}


def _to_hf_parts(t: torch.Tensor, kind: str, cfg: ModelConfig) -> list[torch.Tensor]:
    """Our tensor → its HF tensor(s), by the rule's transform (row splits act on any `[out, …]` tensor)."""
    vit, llm = cfg.vision, cfg.llm
    if kind == "id":
        return [t]
    if kind == "patch":
        return [t.reshape(t.shape[0], vit.in_channels, vit.temporal_patch_size, vit.patch_size, vit.patch_size)]
    if kind == "qkv_vit":
        return [torch.cat(list(split_qkv(t, vit.num_heads, vit.num_heads)))]
    if kind == "qkv_llm":
        return list(split_qkv(t, llm.num_attention_heads, llm.num_query_groups))
    if kind == "patch2d":
        return [t.reshape(t.shape[0], vit.in_channels, vit.patch_size, vit.patch_size)]
    if kind == "qkv_packed_llm":
        return [torch.cat(list(split_qkv(t, llm.num_attention_heads, llm.num_query_groups)))]
    if kind == "cat":
        return list(t.chunk(2, dim=0))
    if kind == "norm1p":
        return [t - 1]
    if kind == "qkv_gated":
        return list(split_gated_qkv(t, llm.num_attention_heads, llm.num_query_groups))
    if kind == "gdn_in_proj":
        hf = _gdn_layer(cfg, {"in_proj.weight": t}, to_local=False)
        return [hf[n] for n in _GDN_IN_PROJ]
    if kind == "gdn_conv":
        return [_gdn_layer(cfg, {"conv_weight": t}, to_local=False)["conv1d.weight"]]
    raise AssertionError(kind)  # pragma: no cover


def lora_to_hf(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: ModelConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA factors per our weight key (`….linear_qkv.weight` → (A `[r, in]`, B `[out, r]`)) → per HF
    module name in the transformers runtime spelling (`model.language_model.layers.0.self_attn.q_proj`),
    as PEFT names the modules it adapts.

    A fused weight that HF keeps as several modules (q / k / v, gate / up) has `W + s·B A` split on its
    rows, so each HF module gets the same A and its rows of B — the same row transform as the weight.
    """
    rules = {ours: (hf_keys, kind) for ours, hf_keys, kind in _rules(cfg)}
    routed = sorted(ours for ours in factors if rules[ours][1].startswith("expert_"))
    if routed:
        raise ValueError(
            f"{len(routed)} adapters sit on routed experts (e.g. {routed[0]}); transformers keeps a MoE layer's "
            "experts as fused [experts, …] tensors, which a PEFT LoRA adapter cannot target: export merged "
            "(without --lora-adapter), or train with model.lora.targets=[linear_qkv,linear_proj] to get a PEFT adapter"
        )
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for ours, (a, b) in factors.items():
        hf_keys, kind = rules[ours]
        for key, part in zip(hf_keys, _to_hf_parts(b, kind, cfg)):
            out[_from_canonical(key, "runtime").removesuffix(".weight")] = (a.contiguous(), part.contiguous())
    return out


def ours_to_hf(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, *, style: str = "hub", write_tied_lm_head: bool = False,
    expert_layout: str = "hub",
) -> dict[str, torch.Tensor]:
    """Full state dict of our `VLM` (tp = pp = 1) → HF state dict in the given key `style`.

    With tied embeddings no `lm_head.weight` is written unless `write_tied_lm_head` (some
    checkpoints carry the copy; import records whether the source did). Qwen3-VL-MoE experts are
    written fused in `expert_layout` (``hub`` | ``transposed``, see `detect_expert_layout`).
    """
    if style not in ("hub", "runtime"):
        raise ValueError(f"style={style!r}; valid: hub, runtime")
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout={expert_layout!r}; valid: {', '.join(EXPERT_LAYOUTS)}")
    llm = cfg.llm
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, list[torch.Tensor]] = {}  # fused HF key → expert weights in order
    for ours, hf_keys, kind in _rules(cfg):
        t = state_dict[ours]
        if kind.startswith("expert_"):
            experts.setdefault(_from_canonical(hf_keys[0], style), []).append(t)
            continue
        for key, part in zip(hf_keys, _to_hf_parts(t, kind, cfg)):
            out[_from_canonical(key, style)] = part.contiguous()
    for key, weights in experts.items():
        out[key] = _fuse_experts(weights, expert_layout).contiguous()
    if llm.tie_word_embeddings and write_tied_lm_head:
        out["lm_head.weight"] = state_dict["llm.embedding.weight"].clone()
    return out
