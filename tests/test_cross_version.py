"""Fresh-process loading as Hub remote code, on this transformers major and the other one (4.57 <-> 5.x)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CURRENT_PYTHON, other_major_python, run_script
from safetensors.torch import load_file
from scripts.crossload import fixed_batch

from valign import ValignForConditionalGeneration


def scores(python, folder: Path, tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{name}.safetensors"
    run_script(python, "score", str(folder), str(out))
    return load_file(out)


def assert_same_outputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in ("input_ids", "attention_mask", "pixel_values"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(a["logits"], b["logits"], rtol=1e-5, atol=1e-5)


def test_fresh_process_on_this_major_reproduces_in_memory_logits(model_and_processor, checkpoint, tmp_path):
    model, processor = model_and_processor
    loaded = scores(CURRENT_PYTHON, checkpoint, tmp_path, "here")
    batch = fixed_batch(processor)
    with torch.no_grad():
        expected = {"logits": model(**batch).logits, **batch}
    assert_same_outputs(loaded, expected)


def test_other_major_loads_this_majors_checkpoint_identically(checkpoint, tmp_path):
    assert_same_outputs(
        scores(other_major_python(), checkpoint, tmp_path, "other"),
        scores(CURRENT_PYTHON, checkpoint, tmp_path, "here"),
    )


def test_this_major_loads_the_other_majors_checkpoint_identically(tmp_path):
    folder = tmp_path / "saved-by-other-major"
    run_script(other_major_python(), "build", str(folder))
    there = scores(other_major_python(), folder, tmp_path, "there")
    here = scores(CURRENT_PYTHON, folder, tmp_path, "here")
    assert_same_outputs(here, there)


def test_an_inner_vision_layer_reads_the_same_on_both_majors(checkpoint, model_and_processor, tmp_path):
    # transformers 4.x's inner SigLIP returns no hidden states, so vision_feature_layer=-2 once failed there
    model, processor = model_and_processor
    folder = tmp_path / "layer-minus-2"
    ValignForConditionalGeneration.from_pretrained(checkpoint, vision_feature_layer=-2).save_pretrained(folder)
    processor.save_pretrained(folder)
    here = scores(CURRENT_PYTHON, folder, tmp_path, "here")
    assert_same_outputs(scores(other_major_python(), folder, tmp_path, "there"), here)
    with torch.no_grad():
        last_layer = model(**fixed_batch(processor)).logits
    assert (here["logits"] - last_layer).abs().max() > 1e-3  # the setting took effect


def generated(python, folder: Path, tmp_path: Path, command: str, name: str):
    out = tmp_path / f"{name}.json"
    run_script(python, command, str(folder), str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("major", ["this", "other"])
def test_pipeline_answers_chat_input_single_and_batched(checkpoint, model_and_processor, tmp_path, major):
    _, processor = model_and_processor
    python = CURRENT_PYTHON if major == "this" else other_major_python()
    tokens = generated(python, checkpoint, tmp_path, "generate", "tokens")
    answers = generated(python, checkpoint, tmp_path, "pipeline", "answers")
    expected = processor.batch_decode(tokens, skip_special_tokens=True)
    assert answers["batched"] == expected
    assert answers["single"] == expected[0]
    assert len(set(expected)) == 2  # different images and questions give different answers


def test_generation_agrees_across_majors(checkpoint, tmp_path):
    here = generated(CURRENT_PYTHON, checkpoint, tmp_path, "generate", "here")
    there = generated(other_major_python(), checkpoint, tmp_path, "generate", "there")
    assert here == there
