"""Qwen3.5's multi-token-prediction head (`models/mtp.py`), fp32 on CPU:

* the packed shift: token i+1 / target i+2 stay inside each `cu_seqlens` sample, -100 labels carry no loss;
* the MTP per-token loss of our model (tiny Qwen3.5, 3 packed text samples + padding) equals transformers 5.25's
  layers run one sample at a time in the reference environment (`Qwen3_5TextModel` for h, `Qwen3_5RMSNorm`,
  `Qwen3_5DecoderLayer` of a full-attention layer, the tied lm_head), on the HF weights our converter writes —
  which checks the concat order, the zero-centred norms and the weight names too; within 1e-5;
* the loss function's objective `LM + w · MTP`, each over its own label count; config refusals.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from data_pipelines.schema import IGNORE_INDEX, PackedBatch
from qvl_train.config import ConfigError, ModelConfig
from qvl_train.loss import global_token_mean
from qvl_train.models.mtp import mtp_label_count, mtp_targets
from tests.unit.test_model_params import load_model_config

I = IGNORE_INDEX


def test_packed_shift_stays_inside_samples():
    ids = torch.tensor([10, 11, 12, 13, 20, 21, 22, 30, 31, 0, 0])
    labels = torch.tensor([11, 12, 13, I, 21, I, I, 31, I, I, I])  # sample 2 masks its last target
    cu = torch.tensor([0, 4, 7, 9], dtype=torch.int32)
    nxt, mtp = mtp_targets(ids, labels, cu)
    assert nxt.tolist() == [11, 12, 13, 13, 21, 22, 22, 31, 31, 0, 0]  # the last of a sample embeds itself (no loss)
    assert mtp.tolist() == [12, 13, I, I, I, I, I, I, I, I, I]
    batch = PackedBatch(input_ids=ids, labels=labels, position_ids=torch.zeros(3, 11, dtype=torch.long), cu_seqlens=cu,
                        pixel_values=torch.zeros(0, 1536), grid_thw=torch.zeros(0, 3, dtype=torch.long),
                        sample_ids=["a", "b", "c"])
    assert mtp_label_count(batch) == 2


def test_objective_is_lm_plus_weighted_mtp_each_over_its_own_count():
    per_token = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]])
    loss, n, report = global_token_mean(per_token, 2, 4.0, mtp_weight=0.3, mtp_global_label_tokens=2.0)
    assert float(loss) == pytest.approx(3.0 / 4 + 0.3 * 0.5 / 2) and int(n) == 2
    assert float(report["loss_sum"]) == 3.0 and float(report["mtp_loss_sum"]) == 0.5


def test_config_refusals_name_the_fix():
    cfg = load_model_config("qwen3_5/tiny")
    with pytest.raises(ConfigError, match="model.llm.mtp_num_layers=1"):
        ModelConfig(generation="qwen3_5", vision=cfg.vision, llm=cfg.llm, mtp_loss_weight=0.3)
    with pytest.raises(ConfigError, match="mtp_num_layers=1"):
        ModelConfig(generation="qwen3_5", vision=cfg.vision, llm=replace(cfg.llm, mtp_num_layers=2), mtp_loss_weight=0.3)
    moe = load_model_config("qwen3_5_moe/tiny")  # the MoE models train their head (a MoE layer) too
    ModelConfig(generation="qwen3_5_moe", vision=moe.vision, llm=replace(moe.llm, mtp_num_layers=1), mtp_loss_weight=0.3)


def _packed_text_batch(lengths: list[int], pad: int, seed: int = 0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    ids, labels, pos = [], [], []
    for n in lengths:
        t = torch.randint(0, 248000, (n,), generator=g)
        lab = torch.cat([t[1:], torch.tensor([I])])
        lab[torch.rand(n, generator=g) < 0.25] = I  # some positions carry no loss
        ids.append(t), labels.append(lab), pos.append(torch.arange(n))
    ids.append(torch.zeros(pad, dtype=torch.long)), labels.append(torch.full((pad,), I)), pos.append(torch.zeros(pad, dtype=torch.long))
    ids_t, lab_t = torch.cat(ids), torch.cat(labels)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return PackedBatch(
        input_ids=ids_t, labels=lab_t, position_ids=torch.cat(pos).expand(3, -1).clone(), cu_seqlens=cu,
        pixel_values=torch.zeros(0, 1536), grid_thw=torch.zeros(0, 3, dtype=torch.long),
        sample_ids=[str(i) for i in range(len(lengths))], num_tokens=sum(lengths), num_label_tokens=int((lab_t != I).sum()),
    )


def test_mtp_loss_matches_transformers_layers():
    from qvl_train.tools.reference import reference_available, run_reference

    ok, why = reference_available()
    if not ok:
        pytest.skip(why)
    from qvl_train import generations
    from qvl_train.config import ParallelConfig
    from qvl_train.models import build_model, init_weights
    from qvl_train.models.hf_convert import ours_to_hf
    from tests.conftest import megatron_one_rank_world

    megatron_one_rank_world()
    base = load_model_config("qwen3_5/tiny")
    cfg = replace(base, llm=replace(base.llm, mtp_num_layers=1), mtp_loss_weight=0.3)
    model = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True, dtype=torch.float32)
    init_weights(model, seed=3, std=0.05)
    with torch.no_grad():  # norms away from 1 (HF stores them zero-centred: a w-1 slip would show)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    lengths = [7, 5, 9]
    batch = _packed_text_batch(lengths, pad=3)
    model.train()
    out = model(batch)
    assert out.shape == (2, batch.num_slots)
    hf = ours_to_hf({k: v for k, v in model.state_dict().items() if "_extra_state" not in k}, cfg, style="runtime")
    tensors = {k: v for k, v in hf.items() if k.startswith(("model.language_model.", "mtp."))}
    tensors.update(input_ids=batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens.long())
    text_config = generations.get("qwen3_5").hf_config(cfg, "float32")["text_config"]
    ref = run_reference("hf_mtp_losses", tensors, {"text_config": text_config},
                        file=__file__.replace("test_mtp.py", "mtp_reference.py"))
    ours = out[1].detach()
    assert torch.equal(ours[int(batch.cu_seqlens[-1]):], torch.zeros(3))  # padding tail: no MTP loss
    for s, (a, b) in enumerate(zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())):
        expect = ref[f"mtp_{s}"]
        assert ours[b - 1] == 0  # a sample's last position has no token after the next
        torch.testing.assert_close(ours[a : b - 1], expect, rtol=1e-5, atol=1e-5)
        assert (expect > 0).sum() >= 1
    # and the LM row is the plain next-token loss (the MTP head leaves it alone)
    model.eval()
    torch.testing.assert_close(model(batch), out[0].detach(), rtol=0, atol=0)
