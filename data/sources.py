"""Reading rows: a Hub dataset id, a local parquet / JSON / JSONL file or folder, a `save_to_disk` folder, or the
offline easy-VQA set."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets.data_files import DataFilesDict, get_data_patterns

Rows = datasets.Dataset | datasets.IterableDataset

EASY_VQA = "easy-vqa"  # a source name: the easy-VQA package's questions, offline
DATA_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".ndjson": "json"}


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
