"""LoRA fine-tuning of a valign checkpoint on VQA data in the PathVQA schema (``image``, ``question``, ``answer``).

    python -m valign.train.peft_vqa --model USER/valign --data flaviagiammarino/path-vqa --output runs/pathvqa-lora \\
        [--merge] [--push-to-hub USER/valign-pathvqa-lora [--space USER/SPACE]] \\
        [--epochs 1 --batch-size 8 --lr 2e-4 --lora-r 16 --lora-alpha 32 --max-steps -1 --limit N] \\
        [--eval-split validation --eval-limit 500]

The stage is the recipe `train/recipes/pathvqa` (a stage file with a `lora:` section, run by `run_stage`); the flags
override its fields. `--data easy-vqa` trains on the offline easy-VQA stand-in (splits train/test). The output folder
holds the adapter and the processor; with `--merge`, `OUTPUT/merged` holds a complete, Hub-ready checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from peft import PeftModel

from ..checkpoint import load_checkpoint
from ..data.sources import EASY_VQA, load_rows
from ..eval.vqa import VqaItems, evaluate_vqa
from ..hub.card import Benchmark, eval_results_from_json, merged_model_card
from ..hub.push import push_stage
from .config import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, DataSource, StageConfig
from .run import recipe_stages, run_stage

PATHVQA_RECIPE = "pathvqa"


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="python -m valign.train.peft_vqa", description=__doc__.split("\n")[0])
    cli.add_argument("--model", required=True, help="valign checkpoint: local folder or Hub id")
    cli.add_argument("--revision", help="branch, tag or commit of a Hub --model")
    cli.add_argument("--data", help=f"PathVQA-schema data (Hub id, local file) or {EASY_VQA!r}; default: the recipe's")
    cli.add_argument("--split", default="train")
    cli.add_argument("--limit", type=int, help="train on the first N questions only")
    cli.add_argument("--output", type=Path, required=True)
    choice = cli.add_mutually_exclusive_group()
    choice.add_argument("--resume", action="store_true", help="continue the run in --output")
    choice.add_argument("--overwrite", action="store_true", help="delete the run in --output and start afresh")
    cli.add_argument("--merge", action="store_true", help="also save a merged checkpoint to OUTPUT/merged")
    cli.add_argument("--push-to-hub", metavar="REPO", help="push the merged folder (with --merge) or the adapter")
    cli.add_argument("--space", metavar="USER/SPACE", help="Space serving the app (named in cards)")
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


def stage_config(args: argparse.Namespace) -> StageConfig:
    """The PathVQA recipe's stage with the command line's values."""
    (path,) = recipe_stages(PATHVQA_RECIPE)
    config = StageConfig.from_yaml(path)
    projections = ATTENTION_PROJECTIONS + (MLP_PROJECTIONS if args.mlp else ())
    lora = dataclasses.replace(
        config.lora,
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        targets=list(projections),
        merge=args.merge,
    )
    return dataclasses.replace(
        config,
        data=[DataSource(args.data or config.data[0].source, args.split, args.limit)],
        learning_rates=dict.fromkeys(config.learning_rates, args.lr),
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        precision="bf16" if args.bf16 else config.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        lora=lora,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = stage_config(args)
    data = config.data[0].source
    run_stage(config, args.model, args.output, resume=args.resume, revision=args.revision, overwrite=args.overwrite)
    print(f"adapter saved to {args.output}")

    eval_results = []
    if args.eval_split:
        base, processor = load_checkpoint(args.model, args.revision)
        model = PeftModel.from_pretrained(base, args.output).eval()
        items = VqaItems.from_rows(load_rows(data, args.eval_split, limit=args.eval_limit))
        train = load_rows(data, args.split, limit=args.limit)
        prior = list(train["question"]), list(train["answer"])
        scores = evaluate_vqa(model, processor, items.images, items.questions, items.answers, items.types, *prior)
        scores.pop("predictions")
        (args.output / "vqa_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        print(json.dumps({k: v["accuracy"] for k, v in scores.items()}))
        eval_results = eval_results_from_json({"vqa": scores}, vqa=Benchmark(data, data, args.eval_split))

    if args.merge:
        card = merged_model_card(
            args.model, data, config.to_dict(), eval_results, repo_id=args.push_to_hub, space=args.space
        )
        (args.output / "merged" / "README.md").write_text(card, encoding="utf-8")
        print(f"merged checkpoint saved to {args.output / 'merged'}")
    if args.push_to_hub:
        folder = args.output / "merged" if args.merge else args.output
        sha = push_stage(folder, args.push_to_hub, branch="main")
        print(f"pushed {folder} to {args.push_to_hub} ({sha})")


if __name__ == "__main__":
    main()
