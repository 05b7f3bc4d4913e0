"""LoRA fine-tuning of a valign checkpoint on VQA data in the PathVQA schema (``image``, ``question``, ``answer``).

    python -m valign.train.peft_vqa --model USER/valign --data flaviagiammarino/path-vqa --output runs/pathvqa-lora \\
        [--merge] [--push-to-hub USER/valign-pathvqa-lora] [--epochs 1 --batch-size 8 --lr 2e-4 --lora-r 16 \\
        --lora-alpha 32 --max-steps -1 --limit N] [--eval-split validation --eval-limit 500]

`--data easy-vqa` trains on the offline easy-VQA stand-in (`data.synthetic.load_easy_vqa`, splits train/test).

LoRA goes into the language model only: the adapter targets are a regex anchored at ``model.language_model.``,
because SigLIP's attention has ``q_proj``/``k_proj``/``v_proj`` too and a plain name list would adapt the vision
tower. The projector is trained in full (``modules_to_save``). The output folder holds the adapter and the processor;
with ``--merge``, ``OUTPUT/merged`` holds a complete, Hub-ready checkpoint (weights, remote code, processor, card).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, Trainer, TrainingArguments

from ..checkpoint import load_checkpoint
from ..configuration_valign import checkpointing_arguments
from ..data.adapters import adapt
from ..data.prompts import VQA_INSTRUCTION
from ..data.sources import EASY_VQA, load_rows
from ..eval.vqa import VqaItems, evaluate_vqa
from ..hub.card import Benchmark, eval_results_from_json, merged_model_card
from ..hub.push import checkpoint_files, push_stage
from .collator import ConversationCollator
from .run import warmup_argument

logger = logging.getLogger(__name__)

# transformers 5 removed AutoModelForVision2Seq; valign's config maps both names, so either major loads it.
DEFAULT_DATA = "flaviagiammarino/path-vqa"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- model and adapter


def language_model_targets(projections: Sequence[str] = ATTENTION_PROJECTIONS) -> str:
    """A regex (PEFT full-matches it against module names) for `projections` inside the language model only."""
    return rf"model\.language_model\.(?:.*\.)?(?:{'|'.join(projections)})"


def lora_config(
    r: int = 16, alpha: int = 32, targets: str | Sequence[str] | None = None, dropout: float = 0.05
) -> LoraConfig:
    """LoRA on the language model's projections (`targets`: a regex, or projection names for
    `language_model_targets`), the projector trained in full and saved with the adapter."""
    if targets is None or not isinstance(targets, str):
        targets = language_model_targets(targets or ATTENTION_PROJECTIONS)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=["multi_modal_projector"],
        bias="none",
    )


def add_lora(model: torch.nn.Module, config: LoraConfig, base_model_name_or_path: str | None = None) -> PeftModel:
    """Wrap `model` with LoRA; everything else (vision tower, embeddings, LM head) stays frozen.

    `base_model_name_or_path` is what the adapter config records as its base: pass the Hub id the base came from,
    so that the adapter loads anywhere (PEFT would otherwise record `model.name_or_path`, a local path if the base
    was read from one).
    """
    peft_model = get_peft_model(model, config)
    if base_model_name_or_path is not None:
        peft_model.peft_config["default"].base_model_name_or_path = str(base_model_name_or_path)
    return peft_model


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA adapter."""
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


# --------------------------------------------------------------------------- data


def vqa_rows(source: str, split: str = "train", limit: int | None = None) -> datasets.Dataset:
    """Rows of a PathVQA-schema data set (Hub id or local file), or of easy-VQA for `source == "easy-vqa"`."""
    return load_rows(source, split, limit=limit)


def vqa_training_set(rows: datasets.Dataset, instruction: str = VQA_INSTRUCTION):
    """Chat samples with the question as user turn and the short answer as assistant turn (the only labels)."""
    return adapt(rows, "vqa", vqa_instruction=instruction)


# --------------------------------------------------------------------------- training


@dataclass
class FinetuneSettings:
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 2048
    bf16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    seed: int = 0


def training_arguments(settings: FinetuneSettings, output_dir: str | Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(Path(output_dir) / "checkpoints"),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.lr,
        lr_scheduler_type="cosine",
        **warmup_argument(settings.warmup_ratio),
        weight_decay=settings.weight_decay,
        bf16=settings.bf16,
        **(checkpointing_arguments() if settings.gradient_checkpointing else {}),
        save_strategy="no",  # the adapter is saved once, at the end
        logging_steps=settings.logging_steps,
        seed=settings.seed,
        data_seed=settings.seed,
        report_to="none",
        use_cpu=not torch.accelerator.is_available(),
        remove_unused_columns=False,  # the collator needs the samples' messages and images
        label_names=["labels"],  # a PeftModel's forward signature does not name them
    )


def finetune(
    model: PeftModel, processor, dataset, settings: FinetuneSettings, output_dir: str | Path
) -> transformers.trainer_utils.TrainOutput:
    """Train `model` (LoRA + projector) on chat samples with answer-only labels (`ConversationCollator`)."""
    if settings.gradient_checkpointing:
        # Reentrant checkpointing drops the gradient of segments whose inputs need none; harmless otherwise.
        model.enable_input_require_grads()
    trainer = Trainer(
        model=model,
        args=training_arguments(settings, output_dir),
        train_dataset=dataset,
        data_collator=ConversationCollator(processor, max_length=settings.max_length, seed=settings.seed),
    )
    return trainer.train()


# --------------------------------------------------------------------------- saving and publishing


def save_adapter(model: PeftModel, processor, folder: str | Path) -> Path:
    """The adapter (LoRA + projector weights, adapter_config.json, PEFT's card) and the processor, side by side."""
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_merged(model: PeftModel, processor, folder: str | Path, card: str | None = None) -> PreTrainedModel:
    """Merge the adapter into the base weights and save a complete checkpoint: weights, config, remote code, processor.

    Returns the merged model. `merge_and_unload` works in place: `model` is spent afterwards. `save_pretrained` of
    the merged (remote-code) model copies the .py files but writes no processor files, so those are added, and
    `hub.push.checkpoint_files` checks that nothing a Hub checkpoint needs is missing.
    """
    folder = Path(folder)
    merged = model.merge_and_unload()
    merged.save_pretrained(folder)
    processor.save_pretrained(folder)
    if card is not None:
        (folder / "README.md").write_text(card, encoding="utf-8")
    checkpoint_files(folder)  # raises if config, weights, remote code or processor files are missing
    return merged


# --------------------------------------------------------------------------- evaluation


def evaluate_rows(
    model, processor, rows: datasets.Dataset, train_rows: datasets.Dataset | None = None, settings=None
) -> dict[str, Any]:
    """`eval.vqa.evaluate_vqa` on PathVQA-schema rows: the model, the model on mismatched images and, given
    `train_rows`, the per-question answer prior. `settings`: `eval.generate.DecodingSettings`."""
    items = VqaItems.from_rows(rows)
    prior = {}
    if train_rows is not None:
        prior = {"train_questions": list(train_rows["question"]), "train_answers": list(train_rows["answer"])}
    return evaluate_vqa(
        model, processor, items.images, items.questions, items.answers, items.types, settings=settings, **prior
    )


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="python -m valign.train.peft_vqa", description=__doc__.split("\n")[0])
    cli.add_argument("--model", required=True, help="valign checkpoint: local folder or Hub id")
    cli.add_argument("--revision", help="branch, tag or commit of a Hub --model")
    cli.add_argument("--data", default=DEFAULT_DATA, help=f"PathVQA-schema data (Hub id, local file) or {EASY_VQA!r}")
    cli.add_argument("--split", default="train")
    cli.add_argument("--limit", type=int, help="train on the first N questions only")
    cli.add_argument("--output", type=Path, required=True)
    cli.add_argument("--merge", action="store_true", help="also save a merged checkpoint to OUTPUT/merged")
    cli.add_argument("--push-to-hub", metavar="REPO", help="push the merged folder (with --merge) or the adapter")
    cli.add_argument("--epochs", type=float, default=1.0)
    cli.add_argument("--max-steps", type=int, default=-1)
    cli.add_argument("--batch-size", type=int, default=8)
    cli.add_argument("--gradient-accumulation-steps", type=int, default=1)
    cli.add_argument("--lr", type=float, default=2e-4)
    cli.add_argument("--lora-r", type=int, default=16)
    cli.add_argument("--lora-alpha", type=int, default=32)
    cli.add_argument("--lora-dropout", type=float, default=0.05)
    cli.add_argument("--mlp", action="store_true", help="adapt the MLP projections too, not only attention")
    cli.add_argument("--bf16", action="store_true")
    cli.add_argument("--gradient-checkpointing", action="store_true")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--eval-split", help="after training, score VQA on this split (PathVQA: validation, test)")
    cli.add_argument("--eval-limit", type=int, default=500)
    return cli


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    transformers.set_seed(args.seed)
    model, processor = load_checkpoint(args.model, args.revision)
    # Hub ids are recorded as given; a local base is recorded as the path it was read from.
    projections = ATTENTION_PROJECTIONS + (MLP_PROJECTIONS if args.mlp else ())
    lora = lora_config(args.lora_r, args.lora_alpha, projections, args.lora_dropout)
    model = add_lora(model, lora, base_model_name_or_path=args.model)
    model.print_trainable_parameters()

    settings = FinetuneSettings(
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        lr=args.lr,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
    )
    rows = vqa_rows(args.data, args.split, args.limit)
    dataset = vqa_training_set(rows)
    finetune(model, processor, dataset, settings, args.output)
    print(f"training data: {dataset.skips.report()}")
    save_adapter(model, processor, args.output)
    print(f"adapter saved to {args.output}")

    eval_results = []
    if args.eval_split:
        model.eval()
        scores = evaluate_rows(model, processor, vqa_rows(args.data, args.eval_split, args.eval_limit), rows)
        scores.pop("predictions")
        (args.output / "vqa_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        print(json.dumps({k: v["accuracy"] for k, v in scores.items()}))
        eval_results = eval_results_from_json({"vqa": scores}, vqa=Benchmark(args.data, args.data, args.eval_split))

    if args.merge:
        run = {**asdict(settings), "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "split": args.split}
        card = merged_model_card(args.model, args.data, run, eval_results, repo_id=args.push_to_hub)
        save_merged(model, processor, args.output / "merged", card)
        print(f"merged checkpoint saved to {args.output / 'merged'}")
    if args.push_to_hub:
        folder = args.output / "merged" if args.merge else args.output
        sha = push_stage(folder, args.push_to_hub, branch="main")
        print(f"pushed {folder} to {args.push_to_hub} ({sha})")


if __name__ == "__main__":
    main()
