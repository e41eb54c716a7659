"""megatron-core 0.16.1 on a machine without a GPU (CPU tensors, gloo process groups).

Why this file exists
--------------------
megatron-core is written for CUDA and hard-codes it in a handful of hot paths that a CPU run still
goes through. Reading `megatron/core` of the pinned version (grep for `cuda`) gives this list:

* ``torch.cuda.current_device()`` used as a *tensor device*: the tensor-parallel mappings
  (`tensor_parallel/mappings.py` all-gather / reduce-scatter outputs), the global memory buffer
  (`utils.GlobalMemoryBuffer`), the linear layers' gradient buffers (`tensor_parallel/layers.py`),
  the pipeline p2p shape and activation buffers (`pipeline_parallel/p2p_communication.py`).
* ``device="cuda"`` literals in the pipeline schedules (`total_num_tokens = torch.zeros([],
  device="cuda")` in `forward_backward_no_pipelining` and `..._pipelining_without_interleaving` /
  `..._with_interleaving`).
* ``torch.cuda.synchronize()`` after the batched p2p shape exchange.
* The CUDA RNG tracker (`tensor_parallel/random.py`): `model_parallel_cuda_manual_seed` and
  `get_cuda_rng_tracker().add/fork()` read and write the CUDA generator's state.

`install_cpu_compat()` redirects exactly these to the CPU, and only when
``torch.cuda.is_available()`` is False, so the same code runs unchanged on a GPU machine:

1. ``torch.cuda.current_device`` returns ``torch.device("cpu")``: every
   ``torch.empty(..., device=torch.cuda.current_device())`` and ``.to(torch.cuda.current_device())``
   then allocates on the CPU. (On a CUDA-less build the original raises, so nothing that worked
   before changes.)
2. ``torch.cuda.synchronize`` / ``torch.cuda.nvtx.range_push/pop`` become no-ops (CPU ops are
   synchronous; the p2p "race condition" guard is moot with gloo, which waits in ``req.wait()``).
3. The ``torch`` name inside `pipeline_parallel.schedules` is replaced by a thin proxy whose
   tensor factories (``zeros``, ``ones``, ``empty``, ``full``, ``tensor``) map ``device="cuda"`` to
   the CPU; everything else is forwarded to the real ``torch`` module untouched.
4. The RNG tracker uses the CPU default generator as "the device generator": ``_get_cuda_rng_state``
   and ``_set_cuda_rng_state`` read/write ``torch.get_rng_state()``, and the ``torch`` name inside
   `tensor_parallel.random` is a proxy whose ``cuda.get_rng_state`` / ``cuda.manual_seed`` act on
   the CPU generator. So ``model_parallel_cuda_manual_seed(seed)`` seeds the CPU generator with the
   data-parallel seed and registers the tensor-parallel / expert states, and
   ``get_cuda_rng_tracker().fork()`` swaps the CPU generator state in and out exactly as it swaps
   the CUDA one on a GPU. The tracker's "CPU RNG state changed within GPU RNG context" warning is
   filtered, because here the two generators are the same by construction.

5. megatron's `DistributedDataParallel`, optimizers and gradient clipping (`optim.distributed`):
   the ``torch`` name inside `distributed.param_and_grad_buffer`, `optimizer.optimizer`,
   `optimizer.grad_scaler`, `optimizer.clip_grads` and `core.utils` (the fallback multi-tensor L2
   norm) is the same factory proxy as in 3, so their ``device='cuda'`` scalars (found-inf flag,
   norm buffers, the NCCL warm-up tensor) land on the CPU. The optimizers' and clipping's dtype
   asserts compare ``tensor.type()`` with ``'torch.cuda.FloatTensor'`` / ``...BFloat16Tensor``;
   the constructors of `DistributedOptimizer` and `Float16OptimizerWithFloat16Params` and
   `clip_grad_by_total_norm_fp32` run with ``Tensor.type()`` (no argument) reporting a CPU tensor
   under its CUDA type name — only inside those calls, so nothing else sees the changed name.
   gloo itself has `reduce_scatter_tensor`, `all_gather_into_tensor` and coalescing in the pinned
   torch, so the buffers' bucketed reduce-scatter and the parameter all-gather need no patch.
6. The MoE alltoall token dispatcher (`transformer/moe/token_dispatcher.py`) creates a
   ``torch.cuda.Stream`` for its device-to-host copies of the split sizes and waits on an event
   from it. The ``torch`` name inside that module is a proxy whose ``cuda.Stream`` /
   ``current_stream`` / ``stream`` are inert stand-ins (one "stream", events that are already
   done): on the CPU the copies are plain synchronous ``.to("cpu")`` calls anyway. Its
   ``maybe_move_tensor_to_cpu`` only turns the all-to-all split sizes into numpy arrays when they
   are on a GPU; gloo's ``all_to_all_single`` needs them as sequences, so here CPU tensors are
   converted too.

What it does *not* cover (the engine must avoid or handle these on CPU): `torch.autocast("cuda")`
in the schedules (keep ``config.enable_autocast=False``), `tensor_parallel.broadcast_data`
(``.cuda()``), CUDA streams for overlapped gradient reduction (keep ``overlap_grad_reduce`` and
``overlap_param_gather`` off), optimizer CPU offload, CUDA graphs, and the symmetric-memory buffer.
None of them is on the path of TP layers, `vocab_parallel_cross_entropy`, the pp=1/pp=2 schedules
or the distributed optimizer, which `tests/unit/test_cpu_compat.py` and
`tests/distributed/test_distributed_optimizer.py` check under gloo.

Call `install_cpu_compat()` once per process before building megatron modules or running a schedule;
calling it again is a no-op. It refuses (`qvl_train.compat.PinMismatch`) to patch a megatron-core
other than the pinned release.
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Any

import torch

from qvl_train.compat import require_pinned

__all__ = ["install_cpu_compat", "is_installed", "spawn_gloo", "CPU"]

CPU = torch.device("cpu")
_INSTALLED = False


def _is_cuda_device(device: Any) -> bool:
    """True for "cuda", "cuda:0", torch.device("cuda", i) — the literals megatron hard-codes."""
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_factory(fn):
    """Wrap a torch tensor factory so that a CUDA `device=` argument lands on the CPU."""

    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = CPU
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "factory")
    wrapper.__doc__ = f"CPU-redirecting wrapper of torch.{wrapper.__name__} (see qvl_train.compat.megatron_cpu)."
    return wrapper


class _TorchProxy(types.ModuleType):
    """Stands in for the `torch` module inside one megatron module.

    Attributes in `overrides` win; everything else is looked up on the real `torch`, so the module
    behaves exactly as before except for the few calls we redirect.
    """

    def __init__(self, name: str, overrides: dict[str, Any]):
        super().__init__(name)
        self.__dict__.update(overrides)

    def __getattr__(self, item: str) -> Any:  # only called for attributes not in overrides
        return getattr(torch, item)


class _CudaRngShim(types.ModuleType):
    """`torch.cuda` as seen by `tensor_parallel.random`: its RNG functions act on the CPU generator."""

    def __init__(self) -> None:
        super().__init__("torch.cuda<cpu-rng>")
        self.get_rng_state = lambda device="cuda": torch.get_rng_state()
        self.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
        self.manual_seed = lambda seed: torch.manual_seed(seed)
        self.manual_seed_all = lambda seed: torch.manual_seed(seed)

    def __getattr__(self, item: str) -> Any:
        return getattr(torch.cuda, item)


class _InertStream:
    """A CUDA stream / event stand-in on the CPU: every operation is already complete."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None) -> "_InertStream":
        return self

    def synchronize(self) -> None:
        pass

    def __eq__(self, other) -> bool:  # one stream: "am I on the side stream?" is always no
        return isinstance(other, _InertStream)

    __hash__ = object.__hash__


class _CudaStreamShim(types.ModuleType):
    """`torch.cuda` as seen by the MoE token dispatcher: streams and events that do nothing."""

    def __init__(self) -> None:
        super().__init__("torch.cuda<cpu-streams>")
        self.Stream = lambda *a, **k: _InertStream()
        self.current_stream = lambda device=None: _InertStream()
        self.stream = lambda s: contextlib.nullcontext()

    def __getattr__(self, item: str) -> Any:
        return getattr(torch.cuda, item)


def _cpu_move_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """`moe_utils.maybe_move_tensor_to_cpu` for tensors that are already on the CPU."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU replacement of `random._get_cuda_rng_state` (the state is always a fresh copy)."""
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG (use_cudagraphable_rng) is not available on CPU")
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """CPU replacement of `random._set_cuda_rng_state`."""
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG (use_cudagraphable_rng) is not available on CPU")
    torch.set_rng_state(new_state)


class _DropSameGeneratorWarning(logging.Filter):
    """On CPU the "GPU" generator *is* the CPU generator, so this tracker warning is always noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def is_installed() -> bool:
    """Whether `install_cpu_compat()` has patched this process."""
    return _INSTALLED


def install_cpu_compat() -> bool:
    """Redirect megatron-core's hard-coded CUDA uses to the CPU (see module docstring).

    Idempotent; does nothing (and returns False) when CUDA is available. Returns True when the
    patches are active in this process.
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available():
        return False
    require_pinned("megatron-core")

    # 1-2: device queries and synchronisation in torch.cuda itself.
    torch.cuda.current_device = lambda: CPU  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    nvtx = getattr(torch.cuda, "nvtx", None)
    if nvtx is not None:
        nvtx.range_push = lambda msg: 0  # type: ignore[assignment]
        nvtx.range_pop = lambda: 0  # type: ignore[assignment]
        nvtx.range = lambda msg, *a, **k: contextlib.nullcontext()  # type: ignore[assignment]

    # 3: device="cuda" literals in the pipeline schedules.
    from megatron.core.pipeline_parallel import schedules

    factories = {n: _cpu_factory(getattr(torch, n)) for n in ("zeros", "ones", "empty", "full", "tensor")}
    schedules.torch = _TorchProxy("torch<cpu:schedules>", factories)

    # 4: the RNG tracker.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    mrandom.torch = _TorchProxy("torch<cpu:random>", {"cuda": _CudaRngShim()})
    logging.getLogger(mrandom.__name__).addFilter(_DropSameGeneratorWarning())

    # 5: DDP grad buffers, the optimizers and gradient clipping.
    _patch_optimizer_modules(factories)
    # 6: CUDA streams in the MoE alltoall token dispatcher.
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.torch = _TorchProxy("torch<cpu:token_dispatcher>", {"cuda": _CudaStreamShim()})
    token_dispatcher.maybe_move_tensor_to_cpu = _cpu_move_to_cpu

    _INSTALLED = True
    return True


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_names():
    """Inside the block, `t.type()` (no argument) names a CPU float tensor by its CUDA type."""
    original = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, *args, **kwargs)

    torch.Tensor.type = cuda_type  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _with_cuda_type_names(fn):
    """`fn` run inside `_cuda_type_names()` (for megatron's `tensor.type()` dtype asserts)."""

    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


def _patch_optimizer_modules(factories: dict) -> None:
    from megatron.core import utils as mutils
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler, optimizer as moptimizer

    for module in (param_and_grad_buffer, moptimizer, grad_scaler, clip_grads, mutils):
        module.torch = _TorchProxy(f"torch<cpu:{module.__name__}>", factories)
    wrapped_clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped_clip
    moptimizer.clip_grad_by_total_norm_fp32 = wrapped_clip  # imported by name there
    for cls in (distrib_optimizer.DistributedOptimizer, moptimizer.Float16OptimizerWithFloat16Params):
        cls.__init__ = _with_cuda_type_names(cls.__init__)


def _gloo_entry(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    """Body of one spawned process: gloo group, CPU compat, then `fn(rank, world_size, *args)`."""
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    install_cpu_compat()
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def spawn_gloo(fn, world_size: int, *args) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes joined by a gloo group.

    For tests and small tools: each child calls `install_cpu_compat()` and
    `init_process_group("gloo")` before `fn`; `fn` then initialises megatron's `parallel_state`
    with the layout it wants. `fn` must be importable (module level). An exception in any child
    re-raises here (torch.multiprocessing.spawn).
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_entry, args=(world_size, port, fn, args), nprocs=world_size, join=True)
