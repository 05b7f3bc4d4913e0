"""The accuracy-against-training-time curve: its snapshots are the run's states, and targets are judged per type."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from valign.train.__main__ import main
from valign.train.curve import TARGETS, met_targets, run_curve, table
from valign.train.demo import DemoSizes


def scores(overall: float, **per_type: float) -> dict:
    types = {t: per_type.get(t.replace("/", "_"), 1.0) for t in TARGETS if t != "overall"}
    return {"accuracy": overall, "accuracy_stderr": 0.01, "per_type": {t: {"accuracy": a} for t, a in types.items()}}


@pytest.mark.parametrize(
    ("vqa", "met"),
    [
        (scores(0.95), True),
        (scores(0.90, shape=0.90, colour=0.80, yes_no=0.90), True),  # the targets are inclusive
        (scores(0.89), False),
        (scores(0.95, colour=0.79), False),
        (scores(0.95, shape=0.5), False),
        (scores(0.95, yes_no=0.89), False),
    ],
)
def test_targets_are_met_only_when_overall_and_every_type_reach_theirs(vqa, met):
    assert met_targets(vqa) is met


def test_the_table_names_the_first_budget_that_meets_every_target():
    point = lambda steps, minutes, vqa: {  # noqa: E731
        "steps": steps,
        "samples": 8 * steps,
        "minutes": minutes,
        "vqa": {"model": vqa, "mismatched_images": scores(0.6)},
    }
    points = [point(10, 1.0, scores(0.7)), point(20, 2.5, scores(0.93)), point(40, 5.0, scores(0.97))]
    assert "First budget meeting them all: 2.5 training minutes (20 steps)." in table(points, scores(0.64))
    assert "No budget measured here meets them all." in table(points[:1], scores(0.64))


def test_the_curve_snapshots_are_the_runs_states_and_count_its_samples(tmp_path):
    sizes = DemoSizes(backbones="tiny", captions=48, vqa_train=96, caption_eval=4, vqa_test=12)
    run_curve(tmp_path, (1, 3), sizes, overrides={"*": {"max_steps": 1, "batch_size": 4, "logging_steps": 1}})
    final = load_file(tmp_path / "stages" / "stage-3" / "model.safetensors")
    last, first = (load_file(tmp_path / "snapshots" / f"step-{n}" / "model.safetensors") for n in (3, 1))
    assert final.keys() == last.keys()
    assert all(final[k].equal(last[k]) for k in final)  # the last snapshot is what the stage saved
    assert any(not first[k].equal(last[k]) for k in final if "multi_modal_projector" in k)
    points = json.loads((tmp_path / "curve.json").read_text())
    assert [p["steps"] for p in points] == [1, 3]
    assert [p["samples"] for p in points] == [3 * 4 + 1 * 4, 3 * 4 + 3 * 4]  # three earlier stages of one step
    assert 0 < points[0]["minutes"] < points[1]["minutes"]
    assert all(p["vqa"]["model"]["n"] == 12 for p in points)


@pytest.mark.parametrize("steps", ["0", "-3", "ten"])
def test_the_curve_command_refuses_budgets_that_are_not_step_counts(steps, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["curve", "--steps", "28", steps])
    assert exit_info.value.code == 2
    assert f"{steps}: a number of optimizer steps, 1 or more" in capsys.readouterr().err
