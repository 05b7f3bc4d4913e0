"""valign's evaluation command line: captioning (COCO Karpathy test, Flickr30k test) and VQA (PathVQA, easy-VQA).

    python -m valign.eval captions --model REPO_OR_DIR [--dataset coco|flickr30k|SOURCE] [--limit N] [--num-beams 3]
    python -m valign.eval vqa --model REPO_OR_DIR [--dataset path-vqa|easy-vqa|SOURCE] [--limit N]

SOURCE is a Hub dataset id or a local parquet/JSON file in the same schema (captions: `image` + `caption`/
`captions`/`sentences`; VQA: `image`, `question`, `answer`). Results go to a JSON file (scores, per-item outputs,
model revision, decoding settings, time, items/s) and a markdown table beside the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint
from ..data.adapters import caption_references
from ..data.images import decode_image
from ..data.prompts import CAPTION_PROMPT
from ..data.sources import load_rows
from .captions import evaluate_captions
from .generate import DecodingSettings
from .vqa import VQA_ARMS, VqaItems, evaluate_vqa

# Karpathy test splits as image + list-of-5-captions tables.
CAPTION_SETS = {
    "coco": "nlphuji/mscoco_2014_5k_test_image_text_retrieval",
    "flickr30k": "nlphuji/flickr_1k_test_image_text_retrieval",
}
VQA_SETS = {"path-vqa": "flaviagiammarino/path-vqa"}
PAPER_CIDER = {"coco": 127.1, "flickr30k": 80.5}  # arXiv 2503.19508, CIDEr ×100


def model_revision(model, requested: str | None) -> str | None:
    """The commit a Hub model was loaded from (local folders have none)."""
    return getattr(model.config, "_commit_hash", None) or requested


def caption_rows(source: str, split: str, limit: int | None) -> tuple[list, list[list[str]], list[str]]:
    images, references, ids = [], [], []
    for index, row in enumerate(load_rows(source, split, limit=limit)):
        images.append(decode_image(row["image"]))
        references.append(caption_references(row))
        ids.append(str(row.get("image_id", row.get("id", index))))
    return images, references, ids


def vqa_text(source: str, split: str) -> tuple[list[str], list[str]]:
    """Questions and answers of a split, for the answer-prior baseline (no image is decoded)."""
    rows = load_rows(source, split)
    return list(rows["question"]), list(rows["answer"])


def caption_table(dataset: str, scores: dict[str, float]) -> str:
    paper = PAPER_CIDER.get(dataset)
    lines = ["| metric | valign (this run) | paper |", "|---|---|---|"]
    for name, value in scores.items():
        reference = f"{paper:.1f}" if name == "CIDEr" and paper is not None else "–"
        lines.append(f"| {name} | {100 * value:.1f} | {reference} |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], table: str, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    output.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"results: {output} and {output.with_suffix('.md')}")


def model_and_settings(args: argparse.Namespace) -> tuple[Any, Any, DecodingSettings]:
    """The checkpoint, loaded as Hub remote code as users load it, and the decoding settings of the command."""
    model, processor = load_checkpoint(args.model, args.revision, remote_code=True)
    return model, processor, DecodingSettings(args.max_new_tokens, args.num_beams, args.batch_size)


def run_captions(args: argparse.Namespace) -> None:
    model, processor, settings = model_and_settings(args)
    source = CAPTION_SETS.get(args.dataset, args.dataset)
    images, references, ids = caption_rows(source, args.split, args.limit)
    results = evaluate_captions(model, processor, images, references, ids, args.prompt, settings)
    results |= {"checkpoint": args.model, "revision": model_revision(model, args.revision), "dataset": source}
    write_results(results, caption_table(args.dataset, results["scores"]), args.output)


def vqa_table(results: dict[str, Any]) -> str:
    lines = ["| | accuracy ± s.e. | closed | open exact match | open F1 |", "|---|---|---|---|---|"]
    for label, key in VQA_ARMS.items():
        if key in results:
            s = results[key]
            cells = [s["closed_accuracy"], s["open_exact_match"], s["open_f1"]]
            cells = " | ".join("–" if v is None else f"{100 * v:.1f}" for v in cells)
            lines.append(f"| {label} | {100 * s['accuracy']:.1f} ± {100 * s['accuracy_stderr']:.1f} | {cells} |")
    return "\n".join(lines)


def run_vqa(args: argparse.Namespace) -> None:
    model, processor, settings = model_and_settings(args)
    source = VQA_SETS.get(args.dataset, args.dataset)
    items, train = VqaItems.from_rows(load_rows(source, args.split, limit=args.limit)), vqa_text(source, "train")
    results = evaluate_vqa(
        model, processor, items.images, items.questions, items.answers, items.types, *train, settings
    )
    results |= {"decoding": settings.to_dict(), "dataset": source, "checkpoint": args.model}
    results["revision"] = model_revision(model, args.revision)
    write_results(results, vqa_table(results), args.output)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m valign.eval", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    for name, default in (("captions", "coco"), ("vqa", "path-vqa")):
        command = commands.add_parser(name)
        command.add_argument("--model", required=True)
        command.add_argument("--revision")
        command.add_argument("--dataset", default=default)
        command.add_argument("--split", default="test")
        command.add_argument("--limit", type=int)
        command.add_argument("--batch-size", type=int, default=16)
        command.add_argument("--num-beams", type=int, default=1)
        command.add_argument("--max-new-tokens", type=int, default=40 if name == "captions" else 16)
        command.add_argument("--output", type=Path, default=Path(f"outputs/eval/{name}.json"))
        if name == "captions":
            command.add_argument("--prompt", default=CAPTION_PROMPT)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    {"captions": run_captions, "vqa": run_vqa}[args.command](args)


if __name__ == "__main__":
    main()
