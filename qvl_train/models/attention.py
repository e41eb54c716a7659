"""Core attention for packed (varlen) sequences: the `core_attention` submodule of our specs.

megatron-core's local `DotProductAttention` asserts `packed_seq_params is None`, and TE's
attention is GPU-only, so packing needs our own core attention. `VarlenAttention` has megatron's
core-attention signature, so `SelfAttention` (qkv projection, RoPE, output projection, TP) stays
megatron's and only the score/softmax/value step is ours.

Inputs are `[s, b, heads, head_dim]` (heads = this TP rank's heads; k/v carry this rank's query
groups). With `packed_seq_params`, `b == 1` and `cu_seqlens_q` (int32, `[n+1]`) gives the sample
boundaries: tokens attend only within their own segment (causal or bidirectional), and slots past
`cu_seqlens_q[-1]` (the padding tail of a `PackedBatch`) get zeros. No `L × L` mask is ever built
for the whole pack.

Backends (`model.attention_backend`):
* ``sdpa_loop`` — one `scaled_dot_product_attention` per segment. Exact, no extra memory, and the
  fastest CPU path (PyTorch's `varlen_attn` is CUDA-only, eager FlexAttention materialises scores).
* ``flex`` — FlexAttention with a document(+causal) `BlockMask`; one kernel for the whole pack,
  compiled on CUDA (eager FlexAttention is a reference path that materialises the scores).
* ``varlen`` — PyTorch's own flash varlen kernel (`torch.nn.attention.varlen.varlen_attn`, CUDA
  only, in the PyTorch versions that have it): cu_seqlens straight into the kernel, no mask at all.
* ``flash_attn`` — flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16; the `flash-attn` package is a
  GPU extra, used only where it imports): cu_seqlens into the kernel, GQA without repeating k/v.
* ``te`` — Transformer Engine's `DotProductAttention` in its "thd" (packed) format with a
  padding(+causal) mask: TE picks its fused cuDNN or flash kernel (CUDA, fp16/bf16; TE only where it
  imports).
* ``auto`` — on CUDA ``te`` where Transformer Engine is installed, else ``flash_attn`` where that is,
  else ``varlen`` where PyTorch has it, else ``flex``; ``sdpa_loop`` on CPU.

Context parallelism (`parallel.cp`): packed params carrying a `context_split` (a
`ContextPackedSeqParams`) route every backend to `parallel/context.py`'s `context_attention`: this
rank's zigzag rows attend to the all-gathered keys of their own sample under the document mask.
The ``te`` backend in fp16/bf16 hands them to Transformer Engine's own context-parallel attention
instead (`context_te`: a ring exchange of K/V chunks overlapped with the attention of the chunk in
hand, `cp_comm_type="p2p"`, so no rank holds every key at once); TE's "thd" CP layout is the zigzag
split's: each sample padded to a multiple of 2·cp, rank r holding its chunks r and 2·cp-1-r back to back.

megatron calls core attention with `qkv_format="sbhd"` packed params from our model (see
`rope.py` for why not "thd"); a "thd" call (`[t, heads, d]`, batch squeezed) is accepted too.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from qvl_train.parallel.context import ZigzagSplit, context_attention

__all__ = [
    "VarlenAttention", "varlen_sdpa", "varlen_flex", "varlen_torch", "varlen_flash", "varlen_te", "context_te",
    "resolve_backend", "BACKENDS",
]

BACKENDS = ("auto", "sdpa_loop", "flex", "varlen", "flash_attn", "te")


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    """PyTorch's `varlen_attn` and its keyword names, or None where this PyTorch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.lru_cache(maxsize=None)
def _flash_attn():
    """flash-attn's `flash_attn_varlen_func`, or None where the package is not installed (or does not import)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a build for another CUDA/torch that fails to load
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _te_attention():
    """Transformer Engine's `DotProductAttention` class, or None where TE is not installed."""
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    try:
        from transformer_engine.pytorch import DotProductAttention
    except Exception:  # a TE build that does not load beside this torch/CUDA
        return None
    return DotProductAttention


def resolve_backend(backend: str) -> str:
    """`auto` → `varlen` (else `flex`) with CUDA, `sdpa_loop` on CPU; an unusable explicit choice is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        if not torch.cuda.is_available():
            return "sdpa_loop"
        if _te_attention() is not None:
            return "te"
        if _flash_attn() is not None:
            return "flash_attn"
        return "varlen" if _torch_varlen() is not None else "flex"
    if backend == "te" and (_te_attention() is None or not torch.cuda.is_available()):
        raise ValueError(
            "model.attention_backend=te needs CUDA and Transformer Engine (pip install transformer-engine[pytorch]; "
            f"cuda={torch.cuda.is_available()}); use auto, flash_attn, varlen, flex or sdpa_loop"
        )
    if backend == "flash_attn" and (_flash_attn() is None or not torch.cuda.is_available()):
        raise ValueError(
            "model.attention_backend=flash_attn needs CUDA and the flash-attn package (pip install flash-attn "
            f"--no-build-isolation; cuda={torch.cuda.is_available()}); use auto, varlen, flex or sdpa_loop"
        )
    if backend == "varlen" and (_torch_varlen() is None or not torch.cuda.is_available()):
        raise ValueError(
            "model.attention_backend=varlen needs CUDA and a PyTorch with torch.nn.attention.varlen "
            f"(this is torch {torch.__version__}, cuda={torch.cuda.is_available()}); use auto, flex or sdpa_loop"
        )
    return backend


def _expand_kv(t_hsd: torch.Tensor, rep: int) -> torch.Tensor:
    """GQA: repeat each kv head for the `rep` query heads of its group (q heads are group-major)."""
    return t_hsd if rep == 1 else t_hsd.repeat_interleave(rep, dim=0)


def varlen_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """q `[t, hq, d]`, k/v `[t, hkv, d]` → `[t, hq, d]`, attention within each cu_seqlens segment."""
    out = q.new_zeros(q.shape)
    rep = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        if s1 <= s0:
            continue
        qs = q[s0:s1].transpose(0, 1)  # [hq, n, d]
        ks = _expand_kv(k[s0:s1].transpose(0, 1), rep)
        vs = _expand_kv(v[s0:s1].transpose(0, 1), rep)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        out[s0:s1] = o.transpose(0, 1)
    return out


def varlen_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Same contract as `varlen_sdpa`, one FlexAttention call with a document mask.

    Tokens past `cu_seqlens[-1]` get document id -1, which matches nothing real; their rows are
    zeroed afterwards (a fully masked row is undefined in any softmax).
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t = q.shape[0]
    total = int(cu_seqlens[-1])
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc = torch.full((t,), -1, dtype=torch.long, device=q.device)
    doc[:total] = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths)

    def mask_mod(b, h, qi, ki):
        same = (doc[qi] == doc[ki]) & (doc[qi] >= 0)
        return same & (qi >= ki) if causal else same

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device=q.device)
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, t, d]
    kernel = _compiled_flex() if q.is_cuda else flex_attention
    o = kernel(qb, kb, vb, block_mask=block_mask, scale=scale, enable_gqa=kb.shape[1] != qb.shape[1])
    out = o.squeeze(0).transpose(0, 1)
    if total < t:
        out = torch.cat([out[:total], out.new_zeros((t - total,) + tuple(out.shape[1:]))])
    return out


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def varlen_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Same contract as `varlen_sdpa`, through PyTorch's flash varlen kernel (CUDA, fp16/bf16; fp32
    inputs, e.g. a parity check, go through the exact per-sample SDPA loop)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return varlen_sdpa(q, k, v, cu_seqlens, causal, scale)
    found = _torch_varlen()
    if found is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen; use attention_backend=flex")
    varlen_attn, params = found
    t = q.shape[0]
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    lengths = cu[1:] - cu[:-1]
    total, max_len = int(cu[-1]), int(lengths.max())
    kwargs = {"scale": scale}
    if "is_causal" in params:
        kwargs["is_causal"] = causal
    elif causal:
        kwargs["window_size"] = (-1, 0)
    rep = q.shape[1] // k.shape[1]
    if rep > 1 and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = varlen_attn(q[:total], k[:total], v[:total], cu, cu, max_len, max_len, **kwargs)
    if total < t:
        out = torch.cat([out, out.new_zeros((t - total,) + tuple(out.shape[1:]))])
    return out


def varlen_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Same contract as `varlen_sdpa`, through flash-attn's varlen kernel (fp16/bf16; fp32 inputs go
    through the exact per-sample SDPA loop, as in `varlen_torch`)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return varlen_sdpa(q, k, v, cu_seqlens, causal, scale)
    flash = _flash_attn()
    if flash is None:
        raise RuntimeError("flash-attn is not installed; use attention_backend=auto")
    t = q.shape[0]
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    total, max_len = int(cu[-1]), int((cu[1:] - cu[:-1]).max())
    out = flash(q[:total], k[:total], v[:total], cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=causal)
    if total < t:
        out = torch.cat([out, out.new_zeros((t - total,) + tuple(out.shape[1:]))])
    return out


def varlen_te(
    te_attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float
) -> torch.Tensor:
    """Same contract as `varlen_sdpa` (the scale is the one `te_attention` was built with), through
    Transformer Engine's attention on the unpadded rows in "thd" format (fp32 inputs take the exact loop)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return varlen_sdpa(q, k, v, cu_seqlens, causal, scale)
    t, heads, dim = q.shape
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    total, max_len = int(cu[-1]), int((cu[1:] - cu[:-1]).max())
    out = te_attention(
        q[:total], k[:total], v[:total], qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
        max_seqlen_q=max_len, max_seqlen_kv=max_len, attn_mask_type="padding_causal" if causal else "padding",
    ).view(total, heads, dim)
    if total < t:
        out = torch.cat([out, out.new_zeros((t - total, heads, dim))])
    return out


@functools.lru_cache(maxsize=None)
def _cp_stream():
    """The side stream TE's context-parallel attention overlaps its K/V exchange on (one per process)."""
    return torch.cuda.Stream() if torch.cuda.is_available() else None


def context_te(te_attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: ZigzagSplit, causal: bool,
               comm_type: str = "p2p") -> Optional[torch.Tensor]:
    """`parallel.cp` through Transformer Engine's context-parallel attention: q/k/v `[S, heads, d]` are this
    rank's zigzag rows (`split`) → `[S, hq, d]`, or None for fp32 inputs (TE's fused kernels take fp16/bf16;
    the caller then takes the exact all-gather path).

    TE is told the CP group once per group, and per call the *global* sample bounds: `cu_seqlens_*` with
    the true lengths n_i (keys past them are never attended) and `cu_seqlens_*_padded` with the padded
    lengths 2·cp·c_i, of which this rank holds the 2·c_i rows `split.samples` places back to back;
    rows past the last sample (the tensor-parallel multiple) get zeros, as in every backend."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if getattr(te_attention, "qvl_cp_group", None) is not split.group:
        te_attention.set_context_parallel_group(
            split.group, dist.get_process_group_ranks(split.group), _cp_stream(), comm_type
        )
        te_attention.qvl_cp_group = split.group
    t, heads, dim = q.shape
    true_len = [n for _, _, n in split.samples]
    padded = [2 * c * split.cp for _, c, _ in split.samples]
    cu, cu_padded = (torch.tensor([0, *lengths], dtype=torch.int32, device=q.device).cumsum(0, dtype=torch.int32)
                     for lengths in (true_len, padded))
    local = sum(2 * c for _, c, _ in split.samples)
    out = te_attention(
        q[:local], k[:local], v[:local], qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded, max_seqlen_q=max(padded, default=0),
        max_seqlen_kv=max(padded, default=0), attn_mask_type="padding_causal" if causal else "padding",
    ).view(local, heads, dim)
    return torch.cat([out, out.new_zeros((t - local, heads, dim))]) if local < t else out


_KERNELS = {"sdpa_loop": varlen_sdpa, "flex": varlen_flex, "varlen": varlen_torch, "flash_attn": varlen_flash}


class VarlenAttention(MegatronModule):
    """Packed-sequence core attention (see module docstring); a drop-in for `DotProductAttention`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        backend: str = "auto",
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise NotImplementedError("VarlenAttention has no attention dropout; set attention_dropout=0")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.causal = attn_mask_type == AttnMaskType.causal
        self.backend = resolve_backend(backend)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        tp = config.tensor_model_parallel_size
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.kernel = _KERNELS.get(self.backend)
        self.context_kernel = None  # a backend's own context-parallel attention (TE's), else the all-gather path
        if self.backend == "te":  # parameter-free; kept out of the module tree so checkpoints stay TE-free
            te_attention = _te_attention()(
                num_attention_heads=self.heads_per_partition, kv_channels=head_dim,
                num_gqa_groups=self.groups_per_partition, attention_dropout=0.0, qkv_format="thd",
                attn_mask_type="padding_causal" if self.causal else "padding", softmax_scale=self.softmax_scale,
            )
            self.kernel = functools.partial(varlen_te, te_attention)
            self.context_kernel = functools.partial(context_te, te_attention, comm_type=cp_comm_type or "p2p")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """q/k/v `[s, b, heads, d]` (or `[t, heads, d]` for "thd") → `[s, b, heads·d]`."""
        if attention_bias is not None:
            raise NotImplementedError("VarlenAttention does not take an attention_bias")
        if attention_mask is not None:
            raise NotImplementedError("VarlenAttention derives its mask from packed_seq_params; pass attention_mask=None")
        causal = self.causal if attn_mask_type is None else attn_mask_type == AttnMaskType.causal
        fn = self.kernel
        if query.dim() == 3:  # "thd": batch already squeezed by megatron
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        s, b = query.shape[:2]
        if packed_seq_params is not None:
            if b != 1:
                raise ValueError(f"packed sequences need micro-batch 1 (one packed row), got b={b}")
            cu = packed_seq_params.cu_seqlens_q
        else:
            cu = torch.tensor([0, s], dtype=torch.int32)
        split = getattr(packed_seq_params, "context_split", None)
        if split is not None:  # parallel.cp: this rank's zigzag rows; TE's CP attention, else keys all-gathered
            q, k, v = query[:, 0], key[:, 0], value[:, 0]
            out = self.context_kernel(q, k, v, split, causal) if self.context_kernel is not None else None
            if out is None:
                out = context_attention(q, k, v, split, causal, self.softmax_scale)
            return out.reshape(s, b, -1)
        outs = [fn(query[:, i], key[:, i], value[:, i], cu, causal, self.softmax_scale) for i in range(b)]
        return torch.stack(outs, dim=1).reshape(s, b, -1)
