"""Gated DeltaNet (Qwen3.5 / Qwen3-Next linear attention) on packed sequences, for megatron-core.

The gated delta rule keeps, per value head, a state S [Dk, Dv] that each token t updates as

    S ← exp(g_t) · S                       (gated decay, g_t ≤ 0)
    S ← S + β_t · k_t (v_t − S^T k_t)^T     (delta rule: write the part of v_t that S does not predict)
    o_t = S^T q_t                           (q, k L2-normalised, q scaled by 1/sqrt(Dk))

`recurrent_gated_delta_rule` runs that loop token by token (the definition; slow). The chunked form
`chunk_gated_delta_rule` (chunks of 64, the WY/UT representation of DeltaNet, Yang et al. 2024)
turns the updates inside a chunk into triangular solves and matmuls and keeps a Python loop only
over chunks. Both take *packed* (varlen) inputs: all samples concatenated into one row, [1, T, H, D]
or [T, H, D], with int32 `cu_seqlens` boundaries, and the state restarts (from zero or that sample's
`initial_state`) at every boundary. For the chunked form each sample is padded *separately* to a
multiple of the chunk size (padding: k = v = 0, β = 0, g = 0, which leaves the state unchanged),
so no chunk ever straddles two samples; the waste is < 64 tokens per sample. Value heads may be
a multiple of key heads (grouped: key head h serves value heads h·r … h·r+r−1, q/k repeated).

`gated_delta_rule` dispatches: flash-linear-attention's Triton kernel
(`fla.ops.gated_delta_rule.chunk_gated_delta_rule`, with `cu_seqlens`; `pip install -e .[fla]`)
when `fla` imports and the tensors are on CUDA, else the torch chunked form (CPU, tests). All
forms compute in fp32 (fp64 inputs in fp64) and return the input dtype, as transformers' fallback does;
autograd runs through the torch forms (no custom backward). One exception to fp32: the chunk form takes
the log-decay prefix sums inside a chunk, and their differences, in fp64. With the released decays (A_log
up to log 16, g ≈ −20 per token) a chunk's sum reaches ~−1000, where an fp32 difference of two sums keeps
only ~1e-4 absolute, which put the gradients of A_log / dt_bias ~1e-4 (relative) off an fp64 reference and
made tp=2 differ from tp=1 by up to 7e-4 (transformers' `torch_chunk_gated_delta_rule` has the same fp32
cumsum); with the fp64 sums they are within ~2e-7.

Numerics follow transformers 5.25 `models/qwen3_5/modeling_qwen3_5.py` (`torch_chunk_gated_delta_rule`,
`torch_recurrent_gated_delta_rule`, `l2norm` with eps 1e-6 inside an rsqrt, `Qwen3_5RMSNormGated`,
`Qwen3_5GatedDeltaNet`); the TP layout of the projections follows the idea of megatron-core 0.16.1
`megatron/core/ssm/gated_delta_net.py`, which needs fla and refuses packed sequences.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

CHUNK_SIZE = 64
L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(|x|² + eps) over the last dim (fla's and transformers' q/k normalisation)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _flatten(q, k, v, g, beta, cu_seqlens):
    """Inputs as [T, H, D] / [T, H] plus int boundaries; a [B, T, ...] batch without cu_seqlens is B samples."""
    if q.dim() not in (3, 4) or k.shape != q.shape or v.dim() != q.dim() or g.shape != beta.shape:
        raise ValueError(f"gated delta rule wants q, k [B, T, Hk, Dk] (or [T, Hk, Dk]), v [.., Hv, Dv], g/beta [.., Hv]; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
                         f"beta {tuple(beta.shape)}")
    batched = q.dim() == 4
    if batched:
        b, t = q.shape[:2]
        if cu_seqlens is not None and b != 1:
            raise ValueError(f"packed inputs (cu_seqlens given) must have batch size 1, got {b}")
        q, k, v = (x.reshape(b * t, *x.shape[2:]) for x in (q, k, v))
        g, beta = (x.reshape(b * t, x.shape[-1]) for x in (g, beta))
        if cu_seqlens is None:
            cu_seqlens = torch.arange(b + 1) * t
    elif cu_seqlens is None:
        cu_seqlens = torch.tensor([0, q.shape[0]])
    hk, hv = q.shape[1], v.shape[1]
    if hv % hk != 0:
        raise ValueError(f"value heads ({hv}) must be a multiple of key heads ({hk})")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(b1 < b0 for b0, b1 in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} must rise from 0 to the packed length {q.shape[0]}")
    return q, k, v, g, beta, bounds, batched


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel):
    """fp32 [H, T, D] tensors with q/k grouped-repeated, normalised and q scaled."""
    hk, hv = q.shape[1], v.shape[1]
    if hv != hk:
        q, k = (x.repeat_interleave(hv // hk, dim=1) for x in (q, k))
    q, k, v, g, beta = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    return q, k, v, g, beta


def _initial(initial_state, n, h, dk, dv, like):
    if initial_state is None:
        return [like.new_zeros(h, dk, dv)] * n
    if tuple(initial_state.shape) != (n, h, dk, dv):
        raise ValueError(f"initial_state must be [num_samples={n}, {h}, {dk}, {dv}], got {tuple(initial_state.shape)}")
    return list(initial_state.float().unbind(0))


def _finish(out, final, dtype, batched, shape_v, output_final_state):
    out = out.to(dtype).reshape(shape_v) if batched else out.to(dtype)
    return out, (torch.stack(final) if output_final_state else None)


def recurrent_gated_delta_rule(q, k, v, g, beta, cu_seqlens=None, initial_state=None, output_final_state=False,
                               scale=None, use_qk_l2norm_in_kernel=True):
    """Token-by-token gated delta rule on packed inputs (the reference definition; O(T) Python steps).

    q, k [1, T, Hk, Dk] or [T, Hk, Dk]; v [.., T, Hv, Dv]; g (log decay, ≤ 0), beta [.., T, Hv];
    cu_seqlens [n+1] sample boundaries (None: one sample per batch row). initial_state [n, Hv, Dk, Dv]
    or None. Returns (out shaped like v, final state [n, Hv, Dk, Dv] or None).
    """
    shape_v, dtype = v.shape, v.dtype
    q, k, v, g, beta, bounds, batched = _flatten(q, k, v, g, beta, cu_seqlens)
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    states = _initial(initial_state, len(bounds) - 1, v.shape[1], q.shape[-1], v.shape[-1], v)
    outs, final = [], []
    for n, (s0, s1) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = states[n]                                           # [H, Dk, Dv]
        for t in range(s0, s1):
            state = state * g[t].exp()[:, None, None]
            pred = torch.einsum("hkv,hk->hv", state, k[t])
            state = state + k[t][:, :, None] * ((v[t] - pred) * beta[t][:, None])[:, None, :]
            outs.append(torch.einsum("hkv,hk->hv", state, q[t]))
        final.append(state)
    out = torch.stack(outs) if outs else v.new_zeros(v.shape)
    return _finish(out, final, dtype, batched, shape_v, output_final_state)


def _chunk_index(bounds: list[int], chunk: int, device) -> tuple[torch.Tensor, list[int], list[int]]:
    """Gather index into the padded per-sample chunk layout (T = a zero row) and each sample's first/last chunk."""
    total = bounds[-1]
    idx, first, ends = [], [], []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        n_chunks = max(1, -(-(s1 - s0) // chunk))
        first.append(len(idx) // chunk)
        idx.extend(range(s0, s1))
        idx.extend([total] * (n_chunks * chunk - (s1 - s0)))
        ends.append(len(idx) // chunk - 1)
    return torch.tensor(idx, dtype=torch.long, device=device), first, ends


def chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=None, initial_state=None, output_final_state=False,
                           scale=None, use_qk_l2norm_in_kernel=True, chunk_size: int = CHUNK_SIZE):
    """Chunked gated delta rule on packed inputs; same arguments and results as `recurrent_gated_delta_rule`.

    Each sample is padded on its own to a multiple of `chunk_size`; a Python loop runs over the
    chunks of all samples, restarting the state at each sample's first chunk.
    """
    shape_v, dtype = v.shape, v.dtype
    q, k, v, g, beta, bounds, batched = _flatten(q, k, v, g, beta, cu_seqlens)
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    n_samples, h, dk, dv = len(bounds) - 1, v.shape[1], q.shape[-1], v.shape[-1]
    states = _initial(initial_state, n_samples, h, dk, dv, v)
    idx, first, ends = _chunk_index(bounds, chunk_size, v.device)
    c = chunk_size

    def chunked(x):  # [T, H, *] -> [H, N, C, *] with a zero pad row gathered at index T
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])[idx]
        return x.reshape(-1, c, *x.shape[1:]).movedim(2, 0)

    q, k, v, g, beta = (chunked(x) for x in (q, k, v, g, beta))    # q/k/v [H, N, C, D]; g/beta [H, N, C]
    log_decay64 = g.double().cumsum(-1)                             # decay from chunk start to i (inclusive), fp64:
    # its differences below would lose ~1e-4 in fp32 once a chunk's sum reaches ~-1000 (module docstring)
    log_decay = log_decay64.to(g.dtype)
    causal = torch.ones(c, c, dtype=torch.bool, device=v.device).tril()
    # decay between j and i inside a chunk (i ≥ j), masked before exp so no positive exponent overflows
    rel = (log_decay64[..., :, None] - log_decay64[..., None, :]).to(g.dtype).masked_fill(~causal, float("-inf")).exp()
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    # (I + strictly-lower(diag(β) K K^T ∘ rel)) W = …: the UT transform folding a chunk's delta updates
    system = (k_beta @ k.transpose(-1, -2)) * rel
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * log_decay.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * rel                          # intra-chunk scores, diagonal included
    q_read = q * log_decay.exp()[..., None]                         # q reading the state at the chunk start
    chunk_decay = log_decay[..., -1]                                # [H, N]
    k_write = k * (log_decay64[..., -1:] - log_decay64).to(g.dtype).exp()[..., None]

    starts = dict(zip(first, range(n_samples)))
    ending = set(ends)
    outs, final, state = [], [], None
    for i in range(u.shape[1]):
        if i in starts:
            state = states[starts[i]]
        fresh = u[:, i] - w[:, i] @ state                           # the part of v the state does not predict
        outs.append(q_read[:, i] @ state + attn[:, i] @ fresh)
        state = state * chunk_decay[:, i].exp()[:, None, None] + k_write[:, i].transpose(-1, -2) @ fresh
        if i in ending:
            final.append(state)
    out = torch.stack(outs, dim=1).reshape(h, -1, dv)              # [H, padded T, Dv]
    keep = (idx < bounds[-1]).nonzero().squeeze(1)
    out = out[:, keep].transpose(0, 1)                              # back to [T, H, Dv] in packed order
    return _finish(out, final, dtype, batched, shape_v, output_final_state)


def _fla_kernel_for(q: torch.Tensor):
    """fla-core's `chunk_gated_delta_rule` when `q` is on CUDA and `fla` imports, else None."""
    if not q.is_cuda:
        return None
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except ImportError:
        return None
    return fla_chunk


def gated_delta_rule(q, k, v, g, beta, cu_seqlens=None, initial_state=None, output_final_state=False,
                     scale=None, use_qk_l2norm_in_kernel=True):
    """fla-core's Triton chunk kernel on CUDA when installed, else `chunk_gated_delta_rule` (same contract).

    fla-core 0.6.0 `fla/ops/gated_delta_rule/chunk.py` takes the same packed layout ([1, T, H, D] with
    `cu_seqlens`, int64), groups value heads over key heads the same way (value head j reads key head
    j // (Hv/Hk)), normalises q/k in the kernel (eps 1e-6) and scales q by 1/sqrt(Dk) by default.
    """
    fla_chunk = _fla_kernel_for(q)
    if fla_chunk is None:
        return chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens, initial_state, output_final_state, scale,
                                      use_qk_l2norm_in_kernel)
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v, g, beta = (x.unsqueeze(0) for x in (q, k, v, g, beta))
    if v.shape[2] % q.shape[2]:
        raise ValueError(f"value heads ({v.shape[2]}) must be a multiple of key heads ({q.shape[2]})")
    kw = {}
    if cu_seqlens is not None:
        cu_cpu = torch.as_tensor(cu_seqlens).to(device="cpu", dtype=torch.long)
        kw = {"cu_seqlens": cu_cpu.to(q.device), "cu_seqlens_cpu": cu_cpu}
    out, final = fla_chunk(*(x.contiguous() for x in (q, k, v)), g=g.float().contiguous(), beta=beta.contiguous(),
                           scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                           use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kw)
    return (out.squeeze(0) if squeeze else out), final


def gdn_spec_params(llm) -> dict:
    """`GatedDeltaNet`'s keyword arguments from an `LLMConfig` (for `ModuleSpec(module=GatedDeltaNet, params=...)`)."""
    return {"num_key_heads": llm.linear_num_key_heads, "num_value_heads": llm.linear_num_value_heads,
            "key_head_dim": llm.linear_key_head_dim, "value_head_dim": llm.linear_value_head_dim,
            "conv_kernel": llm.linear_conv_kernel_dim, "eps": llm.norm_eps}


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------

def sample_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each row's offset inside its sample ([total] long); rows past `cu_seqlens[-1]` form one more sample."""
    bounds = torch.as_tensor(cu_seqlens, dtype=torch.long).cpu()
    if int(bounds[-1]) < total:
        bounds = torch.cat([bounds, bounds.new_tensor([total])])
    lengths = bounds[1:] - bounds[:-1]
    starts = torch.repeat_interleave(bounds[:-1], lengths)
    return torch.arange(total) - starts


def packed_causal_conv1d(x_TC: torch.Tensor, weight_CK: torch.Tensor, pos_T: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv over time that never reaches back across a sample boundary.

    out[t, c] = Σ_j weight[c, K-1-j] · x[t-j, c] over the lags j ≤ pos[t] (the row's offset in its
    sample): the same as running `nn.Conv1d(groups=C, padding=K-1)` on each sample alone (HF's
    `causal_conv1d_fn`), as K shifted multiply-adds instead of one conv per sample.
    """
    kernel = weight_CK.shape[1]
    out = x_TC * weight_CK[:, kernel - 1]
    for lag in range(1, min(kernel, x_TC.shape[0])):
        shifted = F.pad(x_TC[:-lag], (0, 0, lag, 0)) * (pos_T >= lag).to(x_TC.dtype)[:, None]
        out = out + shifted * weight_CK[:, kernel - 1 - lag]
    return out


class GatedDeltaNet(MegatronModule):
    """Qwen3.5's Gated DeltaNet token mixer, a drop-in for `SelfAttention` inside megatron's `TransformerLayer`.

    forward(hidden_states [s, 1, h], attention_mask=None, packed_seq_params=...) → (out [s, 1, h], None):
    packed rows (b = 1) with `packed_seq_params.cu_seqlens_q`; rotary arguments are ignored (the
    layer has no positions: the causal conv and the recurrence order the tokens). Rows past the last
    boundary (a packed batch's padding tail) are run as one more sample and never touch real ones.

    Parameters and their layout (tp-independent, each TP rank holds whole key-head groups):
    * `in_proj.weight` [Hk·W, h], ColumnParallelLinear, rows grouped per key head h:
      [q_h (Dk), k_h (Dk), v_h (r·Dv), z_h (r·Dv), b_h (r), a_h (r)], W = 2·Dk + 2·r·Dv + 2·r, r = Hv/Hk.
      One GEMM and, under sequence parallelism, one all-gather for all four HF projections.
    * `conv_weight` [Hk·(2·Dk + r·Dv), K]: depthwise causal conv over the [q_h, k_h, v_h] channels, SiLU.
    * `A_log`, `dt_bias` [Hv] (the decay g = −exp(A_log)·softplus(a + dt_bias)), sharded with the heads;
      they and the conv get HF's init in `reset_fixed_parameters` (the same full values at every tp).
    * `norm_weight` [Dv]: the gated RMSNorm over each value head (RMSNorm(o)·w·SiLU(z)), replicated;
      its gradient is summed over TP ranks inside autograd (each rank sees only its heads).
    * `out_proj.weight` [h, Hv·Dv], RowParallelLinear (reduce-scatter under sequence parallelism).
    `hf_to_local` / `local_to_hf` convert one layer from/to HF's names.
    """

    def __init__(self, config: TransformerConfig, layer_number: int = 1, *, num_key_heads: int, num_value_heads: int,
                 key_head_dim: int, value_head_dim: int, conv_kernel: int = 4, eps: float | None = None,
                 pg_collection=None, **_ignored):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        if num_key_heads <= 0 or num_value_heads % num_key_heads:
            raise ValueError(f"Gated DeltaNet: linear_num_value_heads ({num_value_heads}) must be a positive multiple "
                             f"of linear_num_key_heads ({num_key_heads}); fix the model config")
        if num_key_heads % tp:
            raise ValueError(f"Gated DeltaNet: tensor parallel size {tp} must divide linear_num_key_heads "
                             f"({num_key_heads}) — each TP rank takes whole key-head groups; pick parallel.tp from "
                             f"the divisors of {num_key_heads}")
        self.layer_number = layer_number
        self.tp_group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        self.num_key_heads, self.num_value_heads = num_key_heads, num_value_heads
        self.key_head_dim, self.value_head_dim, self.conv_kernel = key_head_dim, value_head_dim, conv_kernel
        self.eps = config.layernorm_epsilon if eps is None else eps
        self.ratio = num_value_heads // num_key_heads
        self.local_key_heads = num_key_heads // tp
        dk, vr = key_head_dim, self.ratio * value_head_dim
        self.group_width = 2 * dk + 2 * vr + 2 * self.ratio
        self.conv_width = 2 * dk + vr
        self.in_proj = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, num_key_heads * self.group_width, config=config, init_method=config.init_method,
            bias=False, gather_output=False, skip_bias_add=True, tp_group=self.tp_group)
        self.out_proj = tensor_parallel.RowParallelLinear(
            num_value_heads * value_head_dim, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            tp_group=self.tp_group)
        self._rank = self.in_proj.tp_group.rank() if tp > 1 else 0
        shapes = {"conv_weight": (num_key_heads * self.conv_width // tp, conv_kernel),
                  "A_log": (num_value_heads // tp,), "dt_bias": (num_value_heads // tp,)}
        for name, shape in shapes.items():
            setattr(self, name, torch.nn.Parameter(torch.empty(shape, dtype=config.params_dtype)))
            tensor_parallel.set_tensor_model_parallel_attributes(getattr(self, name), is_parallel=True, dim=0, stride=1)
        self.norm_weight = torch.nn.Parameter(torch.ones(value_head_dim, dtype=config.params_dtype))
        self.reset_fixed_parameters()

    @torch.no_grad()
    def reset_fixed_parameters(self) -> None:
        """HF's init of the GDN-specific parameters (transformers 5.25 `Qwen3_5PreTrainedModel._init_weights`
        and `nn.Conv1d`'s default): dt_bias = 1, A_log = log U(0.01, 16), conv ~ U(±1/sqrt(K)).

        Drawn whole from a generator seeded by the layer number, then sliced to this rank's heads: the
        same values at every tp / pp. `models.init_weights` calls it after its generic pass (which would
        leave A_log = 1 and a conv of std-sized noise).
        """
        gen = torch.Generator().manual_seed(zlib.crc32(f"gated_deltanet/{self.layer_number}".encode()))
        hv, channels = self.num_value_heads, self.num_key_heads * self.conv_width
        bound = 1.0 / math.sqrt(self.conv_kernel)  # depthwise: fan_in = K
        conv = torch.empty(channels, self.conv_kernel).uniform_(-bound, bound, generator=gen)
        a_log = torch.empty(hv).uniform_(0.01, 16, generator=gen).log()
        heads = slice(self._rank * self.A_log.shape[0], (self._rank + 1) * self.A_log.shape[0])
        rows = slice(self._rank * self.conv_weight.shape[0], (self._rank + 1) * self.conv_weight.shape[0])
        self.conv_weight.copy_(conv[rows])
        self.A_log.copy_(a_log[heads])
        self.dt_bias.fill_(1.0)

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, **_ignored):
        if attention_mask is not None:
            raise NotImplementedError("GatedDeltaNet takes sample bounds from packed_seq_params; pass attention_mask=None")
        if inference_context is not None:
            raise NotImplementedError("GatedDeltaNet has no KV/state cache for inference; generate with the HF model")
        if getattr(packed_seq_params, "context_split", None) is not None:
            raise NotImplementedError("Gated DeltaNet layers do not support context parallelism (parallel.cp=1)")
        proj, _ = self.in_proj(hidden_states)                       # [s, b, Hk_local·W] (sequence gathered)
        s, b = proj.shape[:2]
        if b != 1:
            raise ValueError(f"GatedDeltaNet runs packed rows: micro-batch 1, got b={b}")
        cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else torch.tensor([0, s])
        hk, r, dk, dv = self.local_key_heads, self.ratio, self.key_head_dim, self.value_head_dim
        groups = proj[:, 0].reshape(s, hk, self.group_width)
        mixed, z, b_, a = groups.split([self.conv_width, r * dv, r, r], dim=-1)
        pos = sample_positions(cu, s).to(proj.device)
        mixed = F.silu(packed_causal_conv1d(mixed.reshape(s, -1), self.conv_weight, pos)).reshape(s, hk, -1)
        q, k, v = mixed.split([dk, dk, r * dv], dim=-1)
        v = v.reshape(s, hk * r, dv)
        beta = b_.reshape(s, hk * r).sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.reshape(s, hk * r).float() + self.dt_bias)
        bounds = torch.as_tensor(cu, dtype=torch.int32).cpu()
        if int(bounds[-1]) < s:
            bounds = torch.cat([bounds, bounds.new_tensor([s])])
        core, _ = gated_delta_rule(q, k, v, g, beta, cu_seqlens=bounds, use_qk_l2norm_in_kernel=True)
        core = self._gated_norm(core, z.reshape(s, hk * r, dv))
        out, bias = self.out_proj(core.reshape(s, 1, -1))
        return out, bias

    def _gated_norm(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """RMSNorm over each head's Dv (fp32), times the weight, times SiLU(gate) — HF's `Qwen3_5RMSNormGated`."""
        dtype = x.dtype
        weight = self.norm_weight
        if self.config.tensor_model_parallel_size > 1:  # identity forward, all-reduce of its grad over TP
            weight = copy_to_tensor_model_parallel_region(weight, group=self.in_proj.tp_group)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (weight * normed * F.silu(gate.float())).to(dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Own parameters: conv/A_log/dt_bias split along dim 0 over TP, norm_weight replicated; the linears their own."""
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, sharded_state_dict_default

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        result = make_sharded_tensors_for_checkpoint(
            own, prefix, {"conv_weight": 0, "A_log": 0, "dt_bias": 0}, sharded_offsets,
            tp_group=self.in_proj.tp_group, dp_cp_group=metadata["dp_cp_group"])
        for name, module in self.named_children():
            result.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata))
        return result


# ----------------------------------------------------------------------------------------------
# HF ⇄ local, one layer
# ----------------------------------------------------------------------------------------------

HF_NAMES = ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight", "conv1d.weight",
            "dt_bias", "A_log", "norm.weight", "out_proj.weight")
LOCAL_NAMES = ("in_proj.weight", "conv_weight", "A_log", "dt_bias", "norm_weight", "out_proj.weight")


def _dims(state: dict, names: tuple, norm_key: str, proj_key: str, num_key_heads: int, key_head_dim: int):
    """(Hk, r, Dk, Dv, hidden) of a one-layer state, after checking that every key in `names` is there."""
    missing = [n for n in names if n not in state]
    if missing:
        raise KeyError(f"Gated DeltaNet state lacks {missing}; expected the keys {list(names)}")
    hv = state["A_log"].shape[0]
    if hv % num_key_heads:
        raise ValueError(f"A_log has {hv} value heads, not a multiple of {num_key_heads} key heads")
    return num_key_heads, hv // num_key_heads, key_head_dim, state[norm_key].shape[0], state[proj_key].shape[1]


def hf_to_local(hf: dict, num_key_heads: int, key_head_dim: int) -> dict:
    """One HF `Qwen3_5GatedDeltaNet` state (names without the `linear_attn.` prefix) → `GatedDeltaNet`'s full (tp=1) state.

    HF (transformers 5.25 `modeling_qwen3_5.py`): `in_proj_qkv` rows [q (Hk·Dk), k (Hk·Dk), v (Hv·Dv)],
    `in_proj_z` [Hv·Dv], `in_proj_b`/`in_proj_a` [Hv], `conv1d.weight` [C, 1, K] over the qkv rows,
    `dt_bias`/`A_log` [Hv], `norm.weight` [Dv], `out_proj.weight` [h, Hv·Dv]. Key head h serves value
    heads h·r … h·r+r−1 (transformers' `repeat_interleave`), so regrouping per key head is a reshape.
    """
    hk, r, dk, dv, hidden = _dims(hf, HF_NAMES, "norm.weight", "in_proj_qkv.weight", num_key_heads, key_head_dim)
    q, k, v = hf["in_proj_qkv.weight"].split([hk * dk, hk * dk, hk * r * dv])
    per_head = [x.reshape(hk, -1, hidden) for x in (q, k, v, hf["in_proj_z.weight"], hf["in_proj_b.weight"],
                                                   hf["in_proj_a.weight"])]
    conv = hf["conv1d.weight"][:, 0]
    cq, ck, cv = conv.split([hk * dk, hk * dk, hk * r * dv])
    conv_groups = torch.cat([x.reshape(hk, -1, conv.shape[1]) for x in (cq, ck, cv)], dim=1)
    return {"in_proj.weight": torch.cat(per_head, dim=1).reshape(-1, hidden),
            "conv_weight": conv_groups.reshape(-1, conv.shape[1]), "A_log": hf["A_log"], "dt_bias": hf["dt_bias"],
            "norm_weight": hf["norm.weight"], "out_proj.weight": hf["out_proj.weight"]}


def local_to_hf(local: dict, num_key_heads: int, key_head_dim: int) -> dict:
    """The inverse of `hf_to_local`: a full (tp=1 or gathered) `GatedDeltaNet` state → HF names."""
    hk, r, dk, dv, hidden = _dims(local, LOCAL_NAMES, "norm_weight", "in_proj.weight", num_key_heads, key_head_dim)
    q, k, v, z, b, a = local["in_proj.weight"].reshape(hk, -1, hidden).split([dk, dk, r * dv, r * dv, r, r], dim=1)
    flat = [x.reshape(-1, hidden) for x in (q, k, v, z, b, a)]
    conv = local["conv_weight"]
    cq, ck, cv = conv.reshape(hk, -1, conv.shape[1]).split([dk, dk, r * dv], dim=1)
    return {"in_proj_qkv.weight": torch.cat(flat[:3]), "in_proj_z.weight": flat[3], "in_proj_b.weight": flat[4],
            "in_proj_a.weight": flat[5],
            "conv1d.weight": torch.cat([x.reshape(-1, conv.shape[1]) for x in (cq, ck, cv)])[:, None, :],
            "dt_bias": local["dt_bias"], "A_log": local["A_log"], "norm.weight": local["norm_weight"],
            "out_proj.weight": local["out_proj.weight"]}
