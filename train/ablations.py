"""A miniature reproduction of the paper's ablations on the offline demo, each arm with the same data and settings.

Arms: the recipe as the paper has it (hybrid mask, stages 0–3, recap captions); the causal mask in stages 1–3;
without the alignment stages 0–1; human-like instead of recap captions. Writes `ablations.md` (VQA and caption
scores per arm, with standard errors) and `ablation_losses.png` (training loss of every arm, stage after stage).

    python -m valign.train ablations [--output outputs/ablations]
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .demo import DemoResult, DemoSizes, run_demo
from .trainer import read_training_log


@dataclass
class Arm:
    label: str
    overrides: dict[str, dict] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    caption_style: str = "recap"


ARMS = {
    "paper": Arm("hybrid mask, stages 0–3, recap captions (the paper)"),
    "causal": Arm(
        "causal mask in stages 1–3", overrides={s: {"attn_mode": "causal"} for s in ("stage-1", "stage-2", "stage-3")}
    ),
    "no-alignment": Arm("without stages 0–1", skip=("stage-0", "stage-1")),
    "human": Arm("human-like captions instead of recap", caption_style="human"),
}


def run_arm(output: Path, arm: Arm) -> tuple[DemoResult, float]:
    start = time.perf_counter()
    sizes = dataclasses.replace(DemoSizes(), caption_style=arm.caption_style)
    result = run_demo(output, sizes, resume=True, overrides=arm.overrides, skip=arm.skip)
    return result, time.perf_counter() - start


def table(results: dict[str, tuple[DemoResult, float]]) -> str:
    lines = [
        "| arm | VQA accuracy ± s.e. | colour | shape | yes/no | caption CIDEr | BLEU-4 | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, (result, seconds) in results.items():
        vqa, captions = result.vqa["model"], result.captions["scores"]
        per_type = " | ".join(f"{100 * vqa['per_type'][t]['accuracy']:.1f}" for t in ("colour", "shape", "yes/no"))
        lines.append(
            f"| {ARMS[key].label} | {100 * vqa['accuracy']:.1f} ± {100 * vqa['accuracy_stderr']:.1f} | {per_type} | "
            f"{100 * captions['CIDEr']:.1f} | {100 * captions['Bleu_4']:.1f} | {seconds / 60:.1f} |"
        )
    return "\n".join(lines)


def plot_losses(results: dict[str, tuple[DemoResult, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    for key, (result, _) in results.items():
        steps, losses, offset = [], [], 0
        for stage in result.stages:
            log = read_training_log(stage.folder / "training_log.jsonl")
            steps += [offset + r["step"] for r in log]
            losses += [r["loss"] for r in log]
            offset = steps[-1]
        axis.plot(steps, losses, label=ARMS[key].label)
    axis.set(xlabel="optimizer step, stages in sequence", ylabel="training loss", yscale="log")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_ablations(output: Path, arms: list[str] | None = None) -> str:
    results = {key: run_arm(output / key, ARMS[key]) for key in arms or list(ARMS)}
    text = table(results)
    (output / "ablations.md").write_text(text + "\n")
    summary = {
        k: {"vqa": r.vqa["model"], "captions": r.captions["scores"], "seconds": t} for k, (r, t) in results.items()
    }
    (output / "ablations.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_losses(results, output / "ablation_losses.png")
    print(text)
    return text
