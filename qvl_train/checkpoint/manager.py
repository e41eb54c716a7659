"""Checkpoints: one `TrainState` per step directory, saved with megatron-core `dist_checkpointing`.

Layout (`output_dir/checkpoints/`):
    step_0000040/        dist_checkpointing files (layout-independent sharded tensors + common.pt)
    step_0000040/model_arch.json  the model config the weights belong to (checked before a resume or
                         `model.init_from` reads any weight; listed in the manifest)
    step_0000040/manifest.json  SHA-256 and size of every file above, written after all ranks wrote
    step_0000040/complete   written after the manifest
    latest               text file naming the newest complete step directory, replaced atomically

Integrity: megatron-core's checkpoint metadata and `common.pt` are pickles, so loading a file this
framework did not write (or one damaged on disk) is unsafe. Before anything of a step directory is
deserialised, its files are hashed (spread over the ranks) and compared with `manifest.json`; a
mismatch, a missing file or a missing manifest raises `CheckpointIntegrityError` naming the file.
With `checkpoint.resume=auto` the manager then falls back to the previous complete checkpoint (and
logs why). `checkpoint.keep_last=N` prunes older step directories after each successful save, never
the one `latest` names nor one that `model.init_from` points into.

What a checkpoint holds: model weights, AdamW moments and step count (per parameter name, or with
`optim.distributed` the distributed optimizer's slices and fp32 masters; `optimizer_format` says which,
and a run refuses the other format), the `TrainState` (step,
consumed samples/tokens, data-loader cursor, wandb run id, layout it was written with) and the RNG
state of every rank. Tensors are sharded by global names and offsets, so a checkpoint written at
tp=2 loads at pp=2 or dp=4. The per-rank RNG state is restored only when the layout is unchanged.

Note: `dist_checkpointing` saves through worker processes; every script that saves must guard its
entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from qvl_train.parallel.dims import ParallelDims

log = logging.getLogger(__name__)
COMPLETE = "complete"
LATEST = "latest"
MANIFEST = "manifest.json"
MODEL_ARCH = "model_arch.json"  # the run's ModelConfig minus run-only keys (init_from, init_std, attention_backend)
IMPORT_MODEL_CONFIG = "model_config.json"  # the ModelConfig that `convert.py import-hf` writes next to its step dir
RUN_ONLY_MODEL_KEYS = ("init_from", "init_std", "attention_backend")
# Keys that change what the model computes but not the shape or name of any weight: a difference is
# reported as a warning, not refused (e.g. a longer-context fine-tune from a checkpoint with another rope_theta).
SHAPELESS_KEYS = frozenset({
    "llm.rope_theta", "llm.norm_eps", "llm.mrope_section", "llm.mrope_interleaved", "llm.moe_router_topk",
    "llm.moe_aux_loss_coeff", "vision.norm_eps", "vision.tokens_per_second", "vision.window_size",
    "vision.fullatt_block_indexes", "vision.image_size", "lora.alpha", "image_token_id", "video_token_id",
})
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointIntegrityError(RuntimeError):
    """A step directory whose files do not match its manifest (or that has none)."""


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    wandb_run_id: Optional[str] = None
    layout: dict[str, int] = field(default_factory=dict)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, over the whole run

    def advance(self, result, data: dict[str, Any]) -> None:
        """Count one finished step (the engine's `StepResult`) and take the loader's cursor after it."""
        self.step += 1
        self.consumed_samples += result.samples
        self.consumed_tokens += result.tokens
        self.skipped_steps += int(result.skipped)
        self.data = data


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def resolve_checkpoint(path: str | Path) -> Optional[Path]:
    """A step directory, or a checkpoint root whose `latest` names one. None if nothing complete."""
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    latest = path / LATEST
    if latest.exists():
        step_dir = path / latest.read_text().strip()
        if (step_dir / COMPLETE).exists():
            return step_dir
    if (path / "checkpoints").is_dir():
        return resolve_checkpoint(path / "checkpoints")
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _payload_files(step_dir: Path) -> list[str]:
    """Every file of a step directory (relative, sorted) except the manifest and the complete marker."""
    return sorted(
        str(p.relative_to(step_dir))
        for p in step_dir.rglob("*")
        if p.is_file() and p.relative_to(step_dir).parts[0] not in (MANIFEST, COMPLETE)
    )


def write_manifest(step_dir: str | Path) -> Path:
    """Write `manifest.json` (SHA-256 and size of every file) into a finished step directory."""
    step_dir = Path(step_dir)
    files = {
        rel: {"sha256": _sha256(step_dir / rel), "size": (step_dir / rel).stat().st_size}
        for rel in _payload_files(step_dir)
    }
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1) + "\n")
    os.replace(tmp, step_dir / MANIFEST)
    return step_dir / MANIFEST


def read_manifest(step_dir: str | Path) -> dict[str, dict[str, Any]]:
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    if not path.is_file():
        raise CheckpointIntegrityError(
            f"{path} is missing: the checkpoint was not written by this framework's manager (or predates "
            f"manifests). If you trust it, write one: python -m qvl_train.checkpoint.manager --write-manifest {step_dir}"
        )
    try:
        return json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointIntegrityError(f"{path} is not a valid manifest: {err}") from err


def check_files(step_dir: str | Path, names: list[str], manifest: dict[str, dict[str, Any]]) -> Optional[str]:
    """The first problem among `names` of `step_dir` against `manifest`, as a message naming the file; None if all match."""
    step_dir = Path(step_dir)
    for rel in names:
        want = manifest[rel]
        path = step_dir / rel
        if not path.is_file():
            return f"{path} is listed in {MANIFEST} but missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, {MANIFEST} says {want['size']}"
        digest = _sha256(path)
        if digest != want["sha256"]:
            return f"{path} has SHA-256 {digest[:16]}…, {MANIFEST} says {want['sha256'][:16]}… (the file changed after saving)"
    return None


def verify_checkpoint(step_dir: str | Path, rank: int = 0, world_size: int = 1, group=None) -> None:
    """Hash the files of `step_dir` (rank r takes every world_size-th file) against its manifest.

    A collective when `world_size > 1`: every rank learns every rank's verdict and all raise the same
    `CheckpointIntegrityError` (naming the file) or none does. Then the pickles a load reads (`.metadata`,
    `*.pt`, DCP's BYTE_IO objects) are vetted by `safe_pickle.scan_checkpoint` (each rank its share):
    a class outside its allowlist is refused, naming the file and the class, and never runs.
    """
    try:
        manifest = read_manifest(step_dir)
        problem = check_files(step_dir, sorted(manifest)[rank::world_size], manifest)
    except CheckpointIntegrityError as err:
        problem = str(err)
    if problem is None:  # hashes prove integrity, not origin: bound what the pickles can contain
        from qvl_train.checkpoint.safe_pickle import scan_checkpoint

        problem = scan_checkpoint(step_dir, rank, world_size)
    if world_size > 1:
        verdicts: list = [None] * world_size
        dist.all_gather_object(verdicts, problem, group=group)
        problem = next((v for v in verdicts if v), None)
    if problem:
        raise CheckpointIntegrityError(f"checkpoint {step_dir} failed verification: {problem}")


def _step_of(path: Path) -> Optional[int]:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def complete_step_dirs(root: str | Path) -> list[Path]:
    """Complete step directories under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None and (p / COMPLETE).exists()]
    return sorted(dirs, key=_step_of, reverse=True)


# ------------------------------------------------------------ the model a checkpoint belongs to
class ModelMismatchError(ValueError):
    """A checkpoint written for another model than the run's (raised as the run's ConfigError)."""


def model_arch(model_cfg) -> dict[str, Any]:
    """What `MODEL_ARCH` holds: the ModelConfig as a dict, minus the keys that only concern this run."""
    d = asdict(model_cfg) if not isinstance(model_cfg, dict) else dict(model_cfg)
    return {k: v for k, v in d.items() if k not in RUN_ONLY_MODEL_KEYS}


def carried_model_config(step_dir: Path) -> tuple[Optional[dict[str, Any]], str]:
    """The model config a checkpoint carries itself (`MODEL_ARCH` in the step directory, or an import's
    `model_config.json` beside it) and where it came from; (None, "") if it carries none."""
    step_dir = Path(step_dir)
    for path in (step_dir / MODEL_ARCH, step_dir / IMPORT_MODEL_CONFIG, step_dir.parent / IMPORT_MODEL_CONFIG):
        if path.is_file():
            try:
                return model_arch(json.loads(path.read_text())), str(path)
            except (json.JSONDecodeError, TypeError) as err:
                raise ModelMismatchError(f"{path} is not valid JSON ({err}); restore it or remove it") from None
    return None, ""


def saved_model_config(step_dir: Path) -> tuple[Optional[dict[str, Any]], str]:
    """`carried_model_config`, else (checkpoints written before `MODEL_ARCH`) the `model:` section of the
    `config.yaml` that train.py wrote into the output_dir holding `checkpoints/`; (None, "") if neither."""
    found, source = carried_model_config(step_dir)
    if found is not None:
        return found, source
    config_yaml = Path(step_dir).parent.parent / "config.yaml"
    if config_yaml.is_file():
        from omegaconf import OmegaConf

        try:
            model = OmegaConf.to_container(OmegaConf.load(config_yaml).model, resolve=True)
        except Exception:  # noqa: BLE001 — an unreadable fallback is no reason to refuse; the check is skipped
            return None, ""
        return model_arch(model), str(config_yaml)
    return None, ""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def model_differences(saved: dict[str, Any], run: dict[str, Any], *, lora: bool) -> tuple[list[str], list[str]]:
    """(differences that change weight shapes or names, differences that do not), as
    `model.KEY: checkpoint X vs run Y` lines. `lora=False` leaves the adapters out (`model.init_from`
    takes base weights whatever adapters either side has)."""
    a, b = _flat(saved), _flat(run)
    refuse, warn = [], []
    for key in sorted(set(a) | set(b)):
        if key.startswith("lora.") and not lora:
            continue
        if key in a and key in b and a[key] == b[key]:
            continue
        if key not in a or key not in b:  # a key added to ModelConfig after the checkpoint was written
            continue
        line = f"model.{key}: checkpoint {a[key]!r} vs run {b[key]!r}"
        (warn if key in SHAPELESS_KEYS else refuse).append(line)
    return refuse, warn


def matching_model_choices(saved: dict[str, Any], configs_dir: Path) -> list[str]:
    """`model=GEN/SIZE` choices under configs/model whose architecture is the checkpoint's (for the message)."""
    from omegaconf import OmegaConf

    from qvl_train.config import ModelConfig

    found = []
    for path in sorted(Path(configs_dir).glob("*/*.yaml")):
        try:
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
        except Exception:  # noqa: BLE001 — a config that does not compose matches nothing
            continue
        if not model_differences(saved, model_arch(cfg), lora=False)[0]:
            found.append(f"{path.parent.name}/{path.stem}")
    return found


def _difference_lines(lines: list[str], limit: int = 8) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:limit])
    return shown + (f"\n  … and {len(lines) - limit} more" if len(lines) > limit else "")


def check_checkpoint_model(cfg, *, arch_overridden: bool, configs_dir: Path) -> list[str]:
    """Before any process group or weight: the model of the checkpoint this run will read against the run's.

    * `model.init_from` whose checkpoint carries its own model config (an `import-hf` directory, or a
      checkpoint written by this manager): when the user set no architecture key (`model=`,
      `model.generation`, `model.vision.*`, `model.llm.*`) the run takes the checkpoint's architecture
      (`cfg.model` is replaced); otherwise a difference is refused.
    * the checkpoint `checkpoint.resume=auto` resumes (`output_dir/checkpoints`): a difference in the
      weights' shapes (LoRA adapters included) is refused; one that loads is a warning line.

    Raises `ModelMismatchError` saying which keys differ and what to do; returns lines to print.
    """
    from qvl_train.tools.convert import model_config_from_dict

    notes: list[str] = []
    run = model_arch(cfg.model)
    src = resolve_checkpoint(cfg.model.init_from) if cfg.model.init_from else None
    if src is not None:
        carried, where = carried_model_config(src)
        if carried is not None and not arch_overridden:
            if any(model_differences(carried, run, lora=False)):
                merged = {**asdict(cfg.model), **{k: carried[k] for k in ("generation", "vision", "llm") if k in carried}}
                for k in ("image_token_id", "video_token_id"):
                    merged[k] = carried.get(k)
                try:
                    cfg.model = model_config_from_dict(merged)
                except ValueError as err:
                    raise ModelMismatchError(f"the model config of model.init_from ({where}) is not valid here: {err}") from None
                run = model_arch(cfg.model)
                llm, vit = cfg.model.llm, cfg.model.vision
                notes.append(f"model       taken from model.init_from ({where}): {cfg.model.generation}, "
                             f"ViT {vit.depth}×{vit.hidden_size}, LLM {llm.num_layers}×{llm.hidden_size} "
                             "(set model= or model.* keys to choose it yourself)")
    root = Path(cfg.output_dir) / "checkpoints"
    resume = resolve_checkpoint(root) if cfg.checkpoint.resume == "auto" else None
    if resume is None and cfg.checkpoint.resume == "auto":
        dirs = complete_step_dirs(root)
        resume = dirs[0] if dirs else None
    if resume is not None:
        target, full, what = resume, True, f"output_dir={cfg.output_dir} holds a checkpoint of another model"
        fixes = ("resume it with the model it was trained with{choices}, use another output_dir=, or start over "
                 "with checkpoint.resume=never (its checkpoints would be overwritten)")
    elif src is not None:
        target, full, what = src, False, f"model.init_from={cfg.model.init_from} is a checkpoint of another model"
        fixes = ("choose the model it was trained with{choices}"
                 + (" or drop the model.* overrides to take its own" if carried_model_config(src)[0] is not None else "")
                 + ", or point model.init_from at a checkpoint of this model")
    else:
        return notes
    saved, where = saved_model_config(target)
    if saved is None:
        notes.append(f"warning: {target} carries no model config ({MODEL_ARCH}) and no config.yaml is beside it: "
                     "its model is not checked against this run's")
        return notes
    refuse, warn = model_differences(saved, run, lora=full)
    if refuse:
        choices = matching_model_choices(saved, configs_dir)
        hint = f" (model={choices[0]})" if len(choices) == 1 else (
            f" (one of model={', model='.join(choices)})" if choices else " (the same model= and model.* overrides)")
        fix = fixes.format(choices=hint)
        raise ModelMismatchError(
            f"{what} ({target}, model config from {Path(where).name}):\n{_difference_lines(refuse + warn)}\n"
            + fix[0].upper() + fix[1:] + "."
        )
    if warn:
        notes.append(f"warning: {target} was trained with other settings that load anyway: " + "; ".join(warn))
    return notes


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it. Each is stopped (SIGSTOP) before its children are
    listed, so none can fork a child that the listing misses (the writer forks file writers lazily)."""
    import psutil

    frozen, todo = [], [pid]
    while todo:
        try:
            proc = psutil.Process(todo.pop())
            proc.suspend()
            frozen.append(proc)
            todo.extend(child.pid for child in proc.children())
        except psutil.NoSuchProcess:
            continue
    for proc in frozen:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(frozen[1:], timeout=10)  # the writer itself is joined by its caller


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Saves and restores `TrainState` + engine state under `root` (= output_dir/checkpoints)."""

    def __init__(
        self, root: str | Path, dims: ParallelDims, *, keep_last: int = 0, init_from: Optional[str] = None,
        async_save: bool = False, every: int = 0,
    ) -> None:
        self.root = Path(root)
        self.dims = dims
        self.keep_last = keep_last
        self.every = every  # `maybe_save`: a periodic checkpoint every this many steps (0: none)
        self.init_from = init_from
        self._async = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            from qvl_train.checkpoint.orphans import install

            install()  # the writer, its file writers and the results Manager die with this rank (orphans.py)
            self._async = AsyncCallsQueue()
        self.pending: Optional[Path] = None  # an async save whose files are still being written

    def _layout(self) -> dict[str, int]:
        d = self.dims
        return {"tp": d.tp, "pp": d.pp, "cp": d.cp, "dp": d.dp, "world": d.world_size}

    def _rng_object(self, data: Any):
        from megatron.core.dist_checkpointing import ShardedObject

        d = self.dims
        return ShardedObject(
            "rng_state", data, global_shape=(d.pp, d.tp, d.dp),
            global_offset=(d.pp_rank, d.tp_rank, d.dp_rank), replica_id=d.cp_rank,  # CP ranks: copies
        )

    # ----------------------------------------------------------------- save
    def maybe_save(self, engine, state: TrainState, *, ending: bool, bad_streak: int, diverged: bool) -> float:
        """The run's save policy, after each step (all ranks); returns the seconds it took.

        A checkpoint every `every` steps and when the process is about to end (`ending`: the last step
        or a stop signal; then it is waited for, complete before the process exits). Never once the
        bad-step limit is reached (`diverged`), and no periodic save inside a streak of skipped
        (non-finite) steps, so `latest` stays a checkpoint written after a finite step."""
        periodic = self.every and state.step % self.every == 0 and bad_streak == 0
        if diverged or not (ending or periodic):
            return 0.0
        t0 = time.perf_counter()
        step_dir = self.save(engine, state)
        if ending:
            self.wait()  # the process is about to end: its last checkpoint must be complete
        log.info("checkpoint %s%s", step_dir, " (writing in the background)" if self.pending else "")
        return time.perf_counter() - t0

    def last_good(self) -> Optional[Path]:
        """The step directory `latest` names (after any save in flight has completed), or None."""
        self.wait()
        latest = self.root / LATEST
        return self.root / latest.read_text().strip() if latest.exists() else None

    def save(self, engine, state: TrainState) -> Path:
        """Save `state` (all ranks). Synchronous by default; with `async_save` the tensors are staged
        (a fork's copy-on-write snapshot on CPU, a device-to-host copy on GPU), written by a background
        process, and the checkpoint becomes `complete`/`latest` only in `poll()`/`wait()` once every rank's
        files are on disk. At most one async save is in flight: a new one first waits for the previous."""
        from megatron.core import dist_checkpointing

        self.wait()
        step_dir = self.root / step_dir_name(state.step)
        if dist.get_rank() == 0:
            if step_dir.exists():  # a stale or broken copy of this step (e.g. after a fallback): replace it
                (step_dir / COMPLETE).unlink(missing_ok=True)
                shutil.rmtree(step_dir)
            step_dir.mkdir(parents=True)
        dist.barrier()
        state.layout = self._layout()
        model_cfg = getattr(engine, "model_cfg", None)
        self._model_arch = model_arch(model_cfg) if model_cfg is not None else None
        sharded = engine.sharded_state_dict(with_optimizer=True)
        sharded["train_state"] = asdict(state)
        sharded["optimizer_steps"] = engine.optimizer_step_count()
        sharded["optimizer_format"] = engine.optimizer_format
        sharded["rng"] = self._rng_object(_rng_state())
        if self._async is None:
            dist_checkpointing.save(sharded, str(step_dir))
            self._commit(step_dir, state.step)
            return step_dir
        request = dist_checkpointing.save(sharded, str(step_dir), async_sharded_save=True)
        request.add_finalize_fn(lambda: self._commit(step_dir, state.step))
        self._async.schedule_async_request(request)
        self.pending = step_dir
        return step_dir

    def _commit(self, step_dir: Path, step: int) -> None:
        """After every rank's files are written: manifest, `complete`, then `latest` (atomic), pruning."""
        dist.barrier()
        if dist.get_rank() == 0:
            if getattr(self, "_model_arch", None) is not None:
                (step_dir / MODEL_ARCH).write_text(json.dumps(self._model_arch, indent=1) + "\n")
            write_manifest(step_dir)
            (step_dir / COMPLETE).write_text(f"{step}\n")
            tmp = self.root / f".{LATEST}.tmp"
            tmp.write_text(step_dir.name + "\n")
            os.replace(tmp, self.root / LATEST)
            if self.keep_last > 0:
                self.prune(step_dir)
        dist.barrier()
        if self.pending == step_dir:
            self.pending = None

    def poll(self) -> Optional[Path]:
        """Finish an async save whose files are all written (all ranks; cheap, call once per step).
        Returns the step directory that became `latest`, if one did."""
        if self._async is None or self.pending is None:
            return None
        done = self.pending
        self._async.maybe_finalize_async_calls(blocking=False)
        if self.pending is not None:
            return None
        log.info("checkpoint %s complete", done)
        return done

    def wait(self) -> Optional[Path]:
        """Block until an async save in flight is complete (all ranks); returns its directory."""
        if self._async is None or self.pending is None:
            return None
        done = self.pending
        self._async.maybe_finalize_async_calls(blocking=True)
        return done

    def close(self, abort: bool = False) -> None:
        """Once, at the end of the run (all ranks). A save in flight is completed, or with `abort` (the
        run failed: other ranks may be gone, so no collective) its writer process is killed and reaped:
        that step never becomes `complete`, and resume takes the previous checkpoint."""
        if self._async is None:
            return
        if not abort:
            self.wait()
        for call in self._async.async_calls:  # megatron's AsyncCallsQueue keeps one writer per save
            process = getattr(call.async_caller, "process", None)
            if process is not None and process.is_alive():
                _kill_tree(process.pid)  # the writer forks file writers of its own
                process.join()
        self._async.async_calls.clear()
        self._async, self.pending = None, None

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(abort=exc is not None)
        return False

    def _protected(self, latest: Path) -> set[Path]:
        keep = {latest.resolve()}
        if self.init_from:
            src = Path(self.init_from).resolve()
            keep.add(src)
            keep.update(src.parents)  # a file or sub-directory inside a step directory
            resolved = resolve_checkpoint(self.init_from)
            if resolved is not None:
                keep.add(resolved.resolve())
        return keep

    def prune(self, latest: Path) -> list[Path]:
        """Delete step directories beyond the newest `keep_last` complete ones (rank 0, after a save).

        Incomplete directories (crashed saves) and complete ones past `latest` go too; `latest` and anything
        `model.init_from` points into stay whatever their age. Returns the deleted directories.
        """
        protected = self._protected(latest)
        # Complete directories past `latest` are a stale line of history (latest moved back after a
        # fallback): they are not counted among the newest and are removed.
        lineage = [d for d in complete_step_dirs(self.root) if _step_of(d) <= _step_of(latest)]
        newest = set(lineage[: self.keep_last])
        removed = []
        for d in self.root.iterdir():
            if not d.is_dir() or _step_of(d) is None or d in newest or d.resolve() in protected:
                continue
            if (d / COMPLETE).exists() or _step_of(d) != _step_of(latest):
                (d / COMPLETE).unlink(missing_ok=True)  # no longer a loadable checkpoint, even if rmtree dies
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        if removed:
            log.info("keep_last=%d: removed %s", self.keep_last, ", ".join(sorted(p.name for p in removed)))
        return removed

    # ----------------------------------------------------------------- load
    def restore(self, engine, *, resume: str, init_from: Optional[str]) -> tuple[TrainState, str]:
        """Resume this run (full state) or take weights from `init_from`; returns (state, what).

        With resume=auto the checkpoint `latest` names is verified first; if it fails, older complete
        checkpoints are tried newest first (each failure logged). If every one fails, the run stops
        rather than start fresh over them. `init_from` is verified and refused on a mismatch.
        """
        if init_from is not None:
            self.init_from = init_from
        if resume == "auto":
            candidates = self._resume_candidates()
            failures = []
            for step_dir in candidates:
                try:
                    self._verify(step_dir)
                except CheckpointIntegrityError as err:
                    failures.append(str(err))
                    log.warning("%s; falling back to the previous complete checkpoint", err)
                    continue
                how = f"resumed from {step_dir}"
                if failures:
                    how += f" (fell back past {len(failures)} checkpoint(s) that failed verification)"
                return self._load(engine, step_dir, full=True), how
            if failures:
                raise CheckpointIntegrityError(
                    f"no checkpoint under {self.root} passed verification:\n  " + "\n  ".join(failures)
                    + "\nset checkpoint.resume=never (and a new output_dir) to start over"
                )
        if init_from:
            src = resolve_checkpoint(init_from)
            if src is None:
                raise FileNotFoundError(
                    f"model.init_from={init_from!r} holds no complete checkpoint "
                    "(expected a step directory with a 'complete' file, or a root with 'latest')"
                )
            self._verify(src)
            self._load(engine, src, full=False)
            return TrainState(), f"weights initialised from {src}"
        return TrainState(), "fresh start"

    def _resume_candidates(self) -> list[Path]:
        """The step directory `latest` names, then older complete ones, newest first."""
        latest = resolve_checkpoint(self.root)
        dirs = complete_step_dirs(self.root)
        if latest is None:
            return dirs  # `latest` missing or naming a deleted directory: try what is complete
        return [latest] + [d for d in dirs if _step_of(d) < _step_of(latest)]

    def _verify(self, step_dir: Path) -> None:
        verify_checkpoint(step_dir, dist.get_rank(), dist.get_world_size())

    def _load(self, engine, step_dir: Path, *, full: bool) -> TrainState:
        from megatron.core import dist_checkpointing

        common = dist_checkpointing.load_common_state_dict(str(step_dir))
        saved = TrainState(**common["train_state"])
        same_layout = saved.layout == self._layout()
        if full:  # before any tensor is read: the optimizer state must be in a format this engine reads
            engine.check_optimizer_format(common.get("optimizer_format", "per_param"))
        request = engine.sharded_state_dict(with_optimizer=full, is_loading=True)
        if not full:  # weights only (init_from): LoRA adapters may be on one side only
            from qvl_train.models.lora import fit_to_checkpoint

            if fit_to_checkpoint(request["model"], set(dist_checkpointing.load_tensors_metadata(str(step_dir)))):
                log.warning("%s holds LoRA adapters that this run (model.lora.rank=0) does not load: only the base "
                            "weights are taken. To start from the adapted model, export it merged (export-hf) and "
                            "import-hf that, or set model.lora as in that run", step_dir)
        if full and same_layout:
            request["rng"] = self._rng_object(None)
        loaded = dist_checkpointing.load(request, str(step_dir))
        engine.load_sharded(loaded, with_optimizer=full)
        if not full:
            return TrainState()
        engine.set_optimizer_step_count(int(common.get("optimizer_steps", saved.step)))
        if same_layout:
            _set_rng_state(loaded["rng"])
        else:
            log.warning("layout changed %s -> %s: per-rank RNG state not restored", saved.layout, self._layout())
        return saved


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Checkpoint manifests: verify a step directory or write one for a trusted checkpoint.")
    parser.add_argument("--write-manifest", metavar="STEP_DIR",
                        help="hash the files of a trusted step directory into manifest.json")
    parser.add_argument("--verify", metavar="STEP_DIR", help="check a step directory against its manifest")
    args = parser.parse_args()
    if args.write_manifest:
        print(write_manifest(args.write_manifest))
    if args.verify:
        verify_checkpoint(args.verify)
        print(f"{args.verify}: every file matches {MANIFEST}")
