"""Caption evaluation: generate one caption per image, score with the COCO caption scorer."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ..data.adapters import caption_references, row_id
from ..data.images import decode_image
from ..data.skips import SkipRow
from ..data.sources import Rows
from .generate import DecodingSettings, generate_answers
from .rows import read_items


@dataclass
class CaptionItems:
    """The images of a caption evaluation, their references and ids, and the rows skipped on the way."""

    images: list[Any]
    references: list[list[str]]
    ids: list[str]
    skipped: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Rows) -> CaptionItems:
        """Items of caption rows (`image` + `caption`/`captions`/`sentences`); a row without a non-empty reference
        or a readable image is skipped and counted."""
        read = read_items(rows, caption_item)
        images, references, ids = [list(column) for column in zip(*read.items)] or [[], [], []]
        return cls(images, references, ids, read.report())


def caption_item(row: Mapping[str, Any], index: int) -> tuple[Any, list[str], str]:
    """(image, references, id) of a row, or :class:`SkipRow`."""
    references = caption_references(row)
    if not references:
        raise SkipRow("missing_text", "no non-empty reference caption")
    image = decode_image(row.get("image"))
    if image is None:
        raise SkipRow("missing_image", "no image")
    return image, references, row_id(row, index)


def caption_scorer() -> ModuleType:
    """The COCO caption scorer, imported when captions are scored: pycocoevalcap is in the eval extra, and training
    (the train extra) imports this module for the demo's evaluation without scoring anything."""
    try:
        from . import caption_metrics
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"scoring captions needs {error.name}: pip install 'valign[eval]'") from error
    return caption_metrics


def check_caption_inputs(images: Sequence[Any], references: Sequence[Sequence[str]], image_ids: Sequence[Any]) -> None:
    """What scoring needs, checked before any caption is generated (it used to fail only after all of them): as
    many references and ids as images, at least one, a non-blank reference list each, and Java on PATH."""
    if not len(images) == len(references) == len(image_ids):
        raise ValueError(f"{len(images)} images, {len(references)} reference lists and {len(image_ids)} ids")
    if not images:
        raise ValueError("no images to caption")
    scorer = caption_scorer()
    scorer.check_references({index: refs for index, refs in enumerate(references)})
    scorer.require_java()


def evaluate_captions(
    model,
    processor,
    images: Sequence[Any],
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Any],
    prompt: str,
    settings: DecodingSettings | None = None,
    on_generated: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Scores (pycocoevalcap's 0–1 scale; papers quote ×100), per-image captions, settings and throughput.

    Each image is scored under its position, so repeated or missing ids cannot merge images (pycocoevalcap keys
    by id); `captions` lists {"image_id", "caption"} in input order. `on_generated` gets the results before
    scoring (with `scores` None), so a caller can save the captions before the Java scorer runs.
    """
    check_caption_inputs(images, references, image_ids)
    settings = settings or DecodingSettings()
    start = time.perf_counter()
    captions = generate_answers(model, processor, images, [prompt] * len(images), settings, desc="captioning")
    elapsed = time.perf_counter() - start
    results = {
        "scores": None,
        "captions": [{"image_id": str(i), "caption": c} for i, c in zip(image_ids, captions, strict=True)],
        "decoding": settings.to_dict(),
        "prompt": prompt,
        "generation_seconds": elapsed,
        "images_per_second": len(images) / elapsed,
    }
    if on_generated is not None:
        on_generated(results)
    keys = [str(index) for index in range(len(images))]
    results["scores"] = caption_scorer().score_captions(
        dict(zip(keys, captions)), dict(zip(keys, map(list, references)))
    )
    return results
