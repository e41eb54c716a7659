"""The synthetic data factory: small images with known answers, written as training shards.

`python -m data_pipelines.synth --out DIR --num-samples N` (see `factory.py`) writes shards and
index.json in the format of `data_pipelines.shards`, deterministically from `--seed`.
"""

from data_pipelines.synth.factory import generate, make_sample

__all__ = ["generate", "make_sample"]
