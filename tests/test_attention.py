"""The attention-mask override: what each mode lets depend on what, and agreement across kernels."""

from __future__ import annotations

import pytest
import torch
from conftest import prompts, shape_image
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from valign import ValignForConditionalGeneration
from valign.modeling_valign import SDPA_PER_SAMPLE, build_attention_mask


def reference_allowed(padding: list[int], is_image: list[bool], mode: str, per_image: int) -> torch.Tensor:
    """An element-by-element statement of the policy, for one row without cache."""
    n = len(padding)
    image_index, count = [], 0
    for flag in is_image:
        image_index.append(count // per_image if flag else None)
        count += flag
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if mode == "bidirectional":
                ok = bool(padding[j])
            else:
                same = image_index[i] is not None and image_index[i] == image_index[j]
                ok = bool(padding[j]) and (j <= i or (mode == "hybrid" and same))
            allowed[i, j] = ok or i == j
    return allowed


@pytest.mark.parametrize("mode", ["hybrid", "bidirectional"])
def test_mask_matches_elementwise_reference(mode):
    # left padding, two adjacent images of 3 tokens, text between and after
    padding = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    is_image = [False, False, False, True, True, True, True, True, True, False, False, False]
    mask = build_attention_mask(
        torch.tensor([padding]), torch.tensor([is_image]), mode, 0, image_seq_length=3, dtype=torch.float32
    )
    assert mask.shape == (1, 1, 12, 12)
    torch.testing.assert_close(mask[0, 0] == 0, reference_allowed(padding, is_image, mode, 3))


def test_mask_with_cache_extends_over_past_keys():
    # decoding 2 text tokens after 4 cached ones, bidirectional: every real key is visible
    mask = build_attention_mask(
        torch.tensor([[0, 1, 1, 1, 1, 1]]), torch.zeros(1, 2, dtype=torch.bool), "bidirectional", 4, 3, torch.float32
    )
    assert mask.shape == (1, 1, 2, 6)
    assert (mask[0, 0, :, 0] < 0).all() and (mask[0, 0, :, 1:] == 0).all()


def test_causal_and_text_only_hybrid_leave_the_padding_mask_to_the_decoder():
    padding = torch.tensor([[0, 1, 1]])
    assert build_attention_mask(padding, None, "hybrid", 0, 4, torch.float32) is padding
    assert build_attention_mask(padding, torch.ones(1, 3, dtype=torch.bool), "causal", 0, 3, torch.float32) is padding


def hidden_states(model, batch, mode, perturb_last_image_token=False):
    """Final hidden states; optionally add noise to the projected feature of the last image token only."""
    handle = None
    if perturb_last_image_token:

        def hook(module, inputs, output):
            output = output.clone()
            output[:, -1] += 5.0
            return output

        handle = model.model.multi_modal_projector.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.model(**batch, attn_mode=mode).last_hidden_state[0]
    finally:
        if handle:
            handle.remove()


@pytest.mark.parametrize("mode", ["hybrid", "causal", "bidirectional"])
def test_which_positions_see_a_later_image_token(model_and_processor, mode):
    model, processor = model_and_processor
    batch = processor(images=[shape_image("red")], text=prompts(processor, ["Describe."]))
    positions = (batch["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    first_image, last_image = positions[0].item(), positions[-1].item()
    base = hidden_states(model, batch, mode)
    moved = hidden_states(model, batch, mode, perturb_last_image_token=True)
    changed = (base - moved).abs().amax(-1) > 1e-5
    assert changed[last_image:].all()  # the token itself and everything after it
    assert changed[first_image].item() == (mode != "causal")  # an earlier image token sees the later one
    text_before = first_image - 1
    assert changed[text_before].item() == (mode == "bidirectional")  # text before the image: only bidirectional


@pytest.mark.parametrize("mode", ["hybrid", "causal"])
def test_no_text_token_depends_on_a_later_token(model_and_processor, mode):
    model, processor = model_and_processor
    batch = processor(images=[shape_image("red")], text=prompts(processor, ["Describe the picture."]))
    with torch.no_grad():
        base = model(**batch, attn_mode=mode).logits[0]
        altered_ids = batch["input_ids"].clone()
        altered_ids[0, -2] = (altered_ids[0, -2] + 1) % 100 + 10  # a text token near the end
        altered = model(**{**batch, "input_ids": altered_ids}, attn_mode=mode).logits[0]
    torch.testing.assert_close(altered[:-2], base[:-2], rtol=0, atol=0)
    assert (altered[-2:] - base[-2:]).abs().max() > 1e-4


def test_causal_mode_equals_the_plain_causal_lm(model_and_processor, backbones):
    """valign in causal mode is the backbone LM applied to the merged image+text embeddings."""
    model, processor = model_and_processor
    batch = processor(
        images=[shape_image("red"), shape_image("blue")], text=prompts(processor, ["Hi.", "A longer one."])
    )
    plain = AutoModelForCausalLM.from_pretrained(str(backbones[1])).eval()
    with torch.no_grad():
        ours = model(**batch, attn_mode="causal")
        embeds = model.get_input_embeddings()(batch["input_ids"])
        image_mask = (batch["input_ids"] == model.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(image_mask, ours.image_hidden_states)
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        reference = plain(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=positions).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours.logits[real], reference[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["hybrid", "bidirectional", "causal"])
def test_eager_equals_sdpa_with_left_padding(checkpoint, model_and_processor, mode):
    _, processor = model_and_processor
    texts = prompts(processor, ["Describe.", "What colour is the big round shape in this picture?"])
    batch = processor(images=[shape_image("red"), shape_image("green")], text=texts)
    assert (batch["attention_mask"][0] == 0).any()  # the first row really is left-padded
    logits = {}
    for kernel in ("eager", "sdpa"):
        model = ValignForConditionalGeneration.from_pretrained(checkpoint, attn_implementation=kernel).eval()
        with torch.no_grad():
            logits[kernel] = model(**batch, attn_mode=mode).logits
    real = batch["attention_mask"].bool()
    assert torch.isfinite(logits["sdpa"]).all() and torch.isfinite(logits["eager"]).all()
    torch.testing.assert_close(logits["eager"][real], logits["sdpa"][real], rtol=1e-4, atol=1e-4)


def packed_rows(processor) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Three image prompts of different lengths packed into two rows ([a, b], [c, padding tail]), as the collator
    lays them out (position ids restart per sample), every token a label; and the length of each sample."""
    texts = ["What is this?", "Describe the shape and its colour in detail, please.", "Colour?"]
    encoded = [
        processor(images=[shape_image(c)], text=prompts(processor, [t]))
        for c, t in zip(("red", "green", "blue"), texts, strict=True)
    ]
    ids = [e["input_ids"][0] for e in encoded]
    pad = processor.tokenizer.pad_token_id
    width = len(ids[0]) + len(ids[1])
    tail = width - len(ids[2])
    rows = [torch.cat(ids[:2]), torch.cat([ids[2], torch.full((tail,), pad)])]
    positions = [
        torch.cat([torch.arange(len(ids[0])), torch.arange(len(ids[1]))]),
        torch.cat([torch.arange(len(ids[2])), torch.arange(tail)]),
    ]
    input_ids = torch.stack(rows)
    batch = {
        "input_ids": input_ids,
        "position_ids": torch.stack(positions),
        "pixel_values": torch.cat([e["pixel_values"] for e in encoded]),
        "labels": input_ids.clone(),
    }
    return batch, [len(i) for i in ids] + [tail]


@pytest.mark.parametrize("mode", ["causal", "hybrid", "bidirectional"])
def test_per_sample_sdpa_equals_sdpa_on_packed_rows_and_never_attends_across_samples(
    model_and_processor, checkpoint, mode, monkeypatch
):
    """`sdpa_per_sample` (what packed training stages load) runs sdpa on each packed sample's block of the mask
    alone: the same loss and gradients as sdpa over whole rows, from products no wider than a sample."""
    batch, lengths = packed_rows(model_and_processor[1])
    sdpa, blocks = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def recording(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None and attention_mask.ndim == 4:  # the language model's (the vision tower's: None)
            blocks.append(tuple(attention_mask.shape[-2:]))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recording)
    results = {}
    for kernel in ("sdpa", SDPA_PER_SAMPLE):
        model = ValignForConditionalGeneration.from_pretrained(checkpoint, attn_implementation=kernel)
        assert model.config.text_config._attn_implementation == kernel
        blocks.clear()
        loss = model(**batch, attn_mode=mode).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[kernel] = loss.detach(), grads, sorted(blocks)
    dense_loss, dense_grads, dense_blocks = results["sdpa"]
    loss, grads, blocks = results[SDPA_PER_SAMPLE]
    torch.testing.assert_close(loss, dense_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == dense_grads.keys() and len(grads) > 20
    for name, grad in dense_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    layers, width = model.config.text_config.num_hidden_layers, batch["input_ids"].shape[1]
    assert dense_blocks == [(width, width)] * layers  # one call a layer, every row in full
    assert blocks == sorted((n, n) for n in lengths for _ in range(layers))


def test_left_padding_does_not_change_a_row(model_and_processor):
    model, processor = model_and_processor
    texts = prompts(processor, ["Describe.", "What colour is the big round shape in this picture?"])
    images = [shape_image("red"), shape_image("green")]
    batch = processor(images=images, text=texts)
    alone = processor(images=images[:1], text=texts[:1])
    with torch.no_grad():
        batched = model(**batch).logits[0]
        single = model(**alone).logits[0]
    length = alone["input_ids"].shape[1]
    torch.testing.assert_close(batched[-length:], single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["flash_attention_2", "flash_attention_3"])
def test_kernels_without_custom_masks_are_refused(model_and_processor, kernel):
    model, processor = model_and_processor
    batch = processor(images=[shape_image("red")], text=prompts(processor, ["Describe."]))
    text_config = model.config.text_config
    original = text_config._attn_implementation
    text_config._attn_implementation = kernel  # what loading with attn_implementation=kernel would set
    try:
        with pytest.raises(ValueError, match="needs a custom 4D attention mask"):
            model(**batch, attn_mode="hybrid")
    finally:
        text_config._attn_implementation = original


def test_generate_refuses_bidirectional(model_and_processor):
    model, processor = model_and_processor
    batch = processor(images=[shape_image("red")], text=prompts(processor, ["Describe."]))
    with pytest.raises(ValueError, match="bidirectional"):
        model.generate(**batch, attn_mode="bidirectional", max_new_tokens=2)


def test_unknown_mode_is_refused(model_and_processor):
    model, processor = model_and_processor
    batch = processor(images=[shape_image("red")], text=prompts(processor, ["Describe."]))
    with pytest.raises(ValueError, match="attn_mode must be one of"):
        model(**batch, attn_mode="sideways")
