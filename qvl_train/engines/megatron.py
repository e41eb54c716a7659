"""The megatron-core engine: one training step over a list of packed micro-batches.

How a step works (every layout computes the same step as one process):
  1. The global label count G of the step is all-reduced over data-parallel ranks *before* the
     forward, so each micro-batch's loss can be `Σ token CE / G` — the global per-token mean.
     Packing, padding, micro-batch count and layout then never change the loss or its gradient
     (per-sample or per-micro-batch averaging is what makes packed losses drift elsewhere).
  2. megatron-core's schedule runs forward/backward (no pipelining, 1F1B across `pp` stages with
     `[L, 1, H]` activations sent between stages — under `parallel.cp` each rank's zigzag share, every
     micro-batch padded to the step's largest share — or with `parallel.vpp` the interleaved 1F1B over
     this rank's model chunks, `parallel/pipeline.py`). `calculate_per_token_loss=True` keeps it from
     dividing by the micro-batch count: our loss is already normalised.
  3. Gradients are summed over data-parallel ranks (one flat all-reduce per dtype) — routed-expert
     gradients over the expert-data-parallel group instead (the ranks that hold the same experts under
     `parallel.ep`); the global norm is computed per module (vit / projector / llm) counting
     tensor-parallel duplicates once, summed over the model-parallel group (expert shards over the
     expert tensor×expert×pipeline group), then clipped; AdamW steps. With `optim.distributed=true`
     step 3 is megatron-core's DistributedDataParallel + DistributedOptimizer instead (reduce-scatter,
     AdamW state and fp32 masters sharded over dp, routed experts in their own buffers and optimizer
     sharded over the expert-data-parallel group; see `engines/distributed_optimizer.py`); the step
     result is the same, for dense and MoE models, with or without `parallel.vpp`.
  MoE models also report the load-balancing loss and the expert load (`engines/moe.py`). With Qwen3.5's
  MTP head (`model.mtp_loss_weight` w > 0) the last stage returns the MTP per-token losses as well: the
  objective is `loss + w · loss/mtp`, each the global per-token mean over its own label count (the MTP
  count all-reduced over dp before the forward, like G); `loss` stays the LM loss, `loss/mtp` is logged.

The optimizer has one pair of parameter groups (decayed / not decayed: norms and biases) per module,
each with its own peak learning rate (`optim.lr_vit`, `optim.lr_projector`, `optim.lr`) and the same
schedule shape (`engines/common.py`, shared with the DeepSpeed engine). AdamW state is checkpointed
per parameter *name*, never per group index, so a run may change the grouping (e.g. give the ViT its
own rate) and still resume an older checkpoint.

For the monitor, step 1 is an all-gather rather than an all-reduce (`common.step_counts`): the same few numbers per
data-parallel rank (plus the rank's model FLOPs from `monitor/flops.py`) arrive at every rank, so
the sums and the data-parallel token imbalance come from one small collective.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist

from data_pipelines.schema import PackedBatch
from qvl_train.config import ModelConfig, OptimConfig, ParallelConfig, StageConfig
from qvl_train.engines.base import StepResult
from qvl_train.engines.common import MODULES, apply_stage, llm_lr, module_lrs, module_of, param_groups, step_counts
from qvl_train.engines.moe import MoEStepMonitor, is_expert_param
from qvl_train.loss import global_token_mean
from qvl_train.parallel.dims import ParallelDims
from qvl_train.parallel.pipeline import ModelChunks


class MegatronEngine:
    """Builds this rank's model chunk and optimizer; runs `train_step`."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        parallel_cfg: ParallelConfig,
        optim_cfg: OptimConfig,
        stage_cfg: StageConfig,
        dims: ParallelDims,
        *,
        seed: int,
        max_steps: int,
        dtype: torch.dtype = torch.float32,
        recompute: str = "none",
        fp8: str = "off",
        fp8_backend: str = "te",
        fp8_scaling: str = "rowwise",
    ) -> None:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        from qvl_train.models import Execution, build_model, init_weights
        from qvl_train.models.specs import resolve_fp8

        self.dims, self.optim_cfg, self.max_steps = dims, optim_cfg, max_steps
        self.model_cfg = model_cfg
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        fp8_te, fp8_torch = resolve_fp8(fp8, fp8_backend, fp8_scaling, local_spec=model_cfg.lora.enabled or parallel_cfg.cp > 1)
        execution = Execution(recompute=recompute, fp8=fp8_te, fp8_torch=fp8_torch, sequence_parallel=parallel_cfg.sp)
        # one chunk per virtual pipeline stage (parallel.vpp): chunk 0 of rank 0 embeds, the last of the last rank has the loss
        chunks = []
        for k in range(dims.vpp):
            chunk = build_model(
                model_cfg, parallel_cfg, dtype=dtype, execution=execution, vp_stage=k if dims.vpp > 1 else None,
                pre_process=dims.is_first_stage and k == 0, post_process=dims.is_last_stage and k == dims.vpp - 1,
            ).to(dims.device)
            init_weights(chunk, seed, model_cfg.init_std)
            chunks.append(chunk)
        if dims.cp > 1:  # each sequence split over the CP ranks (parallel/context.py)
            from qvl_train.parallel.context import ContextParallel

            for chunk in chunks:
                chunk.context_parallel = ContextParallel(
                    dims.cp, dims.cp_rank, dims.groups["cp"], multiple=dims.tp if parallel_cfg.sp else 1
                )
        self.model = chunks[0] if dims.vpp == 1 else ModelChunks(chunks)
        self.chunks = chunks
        apply_stage(self.model, stage_cfg, lora=model_cfg.lora.enabled)

        for chunk in chunks:  # each chunk has its own config object; the schedule reads the first's
            config = chunk.config
            config.calculate_per_token_loss = True  # the loss is normalised by the global label count
            config.pipeline_dtype = dtype
            config.finalize_model_grads_func = None
            config.grad_scale_func = None
            if dims.vpp > 1:
                # Interleaved at pp=2 both directions go to the same peer in one step; batched p2p posts
                # [send grad, recv act, send act, recv grad] on both ranks, so gloo pairs a gradient
                # with an activation. Unbatched, megatron orders them per direction (and group) instead.
                config.batch_p2p_comm = False

        self._params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.sharded = None  # ShardedAdamW with optim.distributed, else the engine's own AdamW below
        if optim_cfg.distributed:
            from qvl_train.engines.distributed_optimizer import ShardedAdamW

            self.sharded = ShardedAdamW(self.model, optim_cfg, dtype, module_of, MODULES)
            self.optimizer = self.sharded.optimizer
        else:
            self.optimizer = torch.optim.AdamW(
                param_groups(self.model.named_parameters(), optim_cfg),
                lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                foreach=True,  # one fused pass over all tensors (PyTorch only picks it by default on CUDA)
            )

        self._tp_partial = [p for n, p in self._params if _tp_partial_grad(n, p)]
        llm = model_cfg.llm
        # rows: the main layers, then the MTP head's MoE layer (router layer number num_layers + 1)
        from qvl_train.models.mtp import mtp_layers_built  # megatron-core imports stay out of this module's import

        self.moe = MoEStepMonitor(
            self.model, dims, llm.moe_aux_loss_coeff, llm.num_layers + mtp_layers_built(model_cfg), llm.num_experts
        ) if llm.num_experts else None

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the whole model: summed over pipeline stages, each
        tensor-parallel shard once and replicated tensors once."""
        counts = torch.zeros(2, dtype=torch.float64, device=self.dims.device)
        for p in self.model.parameters():
            if self._counted(p):
                trainable = p.numel() if p.requires_grad else 0
                counts += torch.tensor([trainable, p.numel()], dtype=torch.float64, device=counts.device)
        dist.all_reduce(counts, group=self.dims.groups["mp"])
        return int(counts[0]), int(counts[1])

    @property
    def optimizer_format(self) -> str:
        """How checkpoints hold the optimizer state: `per_param` (own AdamW) or `distributed`."""
        return "per_param" if self.sharded is None else "distributed"

    def check_optimizer_format(self, saved: str) -> None:
        """Refuse a checkpoint whose optimizer state this engine cannot read, saying what to do."""
        if saved != self.optimizer_format:
            setting = {"per_param": "false", "distributed": "true"}
            if saved not in setting:
                raise RuntimeError(
                    f"the checkpoint's optimizer state has format {saved!r}, written by engine=deepspeed in bf16; "
                    "resume it with engine=deepspeed train.dtype=bf16, or start a new output_dir with "
                    "model.init_from=<checkpoint> to take its weights with a fresh optimizer"
                )
            raise RuntimeError(
                f"the checkpoint's optimizer state was written with optim.distributed={setting[saved]}, this run "
                f"has optim.distributed={setting[self.optimizer_format]}: resume with "
                f"optim.distributed={setting[saved]}, or start a new output_dir with model.init_from=<checkpoint> "
                "to take its weights with a fresh optimizer"
            )

    def current_lr(self) -> float:
        """The LLM's learning rate (the first group's when the LLM is frozen), for the metrics line."""
        return llm_lr(self.optimizer)

    # ------------------------------------------------------------------ step
    def train_step(self, batches: list[PackedBatch], step: int) -> StepResult:
        dims, device = self.dims, self.dims.device
        counts = step_counts(batches, self.model_cfg, dims)
        denom = float(max(counts["label_tokens"], 1))
        t0 = time.perf_counter()

        self.model.train()
        self._zero_grads()
        if self.moe is not None:
            self.moe.begin_step(len(batches))
        mtp_denom = self._mtp_label_tokens(batches)
        losses = self._run_schedule(batches, denom, forward_only=False, mtp_denom=mtp_denom)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # [Σ CE, Σ MTP CE]
        if dims.is_last_stage and dims.tp_rank == 0:
            loss_sum[0] += sum(float(x["loss_sum"]) for x in losses)
            loss_sum[1] += sum(float(x.get("mtp_loss_sum", 0.0)) for x in losses)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t1 = time.perf_counter()  # this rank's own forward/backward: before it waits on other dp ranks
        dist.all_reduce(loss_sum, group=dims.groups["world"])  # one contributor per dp rank (its cp ranks: their rows)
        loss = float(loss_sum[0]) / denom
        mtp_loss = float(loss_sum[1]) / mtp_denom if mtp_denom else None
        moe_aux, expert_load = self.moe.end_step() if self.moe is not None else (None, {})

        self._fill_missing_grads()
        self._sum_tp_partial_grads()
        self._sum_tied_embedding_grads()
        self._sync_grads()
        grad_norm, module_norms = self._grad_norms()
        finite = math.isfinite(loss) and math.isfinite(grad_norm) and (mtp_loss is None or math.isfinite(mtp_loss))
        lrs = module_lrs(step, self.optim_cfg, self.max_steps)
        if finite:
            self._update(lrs, grad_norm)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the optimizer's kernels are asynchronous
        t2 = time.perf_counter()
        return StepResult(
            loss=loss, grad_norm=grad_norm, module_grad_norms=module_norms, skipped=not finite,
            timings={"fwd_bwd_s": t1 - t0, "optimizer_s": t2 - t1}, lrs=lrs,
            moe_aux_loss=moe_aux, expert_load=expert_load, mtp_loss=mtp_loss, **counts,
        )

    def _mtp_label_tokens(self, batches: list[PackedBatch]) -> float:
        """The step's MTP label count over every data-parallel rank (the MTP loss's denominator, as the label
        count is the LM loss's: `loss.py`); 0 without the MTP head (`model.mtp_loss_weight` = 0)."""
        if not self.model_cfg.mtp_loss_weight:
            return 0.0
        from qvl_train.models.mtp import mtp_label_count

        n = torch.tensor(float(sum(mtp_label_count(b) for b in batches)), dtype=torch.float64, device=self.dims.device)
        dist.all_reduce(n, group=self.dims.groups["dp"])
        return float(max(n.item(), 1.0))

    def eval_step(self, batches: list[PackedBatch]) -> tuple[float, int]:
        """Forward only over this rank's `batches` (megatron's forward_only schedule, no gradients,
        optimizer untouched) → (Σ token cross-entropy, label tokens), both summed over every
        data-parallel rank. Their ratio is the global per-label-token mean, as in `train_step`."""
        dims, device = self.dims, self.dims.device
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # [Σ CE, label tokens]
        self.model.eval()
        with torch.no_grad():
            losses = self._run_schedule(batches, 1.0, forward_only=True)
        self.model.train()
        if dims.is_last_stage and dims.tp_rank == 0:  # one contributor per data-parallel rank
            sums[0] = sum(float(x["loss_sum"]) for x in losses)  # under parallel.cp: this rank's rows
            sums[1] = sum(b.num_label_tokens for b in batches) if dims.cp_rank == 0 else 0
        dist.all_reduce(sums, group=dims.groups["world"])
        return float(sums[0]), int(sums[1])

    def _run_schedule(self, batches: list[PackedBatch], denom: float, *, forward_only: bool, mtp_denom: float = 0.0) -> list:
        """megatron's schedule over `batches`: no pipelining, 1F1B, or interleaved 1F1B over this rank's
        model chunks (each chunk reads every micro-batch: positions and sample bounds are needed in
        every layer, the pixels in chunk 0, the labels in the last). Returns the last stage's losses."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if self.dims.vpp > 1 and len(batches) % self.dims.pp:
            raise RuntimeError(
                f"the interleaved schedule (parallel.vpp={self.dims.vpp}) needs a multiple of parallel.pp={self.dims.pp} "
                f"micro-batches per step, got {len(batches)}; change train.global_batch_tokens or eval.max_batches"
            )
        models = self.sharded.ddps if self.sharded is not None and not forward_only else self.chunks
        return get_forward_backward_func()(
            forward_step_func=partial(
                _forward_step, denom=denom, device=self.dims.device, mtp_weight=self.model_cfg.mtp_loss_weight,
                mtp_denom=mtp_denom or 1.0,
            ),
            data_iterator=[iter(batches) for _ in models] if len(models) > 1 else iter(batches),
            model=models,
            num_microbatches=len(batches),
            seq_length=self._pipeline_seq_length(batches),
            micro_batch_size=1,
            forward_only=forward_only,
        )

    def _pipeline_seq_length(self, batches: list[PackedBatch]) -> int:
        """The sequence length megatron's pipeline schedules size the stage-to-stage activations from
        (they divide it by cp, and by tp under sequence parallelism). Packed rows all have `num_slots`;
        under parallel.cp every micro-batch of the step is padded to the step's largest zigzag share
        (`ContextParallel.step_rows`: one shape, no per-micro-batch shape exchange between stages)."""
        if self.dims.cp == 1 or self.dims.pp == 1:
            return batches[0].num_slots
        rows = self.chunks[0].context_parallel.step_rows([b.cu_seqlens for b in batches])
        for chunk in self.chunks:
            chunk.context_parallel.rows = rows
        return rows * self.dims.cp

    def _counted(self, p: torch.nn.Parameter) -> bool:
        """Whether this rank counts `p` in norms and totals: one tensor-parallel copy of a replicated
        tensor, and the first stage's embedding rather than the last stage's tied copy of it."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        tied_copy = getattr(p, "shared_embedding", False) and not self.dims.is_first_stage
        return param_is_not_tensor_parallel_duplicate(p) and not tied_copy

    def _grad(self, p: torch.nn.Parameter):
        """The gradient the step reduces: megatron DDP's fp32 `main_grad` buffer with optim.distributed."""
        return getattr(p, "main_grad", None) if self.sharded is not None else p.grad

    def _sum_tp_partial_grads(self) -> None:
        """Sum over tensor-parallel ranks the gradients of weights every TP rank holds whole but uses on
        only its part of the data: q/k norms (each rank normalises its own heads) and, under sequence
        parallelism, the norms and biases that act on the rank's slice of the sequence (tagged
        `sequence_parallel`). Without this the replicas drift apart from the first step."""
        if self.dims.tp == 1 or not self._tp_partial:
            return
        grads = [g for g in map(self._grad, self._tp_partial) if g is not None]
        if grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.dims.groups["tp"])
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)

    def _sum_tied_embedding_grads(self) -> None:
        """Tied embeddings across pipeline stages: the first stage's embedding and the last stage's copy
        (its output weight) each hold part of the gradient; summed over megatron's embedding group,
        both copies take the same optimizer steps and stay equal."""
        from megatron.core import parallel_state

        for p in (p for _, p in self._params if getattr(p, "shared_embedding", False)):
            dist.all_reduce(self._grad(p), group=parallel_state.get_embedding_group())

    def _fill_missing_grads(self) -> None:
        """Give a zero gradient to every trainable parameter this rank's micro-batches did not reach (the
        ViT on a data-parallel rank without images or on a context-parallel rank whose share of the media
        is empty, an expert no token was routed to, the output layer in a step without labels): every rank
        then reduces the same tensors, and the optimizer steps every trainable parameter. With
        `optim.distributed` nothing is needed: megatron's gradient buffers start at zero every step and
        are reduce-scattered whole, so such a parameter (expert or dense) gets a zero gradient there too."""
        if self.sharded is None:
            for _, p in self._params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def _zero_grads(self) -> None:
        if self.sharded is not None:
            self.sharded.zero_grad()
        for p in self.model.parameters():
            p.grad = None

    def _sync_grads(self) -> None:
        """Sum gradients over data-parallel ranks (grads already carry 1/G)."""
        if self.sharded is not None:
            self.sharded.sync_grads()  # reduce-scatter: each rank keeps the sum of its slice
        else:
            self._allreduce_grads()

    def _update(self, lrs: dict[str, float], grad_norm: float) -> None:
        """Clip to optim.clip_grad and step with each module's learning rate."""
        if self.sharded is not None:
            self.sharded.step(lrs, grad_norm)
            return
        clip = self.optim_cfg.clip_grad
        if clip > 0 and grad_norm > clip:
            scale = clip / (grad_norm + 1e-6)
            for _, p in self._params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lrs[group["module"]]
        self.optimizer.step()

    def _allreduce_grads(self) -> None:
        """Sum gradients over data-parallel × context-parallel ranks in one flat buffer (grads already
        carry 1/G); routed experts over the ranks that hold the same experts (expert data parallel)."""
        dense = [p.grad for n, p in self._params if p.grad is not None and not is_expert_param(n)]
        expert = [p.grad for n, p in self._params if p.grad is not None and is_expert_param(n)]
        for grads, size, group in ((dense, self.dims.dp * self.dims.cp, "dp_cp"), (expert, self.dims.expert_dp, "edp")):
            if size == 1 or not grads:
                continue
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.dims.groups[group])
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)

    def _grad_norms(self) -> tuple[float, dict[str, float]]:
        """Global L2 norm per module; tensor-parallel duplicates (norms, biases) counted once.

        Dense parameters: squares summed over the model-parallel group (tp × pp). Routed experts: every
        local shard counts, summed over the expert tensor × expert × pipeline group, so each expert
        is counted once whatever `parallel.ep` (its expert-data-parallel copies are not in that group).
        With `optim.distributed` each rank holds a 1/dp slice of every dense gradient and a 1/expert-dp
        slice of every expert gradient: those squares are first summed over dp × cp ("dp_cp"), and
        over the expert-data-parallel group ("edp") respectively.
        """
        groups = self.dims.groups
        if self.sharded is not None:
            sq = self.sharded.module_grad_sq(self.dims.device, counted=self._counted)  # [dense, expert] × modules
            dist.all_reduce(sq[0], group=groups["dp_cp"])
            if self.moe is not None:
                dist.all_reduce(sq[1], group=groups["edp"])
        else:
            sq = torch.zeros(2, len(MODULES), dtype=torch.float64, device=self.dims.device)  # [dense, expert]
            for name, p in self._params:
                if p.grad is None:
                    continue
                expert = is_expert_param(name)
                if expert or self._counted(p):
                    sq[int(expert), MODULES.index(module_of(name))] += torch.linalg.vector_norm(p.grad.detach()).double() ** 2
        dist.all_reduce(sq[0], group=groups["mp"])
        if self.moe is not None:
            dist.all_reduce(sq[1], group=groups["emp"])
        total = sq.sum(0)
        norms = {m: math.sqrt(v) for m, v in zip(MODULES, total.tolist())}
        return math.sqrt(float(total.sum())), norms

    # ------------------------------------------------------------ checkpoint
    def sharded_state_dict(self, with_optimizer: bool = True, is_loading: bool = False) -> dict:
        """Model (and AdamW moments) as layout-independent ShardedTensors for dist_checkpointing
        (`is_loading`: a request to load into; the distributed optimizer then gathers nothing)."""
        model_sd = self.model.sharded_state_dict()  # keys = local state-dict names
        out: dict = {"model": model_sd}
        if with_optimizer:
            out["optimizer"] = (self._optimizer_sharded_state(model_sd) if self.sharded is None
                                else self.sharded.sharded_state(model_sd, is_loading))
        return out

    def _optimizer_sharded_state(self, model_sd: dict) -> dict:
        from dataclasses import replace

        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

        by_param = {}  # param → its ShardedTensor (or factory, e.g. the split [gate; up] of SwiGLU)
        for sh in nested_values(model_sd):
            if isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
                by_param[id(sh.data)] = sh
        state: dict = {"steps": {}}
        for name, p in self._params:
            sh = by_param.get(id(p))
            if sh is None:
                raise RuntimeError(f"parameter {name} has no sharded tensor; cannot checkpoint its optimizer state")
            st = self.optimizer.state.setdefault(p, {})
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment not in st:  # before the first step: materialise zeros so layouts agree
                    st[moment] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[f"{name}.{moment}"] = replace(sh, key=f"optimizer.{sh.key}.{moment}", data=st[moment])
            if "step" not in st:
                st["step"] = torch.tensor(0.0)
        return state

    def optimizer_step_count(self) -> int:
        if self.sharded is not None:
            return self.sharded.step_count()
        for st in self.optimizer.state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def set_optimizer_step_count(self, n: int) -> None:
        if self.sharded is not None:
            return self.sharded.set_step_count(n)
        for _, p in self._params:
            self.optimizer.state.setdefault(p, {})["step"] = torch.tensor(float(n))

    def load_sharded(self, loaded: dict, with_optimizer: bool) -> None:
        """Weights (and AdamW moments); taking weights only (`model.init_from`), LoRA adapters the
        checkpoint lacks keep their initialisation."""
        from qvl_train.models.lora import is_lora_param

        model_sd = loaded["model"]
        missing, unexpected = self.model.load_state_dict(model_sd, strict=False)
        missing = [k for k in missing if not (k.endswith("_extra_state") or (not with_optimizer and is_lora_param(k)))]
        if missing:
            raise RuntimeError(f"checkpoint lacks model tensors: {missing[:8]}")
        if self.sharded is not None and with_optimizer:
            self.sharded.load(loaded["optimizer"])  # moments, steps and the checkpoint's fp32 masters
        elif self.sharded is not None:
            self.sharded.optimizer.reload_model_params()  # weights only: the masters become copies of them
        elif with_optimizer:
            opt = loaded["optimizer"]
            for name, p in self._params:
                st = self.optimizer.state.setdefault(p, {})
                for moment in ("exp_avg", "exp_avg_sq"):
                    st[moment] = opt[f"{name}.{moment}"].to(p.device, p.dtype).clone()


def _tp_partial_grad(name: str, param: torch.nn.Parameter) -> bool:
    """Replicated over TP ranks, but each rank's gradient covers only its heads / sequence slice."""
    return ".q_layernorm." in name or ".k_layernorm." in name or getattr(param, "sequence_parallel", False)


def _forward_step(data_iterator: Iterator[PackedBatch], model, *, denom: float, device, mtp_weight: float = 0.0,
                  mtp_denom: float = 1.0):
    batch = next(data_iterator).to(device)
    return model(batch), partial(
        global_token_mean, num_label_tokens=batch.num_label_tokens, global_label_tokens=denom,
        mtp_weight=mtp_weight, mtp_global_label_tokens=mtp_denom,
    )
