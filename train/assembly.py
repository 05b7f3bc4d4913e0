"""Assembling a valign model from pretrained backbones: `valign.from_backbones(vision, text)`.

This is package code, not remote code: a Hub checkpoint already holds an assembled model, so Hub users never
download it. Importing it stays light (`import valign` exports `from_backbones`): no `datasets`, `peft` or `trl`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ..checkpoint import save_checkpoint
from ..configuration_valign import ValignConfig
from ..hub.card import write_model_card
from ..modeling_valign import ValignForConditionalGeneration, unwrap_vision_encoder
from ..processing_valign import ValignProcessor
from .distributed import is_main_process, wait_for_everyone


def prepare_tokenizer(tokenizer, image_token: str):
    """Make a language model's tokenizer ready for valign: image and ChatML tokens and a pad token."""
    missing = [t for t in (image_token, "<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer


def resolution_of(image_processor, encoder: nn.Module, vision_config) -> int:
    """The side of the square images `image_processor` makes, checked against what `encoder` can take.

    The processor decides, not the encoder's config: DINOv2 folders declare 518 px but crop 224. An encoder fed
    another size than its config's must interpolate its position embeddings (SigLIP, CLIP and DINOv2 can).
    """
    from PIL import Image

    if getattr(vision_config, "num_patches", None):
        raise ValueError("patch-sequence (NaFlex) encoders are not supported: use a fixed-resolution checkpoint")
    probe = Image.new("RGB", (3 * vision_config.patch_size * 7, 2 * vision_config.patch_size * 7))  # 3:2, any size
    height, width = image_processor(probe, return_tensors="pt")["pixel_values"].shape[-2:]
    if height != width:
        raise ValueError(f"the image processor makes {height}×{width} images: valign needs square ones")
    if height % vision_config.patch_size:
        raise ValueError(
            f"the image processor makes {height}-px images, not a multiple of the {vision_config.patch_size}-px patches"
        )
    embeddings = getattr(unwrap_vision_encoder(encoder), "embeddings", None)
    if height != vision_config.image_size and not hasattr(embeddings, "interpolate_pos_encoding"):
        raise ValueError(
            f"the image processor makes {height}-px images but the {vision_config.model_type} encoder was trained at "
            f"{vision_config.image_size} px and cannot interpolate its position embeddings"
        )
    return int(height)


def from_backbones(
    vision: str = "google/siglip-so400m-patch14-224",
    text: str = "Qwen/Qwen2.5-0.5B-Instruct",
    *,
    gguf_file: str | None = None,
    image_token: str = "<|image_pad|>",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    calibration_images: Sequence[Any] | None = None,
    **config_kwargs,
) -> tuple[ValignForConditionalGeneration, ValignProcessor]:
    """Assemble a valign model and its processor from a pretrained vision encoder and language model.

    `vision` and `text` are Hub ids or local folders; `gguf_file` loads the language model from a GGUF file
    in `text`. The projector is freshly initialised. The tokenizer's image token is reused when it has one
    (Qwen2.5 has `<|image_pad|>`), else it is added, with ChatML tokens where missing, and the embeddings
    grow to match. `config_kwargs` go to `ValignConfig` (attn_mode, projector_hidden_size,
    pixel_shuffle_factor, ...); the processor's image span follows the config's `image_seq_length`.
    `calibration_images` (PIL images, a few hundred like the training data's) are what
    `standardize_vision_features=True` estimates its statistics from; it needs them, and nothing else uses them.

    Returns:
        `(model, processor)`.
    """
    if config_kwargs.get("standardize_vision_features", False) != (calibration_images is not None):
        raise ValueError("calibration_images go with standardize_vision_features=True, and it needs them")
    vision_config = AutoConfig.from_pretrained(vision)
    vision_config = getattr(vision_config, "vision_config", vision_config)  # dual encoders: the image half
    if hasattr(vision_config, "vision_use_head"):
        vision_config.vision_use_head = False  # SigLIP's pooling head is unused: keep its weights out
    encoder = AutoModel.from_pretrained(
        vision, config=vision_config, dtype=dtype, attn_implementation=attn_implementation
    )
    image_processor = AutoImageProcessor.from_pretrained(vision)
    image_size = resolution_of(image_processor, encoder, vision_config)
    if config_kwargs.pop("image_size", image_size) != image_size:
        raise ValueError(
            f"image_size follows the image processor, which makes {image_size}-px images: "
            "change the processor's size (and crop) instead"
        )
    lm = AutoModelForCausalLM.from_pretrained(
        text, gguf_file=gguf_file, dtype=dtype, attn_implementation=attn_implementation
    )
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(text, gguf_file=gguf_file), image_token)

    config = ValignConfig(
        vision_config=vision_config,
        text_config=lm.config,
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        image_size=image_size,
        **config_kwargs,
    )
    model = ValignForConditionalGeneration(config)
    model.model.vision_tower = unwrap_vision_encoder(encoder)
    model.model.language_model = lm.get_decoder()
    model.lm_head = lm.get_output_embeddings()
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(dtype or lm.dtype)

    vision_start, vision_end = "<|vision_start|>", "<|vision_end|>"
    has_wrap = all(token in tokenizer.get_vocab() for token in (vision_start, vision_end))
    processor = ValignProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
        image_token=image_token,
        vision_start_token=vision_start if has_wrap else None,
        vision_end_token=vision_end if has_wrap else None,
    )
    if calibration_images is not None:
        calibrate_vision_features(model, image_processor(list(calibration_images), return_tensors="pt")["pixel_values"])
    return model, processor


@torch.no_grad()
def calibrate_vision_features(
    model: ValignForConditionalGeneration, pixel_values: torch.Tensor, batch_size: int = 64
) -> None:
    """Set the statistics `standardize_vision_features` uses: each dimension's mean and standard deviation over
    every image token of `pixel_values` (images as the processor makes them)."""
    projector = model.model.multi_modal_projector
    if not projector.standardize:
        raise ValueError("the model does not standardize its vision features (standardize_vision_features=False)")
    if len(pixel_values) < 2:
        raise ValueError(f"calibration needs at least 2 images, got {len(pixel_values)}")
    was_training = model.training
    model.eval()
    try:
        chunks = pixel_values.to(model.device).split(batch_size)
        features = torch.cat([model.model.get_vision_features(chunk).flatten(0, 1).float() for chunk in chunks])
    finally:
        model.train(was_training)
    std = features.std(0)
    projector.feature_mean.copy_(features.mean(0))
    # a dimension (nearly) constant over these images must not blow up on others
    projector.feature_std.copy_(std.clamp_min(0.01 * std.median()))


def assemble_init(vision: str, text: str, gguf_file: str | None, folder: Path) -> Path:
    """A stage-0 starting checkpoint from pretrained backbones (fresh projector), made once across processes."""
    if is_main_process():
        model, processor = from_backbones(vision, text, gguf_file=gguf_file)
        save_checkpoint(model, processor, folder)
        write_model_card(folder, base_models=[vision, text], summary="Assembled from its backbones; not trained yet.")
    wait_for_everyone()
    return folder
