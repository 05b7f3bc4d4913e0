"""Model behaviour: bad input errors, training mechanics, save/load invariants, other backbones."""

from __future__ import annotations

import pytest
import torch
from conftest import prompts, shape_image
from transformers import AutoModel, CLIPVisionConfig, Dinov2Config, LlamaConfig, SiglipVisionConfig

from valign import ValignConfig, ValignForConditionalGeneration
from valign.configuration_valign import enable_checkpointing
from valign.modeling_valign import encoder_hidden_state, unwrap_vision_encoder
from valign.train.trainer import supervised_positions


def one_batch(processor, colors=("red",), question="Describe."):
    return processor(images=[shape_image(c) for c in colors], text=prompts(processor, [question] * len(colors)))


def test_more_images_than_placeholders_raises_with_both_counts(model_and_processor):
    model, processor = model_and_processor
    batch = one_batch(processor)
    two_images = torch.cat([batch["pixel_values"]] * 2)
    with pytest.raises(ValueError, match=r"2 image\(s\) need 32 image tokens .* input_ids hold 16"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=two_images)


@torch.no_grad()
def test_a_compiled_forward_is_one_graph_that_still_refuses_mismatched_placeholders(model_and_processor):
    """Under torch.compile the placeholder count cannot raise the ValueError above (a graph cannot branch on it):
    the graph keeps an assertion instead, and `fullgraph=True` proves the check no longer breaks it."""
    model, processor = model_and_processor
    batch = one_batch(processor)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="image tokens and images do not match"):
        compiled(**{**batch, "pixel_values": torch.cat([batch["pixel_values"]] * 2)})


def test_placeholder_without_image_raises(model_and_processor):
    model, processor = model_and_processor
    batch = one_batch(processor)
    with pytest.raises(ValueError, match="16 image tokens but no pixel_values"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_wrong_pixel_shape_raises(model_and_processor):
    model, processor = model_and_processor
    batch = one_batch(processor)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 32, 32\)"):
        model(**{**batch, "pixel_values": torch.zeros(1, 3, 48, 48)})


def test_labels_without_supervised_tokens_raise(model_and_processor):
    model, processor = model_and_processor
    batch = one_batch(processor)
    with pytest.raises(ValueError, match="no supervised token"):
        model(**batch, labels=torch.full_like(batch["input_ids"], -100))


def test_loss_is_mean_cross_entropy_over_supervised_tokens(model_and_processor):
    model, processor = model_and_processor
    batch = one_batch(processor, colors=("red", "blue"))
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    logits, targets = out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def gradients(model, batch, labels, **kwargs):
    model.zero_grad()
    model(**batch, labels=labels, **kwargs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_logits_at_supervised_positions_only_give_the_full_loss_and_gradients(checkpoint, model_and_processor):
    # what ValignTrainer does: the vocabulary-wide head only where the next token is supervised
    _, processor = model_and_processor
    batch = one_batch(processor, colors=("red", "blue", "green"))
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -3:], labels[1, -2:], labels[2, 20] = batch["input_ids"][0, -3:], batch["input_ids"][1, -2:], 7
    model = ValignForConditionalGeneration.from_pretrained(checkpoint)
    positions = supervised_positions(labels)
    assert positions.tolist() == [19, *range(labels.shape[1] - 4, labels.shape[1] - 1)]
    full, kept = gradients(model, batch, labels), gradients(model, batch, labels, logits_to_keep=positions)
    assert full.keys() == kept.keys() and any(k.startswith("model.multi_modal_projector") for k in full)
    for name in full:
        torch.testing.assert_close(kept[name], full[name], rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch, labels=labels, logits_to_keep=positions).loss, model(**batch, labels=labels).loss
        )
        with pytest.raises(ValueError, match="no supervised token"):  # the last position has no target
            model(**batch, labels=labels, logits_to_keep=1)


def test_chunked_loss_gives_the_full_loss_and_gradients(checkpoint, model_and_processor):
    # loss_chunk_size: supervised tokens only, 4 at a time (6 supervised: chunks of 4 and 2), logits recomputed
    _, processor = model_and_processor
    batch = one_batch(processor, colors=("red", "blue", "green"))
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -3:], labels[1, -2:], labels[2, 20] = batch["input_ids"][0, -3:], batch["input_ids"][1, -2:], 7
    model = ValignForConditionalGeneration.from_pretrained(checkpoint).train()
    model.config.text_config.attention_dropout = 0.0
    positions = supervised_positions(labels)
    for kwargs in ({}, {"logits_to_keep": positions}, {"num_items_in_batch": torch.tensor(11)}):
        model.config.loss_chunk_size = None
        full = gradients(model, batch, labels, **kwargs)
        full_loss = model(**batch, labels=labels, **kwargs).loss
        model.config.loss_chunk_size = 4
        chunked = gradients(model, batch, labels, **kwargs)
        out = model(**batch, labels=labels, **kwargs)
        assert out.logits is None
        torch.testing.assert_close(out.loss, full_loss, msg=str(kwargs))
        assert full.keys() == chunked.keys()
        scale = max(g.abs().max().item() for g in full.values())
        for name in full:  # the chunks sum in another order: within 1e-6 of the largest gradient entry
            torch.testing.assert_close(chunked[name], full[name], rtol=0, atol=1e-6 * scale, msg=f"{name} {kwargs}")
    with torch.no_grad():  # without gradients (evaluation) the logits are computed and returned as usual
        out = model(**batch, labels=labels)
    assert out.logits.shape[:2] == labels.shape
    torch.testing.assert_close(out.loss, full_loss * 11 / 6)  # the last loop's loss was over 11 "items", not 6


@pytest.mark.parametrize("size", [0, -4, 2.5, "1024"])
def test_bad_loss_chunk_size_raises(size):
    with pytest.raises(ValueError, match="loss_chunk_size must be a positive int or None"):
        ValignConfig(loss_chunk_size=size)


@pytest.mark.parametrize(("vision_feature_layer", "use_reentrant"), [(-1, False), (-2, False), (-2, True)])
def test_gradient_checkpointing_gives_identical_gradients(
    checkpoint, model_and_processor, vision_feature_layer, use_reentrant
):
    # an inner vision layer is caught by a hook (encoder_hidden_state): its gradients must survive checkpointing
    _, processor = model_and_processor
    batch = one_batch(processor, colors=("red", "blue"))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = ValignForConditionalGeneration.from_pretrained(checkpoint, vision_feature_layer=vision_feature_layer)
    model.train().config.text_config.attention_dropout = 0.0
    plain = gradients(model, batch, labels)
    enable_checkpointing(model, use_reentrant)
    checkpointed = gradients(model, batch, labels)
    assert plain.keys() == checkpointed.keys() and any(k.startswith("model.vision_tower") for k in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tied_embeddings_stay_tied_after_load(checkpoint):
    model = ValignForConditionalGeneration.from_pretrained(checkpoint)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        model.get_input_embeddings().weight[3, 0] = 123.0
    assert model.lm_head.weight[3, 0].item() == 123.0


def test_save_and_load_in_process_gives_identical_logits(checkpoint, model_and_processor):
    model, processor = model_and_processor
    batch = one_batch(processor, colors=("red", "blue"))
    loaded = ValignForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
TINY_VISION |= {"image_size": 32, "patch_size": 8}
TINY_TEXT = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}


@pytest.mark.parametrize(
    ("vision_config", "prefix_tokens"),
    [
        (CLIPVisionConfig(**TINY_VISION), 1),
        (Dinov2Config(**TINY_VISION), 1),
    ],
)
def test_encoders_with_a_cls_token_contribute_patch_tokens_only(vision_config, prefix_tokens):
    text_config = LlamaConfig(**TINY_TEXT, num_attention_heads=4, num_key_value_heads=4)
    config = ValignConfig(vision_config=vision_config, text_config=text_config, image_token_id=5)
    model = ValignForConditionalGeneration(config).eval()
    assert config.image_seq_length == 16
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.get_image_features(pixels)
        hidden = model.model.vision_tower(pixels).last_hidden_state
        assert hidden.shape[1] == 16 + prefix_tokens
        torch.testing.assert_close(features, model.model.multi_modal_projector(hidden[:, prefix_tokens:]))
        ids = torch.tensor([[1, 2] + [5] * 16 + [7], [1, 2] + [5] * 16 + [8]])
        assert model(input_ids=ids, pixel_values=pixels).logits.shape == (2, 19, 64)


@pytest.mark.parametrize("config_class", [SiglipVisionConfig, CLIPVisionConfig, Dinov2Config])
def test_inner_vision_layers_are_read_like_transformers_hidden_states(config_class):
    # valign catches hidden states with a hook on the inner encoder it holds (transformers 4.x's return none); the
    # full model returns them itself, and the two must agree, the embeddings (index 0) included
    torch.manual_seed(0)
    full = AutoModel.from_config(config_class(**TINY_VISION | {"num_hidden_layers": 3}))
    encoder = unwrap_vision_encoder(full)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = full(pixels, output_hidden_states=True).hidden_states
        for index in (0, 1, 3, -2, -4):
            torch.testing.assert_close(encoder_hidden_state(encoder, pixels, index), reference[index], msg=str(index))
        with pytest.raises(ValueError, match="out of range for a 3-layer vision encoder"):
            encoder_hidden_state(encoder, pixels, -5)
