"""VQA evaluation with image-blind baselines.

Two baselines show whether the model uses the image (see shared notes: zeroed image tokens are not a fair one,
they push the language model off its task):
- the answer prior: for each question, the most frequent training answer to that same question text; without
  training rows, the same built leave-one-out from the other evaluated items (never from the item's own answer:
  built from the evaluated answers themselves it scored 100 %);
- mismatched images: the same model, each question paired with another question's image (a fixed shuffle).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets

from ..data.adapters import as_text
from ..data.images import decode_image
from ..data.prompts import vqa_prompt
from ..data.skips import SkipRow
from ..data.sources import Rows
from .generate import DecodingSettings, generate_answers
from .rows import read_items, text_cell
from .vqa_metrics import accuracy_standard_error, is_closed_question, normalize_answer, score_vqa

# The rows of a VQA report: label -> key of `evaluate_vqa`'s results.
VQA_ARMS = {"valign": "model", "answer prior (blind)": "answer_prior", "mismatched images (blind)": "mismatched_images"}
LEAVE_ONE_OUT = "leave-one-out over the evaluated items (no separate training rows)"


@dataclass
class VqaItems:
    """The test items of a VQA evaluation, images decoded, and the rows skipped on the way."""

    images: list[Any]
    questions: list[str]
    answers: list[str]
    types: list[str]
    skipped: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Rows) -> VqaItems:
        """Items of PathVQA-schema rows; question types from a `question_type` column, else closed (yes/no
        answers) or open. A row without a question, an answer or a readable image is skipped and counted."""
        read = read_items(rows.cast_column("image", datasets.Image(decode=False)), vqa_item)
        images, questions, answers, types = [list(column) for column in zip(*read.items)] or [[], [], [], []]
        return cls(images, questions, answers, types, read.report())


def vqa_item(row: Mapping[str, Any], index: int) -> tuple[Any, str, str, str]:
    """(image, question, answer, question type) of a row, or :class:`SkipRow`."""
    question, answer = text_cell(row, "question"), text_cell(row, "answer")
    image = decode_image(row.get("image"))
    if image is None:
        raise SkipRow("missing_image", "no image")
    question_type = as_text(row.get("question_type")) or ("closed" if is_closed_question(answer) else "open")
    return image, question, answer, question_type


def answer_prior(train_questions: Sequence[str], train_answers: Sequence[str]) -> dict[str, str]:
    """Most frequent training answer per normalised question; ties go to the answer seen first."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for question, answer in zip(train_questions, train_answers, strict=True):
        counts[normalize_answer(question)][answer] += 1
    return {question: answers.most_common(1)[0][0] for question, answers in counts.items()}


class _Ranking:
    """A group's most frequent answers (ties: first seen), to ask for the winner once one item's own answer is
    left out, in constant time (only the top two can win then)."""

    def __init__(self, answers: Iterable[str]) -> None:
        counts = Counter(answers)
        self.first_seen = {answer: rank for rank, answer in enumerate(counts)}
        self.top = counts.most_common(2)

    def without(self, own: str) -> str | None:
        left = [(answer, count - (answer == own)) for answer, count in self.top]
        answer, count = max(left, key=lambda pair: (pair[1], -self.first_seen[pair[0]]))
        return answer if count else None


def leave_one_out_prior(questions: Sequence[str], answers: Sequence[str]) -> list[str]:
    """The answer prior for each item built from all the *other* items (the most frequent answer to the same
    normalised question among them, else their most frequent answer; empty for a lone item), so an item's own
    answer never votes."""
    keys = [normalize_answer(q) for q in questions]
    groups: dict[str, list[str]] = defaultdict(list)
    for key, answer in zip(keys, answers, strict=True):
        groups[key].append(answer)
    by_question = {key: _Ranking(group) for key, group in groups.items()}
    overall = _Ranking(answers)
    return [by_question[k].without(a) or overall.without(a) or "" for k, a in zip(keys, answers, strict=True)]


def prior_predictions(prior: dict[str, str], questions: Sequence[str], fallback: str) -> list[str]:
    return [prior.get(normalize_answer(q), fallback) for q in questions]


def derangement(n: int, seed: int = 0) -> list[int]:
    """A fixed permutation with no fixed point, so every question meets another question's image."""
    if n < 2:
        raise ValueError("mismatched images need at least two test items")
    order = list(range(n))
    rng = random.Random(seed)
    while any(i == j for i, j in enumerate(order)):
        rng.shuffle(order)
    return order


def check_vqa_items(
    images: Sequence[Any] | None, questions: Sequence[str], answers: Sequence[str], kind: str = "evaluated"
) -> None:
    """Raise before anything is generated: equal lengths, and text in every question and answer (None crashed
    the scoring after all answers were generated)."""
    if images is not None and len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} {kind} questions but {len(answers)} answers")
    for column, values in (("question", questions), ("answer", answers)):
        bad = [i for i, value in enumerate(values) if not isinstance(value, str) or not value.strip()]
        if bad:
            raise ValueError(f"{kind} item {bad[0]} has no {column} ({values[bad[0]]!r}; {len(bad)} such items)")


def with_uncertainty(scores: dict[str, Any]) -> dict[str, Any]:
    scores["accuracy_stderr"] = accuracy_standard_error(scores["accuracy"], scores["n"])
    return scores


def evaluate_vqa(
    model,
    processor,
    images: Sequence[Any],
    questions: Sequence[str],
    answers: Sequence[str],
    question_types: Sequence[str] | None = None,
    train_questions: Sequence[str] | None = None,
    train_answers: Sequence[str] | None = None,
    settings: DecodingSettings | None = None,
    instruction: str | None = None,
) -> dict[str, Any]:
    """Scores of the model, of the answer prior and of the model on mismatched images, with standard errors.

    The answer prior comes from the training questions and answers when given (they must be other rows than the
    evaluated ones), else leave-one-out from the evaluated items; `answer_prior.built_from` says which. Every
    input is checked before the first answer is generated.
    """
    check_vqa_items(images, questions, answers)
    order = derangement(len(images))
    prior, built_from = prior_arm(questions, answers, train_questions, train_answers)
    prompts = [vqa_prompt(q) if instruction is None else vqa_prompt(q, instruction) for q in questions]
    predictions = generate_answers(model, processor, images, prompts, settings, desc="VQA")
    shuffled = [images[j] for j in order]
    mismatched = generate_answers(model, processor, shuffled, prompts, settings, desc="VQA, mismatched images")
    return {
        "model": with_uncertainty(score_vqa(predictions, answers, question_types)),
        "answer_prior": with_uncertainty(score_vqa(prior, answers, question_types)) | {"built_from": built_from},
        "mismatched_images": with_uncertainty(score_vqa(mismatched, answers, question_types)),
        "predictions": predictions,
    }


def prior_arm(
    questions: Sequence[str],
    answers: Sequence[str],
    train_questions: Sequence[str] | None,
    train_answers: Sequence[str] | None,
) -> tuple[list[str], str]:
    """The answer prior's predictions for `questions` and a line saying what it was built from."""
    if train_questions is None and train_answers is None:
        return leave_one_out_prior(questions, answers), LEAVE_ONE_OUT
    train_questions, train_answers = train_questions or (), train_answers or ()
    check_vqa_items(None, train_questions, train_answers, kind="training")
    if not train_questions:
        raise ValueError("no training questions for the answer prior; pass None to build it leave-one-out")
    fallback = Counter(train_answers).most_common(1)[0][0]
    prior = prior_predictions(answer_prior(train_questions, train_answers), questions, fallback)
    return prior, f"training answers ({len(train_questions)} questions)"
