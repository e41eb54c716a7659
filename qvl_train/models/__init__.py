"""Model side of qvl-train: `build_model`, `init_weights` and the `VLM` they produce.

The engine calls exactly this::

    model = build_model(cfg.model, cfg.parallel, pre_process=..., post_process=..., dtype=...)
    init_weights(model, seed=cfg.seed, std=cfg.model.init_std)   # or load a checkpoint
    out = model(batch)          # last stage: per-token loss [L] fp32; else hidden [L, 1, H]

megatron's `parallel_state` must be initialised by the caller before `build_model` (the TP layers
read their group from it; `init_weights` reads the layout through `sharded_state_dict`). On a
machine without CUDA call `qvl_train.compat.megatron_cpu.install_cpu_compat()` first.

A new generation = one entry of the registry (`qvl_train/generations/`): its `ModelSpec.build` is called here.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from qvl_train import generations
from qvl_train.config import ModelConfig, ParallelConfig
from qvl_train.models.common import Execution
from qvl_train.models.specs import resolve_spec_backend
from qvl_train.models.vlm import VLM

__all__ = ["build_model", "init_weights", "VLM", "IMPLEMENTED", "MODULE_PREFIXES", "Execution"]

MODULE_PREFIXES = ("vision.", "projector.", "llm.")
"""Every parameter name starts with one of these (stage freezing and per-module metrics use them)."""


def _spec_backend(cfg: ModelConfig, parallel: ParallelConfig) -> str:
    """LoRA wraps megatron's local parallel linears (TE's fuse the norm into the GEMM): local spec then.
    Context parallelism runs through our core attention (`parallel/context.py`), not TE's: local too."""
    return "local" if cfg.lora.enabled or parallel.cp > 1 else resolve_spec_backend()


IMPLEMENTED = generations.NAMES


def build_model(
    cfg: ModelConfig, parallel: ParallelConfig, *, pre_process: bool, post_process: bool, dtype: torch.dtype = torch.float32,
    execution: Execution = Execution(), vp_stage: Optional[int] = None,
) -> VLM:
    """This pipeline stage's part of the model (single-device modules; TP/PP from `parallel_state`).

    Weights are allocated but not initialised: call `init_weights` or load a checkpoint. Every
    parameter has `dtype` (megatron's local norms are created fp32 whatever `params_dtype` says).
    `execution` (activation recomputation, FP8) goes into every tower's `TransformerConfig`.
    `vp_stage`: which of this rank's `parallel.vpp` model chunks to build (interleaved schedule;
    None when vpp = 1); `pre_process` / `post_process` then describe that chunk.
    With `cfg.lora` on, the target layers carry adapters (`models/lora.py`).
    """
    try:
        spec = generations.get(cfg.generation)
    except ValueError as e:
        raise NotImplementedError(str(e)) from None
    model = spec.build(
        cfg, parallel, pre_process=pre_process, post_process=post_process, dtype=dtype,
        spec_backend=_spec_backend(cfg, parallel), execution=execution, vp_stage=vp_stage,
    )
    for param in model.parameters():
        param.data = param.data.to(dtype)
    mark_tensor_parallel_params(model)
    if cfg.lora.enabled:
        from qvl_train.models.lora import apply_lora

        apply_lora(model, cfg.lora)
    return model


def mark_tensor_parallel_params(model: torch.nn.Module) -> None:
    """Tag the weights of megatron's parallel layers as tensor-parallel shards.

    megatron-core sets `tensor_model_parallel` / `partition_dim` on a weight only inside its own
    initialisation (`perform_initialization=True` on the CPU path). We initialise by global name
    instead (`init_weights`), so the tags are set here; gradient-norm and checkpoint code rely on
    them to count each shard once and replicated tensors once per tensor-parallel group.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not getattr(weight, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)


_ROW_BLOCK = 1024
"""Rows of a global tensor drawn from one generator: a rank draws only the blocks it holds rows of."""


def _seed_of(seed: int, key: str, layer_offsets: tuple[int, ...], block: int) -> int:
    tag = f"{key}|{','.join(map(str, layer_offsets))}|{block}".encode()
    return (seed * 1_000_003 + zlib.crc32(tag)) % (2**63 - 1)


@torch.no_grad()
def _init_sharded(st: ShardedTensor, seed: int, std: float) -> None:
    """Fill `st.data` (a view of a parameter) with its slice of the deterministic global tensor."""
    if st.flattened_range is not None:
        raise NotImplementedError("init_weights works on model parameters, not optimizer-flattened shards")
    p = st.prepend_axis_num
    shape, offset = st.global_shape[p:], st.global_offset[p:]
    data = st.data
    if st.key.endswith(("bias", "lora_B")):  # LoRA's B starts at zero: step 0 is the base model
        data.zero_()
        return
    if data.dim() == 1:  # the only 1-D weights are norm scales
        data.fill_(1.0)
        return
    r0, nr = offset[0], data.shape[0]
    cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], data.shape[1:]))
    for block in range(r0 // _ROW_BLOCK, (r0 + nr - 1) // _ROW_BLOCK + 1):
        b0 = block * _ROW_BLOCK
        b1 = min(b0 + _ROW_BLOCK, shape[0])
        g = torch.Generator().manual_seed(_seed_of(seed, st.key, st.global_offset[:p], block))
        full = torch.empty((b1 - b0,) + tuple(shape[1:]), dtype=torch.float32).normal_(0.0, std, generator=g)
        lo, hi = max(r0, b0), min(r0 + nr, b1)
        data[lo - r0 : hi - r0].copy_(full[(slice(lo - b0, hi - b0),) + cols])


@torch.no_grad()
def init_weights(model: VLM, seed: int, std: float) -> None:
    """Layout-independent init: the same seed gives the same *full* weights for any tp / pp.

    For every tensor of `model.sharded_state_dict()` (global key, global shape, this rank's
    offsets) the global tensor is defined by generators seeded from (seed, crc32(global key,
    layer index, row block)) — normal(0, std) for matrices and embeddings, ones for norm weights,
    zeros for biases and LoRA B factors — and this rank copies its slice. Only the row blocks a rank holds are drawn.
    """
    covered = set()
    for item in nested_values(model.sharded_state_dict()):
        if isinstance(item, ShardedTensorFactory):
            items = list(nested_values(item.build()))
        else:
            items = [item]
        for st in items:
            if isinstance(st, ShardedTensor) and st.data.is_floating_point():
                _init_sharded(st, seed, std)
                covered.add(st.data.untyped_storage().data_ptr())
    for module in model.modules():  # parameters with a formula of their own (Qwen-VL's sin-cos table)
        if hasattr(module, "reset_fixed_parameters"):
            module.reset_fixed_parameters()
    missing = [n for n, prm in model.named_parameters() if prm.untyped_storage().data_ptr() not in covered]
    if missing:
        raise RuntimeError(f"init_weights: parameters missing from sharded_state_dict: {missing}")
