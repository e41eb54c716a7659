"""The one training entry point.

    torchrun --nproc_per_node=N launch/train.py +experiment=NAME key=value ...

Hydra composes `configs/train.yaml` with the chosen groups and overrides; the result becomes a typed
`TrainConfig` once, is validated before any process group starts, and goes to `qvl_train.train.run`.
"""

import os
import sys
import time
import warnings

# megatron-core warns at import about missing GPU extras (TE, Apex) and deprecated options we don't use.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from qvl_train.config import ConfigError, model_choice_error, register_configs, to_train_config  # noqa: E402

register_configs()


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from qvl_train.train import run

    try:
        train_cfg = to_train_config(cfg)
        model_before = train_cfg.model
        for line in train_cfg.check_inputs(list(HydraConfig.get().overrides.task)):  # data indexes, checkpoint model
            if os.environ.get("RANK", "0") == "0":
                print(line, flush=True)
        if train_cfg.model is not model_before:  # the architecture of model.init_from was taken
            cfg.model = OmegaConf.merge(cfg.model, OmegaConf.structured(train_cfg.model))
        run(train_cfg, OmegaConf.to_yaml(cfg, resolve=True))
    except ConfigError as err:  # every rank finds it: one copy per node, the other ranks leave it time to print
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"config error: {err}", file=sys.stderr, flush=True)
        else:
            time.sleep(3)
        sys.exit(2)


if __name__ == "__main__":  # required: dist_checkpointing saves through worker processes
    if bad_model := model_choice_error(sys.argv[1:], os.path.join(os.path.dirname(__file__), "..", "configs")):
        print(f"config error: {bad_model}", file=sys.stderr)
        sys.exit(2)
    main()
