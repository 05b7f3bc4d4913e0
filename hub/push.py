"""Publishing a training stage to the Hub: a push to the stage's own branch.

Each stage of the recipe ends in a checkpoint folder (model, processor, remote code, card), or an adapter folder
for a LoRA stage. `push_stage` puts it on branch `stage-N` (and on `main` for the last stage), so that users can pin
a stage with `from_pretrained(repo, revision="stage-2", trust_remote_code=True)`.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

logger = logging.getLogger(__name__)

# Top-level files that make up a published stage. Everything else in an output folder (checkpoint-*/ subfolders,
# optimizer and scheduler states, trainer_state.json, training_args.bin, logs) stays local. Top-level *.py files
# (the remote code) are added by name, because fnmatch's `*` also matches "/" and would reach into subfolders.
STAGE_FILE_PATTERNS = (
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# An adapter folder's own files; the rest of what it publishes (card, processor, remote code) is as for a stage.
ADAPTER_FILE_PATTERNS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# Configs whose `auto_map` names remote-code modules (the processor's may sit in any of the last three).
AUTO_MAP_FILES = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def push_stage(
    folder: str | Path,
    repo_id: str,
    branch: str,
    also_main: bool = False,
    token: str | None = None,
    private: bool = False,
) -> str:
    """Upload a stage's checkpoint folder, or an adapter folder (one with `adapter_config.json`), to `branch` of
    `repo_id` (and to `main` if `also_main`).

    The folder is checked before any network call. Only the files of a published stage are uploaded (see
    `STAGE_FILE_PATTERNS`, `ADAPTER_FILE_PATTERNS`), and files of those kinds that the folder lacks are deleted from
    the branch, so that a stale shard or processor file from an earlier stage cannot be loaded alongside this one.
    Returns the sha of the commit on `branch`.
    """
    folder = Path(folder)
    adapter = (folder / "adapter_config.json").is_file()
    files = adapter_files(folder) if adapter else checkpoint_files(folder)
    message = "Upload valign LoRA adapter" if adapter else f"Upload {branch} checkpoint"
    if not (folder / "README.md").is_file():
        logger.warning("%s has no README.md: the %s branch gets no model card", folder, branch)

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    targets = [branch] + (["main"] if also_main and branch != "main" else [])
    shas = [_upload(api, folder, files, repo_id, target, message) for target in targets]
    return shas[0]


def _upload(api: HfApi, folder: Path, files: list[str], repo_id: str, target: str, message: str) -> str:
    if target != "main":
        api.create_branch(repo_id, branch=target, exist_ok=True)  # starts from main's head
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=target,
        allow_patterns=[glob.escape(name) for name in files],
        delete_patterns=[*ADAPTER_FILE_PATTERNS, *STAGE_FILE_PATTERNS],
        commit_message=message,
    )
    return info.oid


def adapter_files(folder: Path) -> list[str]:
    """Top-level files of an adapter folder to publish: adapter, card, processor files and remote code."""
    names = sorted(path.name for path in folder.iterdir() if path.is_file())
    if "adapter_config.json" not in names:
        raise ValueError(f"{folder} has no adapter_config.json: save the adapter first")
    patterns = ADAPTER_FILE_PATTERNS + STAGE_FILE_PATTERNS
    return [name for name in names if name.endswith(".py") or any(fnmatch(name, p) for p in patterns)]


def checkpoint_files(folder: Path) -> list[str]:
    """The top-level files of `folder` to publish; raises ValueError if it is not a complete valign checkpoint."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    names = sorted(path.name for path in folder.iterdir() if path.is_file())
    if "config.json" not in names:
        raise ValueError(f"{folder} has no config.json: save the model with save_pretrained first")
    _check_remote_code(folder, names)
    _check_weights(folder, names)
    _check_processor(folder, names)
    return [name for name in names if name.endswith(".py") or any(fnmatch(name, p) for p in STAGE_FILE_PATTERNS)]


def _check_remote_code(folder: Path, names: list[str]) -> None:
    auto_map = _read_json(folder / "config.json").get("auto_map")
    if not auto_map:
        raise ValueError(f"{folder}/config.json has no auto_map: it would not load with trust_remote_code=True")
    modules = {f"{module}.py" for module in _auto_map_modules(folder)}
    missing = sorted(modules - set(names))
    if missing:
        raise ValueError(
            f"{folder} lacks the remote-code files {missing} named in its auto_map: the checkpoint would not load "
            "with trust_remote_code=True (save it with valign's model and processor classes)"
        )


def _auto_map_modules(folder: Path) -> set[str]:
    """Module names referenced by the auto_maps of the folder's configs ("module.Class" -> "module")."""
    refs: list[str] = []
    for name in AUTO_MAP_FILES:
        path = folder / name
        if path.is_file():
            for value in (_read_json(path).get("auto_map") or {}).values():
                refs += [value] if isinstance(value, str) else [v for v in value if v]  # tokenizers: [slow, fast]
    # "other/repo--module.Class" lives in another repo: nothing to upload for it.
    return {ref.rsplit(".", 1)[0] for ref in refs if "--" not in ref}


def _check_weights(folder: Path, names: list[str]) -> None:
    if "model.safetensors.index.json" in names:
        shards = set(_read_json(folder / "model.safetensors.index.json")["weight_map"].values())
        missing = sorted(shards - set(names))
        if missing:
            raise ValueError(f"{folder} lacks the weight shards {missing} listed in model.safetensors.index.json")
    elif "model.safetensors" not in names:
        raise ValueError(f"{folder} has no model.safetensors (or sharded index): save with safe_serialization")


def _check_processor(folder: Path, names: Iterable[str]) -> None:
    present = set(names)
    if "tokenizer_config.json" not in present or not present & {"processor_config.json", "preprocessor_config.json"}:
        raise ValueError(f"{folder} has no processor files: call processor.save_pretrained on it before pushing")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
