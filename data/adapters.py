"""Data sets → training samples for the 4-stage recipe.

Every source becomes one sample form, ``{"id": str, "image": PIL.Image | None, "messages": [...]}``, with
``messages`` in transformers chat format (``{"role": ..., "content": [{"type": "image"}, {"type": "text", ...}]}``),
ready for ``processor.apply_chat_template(messages)`` and ``processor(images=..., text=...)`` in a collator.

* :func:`load_rows` reads a Hub dataset id, or a local parquet / JSON / JSONL file or folder, optionally streaming.
* :func:`detect_schema` picks the adapter from the columns: LLaVA conversations, image–caption or image–question–answer.
* :func:`adapt` wraps the rows in a lazy torch dataset (:class:`AdaptedDataset`, or :class:`AdaptedIterableDataset` for
  streams): each row is adapted and its image decoded only when it is read.

Bad rows never crash an epoch and are never dropped silently: an unreadable image or a malformed row is skipped,
counted by reason in the dataset's :class:`SkipCounter` (``dataset.skips.report()``), and logged the first few times.
What makes a row unusable for a given processor comes from the caller, since this package knows no processor: the
`placeholders` a text must not spell out (its image token), and an `encode` function that turns a sample into
model inputs and raises :class:`SkipRow` for one that cannot train (too long for `max_length`).

With ``transformers.Trainer``, set ``remove_unused_columns=False``: otherwise, for a dataset that is not a
``datasets.Dataset``, the Trainer strips every key the model's ``forward`` does not take (``messages``, ``image``)
before the collator sees the samples (`train.trainer.SkipReportCallback` logs the skip report at each epoch end).
"""

from __future__ import annotations

import math
import numbers
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import datasets
import torch.utils.data
from PIL import Image as PILImage

from .images import decode_image, has_image
from .prompts import (
    CAPTION_PROMPT,
    IMAGE_TAG,
    VQA_INSTRUCTION,
    caption_messages,
    text_item,
    user_content,
    vqa_messages,
)
from .skips import SkipCounter, SkipRow
from .sources import Rows, load_rows

Schema = Literal["llava", "caption", "vqa"]
ID_COLUMNS = ("id", "image_id", "img_id", "cocoid", "question_id")
CAPTION_COLUMNS = ("caption", "captions", "sentences")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class Sample(TypedDict):
    id: str
    image: PILImage.Image | None
    messages: list[dict[str, Any]]


class EncodedSample(Sample, total=False):
    encoded: Any  # what the dataset's `encode` made of the sample (the collator's model inputs)


Encoder = Callable[[Sample], Any]


def detect_schema(column_names: Iterable[str]) -> Schema:
    """Which adapter fits these columns: "llava" (conversations), "vqa" (question + answer) or "caption"."""
    columns = set(column_names)
    if "conversations" in columns:
        return "llava"
    if "image" in columns and {"question", "answer"} <= columns:
        return "vqa"
    if "image" in columns and columns & set(CAPTION_COLUMNS):
        return "caption"
    raise ValueError(
        f"cannot tell the data schema from the columns {sorted(columns)}: expected LLaVA conversations "
        f"('conversations', optional 'image'), image–caption ('image' with one of {list(CAPTION_COLUMNS)}) "
        "or image–question–answer ('image', 'question', 'answer')"
    )


def as_text(value: Any) -> str | None:
    """A cell as text: a string as it is, a number spelled out (an answer `3`, a numeric caption; a float column's
    `3.0` as "3", since pandas stores integers with gaps as floats); None for anything else (None, NaN, a list)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return str(int(value)) if float(value).is_integer() else str(value)


def llava_messages(conversations: Any, with_image: bool) -> list[dict[str, Any]]:
    """LLaVA ``conversations`` (``from``/``value``; ShareGPT ``role``/``content`` also read) → chat messages.

    Raises :class:`SkipRow` unless there is exactly one ``<image>`` tag, in a user turn, when `with_image`
    (none otherwise), every turn has a known role and text, and at least one assistant turn has text.
    """
    if not isinstance(conversations, Sequence) or isinstance(conversations, str) or not conversations:
        raise SkipRow("bad_conversation", "empty or not a list of turns")
    turns = [_llava_turn(turn) for turn in conversations]
    tags = sum(text.count(IMAGE_TAG) for _, text in turns)
    if tags != (1 if with_image else 0):
        raise SkipRow("image_tag_count", f"{tags} {IMAGE_TAG} tags {'with an' if with_image else 'without'} image")
    if any(IMAGE_TAG in text for role, text in turns if role != "user"):
        raise SkipRow("bad_conversation", f"{IMAGE_TAG} tag outside a user turn")
    if not any(role == "assistant" and text.strip() for role, text in turns):
        raise SkipRow("bad_conversation", "no assistant turn with text")
    return [
        {"role": role, "content": user_content(text) if role == "user" else [text_item(text)]} for role, text in turns
    ]


def _llava_turn(turn: Any) -> tuple[str, str]:
    if not isinstance(turn, Mapping):
        raise SkipRow("bad_conversation", f"a turn is a {type(turn).__name__}, not a dict")
    speaker, text = turn.get("from", turn.get("role")), as_text(turn.get("value", turn.get("content")))
    if speaker not in ROLES:
        raise SkipRow("bad_conversation", f"unknown speaker {speaker!r}")
    if text is None:
        raise SkipRow("bad_conversation", f"a {speaker!r} turn has no text")
    return ROLES[speaker], text


def caption_references(row: Mapping[str, Any]) -> list[str]:
    """Non-empty reference captions (numbers spelled out) from ``caption`` (one or a list), ``captions`` or
    Karpathy ``sentences``."""
    references: list[str] = []
    for column in CAPTION_COLUMNS:
        value = row.get(column)
        for item in value if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]:
            text = as_text(item.get("raw") if isinstance(item, Mapping) else item)  # Karpathy: {"raw": ..., ...}
            if text is not None and text.strip():
                references.append(text.strip())
    return references


def row_id(row: Mapping[str, Any], index: int) -> str:
    """The row's own id (first of `ID_COLUMNS` present), else its position."""
    return next((str(row[c]) for c in ID_COLUMNS if row.get(c) is not None), str(index))


@dataclass(frozen=True)
class RowAdapter:
    """Turns one row of a given schema into a :class:`Sample`, raising :class:`SkipRow` for a row it cannot use.

    `reference`: which caption of a multi-reference row to train on: the "first", or a "random" one drawn from a
    generator seeded by `seed` and the references themselves, so the pick is the same in any order or worker.
    `image_root`: the folder that relative image paths (JSON data sets) are relative to.
    `placeholders`: strings no text may contain besides the ``<image>`` tags of LLaVA user turns (pass the
    processor's image token): the processor would read one as an image, so such a row is skipped.
    """

    schema: Schema
    caption_prompt: str = CAPTION_PROMPT
    vqa_instruction: str = VQA_INSTRUCTION
    reference: Literal["first", "random"] = "first"
    seed: int = 0
    image_root: str | None = None
    placeholders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.schema not in ("llava", "caption", "vqa"):
            raise ValueError(f"schema must be 'llava', 'caption' or 'vqa', got {self.schema!r}")
        if self.reference not in ("first", "random"):
            raise ValueError(f"reference must be 'first' or 'random', got {self.reference!r}")

    def __call__(self, row: Mapping[str, Any], index: int) -> Sample:
        try:
            messages = self._messages(row)  # text checks first: no image is decoded for a row skipped anyway
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise SkipRow("malformed_row", f"{type(error).__name__}: {error}") from error
        self._check_placeholders(messages)
        image = decode_image(row.get("image"), self.image_root)
        return {"id": row_id(row, index), "image": image, "messages": messages}

    def _messages(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.schema == "llava":
            return llava_messages(row["conversations"], has_image(row.get("image")))
        if not has_image(row.get("image")):
            raise SkipRow("missing_image", f"a {self.schema} row needs an image")
        if self.schema == "caption":
            return caption_messages(self._pick(caption_references(row)), self.caption_prompt)
        question, answer = as_text(row.get("question")), as_text(row.get("answer"))
        if question is None or answer is None or not question.strip() or not answer.strip():
            raise SkipRow("missing_text", "empty question or answer")
        return vqa_messages(question, answer.strip(), self.vqa_instruction)

    def _check_placeholders(self, messages: list[dict[str, Any]]) -> None:
        """The tags became image items (`user_content`), so a placeholder left in a text item is literal text."""
        for message in messages:
            for item in message["content"]:
                found = [p for p in (IMAGE_TAG, *self.placeholders) if p in item.get("text", "")]
                if found:
                    raise SkipRow("placeholder_in_text", f"{message['role']} text contains {found[0]!r}")

    def _pick(self, references: list[str]) -> str:
        if not references:
            raise SkipRow("missing_text", "no caption")
        if self.reference == "first":
            return references[0]
        return random.Random(f"{self.seed}:{'|'.join(references)}").choice(references)


def read_row(
    adapter: RowAdapter,
    encode: Encoder | None,
    skips: SkipCounter,
    part: int,
    row: Mapping[str, Any],
    index: int,
    worker: int = 0,
) -> EncodedSample | None:
    """The sample for a row (with `encode`'s result as "encoded"), or None; counted either way (see `SkipCounter`)."""
    try:
        sample: EncodedSample = adapter(row, index)
        if encode is not None:
            sample["encoded"] = encode(sample)
    except SkipRow as skip:
        skips.count(part, index, row_id(row, index), skip, worker)
        return None
    skips.count(part, index, sample["id"], worker=worker)
    return sample


# --------------------------------------------------------------------------- torch datasets


class AdaptedDataset(torch.utils.data.Dataset):
    """A lazy map-style view of `rows` as samples: each ``__getitem__`` reads one row and decodes its image.

    A skipped row's slot is filled by the next usable row (wrapping around), so a sampler's index never fails:
    the epoch keeps its length, and the bad row is counted once and never read again. Iterating the dataset
    directly yields the usable samples in order, with no substitutes. More than `max_consecutive_skips` bad rows
    in a row mean broken data rather than a few bad rows, and raise with the report. With `encode`, each sample
    is also encoded here, and one that cannot train is skipped like a bad row (see the module docstring).
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        adapter: RowAdapter,
        skips: SkipCounter,
        max_consecutive_skips: int = 100,
        encode: Encoder | None = None,
    ):
        self.rows = _undecoded(rows)
        self.adapter = adapter
        self.skips = skips
        self.part = skips.track(len(self.rows))
        self.max_consecutive_skips = max_consecutive_skips
        self.encode = encode

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, index: int) -> EncodedSample | None:
        """The sample of row `index`, or None if it is skipped (and counted)."""
        if self.skips.known_skip(self.part, index):
            return None
        return read_row(self.adapter, self.encode, self.skips, self.part, self.rows[index], index)

    def __getitem__(self, index: int) -> EncodedSample:
        tries = min(self.max_consecutive_skips + 1, len(self))
        for offset in range(tries):
            if (sample := self.sample((index + offset) % len(self))) is not None:
                return sample
        raise RuntimeError(f"none of the {tries} rows from index {index} is usable:\n{self.skips.report()}")

    def __iter__(self) -> Iterator[EncodedSample]:
        for index in range(len(self)):
            if (sample := self.sample(index)) is not None:
                yield sample


class AdaptedIterableDataset(torch.utils.data.IterableDataset):
    """Samples from a stream of rows (``datasets.IterableDataset``), skipping and counting unusable rows.

    In DataLoader workers, the underlying ``datasets.IterableDataset`` gives each worker its own shards; `index`
    (used for rows without an id) is then the position within the worker's part of the stream.
    """

    def __init__(
        self, rows: datasets.IterableDataset, adapter: RowAdapter, skips: SkipCounter, encode: Encoder | None = None
    ):
        self.rows = _undecoded(rows)
        self.adapter = adapter
        self.skips = skips
        self.part = skips.track(None)
        self.encode = encode

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a shuffled stream per epoch (the Trainer calls this through accelerate's DataLoader)."""
        self.rows.set_epoch(epoch)

    def __iter__(self) -> Iterator[EncodedSample]:
        worker = getattr(torch.utils.data.get_worker_info(), "id", 0)
        for index, row in enumerate(self.rows):
            if (sample := read_row(self.adapter, self.encode, self.skips, self.part, row, index, worker)) is not None:
                yield sample


def _undecoded(rows: Rows) -> Rows:
    """Turn off `datasets`' own image decoding: it would raise on a corrupt image while formatting the row,
    before any adapter could skip it, and decode eagerly what the adapter decodes anyway."""
    feature = (rows.features or {}).get("image")
    if isinstance(feature, datasets.Image) and feature.decode:
        return rows.cast_column("image", datasets.Image(decode=False))
    return rows


def column_names(rows: Rows) -> list[str]:
    """The columns of `rows`; a stream with unknown features (JSON) is asked for its first row."""
    if rows.column_names is not None:
        return list(rows.column_names)
    first = next(iter(rows), None)
    if first is None:
        raise ValueError("the stream is empty: no columns to detect a schema from")
    return list(first)


def adapt(
    rows: Rows,
    schema: Schema | None = None,
    *,
    skips: SkipCounter | None = None,
    caption_prompt: str = CAPTION_PROMPT,
    vqa_instruction: str = VQA_INSTRUCTION,
    reference: Literal["first", "random"] = "first",
    seed: int = 0,
    image_root: str | os.PathLike | None = None,
    placeholders: Sequence[str] = (),
    encode: Encoder | None = None,
) -> AdaptedDataset | AdaptedIterableDataset:
    """Wrap `rows` as a lazy torch dataset of samples; `schema` defaults to :func:`detect_schema` of the columns.

    Pass one `skips` counter to several datasets to get one report for all of them. `placeholders` and `encode`:
    see :class:`RowAdapter` and :class:`AdaptedDataset`.
    """
    adapter = RowAdapter(
        schema=schema or detect_schema(column_names(rows)),
        caption_prompt=caption_prompt,
        vqa_instruction=vqa_instruction,
        reference=reference,
        seed=seed,
        image_root=None if image_root is None else str(image_root),
        placeholders=tuple(placeholders),
    )
    skips = skips if skips is not None else SkipCounter()
    if isinstance(rows, datasets.IterableDataset):
        return AdaptedIterableDataset(rows, adapter, skips, encode=encode)
    return AdaptedDataset(rows, adapter, skips, encode=encode)


def build_dataset(
    source: str | os.PathLike,
    split: str = "train",
    streaming: bool = False,
    *,
    limit: int | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    **adapt_kwargs: Any,
) -> AdaptedDataset | AdaptedIterableDataset:
    """:func:`load_rows` (the first `limit` rows, if given) then :func:`adapt`; relative image paths of a local
    file default to its folder."""
    path = Path(source).expanduser()
    if path.exists() and adapt_kwargs.get("image_root") is None:
        adapt_kwargs["image_root"] = path if path.is_dir() else path.parent
    return adapt(load_rows(source, split, streaming, limit, **(load_kwargs or {})), **adapt_kwargs)
