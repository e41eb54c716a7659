"""The data side's generation registry: `get(name) -> DataSpec`.

Adding a generation = one module here with its `DataSpec` + one line in `_SPECS` (and the model side's
entry in `qvl_train/generations/`); see `docs/adding_a_generation.md`. Nothing outside the two
registries compares generation names.
"""

from __future__ import annotations

from data_pipelines.generations import qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_vl, qwen_vl
from data_pipelines.generations.base import GROUNDING_FORMATS, DataSpec, VideoRules

__all__ = ["DataSpec", "VideoRules", "GROUNDING_FORMATS", "NAMES", "get", "count_keys", "check"]

_SPECS: dict[str, DataSpec] = {
    spec.name: spec
    for spec in (qwen_vl.SPEC, qwen2_vl.SPEC, qwen2_5_vl.SPEC, qwen3_vl.SPEC, qwen3_vl.MOE_SPEC, qwen3_5.SPEC, qwen3_5.MOE_SPEC)
}
NAMES: tuple[str, ...] = tuple(_SPECS)


def check(name: str, key: str = "data.generation") -> None:
    """ValueError naming `key` and the known generations when `name` is not one."""
    if name not in _SPECS:
        raise ValueError(f"{key}={name!r} is unknown; valid: {', '.join(NAMES)}")


def get(name: str) -> DataSpec:
    """The `DataSpec` of generation `name` (ValueError listing the known ones otherwise)."""
    check(name)
    return _SPECS[name]


def count_keys() -> tuple[str, ...]:
    """The distinct keys under which the shard index stores per-generation text-token counts."""
    return tuple(dict.fromkeys(spec.count_key for spec in _SPECS.values()))


def first_with_count_key(key: str) -> DataSpec:
    """The generation whose template defines the text-token count stored under `key`."""
    return next(spec for spec in _SPECS.values() if spec.count_key == key)
