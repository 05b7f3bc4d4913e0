"""VQA evaluation with image-blind baselines.

Two baselines show whether the model uses the image (see shared notes: zeroed image tokens are not a fair one,
they push the language model off its task):
- the answer prior: for each question, the most frequent training answer to that same question text;
- mismatched images: the same model, each question paired with another question's image (a fixed shuffle).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from ..data.images import decode_image
from ..data.prompts import vqa_prompt
from .generate import DecodingSettings, generate_answers
from .vqa_metrics import accuracy_standard_error, is_closed_question, normalize_answer, score_vqa

# The rows of a VQA report: label -> key of `evaluate_vqa`'s results.
VQA_ARMS = {"valign": "model", "answer prior (blind)": "answer_prior", "mismatched images (blind)": "mismatched_images"}


@dataclass
class VqaItems:
    """The test items of a VQA evaluation, images decoded."""

    images: list[Any]
    questions: list[str]
    answers: list[str]
    types: list[str]

    @classmethod
    def from_rows(cls, rows: datasets.Dataset) -> VqaItems:
        """Items of PathVQA-schema rows; question types from a `question_type` column, else closed (yes/no
        answers) or open."""
        answers = list(rows["answer"])
        types = list(rows["question_type"]) if "question_type" in rows.column_names else None
        return cls(
            images=[decode_image(image) for image in rows.cast_column("image", datasets.Image(decode=False))["image"]],
            questions=list(rows["question"]),
            answers=answers,
            types=types or ["closed" if is_closed_question(a) else "open" for a in answers],
        )


def answer_prior(train_questions: Sequence[str], train_answers: Sequence[str]) -> dict[str, str]:
    """Most frequent training answer per normalised question; ties go to the answer seen first."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for question, answer in zip(train_questions, train_answers):
        counts[normalize_answer(question)][answer] += 1
    return {question: answers.most_common(1)[0][0] for question, answers in counts.items()}


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
    train_questions: Sequence[str] = (),
    train_answers: Sequence[str] = (),
    settings: DecodingSettings | None = None,
    instruction: str | None = None,
) -> dict[str, Any]:
    """Scores of the model, of the answer prior and of the model on mismatched images, with standard errors."""
    prompts = [vqa_prompt(q) if instruction is None else vqa_prompt(q, instruction) for q in questions]
    predictions = generate_answers(model, processor, images, prompts, settings, desc="VQA")
    shuffled = [images[j] for j in derangement(len(images))]
    mismatched = generate_answers(model, processor, shuffled, prompts, settings, desc="VQA, mismatched images")
    results = {
        "model": with_uncertainty(score_vqa(predictions, answers, question_types)),
        "mismatched_images": with_uncertainty(score_vqa(mismatched, answers, question_types)),
        "predictions": predictions,
    }
    if train_questions:
        fallback = Counter(train_answers).most_common(1)[0][0]
        prior = prior_predictions(answer_prior(train_questions, train_answers), questions, fallback)
        results["answer_prior"] = with_uncertainty(score_vqa(prior, answers, question_types))
    return results
