"""`python -m data_pipelines.inspect` shows samples as the model sees them."""

import re
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines import generations
from data_pipelines.inspect import inspect, iter_tar_samples, main, render_tokens
from data_pipelines.schema import IGNORE_INDEX
from data_pipelines.shards import ShardWriter
from data_pipelines.stream import SampleBuilder
from data_pipelines.synth import generate
from data_pipelines.text import IMAGE_PAD_ID, get_tokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("insp")
    generate(str(d), 12, seed=5, samples_per_shard=6)
    return str(d)


def test_inspect_prints_tokens_pads_loss_grids_cost(shards, capsys):
    assert main([shards, "--n", "12"]) == 0
    out = capsys.readouterr().out
    assert out.count("── sample synth-5-") == 12
    assert "<|im_start|>system\n   You are a helpful assistant.<|im_end|>" in out
    pads = [int(n) for n in re.findall(r"<\|vision_start\|><\|image_pad\|>×(\d+)<\|vision_end\|>", out)]
    grids = re.findall(r"grid \(t,h,w\)=\((\d+),(\d+),(\d+)\) patches, \d+ ViT patches, (\d+) LLM tokens", out)
    assert pads and len(pads) == len(grids)
    assert pads == [int(t) * int(h) * int(w) // 4 for t, h, w, _ in grids] == [int(g[3]) for g in grids]
    assert "<|image_pad|><|image_pad|>" not in out  # runs are collapsed
    assert re.search(r"<\|im_start\|>assistant\n   ⟦[^⟧]+<\|im_end\|>⟧", out)  # answer + stop token trained
    for planned, built in re.findall(r"cost estimate \(index\): (\d+) tokens \(text \d+\); built: (\d+)", out):
        assert int(planned) >= int(built)  # exact except grounding boxes (upper bound)
    # one tar, other generation and pixel bounds
    assert main([shards + "/shard-000001.tar", "--n", "1", "--generation", "qwen2_5_vl", "--max-pixels", "3136"]) == 0
    out = capsys.readouterr().out
    assert out.count("── sample") == 1 and "qwen2_5_vl" in out and "key 000000006" in out
    with pytest.raises(SystemExit, match="neither a shard directory"):
        main([shards + "/index.json"])


def test_render_tokens_marks_label_spans():
    tok = get_tokenizer()
    ids = tok.encode("Hi") + [IMAGE_PAD_ID] * 3 + tok.encode(" there")
    labels = [IGNORE_INDEX] * (len(ids) - 1) + ids[-1:]
    assert render_tokens(ids, labels) == "Hi<|image_pad|>×3⟦ there⟧"


# ------------------------------------------- inspect = the loader, for every registered generation
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _training_data_configs() -> dict[str, list[tuple[str, object]]]:
    """generation → [(what, DataConfig)] that training composes: every model config with the default
    data group, and every tiny experiment (with its own pixel caps)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qvl_train.config import register_configs, to_train_config

    register_configs()
    overrides = [f"model={p.parent.name}/{p.stem}" for p in sorted((CONFIGS / "model").glob("*/*.yaml"))]
    overrides += [f"+experiment={p.stem}" for p in sorted((CONFIGS / "experiment").glob("tiny*.yaml"))]
    found: dict[str, list] = {}
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for o in overrides:
            data = to_train_config(compose(config_name="train", overrides=[o])).data
            found.setdefault(data.generation, []).append((o, data))
    GlobalHydra.instance().clear()
    return found


_IMAGE_LINE = re.compile(r"image 0: 512x512 px \(w x h\) → (\d+)x(\d+) px, grid \(t,h,w\)=\((\d+),(\d+),(\d+)\) patches, "
                         r"(\d+) ViT patches, (\d+) LLM tokens")
_TOKENS_LINE = re.compile(r"tokens (\d+) = text (\d+) \+ visual (\d+);")
_HEADER = re.compile(r"pixels (\d+)\.\.(\d+), patch (\d+), merge (\d+);")


def _inspect_numbers(path: str, generation: str, *pixels: int) -> dict[str, tuple]:
    kw = dict(zip(("min_pixels", "max_pixels"), pixels))
    out = inspect(path, generation, 1, **kw)
    img, tokens, header = _IMAGE_LINE.search(out), _TOKENS_LINE.search(out), _HEADER.search(out)
    assert img and tokens and header, out
    size_wh, grid, vit, llm = img.groups()[:2], img.groups()[2:5], img.group(6), img.group(7)
    return {"resized": tuple(map(int, size_wh)), "grid": tuple(map(int, grid)), "vit_patches": int(vit),
            "llm_tokens": int(llm), "total": int(tokens.group(1)), "visual": int(tokens.group(3)),
            "patch_merge": (int(header.group(3)), int(header.group(4)))}


def _loader_numbers(members: dict, cfg) -> dict[str, tuple]:
    s = SampleBuilder(cfg, get_tokenizer(cfg.tokenizer, cfg.generation)).build(members)  # as make_builders
    (t, h, w), = [tuple(int(v) for v in g) for g in s["grids"]]
    return {"resized": (w * cfg.patch_size, h * cfg.patch_size), "grid": (t, h, w), "vit_patches": t * h * w,
            "llm_tokens": s["visual_tokens"], "total": len(s["input_ids"]), "visual": s["visual_tokens"],
            "patch_merge": (cfg.patch_size, cfg.merge_size)}


def test_inspect_numbers_equal_the_loaders_for_every_generation(tmp_path):
    """A 512×512 image: inspect's grid, ViT patches, LLM tokens and total tokens are the loader's under
    the DataConfig training composes for each generation (its model config's patch / merge / temporal
    sizes); without pixel flags inspect uses the generation's own (Qwen3-VL: patch 16 → 256 tokens)."""
    with ShardWriter(str(tmp_path), samples_per_shard=1) as w:
        w.add("sq", [{"role": "user", "content": [{"type": "image", "name": "img0.png"},
                                                  {"type": "text", "text": "What is this?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}],
              {"img0.png": Image.new("RGB", (512, 512), (30, 140, 60))})
    members = next(iter_tar_samples(str(tmp_path / "shard-000000.tar")))[1]
    configs = _training_data_configs()
    assert set(configs) == set(generations.NAMES)  # every registered generation is checked
    for generation, cfgs in configs.items():
        for what, cfg in cfgs:
            loader = _loader_numbers(members, cfg)
            assert _inspect_numbers(str(tmp_path), generation, cfg.min_pixels, cfg.max_pixels) == loader, what
            if not what.startswith("+experiment"):  # released sizes at the default pixel bounds: no flags needed
                assert _inspect_numbers(str(tmp_path), generation) == loader, what
        spec = generations.get(generation)
        assert {(c.patch_size, c.merge_size, c.temporal_patch_size) for _, c in cfgs} == {
            (spec.image.patch_size, spec.image.merge_size, spec.image.temporal_patch_size)}, generation
    qwen3 = generations.get(next(n for n in generations.NAMES if generations.get(n).image.patch_size == 16))
    numbers = _inspect_numbers(str(tmp_path), qwen3.name)
    assert numbers["resized"] == (512, 512) and numbers["grid"] == (1, 32, 32) and numbers["llm_tokens"] == 256
