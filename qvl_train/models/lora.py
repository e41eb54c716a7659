"""Low-rank adapters (LoRA) on megatron's tensor-parallel linear layers, applied from outside the model.

`apply_lora(model, cfg)` gives every target `ColumnParallelLinear` / `RowParallelLinear` of the listed
towers (`model.lora.targets` × `model.lora.modules`) two parameters next to its `weight`::

    y = W x (+ b) + (alpha / r) · B (A x)        A = lora_A [r, in], B = lora_B [out, r]

Qwen3.5's Gated DeltaNet layers (`models/gdn.py`) take adapters on their two megatron linears, targets
`in_proj` (column-parallel, the fused q/k/v/z/b/a rows grouped per key head) and `out_proj` (row-parallel):
the same rules hold, B of `in_proj` is split over TP with the key-head groups of its weight, and the PEFT
export gives each of HF's `linear_attn.in_proj_qkv` / `in_proj_z` / `in_proj_b` / `in_proj_a` the shared A and
its rows of B (`hf_convert.lora_to_hf`, the weight's own regrouping). They are in the default targets, so a
Qwen3.5 LoRA run adapts the token mixer of every layer, linear or full attention.

The layer keeps its name, weights and checkpoint keys (its class becomes a LoRA subclass of its own
class), so a full checkpoint loads into the adapted model and the adapters add `…lora_A` / `…lora_B`.

Tensor parallelism follows the base layer, so tp = N computes what tp = 1 computes:

* column-parallel base (x replicated, y sharded on its rows): A is replicated `[r, in]`, B is sharded
  like W's rows `[out/tp, r]`. `A x` passes `copy_to_tensor_model_parallel_region` (identity forward,
  all-reduce backward) before B, so A's gradient sums every rank's share of the output.
* row-parallel base (x sharded on its columns, y all-reduced): A is sharded like W's columns
  `[r, in/tp]`, B replicated `[out, r]`; the partial `A x` is all-reduced, as the base reduces `W x`.

Checkpoints store the sharded factor with the base layer's rule (the SwiGLU `linear_fc1`'s B is split
into gate / up halves like its weight), so adapters reshard across layouts. `init_weights` draws A
like any matrix (normal, layout-independent) and sets B to zero: step 0 computes the base model.
The engine trains only the adapters (`is_lora_param`); base weights get no gradient and no optimizer
state. In a mixture-of-experts layer (megatron's `SequentialMLP` of local specs) every routed expert's
`linear_fc1` / `linear_fc2` gets its own factors, named and checkpointed under the expert's global index
like its weights, and reduced over the expert-data-parallel group like them (`engines/moe.is_expert_param`). Export
(`tools/convert.py`): `merged_state_dict` (W + scale · B A) or `adapter_factors` mapped
to HF module names by `hf_convert.lora_to_hf` (a PEFT adapter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.mlp import MLP, apply_swiglu_sharded_factory
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from qvl_train.config import LoRAConfig

__all__ = ["apply_lora", "is_lora_param", "lora_layers", "merged_state_dict", "adapter_factors", "fit_to_checkpoint"]

LORA_PARAMS = ("lora_A", "lora_B")


def is_lora_param(name: str) -> bool:
    """Whether a parameter / state-dict name is an adapter factor."""
    return name.rsplit(".", 1)[-1] in LORA_PARAMS


class LoRALinear:
    """Mixin over a megatron parallel linear: the adapter term on the output, the factors in checkpoints."""

    lora_scale: float
    lora_column: bool  # column-parallel base: B sharded on rows; else A sharded on columns
    lora_glu: bool  # a SwiGLU linear_fc1: the rows are [gate; up] per rank (checkpointed in halves)

    def forward(self, input_, *args, **kwargs):
        out, bias = super().forward(input_, *args, **kwargs)
        return out + self.lora_delta(input_).to(out.dtype), bias

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """`scale · B (A x)`, shaped and sharded like the base layer's output."""
        z = F.linear(x, self.lora_A)
        if self.lora_column:
            z = copy_to_tensor_model_parallel_region(z, group=self.tp_group)
        else:
            z = reduce_from_tensor_model_parallel_region(z, group=self.tp_group)
        return F.linear(z, self.lora_B) * self.lora_scale

    def delta_weight(self) -> torch.Tensor:
        """`scale · B A`: this rank's shard of the weight update, laid out like `weight`."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.lora_scale

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # both factors as replicated
        name, axis = ("lora_B", 0) if self.lora_column else ("lora_A", 1)
        key = f"{prefix}{name}"
        sh = make_tp_sharded_tensor_for_checkpoint(
            getattr(self, name), key, tp_axis=axis, prepend_offsets=sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
        if self.lora_glu:
            sh = apply_swiglu_sharded_factory(sh, sharded_offsets, metadata.get("singleton_local_shards", False))
        sd[key] = sh
        return sd


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRALinear, cls), {"__doc__": f"{cls.__name__} with a LoRA adapter."})
    return _CLASSES[cls]


GDN_TARGETS = ("in_proj", "out_proj")
"""Targets that name the projections of a Gated DeltaNet mixer (`models/gdn.py`) and nothing else: Qwen-VL's
resampler has torch `nn.Linear`s of the same names (`vision/qwen_vl.py`), which adapters do not wrap."""


def _targets(model: torch.nn.Module, cfg: LoRAConfig):
    """(name, module, parent) of every layer named in cfg.targets inside a tower of cfg.modules."""
    from qvl_train.models.gdn import GatedDeltaNet

    for name, module in model.named_modules():
        parent_name, _, leaf = name.rpartition(".")
        if leaf in cfg.targets and name.split(".", 1)[0] in cfg.modules:
            parent = model.get_submodule(parent_name)
            if leaf in GDN_TARGETS and not isinstance(parent, GatedDeltaNet):
                continue
            yield name, module, parent


def _check_base(name: str, module: torch.nn.Module) -> bool:
    """Whether `module` is a base layer LoRA can wrap; raises for one it cannot (and says why)."""
    if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        if "Linear" in type(module).__name__:
            raise NotImplementedError(
                f"LoRA wraps megatron's local ColumnParallelLinear / RowParallelLinear; {name} is "
                f"{type(module).__name__} (build the model with the local layer spec)"
            )
        return False
    if module.config.sequence_parallel:
        raise NotImplementedError("LoRA with sequence parallelism is not implemented")
    if isinstance(module, ColumnParallelLinear) and module.gather_output:
        raise NotImplementedError(f"LoRA on a column-parallel layer that gathers its output ({name})")
    if isinstance(module, RowParallelLinear) and not module.input_is_parallel:
        raise NotImplementedError(f"LoRA on a row-parallel layer with a replicated input ({name})")
    return True


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig) -> list[str]:
    """Add adapters to the target layers of `model` (in place); returns the adapted layers' names.

    Factors are allocated (dtype and device of the base weight) but not initialised: `init_weights`
    (or a checkpoint) fills them. Each is tagged as a tensor-parallel shard or a replicated tensor
    like the base weight's matching dimension, so gradient norms count it once.
    """
    adapted = []
    for name, module, parent in list(_targets(model, cfg)):
        if isinstance(module, LoRALinear) or not _check_base(name, module):
            continue
        column = isinstance(module, ColumnParallelLinear)
        out_local, in_local = module.weight.shape
        like = module.weight
        module.lora_A = torch.nn.Parameter(torch.empty(cfg.rank, in_local, dtype=like.dtype, device=like.device))
        module.lora_B = torch.nn.Parameter(torch.empty(out_local, cfg.rank, dtype=like.dtype, device=like.device))
        sharded, dim = (module.lora_B, 0) if column else (module.lora_A, 1)
        set_tensor_model_parallel_attributes(sharded, is_parallel=True, dim=dim, stride=1)
        module.lora_scale = cfg.scale
        module.lora_column = column
        module.lora_glu = bool(column and isinstance(parent, MLP) and parent.config.gated_linear_unit
                               and name.endswith("linear_fc1"))
        module.__class__ = _lora_class(type(module))
        adapted.append(name)
    return adapted


def lora_layers(model: torch.nn.Module) -> dict[str, LoRALinear]:
    """name → adapted layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every adapted weight replaced by `W + scale · B A` and no adapter
    factors (nor megatron's `_extra_state`): the state dict of the plain model (any layout: each rank
    merges its own shard)."""
    sd = {k: v for k, v in model.state_dict().items() if not (is_lora_param(k) or k.endswith("_extra_state"))}
    for name, layer in lora_layers(model).items():
        w = sd[f"{name}.weight"]
        sd[f"{name}.weight"] = (w.float() + layer.delta_weight()).to(w.dtype)
    return sd


@torch.no_grad()
def adapter_factors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name of the base layer's weight (`….weight`) → (A, scale-free B), for a tp = 1 model."""
    return {f"{n}.weight": (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in lora_layers(model).items()}


def fit_to_checkpoint(model_request: dict, present: set[str]) -> bool:
    """Taking weights only (`model.init_from`): drop from a (flat) model sharded state dict the adapter
    factors the checkpoint lacks — a full checkpoint given to a LoRA run; they keep their initialisation
    (B = 0). Returns whether the checkpoint holds adapters the model does not ask for (a LoRA run's
    checkpoint given to a run without LoRA)."""
    for k in [k for k, sh in model_request.items() if is_lora_param(k) and getattr(sh, "key", k) not in present]:
        del model_request[k]
    return not any(map(is_lora_param, model_request)) and any(map(is_lora_param, present))
