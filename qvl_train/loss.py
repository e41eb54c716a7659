"""The training loss: mean cross-entropy per label token over the whole global batch.

    loss = Σ_{label tokens t of the global batch} CE_t  /  N_global

`N_global` (label tokens over every micro-batch and data-parallel rank of the step) is all-reduced
before the forward, so each micro-batch contributes `Σ_its tokens CE_t / N_global` and the summed
gradients over micro-batches and ranks are exactly the gradient of the global mean. Averaging per
sample or per micro-batch instead weights short samples more and makes a packed run's loss differ
from an unpacked one (a known failure: packed losses several times the unpacked ones).
"""

from __future__ import annotations

import torch


def global_token_mean(per_token_loss: torch.Tensor, num_label_tokens: int, global_label_tokens: float):
    """Loss function for megatron's schedules (`calculate_per_token_loss=True`).

    Returns `(loss to backpropagate, label tokens of this micro-batch, values to report)`; the
    reported `loss_sum` is a clone, because the schedules may rescale the returned loss in place.
    """
    loss_sum = per_token_loss.float().sum()
    n = torch.tensor(num_label_tokens, dtype=torch.int)
    return loss_sum / global_label_tokens, n, {"loss_sum": loss_sum.detach().clone()}
