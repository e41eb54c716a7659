"""The model at tp=2 and pp=2 (2 gloo processes) vs tp=1: same full weights from init_weights, same losses.

One spawn runs both layouts in the same two processes: first tp=1 (dp=2, each rank a full model),
then tp=2; each check compares the tp=2 shards / per-token losses with the tp=1 ones.
"""

from __future__ import annotations

import torch

from qvl_train.compat.megatron_cpu import spawn_gloo


def _entries(model):
    """(global key, layer offsets, offsets in the tensor) → local data, factories built."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for item in nested_values(model.sharded_state_dict()):
        items = list(nested_values(item.build())) if isinstance(item, ShardedTensorFactory) else [item]
        for st in items:
            if isinstance(st, ShardedTensor):
                p = st.prepend_axis_num
                out[(st.key, tuple(st.global_offset[:p]), tuple(st.global_offset[p:]))] = st.data.detach().clone()
    return out


def _run(tp: int):
    from megatron.core import parallel_state

    from qvl_train.config import ParallelConfig
    from qvl_train.models import build_model, init_weights
    from qvl_train.models.tiny import packed_batch, tiny_model_config

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    cfg = tiny_model_config()
    model = build_model(cfg, ParallelConfig(tp=tp), pre_process=True, post_process=True)
    init_weights(model, seed=3, std=0.05)
    loss = model(packed_batch(cfg))
    loss.sum().backward()
    grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}
    entries = _entries(model)
    parallel_state.destroy_model_parallel()
    return loss.detach(), entries, grads


def _run_pp2(cfg_batch_loss):
    """pp=2 through megatron's 1F1B schedule (forward only): the last stage's loss equals tp=1's."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from qvl_train.config import ParallelConfig
    from qvl_train.models import build_model, init_weights
    from qvl_train.models.tiny import packed_batch, tiny_model_config

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    cfg = tiny_model_config()
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    model = build_model(cfg, ParallelConfig(pp=2), pre_process=first, post_process=last)
    init_weights(model, seed=3, std=0.05)
    batch = packed_batch(cfg)

    def step(it, m):
        b = next(it)
        return m(b), lambda out: (out.sum(), {"loss": out.detach().clone()})

    res = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=batch.num_slots, micro_batch_size=1, forward_only=True,
    )
    if last:
        torch.testing.assert_close(res[0]["loss"], cfg_batch_loss, rtol=1e-5, atol=1e-5)
    parallel_state.destroy_model_parallel()


def _worker(rank: int, world_size: int) -> None:
    loss1, full, _ = _run(1)
    _run_pp2(loss1)
    loss2, shards, grads = _run(2)
    torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=1e-5)
    assert all(grads.values()), [n for n, g in grads.items() if not g]
    assert _check_shards(shards, full, rtol=0, atol=0) > 10, "nothing was sharded?"


def _check_shards(shards: dict, full: dict, **tol) -> int:
    """Each tp=2 shard (`_entries` keys) equals its slice of the tp=1 tensor; returns how many are real
    slices (smaller than the full tensor)."""
    by_key = {}  # (key, layer) → [(offsets, data)]; at tp=1 only the SwiGLU fc1 has 2 pieces
    for (key, layer, off), data in full.items():
        by_key.setdefault((key, layer), []).append((off, data))
    sharded = 0
    for (key, layer, off), data in shards.items():
        for ref_off, ref in by_key[(key, layer)]:
            rel = [o - r for o, r in zip(off, ref_off)]
            if all(0 <= x and x + n <= m for x, n, m in zip(rel, data.shape, ref.shape)):
                break
        else:
            raise AssertionError(f"{key}{layer}{off}: no tp=1 tensor covers this shard")
        sharded += data.shape != ref.shape
        idx = tuple(slice(x, x + n) for x, n in zip(rel, data.shape))
        torch.testing.assert_close(data, ref[idx], **tol, msg=lambda m: f"{key}{layer}{off}: {m}")
    return sharded


def test_tp2_matches_tp1():
    spawn_gloo(_worker, 2)
