"""ValignProcessor: image processor + tokenizer + chat template, served as Hub remote code.

Each image placeholder (`image_token`) in the text becomes `image_seq_length` image tokens, optionally wrapped in
vision start/end tokens. Chat messages render through a ChatML template whose assistant turns are marked with
`{% generation %}`, so assistant-only losses (TRL's `assistant_only_loss`) find the answer tokens.

valign's template adds no system prompt when none is given (Qwen2.5's own template injects "You are Qwen,
created by Alibaba Cloud..."): the training data carries no system turn, an implicit one would cost ~20 tokens
per sample and would claim an identity the model does not have. Pass a system message to get one.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .configuration_valign import PROCESSOR_NAMES_ATTRIBUTE_CLASSES, portable_tokenizer_config

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set content.text = content.text + '<IMAGE>' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set content.text = content.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = content.text -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def default_chat_template(image_token: str) -> str:
    return CHAT_TEMPLATE.replace("<IMAGE>", image_token)


def load_image(image: Any) -> Any:
    """Open a path or bytes as an RGB PIL image; pass PIL images and arrays through. Unreadable files raise."""
    if isinstance(image, (str, os.PathLike, bytes)):
        source = io.BytesIO(image) if isinstance(image, bytes) else image
        name = "<bytes>" if isinstance(image, bytes) else image
        try:
            with Image.open(source) as opened:
                return opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read image {name}: {error}") from error
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return image


def images_per_sample(images: Any, num_texts: int) -> list[list[Any]]:
    """Normalise `images` (None, one image, a flat list, or one list per text) to one list per text."""
    if images is None:
        return [[] for _ in range(num_texts)]
    if not isinstance(images, (list, tuple)):
        images = [images]
    if images and all(isinstance(item, (list, tuple)) for item in images):
        return [list(item) for item in images]
    return [list(images)] if num_texts == 1 else [[image] for image in images]


class ValignProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor: the vision encoder's image processor (resize, rescale, normalise).
        tokenizer: the language model's tokenizer; it must know `image_token` as one token.
        chat_template (`str`, *optional*): defaults to valign's ChatML template with generation markers.
        image_seq_length (`int`): image tokens per image (the vision encoder's patch count).
        image_token (`str`): the placeholder, one per image, expanded to `image_seq_length` copies.
        vision_start_token / vision_end_token (`str`, *optional*): tokens wrapped around each image's span.
    """

    attributes = ["image_processor", "tokenizer"]
    if PROCESSOR_NAMES_ATTRIBUTE_CLASSES:
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_seq_length: int = 256,
        image_token: str = "<|image_pad|>",
        vision_start_token: str | None = None,
        vision_end_token: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.image_seq_length = image_seq_length
        self.image_token = image_token
        self.vision_start_token = vision_start_token
        self.vision_end_token = vision_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if tokenizer is not None else None
        if tokenizer is not None:
            # Batched generation is only right with left padding, whatever the language model's tokenizer says.
            tokenizer.padding_side = "left"
        super().__init__(image_processor, tokenizer, chat_template=chat_template or default_chat_template(image_token))

    @property
    def image_span(self) -> str:
        """The text one image placeholder expands to."""
        inner = self.image_token * self.image_seq_length
        return f"{self.vision_start_token or ''}{inner}{self.vision_end_token or ''}"

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        padding: bool | str = True,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        return_offsets_mapping: bool = False,
        return_text_replacement_offsets: bool = False,
        pad_to_multiple_of: int | None = None,
        videos: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize `text` with each image placeholder expanded, and preprocess `images` (PIL images, paths or
        bytes; one flat list, or one list per text). Remaining keyword arguments go to the image processor.

        `return_offsets_mapping` gives character offsets in the text as passed in (not the expanded text; all
        tokens of an image span point at its placeholder), so chat-template assistant masks line up under both
        transformers majors; `text_replacement_offsets` is then empty, since nothing is left to correct. The
        offsets are lists of `(start, end)` pairs, one list per text, whatever `return_tensors` is.
        """
        if videos is not None or audio is not None:
            raise ValueError("valign reads images and text only; videos and audio are not supported")
        if text is None:
            raise ValueError("text is required: put one image placeholder per image in it, or use apply_chat_template")
        texts = [text] if isinstance(text, str) else list(text)
        per_sample = images_per_sample(images, len(texts))
        self._check_placeholders(texts, per_sample)

        encoded = self.tokenizer(
            [t.replace(self.image_token, self.image_span) for t in texts],
            add_special_tokens=kwargs.pop("add_special_tokens", False),
            return_attention_mask=False,
            return_token_type_ids=False,
            return_offsets_mapping=return_offsets_mapping,
        )
        rows = [self._kept_slice(row, max_length if truncation else None) for row in encoded["input_ids"]]
        padding_side = kwargs.pop("padding_side", None) or self.tokenizer.padding_side
        data = dict(
            self.tokenizer.pad(
                {"input_ids": [ids[kept] for ids, kept in zip(encoded["input_ids"], rows)]},
                padding=padding,
                max_length=max_length if padding == "max_length" else None,  # rows were cut to it above
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_tensors=return_tensors,
            )
        )
        if return_offsets_mapping:
            width = len(data["input_ids"][0])
            offsets = [self._original_offsets(t, o[kept]) for t, o, kept in zip(texts, encoded["offset_mapping"], rows)]
            offset_mapping = [pad_offsets(o, width, padding_side) for o in offsets]
        if return_text_replacement_offsets:
            data["text_replacement_offsets"] = [[] for _ in texts]
        flat_images = [load_image(image) for sample in per_sample for image in sample]
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors=return_tensors, **kwargs)[
                "pixel_values"
            ]
        batch = BatchFeature(data=data, tensor_type=return_tensors)
        if return_offsets_mapping:
            # Python (start, end) pairs, not a tensor: transformers' assistant-mask code walks them token by token,
            # which costs ~50× more over tensor elements (it converts the masks to tensors itself afterwards).
            batch["offset_mapping"] = offset_mapping
        return batch

    def _check_placeholders(self, texts: list[str], per_sample: list[list[Any]]) -> None:
        if len(per_sample) != len(texts):
            raise ValueError(f"got {len(per_sample)} lists of images for {len(texts)} texts")
        for index, (text, images) in enumerate(zip(texts, per_sample)):
            placeholders = text.count(self.image_token)
            if placeholders != len(images):
                raise ValueError(
                    f"text {index} has {placeholders} image placeholder(s) ({self.image_token!r}) "
                    f"but {len(images)} image(s) were given for it"
                )

    def _kept_slice(self, row: list[int], max_length: int | None) -> slice:
        """The part of a row that fits `max_length`, cut on the tokenizer's truncation side, never into an image."""
        if max_length is None or len(row) <= max_length:
            return slice(None)
        left = self.tokenizer.truncation_side == "left"
        kept = slice(len(row) - max_length, None) if left else slice(0, max_length)
        removed = row[: kept.start] if left else row[kept.stop :]
        if self.image_token_id in removed:
            raise ValueError(
                f"a sequence of {len(row)} tokens does not fit max_length={max_length} without cutting into an "
                f"image span ({self.image_seq_length} tokens per image): raise max_length or shorten the text"
            )
        return kept

    def _original_offsets(self, text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Map token offsets in the expanded text back to `text`; an image span's tokens map to its placeholder."""
        points = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        starts = np.array([m.start() for m in re.finditer(re.escape(self.image_token), text)], dtype=np.int64)
        if len(starts) == 0:
            return [tuple(pair) for pair in points.tolist()]
        gained = len(self.image_span) - len(self.image_token)  # characters each expansion adds
        expanded_starts = starts + gained * np.arange(len(starts))
        spans_before = np.searchsorted(expanded_starts, points[:, 0], side="right")
        last = np.maximum(spans_before - 1, 0)
        inside = (spans_before > 0) & (points[:, 0] < expanded_starts[last] + len(self.image_span))
        placeholder = np.stack([starts[last], starts[last] + len(self.image_token)], axis=1)
        mapped = np.where(inside[:, None], placeholder, points - gained * spans_before[:, None])
        return [tuple(pair) for pair in mapped.tolist()]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any):
        saved = super().save_pretrained(save_directory, **kwargs)
        path = Path(save_directory) / "tokenizer_config.json"
        if path.exists():
            config = {**portable_tokenizer_config(json.loads(path.read_text())), "padding_side": "left"}
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return saved


def pad_offsets(offsets: list[tuple[int, int]], width: int, side: str) -> list[tuple[int, int]]:
    """Pad offsets like the ids they describe; (0, 0) is the zero-width span of a padding token."""
    fill = [(0, 0)] * (width - len(offsets))
    return fill + offsets if side == "left" else offsets + fill


ValignProcessor.register_for_auto_class()

__all__ = ["ValignProcessor"]
