"""FP8 training without Transformer Engine (`train.fp8_backend=torch`) and the FP8 helpers both backends share.

The math. An FP8 GEMM multiplies two tensors that were scaled into the FP8 range and cast:

    scale = FP8_MAX / amax(x)          (amax over the whole tensor, or over each row: "rowwise")
    x_fp8 = cast(clamp(x · scale, ±FP8_MAX))           e4m3: max 448, 3 mantissa bits
    y     = (x_fp8 @ w_fp8ᵀ) · (1/scale_x) · (1/scale_w)

"Current" scaling: the amax is the tensor's own, measured right before the cast (no amax history, so
no state to checkpoint and nothing to warm up; one extra reduction per operand). The forward runs in
e4m3 with row-wise scales (one per token row of the activation, one per output channel of the
weight: an outlier token does not crush the precision of the others); the backward quantises the
output gradient to e5m2 (`train.fp8=hybrid`: 2 mantissa bits, range 57344 — gradients span more
decades than activations) or e4m3 (`train.fp8=e4m3`) with one scale per tensor, since both backward
GEMMs contract over a dimension that row-wise scales would run along. A zero tensor gets scale 1
(no division by zero); values past FP8_MAX after scaling saturate (e4m3fn has no infinity: an
overflowing cast would give NaN); a non-finite amax propagates NaN, so the step is skipped by the
engine's non-finite check.

On CUDA (compute capability ≥ 8.9) the product is `torch._scaled_mm`, which needs every dimension
of both operands to be a multiple of 16: the token dimension (and, for odd model widths, the others)
is zero-padded inside the op and the output sliced back, so no caller has to pad (zero rows and
columns add nothing to the contraction). Elsewhere (the CPU) the same quantised operands are
dequantised and multiplied in fp32, which is what the FP8 tensor core computes up to its fp32
accumulation order: the scaling logic, the backward and the training loss are tested here.

Where it runs: the local spec's `ColumnParallelLinear` / `RowParallelLinear` are
`Fp8ColumnParallelLinear` / `Fp8RowParallelLinear`, which behave exactly like megatron's unless their
`TransformerConfig` carries a recipe (`TorchFp8Config.torch_fp8`, set by the engine from
`train.fp8*`). That covers the attention qkv / proj and MLP fc1 / fc2 of every ViT block and LLM
layer, including those our own per-layer loops run (window attention, DeepStack), and the MoE
experts. Tensor parallelism: megatron's own differentiable regions do the communication
(the sequence-parallel all-gather with its reduce-scatter backward, the input-gradient all-reduce),
so TP=2 computes what TP=1 computes, up to the per-shard scales of row-parallel weights.

Stays in bf16, by choice: the token embedding and the output layer (vocab-sized, the logits feed a
softmax whose tail FP8 rounding would distort; they are also not ColumnParallelLinears of the spec),
the MoE router (its logits decide the routing; megatron computes them in fp32), the norms, the ViT
patch embedding (a convolution over raw pixels, ~0.1 % of the FLOPs) and the mergers / projector
(small, and they sit between two towers' numerics). The first and last decoder layers run in FP8
like the others (megatron's `first_last_layers_bf16` is off by default; with Transformer Engine it
can be set through the model config).

torchao's float8 training was considered: it swaps `nn.Linear` modules, not megatron's TP linears
(whose forward owns the sequence-parallel communication), and its DTensor path assumes torch's own
TP; wrapping megatron's GEMM here keeps megatron's communication and checkpoint keys unchanged.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = [
    "FP8_MAX", "GEMM_MULTIPLE", "Fp8Recipe", "TorchFp8Config", "quantize", "fp8_linear", "Fp8ColumnParallelLinear",
    "Fp8RowParallelLinear", "fp8_context", "fp8_row_multiple", "gpu_fp8_capable", "MIN_CAPABILITY",
]

log = logging.getLogger(__name__)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: float(torch.finfo(E4M3).max), E5M2: float(torch.finfo(E5M2).max)}
GEMM_MULTIPLE = 16
"""FP8 tensor-core GEMMs (`torch._scaled_mm`, Transformer Engine) need operand dimensions in multiples of 16."""
MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9), Hopper (9.0) and later; an A100 (8.0) has none."""


@dataclass(frozen=True)
class Fp8Recipe:
    """What the torch backend does: the gradient format and how activations / weights are scaled."""

    grad_format: str = "e5m2"
    """e5m2 (`train.fp8=hybrid`) or e4m3 (`train.fp8=e4m3`): the dtype of output gradients."""
    scaling: str = "rowwise"
    """rowwise (one scale per activation row and per weight output channel, forward) or tensor (one per tensor)."""

    def __post_init__(self) -> None:
        if self.grad_format not in ("e5m2", "e4m3"):
            raise ValueError(f"grad_format={self.grad_format!r}; valid: e5m2, e4m3")
        if self.scaling not in ("rowwise", "tensor"):
            raise ValueError(f"scaling={self.scaling!r}; valid: rowwise, tensor")

    @classmethod
    def from_mode(cls, mode: str, scaling: str = "rowwise") -> "Fp8Recipe":
        """`train.fp8` ("hybrid" / "e4m3") and `train.fp8_scaling` → the recipe."""
        if mode not in ("hybrid", "e4m3"):
            raise ValueError(f"train.fp8={mode!r} has no FP8 recipe; valid: hybrid, e4m3")
        return cls(grad_format="e5m2" if mode == "hybrid" else "e4m3", scaling=scaling)

    @property
    def grad_dtype(self) -> torch.dtype:
        return E5M2 if self.grad_format == "e5m2" else E4M3


@dataclass
class TorchFp8Config(TransformerConfig):
    """megatron's `TransformerConfig` plus the torch backend's recipe (a subclass, so `dataclasses.replace`
    and megatron's copies keep it). `fp8` itself stays None: megatron would otherwise ask for Transformer Engine."""

    torch_fp8: Optional[Fp8Recipe] = None


def gpu_fp8_capable() -> tuple[bool, str]:
    """(whether this process's GPU has FP8 tensor cores, a short description for messages)."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    return (major, minor) >= MIN_CAPABILITY, f"{name} (compute capability {major}.{minor})"


# --------------------------------------------------------------------------- scaling
def quantize(x: torch.Tensor, dtype: torch.dtype, rowwise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` → (x in `dtype`, the inverse scale): `x ≈ q.float() * inv_scale`.

    `rowwise`: one scale per row (shape `[rows, 1]`), else one for the tensor (a 0-d tensor). A zero
    amax gives scale 1; scaled values saturate at ±FP8_MAX; a non-finite amax yields NaN (not a silently
    clipped value)."""
    fmax = FP8_MAX[dtype]
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True) if rowwise else x32.abs().amax()
    scale = torch.where(amax > 0, fmax / amax.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(amax))
    q = (x32 * scale).clamp(-fmax, fmax)
    q = torch.where(torch.isfinite(amax), q, torch.full_like(q, float("nan")))
    return q.to(dtype), scale.reciprocal()


def _pad_to(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    pr, pc = rows - t.shape[0], cols - t.shape[1]
    if not pr and not pc:
        return t
    if t.dtype in (E4M3, E5M2):  # pad does not take fp8 tensors: pad the raw bytes (fp8 zero is 0x00)
        return torch.nn.functional.pad(t.view(torch.uint8), (0, pc, 0, pr)).view(t.dtype)
    return torch.nn.functional.pad(t, (0, pc, 0, pr), value=value)


def _round_up(n: int, m: int = GEMM_MULTIPLE) -> int:
    return -(-n // m) * m


def _scaled_gemm(a_q, a_inv, b_q, b_inv, out_dtype: torch.dtype) -> torch.Tensor:
    """`(a · a_inv) @ (b · b_inv)ᵀ` for quantised `a [M, K]`, `b [N, K]`; scales `[M,1]`/`[N,1]` or 0-d."""
    M, K = a_q.shape
    N = b_q.shape[0]
    if a_q.is_cuda:
        Mp, Np, Kp = _round_up(M), _round_up(N), _round_up(K)
        a_p, b_p = _pad_to(a_q, Mp, Kp), _pad_to(b_q, Np, Kp)
        sa = _pad_to(a_inv.float(), Mp, 1, 1.0) if a_inv.dim() else a_inv.float()
        sb = _pad_to(b_inv.float(), Np, 1, 1.0).t() if b_inv.dim() else b_inv.float()
        out = torch._scaled_mm(a_p, b_p.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)  # b_p.t(): column-major
        return out[:M, :N]
    # emulation: the dequantised FP8 values multiplied in fp32
    return ((a_q.float() * a_inv) @ (b_q.float() * b_inv).t()).to(out_dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x @ wᵀ with FP8 operands in all three GEMMs (forward, input gradient, weight gradient)."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
        ctx.save_for_backward(x2d, weight)
        ctx.recipe = recipe
        rowwise = recipe.scaling == "rowwise"
        xq, xs = quantize(x2d, E4M3, rowwise)
        wq, ws = quantize(weight, E4M3, rowwise)
        return _scaled_gemm(xq, xs, wq, ws, x2d.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        gdt = ctx.recipe.grad_dtype
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # [M, N] @ [N, K]: b is wᵀ, rows over K
            gq, gs = quantize(grad_out, gdt)
            wq, ws = quantize(weight.t().contiguous(), E4M3)
            grad_x = _scaled_gemm(gq, gs, wq, ws, x2d.dtype)
        if ctx.needs_input_grad[1]:  # [N, M] @ [M, K]: contraction over the (padded) token dim
            gq, gs = quantize(grad_out.t().contiguous(), gdt)
            xq, xs = quantize(x2d.t().contiguous(), E4M3)
            grad_w = _scaled_gemm(gq, gs, xq, xs, weight.dtype)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """`x @ weight.T` over the last dim of `x` (any leading shape) with FP8 GEMMs; an empty `x` takes the plain path."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:  # an expert no token was routed to
        return torch.matmul(x, weight.t())
    return _Fp8Linear.apply(x2d, weight, recipe).reshape(*lead, weight.shape[0])


def torch_fp8_recipe(config) -> Optional[Fp8Recipe]:
    return getattr(config, "torch_fp8", None)


class _Fp8Gemm:
    """Replaces megatron's GEMM (`_forward_impl`) of a Column/RowParallelLinear by `fp8_linear` when the
    layer's config carries a torch FP8 recipe; the communication megatron's fused function does inside its
    autograd function is done by megatron's differentiable regions around ours."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        recipe = torch_fp8_recipe(self.config)
        if recipe is None:
            return super()._forward_impl(input, weight, *args, **kwargs)
        group = kwargs["tp_group"]
        if kwargs.get("sequence_parallel"):  # all-gather the rows; backward: reduce-scatter of the input gradient
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
        elif kwargs.get("allreduce_dgrad"):  # column-parallel without SP: all-reduce of the input gradient
            input = copy_to_tensor_model_parallel_region(input, group=group)
        out = fp8_linear(input, weight, recipe)
        bias = kwargs.get("bias")
        return out + bias if bias is not None else out


class Fp8ColumnParallelLinear(_Fp8Gemm, ColumnParallelLinear):
    """megatron's `ColumnParallelLinear` with the torch FP8 GEMM (same parameters and checkpoint keys)."""


class Fp8RowParallelLinear(_Fp8Gemm, RowParallelLinear):
    """megatron's `RowParallelLinear` with the torch FP8 GEMM (same parameters and checkpoint keys)."""


# --------------------------------------------------------------------------- Transformer Engine side
def fp8_context(config):
    """The FP8 region megatron's `TransformerBlock` opens around each layer, for the layers our own loops run
    (`common.run_layer`): Transformer Engine's autocast when `config.fp8` is set, else nothing (the torch
    backend's linears need no context)."""
    if not getattr(config, "fp8", None):
        return nullcontext()
    from megatron.core.fp8_utils import get_fp8_context  # noqa: PLC0415 (only with TE FP8)

    return get_fp8_context(config)


def fp8_row_multiple(config) -> int:
    """Rows a tower must pad its `[s, 1, h]` input to under Transformer Engine FP8 (its GEMMs need 16); the torch
    backend pads inside its GEMM, so 1 there."""
    return GEMM_MULTIPLE if getattr(config, "fp8", None) else 1
