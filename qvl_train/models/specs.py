"""ModuleSpecs: which megatron building blocks make up a ViT block and an LLM decoder layer.

The model classes never ask which backend they run on; they receive a spec from here
(DESIGN.md convention 1). Two backends:

* ``local`` (always available, the CPU path): megatron's `TransformerLayer` + `SelfAttention` +
  `ColumnParallelLinear` / `RowParallelLinear` (as `fp8.Fp8ColumnParallelLinear` / `Fp8RowParallelLinear`:
  megatron's own, with the torch FP8 GEMM when the config carries a `train.fp8_backend=torch` recipe) + `MLP`, norms from `TorchNorm` (plain
  `torch.nn.LayerNorm` / `torch.nn.RMSNorm`, chosen by `config.normalization`, like megatron's
  `WrappedTorchNorm` but usable under sequence parallelism; apex's `FusedLayerNorm` is CUDA-only),
  and our `VarlenAttention` as core attention.
* ``te`` (only when `transformer_engine` imports): norm fused into the qkv / fc1 GEMMs
  (`TELayerNormColumnParallelLinear`), `TERowParallelLinear`. Core attention stays
  `VarlenAttention` because our M-RoPE goes through the "sbhd" rotary path (see `rope.py`).
  Transformer Engine is never imported when it is not installed.

Checkpoint keys are backend-independent: the local spec maps `input_layernorm.` /
`pre_mlp_layernorm.` onto TE's fused names (`sharded_state_dict_keys_map`), as megatron's own
GPT specs do, so a checkpoint saved with one backend loads into the other.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from qvl_train.compat.megatron_moe import install_moe_without_te
from qvl_train.models.attention import VarlenAttention
from qvl_train.models.fp8 import (
    Fp8ColumnParallelLinear as ColumnParallelLinear,
    Fp8Recipe,
    Fp8RowParallelLinear as RowParallelLinear,
    gpu_fp8_capable,
)

__all__ = ["te_available", "resolve_spec_backend", "layer_spec", "moe_spec", "block_spec", "TorchNorm", "fp8_missing", "resolve_fp8"]

log = logging.getLogger(__name__)


def te_available() -> bool:
    """Whether Transformer Engine is installed (checked without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_spec_backend(backend: str = "auto") -> str:
    """`auto` → `te` when Transformer Engine is installed and CUDA is up, else `local`."""
    if backend == "auto":
        import torch

        return "te" if te_available() and torch.cuda.is_available() else "local"
    if backend not in ("local", "te"):
        raise ValueError(f"spec backend {backend!r}; valid: auto, local, te")
    return backend


FP8_BACKENDS = ("te", "torch")


def fp8_missing(backend: str = "te") -> list[str]:
    """What FP8 training with `backend` lacks on this machine: [] or e.g. ["Transformer Engine", "a GPU with FP8 ..."].

    Both backends need FP8 tensor cores (compute capability >= 8.9: Ada, Hopper and later); the te backend
    also needs Transformer Engine."""
    missing = [] if backend != "te" or te_available() else [
        "Transformer Engine (pip install transformer-engine, or train.fp8_backend=torch, which needs none)"
    ]
    capable, gpu = gpu_fp8_capable()
    if not capable:
        missing.append(f"a GPU with FP8 tensor cores (compute capability >= 8.9; here: {gpu})")
    return missing


def resolve_fp8(
    mode: str, backend: str = "te", scaling: str = "rowwise", local_spec: bool = False
) -> tuple[str | None, Fp8Recipe | None]:
    """`train.fp8`, `train.fp8_backend`, `train.fp8_scaling` → (megatron's `TransformerConfig.fp8` for
    Transformer Engine, the torch backend's `Fp8Recipe`); at most one is set, both None = FP8 off.

    `auto` is "hybrid" where the backend can run (see `fp8_missing`); elsewhere one log line says that
    FP8 is off and why. `local_spec`: the run is forced onto the local spec (LoRA, context parallelism),
    whose linears only the torch backend turns into FP8 GEMMs, so `auto` with te is off there too.
    Explicit modes were checked by the config's validation before anything started (`RunConfig`); here
    they are taken as they are.
    """
    if backend not in FP8_BACKENDS:
        raise ValueError(f"train.fp8_backend={backend!r}; valid: {', '.join(FP8_BACKENDS)}")
    if mode == "off":
        return None, None
    if mode == "auto":
        missing = fp8_missing(backend)
        if backend == "te" and local_spec:
            missing.append("the TE spec (LoRA / parallel.cp use the local spec: train.fp8_backend=torch runs FP8 there)")
        if missing:
            log.info("train.fp8=auto: FP8 is off (missing: %s)", "; ".join(missing))
            return None, None
        mode = "hybrid"
    if mode not in ("hybrid", "e4m3"):
        raise ValueError(f"train.fp8={mode!r}; valid: off, auto, hybrid, e4m3")
    if backend == "torch":
        return None, Fp8Recipe.from_mode(mode, scaling)
    return mode, None


class TorchNorm:
    """`torch.nn.LayerNorm` / `torch.nn.RMSNorm` by `config.normalization` (megatron's `WrappedTorchNorm`,
    which refuses sequence parallelism). Under sequence parallelism each tensor-parallel rank
    normalises its own slice of the sequence, so the weights are tagged `sequence_parallel` and the
    engine sums their gradients over the TP group (as megatron's `finalize_model_grads` does)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def block_spec(config, layer: ModuleSpec, spec_backend: str = "local"):
    """The `TransformerBlock` spec for this pipeline stage's layers, with a final norm that works under
    sequence parallelism (megatron picks `WrappedTorchNorm` for a bare layer spec when neither TE nor
    apex is installed)."""
    if spec_backend == "te":
        return layer
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=TorchNorm)


def moe_spec(spec_backend: str = "local") -> ModuleSpec:
    """megatron's `MoELayer`: `TopKRouter` + routed SwiGLU experts (Qwen3-VL-MoE has no shared expert).

    Local backend: `SequentialMLP` (one megatron `MLP` per local expert, parameters
    `experts.local_experts.{j}.linear_fc1/linear_fc2`). TE backend: `TEGroupedMLP` (one grouped GEMM
    over the local experts); megatron maps both onto the same checkpoint keys.
    """
    install_moe_without_te()  # the router's GEMM without Transformer Engine (qvl_train/compat)
    if spec_backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider  # noqa: PLC0415 (TE only when asked)

        module, submodules = TESpecProvider().grouped_mlp_modules(True, False)
        experts = ModuleSpec(module=module, submodules=submodules)
    else:
        experts = ModuleSpec(
            module=SequentialMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        )
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=experts))


def layer_spec(
    *, causal: bool, attention_backend: str = "auto", spec_backend: str = "local", qk_norm: bool = False, moe: bool = False
) -> ModuleSpec:
    """A pre-norm transformer layer: norm → self-attention → residual → norm → MLP → residual.

    `causal` picks the mask type of the core attention (LLM: causal, ViT: bidirectional per
    frame). Whether the MLP is gated (SwiGLU), its activation and its biases come from the
    `TransformerConfig` (`gated_linear_unit`, `activation_func`, `add_bias_linear`,
    `add_qkv_bias`), so the ViT and the LLM share this one spec. `qk_norm` (Qwen3) adds a norm over
    each query / key head before RoPE (`q_layernorm` / `k_layernorm`, RMSNorm by the config).
    `moe` replaces the MLP by `moe_spec` (then the pre-MLP norm is a separate module in both backends).
    """
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    core = ModuleSpec(module=VarlenAttention, params={"backend": attention_backend})
    if spec_backend == "te":
        from megatron.core.extensions.transformer_engine import (  # noqa: PLC0415 (TE only when asked)
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        qk = TENorm if qk_norm else IdentityOp
        mlp = ModuleSpec(
            module=MLP, submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear)
        )
        return ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                self_attention=ModuleSpec(
                    module=SelfAttention,
                    params={"attn_mask_type": mask},
                    submodules=SelfAttentionSubmodules(
                        linear_qkv=TELayerNormColumnParallelLinear,
                        core_attention=core,
                        linear_proj=TERowParallelLinear,
                        q_layernorm=qk,
                        k_layernorm=qk,
                    ),
                ),
                self_attn_bda=get_bias_dropout_add,
                pre_mlp_layernorm=TENorm if moe else IdentityOp,
                mlp=moe_spec("te") if moe else mlp,
                mlp_bda=get_bias_dropout_add,
            ),
        )
    qk = TorchNorm if qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk,
                    k_layernorm=qk,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TorchNorm,
            mlp=moe_spec("local") if moe else ModuleSpec(
                module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                **({} if moe else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}),
            },
        ),
    )
