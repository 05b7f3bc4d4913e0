"""Accuracy against training time on the demo: how far a budget gets towards the VQA targets, and the first budget
that meets them all.

Runs the demo's stages before the last as the main job does, then the last stage (VQA instruction tuning) for the
longest budget asked, saving the model at each budget (`--steps`), and evaluates easy-VQA at each snapshot:
`curve.md` / `curve.json` / `curve.png`, accuracy per question type against cumulative training minutes, beside
the answer prior and the snapshot's own mismatched-image baseline. The learning-rate schedule spans the longest
budget, so an earlier point is the run's state part-way, not a shorter run of its own.

    python -m valign.train curve [--output outputs/curve] [--steps 28 56 112 224 448]
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..checkpoint import load_checkpoint, save_checkpoint
from ..processing_valign import ValignProcessor
from .config import StageConfig
from .demo import DemoSizes, build_demo_init, evaluate_demo_vqa, make_demo_data
from .run import recipe_stages, run_recipe, run_stage, with_overrides

CURVE_STEPS = (28, 112, 224, 448, 896)  # the main job's last stage runs 28; 896 met the targets (README)
# The targets for the default: overall and per question type.
TARGETS = {"overall": 0.90, "shape": 0.90, "colour": 0.80, "yes/no": 0.90}


class SnapshotCallback(TrainerCallback):
    """Saves the model (and its processor) after each step in `steps`, with the training seconds it took."""

    def __init__(self, steps: list[int], folder: Path, processor: ValignProcessor) -> None:
        self.steps, self.folder, self.processor = set(steps), folder, processor
        self.seconds: dict[int, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and state.is_world_process_zero:
            self.seconds[state.global_step] = time.perf_counter() - self.start
            save_checkpoint(model, self.processor, snapshot_folder(self.folder, state.global_step))


def snapshot_folder(folder: Path, step: int) -> Path:
    return folder / f"step-{step}"


def met_targets(vqa: dict[str, Any]) -> bool:
    per_type = vqa["per_type"]
    overall = vqa["accuracy"] >= TARGETS["overall"]
    return overall and all(per_type[t]["accuracy"] >= TARGETS[t] for t in TARGETS if t != "overall")


def table(points: list[dict[str, Any]], prior: dict[str, Any]) -> str:
    types = [t for t in TARGETS if t != "overall"]
    lines = [
        "| last-stage steps | samples seen | training minutes | VQA ± s.e. | "
        + " | ".join(types)
        + " | mismatched images | all targets |",
        "|---|---|---|---|" + "---|" * len(types) + "---|---|",
    ]
    for p in points:
        model, mismatched = p["vqa"]["model"], p["vqa"]["mismatched_images"]
        per_type = " | ".join(f"{100 * model['per_type'][t]['accuracy']:.1f}" for t in types)
        lines.append(
            f"| {p['steps']} | {p['samples']} | {p['minutes']:.1f} | {100 * model['accuracy']:.1f} ± "
            f"{100 * model['accuracy_stderr']:.1f} | {per_type} | {100 * mismatched['accuracy']:.1f} | "
            f"{'yes' if met_targets(model) else 'no'} |"
        )
    targets = ", ".join(f"{t} ≥ {100 * v:.0f} %" for t, v in TARGETS.items())
    reached = next((p for p in points if met_targets(p["vqa"]["model"])), None)
    lines += [
        "",
        f"Targets: {targets}. Answer prior (image-blind): {100 * prior['accuracy']:.1f} %.",
        f"First budget meeting them all: {reached['minutes']:.1f} training minutes ({reached['steps']} steps)."
        if reached
        else "No budget measured here meets them all.",
    ]
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    minutes = [p["minutes"] for p in points]
    axis.plot(minutes, [100 * p["vqa"]["model"]["accuracy"] for p in points], "o-", label="overall")
    for kind in ("colour", "shape", "yes/no"):
        values = [100 * p["vqa"]["model"]["per_type"][kind]["accuracy"] for p in points]
        axis.plot(minutes, values, "o--", label=kind)
    axis.plot(minutes, [100 * p["vqa"]["mismatched_images"]["accuracy"] for p in points], "k:", label="mismatched")
    axis.axhline(100 * TARGETS["overall"], color="grey", linewidth=0.8)
    axis.set(xlabel="training minutes (all stages)", ylabel="easy-VQA accuracy (%)", ylim=(0, 100))
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_curve(
    output: Path,
    steps: tuple[int, ...] = CURVE_STEPS,
    sizes: DemoSizes | None = None,
    overrides: dict[str, dict] | None = None,
) -> str:
    """The demo's earlier stages once, its last stage for `max(steps)` steps with a snapshot at each of `steps`,
    then easy-VQA at every snapshot. Always a fresh run into `output` (what it holds is replaced)."""
    sizes = sizes or DemoSizes()
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be positive step counts, got {steps}")
    data = output / "data"
    make_demo_data(data, sizes)
    init = build_demo_init(output, sizes)
    overrides = sizes.stage_overrides(overrides)
    *earlier, last = [with_overrides(StageConfig.from_yaml(p), overrides) for p in recipe_stages(sizes.recipe)]
    if any(c.max_steps <= 0 for c in earlier):
        raise ValueError(f"recipe {sizes.recipe}: the stages before the last need max_steps (samples per point)")
    before = run_recipe(
        sizes.recipe,
        init,
        output / "stages",
        data,
        base_models=sizes.base_models,
        overrides=overrides,
        skip=(last.name,),
        overwrite=True,
    )
    previous = before[-1].folder if before else init
    snapshots = SnapshotCallback(sorted(steps), output / "snapshots", ValignProcessor.from_pretrained(previous))
    last = dataclasses.replace(last, max_steps=max(steps))
    run_stage(last, previous, output / "stages" / last.name, data, overwrite=True, callbacks=(snapshots,))

    earlier_seconds = sum(s.seconds or 0.0 for s in before)
    earlier_samples = sum(c.max_steps * c.batch_size * c.gradient_accumulation_steps for c in earlier)
    points = []
    for step in sorted(steps):
        model, processor = load_checkpoint(snapshot_folder(output / "snapshots", step))
        print(f"evaluating the snapshot after {step} steps of {last.name}")
        points.append(
            {
                "steps": step,
                "samples": earlier_samples + step * last.batch_size * last.gradient_accumulation_steps,
                "minutes": (earlier_seconds + snapshots.seconds[step]) / 60,
                "vqa": evaluate_demo_vqa(model, processor, sizes),
            }
        )
    text = table(points, points[0]["vqa"]["answer_prior"])
    (output / "curve.md").write_text(text + "\n")
    serialisable = [p | {"vqa": {k: v for k, v in p["vqa"].items() if k != "predictions"}} for p in points]
    (output / "curve.json").write_text(json.dumps(serialisable, indent=2) + "\n")
    plot(points, output / "curve.png")
    print(text)
    return text
