"""Every `launch/train.py` command in README.md composes and validates at its own process count
(`--nproc_per_node`, 1 for plain python): a README example that a config change broke fails here
rather than on a user's cluster. Commands with shell variables or placeholders are skipped."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.conftest import ROOT
from tests.unit.test_config import _compose


def readme_train_commands() -> list[tuple[int, list[str]]]:
    """(world size, overrides) of each train command in the README's bash blocks."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if "launch/train.py" not in line or line.startswith("#") or re.search(r"[$<>]|\.\.\.", line):
                continue
            words = shlex.split(line)
            nproc = next((int(w.split("=", 1)[1]) for w in words if w.startswith("--nproc_per_node=")), 1)
            overrides = words[words.index("launch/train.py") + 1:]
            commands.append((nproc, overrides))
    return commands


COMMANDS = readme_train_commands()


def test_the_readme_has_train_commands():
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("nproc, overrides", COMMANDS, ids=[" ".join(o)[:80] for _, o in COMMANDS])
def test_readme_train_command_validates(nproc, overrides, monkeypatch):
    from qvl_train.train import launch_world_size

    cfg = _compose(*overrides)
    # the commands target GPU clusters: explicit FP8 checks for FP8 tensor cores, which this CPU lacks
    monkeypatch.setattr("qvl_train.models.specs.gpu_fp8_capable", lambda: (True, "a GPU of the README's cluster"))
    if nproc == 1:  # plain python: a dry run takes the experiment's job size
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        nproc = launch_world_size(cfg)
    cfg.validate(nproc)
