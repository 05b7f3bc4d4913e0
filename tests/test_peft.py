"""LoRA fine-tuning (train/peft_vqa.py): targets, gradients, adapter and merged round trips, a VQA gain, the CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import CURRENT_PYTHON, REPO
from hub_server import LoopbackHub, loopback_hub
from huggingface_hub import HfApi
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from scripts.crossload import fixed_batch

from valign.checkpoint import load_checkpoint
from valign.configuration_valign import enable_checkpointing
from valign.data.adapters import adapt
from valign.data.images import decode_image
from valign.data.prompts import vqa_prompt
from valign.data.sources import load_rows
from valign.eval.generate import DecodingSettings, generate_answers
from valign.eval.vqa import answer_prior, prior_predictions
from valign.eval.vqa_metrics import score_vqa
from valign.hub.push import push_stage
from valign.train.collator import ConversationCollator
from valign.train.config import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, DataSource, LoraSettings, StageConfig
from valign.train.lora import add_lora, lora_config, lora_module_names, save_adapter, save_merged
from valign.train.run import run_stage

hub = loopback_hub  # the fixture, under a short name

TESTS = Path(__file__).resolve().parent
CROSSLOAD = TESTS / "scripts" / "crossload.py"
REMOTE_CODE = {"configuration_valign.py", "modeling_valign.py", "processing_valign.py"}
# Tiny models gain nothing from intra-op threads, and on a busy 2-core runner they make training ~5× slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
PROCESSOR_FILES = {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
# A user's view in a fresh process: the base through the Auto class (as remote code), the adapter through PEFT,
# the processor from the adapter folder; logits of crossload.py's fixed batch. valign is never imported.
SCORE_ADAPTER = """
import sys
import torch, transformers
from peft import PeftConfig, PeftModel
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[3])
from scripts.crossload import AUTO_MODEL, fixed_batch

adapter, out = sys.argv[1:3]
base = PeftConfig.from_pretrained(adapter).base_model_name_or_path
model = AUTO_MODEL.from_pretrained(base, trust_remote_code=True)
model = PeftModel.from_pretrained(model, adapter).eval()
processor = transformers.AutoProcessor.from_pretrained(adapter, trust_remote_code=True)
with torch.no_grad():
    logits = model(**fixed_batch(processor)).logits
save_file({"logits": logits.contiguous()}, out)
"""


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_lora(checkpoint: Path, config: LoraConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)  # LoRA A matrices are drawn at random
    model, processor = load_checkpoint(str(checkpoint))
    return add_lora(model, config or lora_config(r=4, alpha=8, dropout=0.0)), processor


def vqa_samples(n: int) -> list[dict]:
    dataset = adapt(load_rows("easy-vqa", "train", limit=n), "vqa")
    return [dataset[i] for i in range(n)]


def base_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.")


# --------------------------------------------------------------------------- where LoRA goes


def test_lora_adapts_every_language_model_attention_projection_and_nothing_in_the_vision_tower(checkpoint):
    base, _ = load_checkpoint(str(checkpoint))
    linears = [name for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)]
    model = add_lora(base, lora_config(r=4, alpha=8))
    adapted = {base_name(name) for name in lora_module_names(model)}
    leaf = {name: name.rsplit(".", 1)[-1] for name in linears}
    expected = {n for n in linears if n.startswith("model.language_model.") and leaf[n] in ATTENTION_PROJECTIONS}
    assert any(n.startswith("model.vision_tower.") and leaf[n] == "q_proj" for n in linears)  # SigLIP has them too
    assert adapted == expected and len(expected) == 4 * 2  # 4 projections × 2 layers

    with_mlp, _ = fresh_lora(checkpoint, lora_config(targets=ATTENTION_PROJECTIONS + MLP_PROJECTIONS))
    adapted_mlp = {base_name(name) for name in lora_module_names(with_mlp)}
    assert len(adapted_mlp) == 7 * 2 and all(n.startswith("model.language_model.") for n in adapted_mlp)

    # Why the regex: PEFT's plain name list matches SigLIP's attention as well.
    torch.manual_seed(0)
    plain = get_peft_model(load_checkpoint(str(checkpoint))[0], LoraConfig(target_modules=list(ATTENTION_PROJECTIONS)))
    assert any(".vision_tower." in name for name in lora_module_names(plain))


def test_projector_trains_in_full_while_vision_tower_embeddings_and_head_stay_frozen(checkpoint):
    model, _ = fresh_lora(checkpoint)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    projector = {n for n in trainable if ".multi_modal_projector.modules_to_save." in n}
    assert trainable == projector | {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    projector_size = sum(p.numel() for n, p in model.named_parameters() if n in projector)
    wrapper = model.get_base_model().model.multi_modal_projector  # PEFT keeps the original beside a trained copy
    assert projector_size == sum(p.numel() for p in wrapper.original_module.parameters())
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert {n for n, _ in model.named_parameters() if ".vision_tower." in n} <= frozen
    assert any("embed_tokens" in n for n in frozen)
    assert not any("embed_tokens" in n or "lm_head" in n for n in trainable)


# --------------------------------------------------------------------------- gradients


def lora_gradients(checkpoint: Path, samples: list[dict], use_reentrant: bool | None) -> tuple[dict, dict]:
    """Gradients of every trainable parameter on one batch, at initialisation and after one SGD step.

    `use_reentrant` None: no gradient checkpointing; else checkpointing of that kind.
    """
    model, processor = fresh_lora(checkpoint)
    model.train()
    if use_reentrant is not None:
        enable_checkpointing(model, use_reentrant)
        model.enable_input_require_grads()
        assert model.get_base_model().model.language_model.layers[0].gradient_checkpointing
    batch = ConversationCollator(processor)(samples)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in named], lr=0.5)
    steps = []
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        steps.append({n: None if p.grad is None else p.grad.clone() for n, p in named})
        optimizer.step()
    assert all(p.grad is None for n, p in model.named_parameters() if ".vision_tower." in n)
    return steps[0], steps[1]


@pytest.fixture(scope="module")
def reference_gradients(checkpoint) -> tuple[list[dict], tuple[dict, dict]]:
    samples = vqa_samples(4)
    return samples, lora_gradients(checkpoint, samples, use_reentrant=None)


@pytest.mark.parametrize("use_reentrant", [None, False, True], ids=["plain", "checkpointing", "reentrant"])
def test_every_lora_parameter_gets_a_nonzero_gradient(checkpoint, reference_gradients, use_reentrant):
    samples, reference = reference_gradients
    first, second = reference if use_reentrant is None else lora_gradients(checkpoint, samples, use_reentrant)
    lora = [n for n in second if ".lora_" in n]
    assert len(lora) == 2 * 4 * 2  # A and B × 4 projections × 2 layers
    # B starts at zero (the adapter starts as the identity), so A's first gradient is zero by construction ...
    assert all(first[n].abs().sum() == 0 for n in lora if ".lora_A." in n)
    assert all(first[n].abs().sum() > 0 for n in first if ".lora_A." not in n)
    # ... and after one step every LoRA matrix and the projector learn.
    assert all(grad is not None and grad.abs().sum() > 0 for grad in second.values())
    for step, expected in zip((first, second), reference):  # checkpointing recomputes, it changes nothing
        for name, grad in step.items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------------- save, reload, merge


@dataclass
class Saved:
    adapter: Path
    merged: Path
    base_logits: torch.Tensor
    adapter_logits: torch.Tensor
    merged_logits: torch.Tensor
    reloaded_adapter_logits: torch.Tensor  # fresh process: Auto class + PeftModel.from_pretrained
    reloaded_merged_logits: torch.Tensor  # fresh process: Auto class + AutoProcessor on the merged folder


def run_side_by_side(commands: list[list[str]]) -> None:
    env = {"HF_HUB_OFFLINE": "1", **ONE_THREAD}
    processes = [subprocess.Popen(c, env={**os.environ, **env}, stderr=subprocess.PIPE) for c in commands]
    for command, process in zip(commands, processes):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{command[:3]} failed:\n{stderr.decode()[-4000:]}"


@pytest.fixture(scope="module")
def saved(checkpoint, tmp_path_factory) -> Saved:
    """An adapter that is not the identity (random B, scaled projector), saved; a merged copy, saved; both reloaded."""
    folder = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    base, processor = load_checkpoint(str(checkpoint))
    batch = fixed_batch(processor)
    with torch.no_grad():
        base_logits = base(**batch).logits
    model = add_lora(base, lora_config(r=4, alpha=8, targets=ATTENTION_PROJECTIONS + MLP_PROJECTIONS, dropout=0.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.2)
            elif ".modules_to_save." in name and name.endswith("linear_2.weight"):
                parameter.mul_(1.5)
        model.eval()
        adapter_logits = model(**batch).logits
    save_adapter(model, processor, folder / "adapter")
    merged_model = save_merged(copy.deepcopy(model), processor, folder / "merged").eval()
    with torch.no_grad():
        merged_logits = merged_model(**batch).logits

    outputs = folder / "adapter.safetensors", folder / "merged.safetensors"
    run_side_by_side(
        [
            [CURRENT_PYTHON, "-c", SCORE_ADAPTER, str(folder / "adapter"), str(outputs[0]), str(TESTS)],
            [CURRENT_PYTHON, str(CROSSLOAD), "score", str(folder / "merged"), str(outputs[1])],
        ]
    )
    return Saved(
        folder / "adapter",
        folder / "merged",
        base_logits,
        adapter_logits,
        merged_logits,
        load_file(outputs[0])["logits"],
        load_file(outputs[1])["logits"],
    )


def test_adapter_folder_holds_lora_projector_and_processor_and_names_its_local_base(saved: Saved, checkpoint):
    files = {path.name for path in saved.adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processing_valign.py"} | PROCESSOR_FILES <= files
    assert "model.safetensors" not in files  # an adapter, not a copy of the base
    config = json.loads((saved.adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(checkpoint)  # a local base stays a path
    keys = load_file(saved.adapter / "adapter_model.safetensors").keys()
    assert all(".lora_" in k or ".multi_modal_projector." in k for k in keys)
    assert any(".multi_modal_projector." in k for k in keys) and not any("vision_tower" in k for k in keys)


def test_adapter_reloaded_in_a_fresh_process_reproduces_the_logits(saved: Saved):
    assert (saved.adapter_logits - saved.base_logits).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(saved.reloaded_adapter_logits, saved.adapter_logits, rtol=1e-5, atol=1e-5)


def test_merged_folder_reproduces_the_adapter_and_loads_with_auto_classes_in_a_fresh_process(saved: Saved):
    torch.testing.assert_close(saved.merged_logits, saved.adapter_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(saved.reloaded_merged_logits, saved.merged_logits, rtol=1e-5, atol=1e-5)
    files = {path.name for path in saved.merged.iterdir()}
    assert REMOTE_CODE | PROCESSOR_FILES | {"config.json", "model.safetensors"} <= files
    # A merged checkpoint is served like a stage's: by the endpoint handler valign ships (tests/test_handler.py).
    assert (saved.merged / "handler.py").read_bytes() == (REPO / "handler.py").read_bytes()
    keys = load_file(saved.merged / "model.safetensors").keys()
    assert not any("lora_" in k or "base_layer" in k or "modules_to_save" in k for k in keys)


# --------------------------------------------------------------------------- a short fine-tune helps


def vqa_accuracy(model, processor, rows, images) -> float:
    prompts = [vqa_prompt(q) for q in rows["question"]]
    settings = DecodingSettings(max_new_tokens=4, batch_size=100)
    predictions = generate_answers(model.eval(), processor, images, prompts, settings, desc="easy-VQA")
    return score_vqa(predictions, list(rows["answer"]), list(rows["question_type"]))["accuracy"]


def test_short_lora_stage_on_easy_vqa_raises_held_out_accuracy(checkpoint, tmp_path, one_thread):
    train_rows, test_rows = load_rows("easy-vqa", "train", limit=320), load_rows("easy-vqa", "test", limit=200)
    train_rows.to_parquet(str(tmp_path / "train.parquet"))  # image bytes are embedded: load_easy_vqa stores them
    images = [decode_image(row["image"]) for row in test_rows]
    base, processor = load_checkpoint(str(checkpoint))
    before = vqa_accuracy(base, processor, test_rows, images)  # = the fresh adapter's: LoRA's B starts at zero
    config = StageConfig(
        name="lora-vqa",
        attn_mode=None,
        learning_rates={"language_model": 1e-2, "multi_modal_projector": 1e-2},
        data=[DataSource("train.parquet")],
        epochs=2,
        batch_size=16,
        warmup_ratio=0.0,
        precision="fp32",
        save_steps=1,
        extra_training_args={"save_strategy": "no"},
        lora=LoraSettings(r=8, alpha=16, targets=[*ATTENTION_PROJECTIONS, *MLP_PROJECTIONS]),
    )
    start = time.perf_counter()
    run_stage(config, checkpoint, tmp_path / "run", data_root=tmp_path)
    seconds = time.perf_counter() - start
    # extra_training_args replace the stage's defaults: save_strategy "no" wins over save_steps.
    assert not list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    model = PeftModel.from_pretrained(load_checkpoint(str(checkpoint))[0], tmp_path / "run")
    assert len(lora_module_names(model)) == 7 * 2
    after = vqa_accuracy(model, processor, test_rows, images)
    prior = prior_predictions(answer_prior(train_rows["question"], train_rows["answer"]), test_rows["question"], "no")
    prior_accuracy = score_vqa(prior, list(test_rows["answer"]))["accuracy"]
    print(
        f"easy-VQA accuracy, 200 held-out questions: before {before:.1%}, after {after:.1%} ({seconds:.0f} s of "
        f"training on 320 questions × 2 epochs); per-question answer prior {prior_accuracy:.1%}"
    )
    assert after >= before + 0.20


# --------------------------------------------------------------------------- command line and Hub


def test_cli_records_the_hub_base_and_its_pushed_adapter_loads_from_the_hub(hub: LoopbackHub, checkpoint, tmp_path):
    HfApi().create_repo("user/valign-tiny")
    HfApi().upload_folder(repo_id="user/valign-tiny", folder_path=checkpoint)
    data = tmp_path / "vqa.parquet"
    load_rows("easy-vqa", "train", limit=16).to_parquet(
        str(data)
    )  # image bytes are embedded: load_easy_vqa stores them
    output = tmp_path / "run"
    command = [CURRENT_PYTHON, "-m", "valign.train.peft_vqa", "--model", "user/valign-tiny", "--data", str(data)]
    command += ["--output", str(output), "--max-steps", "2", "--batch-size", "4", "--lora-r", "4", "--merge"]
    command += ["--push-to-hub", "user/valign-tiny-vqa", "--eval-split", "train", "--eval-limit", "4"]
    env = hub.client_env(tmp_path / "home") | ONE_THREAD
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]

    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "user/valign-tiny"  # the Hub id, not a cache path
    assert set(json.loads((output / "vqa_scores.json").read_text())) == {"model", "mismatched_images", "answer_prior"}
    merged = set(hub.files("user/valign-tiny-vqa"))
    assert REMOTE_CODE | PROCESSOR_FILES | {"config.json", "model.safetensors", "README.md"} <= merged

    push_stage(output, "user/valign-tiny-vqa-lora", branch="main")
    pushed = set(hub.files("user/valign-tiny-vqa-lora"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "processing_valign.py"} <= pushed
    assert pushed >= PROCESSOR_FILES
    assert not any(name.startswith(("merged/", "checkpoints/")) or name == "vqa_scores.json" for name in pushed)

    # A user with only the adapter's Hub id: its config names the base on the Hub, both load in a fresh process.
    scored = tmp_path / "hub-adapter.safetensors"
    command = [CURRENT_PYTHON, "-c", SCORE_ADAPTER, "user/valign-tiny-vqa-lora", str(scored), str(TESTS)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    base, processor = load_checkpoint(str(checkpoint))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, output).eval()(**fixed_batch(processor)).logits
    torch.testing.assert_close(load_file(scored)["logits"], expected, rtol=1e-5, atol=1e-5)
