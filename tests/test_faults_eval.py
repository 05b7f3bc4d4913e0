"""Fault injection for evaluation (issue 13, item 5): each bad input either gets a clear error before anything is
generated, or is skipped and counted in the results; a baseline never sees the answers it is scored on, every
item is scored, and nothing generated is lost to a scoring failure."""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
import sys
from collections import Counter

import datasets
import pytest
from PIL import Image

import valign.eval.__main__ as eval_main
import valign.eval.caption_metrics as caption_metrics
import valign.eval.captions as captions_module
import valign.eval.vqa as vqa_module
from valign.data.sources import MissingSplitError, load_rows, local_splits
from valign.data.synthetic import load_easy_vqa, make_caption_eval_set, write_parquet
from valign.eval.caption_metrics import JavaNotFoundError, score_captions
from valign.eval.captions import CaptionItems, evaluate_captions
from valign.eval.vqa import LEAVE_ONE_OUT, evaluate_vqa, leave_one_out_prior, vqa_item
from valign.eval.vqa_metrics import normalize_answer

VQA_ARGS = ["--max-new-tokens", "1", "--batch-size", "16"]


def naive_leave_one_out(questions: list[str], answers: list[str]) -> list[str]:
    """For each item, the most frequent answer among the *other* items with the same normalised question (else
    among all other items); ties to the answer seen first. Quadratic, written independently of valign's."""
    predictions = []
    for i in range(len(questions)):
        others = [j for j in range(len(questions)) if j != i]
        same = [j for j in others if normalize_answer(questions[j]) == normalize_answer(questions[i])]
        counts = Counter(answers[j] for j in (same or others))
        predictions.append(counts.most_common(1)[0][0])  # Counter keeps first-seen order among equal counts
    return predictions


def accuracy(predictions: list[str], answers: list[str]) -> float:
    return sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)) / len(answers)


def forbid(monkeypatch: pytest.MonkeyPatch, module, name: str) -> None:
    """Make `module.name` fail the test if called: the fault must be caught before that step."""

    def called(*args, **kwargs):
        raise AssertionError(f"{name} ran although the input was refused")

    monkeypatch.setattr(module, name, called)


def vqa_rows(n: int, edits: dict[int, dict] | None = None, split: str = "test") -> datasets.Dataset:
    rows = load_easy_vqa(split, n)
    if not edits:
        return rows
    records = rows.to_list()
    for index, change in edits.items():
        records[index] |= change
    return datasets.Dataset.from_list(records, features=rows.features)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- splits and the answer prior


@pytest.mark.parametrize("layout", ["one file", "folder, --split train"])
def test_answer_prior_of_a_source_without_other_training_rows_is_leave_one_out(checkpoint, tmp_path, layout):
    test = vqa_rows(16)
    if layout == "one file":
        dataset, extra = write_parquet(test, tmp_path / "mine.parquet"), []
    else:  # the evaluated split *is* train: the prior must not come from it either
        write_parquet(test, tmp_path / "data" / "train.parquet")
        write_parquet(vqa_rows(4, split="train"), tmp_path / "data" / "test.parquet")
        dataset, extra = tmp_path, ["--split", "train"]
    output = tmp_path / "vqa.json"
    eval_main.main(["vqa", "--model", str(checkpoint), "--dataset", str(dataset), "--output", str(output),
                    *VQA_ARGS, *extra])  # fmt: skip
    results = json.loads(output.read_text())
    expected = accuracy(naive_leave_one_out(test["question"], test["answer"]), test["answer"])
    assert expected < 1.0  # built from the evaluated answers themselves, the prior scored 100 %
    assert results["answer_prior"]["accuracy"] == pytest.approx(expected)
    assert results["answer_prior"]["built_from"] == LEAVE_ONE_OUT and results["split"] == "train"
    assert "| answer prior (blind, leave-one-out) |" in output.with_suffix(".md").read_text()


def test_leave_one_out_prior_equals_a_brute_force_one_and_never_uses_the_own_answer():
    rng = random.Random(0)
    questions = [rng.choice(["What colour?", "what colour", "Shape?", "Is it red?"]) for _ in range(300)]
    answers = [rng.choice(["red", "blue", "circle", "yes", "no"]) for _ in range(300)]
    assert leave_one_out_prior(questions, answers) == naive_leave_one_out(questions, answers)
    # Every answer unique: only the item's own answer could ever be right, so the prior scores 0.
    assert accuracy(leave_one_out_prior(["q"] * 5, list("abcde")), list("abcde")) == 0


@pytest.mark.parametrize(
    ("name", "split", "holds"),
    [
        ("c.parquet", "test", ["train"]),  # a file whose name names no split holds train, as on the Hub
        ("pathvqa_test.parquet", "train", ["test"]),
        ("saved", "validation", ["train"]),
        ("easy-vqa", "validation", ["train", "test"]),
    ],
)
def test_load_rows_refuses_a_split_a_local_source_does_not_hold(tmp_path, name, split, holds):
    rows = vqa_rows(2)
    if name == "saved":
        rows.save_to_disk(str(tmp_path / name))
    elif name != "easy-vqa":
        write_parquet(rows, tmp_path / name)
    source = name if name == "easy-vqa" else tmp_path / name
    with pytest.raises(
        MissingSplitError, match=re.escape(f"no split {split!r} in {source}; found splits {sorted(holds)}")
    ):
        load_rows(source, split)
    assert local_splits(source) == holds
    assert len(load_rows(source, holds[0], limit=2)) == 2  # the split it does hold still loads


def test_prior_source_naming_the_evaluated_rows_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    path = write_parquet(vqa_rows(4), tmp_path / "test.parquet")
    forbid(monkeypatch, eval_main, "load_checkpoint")
    with pytest.raises(ValueError, match="is the evaluated split itself"):
        eval_main.main(["vqa", "--model", "unused", "--dataset", str(path), "--prior-source", str(tmp_path / ".." /
                        tmp_path.name / "test.parquet"), "--output", str(tmp_path / "v.json")])  # fmt: skip
    assert not (tmp_path / "v.json").exists()


def test_prior_source_file_builds_the_prior_from_its_rows(checkpoint, tmp_path):
    test, train = vqa_rows(12), vqa_rows(40, split="train")
    write_parquet(test, tmp_path / "test.parquet")
    write_parquet(train, tmp_path / "prior.parquet")
    output = tmp_path / "vqa.json"
    eval_main.main(["vqa", "--model", str(checkpoint), "--dataset", str(tmp_path / "test.parquet"), "--prior-source",
                    str(tmp_path / "prior.parquet"), "--output", str(output), *VQA_ARGS])  # fmt: skip
    results = json.loads(output.read_text())
    by_question: dict[str, Counter] = {}
    for q, a in zip(train["question"], train["answer"]):
        by_question.setdefault(normalize_answer(q), Counter())[a] += 1
    overall = Counter(train["answer"]).most_common(1)[0][0]
    prior = [by_question.get(normalize_answer(q), Counter({overall: 1})).most_common(1)[0][0] for q in test["question"]]
    assert results["split"] == "test"
    assert results["answer_prior"]["accuracy"] == pytest.approx(accuracy(prior, test["answer"]))
    assert results["answer_prior"]["source"] == f"{tmp_path / 'prior.parquet'} split train, 40 questions"


# --------------------------------------------------------------------------- rows without text or image


def test_vqa_rows_without_question_answer_or_image_are_skipped_and_counted(checkpoint, tmp_path):
    bad = {1: {"answer": None}, 3: {"question": None}, 5: {"image": None}, 6: {"answer": "  "}}
    write_parquet(vqa_rows(10, bad), tmp_path / "data" / "test.parquet")
    write_parquet(vqa_rows(8, {0: {"answer": None}}, split="train"), tmp_path / "data" / "train.parquet")
    output = tmp_path / "vqa.json"
    eval_main.main(["vqa", "--model", str(checkpoint), "--dataset", str(tmp_path), "--output", str(output), *VQA_ARGS])
    results = json.loads(output.read_text())
    assert results["skipped"]["counts"] == {"missing_text": 3, "missing_image": 1}
    assert [row["row"] for row in results["skipped"]["rows"]] == [1, 3, 5, 6]
    assert results["model"]["n"] == results["answer_prior"]["n"] == len(results["predictions"]) == 6
    assert results["answer_prior"]["skipped"]["counts"] == {"missing_text": 1}
    assert results["answer_prior"]["source"].endswith("split train, 7 questions")


def test_a_numeric_answer_is_read_as_text():
    image, question, answer, kind = vqa_item({"image": png(), "question": "How many?", "answer": 3}, 0)
    assert (question, answer, kind, image.size) == ("How many?", "3", "open", (8, 8))


@pytest.mark.parametrize(
    ("questions", "answers", "train", "message"),
    [
        (["a?", "b?"], ["yes", None], None, r"evaluated item 1 has no answer \(None; 1 such items\)"),
        ([None, "b?"], ["yes", "no"], None, "evaluated item 0 has no question"),
        (["a?"], ["yes"], None, "at least two test items"),
        (["a?", "b?"], ["yes", "no"], (["a?"], [None]), "training item 0 has no answer"),
        (["a?", "b?"], ["yes", "no"], ([], []), "no training questions"),
    ],
)
def test_evaluate_vqa_refuses_bad_items_before_generating(monkeypatch, questions, answers, train, message):
    forbid(monkeypatch, vqa_module, "generate_answers")
    images = [Image.new("RGB", (8, 8))] * len(questions)
    with pytest.raises(ValueError, match=message):
        evaluate_vqa(None, None, images, questions, answers, None, *(train or (None, None)))


# --------------------------------------------------------------------------- captions


def caption_file(tmp_path, image_ids: list[int | None]) -> tuple[datasets.Dataset, str]:
    rows = make_caption_eval_set(len(image_ids), image_size=32)
    rows = rows.remove_columns("image_id").add_column("image_id", image_ids)
    return rows, str(write_parquet(rows, tmp_path / "c.parquet"))


def test_repeated_and_missing_image_ids_score_every_image(checkpoint, monkeypatch, tmp_path):
    rows, path = caption_file(tmp_path, [5, 5, None, 9])
    scored: list[int] = []

    def counting_scorer(predictions, references):
        scored.append(len(predictions))
        return score_captions(predictions, references)

    monkeypatch.setattr(caption_metrics, "score_captions", counting_scorer)
    output = tmp_path / "captions.json"
    eval_main.main(["captions", "--model", str(checkpoint), "--dataset", path, "--max-new-tokens", "6",
                    "--output", str(output)])  # fmt: skip
    results = json.loads(output.read_text())
    assert scored == [4]  # keyed by id, the four images were scored as three
    assert [c["image_id"] for c in results["captions"]] == ["5", "5", "2", "9"]  # a missing id: the row's index
    captions = {str(i): c["caption"] for i, c in enumerate(results["captions"])}
    assert results["scores"] == score_captions(captions, {str(i): r for i, r in enumerate(rows["captions"])})
    assert output.with_suffix(".md").read_text().startswith("| metric |")  # the table beside, not over, the JSON


def test_rows_without_a_reference_are_skipped_and_counted():
    rows = make_caption_eval_set(4, image_size=16)
    references = [["a red circle"], [], ["", "  "], ["a blue square"]]
    rows = rows.remove_columns("captions").add_column("captions", references)
    items = CaptionItems.from_rows(rows)
    assert items.references == [["a red circle"], ["a blue square"]] and items.ids == ["0", "3"]
    assert items.skipped["counts"] == {"missing_text": 2} and [r["row"] for r in items.skipped["rows"]] == [1, 2]


@pytest.mark.parametrize(
    ("references", "message"),
    [([["a dog"], []], "Image 1 has an empty reference list"), ([["a dog"], [" "]], "blank reference")],
)
def test_evaluate_captions_refuses_an_unscorable_reference_before_generating(monkeypatch, references, message):
    forbid(monkeypatch, captions_module, "generate_answers")
    with pytest.raises(ValueError, match=message):
        evaluate_captions(None, None, [Image.new("RGB", (8, 8))] * 2, references, ["a", "b"], "Describe.")


def test_missing_java_is_reported_before_the_model_loads(monkeypatch, tmp_path):
    _, path = caption_file(tmp_path, [1, 2])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no java anywhere on PATH
    forbid(monkeypatch, eval_main, "load_checkpoint")
    with pytest.raises(JavaNotFoundError, match="no `java` executable is on PATH"):
        eval_main.main(["captions", "--model", "unused", "--dataset", path, "--output", str(tmp_path / "c.json")])
    forbid(monkeypatch, captions_module, "generate_answers")
    with pytest.raises(JavaNotFoundError):
        evaluate_captions(None, None, [Image.new("RGB", (8, 8))], [["a dog"]], ["a"], "Describe.")


WITHOUT_PYCOCOEVALCAP = """
import sys


class Absent:  # pycocoevalcap not installed: the train extra without the eval extra
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "pycocoevalcap":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, Absent())
from PIL import Image

from valign.eval.captions import evaluate_captions
from valign.train.__main__ import main  # what `python -m valign.train` imports

try:
    evaluate_captions(None, None, [Image.new("RGB", (8, 8))], [["a dog"]], ["a"], "Describe.")
except ModuleNotFoundError as error:
    print(error)
"""


def test_training_imports_without_the_eval_extra_and_scoring_names_it():
    run = subprocess.run([sys.executable, "-c", WITHOUT_PYCOCOEVALCAP], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "scoring captions needs pycocoevalcap: pip install 'valign[eval]'\n"


def test_a_scoring_failure_keeps_the_generated_captions(checkpoint, monkeypatch, tmp_path):
    _, path = caption_file(tmp_path, [1, 2, 3])

    def failing_scorer(predictions, references):
        raise RuntimeError("METEOR died")

    monkeypatch.setattr(caption_metrics, "score_captions", failing_scorer)
    output = tmp_path / "captions.json"
    with pytest.raises(RuntimeError, match="METEOR died"):
        eval_main.main(["captions", "--model", str(checkpoint), "--dataset", path, "--max-new-tokens", "6",
                        "--output", str(output)])  # fmt: skip
    saved = json.loads(output.read_text())
    assert saved["scores"] is None and [c["image_id"] for c in saved["captions"]] == ["1", "2", "3"]
    assert all(c["caption"] for c in saved["captions"]) and saved["checkpoint"] == str(checkpoint)


# --------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("name", ["x.md", "x.MD", "x"])
def test_an_output_that_is_not_a_json_file_is_refused_before_anything_runs(monkeypatch, capsys, tmp_path, name):
    forbid(monkeypatch, eval_main, "load_rows")
    with pytest.raises(SystemExit) as exit_info:
        eval_main.main(["captions", "--model", "m", "--output", str(tmp_path / name)])
    assert exit_info.value.code == 2 and "name a .json file" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
