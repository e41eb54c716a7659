"""Reference side of tests/unit/test_mtp.py: runs in the transformers 5.x environment (`.venv-ref`) through
`qvl_train.tools.reference.run_reference`, so it imports only torch and transformers.

The MTP head as vLLM's `qwen3_5_mtp.py` runs it, written with transformers 5.25's Qwen3.5 modules: the text model's
final-normed hidden state h_i, `fc(cat(pre_fc_norm_embedding(embed(t_{i+1})), pre_fc_norm_hidden(h_i)))`, one
`Qwen3_5DecoderLayer` of a full-attention layer (rotary at position i), `mtp.norm`, the (tied) lm_head; the
cross entropy against token i+2 (our `labels[i+1]`), one sample at a time (no packing on this side)."""

from __future__ import annotations

import torch


def hf_mtp_losses(tensors: dict, text_config: dict) -> dict:
    from transformers.models.qwen3_5 import configuration_qwen3_5 as C, modeling_qwen3_5 as M

    cfg = C.Qwen3_5TextConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"  # causal without a mask
    model = M.Qwen3_5TextModel(cfg).eval()
    prefix = "model.language_model."
    missing, unexpected = model.load_state_dict(
        {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected, (missing, unexpected)
    layer = M.Qwen3_5DecoderLayer(cfg, layer_idx=cfg.layer_types.index("full_attention")).eval()
    layer.load_state_dict({k[len("mtp.layers.0."):]: v for k, v in tensors.items() if k.startswith("mtp.layers.0.")})
    norms = {}
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        norms[name] = M.Qwen3_5RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        norms[name].load_state_dict({"weight": tensors[f"mtp.{name}.weight"]})
    fc = tensors["mtp.fc.weight"]
    head = tensors.get("lm_head.weight", model.embed_tokens.weight)
    ids, labels, cu = tensors["input_ids"], tensors["labels"], tensors["cu_seqlens"].tolist()
    out = {}
    with torch.no_grad():
        for s, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            t = ids[a:b][None]
            h = model(input_ids=t, use_cache=False).last_hidden_state  # after the final norm
            e = model.embed_tokens(t[:, 1:])
            x = torch.cat([norms["pre_fc_norm_embedding"](e), norms["pre_fc_norm_hidden"](h[:, :-1])], dim=-1) @ fc.t()
            n = b - a - 1
            pos = torch.arange(n)[None, None].expand(3, 1, n)
            y = layer(x, position_embeddings=model.rotary_emb(x, pos), attention_mask=None, position_ids=pos)
            y = y[0] if isinstance(y, tuple) else y
            logits = norms["norm"](y)[0] @ head.t()
            target = labels[a + 1 : b]
            ce = torch.nn.functional.cross_entropy(logits, target.clamp(min=0), reduction="none")
            out[f"mtp_{s}"] = torch.where(target >= 0, ce, torch.zeros_like(ce))
    return out
