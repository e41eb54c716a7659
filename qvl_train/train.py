"""The training run, top to bottom: validate → layout → engine → data → restore → loop → save.

Every rank runs this same function under `torchrun`. The samples of step S do not depend on the
layout: all ranks walk one global stream, the step's micro-batches are dealt to data-parallel ranks,
and the loss of a step is Σ token cross-entropy over the global batch ÷ its label-token count.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from qvl_train.config import TrainConfig

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


def _global_data_stats(local: dict[str, int], dims) -> dict[str, int]:
    """Skip counts summed over data-parallel ranks (each sample is read by one dp rank's group)."""
    import torch.distributed as dist

    gathered: list = [None] * dims.world_size
    dist.all_gather_object(gathered, local if dims.tp_rank == dims.pp_rank == dims.cp_rank == 0 else {})
    total: dict[str, int] = {"data_skipped": 0}
    for stats in gathered:
        for key, n in stats.items():
            total[key] = total.get(key, 0) + int(n)
    return total


def _straggler_stats(own_s: float, hosts: list, threshold: float, dims) -> dict[str, float]:
    """Every rank's own step time (data + forward/backward) → `straggler/*` metrics; warns on rank 0."""
    from qvl_train.monitor.diagnose import straggler_report

    times = [torch.zeros(1, dtype=torch.float64, device=dims.device) for _ in range(dims.world_size)]
    torch.distributed.all_gather(times, torch.tensor([own_s], dtype=torch.float64, device=dims.device))
    metrics, warning = straggler_report([float(t) for t in times], hosts, threshold)
    if warning and dims.is_logging_rank:
        log.warning(warning)
    return metrics


def _build_engine(cfg: TrainConfig, dims, dtype: torch.dtype):
    """`engine=megatron` (every parallel layout) or `engine=deepspeed` (ZeRO over data-parallel ranks)."""
    common = dict(seed=cfg.seed, max_steps=cfg.train.max_steps, dtype=dtype, recompute=cfg.train.recompute)
    if cfg.engine.name == "deepspeed":
        from qvl_train.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg.model, cfg.parallel, cfg.optim, cfg.stage, cfg.engine, dims,
                               micro_batches_per_step=cfg.micro_batches_per_step(), **common)
    from qvl_train.engines.megatron import MegatronEngine

    return MegatronEngine(cfg.model, cfg.parallel, cfg.optim, cfg.stage, dims, fp8=cfg.train.fp8, **common)


def launch_world_size(cfg: TrainConfig) -> int:
    """torchrun's WORLD_SIZE; a dry run started without torchrun takes the job size the experiment
    names (`cluster.gpus`), so `python launch/train.py +experiment=qwen2vl dry_run=true` shows the
    cluster layout from a login node."""
    if "WORLD_SIZE" not in os.environ and cfg.dry_run and cfg.cluster.gpus:
        return cfg.cluster.gpus
    return int(os.environ.get("WORLD_SIZE", "1"))


def run(cfg: TrainConfig, resolved_yaml: str = "") -> None:
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
    from qvl_train.monitor.flops import SampleFlops, peak_tflops
    from qvl_train.monitor.metrics import MetricsWriter, Progress, train_record
    from qvl_train.monitor.trace import DataTrace
    from qvl_train.monitor.wandb import WandbLogger
    from qvl_train.signals import StopOnSignal

    dims.initialize(timeout_s=cfg.train.collective_timeout_s)
    stopper = StopOnSignal()  # early: loading a large checkpoint can take much of a 120 s warning
    rank0 = dims.is_logging_rank
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(message)s", stream=sys.stdout)
    out = Path(cfg.output_dir)
    if rank0:
        _save_run_info(cfg, resolved_yaml)
        log.info(describe(cfg, world_size))

    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    engine = _build_engine(cfg, dims, dtype)
    trainable, total = engine.parameter_counts()
    lora = cfg.model.lora
    log.info("parameters  %s trainable of %s (%.2f%%)%s", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
             f"; LoRA rank {lora.rank} on {'/'.join(lora.targets)} of {'/'.join(lora.modules)}" if lora.enabled else "")
    micro = cfg.micro_batches_per_step()
    # the packer balances dp ranks by this model's FLOPs, the same count as MFU (monitor/flops.py)
    loader = StepLoader(cfg.data, micro_batches_per_step=micro, dp_rank=dims.dp_rank, dp_size=dims.dp,
                        flop_model=SampleFlops(cfg.model))
    ckpt = CheckpointManager(
        out / "checkpoints", dims, keep_last=cfg.checkpoint.keep_last, init_from=cfg.model.init_from,
        async_save=cfg.checkpoint.async_save,
    )
    evaluator = Evaluator(cfg, dims)
    state, how = ckpt.restore(engine, resume=cfg.checkpoint.resume, init_from=cfg.model.init_from)
    if state.data:
        loader.load_state_dict(state.data)
    log.info("start: %s at step %d", how, state.step)

    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=state.step) if rank0 else None
    wandb = WandbLogger(cfg.wandb, out, asdict(cfg), state.wandb_run_id) if rank0 else None
    run_id = [wandb.run_id if wandb is not None else None]
    torch.distributed.broadcast_object_list(run_id, src=0)  # every rank saves the same TrainState
    state.wandb_run_id = run_id[0]
    trace = DataTrace(out, dims.dp_rank, state.step) if cfg.data.trace and dims.tp_rank == dims.pp_rank == dims.cp_rank == 0 else None
    progress = Progress(cfg.train.max_steps, state.step)
    peak = peak_tflops(cfg.train.peak_tflops)
    bad_streak = 0  # consecutive skipped (non-finite) steps; every rank sees the same verdict
    profiler = StepProfiler(cfg.profile.steps, out, dims.rank)
    hosts: list = [None] * dims.world_size
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    stacks = StackDumper(out, dims.rank, cfg.train.collective_timeout_s)

    with stacks:  # SIGUSR2 / a stall / a collective timeout → output_dir/stacks/rank{R}.txt
        while state.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            profiler.before_step(state.step + 1)
            batches = loader.next_step()
            plan = loader.last_step_stats()  # estimates from the shard index, identical on every rank
            t_data = time.perf_counter() - t0
            result = engine.train_step(batches, state.step)
            if (written := ckpt.poll()) is not None:
                log.info("checkpoint %s complete", written)
            state.step += 1
            state.consumed_samples += result.samples
            state.consumed_tokens += result.tokens
            state.skipped_steps += int(result.skipped)
            state.data = loader.state_dict()
            step_time = time.perf_counter() - t0
            if trace is not None:
                trace.write(state.step, [b.sample_ids for b in batches])
            if (traced := profiler.after_step(state.step)) is not None and rank0:
                log.info("profile     %s", traced)
            stacks.heartbeat(state.step)
            bad_streak = bad_streak + 1 if result.skipped else 0
            diverged = cfg.train.max_bad_steps > 0 and bad_streak >= cfg.train.max_bad_steps

            if evaluator.due(state.step) and not diverged:  # before the checkpoint: a resume keeps its lines
                for record in evaluator.run(engine, state.step):
                    if rank0:
                        shown = record.pop("examples")
                        metrics.write({**record, "examples": [{k: v for k, v in e.items() if k != "image"} for e in shown]})
                        name = record["source"]
                        wandb.log({f"eval/{name}/{k}": record[k] for k in ("loss", "accuracy", "label_tokens")},
                                  step=state.step)
                        wandb.log_examples(f"eval/{name}/examples", shown, step=state.step)
                        log.info("eval        step %d  %s  loss %.4f  exact match %.1f%% of %d",
                                 state.step, name, record["loss"], 100 * record["accuracy"], record["answers"])

            # Checkpoint: never after the bad-step limit; no periodic save inside a bad streak, so
            # `latest` stays a checkpoint written after a finite step.
            stop = stopper.agreed()
            every = cfg.checkpoint.every
            periodic = every and state.step % every == 0 and bad_streak == 0
            t_ckpt = 0.0
            if not diverged and (stop or periodic or state.step == cfg.train.max_steps):
                t1 = time.perf_counter()
                step_dir = ckpt.save(engine, state)
                if stop or state.step == cfg.train.max_steps:
                    ckpt.wait()  # the process is about to end: its last checkpoint must be complete
                t_ckpt = time.perf_counter() - t1
                log.info("checkpoint %s%s", step_dir, " (writing in the background)" if ckpt.pending else "")

            log_now = state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps or diverged
            skipped = _global_data_stats(loader.stats(), dims) if log_now else {}
            own_s = t_data + result.timings["fwd_bwd_s"]
            stragglers = _straggler_stats(own_s, hosts, cfg.train.straggler_threshold, dims) if log_now else {}
            if rank0 and log_now:
                record = train_record(
                    state.step, result, lr=engine.current_lr(), step_time_s=step_time,
                    data_s=t_data, checkpoint_s=t_ckpt, world_size=dims.world_size, peak_tflops=peak,
                    skipped_steps=state.skipped_steps,
                )
                record.update(skipped)
                record.update(stragglers)
                record.update({f"data/plan_{k}": v for k, v in plan.items() if k != "est_flops"})
                metrics.write(record)
                wandb.log(record, step=state.step)
                progress.update(state.step, result.loss, record["tokens_per_s"], step_time)
            if diverged:
                ckpt.wait()  # a save of a good step still in flight becomes the checkpoint to fall back to
                latest = out / "checkpoints" / "latest"
                kept = (out / "checkpoints" / latest.read_text().strip()) if latest.exists() else None
                message = (
                    f"stopping: {bad_streak} consecutive steps (up to step {state.step}) had a non-finite loss "
                    f"or gradient (train.max_bad_steps={cfg.train.max_bad_steps}); no checkpoint written. "
                    f"Last good checkpoint: {kept or 'none'}. Lower optim.lr or check the data, then rerun to resume."
                )
                if rank0:
                    metrics.close()
                    wandb.finish()
                if trace is not None:
                    trace.close()
                stopper.restore()
                dims.destroy()
                raise SystemExit(message if rank0 else 1)
            if stop:
                log.info("signal %d: stopped after step %d with a checkpoint; rerun the same command to resume", stop, state.step)
                break

    if rank0:
        metrics.close()
        wandb.finish()
        log.info("metrics     %s", out / "metrics.jsonl")
        log.info("checkpoint  %s", out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip())
        if wandb.run_dir:
            log.info("wandb       %s  (upload: wandb sync %s)", wandb.run_dir, wandb.run_dir)
    if trace is not None:
        trace.close()
    evaluator.close()
    loader.close()
    stopper.restore()
    dims.destroy()
