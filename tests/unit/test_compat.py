"""qvl_train.compat: each shim refuses to patch a release other than the pinned one, with a message that
names the pin, and the pins agree with pyproject.toml and constraints.txt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from qvl_train import compat
from qvl_train.compat import PINS, PinMismatch, require_pinned

ROOT = Path(__file__).resolve().parents[2]


def _fake_version(monkeypatch, versions: dict[str, str | None]) -> None:
    monkeypatch.setattr(compat, "installed_version", lambda dist: versions[dist])


@pytest.mark.parametrize("dist", sorted(PINS))
def test_pinned_release_passes(dist):
    assert compat.installed_version(dist) == PINS[dist]  # this environment is the pinned stack
    require_pinned(dist)


@pytest.mark.parametrize("dist", sorted(PINS))
def test_local_build_of_the_pinned_release_passes(monkeypatch, dist):
    _fake_version(monkeypatch, {dist: PINS[dist] + "+git1234"})
    require_pinned(dist)


@pytest.mark.parametrize("dist", sorted(PINS))
def test_other_release_names_installed_required_and_fix(monkeypatch, dist):
    _fake_version(monkeypatch, {dist: "9.9.9"})
    with pytest.raises(PinMismatch) as err:
        require_pinned(dist)
    msg = str(err.value)
    assert f"{dist}=={PINS[dist]}" in msg  # required
    assert f"{dist}==9.9.9 is installed" in msg  # installed
    assert "pip install -c constraints.txt -e ." in msg  # the fix


def test_missing_distribution_is_named(monkeypatch):
    _fake_version(monkeypatch, {"deepspeed": None})
    with pytest.raises(PinMismatch, match=r"no deepspeed is installed"):
        require_pinned("deepspeed")


def test_prerelease_of_the_pinned_version_is_refused(monkeypatch):
    _fake_version(monkeypatch, {"megatron-core": PINS["megatron-core"] + "rc0"})
    with pytest.raises(PinMismatch):
        require_pinned("megatron-core")


def test_pins_match_pyproject_and_constraints():
    for name in ("pyproject.toml", "constraints.txt"):
        text = (ROOT / name).read_text()
        for dist, version in PINS.items():
            found = set(re.findall(rf"\b{re.escape(dist)}==([\w.+-]+)", text))
            assert found == {version}, f"{name} pins {dist} to {found}, qvl_train.compat.PINS to {version}"


# ---- each shim checks at the moment it patches, before touching the library


def test_cpu_compat_refuses_other_megatron(monkeypatch):
    from qvl_train.compat import megatron_cpu

    monkeypatch.setattr(megatron_cpu, "_INSTALLED", False)  # as in a fresh process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    current_device = torch.cuda.current_device
    _fake_version(monkeypatch, {"megatron-core": "0.17.0"})
    with pytest.raises(PinMismatch, match=r"megatron-core==0\.16\.1.*megatron-core==0\.17\.0 is installed"):
        megatron_cpu.install_cpu_compat()
    assert torch.cuda.current_device is current_device  # nothing was patched
    assert megatron_cpu._INSTALLED is False


def test_moe_shim_refuses_other_megatron(monkeypatch):
    from megatron.core.transformer.moe import moe_utils

    from qvl_train.compat.megatron_moe import install_moe_without_te

    monkeypatch.delattr(moe_utils, "te_general_gemm", raising=False)  # as before the first MoE build without TE
    _fake_version(monkeypatch, {"megatron-core": "0.15.0"})
    with pytest.raises(PinMismatch, match=r"megatron-core==0\.15\.0 is installed"):
        install_moe_without_te()
    assert not hasattr(moe_utils, "te_general_gemm")
    monkeypatch.undo()
    monkeypatch.delattr(moe_utils, "te_general_gemm", raising=False)
    assert install_moe_without_te() is True
    assert moe_utils.te_general_gemm is None
    assert install_moe_without_te() is True  # idempotent


def test_deepspeed_shm_shim(monkeypatch):
    pytest.importorskip("deepspeed")
    import importlib

    from qvl_train.compat.deepspeed_comm import skip_shm_build

    backend = importlib.import_module("deepspeed.comm.torch")
    original = backend.build_shm_op
    with skip_shm_build():
        assert backend.build_shm_op() is None
    assert backend.build_shm_op is original
    _fake_version(monkeypatch, {"deepspeed": "0.18.0"})
    with pytest.raises(PinMismatch, match=r"deepspeed==0\.19\.8.*deepspeed==0\.18\.0 is installed"):
        with skip_shm_build():
            pass
    assert backend.build_shm_op is original
