"""Standardised vision features (`standardize_vision_features`): calibration, its errors, save/load on both majors."""

from __future__ import annotations

import pytest
import torch
from conftest import CURRENT_PYTHON, other_major_python, shape_image
from scripts.crossload import fixed_batch
from test_cross_version import assert_same_outputs, scores

import valign
from valign import ValignForConditionalGeneration
from valign.export.onnx_runtime import OnnxValign, export_onnx
from valign.train.assembly import calibrate_vision_features

COLOURS = ["red", "green", "blue", "yellow", "black", "teal"]


def calibration_images() -> list:
    return [shape_image(colour, size) for colour in COLOURS for size in ((40, 30), (24, 36))]


@pytest.fixture(scope="module")
def standardized(backbones):
    """The tiny backbones read at their inner layer (1 of 2), standardised with statistics of 12 images."""
    torch.manual_seed(0)
    model, processor = valign.from_backbones(
        *map(str, backbones),
        vision_feature_layer=1,
        standardize_vision_features=True,
        calibration_images=calibration_images(),
    )
    return model.eval(), processor


def test_the_first_projector_layer_reads_standardised_features_of_the_calibration_images(standardized):
    model, processor = standardized
    projector = model.model.multi_modal_projector
    assert (projector.feature_std - 1).abs().max() > 0.1  # the raw features are far from standardised
    read = []
    handle = projector.linear_1.register_forward_pre_hook(lambda module, args: read.append(args[0]))
    with torch.no_grad():
        model.model.get_image_features(
            processor.image_processor(calibration_images(), return_tensors="pt")["pixel_values"]
        )
    handle.remove()
    features = read[0].flatten(0, 1)
    assert features.shape == (12 * model.config.image_seq_length, model.config.vision_config.hidden_size)
    torch.testing.assert_close(features.mean(0), torch.zeros(features.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(features.std(0), torch.ones(features.shape[1]), atol=1e-5, rtol=0)


def test_standardisation_and_calibration_images_go_together(backbones, model_and_processor):
    with pytest.raises(ValueError, match="needs them"):
        valign.from_backbones(*map(str, backbones), standardize_vision_features=True)
    with pytest.raises(ValueError, match="calibration_images go with"):
        valign.from_backbones(*map(str, backbones), calibration_images=calibration_images())
    model, processor = model_and_processor
    pixels = processor.image_processor(calibration_images(), return_tensors="pt")["pixel_values"]
    with pytest.raises(ValueError, match="does not standardize"):
        calibrate_vision_features(model, pixels)


def test_calibration_needs_two_images(standardized):
    model, processor = standardized
    pixels = processor.image_processor(calibration_images()[:1], return_tensors="pt")["pixel_values"]
    before = model.model.multi_modal_projector.feature_std.clone()
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        calibrate_vision_features(model, pixels)
    assert torch.equal(model.model.multi_modal_projector.feature_std, before)


def test_both_majors_load_the_statistics_with_the_checkpoint(standardized, tmp_path):
    model, processor = standardized
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = ValignForConditionalGeneration.from_pretrained(tmp_path).model.multi_modal_projector
    for name in ("feature_mean", "feature_std"):
        assert torch.equal(getattr(loaded, name), getattr(model.model.multi_modal_projector, name)), name
    here = scores(CURRENT_PYTHON, tmp_path, tmp_path, "here")
    assert_same_outputs(scores(other_major_python(), tmp_path, tmp_path, "there"), here)
    batch = fixed_batch(processor)
    with torch.no_grad():
        assert_same_outputs(here, {"logits": model(**batch).logits, **batch})


def test_the_onnx_export_standardises_alike(standardized, tmp_path):
    model, processor = standardized
    model.save_pretrained(tmp_path / "checkpoint")
    processor.save_pretrained(tmp_path / "checkpoint")
    batch = fixed_batch(processor)
    expected = model.generate(**batch, max_new_tokens=8, do_sample=False)
    exported = export_onnx(tmp_path / "checkpoint", tmp_path / "onnx")
    assert torch.equal(OnnxValign(exported).generate(**batch, max_new_tokens=8), expected)
