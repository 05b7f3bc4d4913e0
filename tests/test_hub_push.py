"""Pushing stage checkpoints to their own Hub branches (train/hub.py), against the loopback Hub."""

from __future__ import annotations

import copy
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import CURRENT_PYTHON
from hub_server import LoopbackHub, loopback_hub
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from safetensors.torch import load_file
from scripts.crossload import fixed_batch

import valign.hub.push as hub_module
from valign.hub.card import stage_model_card
from valign.hub.push import push_stage

hub = loopback_hub  # the fixture, under a short name

REPO = "user/valign-stages"
BASE_MODELS = ["google/siglip-so400m-patch14-224", "Qwen/Qwen2.5-0.5B-Instruct"]
DATASETS = {"stage-0": ["lmms-lab/LLaVA-ReCap-558K"], "stage-1": ["lmms-lab/LLaVA-NeXT-Data"]}
REMOTE_CODE = ["configuration_valign.py", "modeling_valign.py", "processing_valign.py"]
CROSSLOAD = Path(__file__).resolve().parent / "scripts" / "crossload.py"
# What a Trainer output folder also holds, and what must stay local.
TRAINING_LEFTOVERS = [
    "checkpoint-10/optimizer.pt",
    "checkpoint-10/model.safetensors",
    "training_args.bin",
    "trainer_state.json",
    "runs/events.out.tfevents.1",
]


@dataclass
class Stages:
    shas: dict[str, str]  # branch -> sha push_stage returned
    models: dict[str, torch.nn.Module]


def write_stage(model, processor, folder: Path, stage: str) -> Path:
    """A stage's output folder: the saved model and processor, its card, and training leftovers."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = {"stage": stage, "attn_mode": model.config.attn_mode, "learning_rate": 1e-3, "trainable": ["projector"]}
    card = stage_model_card(stage, config, DATASETS[stage], BASE_MODELS, {"loss": 1.5}, repo_id=REPO)
    (folder / "README.md").write_text(card, encoding="utf-8")
    for name in TRAINING_LEFTOVERS:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"not for the Hub")
    return folder


@pytest.fixture
def stages(hub: LoopbackHub, model_and_processor, checkpoint: Path, tmp_path: Path) -> Stages:
    """stage-0: the `checkpoint` fixture; stage-1 (also pushed to main): the same model with a scaled projector."""
    model, processor = model_and_processor
    stage0 = shutil.copytree(checkpoint, tmp_path / "stage-0")  # the session fixture must stay untouched
    write_stage(model, processor, stage0, "stage-0")
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.multi_modal_projector.linear_2.weight.mul_(1.5)
    stage1 = write_stage(perturbed, processor, tmp_path / "stage-1", "stage-1")
    shas = {
        "stage-0": push_stage(stage0, REPO, "stage-0"),
        "stage-1": push_stage(stage1, REPO, "stage-1", also_main=True),
    }
    return Stages(shas, {"stage-0": model, "stage-1": perturbed})


def test_each_stage_gets_its_branch_and_the_last_one_main(hub: LoopbackHub, stages: Stages) -> None:
    branches = {ref.name: ref.target_commit for ref in HfApi().list_repo_refs(REPO).branches}
    assert set(branches) == {"main", "stage-0", "stage-1"}
    assert {name: branches[name] for name in stages.shas} == stages.shas  # the returned sha is the branch head

    main, stage0, stage1 = (hub.files(REPO, branch) for branch in ("main", "stage-0", "stage-1"))
    assert main == stage1
    assert {name for name in stage1 if stage0.get(name) != stage1[name]} == {"model.safetensors", "README.md"}
    assert set(REMOTE_CODE) | {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= set(stage1)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(stage1)
    leftovers = {name for name in stage1 if name.startswith(("checkpoint-", "runs/")) or name in TRAINING_LEFTOVERS}
    assert not leftovers


def test_stage_cards_carry_valid_metadata(stages: Stages) -> None:
    for stage in stages.shas:
        card = ModelCard.load(hf_hub_download(REPO, "README.md", revision=stage))
        data = card.data.to_dict()
        assert set(data["tags"]) >= {"valign", "vision-language", stage}
        assert data["base_model"] == BASE_MODELS
        assert data["datasets"] == DATASETS[stage]
        assert (data["library_name"], data["pipeline_tag"], data["license"]) == (
            "transformers",
            "image-text-to-text",
            "apache-2.0",
        )
        for text in ("AutoModelForVision2Seq", "AutoModelForImageTextToText", f'"{stage}"', "2503.19508"):
            assert text in card.text


def score_revisions(hub: LoopbackHub, revisions: list[str], tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """crossload.py's `score` of REPO at each revision, in fresh processes run side by side (each its own HF_HOME)."""
    runs = {}
    for revision in revisions:
        env = hub.client_env(tmp_path / f"home-{revision}") | {"TOKENIZERS_PARALLELISM": "false"}
        out = tmp_path / f"{revision}.safetensors"
        command = [CURRENT_PYTHON, str(CROSSLOAD), "score", REPO, str(out), revision]
        runs[revision] = (out, subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for revision, (_, process) in runs.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"loading {revision} failed:\n{stderr.decode()[-4000:]}"
    return {revision: load_file(out) for revision, (out, _) in runs.items()}


def test_each_revision_loads_its_own_weights_as_remote_code(
    hub: LoopbackHub, stages: Stages, model_and_processor, tmp_path: Path
) -> None:
    _, processor = model_and_processor
    batch = fixed_batch(processor)
    loaded = score_revisions(hub, list(stages.shas), tmp_path)
    for stage, model in stages.models.items():
        with torch.no_grad():
            expected = model(**batch).logits
        torch.testing.assert_close(loaded[stage]["input_ids"], batch["input_ids"], rtol=0, atol=0)
        torch.testing.assert_close(loaded[stage]["logits"], expected, rtol=1e-5, atol=1e-5, msg=stage)
    assert (loaded["stage-0"]["logits"] - loaded["stage-1"]["logits"]).abs().max() > 1e-2


def test_repush_to_main_drops_stale_stage_files_only(hub: LoopbackHub, checkpoint: Path, tmp_path: Path) -> None:
    first = shutil.copytree(checkpoint, tmp_path / "first")
    (first / "vocab.json").write_text("{}")  # a processor file the next stage no longer has
    push_stage(first, REPO, "main")
    HfApi().upload_file(path_or_fileobj=b"plot", path_in_repo="images/loss.png", repo_id=REPO)  # added by hand
    push_stage(checkpoint, REPO, "main")
    files = hub.files(REPO, "main")
    assert "vocab.json" not in files
    assert files["images/loss.png"] == b"plot"


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("modeling_valign.py", r"remote-code files \['modeling_valign.py'\]"),
        ("processing_valign.py", r"remote-code files \['processing_valign.py'\]"),
        ("config.json", "no config.json"),
        ("model.safetensors", "no model.safetensors"),
        ("tokenizer_config.json", "no processor files"),
    ],
)
def test_incomplete_folder_fails_before_contacting_the_hub(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, remove: str, message: str
) -> None:
    def no_hub(*args, **kwargs):
        raise AssertionError("push_stage built a Hub client for an incomplete folder")

    monkeypatch.setattr(hub_module, "HfApi", no_hub)
    folder = shutil.copytree(checkpoint, tmp_path / "incomplete")
    (folder / remove).unlink()
    with pytest.raises(ValueError, match=message):
        push_stage(folder, REPO, "stage-0")
