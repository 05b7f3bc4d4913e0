"""Caption evaluation: generate one caption per image, score with the COCO caption scorer."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .caption_metrics import score_captions
from .generate import DecodingSettings, generate_answers


def evaluate_captions(
    model,
    processor,
    images: Sequence[Any],
    references: Sequence[Sequence[str]],
    image_ids: Sequence[Any],
    prompt: str,
    settings: DecodingSettings | None = None,
) -> dict[str, Any]:
    """Scores (pycocoevalcap's 0–1 scale; papers quote ×100), per-image captions, settings and throughput."""
    settings = settings or DecodingSettings()
    start = time.perf_counter()
    captions = generate_answers(model, processor, images, [prompt] * len(images), settings, desc="captioning")
    elapsed = time.perf_counter() - start
    keys = [str(i) for i in image_ids]
    scores = score_captions(dict(zip(keys, captions)), {k: list(refs) for k, refs in zip(keys, references)})
    return {
        "scores": scores,
        "captions": dict(zip(keys, captions)),
        "decoding": settings.to_dict(),
        "prompt": prompt,
        "generation_seconds": elapsed,
        "images_per_second": len(images) / elapsed,
    }
