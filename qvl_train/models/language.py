"""The Qwen2 language model from megatron blocks (HF `Qwen2VLTextModel` + `lm_head`).

vocab-parallel embedding → decoder layers (pre-RMSNorm, GQA self-attention with qkv bias and
M-RoPE, SwiGLU MLP without biases) → final RMSNorm → vocab-parallel output layer.

Pipeline parallelism: megatron's `TransformerBlock` builds only this stage's layers (global layer
numbers, so checkpoints are layout-independent) from `pipeline_model_parallel_size` and
`num_layers_in_first_pipeline_stage` (with `parallel.vpp`, this model chunk's: `vp_stage`); the embedding lives on the first
stage (`pre_process`),
the final norm and output layer on the last (`post_process`). On other stages the block takes its
input from `set_input_tensor` (the activation received by the pipeline schedule).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock

from qvl_train.config import LLMConfig, ParallelConfig
from qvl_train.models.common import Execution, SequenceShards, make_transformer_config, run_layer, without_sequence_parallel
from qvl_train.models.specs import TorchNorm, block_spec, layer_spec

__all__ = ["Qwen2LanguageModel", "llm_transformer_config"]


def _no_init(w: torch.Tensor) -> None:
    """megatron needs an init_method; `init_weights` initialises for real (layout-independent)."""


def llm_transformer_config(cfg: LLMConfig, parallel: ParallelConfig, *, dtype: torch.dtype, execution: Execution = Execution()):
    """The LLM's megatron config: the full parallel layout (tp, pp, uneven first stage), recompute / FP8."""
    first = parallel.first_stage_layers if parallel.pp > 1 else None
    # (with vpp, megatron 0.16 divides by the number of middle stages when both ends are set: leave `last` out)
    last = cfg.num_layers - first if (first is not None and parallel.pp == 2 and parallel.vpp == 1) else None
    moe = moe_transformer_kwargs(cfg, parallel) if cfg.num_experts else {}
    return make_transformer_config(
        dtype=dtype,
        execution=execution,
        tp=parallel.tp,
        pp=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if parallel.vpp > 1 else None,
        num_layers=cfg.num_layers,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads,
        qk_layernorm=cfg.qk_norm,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        attention_output_gate=cfg.attn_output_gate,
        # megatron's per-layer pattern of a hybrid (1 = linear attention): its block then checkpoints each layer
        # under its own key (`non_homogeneous_layers`), as the GDN and attention layers hold different tensors
        linear_attention_freq=[int(t == "linear_attention") for t in cfg.layer_types] if cfg.layer_types else None,
        **moe,
    )


def moe_transformer_kwargs(cfg: LLMConfig, parallel: ParallelConfig) -> dict:
    """megatron's MoE fields for Qwen3-VL-MoE's router (HF `Qwen3VLMoeTextSparseMoeBlock`).

    HF: softmax over all experts, top-k, the k weights renormalised to sum 1. megatron with
    `moe_router_pre_softmax=False`: top-k of the logits, softmax over those k — the same weights
    (p_i / Σ_topk p_j = exp(l_i) / Σ_topk exp(l_j)) and the same experts (softmax is monotone).
    Router logits in fp32 whatever the parameter dtype; no capacity limit (no token dropping); the
    alltoall dispatcher (tokens travel to the rank that holds their expert under `parallel.ep`).
    The load-balancing loss is megatron's per-layer Switch loss with `moe_aux_loss_coeff` (the
    engine rescales the coefficient per step, see `engines/megatron.py`).
    """
    shared = dict(  # Qwen3.5-MoE: a shared SwiGLU expert scaled by sigmoid(x · gate_weight) (megatron's SharedExpertMLP)
        moe_shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size, moe_shared_expert_gate=True,
    ) if cfg.shared_expert_ffn_hidden_size else {}
    return dict(
        **shared,
        num_moe_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_router_topk=cfg.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
    )


def hybrid_block_spec(cfg: LLMConfig, config, full: ModuleSpec, vp_stage: Optional[int]):
    """This stage's layer specs of the Qwen3.5 hybrid LLM (`cfg.layer_types`): `full` (gated attention,
    `config.attention_output_gate`) for `full_attention` layers, the same layer with our `GatedDeltaNet`
    (`models/gdn.py`) as its token mixer for `linear_attention` layers (transformers 5.25
    `Qwen3_5DecoderLayer`: norm → mixer → residual → norm → MLP → residual for both kinds).

    The kinds follow the *global* layer numbers of this pipeline stage / model chunk (megatron's offset),
    so any pp / vpp layout builds the same model. Local backend only (the model builds the hybrid LLM's
    layers with it whatever the backend): the TE spec fuses the input norm into the qkv GEMM, which a
    GDN layer does not have."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from qvl_train.models.gdn import GatedDeltaNet, gdn_spec_params

    linear = ModuleSpec(
        module=full.module,
        submodules=replace(full.submodules, self_attention=ModuleSpec(module=GatedDeltaNet, params=gdn_spec_params(cfg))),
    )
    offset = get_transformer_layer_offset(config, vp_stage)
    count = get_num_layers_to_build(config, vp_stage)
    kinds = {"linear_attention": linear, "full_attention": full}
    return TransformerBlockSubmodules(
        layer_specs=[kinds[cfg.layer_types[offset + i]] for i in range(count)], layer_norm=TorchNorm
    )


def with_shared_expert(layer: ModuleSpec) -> ModuleSpec:
    """`layer` whose MoELayer also has megatron's `SharedExpertMLP` (HF `Qwen3_5MoeSparseMoeBlock.shared_expert`
    + `shared_expert_gate`: every token, scaled by a sigmoid gate; `moe_transformer_kwargs` sets its width and
    the gate), built from the same linear classes as the routed experts."""
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    moe = layer.submodules.mlp
    shared = ModuleSpec(module=SharedExpertMLP, submodules=moe.submodules.experts.submodules)
    mlp = ModuleSpec(module=moe.module, params=moe.params, submodules=replace(moe.submodules, shared_experts=shared))
    return ModuleSpec(module=layer.module, params=layer.params, submodules=replace(layer.submodules, mlp=mlp))


class Qwen2LanguageModel(MegatronModule):
    """Embedding (first stage), this stage's decoder layers, final norm + output (last stage)."""

    def __init__(
        self,
        cfg: LLMConfig,
        parallel: ParallelConfig,
        *,
        pre_process: bool,
        post_process: bool,
        dtype: torch.dtype,
        attention_backend: str = "auto",
        spec_backend: str = "local",
        execution: Execution = Execution(),
        vp_stage: Optional[int] = None,
        mtp_layers: int = 0,
    ):
        config = llm_transformer_config(cfg, parallel, dtype=dtype, execution=execution)
        if mtp_layers:  # megatron's own field: MoE routers size their aux-loss rows for the main + MTP layers
            config.mtp_num_layers = mtp_layers
        super().__init__(config=config)
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.tie = cfg.tie_word_embeddings
        # Tied embeddings over several pipeline stages: the last stage keeps a copy of the first stage's
        # embedding as its output weight (same checkpoint key, same init; the engine sums the two
        # gradients over megatron's embedding group, so both copies take the same steps).
        self.tied_copy = self.tie and post_process and not pre_process
        # The MTP head (`mtp_layers`, models/mtp.py) on the last stage embeds tokens too: without the first
        # stage there, an untied model keeps a copy of the embedding by the same mechanism (a tied one
        # looks up in its output layer's copy).
        self.mtp_embedding_copy = bool(mtp_layers) and post_process and not pre_process and not self.tie
        if pre_process or self.mtp_embedding_copy:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                cfg.vocab_size, cfg.hidden_size, init_method=_no_init, config=config
            )
            if (self.tie or mtp_layers) and not post_process:
                self.embedding.weight.shared_embedding = True
            if self.mtp_embedding_copy:
                self.embedding.weight.shared_embedding = True
        layer = layer_spec(
            causal=True, attention_backend=attention_backend, spec_backend="local" if cfg.layer_types else spec_backend,
            qk_norm=cfg.qk_norm,
            moe=cfg.num_experts > 0,
        )
        if cfg.shared_expert_ffn_hidden_size:
            layer = with_shared_expert(layer)
        spec = hybrid_block_spec(cfg, config, layer, vp_stage) if cfg.layer_types else block_spec(config, layer, spec_backend)
        self.decoder = TransformerBlock(
            config=config,
            spec=spec,
            post_layer_norm=True,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,  # interleaved schedule: this chunk's layers (global numbers from megatron's offsets)
        )
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                cfg.hidden_size,
                cfg.vocab_size,
                config=without_sequence_parallel(config),  # it takes the gathered label positions
                init_method=_no_init,
                bias=False,
                gather_output=False,
                skip_weight_param_allocation=self.tie and pre_process,
            )
            if self.tied_copy:
                self.output_layer.weight.shared_embedding = True
        self.mtp = None
        if post_process and mtp_layers:
            from qvl_train.models.mtp import MultiTokenPrediction

            self.mtp = MultiTokenPrediction(
                config, layer, hidden_size=cfg.hidden_size, eps=cfg.norm_eps, num_layers=mtp_layers,
                main_layers=cfg.num_layers, vp_stage=vp_stage,
            )

    def set_input_tensor(self, input_tensor: Optional[torch.Tensor]) -> None:
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[L]` token ids → `[L, 1, H]` embeddings (identical on every TP rank)."""
        return self.embedding(input_ids.unsqueeze(0)).transpose(0, 1).contiguous()

    def forward(
        self,
        hidden_L1H: Optional[torch.Tensor],
        rotary_pos_emb: torch.Tensor,
        packed_seq_params,
        output_positions: Optional[torch.Tensor] = None,
        deepstack: Optional[tuple[torch.Tensor, list[torch.Tensor]]] = None,
        padding_mask: Optional[torch.Tensor] = None,
        mtp: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ):
        """Run this stage's layers; on the last stage also the final norm and output layer.

        Returns `[L, 1, H]` hidden states, or on the last stage vocab-sharded logits `[L, 1, V/tp]`
        — only at `output_positions` (`[n, 1, V/tp]`) when given: the output layer is the largest
        matmul of a small model with a 152k vocabulary, and only label positions need logits.

        `deepstack = (positions [n], [features [n, H], …])` (Qwen3-VL, first stage only): feature i
        is added at `positions` to the output of global decoder layer i (0-based), so the layers
        run one by one here (the block still owns them: names and sharding stay megatron's).

        `mtp = (next-token ids [L], MTP label positions [m])` (last stage with the MTP head, `models/mtp.py`):
        returns `(logits, MTP logits [m, 1, V/tp])`; the head reads the final-normed output of every row.

        `padding_mask` `[L]` (True at rows that hold no token of a sample) reaches megatron's MoE routers,
        which leave those rows out of the load-balancing loss: it then counts the same tokens whatever
        padding a layout adds (context parallelism's zigzag split pads each sample, see parallel/context.py).
        """
        shards = SequenceShards(self.config, rotary_pos_emb.shape[0])  # parallel.sp: L split over TP ranks
        if shards.pad:
            raise ValueError(f"sequence parallelism needs the packed length ({shards.rows}) to be a multiple of parallel.tp")
        if self.pre_process:
            hidden_L1H = shards.scatter(hidden_L1H)
        padding = None if padding_mask is None else shards.mask(padding_mask)
        if deepstack is not None:
            h = self._forward_deepstack(hidden_L1H, rotary_pos_emb, packed_seq_params, shards, *deepstack, padding=padding)
        else:
            h = self.decoder(
                hidden_states=hidden_L1H, attention_mask=None, rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params,
                padding_mask=padding,
            )
        if not self.post_process:
            return h
        h = shards.gather(h)
        weight = self.embedding.weight if self.tie and self.pre_process else None
        mtp_logits = None
        if mtp is not None:  # (next-token ids [L], positions with an MTP label [m]) → logits [m, 1, V/tp] too
            next_ids, mtp_positions = mtp
            m = self.mtp(h, self.embed_next(next_ids), rotary_pos_emb, packed_seq_params, shards, padding)
            mtp_logits, _ = self.output_layer(m.index_select(0, mtp_positions), weight=weight)
        if output_positions is not None:
            h = h.index_select(0, output_positions)
        logits, _ = self.output_layer(h, weight=weight)
        return logits if mtp is None else (logits, mtp_logits)

    def embed_next(self, ids: torch.Tensor) -> torch.Tensor:
        """`[L]` ids → `[L, 1, H]` input embeddings on the last stage, for the MTP head: the embedding itself
        (first stage here, or the untied copy), else the tied output layer's copy of it (the same
        vocab-parallel table: masked lookup of this rank's rows, summed over TP ranks)."""
        if hasattr(self, "embedding"):
            return self.embed(ids)
        weight = self.output_layer.weight
        rows = weight.shape[0]
        start = rows * parallel_state.get_tensor_model_parallel_rank() if self.config.tensor_model_parallel_size > 1 else 0
        local = ids - start
        outside = (local < 0) | (local >= rows)
        out = F.embedding(local.masked_fill(outside, 0), weight).masked_fill(outside.unsqueeze(1), 0.0)
        if self.config.tensor_model_parallel_size > 1:
            out = tensor_parallel.reduce_from_tensor_model_parallel_region(out)
        return out.unsqueeze(1)

    def _forward_deepstack(self, h, rotary_pos_emb, packed_seq_params, shards, positions, features, padding=None):
        if not self.pre_process:
            raise ValueError("DeepStack features are injected on the first pipeline stage only")
        stage_layers = {layer.layer_number - 1 for layer in self.decoder.layers}  # global, 0-based
        missing = [i for i in range(len(features)) if i not in stage_layers]
        if missing:
            raise ValueError(
                f"DeepStack adds visual features after LLM layers 0..{len(features) - 1}, but layers {missing} are not "
                "on the first pipeline stage; raise parallel.first_stage_layers"
            )
        for layer in self.decoder.layers:
            h = run_layer(layer, h, rotary_pos_emb, packed_seq_params, padding)
            i = layer.layer_number - 1
            if i < len(features):
                if shards.on:  # the features at full length, then this rank's slice of the sequence
                    full = h.new_zeros(shards.rows, 1, h.shape[-1]).index_put((positions,), features[i].to(h.dtype).unsqueeze(1))
                    h = h + shards.scatter(full)
                else:
                    h = h.index_add(0, positions, features[i].to(h.dtype).unsqueeze(1))
        if self.decoder.final_layernorm is not None:
            h = self.decoder.final_layernorm(h)
        return h

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Default megatron sharding. A tied output layer has no weight of its own to save; the last
        stage's copy under pipeline parallelism is the embedding's tensor (its key and sharding) as a
        secondary replica: never written, loaded (and initialised) from the embedding. The MTP head's
        embedding copy (untied, pp > 1) is the same kind of replica."""
        from dataclasses import replace

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.post_process and self.tie and self.pre_process:
            sd.pop(f"{prefix}output_layer.weight", None)
        elif self.tied_copy:
            key = f"{prefix}output_layer.weight"
            own = sd[key]
            replica = own.replica_id if isinstance(own.replica_id, tuple) else (own.replica_id,)
            sd[key] = replace(own, key=f"{prefix}embedding.weight", replica_id=(1, *replica[1:]))
        if self.mtp_embedding_copy:  # the MTP head's copy of the embedding: a secondary replica as well
            key = f"{prefix}embedding.weight"
            own = sd[key]
            replica = own.replica_id if isinstance(own.replica_id, tuple) else (own.replica_id,)
            sd[key] = replace(own, replica_id=(1, *replica[1:]))
        return sd
