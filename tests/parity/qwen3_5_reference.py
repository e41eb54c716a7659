"""Reference-side functions of tests/parity/test_qwen3_5_parity.py: they run in the transformers 5.x environment
(`.venv-ref`) through `qvl_train.tools.reference.run_reference`, so they import only torch and transformers."""

from __future__ import annotations

import torch


def export_generates(tensors: dict, source_dir: str, export_dir: str, architecture: str, new_tokens: int = 6) -> dict:
    """Load the source checkpoint and our export of it with the 5.x class; run both on `input_ids` (logits) and
    generate `new_tokens` greedily from each. Returns the max |Δlogits|, the max |logits| and both generations."""
    import transformers

    cls = getattr(transformers, architecture)
    models = [cls.from_pretrained(d, dtype=torch.float32).eval() for d in (source_dir, export_dir)]
    ids = tensors["input_ids"]
    out = {}
    with torch.no_grad():
        logits = [m(input_ids=ids, use_cache=False).logits for m in models]
        out["max_diff"] = (logits[0] - logits[1]).abs().max().reshape(1)
        out["max_ref"] = logits[0].abs().max().reshape(1)
        for name, m in zip(("source", "export"), models):
            out[name] = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)
    return out
