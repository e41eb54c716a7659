"""Mixture-of-experts bookkeeping of a training step: the load-balancing loss's scale and what is logged.

The load-balancing (aux) loss is megatron-core's: each MoE layer's `TopKRouter` computes the Switch
loss `E · Σ_i f_i · P_i` over the tokens of its micro-batch and injects `coeff · aux` straight into
the backward (`MoEAuxLossAutoScaler`); the LM loss the engine returns stays the global per-token
mean. So that packing and layout do not change it either, the step's aux loss is the *mean* over
all micro-batches of the step (every data-parallel rank's): `begin_step` sets the routers'
coefficient to `coeff / (micro-batches per rank · dp)` (the routers read it at every forward; the
schedule's aux-loss scale stays 1 because the engine sets `calculate_per_token_loss`, and the
routers were built before that, so they do not multiply by the token count). Under `parallel.vpp`
each model chunk is built with its own TransformerConfig, so the coefficient is set on the config of
every router (one per chunk); router layer numbers are global, so the aux-loss tracker's and the
load's rows are the model's layers whatever the chunking.

`end_step` returns, summed over all ranks:
* `loss/moe_aux`: `coeff · Σ_layers mean_microbatch aux` — the term the gradient saw;
* the expert load per layer: routed tokens per expert, from a forward hook on each router (a wandb
  histogram per layer, a list in metrics.jsonl).

Padding rows (the pack's tail past the last sample; under `parallel.cp` the zigzag split's padding)
are routed through the experts like any row, but the model hands the routers a padding mask: megatron
leaves them out of the aux loss and this monitor out of the load. Both then count the tokens of the
samples only, which every layout has in common. Each rank's tracked aux value is its share
(`E · Σ_i f_i · P_i` with `f_i` over the tensor × context-parallel group's tokens, `P_i` summed over
this rank's rows and divided by that group's token count), so the shares of the tensor-parallel ranks
(under sequence parallelism each routes its slice of the rows) and of the context-parallel ranks (each
its zigzag share) add up to the aux loss of the whole sequence, as the load does: `end_step` sums them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from qvl_train.parallel.dims import ParallelDims

__all__ = ["MoEStepMonitor", "is_expert_param"]


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (sharded over `parallel.ep`; the router is a dense, replicated weight)."""
    return ".mlp.experts." in name


class MoEStepMonitor:
    """Sets the aux-loss scale of a step and collects the aux loss and the expert load."""

    def __init__(self, model: torch.nn.Module, dims: ParallelDims, coeff: float, num_layers: int, num_experts: int):
        from megatron.core.transformer.moe.router import TopKRouter

        self.dims, self.coeff = dims, coeff
        self.load = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=dims.device)
        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        for router in routers:
            router.register_forward_hook(self._count)
        # The TransformerConfig objects the routers read their coefficient from: one per model chunk
        # under parallel.vpp (each chunk is built with its own), shared by the chunk's MoE layers.
        self.configs = list({id(r.config): r.config for r in routers}.values())

    def _count(self, router, inputs, output) -> None:
        # Once per routed token: under full recompute the first forward runs without grad and the
        # backward's recompute with it (the pass in which megatron also records the aux loss).
        if router.training and torch.is_grad_enabled():
            routing_map = output[1].reshape(-1, self.load.shape[1])
            padding = inputs[1] if len(inputs) > 1 else None  # [rows, 1], True = padding (see the module docstring)
            if padding is not None:
                routing_map = routing_map[~padding.reshape(-1)]
            self.load[router.layer_number - 1] += routing_map.sum(0).double()

    def begin_step(self, local_micro_batches: int) -> None:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        self.load.zero_()
        self.micro_batches = local_micro_batches * self.dims.dp
        for config in self.configs:
            config.moe_aux_loss_coeff = self.coeff / self.micro_batches

    def end_step(self) -> tuple[float, dict[int, list[float]]]:
        """(aux loss of the step, {layer (0-based): routed tokens per expert}) over all ranks."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracked = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
        aux = torch.zeros(self.load.shape[0], dtype=torch.float64, device=self.dims.device)
        if tracked is not None:
            aux += tracked["values"].detach().to(aux.device, torch.float64)[: aux.shape[0]]
        both = torch.cat([aux[:, None], self.load], dim=1)
        # Under sequence parallelism (required for MoE at tp > 1) each tensor-parallel rank routes its own
        # slice of the sequence: its load counts those tokens, and its aux-loss value is its part of the
        # layer's loss (megatron's router all-reduces the token counts over tp × cp but sums the routing
        # probabilities locally), so every rank contributes. Without it the TP ranks would repeat each other.
        if self.dims.tp_rank != 0 and not any(c.sequence_parallel for c in self.configs):
            both.zero_()
        dist.all_reduce(both, group=self.dims.groups["world"])
        aux_loss = self.coeff * float(both[:, 0].sum()) / self.micro_batches
        return aux_loss, {i: both[i, 1:].tolist() for i in range(both.shape[0])}
