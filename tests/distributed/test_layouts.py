"""Every layout computes the single-process training step: tp=2, pp=2, dp=2, cp=2 with the distributed
optimizer (2 processes each) and tp=2×pp=2 (4 processes) give the same losses over 6 optimizer steps
within 1e-5 relative (fp32), and read the same samples in the same steps; a checkpoint written by one process resumes at
tp=2×pp=2 with the same losses. dp=2 with the
distributed optimizer (optim.distributed=true) matches too, and its checkpoints resume bit-exactly at
dp=2, load at dp=1, and refuse (as the single process' checkpoint is refused by it) the other
optimizer format."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, torchrun

STEPS = 6


def _run(tmp_path, data_root, name, nproc, *layout, experiment="tiny"):
    out = tmp_path / name
    torchrun(
        nproc, f"+experiment={experiment}", f"output_dir={out}", f"cluster.data_root={data_root}",
        f"train.max_steps={STEPS}", "data.max_tokens=512", "train.global_batch_tokens=2048",
        "checkpoint.every=4", "wandb.mode=disabled", "data.trace=true", *layout,
    )
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    return out, rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    return _run(tmp_path_factory.mktemp("ref"), data_root, "single", 1)


@pytest.mark.parametrize(
    "name, nproc, layout",
    [
        ("tp2", 2, ["parallel.tp=2"]),
        ("tp2_sp", 2, ["parallel.tp=2", "parallel.sp=true"]),  # sequence parallelism over all STEPS, not one step
        ("pp2", 2, ["parallel.pp=2"]),
        ("dp2", 2, []),
        ("tp2_pp2", 4, ["parallel.tp=2", "parallel.pp=2"]),
        # context parallel; the distributed optimizer then shards over the dp × cp ranks
        ("cp2_distopt", 2, ["parallel.cp=2", "optim.distributed=true"]),
    ],
)
def test_layout_matches_single_process(tmp_path, data_root, reference, name, nproc, layout):
    ref_out, ref = reference
    out, rows = _run(tmp_path, data_root, name, nproc, *layout)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(ref, rows):
        assert a["tokens"] == b["tokens"] and a["samples"] == b["samples"], (a, b)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}: {a['loss']} vs {b['loss']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # The same samples in the same steps, whatever the layout.
    ref_ids = sorted((ref_out / "data_trace").glob("dp*.jsonl"))
    ids = sorted((out / "data_trace").glob("dp*.jsonl"))
    assert _step_ids(ref_ids) == _step_ids(ids)


def _step_ids(paths):
    import json

    per_step: dict[int, set] = {}
    for p in paths:
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            per_step.setdefault(rec["step"], set()).update(rec["sample_ids"])
    return per_step


def test_checkpoint_resumes_in_another_layout(tmp_path, data_root, reference):
    """Step-4 checkpoint of the single-process run, resumed at tp=2 × pp=2: steps 5-6 unchanged."""
    import shutil

    ref_out, ref = reference
    out = tmp_path / "resumed"
    shutil.copytree(ref_out / "checkpoints" / "step_0000004", out / "checkpoints" / "step_0000004")
    (out / "checkpoints" / "latest").write_text("step_0000004\n")
    _, rows = _run(tmp_path, data_root, "resumed", 4, "parallel.tp=2", "parallel.pp=2")
    assert [r["step"] for r in rows] == [5, 6]
    for a, b in zip(ref[4:], rows):
        assert a["samples"] == b["samples"] and a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def _resume_from(tmp_path, data_root, src_out, name, nproc, *layout, check=True):
    """Copy `src_out`'s step-4 checkpoint into a fresh output_dir and train it to STEPS."""
    import shutil

    step = "step_0000004"
    out = tmp_path / name
    shutil.copytree(src_out / "checkpoints" / step, out / "checkpoints" / step)
    (out / "checkpoints" / "latest").write_text(step + "\n")
    if not check:
        return torchrun(nproc, "+experiment=tiny", f"output_dir={out}", f"cluster.data_root={data_root}",
                        f"train.max_steps={STEPS}", "data.max_tokens=512", "train.global_batch_tokens=2048",
                        "wandb.mode=disabled", *layout, check=False)
    return _run(tmp_path, data_root, name, nproc, *layout)[1]


def test_distributed_optimizer_matches_and_resumes(tmp_path, data_root, reference):
    ref_out, ref = reference
    out, rows = _run(tmp_path, data_root, "dp2_distopt", 2, "optim.distributed=true")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(ref, rows):
        assert (a["tokens"], a["samples"]) == (b["tokens"], b["samples"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}: {a['loss']} vs {b['loss']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # Same layout: bit-exact (moments, fp32 slices, step count, RNG and data cursor all restored).
    again = _resume_from(tmp_path, data_root, out, "dp2_again", 2, "optim.distributed=true")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in again] == [(r["step"], r["loss"], r["grad_norm"]) for r in rows[4:]]
    # dp=2 -> dp=1: the gathered optimizer state is resliced.
    single = _resume_from(tmp_path, data_root, out, "dp1_again", 1, "optim.distributed=true")
    assert [r["step"] for r in single] == [5, 6]
    for a, b in zip(rows[4:], single):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # The single process' checkpoint holds the other optimizer format: refused before loading, with a fix.
    refused = _resume_from(tmp_path, data_root, ref_out, "refused", 2, "optim.distributed=true", check=False)
    assert refused.returncode != 0
    assert "written with optim.distributed=false" in refused.stdout + refused.stderr


def test_moe_tp2_sp_ep2_over_steps(tmp_path, data_root):
    """Tiny Qwen3-VL MoE, tensor (with sp) × expert parallel on 4 processes: the one-process losses, grad norms and
    MoE aux losses over all STEPS optimizer steps (tests/distributed/test_moe_expert_parallel.py checks step 1's
    gradients one by one)."""
    _, ref = _run(tmp_path, data_root, "moe_single", 1, experiment="tiny_qwen3_vl_moe")
    _, rows = _run(tmp_path, data_root, "moe_tp2_sp_ep2", 4, "parallel.tp=2", "parallel.sp=true", "parallel.ep=2",
                   experiment="tiny_qwen3_vl_moe")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and len(ref) == STEPS
    for a, b in zip(ref, rows):
        assert (a["tokens"], a["samples"]) == (b["tokens"], b["samples"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}: {a['loss']} vs {b['loss']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["loss/moe_aux"] == pytest.approx(a["loss/moe_aux"], rel=1e-4)
