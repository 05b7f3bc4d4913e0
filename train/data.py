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
before the collator sees the samples. :class:`SkipReportCallback` logs the skip report at each epoch end.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any, Literal, TypedDict

import datasets
import torch.utils.data
from datasets.data_files import DataFilesDict, get_data_patterns
from PIL import Image as PILImage
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

Schema = Literal["llava", "caption", "vqa"]
Rows = datasets.Dataset | datasets.IterableDataset

IMAGE_TAG = "<image>"
EASY_VQA = "easy-vqa"  # a source name: the easy-VQA package's questions, offline
DEFAULT_CAPTION_PROMPT = "Write a short caption for this image."
DEFAULT_VQA_INSTRUCTION = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt
DATA_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".ndjson": "json"}
ID_COLUMNS = ("id", "image_id", "img_id", "cocoid", "question_id")
CAPTION_COLUMNS = ("caption", "captions", "sentences")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# One slot per reason: the counts live in shared memory, which needs a fixed layout.
SKIP_REASONS = (
    "unreadable_image",  # bytes or file PIL cannot decode, or a path that does not exist
    "missing_image",  # a caption or VQA row without an image
    "image_tag_count",  # LLaVA: not exactly one <image> tag with an image, or tags without one
    "bad_conversation",  # LLaVA: empty, unknown role, non-text turn, no assistant answer, tag outside a user turn
    "missing_text",  # caption, question or answer missing or empty
    "malformed_row",  # any other unexpected row shape (wrong types, missing keys)
)

_TAG_WITH_NEWLINES = re.compile(r"\n?" + re.escape(IMAGE_TAG) + r"\n?")


class Sample(TypedDict):
    id: str
    image: PILImage.Image | None
    messages: list[dict[str, Any]]


# --------------------------------------------------------------------------- loading


def load_rows(
    source: str | os.PathLike, split: str = "train", streaming: bool = False, limit: int | None = None, **kwargs: Any
) -> Rows:
    """Rows of `split` (the first `limit` of them, if given) from a local file or folder (parquet, JSON, JSONL, or a
    `save_to_disk` folder), from easy-VQA for `source == "easy-vqa"` (offline, PathVQA schema), else a Hub id.

    A folder's files are assigned to splits by name as on the Hub (``train-*.parquet``, ``data/test.jsonl``; one
    split "train" when no name says otherwise). `kwargs` go to ``datasets.load_dataset``.
    """
    if source == EASY_VQA:
        from .synthetic import load_easy_vqa

        return load_easy_vqa("train" if split == "train" else "test", limit)
    rows = _load(Path(source).expanduser(), str(source), split, streaming, **kwargs)
    if limit is None:
        return rows
    return rows.take(limit) if streaming else rows.select(range(min(limit, len(rows))))


def _load(path: Path, source: str, split: str, streaming: bool, **kwargs: Any) -> Rows:
    if not path.exists():
        return datasets.load_dataset(source, split=split, streaming=streaming, **kwargs)
    if path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
        return _load_saved(path, split, streaming)
    builder, files = _local_data_files(path, split)
    return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming, **kwargs)


def _load_saved(path: Path, split: str, streaming: bool) -> Rows:
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ValueError(f"{path} has no split {split!r}; it has {sorted(saved)}")
        saved = saved[split]
    return saved.to_iterable_dataset() if streaming else saved


def _local_data_files(path: Path, split: str) -> tuple[str, list[str]]:
    """The builder name and the files of `split` under a local file or folder."""
    if path.is_file():
        return _builder_for([str(path)]), [str(path)]
    try:
        patterns = get_data_patterns(str(path))
        by_split = DataFilesDict.from_patterns(patterns, base_path=str(path), allowed_extensions=list(DATA_BUILDERS))
    except FileNotFoundError as error:  # datasets' EmptyDatasetError is one
        raise ValueError(f"no {'/'.join(DATA_BUILDERS)} files in {path}") from error
    files = {str(name): list(found) for name, found in by_split.items() if found}
    if split not in files:
        raise ValueError(f"no files for split {split!r} in {path}; found splits {sorted(files)}")
    return _builder_for(files[split]), files[split]


def _builder_for(files: Sequence[str]) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    builders = {DATA_BUILDERS.get(suffix) for suffix in suffixes}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"cannot read files with extensions {sorted(suffixes)} as one data set; use one of {sorted(DATA_BUILDERS)}"
        )
    return builders.pop()


# --------------------------------------------------------------------------- schema detection


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


# --------------------------------------------------------------------------- skip accounting


class SkipRow(Exception):
    """Raised by the adapters for a row that cannot become a sample; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Rows read and rows skipped per reason, with a few example rows per reason for the report.

    The counts sit in a locked shared-memory array, so skips in DataLoader worker processes (fork, spawn or
    forkserver: the array travels with the dataset when a worker starts) and in threads add up in the main
    process's report. Example rows and log lines are per process: a worker's examples stay in that worker.
    Pickled outside process start (deepcopy, hashing), a counter carries a snapshot of its counts and is
    independent of the original from then on.
    """

    def __init__(self, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self._counts = multiprocessing.Array("q", 1 + len(SKIP_REASONS))  # slot 0: rows read
        self._examples: dict[str, list[str]] = {}
        self._seen_here: dict[str, int] = {}  # per-process counts, to log only the first few skips

    def record_row(self) -> None:
        with self._counts.get_lock():
            self._counts[0] += 1

    def skip(self, reason: str, row_id: str, detail: str) -> None:
        slot = 1 + SKIP_REASONS.index(reason)
        with self._counts.get_lock():
            self._counts[slot] += 1
            self._seen_here[reason] = seen = self._seen_here.get(reason, 0) + 1
            if seen <= self.max_examples:
                self._examples.setdefault(reason, []).append(f"row {row_id!r}: {detail}")
        if seen <= self.max_examples:
            logger.warning("skipping row %r (%s): %s", row_id, reason, detail)

    @property
    def rows_read(self) -> int:
        return self._counts[0]

    @property
    def counts(self) -> dict[str, int]:
        """Skips per reason, reasons with none left out."""
        values = self._counts[1:]
        return {reason: n for reason, n in zip(SKIP_REASONS, values) if n}

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        """One summary line, then one line per reason with example rows (those seen in this process)."""
        read, skipped = self.rows_read, self.skipped
        if not skipped:
            return f"read {read} rows, skipped none"
        share = f"{100 * skipped / read:.1f}%" if read else "n/a"
        by_reason = ", ".join(f"{reason} {n}" for reason, n in self.counts.items())
        lines = [f"read {read} rows, skipped {skipped} ({share}): {by_reason}"]
        examples = [(reason, self._examples[reason]) for reason in self.counts if reason in self._examples]
        lines += [f"  {reason}: e.g. {'; '.join(rows)}" for reason, rows in examples]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipCounter({self.report().splitlines()[0]!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # shared memory may only be pickled while starting a process
            state["_counts"] = list(self._counts[:])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_counts"], list):
            snapshot = state["_counts"]
            state["_counts"] = multiprocessing.Array("q", len(snapshot))
            state["_counts"][:] = snapshot
        self.__dict__.update(state)


# --------------------------------------------------------------------------- images


def has_image(value: Any) -> bool:
    """Whether an image cell holds an image (decoded or not) rather than None / an empty path-bytes struct."""
    if isinstance(value, Mapping):
        return value.get("bytes") is not None or bool(value.get("path"))
    return bool(value) if isinstance(value, str) else value is not None


def decode_image(value: Any, image_root: str | os.PathLike | None = None) -> PILImage.Image | None:
    """An RGB image from a PIL image, ``{"bytes", "path"}`` dict, bytes or path (relative ones under `image_root`).

    Returns None for an empty cell; raises :class:`SkipRow` ("unreadable_image") when decoding fails.
    """
    if not has_image(value):
        return None
    if isinstance(value, Mapping):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    if isinstance(value, PILImage.Image):
        return _to_rgb(value)
    source = _image_source(value, image_root)
    try:
        with PILImage.open(source) as image:
            return _to_rgb(image)
    except Exception as error:  # PIL raises many types on corrupt data (OSError, ValueError, SyntaxError, ...)
        name = "<bytes>" if isinstance(source, io.BytesIO) else str(source)
        raise SkipRow("unreadable_image", f"cannot read image {name}: {error}") from error


def _image_source(value: Any, image_root: str | os.PathLike | None) -> io.BytesIO | Path:
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value)
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        return path if path.is_absolute() or image_root is None else Path(image_root) / path
    raise SkipRow("unreadable_image", f"unsupported image value of type {type(value).__name__}")


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Decode fully (truncated files fail here, not in the collator) and convert to RGB; transparency becomes white."""
    image.load()
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = PILImage.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")  # a copy even for RGB input, so samples never share pixels with the source


# --------------------------------------------------------------------------- adapters: rows → messages


def text_item(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def image_item() -> dict[str, str]:
    return {"type": "image"}


def user_content(text: str) -> list[dict[str, str]]:
    """Split a turn's text at ``<image>`` tags (and a newline either side) into text and image content items."""
    content: list[dict[str, str]] = []
    for i, part in enumerate(_TAG_WITH_NEWLINES.split(text)):
        if i:
            content.append(image_item())
        if part:
            content.append(text_item(part))
    return content


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


def caption_messages(caption: str, prompt: str = DEFAULT_CAPTION_PROMPT) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [image_item(), text_item(prompt)]},
        {"role": "assistant", "content": [text_item(caption)]},
    ]


def vqa_prompt(question: str, instruction: str = DEFAULT_VQA_INSTRUCTION) -> str:
    """The user text for a question, as `train.synthetic.vqa_as_conversations` writes it: capitalised + instruction."""
    question = question.strip()
    return f"{question[:1].upper()}{question[1:]} {instruction}".strip()


def vqa_messages(question: str, answer: str, instruction: str = DEFAULT_VQA_INSTRUCTION) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [image_item(), text_item(vqa_prompt(question, instruction))]},
        {"role": "assistant", "content": [text_item(answer)]},
    ]


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
    caption_prompt: str = DEFAULT_CAPTION_PROMPT
    vqa_instruction: str = DEFAULT_VQA_INSTRUCTION
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
    caption_prompt: str = DEFAULT_CAPTION_PROMPT,
    vqa_instruction: str = DEFAULT_VQA_INSTRUCTION,
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


class SkipReportCallback(TrainerCallback):
    """Logs the skip report of a training set at each epoch end and at the end of training."""

    def __init__(self, skips: SkipCounter) -> None:
        self.skips = skips

    def on_epoch_end(self, args, state, control, **kwargs):
        logger.info("training data, epoch %s: %s", state.epoch, self.skips.report())

    def on_train_end(self, args, state, control, **kwargs):
        logger.info("training data: %s", self.skips.report())
