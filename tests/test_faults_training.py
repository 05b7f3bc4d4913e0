"""Faults of training runs and their folders: a fresh run into a used folder, a resume of another run, a kill while
a checkpoint or the final folder is written, a stage name that is a path, a plotting error (issue 13, items 1 and 6).
Each asserts a clear error or the recovered run, and that nothing already trained is lost."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import Kill, killed_run
from safetensors.torch import load_file

import valign.train.run as run_module
import valign.train.trainer as trainer_module
from valign.data.synthetic import make_caption_dataset, write_parquet
from valign.train.__main__ import main
from valign.train.config import StageConfig
from valign.train.fingerprint import CHECKPOINTS, FILE, checkpoints, differences, is_finished, read_fingerprint
from valign.train.run import run_recipe, run_stage, stage_fingerprint


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_parquet(make_caption_dataset(32, "recap", image_size=32), root / "captions.parquet")
    return root


def stage(**fields) -> StageConfig:
    values = {
        "name": "s",
        "attn_mode": "hybrid",
        "learning_rates": {"multi_modal_projector": 1e-3, "language_model": 5e-4},
        "data": [{"source": "captions.parquet"}],
        "batch_size": 4,
        "precision": "fp32",
        "logging_steps": 1,
        "save_steps": 2,
        "warmup_ratio": 0.0,
        "max_steps": 4,
        "seed": 4,
    }
    return StageConfig(**{**values, **fields})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.fixture(scope="module")
def straight(checkpoint, data_root, tmp_path_factory) -> Path:
    """The seed-4 stage run without interruption: what every recovered run must end as, bit for bit."""
    folder = tmp_path_factory.mktemp("straight") / "s"
    run_stage(stage(), checkpoint, folder, data_root)
    return folder


def test_a_fresh_run_into_a_finished_stage_is_refused_and_overwrite_replaces_it(checkpoint, data_root, tmp_path):
    folder = tmp_path / "s"
    run_stage(stage(seed=3, max_steps=3, save_steps=1), checkpoint, folder, data_root)
    finished = (folder / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds .* pass --overwrite"):
        run_stage(stage(), checkpoint, folder, data_root)
    assert (folder / "model.safetensors").read_bytes() == finished and read_fingerprint(folder)["config"]["seed"] == 3

    run_stage(stage(), checkpoint, folder, data_root, overwrite=True)
    assert [c.name for c in checkpoints(folder)] == ["checkpoint-4", "checkpoint-2"]  # none of seed 3's left
    assert all(read_fingerprint(c) == read_fingerprint(folder) for c in checkpoints(folder))
    assert read_fingerprint(folder)["config"]["seed"] == 4
    with pytest.raises(ValueError, match="choose one"):
        run_stage(stage(), checkpoint, folder, data_root, resume=True, overwrite=True)


def test_a_resume_of_another_run_is_refused_naming_the_difference(
    checkpoint, data_root, straight, tmp_path, monkeypatch
):
    folder = tmp_path / "s"
    killed_run(monkeypatch, stage(), checkpoint, folder, data_root, Kill("step", 3))
    assert [c.name for c in checkpoints(folder)] == ["checkpoint-2"]

    with pytest.raises(ValueError, match=r"(?s)checkpoint-2 belongs to another run.*config seed: 4 there, 3 now"):
        run_stage(stage(seed=3), checkpoint, folder, data_root, resume=True)
    source = data_root / "captions.parquet"
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the data file rewritten since
    with pytest.raises(
        ValueError, match=r"data 'captions.parquet': files modified, .* since: \[\"captions.parquet\"\]"
    ):
        run_stage(stage(), checkpoint, folder, data_root, resume=True)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    other_init = tmp_path / "other-init"
    shutil.copytree(checkpoint, other_init)  # copy2 keeps mtimes: only the edited config.json differs
    config = json.loads((other_init / "config.json").read_text())
    (other_init / "config.json").write_text(json.dumps({**config, "projector_hidden_act": "relu"}))
    with pytest.raises(ValueError, match=r"initial checkpoint: config.json modified since"):
        run_stage(stage(), other_init, folder, data_root, resume=True)

    run_stage(stage(save_steps=1), checkpoint, folder, data_root, resume=True)  # the save cadence is no difference
    assert_same_weights(folder, straight)


def test_a_checkpoint_cut_short_while_written_is_skipped_for_the_previous_one(
    checkpoint, data_root, straight, tmp_path, monkeypatch, caplog
):
    folder = tmp_path / "s"
    killed_run(monkeypatch, stage(), checkpoint, folder, data_root, Kill("save", 4))
    newest = folder / "checkpoints" / "checkpoint-4"
    assert (newest / "trainer_state.json").is_file() and not (newest / FILE).exists()
    half = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(half[: len(half) // 2])  # a weights file cut short too

    with caplog.at_level(logging.WARNING, logger="valign.train.fingerprint"):
        run_stage(stage(), checkpoint, folder, data_root, resume=True)
    assert f"skipping {newest}: incomplete" in caplog.text
    assert_same_weights(folder, straight)  # resumed from checkpoint-2, and checkpoint-4 written anew
    assert read_fingerprint(newest) == read_fingerprint(folder)


def test_a_resume_with_no_complete_checkpoint_is_refused_and_keeps_the_folder(checkpoint, data_root, tmp_path):
    half_written = tmp_path / "s" / "checkpoints" / "checkpoint-2"
    half_written.mkdir(parents=True)
    (half_written / "model.safetensors").write_bytes(b"cut")
    with pytest.raises(ValueError, match=r"no complete checkpoint .* pass --overwrite"):
        run_stage(stage(), checkpoint, tmp_path / "s", data_root, resume=True)
    assert (half_written / "model.safetensors").read_bytes() == b"cut"


def interrupt(*args) -> None:
    raise KeyboardInterrupt  # as Ctrl-C would, at this point


def write_recipe(folder: Path, config: StageConfig) -> Path:
    folder.mkdir()
    (folder / "stage0.yaml").write_text(yaml.safe_dump(config.to_dict()))
    return folder


def test_a_recipe_keeps_only_a_finished_stage_of_the_same_run(checkpoint, data_root, tmp_path, monkeypatch):
    recipe, out = write_recipe(tmp_path / "recipe", stage(max_steps=2)), tmp_path / "out"
    run_recipe(recipe, checkpoint, out, data_root)
    finished = (out / "s" / "model.safetensors").read_bytes()
    assert not (out / "s" / CHECKPOINTS).exists()  # a finished stage's resumable copies are gone

    with pytest.raises(ValueError, match="config max_steps: 2 there, 3 now"):
        run_recipe(recipe, checkpoint, out, data_root, resume=True, overrides={"*": {"max_steps": 3}})
    with pytest.raises(FileExistsError, match="--overwrite"):  # a fresh rerun, refused before anything trains
        run_recipe(recipe, checkpoint, out, data_root)
    assert not is_finished(out / "s", stage_fingerprint(stage(max_steps=3), checkpoint, data_root))
    assert run_recipe(recipe, checkpoint, out, data_root, resume=True)[0].skip_report == "kept"

    # Killed while the final folder was written (its mark is written last): resumed from its last checkpoint.
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "write_fingerprint", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe, checkpoint, out, data_root, overwrite=True)
    assert not (out / "s" / FILE).exists() and checkpoints(out / "s")
    result = run_recipe(recipe, checkpoint, out, data_root, resume=True)[0]
    assert result.skip_report != "kept" and (out / "s" / "model.safetensors").read_bytes() == finished
    assert is_finished(out / "s", stage_fingerprint(stage(max_steps=2), checkpoint, data_root))


def test_precision_auto_trained_on_another_machine_kind_is_another_run(checkpoint, data_root, monkeypatch):
    """`auto` trains in bf16 where the CPU computes it natively and in fp32 elsewhere: the fingerprints differ and
    say so; an explicit precision is the same run on both."""
    fingerprints = {}
    for native in (False, True):
        monkeypatch.setattr("valign.train.run.native_bf16", lambda device="cpu", native=native: native)
        fingerprints[native] = [stage_fingerprint(stage(precision=p), checkpoint, data_root) for p in ("auto", "fp32")]
    (auto_fp32, fp32_there), (auto_bf16, fp32_here) = fingerprints[False], fingerprints[True]
    assert differences(auto_fp32, auto_bf16) == ['config precision: "fp32" there, "bf16" now']
    assert differences(fp32_there, fp32_here) == [] and differences(auto_fp32, fp32_here) == []


@pytest.mark.parametrize("name", ["../x", "../../x", "a/b", "/tmp/x", "..", ".", "", "a\\b"])
def test_a_stage_name_that_is_a_path_is_refused(name, tmp_path):
    with pytest.raises(ValueError, match="stage name must be a plain folder name"):
        stage(name=name)
    (tmp_path / "stage0.yaml").write_text(yaml.safe_dump({**stage().to_dict(), "name": name}))
    with pytest.raises(ValueError, match="plain folder name"):
        run_recipe(tmp_path, "unused", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage0.yaml"]


def test_a_plotting_error_keeps_the_trained_stage(checkpoint, data_root, tmp_path, monkeypatch, caplog):
    folder, seen = tmp_path / "s", {}

    def failing_plot(log, png, title):
        seen["saved"] = (folder / "model.safetensors").is_file() and (folder / FILE).is_file()
        raise RuntimeError("no display")

    monkeypatch.setattr(trainer_module, "plot_training_log", failing_plot)
    with caplog.at_level(logging.ERROR, logger="valign.train.trainer"):
        result = run_stage(stage(max_steps=1), checkpoint, folder, data_root)
    assert seen == {"saved": True}  # the plot is drawn only once the stage is saved
    assert "no loss plot (RuntimeError: no display); the trained stage is saved" in caplog.text
    assert result.last_loss is not None and is_finished(
        folder, stage_fingerprint(stage(max_steps=1), checkpoint, data_root)
    )


def test_the_recipe_command_keeps_its_assembled_init_on_a_refused_rerun(backbones, data_root, tmp_path, capsys):
    recipe, out = write_recipe(tmp_path / "recipe", stage(max_steps=1)), tmp_path / "out"
    command = ["recipe", str(recipe), "--output", str(out), "--data-root", str(data_root)]
    command += ["--vision", str(backbones[0]), "--text", str(backbones[1])]
    main(command)
    init = (out / "init" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="init: already holds"):
        main(command)
    assert (out / "init" / "model.safetensors").stat().st_mtime_ns == init  # not assembled anew
    capsys.readouterr()
    main([*command, "--resume"])  # the kept init keeps stage s's fingerprint: s is kept, not refused
    assert "s: already finished in" in capsys.readouterr().out
    assert (out / "init" / "model.safetensors").stat().st_mtime_ns == init
    with pytest.raises(SystemExit):
        main([*command, "--resume", "--overwrite"])
