"""Run one optimizer step per stage and report which modules' parameters changed (JSON on stdout).

Invoked by test_stages.py in its own process (a one-process gloo world):
    python tests/e2e/stage_probe.py DATA_ROOT
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(data_root: str) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from data_pipelines.stream import StepLoader
    from qvl_train.config import StageConfig, register_configs, to_train_config
    from qvl_train.engines.megatron import MegatronEngine
    from qvl_train.parallel.dims import ParallelDims

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = to_train_config(compose("train", overrides=[
            "+experiment=tiny", f"cluster.data_root={data_root}", "data.max_tokens=512",
            "train.global_batch_tokens=512", "optim.warmup_steps=0",
        ]))
    dims = ParallelDims.from_config(cfg.parallel, 1)
    dims.initialize()
    report = {}
    for stage in ("stage1_align", "stage2_multitask", "stage3_sft"):
        engine = MegatronEngine(cfg.model, cfg.parallel, cfg.optim, StageConfig(stage), dims,
                                seed=cfg.seed, max_steps=10)
        before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
        loader = StepLoader(cfg.data, micro_batches_per_step=1, dp_rank=0, dp_size=1)
        batches = loader.next_step()
        assert batches[0].grid_thw.shape[0] > 0 or True
        engine.train_step(batches, 0)
        changed = sorted({n.split(".")[0] for n, p in engine.model.named_parameters()
                          if not torch.equal(before[n], p.detach())})
        frozen_changed = [n for n, p in engine.model.named_parameters()
                          if not p.requires_grad and not torch.equal(before[n], p.detach())]
        report[stage] = {"changed": changed, "frozen_changed": frozen_changed,
                         "images": int(batches[0].grid_thw.shape[0])}
    print(json.dumps(report))
    dims.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
