"""valign's causal mode is transformers' LLaVA: same parts, same weights, same logits and loss (bench/llava_twin)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompts, shape_image
from llava_twin import llava_twin

from valign import ValignForConditionalGeneration


@pytest.fixture(scope="module")
def pair(model_and_processor):
    model, processor = model_and_processor
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.vision_feature_layer = -2  # LLaVA reads hidden_states[layer]: below the last layer, both read the same
    torch.manual_seed(0)
    valign = ValignForConditionalGeneration(config).eval()
    valign.load_state_dict(model.state_dict())
    return valign, llava_twin(valign), processor


def test_causal_valign_and_llava_give_the_same_logits_and_loss(pair):
    valign, llava, processor = pair
    batch = processor(
        images=[shape_image("red"), shape_image("blue")],
        text=prompts(processor, ["What colour is it?", "Describe the picture in detail."]),
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        ours = valign(**batch, labels=labels, attn_mode="causal")
        theirs = llava(**batch, labels=labels)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-5)


def test_hybrid_mode_differs_from_llava(pair):
    # the comparison above would also pass if attn_mode were ignored; hybrid must change the image tokens' outputs
    valign, llava, processor = pair
    batch = processor(images=[shape_image("red")], text=prompts(processor, ["What colour is it?"]))
    with torch.no_grad():
        hybrid = valign(**batch, attn_mode="hybrid").logits
        reference = llava(**batch).logits
    assert (hybrid - reference).abs().max() > 1e-2
