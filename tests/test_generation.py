"""Generation: the KV cache and batching must not change what the model says."""

from __future__ import annotations

import pytest
import torch
from conftest import prompts, shape_image

QUESTIONS = ["Describe.", "What colour is the big round shape in this picture?", "Shape?"]
COLORS = ["red", "green", "blue"]


@pytest.mark.parametrize("mode", ["hybrid", "causal"])
def test_batched_left_padded_generation_equals_one_by_one(model_and_processor, mode):
    model, processor = model_and_processor
    texts, images = prompts(processor, QUESTIONS), [shape_image(c) for c in COLORS]
    batch = processor(images=images, text=texts)
    together = model.generate(**batch, attn_mode=mode, max_new_tokens=8, do_sample=False)
    together = together[:, batch["input_ids"].shape[1] :]
    for row, (text, image) in enumerate(zip(texts, images)):
        alone = processor(images=[image], text=[text])
        single = model.generate(**alone, attn_mode=mode, max_new_tokens=8, do_sample=False)
        assert together[row].tolist() == single[0, alone["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("mode", ["hybrid", "causal"])
def test_cached_greedy_generation_equals_full_recomputation(model_and_processor, mode):
    model, processor = model_and_processor
    batch = processor(images=[shape_image("red"), shape_image("blue")], text=prompts(processor, QUESTIONS[:2]))
    cached = model.generate(**batch, attn_mode=mode, max_new_tokens=8, do_sample=False, use_cache=True)
    # recompute every step from scratch: argmax of a full forward pass over the whole sequence so far
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(8):
            logits = model(
                input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], attn_mode=mode
            ).logits
            logits[..., model.config.image_token_id] = -torch.inf  # generate suppresses it too
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    assert cached.tolist() == ids.tolist()


def test_generation_depends_on_the_image(model_and_processor):
    model, processor = model_and_processor
    text = prompts(processor, ["Describe."])
    outputs = [
        model.generate(**processor(images=[shape_image(c)], text=text), max_new_tokens=6, do_sample=False)
        for c in ("red", "blue")
    ]
    assert outputs[0].tolist() != outputs[1].tolist()


def test_generation_never_emits_the_image_token(model_and_processor):
    model, processor = model_and_processor
    batch = processor(images=[shape_image("red")], text=prompts(processor, ["Describe."]))
    image_token = model.config.image_token_id

    def favour_image_token(module, inputs, logits):
        logits = logits.clone()
        logits[..., image_token] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(favour_image_token)
    try:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert image_token not in out[0, batch["input_ids"].shape[1] :].tolist()


def test_images_are_encoded_once_per_generation(model_and_processor):
    model, processor = model_and_processor
    batch = processor(images=[shape_image("red"), shape_image("blue")], text=prompts(processor, ["Describe."] * 2))
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    finally:
        hook.remove()
    assert calls == [2]  # one vision pass over both images at prefill, none while decoding
