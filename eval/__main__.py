"""valign's evaluation command line: captioning (COCO Karpathy test, Flickr30k test) and VQA (PathVQA, easy-VQA).

    python -m valign.eval captions --model REPO_OR_DIR [--dataset coco|flickr30k|SOURCE] [--limit N] [--num-beams 3]
    python -m valign.eval vqa --model REPO_OR_DIR [--dataset path-vqa|easy-vqa|SOURCE] [--limit N]

SOURCE is a Hub dataset id or a local parquet/JSON file or folder in the same schema (captions: `image` +
`caption`/`captions`/`sentences`; VQA: `image`, `question`, `answer`). `--split` defaults to test, or to the one
split a local source holds (a single file holds the split its name gives, as on the Hub). Rows without an answer,
a reference or a readable image are skipped and counted in the results. VQA's answer prior is built from the
source's train split (never the evaluated one) or `--prior-source`, else leave-one-out over the evaluated items.
Results go to `--output` (a .json file: scores, per-item outputs, skipped rows, model revision, decoding
settings, time, items/s; captions are saved there before scoring) and a markdown table beside the paper's
numbers in the same name with .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint
from ..data.prompts import CAPTION_PROMPT
from ..data.sources import load_rows, local_splits
from .captions import CaptionItems, check_caption_inputs, evaluate_captions
from .generate import DecodingSettings
from .rows import read_items, text_cell
from .vqa import LEAVE_ONE_OUT, VQA_ARMS, VqaItems, evaluate_vqa

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


def default_split(source: str, fallback: str) -> str:
    """The one split of a local source that holds one, else `fallback`."""
    splits = local_splits(source)
    return splits[0] if splits is not None and len(splits) == 1 else fallback


def same_source(a: str, b: str) -> bool:
    local = Path(a).expanduser().exists() and Path(b).expanduser().exists()
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve() if local else a == b


def prior_split(source: str, split: str, prior_source: str | None) -> tuple[str, str] | None:
    """Where the answer prior's training rows come from: `prior_source` (its train split, or its one split), else
    the source's train split when that is not the evaluated one; None when there is none (leave-one-out)."""
    if prior_source is not None:
        chosen = (prior_source, default_split(prior_source, "train"))
        if same_source(prior_source, source) and chosen[1] == split:
            raise ValueError(f"--prior-source {prior_source} is the evaluated split itself; name training rows")
        return chosen
    splits = local_splits(source)
    return (source, "train") if split != "train" and (splits is None or "train" in splits) else None


def prior_rows(source: str, split: str) -> tuple[list[str], list[str], dict]:
    """Questions and answers of a split, for the answer-prior baseline (no image is decoded; rows without a
    question or an answer are skipped and counted)."""
    rows = load_rows(source, split).select_columns(["question", "answer"])
    read = read_items(rows, lambda row, _: (text_cell(row, "question"), text_cell(row, "answer")))
    questions, answers = [list(column) for column in zip(*read.items)] or [[], []]
    return questions, answers, read.report()


def caption_table(dataset: str, scores: dict[str, float]) -> str:
    paper = PAPER_CIDER.get(dataset)
    lines = ["| metric | valign (this run) | paper |", "|---|---|---|"]
    for name, value in scores.items():
        reference = f"{paper:.1f}" if name == "CIDEr" and paper is not None else "–"
        lines.append(f"| {name} | {100 * value:.1f} | {reference} |")
    return "\n".join(lines)


def json_output(value: str) -> Path:
    """`--output`: the JSON results file. The table goes beside it with the suffix .md, so the two never collide
    (`--output x.md` used to overwrite the results with the table)."""
    path = Path(value)
    if path.suffix.lower() != ".json":
        raise argparse.ArgumentTypeError(f"{value}: name a .json file (the markdown table is written beside it as .md)")
    return path


def write_json(results: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")


def write_results(results: dict[str, Any], table: str, output: Path) -> None:
    write_json(results, output)
    output.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"results: {output} and {output.with_suffix('.md')}")


def report_skips(skipped: dict[str, Any], what: str) -> None:
    if skipped["counts"]:
        print(f"skipped {len(skipped['rows'])} {what} rows: {skipped['counts']} (listed in the results file)")


def model_and_settings(args: argparse.Namespace) -> tuple[Any, Any, DecodingSettings]:
    """The checkpoint (valign's classes; with `--trust-remote-code` its own files, as Hub users load it) and the
    decoding settings of the command."""
    model, processor = load_checkpoint(args.model, args.revision, trust_remote_code=args.trust_remote_code)
    return model, processor, DecodingSettings(args.max_new_tokens, args.num_beams, args.batch_size)


def run_captions(args: argparse.Namespace) -> None:
    source = CAPTION_SETS.get(args.dataset, args.dataset)
    split = args.split or default_split(source, "test")
    items = CaptionItems.from_rows(load_rows(source, split, limit=args.limit))
    report_skips(items.skipped, "caption")
    check_caption_inputs(items.images, items.references, items.ids)  # before the model is even loaded
    model, processor, settings = model_and_settings(args)
    record = {"checkpoint": args.model, "revision": model_revision(model, args.revision), "dataset": source}
    record |= {"split": split, "skipped": items.skipped}
    results = evaluate_captions(
        model, processor, items.images, items.references, items.ids, args.prompt, settings,
        on_generated=lambda generated: write_json(generated | record, args.output),
    )  # fmt: skip
    write_results(results | record, caption_table(args.dataset, results["scores"]), args.output)


def vqa_table(results: dict[str, Any]) -> str:
    lines = ["| | accuracy ± s.e. | closed | open exact match | open F1 |", "|---|---|---|---|---|"]
    for label, key in VQA_ARMS.items():
        if key in results:
            s = results[key]
            cells = [s["closed_accuracy"], s["open_exact_match"], s["open_f1"]]
            cells = " | ".join("–" if v is None else f"{100 * v:.1f}" for v in cells)
            label = label.replace("blind", "blind, leave-one-out") if s.get("built_from") == LEAVE_ONE_OUT else label
            lines.append(f"| {label} | {100 * s['accuracy']:.1f} ± {100 * s['accuracy_stderr']:.1f} | {cells} |")
    return "\n".join(lines)


def run_vqa(args: argparse.Namespace) -> None:
    source = VQA_SETS.get(args.dataset, args.dataset)
    split = args.split or default_split(source, "test")
    items = VqaItems.from_rows(load_rows(source, split, limit=args.limit))
    report_skips(items.skipped, "VQA")
    where = prior_split(source, split, args.prior_source)
    questions, answers, prior_skipped = prior_rows(*where) if where else (None, None, None)
    if where is None:
        print(f"answer prior: {source} holds no training split besides {split!r}, so it is built {LEAVE_ONE_OUT}")
    model, processor, settings = model_and_settings(args)
    results = evaluate_vqa(
        model, processor, items.images, items.questions, items.answers, items.types, questions, answers, settings
    )
    if where is not None:
        results["answer_prior"]["source"] = f"{where[0]} split {where[1]}, {len(questions)} questions"
        results["answer_prior"]["skipped"] = prior_skipped
    results |= {"decoding": settings.to_dict(), "dataset": source, "split": split, "checkpoint": args.model}
    results |= {"revision": model_revision(model, args.revision), "skipped": items.skipped}
    write_results(results, vqa_table(results), args.output)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m valign.eval", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    for name, default in (("captions", "coco"), ("vqa", "path-vqa")):
        command = commands.add_parser(name)
        command.add_argument("--model", required=True)
        command.add_argument("--revision")
        command.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="load with the checkpoint's own Python files, as Hub users do (they run here); default: valign's",
        )
        command.add_argument("--dataset", default=default)
        command.add_argument("--split", help="default: test, or the one split of a local source that holds one")
        command.add_argument("--limit", type=int)
        command.add_argument("--batch-size", type=int, default=16)
        command.add_argument("--num-beams", type=int, default=1)
        command.add_argument("--max-new-tokens", type=int, default=40 if name == "captions" else 16)
        command.add_argument("--output", type=json_output, default=Path(f"outputs/eval/{name}.json"))
        if name == "captions":
            command.add_argument("--prompt", default=CAPTION_PROMPT)
        else:
            command.add_argument("--prior-source", help="training rows for the answer prior (default: SOURCE's train)")
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    {"captions": run_captions, "vqa": run_vqa}[args.command](args)


if __name__ == "__main__":
    main()
