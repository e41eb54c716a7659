"""The training run, top to bottom: validate → layout → engine → data → restore → loop → save.

Every rank runs this same function under `torchrun`. The samples of step S do not depend on the
layout: all ranks walk one global stream, the step's micro-batches are dealt to data-parallel ranks,
and the loss of a step is Σ token cross-entropy over the global batch ÷ its label-token count.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from qvl_train.config import TrainConfig
from qvl_train.engines.base import Engine

log = logging.getLogger("qvl_train")


def describe(cfg: TrainConfig, world_size: int) -> str:
    """The layout and batch arithmetic a user should see before a long run starts."""
    from qvl_train.parallel.dims import ParallelDims

    dims = ParallelDims.from_config(cfg.parallel, world_size)
    micro = cfg.micro_batches_per_step()
    return "\n".join(
        [
            f"layout      {dims.describe()}",
            f"model       {cfg.model.generation}: ViT {cfg.model.vision.depth}×{cfg.model.vision.hidden_size}, "
            f"LLM {cfg.model.llm.num_layers}×{cfg.model.llm.hidden_size}"
            + (f", {cfg.model.llm.num_experts} experts (top-{cfg.model.llm.moe_router_topk}) per layer"
               if cfg.model.llm.num_experts else ""),
            f"stage       {cfg.stage.name} (trains: {_trains(cfg)})",
            f"batch       {cfg.train.global_batch_tokens} tokens/step = {micro} micro-batches × "
            f"{cfg.data.max_tokens} tokens ({micro // dims.dp} per data-parallel rank)",
            f"steps       {cfg.train.max_steps}, checkpoint every {cfg.checkpoint.every}",
            f"output_dir  {cfg.output_dir}",
        ]
    )


def _trains(cfg: TrainConfig) -> str:
    """The modules that train; with LoRA, only their adapters."""
    lora = cfg.model.lora
    if not lora.enabled:
        return ", ".join(cfg.stage.trainable)
    return "LoRA adapters of " + ", ".join(m for m in cfg.stage.trainable if m in lora.modules)


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _save_run_info(cfg: TrainConfig, resolved_yaml: str) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(resolved_yaml)
    (out / "git_commit.txt").write_text(_git_commit() + "\n")


def _start_logging(cfg: TrainConfig, dims, resolved_yaml: str) -> bool:
    """Log lines on stdout from global rank 0 only, which also writes config.yaml and git_commit.txt
    and shows the layout; returns whether this rank is that one."""
    rank0 = dims.is_logging_rank
    # force: an import that logged before this point (a library's module-level warning) has already installed
    # a WARNING root handler, which would make this call a no-op and drop every INFO line (wandb's debug.log too)
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(message)s", stream=sys.stdout,
                        force=True)
    if rank0:
        _save_run_info(cfg, resolved_yaml)
        log.info(describe(cfg, dims.world_size))
    return rank0


def _build_engine(cfg: TrainConfig, dims) -> Engine:
    """`engine=megatron` (every parallel layout) or `engine=deepspeed` (ZeRO over data-parallel ranks);
    logs the parameter counts."""
    engine = _make_engine(cfg, dims, torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32)
    trainable, total = engine.parameter_counts()
    lora = cfg.model.lora
    log.info("parameters  %s trainable of %s (%.2f%%)%s", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
             f"; LoRA rank {lora.rank} on {'/'.join(lora.targets)} of {'/'.join(lora.modules)}" if lora.enabled else "")
    return engine


def _make_engine(cfg: TrainConfig, dims, dtype: torch.dtype) -> Engine:
    common = dict(seed=cfg.seed, max_steps=cfg.train.max_steps, dtype=dtype, recompute=cfg.train.recompute)
    if cfg.engine.name == "deepspeed":
        from qvl_train.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg.model, cfg.parallel, cfg.optim, cfg.stage, cfg.engine, dims,
                               micro_batches_per_step=cfg.micro_batches_per_step(), **common)
    from qvl_train.engines.megatron import MegatronEngine

    return MegatronEngine(cfg.model, cfg.parallel, cfg.optim, cfg.stage, dims, fp8=cfg.train.fp8, fp8_backend=cfg.train.fp8_backend,
                          fp8_scaling=cfg.train.fp8_scaling, **common)


def _resolve_workers(data, rank0: bool):
    """`data.num_workers=auto` → this rank's decode workers from the job's CPUs, logged once with its source."""
    from dataclasses import replace

    from data_pipelines.workers import resolve_num_workers

    n, source = resolve_num_workers(data.num_workers)
    if rank0:
        log.info("data        %d decode worker%s per rank (%s), %d steps prefetched", n, "" if n == 1 else "s", source,
                 data.prefetch_steps if n else 0)
    return replace(data, num_workers=n)


def launch_world_size(cfg: TrainConfig) -> int:
    """torchrun's WORLD_SIZE; a dry run started without torchrun takes the job size the experiment
    names (`cluster.gpus`), so `python launch/train.py +experiment=qwen2vl dry_run=true` shows the
    cluster layout from a login node."""
    if "WORLD_SIZE" not in os.environ and cfg.dry_run and cfg.cluster.gpus:
        return cfg.cluster.gpus
    return int(os.environ.get("WORLD_SIZE", "1"))


def _end_process_groups(dims, exc_type, exc, tb) -> bool:
    """The last teardown on every exit path. A run that ends well meets the other ranks at a barrier
    (`dims.destroy`); after an exception this rank's groups go at once (the others may never arrive)."""
    if exc_type is None:
        dims.destroy()
    elif torch.distributed.is_initialized():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    return False  # the exception, if any, goes on


def _diverged(bad_streak: int, step: int, max_bad_steps: int, kept, rank0: bool) -> SystemExit:
    """The bad-step stop: what happened, which checkpoint is left and what to do (rank 0's message)."""
    return SystemExit(
        f"stopping: {bad_streak} consecutive steps (up to step {step}) had a non-finite loss "
        f"or gradient (train.max_bad_steps={max_bad_steps}); no checkpoint written. "
        f"Last good checkpoint: {kept or 'none'}. Lower optim.lr or check the data, then rerun to resume."
        if rank0 else 1
    )


def _stop_if_no_data(batches, loader, dims, step: int, rank0: bool) -> None:
    """Before the optimizer step: if no rank got a usable sample for this step (every sample skipped,
    e.g. all shards missing), stop with each rank's skip counts and shards. Nothing is trained or saved
    for such a step; one all-reduce of a sample count per step (every rank reaches the same verdict)."""
    import torch.distributed as dist

    got = torch.tensor([sum(b.num_samples for b in batches)], dtype=torch.int64, device=dims.device)
    dist.all_reduce(got)
    if got.item():
        return
    skips: list = [None] * dims.world_size
    dist.all_gather_object(skips, loader.last_step_skips())
    lines = [f"  rank {r}: {s['count']} skipped {s['reasons']} in shards {s['shards'][:8]}"
             for r, s in enumerate(skips) if s["count"]]
    raise SystemExit(
        f"stopping before step {step}: no rank got a usable sample (every sample of the step was skipped); "
        "no optimizer step and no checkpoint for it.\n" + "\n".join(lines) + "\nThe log names each unreadable shard "
        "and its error; data_skipped.jsonl in the output dir lists every skipped sample. Check data.sources and "
        "the shards (python -m data_pipelines.inspect DIR)." if rank0 else 1
    )


def run(cfg: TrainConfig, resolved_yaml: str = "") -> None:
    """Train `cfg` on this rank. Everything the run opens (process groups, signal handlers, loader and
    decode workers, the async checkpoint writer, wandb) is closed once by one ExitStack, on every exit
    path: the last step, a stop signal, the bad-step stop, an exception."""
    from qvl_train.parallel.dims import ParallelDims

    world_size = launch_world_size(cfg)
    cfg.validate(world_size)  # before any process group exists
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    if cfg.dry_run:
        print(resolved_yaml + "\n" + describe(cfg, world_size))
        return

    from data_pipelines.stream import StepLoader
    from qvl_train.checkpoint.manager import CheckpointManager
    from qvl_train.evaluate import Evaluator
    from qvl_train.monitor.diagnose import StackDumper, StepProfiler
    from qvl_train.monitor.flops import SampleFlops
    from qvl_train.monitor.runlog import RunLog
    from qvl_train.monitor.trace import DataTrace
    from qvl_train.signals import StopOnSignal

    out, train = Path(cfg.output_dir), cfg.train
    with contextlib.ExitStack() as teardown:  # unwinds in reverse order; the process groups go last
        dims.initialize(timeout_s=train.collective_timeout_s)
        teardown.push(partial(_end_process_groups, dims))
        stopper = StopOnSignal()  # early: loading a large checkpoint can take much of a 120 s warning
        teardown.callback(stopper.restore)
        rank0 = _start_logging(cfg, dims, resolved_yaml)
        engine = _build_engine(cfg, dims)
        cfg.data = _resolve_workers(cfg.data, rank0)
        loader = teardown.enter_context(contextlib.closing(StepLoader(  # balances dp ranks by the MFU's FLOP count
            cfg.data, micro_batches_per_step=cfg.micro_batches_per_step(), dp_rank=dims.dp_rank, dp_size=dims.dp,
            flop_model=SampleFlops(cfg.model))))
        ckpt = teardown.enter_context(CheckpointManager(
            out / "checkpoints", dims, keep_last=cfg.checkpoint.keep_last, init_from=cfg.model.init_from,
            async_save=cfg.checkpoint.async_save, every=cfg.checkpoint.every))
        evaluator = teardown.enter_context(contextlib.closing(Evaluator(cfg, dims)))
        state, how = ckpt.restore(engine, resume=cfg.checkpoint.resume, init_from=cfg.model.init_from)
        if state.data:
            loader.load_state_dict(state.data)
        if dims.tp_rank == dims.pp_rank == dims.cp_rank == 0:  # the ranks that read a dp share of the data
            loader.log_skips(str(out / ("data_skipped.jsonl" if dims.dp_rank == 0 else f"data_skipped.dp{dims.dp_rank}.jsonl")))
        log.info("start: %s at step %d", how, state.step)
        runlog = teardown.enter_context(RunLog(cfg, dims, state))  # wandb finished on every exit path
        trace = None
        if cfg.data.trace and dims.tp_rank == dims.pp_rank == dims.cp_rank == 0:
            trace = teardown.enter_context(contextlib.closing(DataTrace(out, dims.dp_rank, state.step)))
        profiler = StepProfiler(cfg.profile.steps, out, dims.rank)
        stacks = teardown.enter_context(StackDumper(out, dims.rank, train.collective_timeout_s, dims.world_size))  # → output_dir/stacks/
        bad_streak = 0  # consecutive skipped (non-finite) steps; every rank sees the same verdict

        while state.step < train.max_steps:
            t0 = time.perf_counter()
            profiler.before_step(state.step + 1)
            batches = loader.next_step()
            plan = loader.last_step_stats()  # estimates from the shard index, identical on every rank
            t_data = time.perf_counter() - t0
            _stop_if_no_data(batches, loader, dims, state.step + 1, rank0)
            result = engine.train_step(batches, state.step)
            ckpt.poll()  # an async save whose files are all written becomes `latest`
            state.advance(result, loader.state_dict())
            step_time = time.perf_counter() - t0
            if trace is not None:
                trace.write(state.step, [b.sample_ids for b in batches])
            if (traced := profiler.after_step(state.step)) is not None and rank0:
                log.info("profile     %s", traced)
            stacks.heartbeat(state.step)
            bad_streak = bad_streak + 1 if result.skipped else 0
            diverged = train.max_bad_steps > 0 and bad_streak >= train.max_bad_steps

            if not diverged:  # before the checkpoint: a resume keeps its lines
                evaluator.maybe_log(engine, state.step, runlog)
            stop = stopper.agreed()
            t_ckpt = ckpt.maybe_save(engine, state, ending=bool(stop) or state.step == train.max_steps,
                                     bad_streak=bad_streak, diverged=diverged)
            runlog.train_step(state.step, result, lr=engine.current_lr(), loader=loader, plan=plan, data_s=t_data,
                              step_s=step_time, checkpoint_s=t_ckpt, skipped_steps=state.skipped_steps, force=diverged)
            if diverged:  # a save of a good step still in flight becomes the checkpoint to fall back to
                raise _diverged(bad_streak, state.step, train.max_bad_steps, ckpt.last_good(), rank0)
            if stop:
                log.info("signal %d: stopped after step %d with a checkpoint; rerun the same command to resume", stop, state.step)
                break

