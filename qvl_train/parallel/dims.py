"""`ParallelDims`: the process layout, validated once and passed explicitly.

The sizes are checked by `TrainConfig.validate` before anything starts; `ParallelDims.initialize`
then creates the process group (gloo without CUDA, NCCL with it) and megatron-core's model-parallel
groups exactly once. This module is the only place that asks `parallel_state` for groups and ranks;
everything below `train.py` receives the `ParallelDims` object and reads what it needs from it.

Context parallelism (`cp`) splits each sequence over cp ranks that hold the same parameters and read
the same micro-batches: `dp_rank` is shared by them, and replicated gradients are summed over the
data-parallel × context-parallel group (`groups["dp_cp"]`).

Rank order is megatron's default "tp-cp-ep-dp-pp": tensor-parallel ranks are adjacent (fastest
links), pipeline stages are furthest apart. Expert parallelism (`ep`, `etp`) is not an extra factor
of the world: megatron lays the expert groups over the same ranks (ep·etp·pp divides the world), so
with world 2, ep=2 the two data-parallel ranks each hold half of every layer's experts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from qvl_train.config import ParallelConfig


@dataclass
class ParallelDims:
    tp: int
    pp: int
    cp: int
    dp: int
    world_size: int
    first_stage_layers: Optional[int] = None
    ep: int = 1  # expert parallel: not a factor of the world (megatron folds it into tp·cp·dp)
    etp: int = 1
    vpp: int = 1  # model chunks per pipeline rank (interleaved 1F1B)
    # Filled by initialize():
    rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    cp_rank: int = 0
    groups: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        model_parallel = cfg.tp * cfg.pp * cfg.cp
        dp = cfg.dp if cfg.dp is not None else world_size // model_parallel
        return cls(
            tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, dp=dp, world_size=world_size,
            first_stage_layers=cfg.first_stage_layers, ep=cfg.ep, etp=cfg.etp, vpp=cfg.vpp,
        )

    @property
    def expert_dp(self) -> int:
        """Ranks that hold the same experts (megatron's expert-data-parallel size): world / (ep·etp·pp)."""
        return self.world_size // (self.ep * self.etp * self.pp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def describe(self) -> str:
        return (
            f"world={self.world_size} = tp {self.tp} × pp {self.pp} × cp {self.cp} × dp {self.dp}"
            + (f" (first stage: {self.first_stage_layers} LLM layers)" if self.first_stage_layers else "")
            + (f"; {self.vpp} interleaved model chunks per stage" if self.vpp > 1 else "")
            + (f"; experts: ep {self.ep} × etp {self.etp} × expert-dp {self.expert_dp}" if self.ep * self.etp > 1 else "")
        )

    def initialize(self, timeout_s: int = 600) -> None:
        """Create the default process group and megatron-core's groups (once per process); every group
        gives up on a collective after `timeout_s` (`train.collective_timeout_s`)."""
        from megatron.core import parallel_state as ps

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        else:
            from qvl_train.compat.megatron_cpu import install_cpu_compat

            install_cpu_compat()
            backend = "gloo"
        if not dist.is_initialized():
            if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(f"launched {dist.get_world_size()} processes, layout expects {self.world_size}")
        ps.initialize_model_parallel(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp if self.vpp > 1 else None,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
            distributed_timeout_minutes=timeout_s / 60,  # its subgroups (dp, tp, pp) time out like the world
        )
        self.rank = dist.get_rank()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()  # the same for the CP ranks of a data-parallel rank: same batches
        self.cp_rank = ps.get_context_parallel_rank()
        self.groups = megatron_groups()

    def destroy(self) -> None:
        from megatron.core import parallel_state as ps

        if dist.is_initialized():
            dist.barrier()
            ps.destroy_model_parallel()
            dist.destroy_process_group()


def megatron_groups() -> dict[str, Any]:
    """The process groups the framework uses, by name, from megatron-core's `parallel_state` (after
    `initialize_model_parallel`)."""
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_group(),
        "pp": ps.get_pipeline_model_parallel_group(),
        "dp": ps.get_data_parallel_group(),
        "cp": ps.get_context_parallel_group(),
        # replicated parameters (everything but routed experts) sum their gradients over dp × cp
        "dp_cp": ps.get_data_parallel_group(with_context_parallel=True),
        "mp": ps.get_model_parallel_group(),
        "world": dist.group.WORLD,
        # experts: their gradients are summed over the ranks holding the same experts ("edp"), their
        # norm over the ranks holding different ones ("emp": expert tensor × expert × pipeline)
        "edp": ps.get_expert_data_parallel_group(),
        "emp": ps.get_expert_tensor_model_pipeline_parallel_group(),
    }
