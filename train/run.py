"""Run one stage, or a recipe of stages, of valign's training with `transformers.Trainer`.

The same entry point serves one CPU, one GPU and several processes (`torchrun` / `accelerate launch`: DDP, or
FSDP/DeepSpeed through `extra_training_args` in the stage file). Each stage starts from the previous stage's
output folder and writes a complete Hub-ready checkpoint (model, processor, remote code, card) to its own folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch.utils.data import ConcatDataset
from transformers import TrainerCallback, TrainingArguments

from ..checkpoint import load_checkpoint, native_bf16, save_checkpoint
from ..configuration_valign import accelerate_environment_kept, checkpointing_arguments, warmup_argument
from ..data.adapters import build_dataset
from ..data.skips import SkipCounter
from ..hub.card import STAGE_RECORD, stage_model_card
from ..hub.push import push_stage
from ..modeling_valign import SDPA_PER_SAMPLE, ValignForConditionalGeneration
from ..processing_valign import ValignProcessor
from .collator import ConversationCollator
from .config import StageConfig
from .distributed import is_main_process, wait_for_everyone
from .fingerprint import (
    CHECKPOINTS,
    Fingerprint,
    FingerprintCallback,
    is_finished,
    prepare_output,
    refuse_to_replace,
    run_fingerprint,
    write_fingerprint,
)
from .lora import add_lora, save_merged, stage_lora_config
from .trainer import (
    SkipReportCallback,
    TrainingLogCallback,
    ValignTrainer,
    module_of,
    plot_stage_log,
    read_training_log,
    set_trainable,
)

logger = logging.getLogger(__name__)
RECIPES = Path(__file__).parent / "recipes"  # the recipes valign ships, by folder name


@dataclass
class StageResult:
    name: str
    folder: Path
    first_loss: float | None
    last_loss: float | None
    skip_report: str
    seconds: float | None = None  # wall time of the stage, loading and saving included (None: kept by a resume)


def ensure_mask_token(model: ValignForConditionalGeneration, processor: ValignProcessor, token: str) -> int:
    """The id of the alignment stage's mask token, adding it if the tokenizer lacks it.

    A new token's embedding is set to the mean of the existing ones: a neutral "unknown word" vector that a
    frozen language model can read without surprise. It is never generated.
    """
    tokenizer = processor.tokenizer
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id >= model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = model.get_input_embeddings().weight
        with torch.no_grad():
            embeddings[token_id] = embeddings[:token_id].mean(0)
    token_id = tokenizer.convert_tokens_to_ids(token)
    suppressed = list(model.generation_config.suppress_tokens or [])
    model.generation_config.suppress_tokens = sorted({*suppressed, token_id})
    return token_id


def resolve_source(source: str, data_root: Path | None) -> str:
    """A source relative to `data_root` when such a file exists there, else the source as given (a Hub id)."""
    if data_root is not None and (data_root / source).exists():
        return str(data_root / source)
    return source


def stage_dataset(
    config: StageConfig, data_root: Path | None, collator: ConversationCollator
) -> tuple[ConcatDataset, SkipCounter]:
    """The stage's data; rows that `collator` cannot use (an image token in the text, too long) are skipped."""
    skips = SkipCounter()
    parts = [
        build_dataset(
            resolve_source(d.source, data_root),
            d.split,
            d.streaming,
            limit=d.limit,
            skips=skips,
            caption_prompt=config.caption_prompt,
            seed=config.seed,
            placeholders=collator.placeholders,
            encode=collator.encode,
        )
        for d in config.data
    ]
    return ConcatDataset(parts), skips


def stage_fingerprint(
    config: StageConfig, init_from: str | Path, data_root: Path | None, revision: str | None = None
) -> Fingerprint:
    """The fingerprint of training `config` from `init_from` (see `train/fingerprint.py`)."""
    sources = [resolve_source(d.source, data_root) for d in config.data]
    return run_fingerprint(as_trained_here(config), sources, init_from, revision)


def as_trained_here(config: StageConfig) -> StageConfig:
    """`config` with the precision it trains in on this machine: `auto` is bf16 on one and fp32 on another, and
    the two are different runs (a stage finished in one is neither kept nor resumed in the other)."""
    return dataclasses.replace(config, precision=resolve_precision(config.precision))


def resolve_precision(precision: str) -> str:
    """The precision a stage trains in: "auto" is bf16 where the device computes it natively (a GPU with bf16, or
    a CPU with AVX512-BF16 / AMX), else fp16 on a GPU and fp32 on a CPU; other values stand as given."""
    if precision != "auto":
        return precision
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16" if native_bf16(device) else "fp16" if device == "cuda" else "fp32"


def training_arguments(config: StageConfig, output_dir: Path) -> TrainingArguments:
    """The stage's TrainingArguments; `config.extra_training_args` add fields or replace these."""
    precision = resolve_precision(config.precision)
    logger.info("%s: training in %s (precision: %s)", config.name, precision, config.precision)
    defaults = dict(
        output_dir=str(output_dir / CHECKPOINTS),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type="cosine",
        **warmup_argument(config.warmup_ratio),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        **(checkpointing_arguments() if config.gradient_checkpointing else {}),
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        use_cpu=not torch.accelerator.is_available(),  # on CPU, torchrun's processes then form a gloo group
        remove_unused_columns=False,  # the collator needs the samples' messages and images
        label_names=["labels"],  # a PeftModel's forward signature does not name them
    )
    return TrainingArguments(**{**defaults, **config.extra_training_args})


def run_stage(
    config: StageConfig,
    init_from: str | Path,
    output_dir: str | Path,
    data_root: str | Path | None = None,
    resume: bool = False,
    revision: str | None = None,
    overwrite: bool = False,
    callbacks: tuple[TrainerCallback, ...] = (),
) -> StageResult:
    """Train one stage from the checkpoint `init_from` (a folder or Hub id, at `revision`); the final checkpoint
    goes to `output_dir`. A LoRA stage (`config.lora`) saves its adapter there, and with `merge` the merged
    checkpoint to `output_dir/merged`. `callbacks` join the Trainer's (e.g. the accuracy curve's snapshots).

    `resume` continues the run in `output_dir` from its newest complete checkpoint, and refuses when another run
    wrote it (`train/fingerprint.py`); without it, an `output_dir` holding a run is refused, or with `overwrite`
    deleted first."""
    start = time.perf_counter()
    output_dir = Path(output_dir)
    data_root = Path(data_root) if data_root is not None else None
    fingerprint = stage_fingerprint(config, init_from, data_root, revision)
    checkpoint = prepare_output(output_dir, fingerprint, resume, overwrite)
    # Packed rows: sdpa on each sample alone, never over the blocks between samples the mask blocks anyway.
    attention = SDPA_PER_SAMPLE if config.packing else "sdpa"
    model, processor = load_checkpoint(init_from, revision, attn_implementation=attention)
    if config.attn_mode is not None:
        model.config.attn_mode = config.attn_mode  # the checkpoint carries the policy it was trained with
    if config.loss_chunk_size is not None:
        model.config.loss_chunk_size = config.loss_chunk_size
    mask_token_id = ensure_mask_token(model, processor, config.mask_token) if config.text_mask_ratio > 0 else None
    if config.lora is not None:
        transformers.set_seed(config.seed)  # LoRA's A matrices are drawn at random
        # The adapter records its base as given (a Hub id stays one), not the path it was read from.
        model = add_lora(model, stage_lora_config(config.lora), base_model_name_or_path=str(init_from))
        if config.gradient_checkpointing:
            # Reentrant checkpointing drops the gradient of segments whose inputs need none.
            model.enable_input_require_grads()
        trainable = {
            m: sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and module_of(n) == m)
            for m in config.learning_rates
        }
    else:
        trainable = set_trainable(model, config.learning_rates)
    logger.info("%s: trainable parameters %s", config.name, trainable)

    collator = ConversationCollator(
        processor,
        config.max_length,
        config.text_mask_ratio,
        mask_token_id,
        config.seed,
        packing=config.packing,
        pack_length=config.pack_length,
    )
    dataset, skips = stage_dataset(config, data_root, collator)
    with accelerate_environment_kept():  # what transformers 4.x's TrainingArguments write for the Trainer
        args = training_arguments(config, output_dir)
        if checkpoint is None and (output_dir / "training_log.jsonl").exists():
            (output_dir / "training_log.jsonl").unlink()  # a run from step 0 starts a fresh log
        trainer = ValignTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            learning_rates=config.learning_rates,
            keep_freed_memory=config.keep_freed_memory,
            callbacks=[
                TrainingLogCallback(output_dir),
                SkipReportCallback(skips, output_dir),
                *callbacks,
                FingerprintCallback(fingerprint),  # last: it marks a checkpoint complete
            ],
        )
        if is_main_process():
            print(f"{config.name}: {describe(config, len(dataset))} -> {output_dir}", flush=True)
        trainer.train(resume_from_checkpoint=checkpoint)
        model = unsharded(trainer, model)

    if is_main_process():
        save_checkpoint(model, processor, output_dir)
        (output_dir / STAGE_RECORD).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        print(f"{config.name} ({output_dir / SkipReportCallback.FILE}): {skips.report()}")
        if config.lora is not None and config.lora.merge:
            save_merged(model, processor, output_dir / "merged")  # merges in place: the last use of `model`
        write_fingerprint(output_dir, fingerprint)  # last: the stage is complete
        plot_stage_log(output_dir, config.name)
    wait_for_everyone()  # the next stage loads this folder in every process
    seconds = time.perf_counter() - start
    return StageResult(config.name, output_dir, *logged_losses(output_dir), skips.report(), seconds)


def unsharded(trainer: ValignTrainer, model: torch.nn.Module) -> torch.nn.Module:
    """`model` in a form that saves. Under FSDP every process must call this (gathering the weights is a collective)
    and the main process gets a plain copy holding them: the sharded model's parameters are shards, and its class is
    torch's FSDP subclass, whose source `save_pretrained` would copy into the checkpoint as the remote code."""
    if not trainer.is_fsdp_enabled:
        return model
    weights = trainer.accelerator.get_state_dict(trainer.model)  # the full weights on the main process, {} elsewhere
    if not is_main_process():
        return model
    with torch.device("meta"):  # no second copy of the weights: they are assigned below
        plain = ValignForConditionalGeneration(model.config)
    plain.load_state_dict(weights, assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config  # e.g. the suppressed mask token
    return plain


def describe(config: StageConfig, rows: int) -> str:
    """One line saying what a stage trains, on what, with which mask: printed above its progress bar."""
    rates = ", ".join(f"{module} {lr:g}" for module, lr in config.learning_rates.items())
    length = f"{config.max_steps} steps of {config.batch_size}" if config.max_steps > 0 else f"{config.epochs:g} epoch"
    masking = f", {config.text_mask_ratio:.0%} of answer tokens masked" if config.text_mask_ratio else ""
    return f"{config.attn_mode or 'checkpoint'} mask{masking}; training {rates}; {length} from {rows} rows"


def logged_losses(folder: Path) -> tuple[float | None, float | None]:
    """The first and last logged loss of a stage; None when it logged none (fewer steps than `logging_steps`)."""
    path = folder / "training_log.jsonl"
    log = read_training_log(path) if path.exists() else []
    return (log[0]["loss"], log[-1]["loss"]) if log else (None, None)


def recipe_stages(recipe: str | Path) -> list[Path]:
    """The stage files of a recipe, in order (stage0.yaml, stage1.yaml, ...): a folder, or the name of one of the
    recipes valign ships (`RECIPES`: "demo", "paper", ...), which works from an installed wheel too."""
    folder = Path(recipe)
    if not folder.exists() and (RECIPES / folder).is_dir():
        folder = RECIPES / folder
    files = sorted(folder.glob("stage*.yaml"))
    if not files:
        raise FileNotFoundError(f"no stage*.yaml files in {recipe}")
    return files


def with_overrides(config: StageConfig, overrides: dict[str, dict]) -> StageConfig:
    values = {**overrides.get("*", {}), **overrides.get(config.name, {})}
    return dataclasses.replace(config, **{k: v for k, v in values.items() if v is not None})


def run_recipe(
    recipe: str | Path,
    init_from: str | Path,
    output_dir: str | Path,
    data_root: str | Path | None = None,
    resume: bool = False,
    push_to_hub: str | None = None,
    base_models: list[str] | None = None,
    overrides: dict[str, dict] | None = None,
    skip: tuple[str, ...] = (),
    overwrite: bool = False,
    space: str | None = None,
) -> list[StageResult]:
    """Run every stage of `recipe`, each from the previous one's output; with `resume`, finished stages of this
    same run are kept and an interrupted one continues from its last complete checkpoint. Without `resume`, stage
    folders holding a run are refused before anything trains, or with `overwrite` replaced. `push_to_hub` pushes
    stage N to branch `stage-N` and the last stage to `main` as well; `space` (a Space serving valign's app with
    the model) is named in every stage's card.

    `overrides` maps a stage name (or "*", every stage) to field values replacing the file's; stages named in
    `skip` are left out (for ablations)."""
    output_dir = Path(output_dir)
    configs = [StageConfig.from_yaml(path) for path in recipe_stages(recipe)]
    configs = [with_overrides(c, overrides or {}) for c in configs if c.name not in skip]
    unmerged = [c.name for c in configs[:-1] if c.lora is not None and not c.lora.merge]
    if unmerged:
        raise ValueError(f"LoRA stages {unmerged} come before others: set `merge: true` for the next to start from")
    if not (resume or overwrite):
        refuse_to_replace([output_dir / c.name for c in configs])
    data_root = Path(data_root) if data_root is not None else None
    results, previous = [], Path(init_from)
    for index, config in enumerate(configs):
        folder = output_dir / config.name
        if resume and is_finished(folder, stage_fingerprint(config, previous, data_root)):
            print(f"{config.name}: already finished in {folder}, kept")
            results.append(StageResult(config.name, folder, *logged_losses(folder), "kept"))
        else:
            results.append(run_stage(config, previous, folder, data_root, resume, overwrite=overwrite))
        if is_main_process():
            # A finished stage is kept by its fingerprint and never resumed: its Trainer checkpoints (weights and
            # optimizer state, 1.8 GB a stage for the demo) would only fill the disk (an ablation run: 12 demos).
            shutil.rmtree(folder / CHECKPOINTS, ignore_errors=True)
            card = stage_model_card(
                config.name,
                config.to_dict(),
                [d.source for d in config.data],
                base_models or [],
                repo_id=push_to_hub,
                space=space,
            )
            (folder / "README.md").write_text(card)
            if push_to_hub:
                push_stage(folder, push_to_hub, branch=config.name, also_main=index == len(configs) - 1)
        previous = folder / "merged" if config.lora is not None else folder
    return results
