"""ValignProcessor: placeholder expansion, chat template, padding and truncation, bad input."""

from __future__ import annotations

import builtins

import pytest
import torch
from conftest import chat, prompts, shape_image

from valign.checkpoint import load_checkpoint


def test_each_placeholder_becomes_one_wrapped_image_span(model_and_processor):
    model, processor = model_and_processor
    text = "first <|image_pad|> then <|image_pad|> end"
    batch = processor(images=[shape_image("red"), shape_image("blue")], text=text)
    ids = batch["input_ids"][0].tolist()
    vocab = processor.tokenizer.get_vocab()
    assert ids.count(model.config.image_token_id) == 2 * processor.image_seq_length == 32
    assert ids.count(vocab["<|vision_start|>"]) == ids.count(vocab["<|vision_end|>"]) == 2
    start = ids.index(vocab["<|vision_start|>"])
    assert ids[start + 1 : start + 17] == [model.config.image_token_id] * 16
    assert ids[start + 17] == vocab["<|vision_end|>"]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert "token_type_ids" not in batch


def test_batches_are_left_padded(model_and_processor):
    _, processor = model_and_processor
    batch = processor(
        images=[shape_image("red"), shape_image("blue")], text=prompts(processor, ["A.", "A much longer."])
    )
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert (batch["input_ids"][0][mask[0] == 0] == processor.tokenizer.pad_token_id).all()


def test_chat_template_has_no_default_system_prompt_and_marks_answers(model_and_processor):
    _, processor = model_and_processor
    conversation = [*chat("What shape?"), {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}]
    text = processor.apply_chat_template(conversation)
    assert text == "<|im_start|>user\n<|image_pad|>What shape?<|im_end|>\n<|im_start|>assistant\ncircle<|im_end|>\n"
    with_system = processor.apply_chat_template([{"role": "system", "content": "Be brief."}, *conversation])
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    with_image = [*chat("What shape?", shape_image("red")), conversation[1]]  # as the collator passes it
    out = processor.apply_chat_template(with_image, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, answer_mask = torch.as_tensor(out["input_ids"]).flatten(), torch.as_tensor(out["assistant_masks"]).flatten()
    assert processor.tokenizer.decode(ids[answer_mask.bool()]) == "circle<|im_end|>"


def test_placeholder_and_image_counts_must_agree(model_and_processor):
    _, processor = model_and_processor
    with pytest.raises(ValueError, match=r"text 0 has 1 image placeholder\(s\) .* but 2 image\(s\)"):
        processor(images=[shape_image("red"), shape_image("blue")], text="look <|image_pad|>")
    with pytest.raises(ValueError, match=r"has 1 image placeholder\(s\) .* but 0 image\(s\)"):
        processor(text="look <|image_pad|>")
    with pytest.raises(ValueError, match=r"text 1 has 0 image placeholder\(s\)"):
        processor(images=[[shape_image("red")], [shape_image("blue")]], text=["a <|image_pad|>", "b"])


def test_corrupted_image_file_raises_naming_it(model_and_processor, tmp_path):
    _, processor = model_and_processor
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        processor(images=[str(broken)], text="<|image_pad|>")


def test_images_from_paths_equal_images_in_memory(model_and_processor, tmp_path):
    _, processor = model_and_processor
    image = shape_image("red")
    image.save(tmp_path / "red.png")
    from_path = processor(images=[str(tmp_path / "red.png")], text="<|image_pad|>")
    in_memory = processor(images=[image], text="<|image_pad|>")
    torch.testing.assert_close(from_path["pixel_values"], in_memory["pixel_values"])


def test_truncation_never_cuts_into_an_image_span(model_and_processor):
    model, processor = model_and_processor
    text = "<|image_pad|>" + " a red circle" * 10
    full = processor(images=[shape_image("red")], text=text)["input_ids"]
    cut = processor(images=[shape_image("red")], text=text, truncation=True, max_length=25)["input_ids"]
    assert cut.shape[1] == 25 and cut[0].tolist() == full[0, :25].tolist()
    assert (cut == model.config.image_token_id).sum() == 16
    with pytest.raises(ValueError, match="without cutting into an image span"):
        processor(images=[shape_image("red")], text=text, truncation=True, max_length=10)


def test_loading_a_checkpoint_by_the_installed_classes_never_asks_to_run_its_code(checkpoint, monkeypatch):
    """transformers 5.25 loads a processor's tokenizer through AutoTokenizer, which saw valign's `auto_map` and asked
    "Do you wish to run the custom code? [y/N]" at every load, on stdout (into `valign caption --json`'s output)."""
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "n")
    _, processor = load_checkpoint(checkpoint)
    _, remote = load_checkpoint(checkpoint, trust_remote_code=True)  # what a Hub user who opts in gets
    assert asked == []
    text = "<|im_start|>user\nDescribe the image.<|im_end|>"
    assert processor.tokenizer(text)["input_ids"] == remote.tokenizer(text)["input_ids"]
    assert type(processor.tokenizer).__name__ == type(remote.tokenizer).__name__
