"""Reading rows: a Hub dataset id, a local parquet / JSON / JSONL file or folder, a `save_to_disk` folder, or the
offline easy-VQA set."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import datasets
from datasets.data_files import DEFAULT_SPLITS, NON_WORDS_CHARS, SPLIT_KEYWORDS, DataFilesDict, get_data_patterns

Rows = datasets.Dataset | datasets.IterableDataset

EASY_VQA = "easy-vqa"  # a source name: the easy-VQA package's questions, offline
EASY_VQA_SPLITS = ("train", "test")
DATA_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".ndjson": "json"}
# The Hub's split keywords in a file name (`test.parquet`, `pathvqa_val.jsonl`, `train-00000-of-00002.parquet`).
FILE_NAME_SPLITS = {
    str(split): [
        p
        for k in SPLIT_KEYWORDS[split]
        for p in (f"{k}[{NON_WORDS_CHARS}]*", f"*[{NON_WORDS_CHARS}]{k}[{NON_WORDS_CHARS}]*")
    ]
    for split in DEFAULT_SPLITS
}


class MissingSplitError(ValueError):
    """A local source was asked for a split it does not hold."""


def load_rows(
    source: str | os.PathLike, split: str = "train", streaming: bool = False, limit: int | None = None, **kwargs: Any
) -> Rows:
    """Rows of `split` (the first `limit` of them, if given) from a local file or folder (parquet, JSON, JSONL, or a
    `save_to_disk` folder), from easy-VQA for `source == "easy-vqa"` (offline, PathVQA schema), else a Hub id.

    A folder's files are assigned to splits by name as on the Hub (``train-*.parquet``, ``data/test.jsonl``; one
    split "train" when no name says otherwise); a single file holds the one split its name gives by the same rule,
    so asking a local source for a split it does not hold raises :class:`MissingSplitError` rather than returning
    other rows under that name (an evaluation would then build its "training" baseline from its test items).
    `kwargs` go to ``datasets.load_dataset``.
    """
    if source == EASY_VQA:
        from .synthetic import load_easy_vqa

        _check_split(source, split, EASY_VQA_SPLITS)
        return load_easy_vqa(split, limit)
    rows = _load(Path(source).expanduser(), str(source), split, streaming, **kwargs)
    if limit is None:
        return rows
    return rows.take(limit) if streaming else rows.select(range(min(limit, len(rows))))


def _load(path: Path, source: str, split: str, streaming: bool, **kwargs: Any) -> Rows:
    if not path.exists():
        return datasets.load_dataset(source, split=split, streaming=streaming, **kwargs)
    if _is_saved(path):
        return _load_saved(path, split, streaming)
    builder, files = _local_data_files(path, split)
    return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming, **kwargs)


def local_splits(source: str | os.PathLike) -> list[str] | None:
    """The splits a local source holds (easy-VQA's too), None for a Hub id (listing those needs the network)."""
    if source == EASY_VQA:
        return list(EASY_VQA_SPLITS)
    path = Path(source).expanduser()
    if not path.exists():
        return None
    return list(_saved_splits(path)) if _is_saved(path) else list(_split_files(path))


def file_split(name: str) -> str:
    """The split a data file's name gives it on the Hub: the first of train, validation, test whose keyword it
    holds between separators (``test.parquet``, ``pathvqa_val.jsonl``), else train."""
    return next((s for s, patterns in FILE_NAME_SPLITS.items() if any(fnmatchcase(name, p) for p in patterns)), "train")


def _check_split(source: str | os.PathLike, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        single = Path(source).expanduser().is_file()
        hint = " (a single file holds the split its name gives, as on the Hub: train unless it names another)"
        raise MissingSplitError(f"no split {split!r} in {source}; found splits {sorted(splits)}" + hint * single)


def _is_saved(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json"))


def _saved_splits(path: Path) -> dict[str, datasets.Dataset]:
    """A `save_to_disk` folder's splits; a lone Dataset holds the split it was loaded as (train if unnamed)."""
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        return dict(saved)
    name = str(saved.split) if saved.split is not None and re.fullmatch(r"\w+", str(saved.split)) else "train"
    return {name: saved}


def _load_saved(path: Path, split: str, streaming: bool) -> Rows:
    splits = _saved_splits(path)
    _check_split(path, split, list(splits))
    return splits[split].to_iterable_dataset() if streaming else splits[split]


def _local_data_files(path: Path, split: str) -> tuple[str, list[str]]:
    """The builder name and the files of `split` under a local file or folder."""
    files = _split_files(path)
    _check_split(path, split, list(files))
    return _builder_for(files[split]), files[split]


def _split_files(path: Path) -> dict[str, list[str]]:
    """Split name -> files of a local file or folder."""
    if path.is_file():
        return {file_split(path.name): [str(path)]}
    try:
        patterns = get_data_patterns(str(path))
        by_split = DataFilesDict.from_patterns(patterns, base_path=str(path), allowed_extensions=list(DATA_BUILDERS))
    except FileNotFoundError as error:  # datasets' EmptyDatasetError is one
        raise ValueError(f"no {'/'.join(DATA_BUILDERS)} files in {path}") from error
    return {str(name): list(found) for name, found in by_split.items() if found}


def _builder_for(files: Sequence[str]) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    builders = {DATA_BUILDERS.get(suffix) for suffix in suffixes}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"cannot read files with extensions {sorted(suffixes)} as one data set; use one of {sorted(DATA_BUILDERS)}"
        )
    return builders.pop()
