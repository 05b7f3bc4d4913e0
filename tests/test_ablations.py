"""The ablation arms compare like with like (every arm trains the same number of optimizer steps), and a run
interrupted after some arms continues where it stopped."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from valign.train import ablations, demo
from valign.train.ablations import ARMS, Arm, arm_overrides
from valign.train.config import StageConfig
from valign.train.demo import DemoResult, DemoSizes
from valign.train.run import StageResult, recipe_stages, with_overrides


def steps_trained(recipe: str, arm: Arm, last_stage_steps: int | None = None) -> dict[str, int]:
    configs = [StageConfig.from_yaml(path) for path in recipe_stages(recipe)]
    overrides = arm_overrides(arm, recipe, last_stage_steps)
    return {c.name: with_overrides(c, overrides).max_steps for c in configs if c.name not in arm.skip}


@pytest.mark.parametrize(("recipe", "last_stage_steps"), [("demo", None), ("tiny", None), ("demo", 112)])
def test_every_arm_trains_the_same_number_of_steps(recipe, last_stage_steps):
    trained = {key: steps_trained(recipe, arm, last_stage_steps) for key, arm in ARMS.items()}
    totals = {key: sum(steps.values()) for key, steps in trained.items()}
    assert len(set(totals.values())) == 1, totals
    paper, without = trained["paper"], trained["no-alignment"]
    assert without["stage-2"] == paper["stage-0"] + paper["stage-1"] + paper["stage-2"]
    assert without["stage-3"] == paper["stage-3"]
    recipes_own = StageConfig.from_yaml(recipe_stages(recipe)[-1]).max_steps
    assert {steps["stage-3"] for steps in trained.values()} == {last_stage_steps or recipes_own}


def test_the_last_stage_budget_keeps_an_arms_own_overrides_and_is_refused_for_an_arm_that_skips_it():
    overrides = arm_overrides(ARMS["causal"], "demo", last_stage_steps=50)
    assert overrides["stage-3"] == {"attn_mode": "causal", "max_steps": 50}
    assert ARMS["causal"].overrides["stage-3"] == {"attn_mode": "causal"}  # the arm itself is left as it was
    with pytest.raises(ValueError, match="skips stage-3"):
        arm_overrides(Arm("x", skip=("stage-3",)), "demo", last_stage_steps=50)


def test_an_arm_keeps_its_own_overrides_of_the_stage_that_takes_the_steps():
    arm = Arm("causal without stage 0", overrides={"stage-1": {"attn_mode": "causal"}}, skip=("stage-0",))
    configs = {c.name: c for c in (StageConfig.from_yaml(path) for path in recipe_stages("demo"))}
    overrides = arm_overrides(arm, "demo")
    assert overrides["stage-1"] == {
        "attn_mode": "causal",
        "max_steps": configs["stage-0"].max_steps + configs["stage-1"].max_steps,
    }


def test_skipping_a_stage_without_max_steps_is_refused(tmp_path):
    for index, steps in enumerate((-1, 10)):
        (tmp_path / f"stage{index}.yaml").write_text(
            f"name: stage-{index}\nattn_mode: hybrid\nlearning_rates: {{multi_modal_projector: 1.0e-3}}\n"
            f"data: [{{source: x.parquet}}]\nmax_steps: {steps}\n"
        )
    with pytest.raises(ValueError, match="need max_steps"):
        arm_overrides(Arm("x", skip=("stage-0",)), str(tmp_path))


def test_a_finished_run_is_kept_and_any_other_run_is_trained(tmp_path, monkeypatch):
    """`run.json` marks a finished run: the same arm, seed and recipe is read back with its own time; another seed,
    or a run that stopped before its record was written, trains."""
    trained = []

    def fake_run_demo(output, sizes, resume, overrides, skip):  # what run_demo writes, without the training
        trained.append(sizes.seed)
        stage = StageResult("stage-3", output / "stages" / "stage-3", 2.0, 1.0 + sizes.seed, "0 skipped", 5.0)
        result = DemoResult([stage], {"scores": {"CIDEr": 0.3}}, {"model": {"accuracy": 0.6 + sizes.seed / 100}}, sizes)
        output.mkdir(parents=True, exist_ok=True)
        saved = {"stages": [vars(stage) | {"folder": str(stage.folder)}], "captions": result.captions}
        (output / "results.json").write_text(json.dumps({**saved, "vqa": result.vqa, "sizes": vars(sizes)}))
        return result

    monkeypatch.setattr(ablations, "run_demo", fake_run_demo)
    arm = ARMS["causal"]
    first, seconds = ablations.run_arm(tmp_path, arm, 0, "tiny")
    kept, kept_seconds = ablations.run_arm(tmp_path, arm, 0, "tiny")
    assert trained == [0] and kept == first and kept_seconds == seconds  # read back, with the first run's time
    other, _ = ablations.run_arm(tmp_path, arm, 1, "tiny")
    assert trained == [0, 1] and other.vqa["model"]["accuracy"] == 0.61
    (tmp_path / ablations.RUN_RECORD).unlink()  # as after a kill between the results and the record
    ablations.run_arm(tmp_path, arm, 1, "tiny")
    assert trained == [0, 1, 1]
    ablations.run_arm(tmp_path, arm, 1, "tiny", last_stage_steps=50)  # another budget: another run
    ablations.run_arm(tmp_path, arm, 1, "tiny", last_stage_steps=50)
    assert trained == [0, 1, 1, 1]


def test_a_run_trained_in_another_precision_is_not_kept(tmp_path, monkeypatch):
    """`precision: auto` is bf16 on a CPU with native bf16 and fp32 elsewhere: a run finished on one is trained again
    on the other; the demo recipe's own fp32 is the same run on both."""
    trained = []

    def fake_run_demo(output, sizes, resume, overrides, skip):
        trained.append(output.name)
        result = DemoResult([], {"scores": {"CIDEr": 0.3}}, {"model": {"accuracy": 0.6}}, sizes)
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.json").write_text(json.dumps(vars(result) | {"sizes": vars(sizes)}))
        return result

    stages = [StageConfig.from_yaml(path).name for path in recipe_stages("demo")]
    arms = {"pinned": ARMS["paper"], "auto": Arm("auto", overrides={s: {"precision": "auto"} for s in stages})}
    monkeypatch.setattr(ablations, "run_demo", fake_run_demo)
    for native in (False, True):
        monkeypatch.setattr("valign.train.run.native_bf16", lambda device="cpu", native=native: native)
        for name, arm in arms.items():
            ablations.run_arm(tmp_path / name, arm, 0, "packaged")
    assert trained == ["pinned", "auto", "auto"]


def test_the_seed_alone_decides_the_starting_projector(tmp_path, monkeypatch):
    """A first run converts the packaged backbones (drawing random numbers) and later runs read them from the cache;
    both must start from the same projector, and another seed from another one."""
    make_backbones = demo.tiny_backbones

    def drawing_backbones(folder, sizes):  # as a first conversion: random numbers drawn on the way
        paths = make_backbones(folder, sizes)
        torch.rand(5)
        return paths

    def projector(folder, seed: int) -> dict[str, torch.Tensor]:
        init = demo.build_demo_init(folder, DemoSizes(backbones="tiny", seed=seed, captions=50, vqa_train=50))
        weights = load_file(init / "model.safetensors").items()
        return {k: v for k, v in weights if k.startswith("model.multi_modal_projector") and k.endswith("weight")}

    first = projector(tmp_path / "a", seed=1)
    monkeypatch.setattr(demo, "tiny_backbones", drawing_backbones)
    again, other = projector(tmp_path / "b", seed=1), projector(tmp_path / "c", seed=2)
    assert first.keys() == again.keys() and len(first) == 2  # its two linear layers (biases start at 0)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def fake_result(vqa: float, cider: float) -> DemoResult:
    scores = {"accuracy": vqa, "per_type": {t: {"accuracy": vqa} for t in ("colour", "shape", "yes/no")}}
    return DemoResult([], {"scores": {"CIDEr": cider}}, {"model": scores, "mismatched_images": scores})


def test_the_table_pairs_each_arm_with_the_first_by_seed():
    """Differences are taken seed by seed (a seed fixes initialisation and data order in every arm), over the
    seeds both arms ran."""
    results = {
        "paper": {0: (fake_result(0.70, 0.50), 60.0), 1: (fake_result(0.80, 0.30), 60.0)},
        "causal": {0: (fake_result(0.72, 0.55), 60.0), 1: (fake_result(0.83, 0.36), 60.0), 2: (fake_result(0, 0), 1)},
    }
    text = ablations.table(results)
    paired = text.split("Paired by seed, arm minus `paper`:")[1].split("Per seed:")[0]
    row = next(line for line in paired.splitlines() if line.startswith("| causal"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # VQA: +2 and +3 points; CIDEr: +5 and +6
    assert cells[:3] == ["causal", "2", "+2.5 ± 0.7"] and cells[-1] == "+5.5 ± 0.7"
    assert "| hybrid mask" in text.split("Paired")[0]  # the unpaired means stay first
