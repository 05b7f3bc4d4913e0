"""Image-token compression (`ValignConfig.pixel_shuffle_factor`): space-to-depth before the projector."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CURRENT_PYTHON, other_major_python, prompts, shape_image
from scripts.crossload import fixed_batch
from test_attention import reference_allowed
from test_cross_version import assert_same_outputs, scores
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

import valign
from valign import ValignConfig, ValignForConditionalGeneration, ValignProcessor
from valign.modeling_valign import build_attention_mask, pixel_shuffle

# The tiny backbones: 32-px images, 8-px patches, a 4×4 grid of 32-wide patch features, a 64-wide language model.
GRID, VISION_WIDTH, TEXT_WIDTH = 4, 32, 64


@pytest.fixture(scope="module")
def assembled(backbones):
    """`factor -> (model, processor)` from the tiny backbones, each with the same seed."""
    built = {}
    for factor in (1, 2, 4):
        torch.manual_seed(0)
        model, processor = valign.from_backbones(*map(str, backbones), pixel_shuffle_factor=factor)
        built[factor] = model.eval(), processor
    return built


def two_image_batch(processor):
    """Two rows of different lengths (left padding), each with two images and text between them."""
    texts = ["<|im_start|>user\n<|image_pad|>left<|image_pad|>right<|im_end|>", "<|image_pad|><|image_pad|> a"]
    images = [[shape_image("red"), shape_image("blue")], [shape_image("green"), shape_image("teal")]]
    return processor(images=images, text=texts)


def test_pixel_shuffle_is_idefics3s_space_to_depth():
    patches = torch.randn(2, 64, 5)
    for factor in (2, 4, 8):
        expected = Idefics3Connector.pixel_shuffle(None, patches, scale_factor=factor)
        assert torch.equal(pixel_shuffle(patches, factor), expected)
    # token (r, s) of the 4×4 result holds patches (2r + i, 2s + j) of the 8×8 grid, i then j
    out = pixel_shuffle(patches, 2)
    grid = patches.reshape(2, 8, 8, 5)
    assert torch.equal(out[:, 1 * 4 + 3], torch.cat([grid[:, 2, 6], grid[:, 2, 7], grid[:, 3, 6], grid[:, 3, 7]], -1))
    assert pixel_shuffle(patches, 1) is patches


@pytest.mark.parametrize("factor, tokens", [(1, 256), (2, 64), (4, 16)])
def test_token_count_at_the_paper_shape(factor, tokens):
    config = ValignConfig(pixel_shuffle_factor=factor)  # SigLIP 224 px / 14 px = a 16×16 grid
    assert config.image_seq_length == tokens
    with torch.device("meta"):
        model = ValignForConditionalGeneration(config)
    assert model.multi_modal_projector.linear_1.in_features == 1152 * factor**2


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_shapes_and_token_counts_follow_the_factor(assembled, factor):
    model, processor = assembled[factor]
    tokens = (GRID // factor) ** 2
    assert model.config.image_seq_length == processor.image_seq_length == tokens
    assert processor.image_span.count("<|image_pad|>") == tokens
    assert model.multi_modal_projector.linear_1.in_features == VISION_WIDTH * factor**2
    batch = two_image_batch(processor)
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 4 * tokens
    with torch.no_grad():
        features = model.get_image_features(batch["pixel_values"])
        output = model(**batch)
    assert features.shape == (4, tokens, TEXT_WIDTH)
    assert output.image_hidden_states.shape == (4, tokens, TEXT_WIDTH)
    assert output.logits.shape[:2] == batch["input_ids"].shape


def test_factor_one_is_the_model_before_compression(assembled):
    model, processor = assembled[1]
    pixels = two_image_batch(processor)["pixel_values"]
    with torch.no_grad():
        before = model.multi_modal_projector(
            model.vision_tower(pixels).last_hidden_state[:, -model.config.image_seq_length :]
        )
        assert torch.equal(model.get_image_features(pixels), before)


def test_compressed_features_are_the_shuffled_patches(assembled):
    model, processor = assembled[2]
    pixels = two_image_batch(processor)["pixel_values"]
    with torch.no_grad():
        patches = model.vision_tower(pixels).last_hidden_state
        expected = model.multi_modal_projector(Idefics3Connector.pixel_shuffle(None, patches, scale_factor=2))
        torch.testing.assert_close(model.get_image_features(pixels), expected, rtol=0, atol=0)


def test_hybrid_mask_makes_each_compressed_image_one_block(assembled):
    model, processor = assembled[2]
    batch = two_image_batch(processor)
    image_mask = batch["input_ids"] == model.config.image_token_id
    mask = model.model.attention_mask_for(image_mask, batch["attention_mask"])
    for row in range(2):
        padding, is_image = batch["attention_mask"][row].tolist(), image_mask[row].tolist()
        expected = reference_allowed(padding, is_image, "hybrid", per_image=4)
        assert torch.equal(mask[row, 0] == 0, expected)
        # the 4 tokens of each image see each other both ways, and never the other image's later tokens
        first, second = [i for i, flag in enumerate(is_image) if flag][:4], [i for i, f in enumerate(is_image) if f][4:]
        assert expected[first[0], first[-1]] and expected[second[0], second[-1]]
        assert not expected[first[-1], second[0]] and expected[second[0], first[-1]]


def test_adjacent_compressed_images_stay_apart():
    # 8 consecutive image tokens at 4 per image are two images: keyed by image_seq_length, not by contiguity
    mask = build_attention_mask(None, torch.ones(1, 8, dtype=torch.bool), "hybrid", 0, 4, torch.float32)
    allowed = mask[0, 0] == 0
    assert allowed[:4, :4].all() and allowed[4:, 4:].all() and allowed[4:, :4].all()
    assert not allowed[:4, 4:].any()


@pytest.fixture(scope="module")
def saved_factor_2(assembled, tmp_path_factory):
    folder = tmp_path_factory.mktemp("factor-2")
    model, processor = assembled[2]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_save_and_load_keep_the_factor_and_the_outputs(assembled, saved_factor_2):
    model, _ = assembled[2]
    assert json.loads((saved_factor_2 / "config.json").read_text())["pixel_shuffle_factor"] == 2
    loaded = ValignForConditionalGeneration.from_pretrained(saved_factor_2).eval()
    loaded_processor = ValignProcessor.from_pretrained(saved_factor_2)
    assert loaded.config.image_seq_length == loaded_processor.image_seq_length == 4
    batch = loaded_processor(images=[shape_image("red")], text=prompts(loaded_processor, ["Describe the image."]))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_both_majors_load_a_compressed_checkpoint_identically(assembled, saved_factor_2, tmp_path):
    model, processor = assembled[2]
    here = scores(CURRENT_PYTHON, saved_factor_2, tmp_path, "here")
    assert_same_outputs(scores(other_major_python(), saved_factor_2, tmp_path, "there"), here)
    batch = fixed_batch(processor)
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 2 * 4
    with torch.no_grad():
        assert_same_outputs(here, {"logits": model(**batch).logits, **batch})


@pytest.mark.parametrize("factor", [3, 0, 8])
def test_a_factor_that_does_not_divide_the_grid_is_refused(backbones, factor):
    with pytest.raises(ValueError, match=rf"dividing the 4×4 patch grid .*got {factor}"):
        valign.from_backbones(*map(str, backbones), pixel_shuffle_factor=factor)


def test_a_checkpoint_edited_to_a_wrong_factor_is_refused_at_load(saved_factor_2, tmp_path):
    folder = tmp_path / "edited"
    folder.mkdir()
    for file in saved_factor_2.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pixel_shuffle_factor": 3}))
    with pytest.raises(ValueError, match=r"dividing the 4×4 patch grid \(32-px images, 8-px patches\), got 3"):
        ValignForConditionalGeneration.from_pretrained(folder)


def test_a_processor_made_for_another_factor_is_refused(assembled):
    model, _ = assembled[2]
    _, uncompressed = assembled[1]
    batch = uncompressed(images=[shape_image("red")], text=prompts(uncompressed, ["Describe the image."]))
    with pytest.raises(ValueError, match=r"1 image\(s\) need 4 image tokens \(4 each\), but input_ids hold 16"):
        model(**batch)
