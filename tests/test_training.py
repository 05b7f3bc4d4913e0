"""The training runner: labels, stage-0 masking, freezing and per-module learning rates, resume, several processes."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, Kill, killed_run, shape_image
from hub_server import loopback_hub
from huggingface_hub import HfApi, hf_hub_download
from safetensors.torch import load_file
from transformers import TrainerCallback

from valign.configuration_valign import TRANSFORMERS_MAJOR, fsdp_plugin_arguments
from valign.data.synthetic import load_easy_vqa, make_caption_dataset, write_parquet
from valign.modeling_valign import IGNORE_INDEX
from valign.train.collator import ConversationCollator, mask_answer_tokens, sample_generator
from valign.train.config import MODULES, LoraSettings, StageConfig
from valign.train.run import ensure_mask_token, resolve_precision, run_recipe, run_stage, training_arguments
from valign.train.trainer import module_of, set_trainable


def sample(sample_id: str, question: str, answer: str, color: str = "red") -> dict:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return {"id": sample_id, "image": shape_image(color), "messages": messages}


def test_labels_cover_exactly_the_answer_tokens(model_and_processor):
    _, processor = model_and_processor
    batch = ConversationCollator(processor)([sample("a", "What colour?", "red"), sample("b", "Shape?", "a circle")])
    tokenizer = processor.tokenizer
    for row, answer in enumerate(["red", "a circle"]):
        supervised = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert tokenizer.decode(supervised) == answer + "<|im_end|>"
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["labels"][batch["input_ids"] == processor.image_token_id] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == 2


def test_stage0_masking_replaces_a_fifth_of_the_answer_and_supervises_only_there():
    input_ids = torch.arange(100, 140)
    labels = torch.full((40,), IGNORE_INDEX)
    labels[10:30] = input_ids[10:30]  # a 20-token answer
    masked_ids, masked_labels = mask_answer_tokens(input_ids, labels, 0.2, 7, sample_generator("x", 0))
    chosen = (masked_ids == 7).nonzero().flatten()
    assert len(chosen) == 4 and ((chosen >= 10) & (chosen < 30)).all()
    assert torch.equal((masked_labels != IGNORE_INDEX).nonzero().flatten(), chosen)
    assert torch.equal(masked_labels[chosen], input_ids[chosen])
    again, _ = mask_answer_tokens(input_ids, labels, 0.2, 7, sample_generator("x", 0))
    other, _ = mask_answer_tokens(input_ids, labels, 0.2, 7, sample_generator("y", 0))
    assert torch.equal(again, masked_ids) and not torch.equal(other, masked_ids)


def test_new_mask_token_gets_the_mean_embedding_and_is_never_generated(checkpoint):
    from valign import ValignForConditionalGeneration, ValignProcessor

    model = ValignForConditionalGeneration.from_pretrained(checkpoint)
    processor = ValignProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    old_rows = model.get_input_embeddings().weight.detach().clone()
    token_id = ensure_mask_token(model, processor, "<|mask|>")
    weights = model.get_input_embeddings().weight
    assert token_id == len(old_rows) and weights.shape[0] == len(old_rows) + 1
    torch.testing.assert_close(weights[token_id], old_rows.mean(0))
    assert token_id in model.generation_config.suppress_tokens
    assert ensure_mask_token(model, processor, "<|mask|>") == token_id  # idempotent


def test_every_parameter_belongs_to_one_module_and_freezing_follows_the_learning_rates(checkpoint):
    from valign import ValignForConditionalGeneration

    model = ValignForConditionalGeneration.from_pretrained(checkpoint)
    counts = set_trainable(model, {"multi_modal_projector": 1e-3})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(module_of(n) == "multi_modal_projector" for n in trainable)
    assert counts["multi_modal_projector"] == sum(p.numel() for p in model.multi_modal_projector.parameters())
    assert module_of("lm_head.weight") == "language_model"
    with pytest.raises(ValueError, match="belongs to none"):
        module_of("something.else")


def test_stage_config_rejects_inconsistent_settings(tmp_path):
    base = {"name": "s", "attn_mode": "hybrid", "learning_rates": {"multi_modal_projector": 1e-3}, "data": []}
    with pytest.raises(ValueError, match="no data sources"):
        StageConfig(**base)
    data = [{"source": "x.parquet"}]
    with pytest.raises(ValueError, match="learning_rates needs keys"):
        StageConfig(**{**base, "data": data, "learning_rates": {"projector": 1e-3}})
    with pytest.raises(ValueError, match="bidirectional stage's objective"):
        StageConfig(**{**base, "data": data, "text_mask_ratio": 0.2})
    lora = {**base, "data": data, "lora": {"r": 4}}
    assert StageConfig(**lora).lora.r == 4 and StageConfig(**{**lora, "attn_mode": None}).attn_mode is None
    with pytest.raises(ValueError, match="a LoRA stage trains only"):
        StageConfig(**{**lora, "learning_rates": {"vision_tower": 1e-3}})
    with pytest.raises(ValueError, match="a LoRA stage has no token masking"):
        StageConfig(**{**lora, "attn_mode": "bidirectional", "text_mask_ratio": 0.2})
    with pytest.raises(ValueError, match="s: loss_chunk_size must be a positive int or None, got '1024'"):
        StageConfig(**{**base, "data": data, "loss_chunk_size": "1024"})
    (tmp_path / "stage.yaml").write_text("name: s\nattn_mode: hybrid\nlearnig_rates: {}\n")
    with pytest.raises(ValueError, match="unknown fields \\['learnig_rates'\\]"):
        StageConfig.from_yaml(tmp_path / "stage.yaml")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_parquet(make_caption_dataset(48, "recap", image_size=32), root / "captions.parquet")
    write_parquet(load_easy_vqa("train", 48), root / "vqa.parquet")
    return root


def stage(name: str, **fields) -> StageConfig:
    values = {
        "name": name,
        "attn_mode": "hybrid",
        "learning_rates": {"vision_tower": 1e-4, "multi_modal_projector": 1e-3, "language_model": 5e-4},
        "data": [{"source": "captions.parquet"}, {"source": "vqa.parquet"}],
        "batch_size": 8,
        "precision": "fp32",
        "logging_steps": 1,
        "save_steps": 3,
        "warmup_ratio": 0.0,
    }
    return StageConfig(**{**values, **fields})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_trained_alike(trained: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """The weights two equivalent training runs reach, equal to float tolerance; the vision tower's key biases
    aside: without rotary positions their exact gradient is 0 (a key bias adds q·b to a whole row of scores, which
    softmax ignores), so AdamW turns rounding noise, whose sign depends on the order of summation, into steps of
    about the learning rate."""
    assert trained.keys() == reference.keys()
    for name in reference:
        if not (name.startswith("model.vision_tower.") and name.endswith("k_proj.bias")):
            torch.testing.assert_close(trained[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def write_recipe(folder: Path, *configs: StageConfig) -> Path:
    folder.mkdir()
    for index, config in enumerate(configs):
        (folder / f"stage{index}.yaml").write_text(yaml.safe_dump(config.to_dict()))
    return folder


def test_a_merged_lora_stage_is_where_the_next_stage_starts(checkpoint, data_root, tmp_path):
    lora = stage(
        "lora",
        attn_mode=None,
        learning_rates={"language_model": 1e-2, "multi_modal_projector": 1e-2},
        max_steps=1,
        lora={"r": 4, "alpha": 8, "merge": True},
    )
    frozen_lm = stage("projector", learning_rates={"multi_modal_projector": 1e-3}, max_steps=1)
    run_recipe(write_recipe(tmp_path / "recipe", lora, frozen_lm), checkpoint, tmp_path / "out", data_root)
    assert (tmp_path / "out" / "lora" / "adapter_config.json").is_file()
    merged, after, base = (
        weights(f) for f in (tmp_path / "out" / "lora" / "merged", tmp_path / "out" / "projector", checkpoint)
    )
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q_proj], base[q_proj])  # the adapter was merged in
    assert torch.equal(after[q_proj], merged[q_proj])  # the next stage started from the merged weights

    with pytest.raises(ValueError, match="set `merge: true`"):
        unmerged = dataclasses.replace(lora, lora=LoraSettings(r=4))
        run_recipe(write_recipe(tmp_path / "bad", unmerged, frozen_lm), checkpoint, tmp_path / "bad-out", data_root)


@pytest.mark.parametrize(
    ("cuda", "native", "expected"),
    [(False, False, "fp32"), (False, True, "bf16"), (True, True, "bf16"), (True, False, "fp16")],
)
def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(
    monkeypatch, tmp_path, cuda, native, expected
):
    # An AVX2-only CPU runs bf16 matmuls 5-200x slower than fp32 (DESIGN.md): auto must not pick bf16 there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr("valign.train.run.native_bf16", lambda device: native)
    assert resolve_precision("auto") == expected
    assert resolve_precision("fp32") == "fp32"  # an explicit choice stands
    if not cuda:  # TrainingArguments refuses fp16/bf16 flags for a missing GPU only in the cuda cases
        monkeypatch.setattr(os, "environ", dict(os.environ))  # 4.x's TrainingArguments write bf16 there
        config = StageConfig(
            name="s", attn_mode="hybrid", learning_rates={"language_model": 1e-3}, data=[{"source": "x"}]
        )
        args = training_arguments(config, tmp_path)
        assert (args.bf16, args.fp16) == (expected == "bf16", False)


class AutocastProbe(TrainerCallback):
    """Records, at each forward of the language model being trained, whether autocast is on (a submodule's: accelerate
    may wrap the model's own forward in autocast)."""

    def __init__(self) -> None:
        self.autocast = []

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        hook = lambda *_: self.autocast.append(torch.is_autocast_enabled("cpu"))  # noqa: E731
        model.model.language_model.register_forward_hook(hook)


def test_an_fp32_stage_after_a_bf16_one_trains_in_fp32(checkpoint, data_root, tmp_path, monkeypatch):
    # transformers 4.x's TrainingArguments leave bf16 in accelerate's environment, where its Trainer reads it
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)  # and restore it after
    probes = {"bf16": AutocastProbe(), "fp32": AutocastProbe()}
    for precision, probe in probes.items():
        config = stage("s", max_steps=1, precision=precision)
        run_stage(config, checkpoint, tmp_path / precision, data_root, callbacks=(probe,))
    assert probes["bf16"].autocast == [True]
    assert probes["fp32"].autocast == [False]


def test_fsdp_on_cpu_processes_is_sharded_on_transformers_5_and_refused_on_4(tmp_path, monkeypatch):
    config = StageConfig.from_yaml(REPO / "tests" / "data" / "fsdp_stage.yaml")  # FSDP2 on CPU (test_fsdp.py)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # 4.x's TrainingArguments write FSDP settings there
    args = training_arguments(config, tmp_path)
    if TRANSFORMERS_MAJOR < 5:  # accelerate would fail on it with "no available devices"
        with pytest.raises(ValueError, match="FSDP on CPU processes needs transformers 5"):
            fsdp_plugin_arguments(args)
        return
    plugin = fsdp_plugin_arguments(args)  # what ValignTrainer gives CPU processes instead of accelerate's DDP
    assert (plugin["fsdp_version"], plugin["state_dict_type"]) == (2, "SHARDED_STATE_DICT")


def test_per_module_learning_rates_and_frozen_modules(checkpoint, data_root, tmp_path):
    config = stage("s", learning_rates={"multi_modal_projector": 1e-3, "language_model": 2e-4}, max_steps=2)
    result = run_stage(config, checkpoint, tmp_path / "out", data_root)
    before, after = weights(checkpoint), weights(tmp_path / "out")
    changed = {module_of(n) for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"multi_modal_projector", "language_model"}  # the vision tower stayed frozen
    log = (tmp_path / "out" / "training_log.jsonl").read_text().splitlines()
    first = json.loads(log[0])["learning_rates"]
    assert first.keys() == {"multi_modal_projector", "language_model"}  # one logged rate per trained module
    # the cosine schedule scales every group alike, so the modules keep the configured 5:1 ratio
    assert first["multi_modal_projector"] / first["language_model"] == pytest.approx(5.0)
    assert 0 < first["multi_modal_projector"] <= 1e-3
    assert result.first_loss is not None and (tmp_path / "out" / "training_log.png").stat().st_size > 0


def test_a_stage_with_a_chunked_loss_trains_like_a_plain_one_and_its_checkpoint_keeps_the_setting(
    checkpoint, data_root, tmp_path
):
    # Plain SGD, so that each update is the gradient itself: AdamW's first steps are about the learning rate
    # wherever a gradient is near zero (rounding noise too), and the same whatever the gradient's scale.
    fields = {"max_steps": 2, "learning_rates": dict.fromkeys(MODULES, 0.1), "extra_training_args": {"optim": "sgd"}}
    plain = run_stage(stage("s", **fields), checkpoint, tmp_path / "plain", data_root)
    chunked = run_stage(stage("s", loss_chunk_size=5, **fields), checkpoint, tmp_path / "chunked", data_root)
    assert chunked.first_loss == pytest.approx(plain.first_loss, rel=1e-5)
    init, expected, trained = weights(checkpoint), weights(tmp_path / "plain"), weights(tmp_path / "chunked")
    updates = {name: (trained[name] - init[name], expected[name] - init[name]) for name in init}
    largest = max(reference.abs().max() for _, reference in updates.values())
    assert largest > 1e-3
    for name, (update, reference) in updates.items():
        torch.testing.assert_close(update, reference, rtol=0, atol=1e-3 * largest, msg=name)
    assert json.loads((tmp_path / "chunked" / "config.json").read_text())["loss_chunk_size"] == 5


def faults_reallocating(megabytes: int = 256) -> int:
    """Minor page faults of filling a block of `megabytes` just after one of the same size was freed."""
    numel = megabytes * 2**20 // 4
    torch.ones(numel)  # allocated, touched and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(numel)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.parametrize("keep", [True, False])
def test_a_cpu_stage_keeps_freed_memory_for_its_next_step_and_hands_it_back_after(
    checkpoint, data_root, tmp_path, keep
):
    """glibc unmaps a freed block of this size, so filling the next one faults every page in again; a training step
    frees and refills gigabytes like this, so while a stage trains the heap keeps what it frees, unless the stage
    says `keep_freed_memory: false`. Two steps may still fault: free heap pages that an earlier `malloc_trim` handed
    back come in once, and the heap grows once if a step's blocks leave no free run of this size (seen at the second
    step on transformers 4.57, at the third once on 5.24, after the tests before it in this file)."""
    during = []

    class Probe(TrainerCallback):
        def on_step_end(self, *args, **kwargs) -> None:
            during.append(faults_reallocating())

    before = faults_reallocating()
    config = stage("s", max_steps=4, keep_freed_memory=keep)
    run_stage(config, checkpoint, tmp_path / "out", data_root, callbacks=(Probe(),))
    after = faults_reallocating()
    assert len(during) == 4
    quiet = [faults * 20 < min(before, after) for faults in during]  # the block refilled without faulting
    if keep:
        assert sum(quiet) >= 2  # at most the two refaults above, at whichever steps they come
    else:
        assert min(during) * 2 > min(before, after)


def test_killed_and_resumed_stage_ends_like_an_uninterrupted_one(checkpoint, data_root, tmp_path, monkeypatch):
    config = stage("s", text_mask_ratio=0.0, max_steps=6)
    run_stage(config, checkpoint, tmp_path / "straight", data_root)

    killed_run(monkeypatch, config, checkpoint, tmp_path / "resumed", data_root, Kill("step", 4))
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-3").is_dir()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    run_stage(config, checkpoint, tmp_path / "resumed", data_root, resume=True)

    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_cpu_processes_train_like_one_with_the_same_global_batch(checkpoint, data_root, tmp_path):
    """DDP over gloo: 2 processes × 8 samples reach the weights of 1 process × 16 samples."""
    config_path = tmp_path / "stage.yaml"
    shutil.copy(REPO / "tests" / "data" / "ddp_stage.yaml", config_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    common = ["-m", "valign.train", "stage", str(config_path), "--init", str(checkpoint), "--data-root", str(data_root)]
    subprocess.run([*command, *common, "--output", str(tmp_path / "ddp")], check=True, env=env, timeout=300)
    single = StageConfig.from_yaml(config_path, batch_size=16)
    run_stage(single, checkpoint, tmp_path / "single", data_root)
    ddp, one = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    assert any(not torch.equal(ddp[n], weights(checkpoint)[n]) for n in ddp)
    assert_trained_alike(ddp, one)


hub = loopback_hub  # the fixture, under a short name


def test_recipe_pushes_each_stage_to_its_branch_and_the_last_to_main(checkpoint, data_root, tmp_path, hub):
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    common = "learning_rates: {multi_modal_projector: 1.0e-3}\ndata: [{source: captions.parquet}]\n"
    common += "max_steps: 1\nwarmup_ratio: 0.0\nbatch_size: 4\nprecision: fp32\nlogging_steps: 1\n"
    (recipe / "stage0.yaml").write_text(f"name: stage-0\nattn_mode: bidirectional\ntext_mask_ratio: 0.2\n{common}")
    (recipe / "stage1.yaml").write_text(f"name: stage-1\nattn_mode: hybrid\n{common}")
    results = run_recipe(recipe, checkpoint, tmp_path / "out", data_root, push_to_hub="user/recipe", base_models=[])

    api = HfApi()
    assert {b.name for b in api.list_repo_refs("user/recipe").branches} == {"main", "stage-0", "stage-1"}
    for result, mode in zip(results, ["bidirectional", "hybrid"]):
        pushed = hf_hub_download("user/recipe", "model.safetensors", revision=result.name)
        assert Path(pushed).read_bytes() == (result.folder / "model.safetensors").read_bytes()
        config = json.loads(Path(hf_hub_download("user/recipe", "config.json", revision=result.name)).read_text())
        assert config["attn_mode"] == mode  # each checkpoint carries the policy it was trained with
        card = Path(hf_hub_download("user/recipe", "README.md", revision=result.name)).read_text()
        assert result.name in card and "captions.parquet" in card
    main = hf_hub_download("user/recipe", "model.safetensors", revision="main")
    assert Path(main).read_bytes() == (results[-1].folder / "model.safetensors").read_bytes()
    assert (results[0].folder / "model.safetensors").read_bytes() != Path(main).read_bytes()
