"""megatron-core under gloo on CPU (qvl_train.compat.megatron_cpu): TP layers and the pipeline schedules.

One 2-process spawn runs every check (process start + megatron import is most of the cost):
* TP=2 ColumnParallelLinear → RowParallelLinear equals the single-device matmuls (output and grads),
  VocabParallelEmbedding + vocab_parallel_cross_entropy equal nn.functional on the full weight,
  the RNG tracker's fork() gives per-rank model-parallel streams and restores the default one;
* pp=2 `forward_backward_pipelining_without_interleaving` over a 2-stage module returns the same
  losses and gradients as the same two stages run in one process; pp=1 (no pipelining) as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType

from qvl_train.compat.megatron_cpu import install_cpu_compat, spawn_gloo

H, S, MBS, N_MICRO = 8, 6, 1, 3


def _all_gather(t: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _check_tp(rank: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)
    init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731

    # The RNG tracker: fork() draws from a per-TP-rank stream and restores the default one.
    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        r = torch.rand(4)
    assert torch.equal(before, torch.get_rng_state())
    both = _all_gather(r, 0)
    assert not torch.equal(both[:4], both[4:]), "model-parallel RNG streams must differ across TP ranks"

    # Column → Row pair vs the single-device matmuls on the gathered weights.
    col = tensor_parallel.ColumnParallelLinear(H, 4 * H, config=cfg, init_method=init, bias=True, gather_output=False)
    row = tensor_parallel.RowParallelLinear(
        4 * H, H, config=cfg, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False
    )
    with torch.no_grad():
        col.bias.normal_()
        row.bias.normal_()
        dist.broadcast(row.bias, 0)  # row bias is replicated
    torch.manual_seed(7)
    x = torch.randn(S, MBS, H, requires_grad=True)
    y, _ = col(x)
    out, _ = row(torch.relu(y))
    out.pow(2).sum().backward()

    w1, b1 = _all_gather(col.weight.detach(), 0), _all_gather(col.bias.detach(), 0)
    w2, b2 = _all_gather(row.weight.detach(), 1), row.bias.detach()
    xr = x.detach().clone().requires_grad_(True)
    w1r, w2r = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
    ref = F.linear(torch.relu(F.linear(xr, w1r, b1)), w2r, b2)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_all_gather(col.weight.grad, 0), w1r.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_all_gather(row.weight.grad, 1), w2r.grad, rtol=1e-5, atol=1e-5)

    # Vocab-parallel embedding + cross entropy vs the full-vocabulary reference.
    vocab = 32
    emb = tensor_parallel.VocabParallelEmbedding(vocab, H, init_method=init, config=cfg)
    ids = torch.tensor([[1, 17, 30, 5, 16, 0]]).t()  # [S, 1], ids from both shards
    h = emb(ids)  # [S, 1, H]
    logits_shard = torch.einsum("sbh,vh->sbv", h, emb.weight)  # tied output, vocab-sharded logits
    labels = torch.tensor([[3, 20, 31, 16, 2, 9]]).t()
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits_shard.float(), labels)
    full_w = _all_gather(emb.weight.detach(), 0)
    ref_h = F.embedding(ids, full_w)
    ref_loss = F.cross_entropy(torch.einsum("sbh,vh->sbv", ref_h, full_w).reshape(-1, vocab), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(ref_h, h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.reshape(-1), ref_loss, rtol=1e-5, atol=1e-5)
    parallel_state.destroy_model_parallel()


class _Stage(torch.nn.Module):
    """One pipeline stage: Linear + tanh; the last stage turns its output into a loss."""

    def __init__(self, config, weight: torch.Tensor, last: bool):
        super().__init__()
        self.config = config
        self.model_type = ModelType.encoder_or_decoder  # the schedules read it
        self.lin = torch.nn.Linear(H, H)
        with torch.no_grad():
            self.lin.weight.copy_(weight)
            self.lin.bias.zero_()
        self.last = last
        self.input_tensor = None

    def set_input_tensor(self, t) -> None:
        self.input_tensor = t[0] if isinstance(t, (list, tuple)) else t

    def forward(self, x):
        h = x if self.input_tensor is None else self.input_tensor
        return torch.tanh(self.lin(h))


def _micro_batches():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(S, MBS, H, generator=g) for _ in range(N_MICRO)]


def _weights():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(H, H, generator=g) * 0.5 for _ in range(2)]


def _reference():
    """Both stages in one process, the same micro-batches: mean loss and the gradients."""
    lins = [torch.nn.Linear(H, H) for _ in range(2)]
    for lin, w in zip(lins, _weights()):
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.zero_()
    losses = []
    for x in _micro_batches():
        out = torch.tanh(lins[1](torch.tanh(lins[0](x))))
        loss = out.pow(2).mean()
        (loss / N_MICRO).backward()
        losses.append(loss.detach())
    return losses, [lin.weight.grad for lin in lins]


def _forward_step(data_iterator, model):
    x = next(data_iterator)
    out = model(x)

    def loss_func(output):
        loss = output.pow(2).mean()
        # clone: the schedule divides the returned loss in place by num_microbatches
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


def _check_pipeline(rank: int, pp: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pp)
    # The schedules read hidden_size (p2p buffer shape [S, MBS, H]) from the model's config.
    cfg = TransformerConfig(
        num_layers=2, hidden_size=H, num_attention_heads=1, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, use_cpu_initialization=True,
    )
    ref_losses, ref_grads = _reference()
    if pp == 1:
        # both stages in one module; only rank 0's result matters (the other rank does the same)
        class Both(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.config = cfg
                self.model_type = ModelType.encoder_or_decoder
                self.s = torch.nn.ModuleList([_Stage(cfg, w, i == 1) for i, w in enumerate(_weights())])

            def set_input_tensor(self, t):
                pass

            def forward(self, x):
                return self.s[1](self.s[0](x))

        model = Both()
        grads_of = lambda: [s.lin.weight.grad for s in model.s]  # noqa: E731
        mine = [0, 1]
    else:
        stage = parallel_state.get_pipeline_model_parallel_rank()
        model = _Stage(cfg, _weights()[stage], last=stage == 1)
        grads_of = lambda: [model.lin.weight.grad]  # noqa: E731
        mine = [stage]
    fb = get_forward_backward_func()
    out = fb(
        forward_step_func=_forward_step,
        data_iterator=iter(_micro_batches()),
        model=[model],
        num_microbatches=N_MICRO,
        seq_length=S,
        micro_batch_size=MBS,
        forward_only=False,
    )
    if parallel_state.is_pipeline_last_stage():
        losses = [d["loss"] for d in out]
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-6, atol=1e-6)
    for g, i in zip(grads_of(), mine):
        torch.testing.assert_close(g, ref_grads[i], rtol=1e-6, atol=1e-6)
    parallel_state.destroy_model_parallel()


def _worker(rank: int, world_size: int) -> None:
    _check_tp(rank)
    _check_pipeline(rank, pp=2)
    _check_pipeline(rank, pp=1)


def test_install_is_idempotent_and_cpu_only():
    first = install_cpu_compat()
    assert install_cpu_compat() == first == (not torch.cuda.is_available())


def test_tp_and_pipeline_under_gloo():
    spawn_gloo(_worker, 2)
