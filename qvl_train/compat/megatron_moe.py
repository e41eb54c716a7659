"""megatron-core 0.16.1's MoE layer without Transformer Engine.

`megatron/core/transformer/moe/moe_utils.py` binds `te_general_gemm` only when Transformer Engine
imports, yet the router's GEMM (`router_gating_linear`) tests `te_general_gemm is not None`
unconditionally, so a MoE forward without TE raises NameError. Binding the name to None selects the
fp32 `torch.mm` path, which is also the one that matches HF's router to the last bit.

`qvl_train.models.specs.moe_spec` calls `install_moe_without_te()` before building a MoE layer;
calling it again, or with TE installed, changes nothing.
"""

from __future__ import annotations

from qvl_train.compat import require_pinned

__all__ = ["install_moe_without_te"]


def install_moe_without_te() -> bool:
    """Bind `moe_utils.te_general_gemm = None` when Transformer Engine did not bind it.

    Returns True when the name is (now or already) our None binding, False when TE provides it."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return moe_utils.te_general_gemm is None
    require_pinned("megatron-core")
    moe_utils.te_general_gemm = None
    return True
