"""Tests for valign.eval.caption_metrics, the `coco_caption` evaluate module and valign.eval.vqa_metrics.

Expected numbers are derived by hand from the metric definitions. The caption tests share module-scoped
results because METEOR's Java start-up costs ~15 s; score_captions reuses one METEOR process after that.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import evaluate
import pycocoevalcap.eval as coco_eval_module
import pytest
from pycocoevalcap.eval import COCOEvalCap

from valign.eval import caption_metrics
from valign.eval.caption_metrics import COCO_CAPTION_METRIC, JavaNotFoundError, SpiceUnavailableError, score_captions
from valign.eval.vqa_metrics import (
    accuracy_standard_error,
    exact_match,
    is_closed_question,
    normalize_answer,
    score_vqa,
    token_f1,
)

REFERENCES = {
    "beach": [
        "a man riding a brown horse on the beach",
        "a person rides a horse along the sandy shore",
        "a rider on horseback near the ocean waves",
    ],
    "kitchen": [
        "a woman cutting vegetables in a kitchen",
        "a lady chopping carrots on a wooden board",
        "a person preparing food at the kitchen counter",
        "someone slicing vegetables on a cutting board",
    ],
    "street": [
        "a red bus driving down a city street",
        "a double decker bus on a busy road",
        "a large red bus parked next to a sidewalk",
    ],
}

# Each equals one of its references up to case, punctuation and line breaks, which the PTB tokenizer and
# the whitespace normalisation remove. The "\r" in the first caption would shift every later caption onto
# the wrong image if it reached the line-based Java tokenizer.
PERFECT = {
    "beach": "A man riding a brown horse\ron the beach.",
    "kitchen": "A woman cutting\nvegetables in a kitchen!",
    "street": "a red bus, driving down a city street",
}

# Partly right, wrong, exactly right.
IMPERFECT = {
    "beach": "A man riding a horse on the sand.",
    "kitchen": "Two giraffes standing in a grassy field.",
    "street": "a red bus driving down a city street",
}


class _NoSpice:
    """Stands in for pycocoevalcap's Spice, which downloads CoreNLP in its constructor and fails offline."""

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        return 0.0, [0.0] * len(gts)

    def method(self) -> str:
        return "SPICE"


def _coco_eval_cap_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Scores from pycocoevalcap's own COCOEvalCap pipeline (its own METEOR process), SPICE left out."""
    ids = list(predictions)
    coco = SimpleNamespace(getImgIds=lambda: ids, imgToAnns={i: [{"caption": c} for c in references[i]] for i in ids})
    coco_res = SimpleNamespace(imgToAnns={i: [{"caption": predictions[i]}] for i in ids})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(coco_eval_module, "Spice", _NoSpice)
        evaluator = COCOEvalCap(coco, coco_res)
        evaluator.evaluate()
    return {name: score for name, score in evaluator.eval.items() if name != "SPICE"}


@pytest.fixture(scope="module")
def perfect_scores() -> dict[str, float]:
    return score_captions(PERFECT, REFERENCES)


@pytest.fixture(scope="module")
def imperfect_scores(perfect_scores: dict[str, float]) -> dict[str, float]:
    # Depends on perfect_scores so that these numbers come from a METEOR process that has already served
    # another call: comparing them with COCOEvalCap's fresh process also checks that reuse is stateless.
    return score_captions(IMPERFECT, REFERENCES)


@pytest.fixture(scope="module")
def coco_caption_metric() -> evaluate.EvaluationModule:
    return evaluate.load(str(COCO_CAPTION_METRIC))


# --------------------------------------------------------------------------- captions


def test_score_captions_matches_coco_eval_cap(imperfect_scores: dict[str, float]) -> None:
    expected = _coco_eval_cap_scores(IMPERFECT, REFERENCES)
    assert set(imperfect_scores) == set(expected) == set(caption_metrics.METRIC_NAMES)
    assert imperfect_scores == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # Guard against a degenerate comparison: these inputs give scores strictly between 0 and 1.
    assert all(0 < imperfect_scores[name] < 1 for name in ("Bleu_1", "METEOR", "ROUGE_L"))


def test_evaluate_module_matches_score_captions(
    coco_caption_metric: evaluate.EvaluationModule, imperfect_scores: dict[str, float]
) -> None:
    ids = list(IMPERFECT)
    result = coco_caption_metric.compute(
        predictions=[IMPERFECT[i] for i in ids], references=[REFERENCES[i] for i in ids]
    )
    assert result == pytest.approx(imperfect_scores, rel=1e-12, abs=1e-15)


def test_exact_matches_score_one_after_tokenization(perfect_scores: dict[str, float]) -> None:
    # Each prediction's n-grams all occur in the identical reference, whose length is the closest one, so
    # BLEU's precisions and brevity penalty are 1; ROUGE-L's LCS covers both sentences, so it is 1 too.
    for n in range(1, 5):
        assert perfect_scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert perfect_scores["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)


def test_perfect_predictions_beat_wrong_ones_on_cider(
    perfect_scores: dict[str, float], imperfect_scores: dict[str, float]
) -> None:
    assert perfect_scores["CIDEr"] > imperfect_scores["CIDEr"] + 0.5
    assert perfect_scores["Bleu_4"] > imperfect_scores["Bleu_4"]
    assert perfect_scores["METEOR"] > imperfect_scores["METEOR"]


def test_cider_of_a_single_image_is_zero() -> None:
    # CIDEr's IDF is log(#images / document frequency): with one image every reference n-gram gets log(1/1) = 0.
    scores = score_captions({"x": "a man riding a horse"}, {"x": ["a man riding a horse", "a horse on a beach"]})
    assert scores["CIDEr"] == 0.0
    assert scores["Bleu_1"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({"a": "x"}, {"b": ["x"]}, "same image ids"),
        ({"a": "x", "b": "y"}, {"a": ["x"]}, "same image ids"),
        ({"a": "x"}, {"a": []}, "empty reference list"),
        ({"a": "x"}, {"a": "x"}, "list of str"),
        ({"a": None}, {"a": ["x"]}, "must be a str"),
        ({}, {}, "No predictions"),
    ],
)
def test_invalid_caption_inputs_raise_value_error(predictions: dict, references: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_captions(predictions, references)


def test_missing_java_raises_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java anywhere on PATH
    with pytest.raises(JavaNotFoundError, match="apt-get install default-jre-headless"):
        score_captions({"a": "a dog"}, {"a": ["a dog on a sofa"]})


def test_spice_without_corenlp_raises_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(caption_metrics, "_SPICE_LIB_DIR", str(tmp_path))
    with pytest.raises(SpiceUnavailableError, match="offline"):
        score_captions({"a": "a dog"}, {"a": ["a dog on a sofa"]}, spice=True)


# --------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat.", "cat"),
        ("  A   red\tsquare! ", "red square"),
        ("an apple", "apple"),
        ("Theatre", "theatre"),  # articles are removed only as whole words
        ("x-ray", "xray"),  # SQuAD deletes punctuation rather than splitting on it
        ("Yes,", "yes"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_uses_normalisation() -> None:
    assert exact_match("The Cat.", "cat")
    assert not exact_match("cats", "cat")


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("red circle", "a red square", 0.5),  # 1 common token: precision 1/2, recall 1/2
        ("red red circle", "red circle", 0.8),  # 2 common: precision 2/3, recall 1 -> (4/3) / (5/3)
        ("The Circle.", "circle", 1.0),
        ("blue", "red", 0.0),
        ("the", "an", 1.0),  # both normalise to nothing
        ("the", "red", 0.0),
    ],
)
def test_token_f1(prediction: str, answer: str, expected: float) -> None:
    assert token_f1(prediction, answer) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("answer", "closed"),
    [("Yes", True), ("no.", True), ("yes, it is", False), ("left lung", False), ("nodes", False)],
)
def test_is_closed_question(answer: str, closed: bool) -> None:
    assert is_closed_question(answer) is closed


def test_score_vqa_splits_closed_and_open() -> None:
    answers = ["yes", "no", "Yes", "red circle", "square", "blue"]
    predictions = ["Yes.", "yes", "yes", "a red square", "Square", "green"]
    types = ["presence", "presence", "presence", "shape", "shape", "color"]
    result = score_vqa(predictions, answers, types)
    # exact matches: [1, 0, 1 | 0, 1, 0]; closed = first three; open F1: 0.5, 1, 0.
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["n"] == 6
    assert result["closed_accuracy"] == pytest.approx(2 / 3)
    assert result["n_closed"] == 3
    assert result["open_exact_match"] == pytest.approx(1 / 3)
    assert result["open_f1"] == pytest.approx(1.5 / 3)
    assert result["n_open"] == 3
    assert result["per_type"] == {
        "color": {"accuracy": 0.0, "n": 1},
        "presence": {"accuracy": pytest.approx(2 / 3), "n": 3},
        "shape": {"accuracy": 0.5, "n": 2},
    }


def test_score_vqa_empty_subset_is_none() -> None:
    result = score_vqa(["yes", "no"], ["yes", "yes"])
    assert result["closed_accuracy"] == 0.5
    assert (result["open_exact_match"], result["open_f1"], result["n_open"]) == (None, None, 0)
    assert "per_type" not in result


@pytest.mark.parametrize(
    ("predictions", "answers", "types"),
    [(["yes"], ["yes", "no"], None), (["yes"], ["yes"], ["a", "b"]), ([], [], None)],
)
def test_score_vqa_rejects_bad_lengths(predictions: list[str], answers: list[str], types: list[str] | None) -> None:
    with pytest.raises(ValueError):
        score_vqa(predictions, answers, types)


@pytest.mark.parametrize(
    ("accuracy", "n", "expected"),
    [(0.5, 100, 0.05), (0.9, 400, 0.015), (1.0, 10, 0.0)],  # sqrt(0.25/100); sqrt(0.09/400) = 0.3/20
)
def test_accuracy_standard_error(accuracy: float, n: int, expected: float) -> None:
    assert accuracy_standard_error(accuracy, n) == pytest.approx(expected)


@pytest.mark.parametrize(("accuracy", "n"), [(0.5, 0), (1.5, 10), (math.nan, 10)])
def test_accuracy_standard_error_rejects_bad_input(accuracy: float, n: int) -> None:
    with pytest.raises(ValueError):
        accuracy_standard_error(accuracy, n)
