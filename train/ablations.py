"""A miniature reproduction of the paper's ablations on the offline demo: each arm with the same data, settings
and number of training steps, several seeds per arm.

Arms: the recipe as the paper has it (hybrid mask, stages 0–3, recap captions); the causal mask in stages 1–3;
without the alignment stages 0–1 (their steps go to stage 2, so the budget in steps is the same); human-like
instead of recap captions. A seed sets the projector's initialisation and every stage's data order. Writes
`ablations.md` (mean ± standard deviation over seeds and the per-seed figures), `ablations.json` and
`ablation_losses.png` (training loss of every arm and seed, stage after stage).

A finished run (arm, seed) is recorded in its folder (`run.json`: what was run and how long it took) and kept when
the command is run again with the same arm, seed, backbones and recipe, so a run interrupted after some arms (the
whole takes about two hours on 2 cores) continues where it stopped; the table's times are each run's own.

`--last-stage-steps N` gives every arm's last stage (VQA instruction tuning) N optimizer steps instead of the
recipe's: the demo's 28 are too few for any arm to read the image, so the arms could not differ in VQA.

    python -m valign.train ablations [--output outputs/ablations] [--seeds 0 1 2] [--arms paper causal]
        [--last-stage-steps 112]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import StageConfig
from .demo import DemoResult, DemoSizes, run_demo
from .run import as_trained_here, recipe_stages, with_overrides
from .trainer import read_training_log

SEEDS = (0, 1, 2)


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
    "no-alignment": Arm("without stages 0–1 (their steps added to stage 2)", skip=("stage-0", "stage-1")),
    "human": Arm("human-like captions instead of recap", caption_style="human"),
}
# What the table reports per run, as (label, reader of a DemoResult): accuracies and CIDEr ×100.
METRICS = {
    "VQA": lambda r: 100 * r.vqa["model"]["accuracy"],
    "colour": lambda r: 100 * r.vqa["model"]["per_type"]["colour"]["accuracy"],
    "shape": lambda r: 100 * r.vqa["model"]["per_type"]["shape"]["accuracy"],
    "yes/no": lambda r: 100 * r.vqa["model"]["per_type"]["yes/no"]["accuracy"],
    # The same model shown other questions' images: VQA above it is what the model reads from the image.
    "VQA, mismatched images": lambda r: 100 * r.vqa["mismatched_images"]["accuracy"],
    "CIDEr": lambda r: 100 * r.captions["scores"]["CIDEr"],
}


def arm_overrides(arm: Arm, recipe: str, last_stage_steps: int | None = None) -> dict[str, dict]:
    """The arm's stage overrides, with the last stage's `max_steps` set to `last_stage_steps` when given; a skipped
    stage's `max_steps` move to the first stage that runs, so every arm trains the same number of optimizer steps
    (a skipped stage without `max_steps` is refused: its steps are unknown before its data is read)."""
    configs = [StageConfig.from_yaml(path) for path in recipe_stages(recipe)]
    if last_stage_steps is not None:
        last = configs[-1].name
        if last in arm.skip:
            raise ValueError(f"arm {arm.label!r} skips {last}, so its steps cannot be set")
        arm = dataclasses.replace(
            arm, overrides={**arm.overrides, last: {**arm.overrides.get(last, {}), "max_steps": last_stage_steps}}
        )
    if not arm.skip:
        return arm.overrides
    skipped = [c for c in configs if c.name in arm.skip]
    if any(c.max_steps <= 0 for c in skipped):
        raise ValueError(f"recipe {recipe}: the stages {list(arm.skip)} need max_steps to move their budget")
    first = next(c for c in configs if c.name not in arm.skip)
    if first.max_steps <= 0:
        raise ValueError(f"recipe {recipe}: {first.name} needs max_steps to take the skipped stages' steps")
    steps = first.max_steps + sum(c.max_steps for c in skipped)
    return {**arm.overrides, first.name: {**arm.overrides.get(first.name, {}), "max_steps": steps}}


def run_arm(
    output: Path, arm: Arm, seed: int, backbones: str, last_stage_steps: int | None = None
) -> tuple[DemoResult, float]:
    """The run's result and wall time: measured now, or read back when `output` holds this very run, finished."""
    sizes = DemoSizes(backbones=backbones, caption_style=arm.caption_style, seed=seed)
    overrides = arm_overrides(arm, sizes.recipe, last_stage_steps)
    identity = run_identity(arm, sizes, overrides)
    record = output / RUN_RECORD
    if record.is_file() and (output / "results.json").is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved["identity"] == identity:
            print(f"{output}: finished earlier in {saved['seconds'] / 60:.1f} minutes, kept")
            return DemoResult.from_json(output / "results.json"), saved["seconds"]
    record.unlink(missing_ok=True)  # written again only once this run has finished
    start = time.perf_counter()
    result = run_demo(output, sizes, resume=True, overrides=overrides, skip=arm.skip)
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"identity": identity, "seconds": seconds}, indent=2) + "\n", encoding="utf-8")
    return result, seconds


RUN_RECORD = "run.json"


def run_identity(arm: Arm, sizes: DemoSizes, overrides: dict[str, dict]) -> dict[str, Any]:
    """What makes two runs the same: the arm, the demo's sizes (seed included) and the recipe's stage files with the
    arm's overrides, at the precision each stage trains in here (as the stages' own fingerprints have it)."""
    configs = [StageConfig.from_yaml(path) for path in recipe_stages(sizes.recipe)]
    stages = [as_trained_here(with_overrides(c, overrides)).to_dict() for c in configs if c.name not in arm.skip]
    identity = {"arm": dataclasses.asdict(arm), "sizes": vars(sizes), "stages": stages}
    return json.loads(json.dumps(identity, default=str))  # as it reads back from run.json (tuples become lists)


def mean_sd(values: list[float], signed: bool = False) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):{'+' if signed else ''}.1f} ± {sd:.1f}"


def table(results: dict[str, dict[int, tuple[DemoResult, float]]]) -> str:
    """Mean ± standard deviation over seeds per arm, then every seed's figures."""
    header = "| arm | seeds | " + " | ".join(METRICS) + " | minutes per run |"
    lines = [header, "|---|---|" + "---|" * (len(METRICS) + 1)]
    for key, runs in results.items():
        cells = [mean_sd([read(r) for r, _ in runs.values()]) for read in METRICS.values()]
        minutes = statistics.mean(t for _, t in runs.values()) / 60
        lines.append(f"| {ARMS[key].label} | {len(runs)} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    lines += paired_differences(results)
    lines += ["", "Per seed:", "", "| arm | seed | " + " | ".join(METRICS) + " |"]
    lines.append("|---|---|" + "---|" * len(METRICS))
    for key, runs in results.items():
        for seed, (result, _) in runs.items():
            cells = [f"{read(result):.1f}" for read in METRICS.values()]
            lines.append(f"| {key} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(results: dict[str, dict[int, tuple[DemoResult, float]]]) -> list[str]:
    """Each arm minus the first arm, seed by seed (mean ± standard deviation of the differences): a seed fixes the
    projector's initialisation and the data order in every arm, so pairing removes that part of the spread."""
    (base_key, base), *others = results.items()
    lines = ["", f"Paired by seed, arm minus `{base_key}`:", "", "| arm | seeds | " + " | ".join(METRICS) + " |"]
    lines.append("|---|---|" + "---|" * len(METRICS))
    for key, runs in others:
        seeds = [seed for seed in runs if seed in base]
        if not seeds:
            continue
        differences = [[read(runs[s][0]) - read(base[s][0]) for s in seeds] for read in METRICS.values()]
        cells = [mean_sd(values, signed=True) for values in differences]
        lines.append(f"| {key} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 4 else []


def plot_losses(results: dict[str, dict[int, tuple[DemoResult, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (key, runs) in zip(colours, results.items(), strict=False):
        for index, (result, _) in enumerate(runs.values()):
            steps, losses, offset = [], [], 0
            for stage in result.stages:
                log = read_training_log(stage.folder / "training_log.jsonl")
                steps += [offset + r["step"] for r in log]
                losses += [r["loss"] for r in log]
                offset = steps[-1] if steps else offset
            axis.plot(steps, losses, color=colour, alpha=0.7, label=ARMS[key].label if index == 0 else None)
    axis.set(xlabel="optimizer step, stages in sequence", ylabel="training loss", yscale="log")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_ablations(
    output: Path,
    arms: list[str] | None = None,
    seeds: tuple[int, ...] = SEEDS,
    backbones: str = "packaged",
    last_stage_steps: int | None = None,
) -> str:
    start = time.perf_counter()
    results = {
        key: {
            seed: run_arm(output / key / f"seed-{seed}", ARMS[key], seed, backbones, last_stage_steps) for seed in seeds
        }
        for key in arms or list(ARMS)
    }
    total = sum(seconds for runs in results.values() for _, seconds in runs.values())
    text = table(results) + (
        f"\n\nWhole run: {total / 60:.1f} minutes, the sum of the runs' own times (this invocation: "
        f"{(time.perf_counter() - start) / 60:.1f} minutes; kept runs were finished by an earlier one)."
    )
    (output / "ablations.md").write_text(text + "\n")
    summary = {
        key: {
            seed: {"vqa": r.vqa["model"], "captions": r.captions["scores"], "seconds": t}
            for seed, (r, t) in runs.items()
        }
        for key, runs in results.items()
    }
    (output / "ablations.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_losses(results, output / "ablation_losses.png")
    print(text)
    return text
