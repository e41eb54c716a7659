"""Only the generation registries may branch on a generation's name.

A generation is one registry entry (`data_pipelines/generations/`, `qvl_train/generations/`):
everything else asks the registry for what differs (template tokens, preprocessing, positions, video
rules, grounding, builder, HF mapping, FLOPs). This test walks the AST of every module outside the
registries and fails on

* a comparison (`==`, `!=`, `in`, `not in`) with a generation name literal (or a tuple / list / set
  of them), a membership test of an expression named `*generation*`, or an equality between such an
  expression and something that is not one (two generation values may be compared);
* a dict literal keyed by generation names (a hidden branch: `{"qwen2_vl": ...}[generation]`).

`grep -rnE "generation (==|!=|in)" qvl_train/ data_pipelines/ launch/` is checked as well.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("qvl_train", "data_pipelines", "launch")
REGISTRIES = (ROOT / "data_pipelines" / "generations", ROOT / "qvl_train" / "generations")


def _names() -> set[str]:
    from data_pipelines.generations import NAMES

    return set(NAMES)


def _files():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if not any(reg in path.parents for reg in REGISTRIES):
                yield path


def _is_name_literal(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value in names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_name_literal(e, names) for e in node.elts)
    return False


def _mentions_generation(node: ast.AST) -> bool:
    """`generation`, `cfg.generation`, `meta.get("generation")`, `GENERATIONS`, ..."""
    if isinstance(node, ast.Name):
        return "generation" in node.id.lower()
    if isinstance(node, ast.Attribute):
        return "generation" in node.attr.lower()
    if isinstance(node, (ast.Call, ast.Subscript)):
        return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and "generation" in n.value.lower()
                   for n in ast.walk(node))
    return False


def _is_branch(node: ast.Compare, names: set[str]) -> bool:
    """A comparison that picks behaviour by generation: against a name literal, a membership test of a
    generation (in a hand-written collection), or an equality between a generation and something that
    is not one. Comparing two generation values (`data.generation != model.generation`) is not a branch."""
    operands = [node.left, *node.comparators]
    if any(_is_name_literal(o, names) for o in operands):
        return True
    if not any(_mentions_generation(o) for o in operands):
        return False
    if any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
        return True
    return not all(_mentions_generation(o) for o in operands)


def _scan(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, what) of every generation branch in `source`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            if _is_branch(node, names):
                out.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Dict):
            if any(k is not None and _is_name_literal(k, names) for k in node.keys):
                out.append((node.lineno, "dict keyed by generation names"))
    return out


def test_no_generation_branches_outside_the_registries():
    names = _names()
    found = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in _files() for line, what in _scan(path.read_text(), names)]
    assert not found, "generation names compared outside the registry (ask the registry instead):\n" + "\n".join(found)


def test_grep_finds_no_generation_branches_outside_the_registries():
    pattern = re.compile(r"generation (==|!=|in)\b")
    hits = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in _files()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("snippet", [
    "if cfg.generation == 'qwen2_vl': pass",
    "x = generation in ('qwen3_vl', 'qwen3_vl_moe')",
    "t = {'qwen_vl': 1}",
    "ok = g != 'qwen2_5_vl'",
    "x = cfg.generation in QWEN3",
    "x = generation == g",
])
def test_the_scan_catches_branches(snippet):
    assert _scan(snippet + "\n", _names()), f"{snippet!r} was not caught"


def test_comparing_two_generation_values_is_allowed():
    assert not _scan("if meta.get('generation') != cfg.generation: pass\n", _names())
