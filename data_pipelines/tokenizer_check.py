"""Start-time check that the tokenizer in use, the generation's template and the model's vocabulary agree.

A wrong combination otherwise surfaces deep inside a forward as `IndexError: index out of range in self`
(an id past the embedding table), or silently (a model whose image-pad id is not the one the data writes
never receives its image features). `check_tokenizer` turns each case into a message that names the
setting to change; `TrainConfig.validate` (before any process group starts) and
`python -m qvl_train.tools.hf_parity` call it.

What is checked, for tokenizer `data.tokenizer` (None = the bundled Qwen BPE) and generation `g`:

* every token `g`'s template writes (`<|im_start|>`, `<|im_end|>`, the image / video wrappers and pads,
  `<think>` / `</think>` where `g` has them as added tokens, the grounding tags where they are special
  tokens) exists in the tokenizer;
* with a bundled tokenizer (the Qwen BPE, or the Qwen3.5 vocabulary for generations with Qwen3.5's ids:
  `text.get_tokenizer`), those tokens have the ids of `g`'s `DataSpec.special_tokens()` table;
* the largest id the tokenizer can emit, and the model's image / video pad ids, are below
  `model.llm.vocab_size`, and the model's pads are the tokenizer's pads.

This module is on the data side: it takes plain values, not the model's config objects.
"""

from __future__ import annotations

from typing import Optional

from data_pipelines import generations

__all__ = ["TokenizerMismatch", "template_tokens", "check_tokenizer", "tokenizer_pad_ids"]

_GROUNDING_TOKENS = {
    "special_tokens": ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"),
    "qwen_vl_tags": ("<ref>", "</ref>", "<box>", "</box>"),
}


class TokenizerMismatch(ValueError):
    """The tokenizer, the generation and the model's vocabulary do not fit together (message says how to fix)."""


def template_tokens(generation: str) -> tuple[str, ...]:
    """The special tokens `generation`'s template writes (module docstring), in a stable order."""
    spec = generations.get(generation)
    names = ["<|im_start|>", "<|im_end|>", *spec.image_tokens]
    if spec.video is not None:
        names += spec.video_tokens
    if spec.think_tokens:
        names += ["<think>", "</think>"]
    names += _GROUNDING_TOKENS.get(spec.grounding, ())
    return tuple(dict.fromkeys(names))


def _tokenizer(tokenizer_dir: Optional[str], generation: str):
    from data_pipelines.text import get_tokenizer

    try:
        return get_tokenizer(tokenizer_dir, generation)
    except ValueError as err:
        raise TokenizerMismatch(str(err)) from None


def tokenizer_pad_ids(generation: str, tokenizer_dir: Optional[str]) -> tuple[int, Optional[int]]:
    """(image pad id, video pad id or None) of `generation` as written by the tokenizer in use."""
    spec = generations.get(generation)
    tok = _tokenizer(tokenizer_dir, generation)
    try:
        image = tok.special(spec.image_tokens[1])
        video = None if spec.video is None else tok.special(spec.video_tokens[1])
    except KeyError as err:
        raise TokenizerMismatch(_where(tokenizer_dir, generation) + f" lacks {err.args[0]}") from None
    return image, video


def _where(tokenizer_dir: Optional[str], generation: str) -> str:
    from data_pipelines.text import QWEN35_BPE, bundled_vocabulary

    if tokenizer_dir:
        return f"data.tokenizer={tokenizer_dir}"
    name = "Qwen3.5 vocabulary" if bundled_vocabulary(generation) == QWEN35_BPE else "Qwen BPE"
    return f"the bundled {name} (data.tokenizer unset)"


def check_tokenizer(
    generation: str, tokenizer_dir: Optional[str], vocab_size: int,
    image_pad_id: Optional[int] = None, video_pad_id: Optional[int] = None, vocab_key: str = "model.llm.vocab_size",
) -> None:
    """Raise `TokenizerMismatch` when the combination cannot train (module docstring); None when it can.

    `image_pad_id` / `video_pad_id`: the ids the model replaces with vision features (None: not checked);
    `vocab_key`: how the message names the vocabulary size (a config key, or a checkpoint's config.json)."""
    spec = generations.get(generation)
    tok = _tokenizer(tokenizer_dir, generation)
    where = _where(tokenizer_dir, generation)
    missing, ids = [], {}
    for name in template_tokens(generation):
        try:
            ids[name] = tok.special(name)
        except KeyError:
            missing.append(name)
    if missing:
        raise TokenizerMismatch(
            f"{where} lacks {', '.join(missing)}, which generation {generation}'s chat template writes; "
            "point data.tokenizer at the tokenizer directory of a checkpoint of this generation"
        )
    if tokenizer_dir is None:
        table = spec.special_tokens()
        wrong = [(n, ids[n], table[n]) for n in ids if n in table and table[n] != ids[n]]
        if wrong:
            name, mine, theirs = wrong[0]
            raise TokenizerMismatch(
                f"generation {generation} writes {name} as {theirs}, but {where} has it as {mine}; set "
                "data.tokenizer=DIR to the checkpoint's directory (it holds tokenizer.json)"
            )
    top_name, top = max(ids.items(), key=lambda kv: kv[1])
    emitted = max(top, tok.vocab_size - 1)
    if emitted >= vocab_size:
        what = f"{top_name} = {top}" if top == emitted else f"its vocabulary reaches id {emitted}"
        raise TokenizerMismatch(
            f"{where} emits ids up to {emitted} ({what}) but {vocab_key}={vocab_size} embeds only ids "
            f"0..{vocab_size - 1}; use the tokenizer of this checkpoint or a model with vocab_size > {emitted}"
        )
    pads = [("image", image_pad_id, spec.image_tokens[1]), ("video", video_pad_id, spec.video_tokens[1])]
    for kind, model_id, token in pads:
        if model_id is None or (kind == "video" and spec.video is None):
            continue
        if model_id >= vocab_size:
            raise TokenizerMismatch(
                f"the model's {kind} pad id {model_id} is >= {vocab_key}={vocab_size}; "
                f"set model.{kind}_token_id to {ids[token]} ({token} of {where})"
            )
        if model_id != ids[token]:
            raise TokenizerMismatch(
                f"the model takes {kind} features at id {model_id} but {where} writes {token} as {ids[token]}; "
                f"set model.{kind}_token_id={ids[token]} (or leave it unset to follow the tokenizer)"
            )


def check_checkpoint_ids(
    hf_dir: str, generation: str, vocab_size: int, image_pad_id: Optional[int], video_pad_id: Optional[int],
    text_ids_below: int = 0,
) -> None:
    """For tools that feed an HF checkpoint ids of their own (`python -m qvl_train.tools.hf_parity`): every id
    they write (the generation's template tokens, the model's pads, random text ids below `text_ids_below`)
    must be below the checkpoint's `vocab_size`. The tokenizer is the checkpoint's own `tokenizer.json` when
    the directory has one, else the generation's id table. Exits with a message instead of the forward's
    `IndexError: index out of range in self`."""
    import os

    key = f"vocab_size={vocab_size} in {os.path.join(hf_dir, 'config.json')}"
    own = os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))
    try:
        if own:
            check_tokenizer(generation, hf_dir, vocab_size, image_pad_id, video_pad_id, vocab_key=key)
        spec = generations.get(generation)
        table = spec.special_tokens()
        ids = {n: table[n] for n in template_tokens(generation) if n in table and not own}
        ids.update({"the image pad": image_pad_id, "the video pad": video_pad_id})
        if text_ids_below:
            ids["the largest random text id"] = text_ids_below - 1
        name, top = max(((n, i) for n, i in ids.items() if i is not None), key=lambda kv: kv[1])
        if top >= vocab_size:
            raise TokenizerMismatch(
                f"{name} has id {top} but the checkpoint's {key} embeds only ids 0..{vocab_size - 1}: this "
                f"checkpoint's vocabulary does not hold generation {generation}'s token ids; build it with "
                f"vocab_size > {top} (or the ids of its own tokenizer.json)"
            )
    except TokenizerMismatch as err:
        raise SystemExit(f"error: {hf_dir}: {err}") from None
