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

With ``transformers.Trainer``, set ``remove_unused_columns=False``: otherwise, for a dataset that is not a
``datasets.Dataset``, the Trainer strips every key the model's ``forward`` does not take (``messages``, ``image``)
before the collator sees the samples (`train.trainer.SkipReportCallback` logs the skip report at each epoch end).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    speaker, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
    if speaker not in ROLES:
        raise SkipRow("bad_conversation", f"unknown speaker {speaker!r}")
    if not isinstance(text, str):
        raise SkipRow("bad_conversation", f"a {speaker!r} turn has no text")
    return ROLES[speaker], text


def caption_references(row: Mapping[str, Any]) -> list[str]:
    """Non-empty reference captions from ``caption`` (str or list), ``captions`` or Karpathy ``sentences``."""
    references: list[str] = []
    for column in CAPTION_COLUMNS:
        value = row.get(column)
        for item in [value] if isinstance(value, (str, Mapping)) else value or []:
            text = item.get("raw") if isinstance(item, Mapping) else item  # Karpathy sentences: {"raw": ..., ...}
            if isinstance(text, str) and text.strip():
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
    """

    schema: Schema
    caption_prompt: str = CAPTION_PROMPT
    vqa_instruction: str = VQA_INSTRUCTION
    reference: Literal["first", "random"] = "first"
    seed: int = 0
    image_root: str | None = None

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
        image = decode_image(row.get("image"), self.image_root)
        return {"id": row_id(row, index), "image": image, "messages": messages}

    def _messages(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.schema == "llava":
            return llava_messages(row["conversations"], has_image(row.get("image")))
        if not has_image(row.get("image")):
            raise SkipRow("missing_image", f"a {self.schema} row needs an image")
        if self.schema == "caption":
            return caption_messages(self._pick(caption_references(row)), self.caption_prompt)
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip() or answer is None or not str(answer).strip():
            raise SkipRow("missing_text", "empty question or answer")
        return vqa_messages(question, str(answer).strip(), self.vqa_instruction)

    def _pick(self, references: list[str]) -> str:
        if not references:
            raise SkipRow("missing_text", "no caption")
        if self.reference == "first":
            return references[0]
        return random.Random(f"{self.seed}:{'|'.join(references)}").choice(references)


def adapt_counted(adapter: RowAdapter, skips: SkipCounter, row: Mapping[str, Any], index: int) -> Sample | None:
    """The sample for a row, or None after counting why it was skipped."""
    skips.record_row()
    try:
        return adapter(row, index)
    except SkipRow as skip:
        skips.skip(skip.reason, row_id(row, index), skip.detail)
        return None


# --------------------------------------------------------------------------- torch datasets


class AdaptedDataset(torch.utils.data.Dataset):
    """A lazy map-style view of `rows` as samples: each ``__getitem__`` reads one row and decodes its image.

    A skipped row's slot is filled by the next usable row (wrapping around), so a sampler's index never fails:
    the epoch keeps its length and the bad row is counted (again each time it is drawn). Iterating the dataset
    directly yields the usable samples in order, with no substitutes. More than `max_consecutive_skips` bad rows
    in a row mean broken data rather than a few bad rows, and raise with the report.
    """

    def __init__(
        self, rows: datasets.Dataset, adapter: RowAdapter, skips: SkipCounter, max_consecutive_skips: int = 100
    ):
        self.rows = _undecoded(rows)
        self.adapter = adapter
        self.skips = skips
        self.max_consecutive_skips = max_consecutive_skips

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, index: int) -> Sample | None:
        """The sample of row `index`, or None if it is skipped (and counted)."""
        return adapt_counted(self.adapter, self.skips, self.rows[index], index)

    def __getitem__(self, index: int) -> Sample:
        tries = min(self.max_consecutive_skips + 1, len(self))
        for offset in range(tries):
            if (sample := self.sample((index + offset) % len(self))) is not None:
                return sample
        raise RuntimeError(f"none of the {tries} rows from index {index} is usable:\n{self.skips.report()}")

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self)):
            if (sample := self.sample(index)) is not None:
                yield sample


class AdaptedIterableDataset(torch.utils.data.IterableDataset):
    """Samples from a stream of rows (``datasets.IterableDataset``), skipping and counting unusable rows.

    In DataLoader workers, the underlying ``datasets.IterableDataset`` gives each worker its own shards; `index`
    (used for rows without an id) is then the position within the worker's part of the stream.
    """

    def __init__(self, rows: datasets.IterableDataset, adapter: RowAdapter, skips: SkipCounter):
        self.rows = _undecoded(rows)
        self.adapter = adapter
        self.skips = skips

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a shuffled stream per epoch (the Trainer calls this through accelerate's DataLoader)."""
        self.rows.set_epoch(epoch)

    def __iter__(self) -> Iterator[Sample]:
        for index, row in enumerate(self.rows):
            if (sample := adapt_counted(self.adapter, self.skips, row, index)) is not None:
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
) -> AdaptedDataset | AdaptedIterableDataset:
    """Wrap `rows` as a lazy torch dataset of samples; `schema` defaults to :func:`detect_schema` of the columns.

    Pass one `skips` counter to several datasets to get one report for all of them.
    """
    adapter = RowAdapter(
        schema=schema or detect_schema(column_names(rows)),
        caption_prompt=caption_prompt,
        vqa_instruction=vqa_instruction,
        reference=reference,
        seed=seed,
        image_root=None if image_root is None else str(image_root),
    )
    skips = skips if skips is not None else SkipCounter()
    if isinstance(rows, datasets.IterableDataset):
        return AdaptedIterableDataset(rows, adapter, skips)
    return AdaptedDataset(rows, adapter, skips)


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
