"""valign on tiny backbones shaped like the real ones (train/backbones.py): DINOv2's and CLIP's resolutions and
CLS tokens, Qwen2.5's and SmolLM2's tokenizers; checkpoints assembled under one transformers major, loaded under
the other."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from conftest import other_major_python, run_script
from safetensors.torch import load_file
from scripts.crossload import CHAT_QUESTIONS, backbone_kwargs, load, report, shape_image
from torch import nn

import valign
from valign import ValignForConditionalGeneration
from valign.train.assembly import resolution_of
from valign.train.backbones import QWEN_ADDITIONAL_SPECIAL_TOKENS, build_tiny_backbones, image_processor_class

TEXTS = ("qwen2.5", "smollm2")
VISIONS = ("siglip", "dinov2", "clip")
COMBOS = [(vision, text) for text in TEXTS for vision in VISIONS]
ENCODERS = {
    "siglip": transformers.SiglipVisionModel,
    "clip": transformers.CLIPVisionModel,
    "dinov2": transformers.Dinov2Model,
    "dinov2-registers": transformers.Dinov2WithRegistersModel,
}
LEADING_TOKENS = {"siglip": 0, "clip": 1, "dinov2": 1, "dinov2-registers": 5}  # CLS (+ 4 registers)


@dataclass
class Assembled:
    vision_dir: Path
    text_dir: Path
    model: ValignForConditionalGeneration
    processor: object


@pytest.fixture(scope="session")
def assemble(tmp_path_factory) -> Callable[..., Assembled]:
    """Build backbones and assemble valign from them in this process, once per distinct request."""
    built: dict[tuple, Assembled] = {}

    def get(vision: str, text: str = "qwen2.5", **overrides) -> Assembled:
        kwargs = {**backbone_kwargs(vision, text), **overrides}
        key = tuple(sorted(kwargs.items()))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{vision}-{text}")
            vision_dir, text_dir = build_tiny_backbones(folder, **kwargs)
            torch.manual_seed(0)
            model, processor = valign.from_backbones(str(vision_dir), str(text_dir))
            built[key] = Assembled(vision_dir, text_dir, model.eval(), processor)
        return built[key]

    return get


def one_image_batch(processor) -> dict:
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHAT_QUESTIONS[0]}]}],
        add_generation_prompt=True,
    )
    return processor(images=[shape_image("red", size=(40, 30))], text=[prompt])  # not square: resized, cropped


def encoder_features(
    assembled: Assembled, vision: str, pixel_values: torch.Tensor, layer: int = -1, **kwargs
) -> torch.Tensor:
    """The encoder's output by another code path: its own class called directly, leading tokens cut by count."""
    encoder = ENCODERS[vision].from_pretrained(assembled.vision_dir).eval()
    with torch.no_grad():
        out = encoder(pixel_values, output_hidden_states=True, **kwargs)
    hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    assert hidden.shape[1] == LEADING_TOKENS[vision] + assembled.model.config.image_seq_length
    return hidden[:, LEADING_TOKENS[vision] :]


def assert_features_are_the_encoders(assembled: Assembled, vision: str, batch: dict, **encoder_kwargs) -> None:
    """valign's image features = the projected encoder output, for the last layer and (hook path) an inner one."""
    pixel_values = batch["pixel_values"]
    with torch.no_grad():
        features = assembled.model(**batch).image_hidden_states
        expected = encoder_features(assembled, vision, pixel_values, **encoder_kwargs)
        torch.testing.assert_close(features, assembled.model.multi_modal_projector(expected))
        inner, _ = valign.from_backbones(str(assembled.vision_dir), str(assembled.text_dir), vision_feature_layer=-2)
        expected = encoder_features(assembled, vision, pixel_values, layer=-2, **encoder_kwargs)
        torch.testing.assert_close(inner.eval().get_image_features(pixel_values), inner.multi_modal_projector(expected))


@pytest.mark.parametrize("vision", ["dinov2", "dinov2-registers"])
def test_dinov2_takes_its_processors_crops_and_gives_the_encoders_patch_tokens(assemble, vision):
    assembled = assemble(vision)
    config = assembled.model.config
    # the folder declares 64 px, its processor crops 32: the processor decides
    assert (config.vision_config.image_size, config.image_size, config.image_seq_length) == (64, 32, (32 // 8) ** 2)
    assert assembled.processor.image_span.count("<|image_pad|>") == 16
    batch = one_image_batch(assembled.processor)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert assembled.model(**batch).logits.shape[:2] == batch["input_ids"].shape
    assert_features_are_the_encoders(assembled, vision, batch)


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_siglip_and_clip_at_another_size_than_their_config_interpolate(assemble, vision):
    assembled = assemble(vision, encoder_image_size=48)
    config = assembled.model.config
    assert (config.vision_config.image_size, config.image_size, config.image_seq_length) == (48, 32, 16)
    batch = one_image_batch(assembled.processor)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert_features_are_the_encoders(assembled, vision, batch, interpolate_pos_encoding=True)
    with pytest.raises((ValueError, RuntimeError)):  # without interpolation the encoder refuses 32 px
        encoder_features(assembled, vision, batch["pixel_values"])


def vision_folder_with_processor(assembled: Assembled, folder: Path, **processor_kwargs) -> str:
    shutil.copytree(assembled.vision_dir, folder)
    image_processor_class("Siglip")(**processor_kwargs).save_pretrained(folder)
    return str(folder)


def test_image_sizes_valign_cannot_use_are_refused_clearly(assemble, tmp_path):
    assembled = assemble("siglip")
    text = str(assembled.text_dir)
    wide = vision_folder_with_processor(assembled, tmp_path / "wide", size={"height": 32, "width": 40})
    with pytest.raises(ValueError, match=r"makes 32×40 images: valign needs square ones"):
        valign.from_backbones(wide, text)
    odd = vision_folder_with_processor(assembled, tmp_path / "odd", size={"height": 36, "width": 36})
    with pytest.raises(ValueError, match="36-px images, not a multiple of the 8-px patches"):
        valign.from_backbones(odd, text)
    # an encoder without position-embedding interpolation can only take its config's size
    rigid = nn.Module()
    rigid.embeddings = nn.Identity()
    larger = image_processor_class("Siglip")(size={"height": 48, "width": 48})
    vision_config = assembled.model.config.vision_config
    with pytest.raises(ValueError, match="makes 48-px images but the siglip_vision_model encoder was trained at 32"):
        resolution_of(larger, rigid, vision_config)
    assert resolution_of(larger, assembled.model.vision_tower, vision_config) == 48  # SigLIP can
    with pytest.raises(ValueError, match="image_size follows the image processor, which makes 32-px images"):
        valign.from_backbones(str(assembled.vision_dir), text, image_size=48)
    naflex = copy.copy(vision_config)
    naflex.num_patches = 256
    with pytest.raises(ValueError, match="NaFlex"):
        resolution_of(larger, assembled.model.vision_tower, naflex)


def test_fixture_tokenizers_look_like_the_real_ones_and_valign_adapts_them(assemble):
    qwen, smol = assemble("siglip", "qwen2.5"), assemble("siglip", "smollm2")
    qwen_tokenizer = transformers.AutoTokenizer.from_pretrained(qwen.text_dir)
    smol_tokenizer = transformers.AutoTokenizer.from_pretrained(smol.text_dir)
    for tokenizer in (qwen_tokenizer, smol_tokenizer):
        assert tokenizer.padding_side == "right"
        assert "You are" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    # Qwen2.5: special tokens after the vocabulary, embeddings wider than the tokenizer; valign reuses its tokens
    assert set(QWEN_ADDITIONAL_SPECIAL_TOKENS) <= set(qwen_tokenizer.all_special_tokens)
    ids = qwen_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"])
    assert ids == [len(qwen_tokenizer) - 16 + i for i in (0, 1, 2, 12)]
    assert qwen.model.config.image_token_id == ids[3]
    rows = qwen.model.get_input_embeddings().num_embeddings
    assert rows == qwen.model.config.text_config.vocab_size > len(qwen_tokenizer) and rows % 64 == 0
    assert qwen.processor.image_span == "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>"
    # SmolLM2: no image token, pad = eos; valign adds one, the embeddings grow by one row
    assert "<|image_pad|>" not in smol_tokenizer.get_vocab()
    assert smol_tokenizer.pad_token == smol_tokenizer.eos_token == "<|im_end|>"
    assert smol.model.config.image_token_id == len(smol_tokenizer)
    assert smol.model.get_input_embeddings().num_embeddings == len(smol_tokenizer) + 1
    assert smol.processor.image_span == "<|image_pad|>" * 16
    for assembled in (qwen, smol):
        assert assembled.processor.tokenizer.padding_side == "left"


# ---- across transformers majors ------------------------------------------------------------------------------


def name(vision: str, text: str) -> str:
    return f"{text}-{vision}"


@pytest.fixture(scope="session")
def reports(assemble, tmp_path_factory) -> dict[tuple[str, str, str], tuple[Path, Path]]:
    """(vision, text, saved by) -> (report of the assembled model, report of its checkpoint loaded by the other
    major). One process of the other major builds its checkpoints and loads all of this major's."""
    root = tmp_path_factory.mktemp("real-shapes")
    spec: dict[str, list] = {"build": [], "load": []}
    pairs = {}
    for vision, text in COMBOS:
        here, there = root / f"{name(vision, text)}-here", root / f"{name(vision, text)}-there"
        assembled = assemble(vision, text)
        assembled.model.save_pretrained(here)
        assembled.processor.save_pretrained(here)
        report(assembled.model, assembled.processor, str(here) + "-reference")
        spec["load"].append([str(here), str(here) + "-loaded"])
        spec["build"].append([str(there), vision, text, str(there) + "-reference"])
        pairs[vision, text, "this major"] = (Path(str(here) + "-reference"), Path(str(here) + "-loaded"))
        pairs[vision, text, "other major"] = (Path(str(there) + "-reference"), Path(str(there) + "-loaded"))
    (root / "spec.json").write_text(json.dumps(spec))
    run_script(other_major_python(), "real-shapes", str(root / "spec.json"))
    for vision, text in COMBOS:
        there = root / f"{name(vision, text)}-there"
        report(*load(str(there)), str(there) + "-loaded")
    return pairs


def read(stem: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(f"{stem}.safetensors"), json.loads(Path(f"{stem}.json").read_text())


@pytest.mark.parametrize("saved_by", ["this major", "other major"])
@pytest.mark.parametrize(("vision", "text"), COMBOS, ids=[name(*combo) for combo in COMBOS])
def test_checkpoint_loads_under_the_other_major_with_identical_outputs(reports, vision, text, saved_by):
    (reference, ref_info), (loaded, info) = map(read, reports[vision, text, saved_by])
    assert info["padding_side"] == "left"
    assert info["prompts"] == ref_info["prompts"]
    assert not any("You are" in prompt for prompt in info["prompts"])  # valign's template, not the tokenizer's
    assert info["special_tokens"] == ref_info["special_tokens"]
    for key in ("input_ids", "attention_mask", "pixel_values", "batched"):
        torch.testing.assert_close(loaded[key], reference[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(loaded["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
    mask = loaded["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # the shorter prompt is padded on the left
    for report_tensors, report_info in ((reference, ref_info), (loaded, info)):
        for row, alone in zip(report_tensors["batched"].tolist(), report_info["single"]):
            assert row[: len(alone)] == alone  # batched (left-padded) generation = one prompt at a time
            assert all(token == report_info["pad_token_id"] for token in row[len(alone) :])
