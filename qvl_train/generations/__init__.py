"""The model side's generation registry: `get(name) -> ModelSpec`, `from_hf_model_type(model_type)`.

Adding a generation = one folder here with its `ModelSpec` + one line in `_SPECS`, the data side's
`DataSpec` (`data_pipelines/generations/`), and `configs/model/<name>/*.yaml` (see
`docs/adding_a_generation.md`). Nothing outside the two registries compares generation names
(`tests/unit/test_generation_registry_only.py`).
"""

from __future__ import annotations

from qvl_train.generations import qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_vl, qwen_vl
from qvl_train.generations.base import ModelSpec

__all__ = ["ModelSpec", "NAMES", "get", "from_hf_model_type", "check", "check_data_matches"]

_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (qwen_vl.SPEC, qwen2_vl.SPEC, qwen2_5_vl.SPEC, qwen3_vl.SPEC, qwen3_vl.MOE_SPEC, qwen3_5.SPEC, qwen3_5.MOE_SPEC)
}
NAMES: tuple[str, ...] = tuple(_SPECS)


def check(name: str, key: str = "model.generation") -> None:
    """ValueError naming `key` and the implemented generations when `name` is not one."""
    if name not in _SPECS:
        raise ValueError(f"{key}={name!r} is not implemented; implemented: {', '.join(NAMES)}")


def get(name: str) -> ModelSpec:
    """The `ModelSpec` of generation `name`."""
    check(name)
    return _SPECS[name]


def check_data_matches(model_generation: str, data_generation: str) -> None:
    """ValueError when the data side would render another generation than the model is."""
    if data_generation != model_generation:
        raise ValueError(
            f"data.generation={data_generation!r} differs from model.generation={model_generation!r}; "
            "remove the data.generation override"
        )


def from_hf_model_type(model_type) -> ModelSpec:
    """The generation whose released `config.json` has this `model_type`."""
    for spec in _SPECS.values():
        if spec.hf_model_type == model_type:
            return spec
    known = ", ".join(spec.hf_model_type for spec in _SPECS.values())
    raise ValueError(f"config.json model_type={model_type!r}; convertible: {known}")
