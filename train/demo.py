"""The embedded default: valign's four-stage recipe end to end on one CPU, offline, in minutes.

It generates its data (rendered shape scenes captioned in the "recap" style, easy-VQA questions), builds tiny
random SigLIP/Qwen2 backbones with a tokenizer trained on that data, runs stages 0–3 of `train/recipes/demo`,
then evaluates on held-out images: caption CIDEr, and VQA accuracy per question type next to two image-blind
baselines (the answer prior per question, and the trained model fed mismatched images).

    python -m valign.train                       # everything, into outputs/demo
    python -m valign.train demo --output DIR --resume
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint
from ..data.prompts import CAPTION_PROMPT, VQA_INSTRUCTION
from ..data.synthetic import load_easy_vqa, make_caption_dataset, make_caption_eval_set, write_parquet
from ..eval.captions import evaluate_captions
from ..eval.generate import DecodingSettings
from ..eval.vqa import VQA_ARMS, evaluate_vqa
from ..hub.card import Benchmark, eval_results_from_json, write_model_card
from .assembly import from_backbones
from .backbones import build_tiny_backbones
from .run import StageResult, run_recipe

# The data the demo's evaluation numbers come from, for the last stage's model-index.
DEMO_BENCHMARKS = {
    "captions": Benchmark("valign-demo-scenes", "Rendered shape scenes (held out, 5 references each)", "test"),
    "vqa": Benchmark("easy-vqa", "easy-VQA", "test"),
}
DEMO_NOTE = (
    "Trained by valign's offline CPU demo (`python -m valign.train`) from tiny random backbones on rendered shape "
    "scenes and easy-VQA: it shows the pipeline working end to end and is no use on real photos."
)


@dataclass
class DemoSizes:
    captions: int = 6000
    vqa_train: int = 12000
    caption_eval: int = 100
    vqa_test: int = 500
    image_size: int = 64  # rendered scenes; easy-VQA images are 64 px too
    encoder_image_size: int = 32  # what the tiny vision tower sees
    patch_size: int = 8  # 16 image tokens per image
    width: int = 128
    layers: int = 4
    vision_layers: int = 2
    caption_style: str = "recap"


@dataclass
class DemoResult:
    stages: list[StageResult]
    captions: dict[str, Any]
    vqa: dict[str, Any]
    sizes: DemoSizes = field(default_factory=DemoSizes)


def make_demo_data(folder: Path, sizes: DemoSizes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    captions = make_caption_dataset(sizes.captions, sizes.caption_style, seed=0, image_size=sizes.image_size)
    write_parquet(captions, folder / "captions.parquet")
    write_parquet(load_easy_vqa("train", sizes.vqa_train), folder / "vqa_train.parquet")


def demo_corpus(sizes: DemoSizes) -> list[str]:
    """The text the demo's tokenizer is trained on: captions of both styles, questions, answers and prompts
    (the same tokenizer whichever caption style an ablation trains on)."""
    captions = [make_caption_dataset(min(sizes.captions, 500), style, image_size=8) for style in ("recap", "human")]
    vqa = load_easy_vqa("train", sizes.vqa_train)
    turns = [t["value"].replace("<image>", "") for c in captions for conv in c["conversations"] for t in conv]
    return turns + list(vqa["question"]) + list(vqa["answer"]) + [CAPTION_PROMPT, VQA_INSTRUCTION]


def build_demo_init(folder: Path, sizes: DemoSizes) -> Path:
    """A valign checkpoint assembled from tiny random backbones, the starting point of stage 0."""
    torch.manual_seed(0)
    vision, text = build_tiny_backbones(
        folder / "backbones",
        image_size=sizes.encoder_image_size,
        patch_size=sizes.patch_size,
        vision_width=sizes.width,
        text_width=sizes.width,
        layers=sizes.layers,
        vision_layers=sizes.vision_layers,
        init_std=0.02,
        corpus=demo_corpus(sizes),
    )
    model, processor = from_backbones(str(vision), str(text))
    model.save_pretrained(folder / "init")
    processor.save_pretrained(folder / "init")
    return folder / "init"


def evaluate_demo(checkpoint: Path, sizes: DemoSizes) -> tuple[dict, dict]:
    model, processor = load_checkpoint(checkpoint)
    settings = DecodingSettings(max_new_tokens=40, batch_size=32)
    eval_set = make_caption_eval_set(sizes.caption_eval, image_size=sizes.image_size)
    captions = evaluate_captions(
        model, processor, eval_set["image"], eval_set["captions"], eval_set["image_id"], CAPTION_PROMPT, settings
    )
    test, train = load_easy_vqa("test", sizes.vqa_test), load_easy_vqa("train", sizes.vqa_train)
    vqa = evaluate_vqa(
        model,
        processor,
        test["image"],
        test["question"],
        test["answer"],
        test["question_type"],
        train["question"],
        train["answer"],
        DecodingSettings(max_new_tokens=4, batch_size=64),
    )
    return captions, vqa


def percent(scores: dict, key: str = "accuracy") -> str:
    value = scores.get(key)
    return "–" if value is None else f"{100 * value:.1f}"


def loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"  # None: a stage shorter than its logging interval


def report(result: DemoResult) -> str:
    """A markdown report: losses per stage, caption scores, VQA accuracy beside the image-blind baselines."""
    lines = ["| stage | first loss | last loss |", "|---|---|---|"]
    lines += [f"| {s.name} | {loss(s.first_loss)} | {loss(s.last_loss)} |" for s in result.stages]
    scores = result.captions["scores"]
    lines += ["", f"Captions ({len(result.captions['captions'])} held-out scenes, greedy): "]
    lines[-1] += ", ".join(f"{k} {100 * v:.1f}" for k, v in scores.items())
    types = sorted(result.vqa["model"]["per_type"])
    lines += ["", "| VQA (easy-VQA test) | accuracy ± s.e. | " + " | ".join(types) + " |"]
    lines += ["|---|---|" + "---|" * len(types)]
    for label, key in VQA_ARMS.items():
        s = result.vqa[key]
        per_type = " | ".join(percent(s["per_type"][t]) for t in types)
        lines.append(f"| {label} | {percent(s)} ± {100 * s['accuracy_stderr']:.1f} | {per_type} |")
    n = result.vqa["model"]["n"]
    lines.append(f"\n{n} test questions; ± is one binomial standard error of the overall accuracy.")
    return "\n".join(lines)


def run_demo(
    output: Path,
    sizes: DemoSizes | None = None,
    resume: bool = False,
    overrides: dict[str, dict] | None = None,
    skip: tuple[str, ...] = (),
) -> DemoResult:
    """Data, backbones, the demo recipe (`overrides` and `skip` as in `run_recipe`), evaluation and report.

    Without `resume` it starts afresh and replaces an earlier demo's stages in `output` (as `--overwrite` does):
    it makes its data and starting checkpoint anew, so stages trained from the earlier ones could only mix."""
    sizes = sizes or DemoSizes()
    data = output / "data"
    if not (resume and (data / "vqa_train.parquet").exists()):
        make_demo_data(data, sizes)
    init = output / "init" if resume and (output / "init" / "config.json").exists() else build_demo_init(output, sizes)
    stages = run_recipe(
        "demo",
        init,
        output / "stages",
        data,
        resume,
        base_models=[],
        overrides=overrides,
        skip=skip,
        overwrite=not resume,
    )
    captions, vqa = evaluate_demo(stages[-1].folder, sizes)
    result = DemoResult(stages, captions, vqa, sizes)
    text = report(result)
    (output / "results.md").write_text(text + "\n")
    serialisable = {"stages": [vars(s) | {"folder": str(s.folder)} for s in stages], "captions": captions, "vqa": vqa}
    (output / "results.json").write_text(json.dumps(serialisable, indent=2, default=str) + "\n")
    # The last stage's card now gets the evaluation, as text and as model-index metadata.
    write_model_card(
        stages[-1].folder, eval_results=eval_results_from_json(serialisable, **DEMO_BENCHMARKS), summary=DEMO_NOTE
    )
    print(text)
    return result
