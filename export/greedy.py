"""Greedy decoding for valign's own runtimes (onnxruntime, compiled PyTorch): what `model.generate` does with one
beam and no sampling. The checkpoint's end tokens finish a row, finished rows are padded with its padding token, and
its suppressed tokens (the image placeholder) never win. Generation settings that would change the tokens are
refused rather than ignored."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import GenerationConfig

# Settings `model.generate` honours that these runtimes do not implement: a checkpoint setting any is refused.
UNSUPPORTED_GENERATION = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "min_length",
    "min_new_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "encoder_repetition_penalty",
)

# step(chunk, attention_mask, past) -> logits of each row's next token, (batch, vocab): `chunk` holds the prompt at
# the first call and the previous token after it, `attention_mask` covers every token so far, `past` tokens are cached.
Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def check_generation_config(config: GenerationConfig, source: str, runtime: str) -> None:
    defaults = GenerationConfig()
    changed = [k for k in UNSUPPORTED_GENERATION if getattr(config, k, None) != getattr(defaults, k, None)]
    if changed:
        raise ValueError(f"the {runtime} runtime decodes greedily without {', '.join(changed)}, which {source} sets")


def check_greedy(mode: str, num_beams: int, do_sample: bool, runtime: str) -> None:
    if num_beams != 1 or do_sample:
        raise ValueError(f"the {runtime} runtime decodes greedily only (num_beams=1, do_sample=False)")
    if mode == "bidirectional":
        raise ValueError("generation cannot use attn_mode='bidirectional'; pass attn_mode='hybrid'")


def decode_greedily(
    step: Step,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    max_new_tokens: int,
) -> torch.Tensor:
    """Prompt and new tokens, `(batch, prompt + new)`, finished rows padded, as `generate` returns them."""
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    eos = torch.tensor([token for token in eos if token is not None], dtype=torch.long, device=input_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else int(eos[0]) if len(eos) else 0
    suppress = list(config.suppress_tokens or [])
    batch = input_ids.shape[0]
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    tokens, chunk, past = input_ids, input_ids, 0
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        scores = step(chunk, attention_mask, past).float()
        scores[:, suppress] = -torch.inf
        next_token = torch.where(unfinished, scores.argmax(-1), pad)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        unfinished &= ~torch.isin(next_token, eos)
        if not unfinished.any():
            break
        past += chunk.shape[1]
        chunk = next_token[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
    return tokens
