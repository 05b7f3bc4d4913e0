"""VQA scoring for short free-form answers (PathVQA style: closed yes/no questions and open questions).

Answers are compared after `normalize_answer`, the SQuAD v1.1 answer normalisation:
  1. lower-case;
  2. delete ASCII punctuation (string.punctuation), so "x-ray" -> "xray" and "yes." -> "yes";
  3. remove the articles "a", "an", "the" as whole words;
  4. collapse all whitespace to single spaces and strip the ends.
Unlike the VQA v2 evaluator it does not map number words to digits or expand contractions, and there is one
ground-truth answer per question (PathVQA), not ten annotators.

Metrics (PathVQA convention): closed questions are those whose ground-truth answer is yes/no and are scored
by accuracy; open questions by exact match and by SQuAD token-level F1. `accuracy` is exact match over all
questions. `accuracy_standard_error` gives the binomial standard error for stating test-set uncertainty.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence

__all__ = [
    "CLOSED_ANSWERS",
    "accuracy_standard_error",
    "exact_match",
    "is_closed_question",
    "normalize_answer",
    "score_vqa",
    "token_f1",
]

CLOSED_ANSWERS = frozenset({"yes", "no"})

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, delete punctuation, drop articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def is_closed_question(answer: str) -> bool:
    """Whether a question is closed-ended, judged as PathVQA does by its ground-truth answer being yes/no."""
    return normalize_answer(answer) in CLOSED_ANSWERS


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the two answers are equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(answer)


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD token-level F1 between normalised answers (bag of words, repeated tokens counted with multiplicity).

    If either side normalises to no tokens (e.g. "the"), the score is 1.0 when both do and 0.0 otherwise.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    n_common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if n_common == 0:
        return 0.0
    precision = n_common / len(pred_tokens)
    recall = n_common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def accuracy_standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error sqrt(p(1-p)/n) of an accuracy p measured on n independent questions.

    A 95% interval is roughly accuracy ± 1.96 × this. Not valid for averaged F1 scores.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}.")
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must lie in [0, 1], got {accuracy}.")
    return math.sqrt(accuracy * (1.0 - accuracy) / n)


def score_vqa(
    predictions: Sequence[str],
    answers: Sequence[str],
    question_types: Sequence[str] | None = None,
) -> dict:
    """Score predicted answers against one ground-truth answer per question.

    Returns a dict with
        "accuracy", "n":                          exact match over all questions, and their count;
        "closed_accuracy", "n_closed":            exact match on yes/no questions (see `is_closed_question`);
        "open_exact_match", "open_f1", "n_open":  exact match and mean token F1 on the other questions;
        "per_type" (only with `question_types`):  {type: {"accuracy": ..., "n": ...}}.
    A score over an empty subset (e.g. no open questions) is None rather than a misleading 0.
    """
    _check_lengths(predictions, answers, question_types)
    matches = [exact_match(p, a) for p, a in zip(predictions, answers, strict=True)]
    closed = [is_closed_question(a) for a in answers]
    open_f1 = [token_f1(p, a) for p, a, c in zip(predictions, answers, closed, strict=True) if not c]

    result: dict = {
        "accuracy": _mean(matches),
        "n": len(matches),
        "closed_accuracy": _mean([m for m, c in zip(matches, closed, strict=True) if c]),
        "n_closed": sum(closed),
        "open_exact_match": _mean([m for m, c in zip(matches, closed, strict=True) if not c]),
        "open_f1": _mean(open_f1),
        "n_open": len(open_f1),
    }
    if question_types is not None:
        result["per_type"] = _per_type_accuracy(matches, question_types)
    return result


def _check_lengths(predictions: Sequence[str], answers: Sequence[str], question_types: Sequence[str] | None) -> None:
    if len(predictions) != len(answers):
        raise ValueError(f"Got {len(predictions)} predictions for {len(answers)} answers.")
    if not answers:
        raise ValueError("No answers to score.")
    if question_types is not None and len(question_types) != len(answers):
        raise ValueError(f"Got {len(question_types)} question types for {len(answers)} answers.")


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _per_type_accuracy(matches: Sequence[bool], question_types: Sequence[str]) -> dict[str, dict]:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for match, question_type in zip(matches, question_types, strict=True):
        by_type[question_type].append(match)
    return {t: {"accuracy": _mean(m), "n": len(m)} for t, m in sorted(by_type.items())}
