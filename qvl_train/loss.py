"""The training loss: mean cross-entropy per label token over the whole global batch.

    loss = Σ_{label tokens t of the global batch} CE_t  /  N_global

`N_global` (label tokens over every micro-batch and data-parallel rank of the step) is all-reduced
before the forward, so each micro-batch contributes `Σ_its tokens CE_t / N_global` and the summed
gradients over micro-batches and ranks are exactly the gradient of the global mean. Averaging per
sample or per micro-batch instead weights short samples more and makes a packed run's loss differ
from an unpacked one (a known failure: packed losses several times the unpacked ones).

With Qwen3.5's multi-token-prediction head (`model.mtp_loss_weight` w > 0, `models/mtp.py`) the model
returns a second row of per-token losses, normalised the same way over its own label count (positions
whose token-after-next exists in the same sample and is a label; `mtp.mtp_label_count`):

    objective = loss + w · Σ_{MTP label positions} CE^mtp_t / M_global
"""

from __future__ import annotations

import torch


def global_token_mean(per_token_loss: torch.Tensor, num_label_tokens: int, global_label_tokens: float,
                      mtp_weight: float = 0.0, mtp_global_label_tokens: float = 1.0):
    """Loss function for megatron's schedules (`calculate_per_token_loss=True`).

    Returns `(loss to backpropagate, label tokens of this micro-batch, values to report)`; the
    reported `loss_sum` (and `mtp_loss_sum` for a `[2, L]` input: LM and MTP rows) are clones,
    because the schedules may rescale the returned loss in place.
    """
    n = torch.tensor(num_label_tokens, dtype=torch.int)
    if per_token_loss.dim() == 2:  # [LM; MTP] per-token losses
        loss_sum, mtp_sum = per_token_loss.float().sum(dim=1).unbind()
        objective = loss_sum / global_label_tokens + mtp_weight * mtp_sum / mtp_global_label_tokens
        return objective, n, {"loss_sum": loss_sum.detach().clone(), "mtp_loss_sum": mtp_sum.detach().clone()}
    loss_sum = per_token_loss.float().sum()
    return loss_sum / global_label_tokens, n, {"loss_sum": loss_sum.detach().clone()}
