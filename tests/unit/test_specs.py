"""Spec selection: Transformer Engine layers where TE imports and CUDA is up, the local specs otherwise.

TE cannot be installed or run in this workplace (no GPU), so availability is faked: `te_available`
and `torch.cuda.is_available` are monkeypatched for the decision, and for the TE spec itself a stand-in
`megatron.core.extensions.transformer_engine` module (marker classes) checks which classes the spec
wires in — the TE layers are never constructed here.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from qvl_train.models import specs


@pytest.mark.parametrize(
    "te,cuda,want", [(True, True, "te"), (True, False, "local"), (False, True, "local"), (False, False, "local")]
)
def test_auto_picks_te_only_with_te_and_cuda(monkeypatch, te, cuda, want):
    monkeypatch.setattr(specs, "te_available", lambda: te)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert specs.resolve_spec_backend() == want
    assert specs.resolve_spec_backend("auto") == want


def test_explicit_backends_and_errors(monkeypatch):
    monkeypatch.setattr(specs, "te_available", lambda: False)
    assert specs.resolve_spec_backend("local") == "local"
    assert specs.resolve_spec_backend("te") == "te"  # explicit: honoured, the import then says what is missing
    with pytest.raises(ValueError, match="valid: auto, local, te"):
        specs.resolve_spec_backend("fused")


def test_te_available_checks_without_importing(monkeypatch):
    seen = []

    def find_spec(name):
        seen.append(name)
        return object() if name == "transformer_engine" else None

    monkeypatch.setattr(specs.importlib.util, "find_spec", find_spec)
    assert specs.te_available() and seen == ["transformer_engine"]
    monkeypatch.setattr(specs.importlib.util, "find_spec", lambda name: None)
    assert not specs.te_available()


def _fake_te(monkeypatch) -> types.SimpleNamespace:
    names = ("TELayerNormColumnParallelLinear", "TENorm", "TERowParallelLinear")
    mod = types.ModuleType("megatron.core.extensions.transformer_engine")
    for n in names:
        setattr(mod, n, type(n, (), {}))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return types.SimpleNamespace(**{n: getattr(mod, n) for n in names})


@pytest.mark.parametrize("qk_norm", [False, True])
def test_te_spec_wires_te_layers(monkeypatch, qk_norm):
    from megatron.core.transformer.identity_op import IdentityOp

    te = _fake_te(monkeypatch)
    spec = specs.layer_spec(causal=True, spec_backend="te", qk_norm=qk_norm).submodules
    attn = spec.self_attention.submodules
    assert attn.linear_qkv is te.TELayerNormColumnParallelLinear and attn.linear_proj is te.TERowParallelLinear
    assert spec.mlp.submodules.linear_fc1 is te.TELayerNormColumnParallelLinear
    assert spec.mlp.submodules.linear_fc2 is te.TERowParallelLinear
    assert spec.input_layernorm is IdentityOp and spec.pre_mlp_layernorm is IdentityOp  # fused into the GEMMs
    assert (attn.q_layernorm is te.TENorm) == qk_norm and (attn.k_layernorm is te.TENorm) == qk_norm


def test_local_spec_never_touches_te(monkeypatch):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    monkeypatch.setitem(sys.modules, "megatron.core.extensions.transformer_engine", None)  # import would fail
    spec = specs.layer_spec(causal=False, spec_backend="local", qk_norm=True).submodules
    assert spec.input_layernorm is specs.TorchNorm and spec.self_attention.submodules.q_layernorm is specs.TorchNorm
    # megatron's linears (the local spec's subclasses add the torch FP8 GEMM, off unless train.fp8_backend=torch)
    assert issubclass(spec.self_attention.submodules.linear_qkv, ColumnParallelLinear)
    assert issubclass(spec.mlp.submodules.linear_fc2, RowParallelLinear)
    assert spec.sharded_state_dict_keys_map["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"


def test_build_model_uses_the_resolved_backend(monkeypatch):
    """`build_model` asks `resolve_spec_backend` and builds every tower with the answer."""
    import qvl_train.models as models
    from qvl_train.config import ParallelConfig
    from qvl_train.models.tiny import tiny_qwen3_vl_config
    from tests.conftest import megatron_one_rank_world

    megatron_one_rank_world()
    asked = []
    real = specs.layer_spec

    def spy(**kw):  # records the backend the tower asked for, builds the local layers (no TE here)
        asked.append(kw["spec_backend"])
        return real(**{**kw, "spec_backend": "local"})

    import qvl_train.models.language as language
    import qvl_train.models.vision.qwen3_vl as qwen3_vision

    for mod in (language, qwen3_vision):
        monkeypatch.setattr(mod, "layer_spec", spy)
    monkeypatch.setattr(models, "resolve_spec_backend", lambda backend="auto": "te")
    models.build_model(tiny_qwen3_vl_config(), ParallelConfig(), pre_process=True, post_process=True)
    assert asked == ["te", "te"]  # the ViT and the LLM both got the resolved backend


def test_torch_norm_tags_sequence_parallel_weights():
    """The local norm follows `config.normalization` and marks its weights for the TP gradient sum under SP."""
    from types import SimpleNamespace

    for normalization, cls, n_params in (("RMSNorm", torch.nn.RMSNorm, 1), ("LayerNorm", torch.nn.LayerNorm, 2)):
        for sp in (False, True):
            config = SimpleNamespace(normalization=normalization, sequence_parallel=sp, params_dtype=torch.float32)
            norm = specs.TorchNorm(config, 16, eps=1e-6)
            assert type(norm) is cls and norm.eps == 1e-6
            params = list(norm.parameters())
            assert len(params) == n_params and all(p.sequence_parallel is sp for p in params)
