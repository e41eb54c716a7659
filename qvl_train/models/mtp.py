"""Qwen3.5's multi-token-prediction (MTP) head, as a training objective (`model.mtp_loss_weight > 0`).

Layout (the Qwen3-Next / Qwen3.5 head as the HF checkpoints store it under `mtp.*`; vLLM's
`vllm/model_executor/models/qwen3_5_mtp.py` `Qwen3_5MultiTokenPredictor` and `qwen3_next_mtp.py` load
those names, Megatron-Bridge maps the same ones):

    e_i  = pre_fc_norm_embedding(embed(token_{i+1}))          the model's own (shared) input embedding
    g_i  = pre_fc_norm_hidden(h_i)                            h_i: the main model's *final-normed* hidden state
    x_i  = fc(concat(e_i, g_i))                               fc: [H, 2H], embedding half first (vLLM:
                                                              `torch.cat([inputs_embeds, hidden_states], -1)`)
    y    = decoder layer(x)                                   one full (gated) attention layer with the model's
                                                              MLP / MoE, as the main model's full-attention layers
                                                              (vLLM builds `Qwen3_5DecoderLayer(layer_type=
                                                              "full_attention")`), same M-RoPE positions as i
    logits_i = output_layer(norm(y_i))                        the shared output layer; predicts token_{i+2}

All four norms are Qwen3.5's zero-centred RMSNorm (vLLM: `Qwen3_5RMSNorm` = `GemmaRMSNorm`, x̂ · (1 + w)):
here plain `torch.nn.RMSNorm` like every other LLM norm of the model, converted w ± 1 (kind `norm1p` in
`hf_convert.rules_qwen3_5`). The decoder layer's tensors carry the same names as a main layer's
(`mtp.layers.0.self_attn.q_proj.weight`, `…mlp.experts.{j}.gate_proj.weight`, …), so the conversion
reuses the main layers' rules.

Targets on packed rows (`mtp_targets`): `labels[i]` is already the target of position i (token i+1,
pre-shifted per sample), so the MTP target of position i is `labels[i+1]` — when i+1 lies in the same
`cu_seqlens` segment; the last position of every sample (and the padding tail) gets -100, as does every
position whose shifted label is -100. The embedded token is `input_ids[i+1]` inside the sample (the token
id, not the visual embedding at an image-pad position: a pad's target is -100 anyway, and the last pipeline
stage holds no ViT); at a sample's last position the token itself (its output carries no loss and, causal
attention, reaches no other position).

Parallelism: the head lives on the last pipeline stage (under `parallel.vpp` on the last model chunk) and
works on the gathered, whole rows of the main model's output: the pre-fc norms and `mtp.norm` are
replicated, `fc` is a column-parallel linear with its output gathered (vLLM shards it the same way), the
rows are split again for sequence parallelism before the decoder layer (built from the same megatron
spec as the main layers, so TP / SP / EP shard it as they do them). Without the first stage on this rank
the input embedding is a copy: the tied output layer's weight, or (untied) a `VocabParallelEmbedding`
under the embedding's own checkpoint key whose gradient the engine sums with the first stage's over
megatron's embedding group (`language.Qwen2LanguageModel`, the tied-embedding mechanism).

Only `mtp_num_layers == 1` (every released Qwen3.5 / 3.6 checkpoint) is built; several chained MTP depths
are refused by `generations/qwen3_5.check`.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from data_pipelines.schema import IGNORE_INDEX
from qvl_train.models.common import SequenceShards, run_layer, without_sequence_parallel
from qvl_train.models.specs import TorchNorm

__all__ = ["MultiTokenPrediction", "mtp_layers_built", "mtp_targets", "mtp_label_count"]


def mtp_layers_built(cfg) -> int:
    """MTP layers the model of ModelConfig `cfg` builds: `llm.mtp_num_layers` when the head is trained
    (`mtp_loss_weight > 0`) or kept for conversion (`mtp_head`, set by import-hf), else 0."""
    return cfg.llm.mtp_num_layers if (cfg.mtp_loss_weight > 0 or cfg.mtp_head) else 0


def _no_init(w: torch.Tensor) -> None:
    """megatron needs an init_method; `init_weights` initialises for real (layout-independent)."""


def _next_in_sample(cu_seqlens: torch.Tensor, rows: int) -> torch.Tensor:
    """`[rows]` bool: True at positions i whose i+1 lies in the same `cu_seqlens` segment."""
    cu = cu_seqlens.to(torch.long)
    idx = torch.arange(rows, device=cu.device)
    end = torch.bucketize(idx, cu[1:], right=True)  # segment index of i (= number of ends ≤ i)
    inside = end < cu.numel() - 1
    seg_end = cu[1:][end.clamp(max=cu.numel() - 2)] if cu.numel() > 1 else torch.zeros_like(idx)
    return inside & (idx + 1 < seg_end)


def mtp_targets(input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`[L]` ids the head embeds: token i+1 of the same sample, `[L]` MTP labels: token i+2 or -100)."""
    rows = input_ids.shape[0]
    ok = _next_in_sample(cu_seqlens.to(input_ids.device), rows)
    nxt_ids = torch.cat([input_ids[1:], input_ids[-1:]])
    nxt_labels = torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])
    return torch.where(ok, nxt_ids, input_ids), torch.where(ok, nxt_labels, torch.full_like(labels, IGNORE_INDEX))


def mtp_label_count(batch) -> int:
    """Positions of a packed batch that carry an MTP loss (the denominator's share of this micro-batch)."""
    _, labels = mtp_targets(batch.input_ids, batch.labels, batch.cu_seqlens)
    return int((labels != IGNORE_INDEX).sum())


class MultiTokenPrediction(MegatronModule):
    """`fc`, `pre_fc_norm_embedding`, `pre_fc_norm_hidden`, `layers.0` (a decoder layer of `layer` spec),
    `norm` — HF `mtp.*` one to one. `forward` gives the MTP logits at the requested positions."""

    def __init__(self, config, layer: ModuleSpec, *, hidden_size: int, eps: float, num_layers: int, main_layers: int,
                 vp_stage: Optional[int] = None):
        super().__init__(config=config)
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        whole = without_sequence_parallel(config)  # these act on the gathered rows, identical on every TP rank
        self.pre_fc_norm_embedding = TorchNorm(whole, hidden_size, eps=eps)
        self.pre_fc_norm_hidden = TorchNorm(whole, hidden_size, eps=eps)
        self.fc = tensor_parallel.ColumnParallelLinear(
            2 * hidden_size, hidden_size, config=whole, init_method=_no_init, bias=False, gather_output=True,
        )
        # global layer number main_layers + 1 + j (TransformerLayer adds this stage's offset itself); MoE
        # routers and the aux-loss tracker index by it
        offset = get_transformer_layer_offset(config, vp_stage)
        self.layers = torch.nn.ModuleList(
            build_module(layer, config=config, layer_number=main_layers + 1 + j - offset, vp_stage=vp_stage)
            for j in range(num_layers)
        )
        self.norm = TorchNorm(whole, hidden_size, eps=eps)

    def forward(self, h_L1H: torch.Tensor, emb_L1H: torch.Tensor, rotary_pos_emb, packed_seq_params,
                shards: SequenceShards, padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`h_L1H`: the main model's final-normed output (whole rows); `emb_L1H`: the embeddings of the next
        tokens (`mtp_targets`). Returns the normed MTP hidden states `[L, 1, H]` (whole rows)."""
        x = torch.cat([self.pre_fc_norm_embedding(emb_L1H), self.pre_fc_norm_hidden(h_L1H)], dim=-1)
        x, _ = self.fc(x)
        x = shards.scatter(x)
        for layer in self.layers:
            x = run_layer(layer, x, rotary_pos_emb, packed_seq_params, padding)
        return self.norm(shards.gather(x))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron's sharding of each part: the decoder layers through their own `sharded_state_dict` (a plain
        `ModuleList` would be saved as replicated whole tensors, losing the tensor-parallel axes), under
        `layers.{j}.` — the head exists once, on the last stage, so the keys need no layer offset."""
        from megatron.core.transformer.utils import sharded_state_dict_default

        sd = {}
        for name, child in self.named_children():
            if name == "layers":
                for j, layer in enumerate(self.layers):
                    sd.update(layer.sharded_state_dict(f"{prefix}layers.{j}.", sharded_offsets, metadata))
            else:
                sd.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata))
        return sd
