"""The ablation arms compare like with like: every arm trains the same number of optimizer steps."""

from __future__ import annotations

import pytest

from valign.train.ablations import ARMS, Arm, arm_overrides
from valign.train.config import StageConfig
from valign.train.run import recipe_stages, with_overrides


def steps_trained(recipe: str, arm: Arm) -> dict[str, int]:
    configs = [StageConfig.from_yaml(path) for path in recipe_stages(recipe)]
    overrides = arm_overrides(arm, recipe)
    return {c.name: with_overrides(c, overrides).max_steps for c in configs if c.name not in arm.skip}


@pytest.mark.parametrize("recipe", ["demo", "tiny"])
def test_every_arm_trains_the_same_number_of_steps(recipe):
    totals = {key: sum(steps_trained(recipe, arm).values()) for key, arm in ARMS.items()}
    assert len(set(totals.values())) == 1, totals
    paper, without = steps_trained(recipe, ARMS["paper"]), steps_trained(recipe, ARMS["no-alignment"])
    assert without["stage-2"] == paper["stage-0"] + paper["stage-1"] + paper["stage-2"]
    assert without["stage-3"] == paper["stage-3"]


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
