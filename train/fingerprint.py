"""What identifies a training run, so that `--resume` continues only the run that wrote a checkpoint.

A run's fingerprint has three parts:
- `config`: the stage config (`StageConfig.to_dict`) without `CADENCE_FIELDS`, which change only how often the run
  saves and logs, not its weights: a resume may save more often than the run it continues.
  Its `precision` is the one the stage trains in (`auto` resolved by `train/run.py`'s `stage_fingerprint`).
- `data`: per data source, for a local file or folder the size and modification time (ns) of each data file (the
  key `datasets` itself uses to decide whether a local file's rows are read again); None for a Hub id. Neither a
  content hash (local data runs to tens of GB, read again at every start) nor the path (a data or run folder moved
  with `mv` still resumes); a copy that resets modification times reads as changed, and the refusal names the file.
- `init`: the starting checkpoint: a Hub id with its revision, or for a local folder the SHA-256 of its config.json
  and the size and modification time of its weight files (a rerun of the previous stage rewrites them, so the
  stages after it are other runs).

`FILE` is written last into every `checkpoint-N` folder (`FingerprintCallback`) and into the finished stage folder,
so it also marks them complete: a folder without it was cut short while being written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.sources import DATA_BUILDERS
from ..hub.card import STAGE_RECORD
from .config import StageConfig
from .distributed import is_main_process, wait_for_everyone

logger = logging.getLogger(__name__)
FILE = "run_fingerprint.json"
CHECKPOINTS = "checkpoints"  # the Trainer's output_dir inside a stage folder
SAVED = ("config.json", "adapter_config.json")  # a full checkpoint, or a LoRA stage's adapter
CADENCE_FIELDS = ("save_steps", "logging_steps")
DATA_SUFFIXES = (*DATA_BUILDERS, ".arrow")  # a folder's data files (datasets' `save_to_disk` writes .arrow)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
Fingerprint = dict[str, Any]


def file_signature(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def data_signature(source: str) -> dict[str, list[int]] | None:
    """Size and mtime of a local source's data files by relative name; None for a Hub id (not a local path)."""
    path = Path(source).expanduser()
    if path.is_file():
        return {path.name: file_signature(path)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        return {str(p.relative_to(path)): file_signature(p) for p in files}
    return None


def init_signature(init_from: str | Path, revision: str | None) -> dict[str, Any]:
    folder = Path(init_from).expanduser()
    if not folder.is_dir():
        return {"hub": str(init_from), "revision": revision}
    config = folder / "config.json"
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return {
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": {p.name: file_signature(p) for p in weights},
    }


def run_fingerprint(
    config: StageConfig, sources: list[str], init_from: str | Path, revision: str | None = None
) -> Fingerprint:
    """The fingerprint of training `config` on `sources` (its data sources, resolved) from `init_from`."""
    parts = {
        "config": {k: v for k, v in config.to_dict().items() if k not in CADENCE_FIELDS},
        "data": [data_signature(source) for source in sources],
        "init": init_signature(init_from, revision),
    }
    parts = json.loads(json.dumps(parts))  # as read back from a file: tuples become lists
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, **parts}


def write_fingerprint(folder: Path, fingerprint: Fingerprint) -> None:
    """Write atomically: the file is the folder's completeness mark, so it must never exist half-written."""
    partial = folder / f"{FILE}.partial"
    partial.write_text(json.dumps(fingerprint, indent=1) + "\n")
    os.replace(partial, folder / FILE)


def read_fingerprint(folder: Path) -> Fingerprint | None:
    path = folder / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def differences(recorded: Fingerprint | None, current: Fingerprint) -> list[str]:
    """What differs between a recorded run and this one, one line each; empty when they are the same run."""
    if recorded is None:
        return [f"it has no {FILE} (written by a valign that did not record runs)"]
    if recorded.get("sha256") == current["sha256"]:
        return []
    old_config, new_config = recorded.get("config", {}), current["config"]
    lines = [
        f"config {key}: {short(old_config.get(key))} there, {short(new_config.get(key))} now"
        for key in sorted({*old_config, *new_config})
        if old_config.get(key) != new_config.get(key)
    ]
    old_data = recorded.get("data", [])
    for index, (source, signature) in enumerate(zip(new_config["data"], current["data"])):
        if index < len(old_data) and old_data[index] != signature:
            changed = changed_names(old_data[index] or {}, signature or {})
            lines.append(f"data {source['source']!r}: files modified, added or removed since: {short(changed)}")
    old_init, new_init = recorded.get("init", {}), current["init"]
    if old_init != new_init:
        lines.append(f"initial checkpoint: {init_change(old_init, new_init)}")
    return lines or ["its fingerprint differs"]


def changed_names(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(name for name in {*old, *new} if old.get(name) != new.get(name))


def init_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    if "hub" in old or "hub" in new:
        where = [f"{i['hub']} at {i['revision'] or 'main'}" if "hub" in i else "a local folder" for i in (old, new)]
        return f"{where[0]} there, {where[1]} now"
    changed = ["config.json"] if old.get("config_sha256") != new.get("config_sha256") else []
    changed += changed_names(old.get("weights", {}), new.get("weights", {}))
    return f"{', '.join(changed)} modified since (another checkpoint, or the previous stage run again)"


def short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class FingerprintCallback(TrainerCallback):
    """Writes the run's fingerprint into each checkpoint after the Trainer saved it: the last file written there
    (this callback goes last in the Trainer's list), so a checkpoint without it is incomplete."""

    def __init__(self, fingerprint: Fingerprint) -> None:
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            write_fingerprint(checkpoint, self.fingerprint)


def checkpoints(folder: Path) -> list[Path]:
    """The `checkpoint-N` folders of a stage folder, newest (highest N) first."""
    found = [p for p in (folder / CHECKPOINTS).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()]
    return sorted(
        (p for p in found if p.name.rsplit("-", 1)[1].isdigit()), key=lambda p: -int(p.name.rsplit("-", 1)[1])
    )


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds checkpoints or a saved stage or model, which a fresh run there would mix with."""
    return bool(checkpoints(folder)) or any((folder / name).exists() for name in (FILE, STAGE_RECORD, *SAVED))


def is_finished(folder: Path, fingerprint: Fingerprint) -> bool:
    """A stage of this very run was saved completely in `folder` (its fingerprint is written last)."""
    saved = any((folder / name).is_file() for name in SAVED)
    return saved and not differences(read_fingerprint(folder), fingerprint)


def refuse_to_replace(folders: list[Path]) -> None:
    taken = [str(folder) for folder in folders if holds_run(folder)]
    if taken:
        raise FileExistsError(
            f"{', '.join(taken)}: already holds a saved model or a training run; pass --overwrite to delete it and "
            "start afresh, or --resume to continue that run"
        )


def refuse_other_run(what: Path, recorded: Fingerprint | None, fingerprint: Fingerprint) -> None:
    lines = differences(recorded, fingerprint)
    if lines:
        raise ValueError(
            f"cannot resume: {what} belongs to another run, so continuing it would mix two runs:\n  "
            + "\n  ".join(lines)
            + "\nresume with that run's settings, or pass --overwrite instead of --resume to start afresh"
        )


def prepare_output(folder: Path, fingerprint: Fingerprint, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint a run into `folder` continues from, or None when it starts at step 0.

    A fresh run refuses a folder that holds a run (or, with `overwrite`, deletes it). A resume refuses a folder
    whose finished stage or newest complete checkpoint another run wrote, and skips checkpoints cut short while
    being written (no fingerprint file) for the newest complete one."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder and --overwrite deletes it: choose one")
    if not resume:
        if overwrite and holds_run(folder) and is_main_process():
            shutil.rmtree(folder)
        wait_for_everyone()
        refuse_to_replace([folder])
        return None
    recorded = read_fingerprint(folder)
    if recorded is not None:
        refuse_other_run(folder, recorded, fingerprint)
    found = checkpoints(folder)
    complete = [c for c in found if (c / FILE).is_file()]
    for checkpoint in found:
        if checkpoint not in complete:
            logger.warning("skipping %s: incomplete (no %s; cut short while being written)", checkpoint, FILE)
    if not complete:
        if found or (holds_run(folder) and recorded is None):
            raise ValueError(
                f"cannot resume in {folder}: it holds no complete checkpoint of a run with a fingerprint; pass "
                "--overwrite instead of --resume to start afresh"
            )
        return None
    refuse_other_run(complete[0], read_fingerprint(complete[0]), fingerprint)
    logger.info("resuming from %s", complete[0])
    return complete[0]
