"""The version bridges (configuration_valign.py's last section) on the installed transformers release."""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import transformers
import transformers.utils.logging as transformers_logging
from conftest import chat, prompts, shape_image
from transformers import Cache, TrainingArguments

from valign import ValignForConditionalGeneration, ValignProcessor
from valign.configuration_valign import CACHE_NAME, checkpointing_arguments, portable_tokenizer_config

DEPRECATED = re.compile(r"deprecat", re.IGNORECASE)


@contextmanager
def deprecation_messages() -> Iterator[list[str]]:
    """Every deprecation notice raised inside the block: Python warnings and transformers' log records alike."""
    caught: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record.getMessage())

    handler = Collect(logging.WARNING)
    root = logging.getLogger("transformers")
    transformers_logging.warning_once.cache_clear()  # a notice logged once before this block would stay silent
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            yield caught
    finally:
        root.removeHandler(handler)
    caught.extend(str(w.message) for w in raised)
    caught[:] = [message for message in caught if DEPRECATED.search(message)]


def test_outputs_carry_the_cache_under_this_releases_name(model_and_processor):
    model, processor = model_and_processor
    batch = processor(images=[shape_image("red")], text=prompts(processor, ["Describe."]))
    with torch.no_grad():
        output = model(**batch, use_cache=True)
    assert isinstance(output, transformers.modeling_outputs.CausalLMOutputWithPast)
    assert isinstance(output[CACHE_NAME], Cache)
    assert output[CACHE_NAME].get_seq_length() == batch["input_ids"].shape[1]
    assert output.image_hidden_states.shape == (1, model.config.image_seq_length, model.config.text_config.hidden_size)


def test_a_decoding_step_reads_the_cache_under_either_name(model_and_processor):
    model, processor = model_and_processor
    batch = processor(images=[shape_image("blue")], text=prompts(processor, ["Describe."]))
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        next_token = prefill.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(next_token)], dim=1)
        steps = {
            name: model(input_ids=next_token, attention_mask=mask, **{name: copy.deepcopy(prefill[CACHE_NAME])}).logits
            for name in ("cache", "past_key_values")
        }
        full = model(
            input_ids=torch.cat([batch["input_ids"], next_token], 1),
            attention_mask=mask,
            pixel_values=batch["pixel_values"],
        ).logits[:, -1:]
    torch.testing.assert_close(steps["cache"], steps["past_key_values"], rtol=0, atol=0)
    torch.testing.assert_close(steps["cache"], full, rtol=1e-4, atol=1e-4)  # the cache was used, not ignored
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=next_token, cache=prefill[CACHE_NAME], past_key_values=prefill[CACHE_NAME])


def test_inference_paths_raise_no_deprecation_notice(model_and_processor, checkpoint, tmp_path):
    model, processor = model_and_processor
    batch = processor(
        images=[shape_image("red"), shape_image("blue")], text=prompts(processor, ["Describe.", "Shape?"])
    )
    with deprecation_messages() as notices:
        with torch.no_grad():
            model(**batch)
        model.generate(**batch, max_new_tokens=4, do_sample=False)
        pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
        pipe(text=chat("Describe.", shape_image("green")), max_new_tokens=4, return_full_text=False)
        loaded = ValignForConditionalGeneration.from_pretrained(checkpoint)
        ValignProcessor.from_pretrained(checkpoint).save_pretrained(tmp_path / "processor")
        loaded.save_pretrained(tmp_path / "model")
    assert notices == []


def test_checkpointing_is_turned_on_without_a_deprecation_notice(tmp_path):
    with deprecation_messages() as notices:
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **checkpointing_arguments(use_reentrant=False))
    assert notices == []
    name = next(iter(checkpointing_arguments()))
    assert getattr(args, name) is True
    assert getattr(args, f"{name}_kwargs") == {"use_reentrant": False}


def test_a_5x_tokenizer_config_becomes_readable_by_4x():
    saved_by_5x = {
        "tokenizer_class": "TokenizersBackend",
        "extra_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>"],
        "eos_token": "<|im_end|>",
    }
    assert portable_tokenizer_config(saved_by_5x) == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>"],
        "eos_token": "<|im_end|>",
    }
    named_tokens = {"tokenizer_class": "Qwen2Tokenizer", "extra_special_tokens": {"image_token": "<|image_pad|>"}}
    assert portable_tokenizer_config(named_tokens) == named_tokens  # 4.x's own dict form is left alone
