"""Sharded training (issue 16, item 3): FSDP2 over gloo on 2 CPU processes trains a stage like one process with the
same global batch, keeps frozen modules frozen and per-module learning rates, and resumes from its sharded checkpoint.

Run as a script, this file is one process of a run killed after step 3: `torchrun ... tests/test_fsdp.py INIT DATA OUT`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, Kill
from test_training import assert_trained_alike, data_root, weights  # noqa: F401  (data_root is a fixture)

from valign.train.config import StageConfig
from valign.train.run import run_stage
from valign.train.trainer import module_of

FSDP_STAGE = REPO / "tests" / "data" / "fsdp_stage.yaml"
KILLED_AFTER = 3  # steps: past the sharded checkpoint at step 2, short of the 4 the stage trains


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """2 CPU processes; `--standalone` picks a free port, so runs never collide with each other or other tests."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)


def train_stage(init: Path, data: Path, output: Path, *flags: str) -> None:
    common = ["--init", str(init), "--data-root", str(data), "--output", str(output), *flags]
    result = torchrun("-m", "valign.train", "stage", str(FSDP_STAGE), *common)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def sharded(checkpoint, data_root, tmp_path_factory) -> Path:  # noqa: F811
    """The FSDP stage run straight through on 2 processes."""
    folder = tmp_path_factory.mktemp("fsdp") / "straight"
    train_stage(checkpoint, data_root, folder)
    return folder


@pytest.fixture(scope="module")
def single(checkpoint, data_root, tmp_path_factory) -> Path:  # noqa: F811
    """The same stage in one process, unsharded, with the 2 processes' global batch."""
    config = StageConfig.from_yaml(FSDP_STAGE)
    unsharded = {k: v for k, v in config.extra_training_args.items() if not k.startswith("fsdp")}
    config = dataclasses.replace(config, batch_size=2 * config.batch_size, extra_training_args=unsharded)
    folder = tmp_path_factory.mktemp("single") / "s"
    run_stage(config, checkpoint, folder, data_root)
    return folder


def assert_sharded(checkpoint: Path) -> None:
    """A Trainer checkpoint FSDP wrote: one shard of the weights and of the optimizer state per process, and no
    whole model (DDP, which accelerate would silently use instead on CPU, writes model.safetensors)."""
    for state in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / state).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "model.safetensors").exists()


def test_fsdp_on_two_processes_trains_like_one_process_with_the_same_global_batch(checkpoint, sharded, single):
    assert_sharded(sharded / "checkpoints" / "checkpoint-4")
    trained = weights(sharded)
    assert any(not torch.equal(trained[n], weights(checkpoint)[n]) for n in trained)
    assert_trained_alike(trained, weights(single))  # 4 steps over 2 epochs: order and averaging match too


def test_fsdp_keeps_frozen_modules_and_per_module_learning_rates(checkpoint, sharded, single):
    before, after = weights(checkpoint), weights(sharded)
    changed = {module_of(n) for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"multi_modal_projector", "language_model"}  # the vision tower stayed frozen
    logged, reference = (
        [json.loads(line)["learning_rates"] for line in (f / "training_log.jsonl").read_text().splitlines()]
        for f in (sharded, single)
    )
    assert len(logged) == 4 and logged == reference  # the optimizer's groups survived sharding, module by module
    cosine = (1 + math.cos(math.pi / 4)) / 2  # the schedule's factor after step 1 of 4 (no warmup)
    configured = StageConfig.from_yaml(FSDP_STAGE).learning_rates
    assert logged[0] == pytest.approx({module: lr * cosine for module, lr in configured.items()})


def test_a_sharded_checkpoint_resumes_to_the_uninterrupted_weights(checkpoint, data_root, sharded, tmp_path):  # noqa: F811
    folder = tmp_path / "resumed"
    killed = torchrun(str(Path(__file__)), str(checkpoint), str(data_root), str(folder))
    assert killed.returncode != 0 and "simulated kill" in killed.stderr, killed.stderr[-4000:]
    assert [c.name for c in (folder / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert_sharded(folder / "checkpoints" / "checkpoint-2")
    assert not (folder / "model.safetensors").exists()

    train_stage(checkpoint, data_root, folder, "--resume")
    resumed, straight = weights(folder), weights(sharded)
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)
    steps = [json.loads(line)["step"] for line in (folder / "training_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the killed run logged steps 1-2, the resumed one 3-4 (not 1-4 again)


def test_a_lora_stage_refuses_fsdp():
    with pytest.raises(ValueError, match="a LoRA stage is not sharded"):
        StageConfig.from_yaml(FSDP_STAGE, lora={"r": 4})


if __name__ == "__main__":
    init, data, output = map(Path, sys.argv[1:])
    run_stage(StageConfig.from_yaml(FSDP_STAGE), init, output, data, callbacks=(Kill("step", KILLED_AFTER),))
