"""Batched generation for evaluation: one image and one prompt per item, left-padded, greedy or beam search."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.prompts import user_turn


@dataclass
class DecodingSettings:
    """Recorded next to every result, so numbers can be reproduced."""

    max_new_tokens: int = 32
    num_beams: int = 1
    batch_size: int = 16
    attn_mode: str | None = None  # None: the checkpoint's own mode (hybrid, unless it was trained otherwise)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chat_prompt(processor, text: str) -> str:
    return processor.apply_chat_template([user_turn(text)], add_generation_prompt=True)


def generation_mode(model, requested: str | None) -> str:
    """Bidirectional checkpoints (alignment stage) are decoded with the hybrid mask, the cache-consistent one."""
    mode = requested or model.config.attn_mode
    return "hybrid" if mode == "bidirectional" else mode


class PromptTooLongError(ValueError):
    """A prompt, its image tokens and the tokens to generate need more positions than the language model has."""


def check_positions(model, prompt_length: int, max_new_tokens: int) -> None:
    """Refuse a generation past `text_config.max_position_embeddings`: the rotary embedding would compute positions
    the model never saw, and answer without a word of warning."""
    limit = getattr(model.config.text_config, "max_position_embeddings", None)
    if limit is not None and prompt_length + max_new_tokens > limit:
        raise PromptTooLongError(
            f"the prompt takes {prompt_length} tokens (image tokens included) and up to {max_new_tokens} new tokens "
            f"are asked: {prompt_length + max_new_tokens} positions, more than the language model's "
            f"{limit} (text_config.max_position_embeddings); shorten the prompt or lower max_new_tokens"
        )


@torch.no_grad()
def generate_answers(
    model,
    processor,
    images: Sequence[Any],
    prompts: Sequence[str],
    settings: DecodingSettings | None = None,
    desc: str = "generating",
    progress: bool = True,
    rows: int | None = None,
) -> list[str]:
    """The model's reply to `prompts[i]` about `images[i]`, for every i, with a progress bar unless `progress`
    is False (callers that show their own). Raises PromptTooLongError before generating a batch that does not fit
    the language model's positions.

    A runtime that compiles graphs per batch size (`fixed_batch`, the compiled one: a minute or more each at the
    paper's shape) gets every batch filled up to `rows` (default: the batch size, or fewer prompts) with copies of
    its last item, whose answers are dropped, so a last, smaller batch compiles nothing new."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    settings = settings or DecodingSettings()
    mode = generation_mode(model, settings.attn_mode)
    texts = [chat_prompt(processor, prompt) for prompt in prompts]
    rows = (rows or min(settings.batch_size, len(texts))) if getattr(model, "fixed_batch", False) else 0
    answers: list[str] = []
    with tqdm(total=len(texts), desc=desc, unit="item", disable=not progress) as bar:
        for start in range(0, len(texts), settings.batch_size):
            stop = start + settings.batch_size
            chunk_images, chunk_texts = list(images[start:stop]), texts[start:stop]
            filler = max(rows - len(chunk_texts), 0)
            filled = {
                "images": chunk_images + chunk_images[-1:] * filler,
                "text": chunk_texts + chunk_texts[-1:] * filler,
            }
            batch = processor(**filled).to(model.device)
            check_positions(model, batch["input_ids"].shape[1], settings.max_new_tokens)
            tokens = model.generate(
                **batch,
                attn_mode=mode,
                max_new_tokens=settings.max_new_tokens,
                num_beams=settings.num_beams,
                do_sample=False,
            )
            new_tokens = tokens[: len(chunk_texts), batch["input_ids"].shape[1] :]
            answers += [a.strip() for a in processor.batch_decode(new_tokens, skip_special_tokens=True)]
            bar.update(len(new_tokens))
    return answers
