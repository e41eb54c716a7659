"""megatron-core DistributedDataParallel + DistributedOptimizer (ZeRO-1) for the megatron engine.

`optim.distributed=true` replaces the engine's own AdamW and flat all-reduce with megatron-core's:

* `DistributedDataParallel` gives every trainable parameter a `main_grad` view into contiguous fp32
  gradient buffers (bucketed; backward hooks accumulate into them). `finish_grad_sync` reduce-scatters
  each bucket over the data-parallel group, so rank r ends up with the summed gradient of its 1/dp
  slice only. Overlap with the backward is off (gloo on CPU has no streams; on a GPU it is a later
  speed-up). With `calculate_per_token_loss` the buffers are summed, not averaged: our loss already
  carries 1/G (the global label count), so the sum is the gradient of the global per-token mean.
* `DistributedOptimizer` (built through `get_megatron_optimizer`) keeps AdamW's moments, and for bf16
  parameters an fp32 master copy, only for this rank's slice; after the update the parameter buffers
  are all-gathered. Optimizer memory per rank is 1/dp of the non-distributed optimizer's.
* Routed experts of MoE models (`mark_expert_params`: `param.allreduce = False`) get DDP's second set
  of buffers, reduce-scattered over the expert-data-parallel group (the ranks holding the same experts:
  world / (ep·etp·pp)), and a second DistributedOptimizer sharding their state over that group;
  `get_megatron_optimizer` chains the two. Their squared gradient norms are summed over that group and
  the expert model-parallel one (the engine's `_grad_norms`), the dense ones over dp × cp and tp × pp.

Per-module learning rates and weight-decay exclusions are megatron `config_overrides`: every
parameter is matched to its module (vision / projector / llm), which becomes a `module` key of its
parameter group, and norms / biases get `wd_mult=0`. The engine sets each group's `lr` from
`lr_at`/`module_lrs` at every step, exactly as for its own AdamW; megatron's scheduler is not used.
Clipping is megatron's (`clip_grad_norm`, the global norm over all ranks' slices); the per-module norms
that the engine reports are computed from the same fp32 slices and summed over all ranks.

Checkpoints go through the optimizer's `sharded_state_dict` in megatron's `fully_reshardable` format
(memory-efficient variant): on save the data-parallel slices are gathered over the gloo dp group to
dp rank 0 and reshaped into tensors of each parameter's shape, named after the model's own sharded
tensor (`optimizer.state.exp_avg.<key>`, `.exp_avg_sq.`, `.param.` = fp32 master); on load every rank
reads what covers its slice. So a checkpoint written at dp=2 loads at dp=1 or dp=4 and at another
tp/pp; expert state goes the same way over the expert-data-parallel group, keyed by the experts' global
checkpoint keys, so an ep=2 checkpoint loads at ep=1. (`fully_sharded_model_space`, the fully parallel
one, needs flattened ShardedTensors, which megatron-core 0.16 no longer supports; `dp_reshardable`
cannot change tp/pp.)
"""

from __future__ import annotations

from typing import Callable

import torch

SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient": True}


def _module_override(module: str, peak: float, strip: Callable[[str], str], module_of):
    from megatron.core.optimizer import ParamKey
    from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate

    match = ParamWithNamePredicate(name=f"module_{module}", fn=lambda p, name: module_of(strip(name)) == module)
    return ParamKey(with_name_predicate=match), {"module": module, "max_lr": peak}


def _no_decay_override():
    from megatron.core.optimizer import ParamKey
    from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate

    match = ParamWithNamePredicate(name="no_decay", fn=lambda p, name: p.ndim < 2 or name.endswith(".bias"))
    return ParamKey(with_name_predicate=match), {"wd_mult": 0.0}


class ShardedAdamW:
    """This rank's DDP wrapper and distributed optimizer for `model` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, optim_cfg, dtype: torch.dtype, module_of, modules: tuple) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.cfg, self.module_of, self.modules = optim_cfg, module_of, modules
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False, use_distributed_optimizer=True,
        )
        # One DDP per model chunk (parallel.vpp: `ModelChunks`), as megatron's own training wraps them; the
        # interleaved schedule runs the list, one optimizer covers all their buffers.
        chunks = list(model) if isinstance(model, torch.nn.ModuleList) else [model]
        mark_expert_params(model)
        self.ddps = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c) for c in chunks]
        config = OptimizerConfig(
            optimizer="adam", lr=optim_cfg.lr, min_lr=optim_cfg.min_lr, weight_decay=optim_cfg.weight_decay,
            adam_beta1=optim_cfg.beta1, adam_beta2=optim_cfg.beta2, adam_eps=optim_cfg.eps,
            clip_grad=optim_cfg.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
            use_distributed_optimizer=True,
        )
        def strip(name: str) -> str:  # DDP's named_parameters add "module."
            return name.removeprefix("module.")
        overrides = dict(_module_override(m, peak, strip, module_of) for m, peak in optim_cfg.peak_lrs().items())
        overrides.update([_no_decay_override()])
        self.optimizer = get_megatron_optimizer(config, self.ddps, config_overrides=overrides)
        for group in self.optimizer.param_groups:
            group["weight_decay"] = optim_cfg.weight_decay * group["wd_mult"]
        # load_state_dict matches groups by megatron's identifier keys (wd_mult, lr_mult, ...), which
        # do not tell modules apart: what is ours is put back after every load.
        self._group_meta = [(g["module"], g["weight_decay"]) for g in self.optimizer.param_groups]
        names = {p: n for n, p in model.named_parameters()}
        self._shards = [  # (module index, expert?, model param, this rank's fp32 slice of it)
            (modules.index(module_of(names[p])), not getattr(p, "allreduce", True), p, main)
            for opt in self.optimizer.chained_optimizers  # one per kind of parameter (dense; MoE experts)
            for model_group, main_group in (
                (opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                (opt.model_fp32_groups, opt.shard_fp32_groups),
            )
            for ps, mains in zip(model_group, main_group)
            for p, main in zip(ps, mains)
        ]

    # ------------------------------------------------------------------ step
    def zero_grad(self) -> None:
        for ddp in self.ddps:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def sync_grads(self) -> None:
        """Reduce-scatter the gradient buckets over dp; copy this rank's slices to the fp32 main grads."""
        for ddp in self.ddps:
            ddp.finish_grad_sync()
        self.optimizer.prepare_grads()

    def module_grad_sq(self, device, counted) -> torch.Tensor:
        """Σ grad² per module over this rank's slices, `[dense, routed experts] × modules`. Dense: the
        parameters `counted(param)` accepts (the engine's rule: tensor-parallel duplicates and a tied
        embedding copy once), each element in exactly one data-parallel slice; experts: every slice, each
        element in exactly one expert-data-parallel slice. The caller sums each row over its groups."""
        sq = torch.zeros(2, len(self.modules), dtype=torch.float64, device=device)
        for index, expert, param, main in self._shards:
            if main.grad is not None and (expert or counted(param)):
                sq[int(expert), index] += torch.linalg.vector_norm(main.grad.detach()).double() ** 2
        return sq

    def step(self, lrs: dict[str, float], grad_norm: float) -> None:
        """Clip the fp32 slices by the global `grad_norm` (megatron's clip, as its ChainedOptimizer.step
        does), update them with each module's rate and all-gather the parameters."""
        from megatron.core.optimizer import clip_grads

        for group in self.optimizer.param_groups:
            group["lr"] = lrs[group["module"]]
        for opt in self.optimizer.chained_optimizers:
            params = opt.get_parameters()
            if params and self.cfg.clip_grad > 0:
                clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=self.cfg.clip_grad, total_norm=grad_norm)
        self.optimizer.step_with_ready_grads()

    # ------------------------------------------------------------ state
    def _inner_states(self):
        """(fp32 slice, its torch AdamW state dict) for every slice this rank updates."""
        return [(p, opt.optimizer.state[p]) for opt in self.optimizer.chained_optimizers
                if opt.optimizer is not None for g in opt.optimizer.param_groups for p in g["params"]]

    def materialize(self) -> None:
        """Zero moments and step 0 before the first step, so a save or a load request has tensors."""
        for p, st in self._inner_states():
            if not st:
                st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))

    def sharded_state(self, model_sd: dict, is_loading: bool) -> dict:
        """The optimizer's part of a checkpoint (`is_loading`: a request to load into, no gather)."""
        self.materialize()
        return self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=dict(SHARDING))

    def load(self, state: dict) -> None:
        chained = self.optimizer.chained_optimizers
        per_optimizer = [state] if len(chained) == 1 else [state[i] for i in range(len(chained))]
        for opt, opt_state in zip(chained, per_optimizer):
            _load_distributed(opt, opt_state)
        for group, (module, wd) in zip(self.optimizer.param_groups, self._group_meta):
            group["module"], group["weight_decay"] = module, wd

    def step_count(self) -> int:
        return next((int(st["step"]) for _, st in self._inner_states() if "step" in st), 0)

    def set_step_count(self, n: int) -> None:
        self.materialize()
        for _, st in self._inner_states():
            st["step"] = torch.tensor(float(n))

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: AdamW moments plus fp32 master copies of 16-bit
        parameters (fp32 parameters are updated in place, their slices are views, not copies)."""
        moments = sum(t.numel() * t.element_size() for _, st in self._inner_states()
                      for k, t in st.items() if k != "step")
        masters = sum(main.numel() * main.element_size() for *_, p, main in self._shards if p.dtype != torch.float32)
        return moments + masters


def mark_expert_params(model: torch.nn.Module) -> None:
    """Tag routed-expert weights `allreduce = False`, megatron's mark for parameters whose gradients DDP
    reduces (and the distributed optimizer shards) over the expert-data-parallel group, in separate
    buffers and a separate optimizer. megatron's layers set it only when `parallel.ep > 1`; at ep = 1
    the expert-data-parallel ranks still differ from the dense ones whenever tp > 1 with etp = 1 (each
    tensor-parallel rank routes its own slice of the sequence), so the mark follows the name here."""
    from qvl_train.engines.moe import is_expert_param

    for name, param in model.named_parameters():
        param.allreduce = not is_expert_param(name)


def _load_distributed(opt, state: dict) -> None:
    """`DistributedOptimizer.load_state_dict` for torch's AdamW: megatron copies every key of a slice's
    state from the checkpoint, but torch's per-slice `step` is not in it (it comes from the param
    groups). So the groups and steps load first, then the slices with `step` held aside."""
    param_state = state.pop("param_state")
    sharding = state.pop("param_state_sharding_type")
    assert sharding == SHARDING["distrib_optim_sharding_type"], sharding
    opt.load_state_dict(state)
    inner = opt.optimizer.state
    steps = {p: st.pop("step") for p, st in inner.items() if "step" in st}
    opt.load_parameter_state_from_fully_reshardable(param_state)
    for p, step in steps.items():
        inner[p]["step"] = step
