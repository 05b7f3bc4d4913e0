"""ValignProcessor: image processor + tokenizer + chat template, served as Hub remote code.

Each image placeholder (`image_token`) in the text becomes `image_seq_length` image tokens, optionally wrapped in
vision start/end tokens. Chat messages render through a ChatML template whose assistant turns are marked with
`{% generation %}`, so assistant-only losses (TRL's `assistant_only_loss`) find the answer tokens.

valign's template adds no system prompt when none is given (Qwen2.5's own template injects "You are Qwen,
created by Alibaba Cloud..."): the training data carries no system turn, an implicit one would cost ~20 tokens
per sample and would claim an identity the model does not have. Pass a system message to get one.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, ImageProcessingMixin
from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name
from transformers.models.auto.tokenization_auto import get_tokenizer_config, tokenizer_class_from_name
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


class ImageError(ValueError):
    """An image valign cannot use (unreadable, too large, non-finite values); the message names it and says why."""


WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # more than 8 bits per pixel: scaled to 8 by wide_to_8bit
TRANSPARENT_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
WHITE = (255, 255, 255)


def load_image(image: Any) -> Any:
    """The one image decoder of valign: training, evaluation, the `valign` command, the app, the pipeline and the
    endpoint handler all read images here.

    A path, bytes or PIL image becomes an RGB PIL image: EXIF orientation applied (as transformers' `load_image`),
    more than 8 bits per channel scaled to 8 (`wide_to_8bit`), transparency composited on white. A string may also
    be what transformers' processors take (chat messages carry these): an http(s) URL, fetched within
    `URL_TIMEOUT_SECONDS` and `MAX_IMAGE_BYTES`, a `data:image/...;base64,` URI or bare base64. Images over PIL's
    `Image.MAX_IMAGE_PIXELS` (default 89,478,485 ≈ 9459², far beyond any encoder's input; set it to change the
    limit) are refused from their header, before decoding. Arrays and tensors pass through to the image processor
    once checked to be finite. Raises `ImageError` (a ValueError) naming the image and the reason.
    """
    if not isinstance(image, (str, os.PathLike, bytes, bytearray, Image.Image)):
        check_finite(image)
        return image
    name = image_name(image)
    try:
        if isinstance(image, Image.Image):
            return to_rgb(image, name)
        if isinstance(image, str):
            image = string_image(image, name)
        with open_image(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image, name) as opened:
            return to_rgb(opened, name)
    except ImageError:
        raise
    except Exception as error:  # PIL raises many types on bad data (OSError, SyntaxError, struct.error, ...)
        raise ImageError(f"cannot read image {name}: {error}") from error


# Images given by URL are fetched with these limits (module attributes: set them to change them). The size limit is
# the app's upload limit; the timeout bounds the whole transfer, not each read.
URL_TIMEOUT_SECONDS = 10.0
MAX_IMAGE_BYTES = 20 * 1024 * 1024
URL_PREFIXES = ("http://", "https://")


def image_name(image: Any) -> str:
    """How error messages name an image: a path or URL as given, inline data by its kind and length."""
    if isinstance(image, os.PathLike) or (isinstance(image, str) and is_path_or_url(image)):
        return str(image)
    if isinstance(image, str):
        kind = "data URI" if image.startswith("data:") else "base64 string"
        return f"<{kind} of {len(image):,} characters>"
    return f"<{type(image).__name__}>"


def is_path_or_url(text: str) -> bool:
    return text.startswith(URL_PREFIXES) or os.path.exists(text) or not is_base64(text)


def is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def string_image(text: str, name: str) -> str | bytes:
    """A string image as transformers' processors read one: a URL's bytes, a data URI's or base64's decoded bytes,
    else the string itself, a path (a path is never valid base64: its "." is not in the alphabet)."""
    if text.startswith(URL_PREFIXES):
        return fetch_image(text)
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if not header.endswith(";base64"):
            raise ImageError(f"image {name}: only base64 data URIs are read (data:image/...;base64,...)")
        text = payload
    elif os.path.exists(text) or not is_base64(text):
        return text
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"image {name} is not valid base64: {error}") from error


def fetch_image(url: str) -> bytes:
    """The bytes at `url`, refusing more than `MAX_IMAGE_BYTES` or longer than `URL_TIMEOUT_SECONDS` in all."""
    deadline = time.monotonic() + URL_TIMEOUT_SECONDS
    request = urllib.request.Request(url, headers={"User-Agent": "valign"})
    too_large = f"image {url} is larger than {MAX_IMAGE_BYTES:,} bytes (processing_valign.MAX_IMAGE_BYTES)"
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT_SECONDS) as response:
            if int(response.headers.get("Content-Length") or 0) > MAX_IMAGE_BYTES:
                raise ImageError(too_large)
            data = bytearray()
            while chunk := response.read1(1 << 16):  # what has arrived: a slow drip still meets the deadline
                data += chunk
                if len(data) > MAX_IMAGE_BYTES:
                    raise ImageError(too_large)
                if time.monotonic() > deadline:
                    raise TimeoutError("the transfer took too long")
    except urllib.error.HTTPError as error:
        raise ImageError(f"cannot fetch image {url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError) as error:  # refused, unknown host, timeouts (TimeoutError is an OSError)
        reason = getattr(error, "reason", error)
        raise ImageError(f"cannot fetch image {url} within {URL_TIMEOUT_SECONDS:g} s: {reason}") from error
    return bytes(data)


def open_image(source: Any, name: str) -> Image.Image:
    """`Image.open` (the header only), refusing sizes over `Image.MAX_IMAGE_PIXELS` with the image's name."""
    with warnings.catch_warnings():
        # PIL only warns up to twice its limit; check_pixel_count refuses every image over it, naming the file.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(source)
        except Image.DecompressionBombError as error:  # over twice the limit: PIL refuses before we see the size
            raise ImageError(f"image {name} is too large: {error}") from error
    try:
        check_pixel_count(opened, name)
    except ImageError:
        opened.close()
        raise
    return opened


def check_pixel_count(image: Image.Image, name: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    pixels = image.width * image.height
    if limit is not None and pixels > limit:
        raise ImageError(
            f"image {name} is too large: {image.width}×{image.height} = {pixels:,} pixels, over the limit of "
            f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?)"
        )


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """A new, fully decoded RGB image (truncated files fail here, not in a collator), never sharing pixels with
    `image`: upright by EXIF, scaled to 8 bits per channel, transparency composited on white."""
    check_pixel_count(image, name)
    image = ImageOps.exif_transpose(image)  # always a new image
    if image.mode in WIDE_MODES:
        image = wide_to_8bit(image, name)
    if has_transparency(image):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def has_transparency(image: Image.Image) -> bool:
    """Alpha channel, transparent palette entries or a tRNS colour (Pillow ≥ 10.1's `has_transparency_data`)."""
    if image.mode in TRANSPARENT_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def wide_to_8bit(image: Image.Image, name: str) -> Image.Image:
    """An "L" image (or "LA", a tRNS grey becoming alpha) from an integer ("I", "I;16*": 16-bit full scale, as PNG
    stores it, so 65535 → 255) or float ("F": PIL's 0–255 scale) single-channel image. PIL's own conversion clips
    instead: every 16-bit value over 255 turned white, leaving a picture a handful of grey levels."""
    values = np.asarray(image)
    if image.mode == "F" and not np.isfinite(values).all():
        raise ImageError(f"image {name} holds NaN or infinite pixel values")
    scaled = values.astype(np.float64) / (1.0 if image.mode == "F" else 257.0)
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    transparent = image.info.get("transparency")
    if not isinstance(transparent, (int, float)):
        return grey
    alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
    return Image.merge("LA", (grey, alpha))


def check_finite(image: Any) -> None:
    """Refuse NaN / Inf in an array or tensor image: the encoder would turn them into NaN logits without a word."""
    if isinstance(image, torch.Tensor):
        finite = bool(torch.isfinite(image).all())
    else:
        values = np.asarray(image)
        finite = not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())
    if not finite:
        raise ImageError(f"an image given as {type(image).__name__} holds NaN or infinite values")


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
        image_seq_length (`int`): image tokens per image: the model config's `image_seq_length` (the encoder's
            patch count after pixel shuffle), which `from_backbones` passes here.
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

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> list:
        """The image processor and tokenizer, as the transformers classes the checkpoint's configs name (transformers
        up to 5.24 loads a processor's parts here; 5.25 through `_load_tokenizer_from_pretrained` below).

        ProcessorMixin loads them with the Auto classes, which see the checkpoint's `auto_map` (and, in 5.x, valign's
        unregistered `config.json`) and ask on the terminal whether to run the checkpoint's code, or run it. Only with
        `trust_remote_code=True` (what AutoProcessor passes when a Hub user opts in) do the Auto classes load them.
        """
        if kwargs.get("trust_remote_code"):
            return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        kwargs.pop("trust_remote_code", None)
        name = pretrained_model_name_or_path
        image_config, _ = ImageProcessingMixin.get_image_processor_dict(name, **kwargs)
        image_type = image_config.get("image_processor_type")
        image_processor = transformers_class(image_type, [image_type], get_image_processor_class_from_name)
        return [image_processor.from_pretrained(name, **kwargs), installed_tokenizer(name, **kwargs)]

    @classmethod
    def _load_tokenizer_from_pretrained(
        cls, sub_processor_type: str, pretrained_model_name_or_path: Any, subfolder: str = "", **kwargs: Any
    ) -> Any:
        """The tokenizer, for transformers 5.25 and later (see `_get_arguments_from_pretrained`): there AutoTokenizer
        asked "Do you wish to run the custom code? [y/N]" at every load of a valign checkpoint by the installed
        classes, and printed it on stdout where nobody could answer (`valign caption --json`)."""
        if kwargs.get("trust_remote_code"):
            return super()._load_tokenizer_from_pretrained(
                sub_processor_type, pretrained_model_name_or_path, subfolder, **kwargs
            )
        kwargs.pop("trust_remote_code", None)
        return installed_tokenizer(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

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


def installed_tokenizer(name: Any, **kwargs: Any) -> Any:
    """The checkpoint's tokenizer as the transformers class its `tokenizer_config.json` names, without AutoTokenizer."""
    tokenizer_type = get_tokenizer_config(name, **kwargs).get("tokenizer_class")
    # 4.x's AutoTokenizer takes the fast (tokenizers) variant, the one valign saves; 5.x maps both names to one.
    names = [tokenizer_type] if str(tokenizer_type).endswith("Fast") else [f"{tokenizer_type}Fast", tokenizer_type]
    return transformers_class(tokenizer_type, names, tokenizer_class_from_name).from_pretrained(name, **kwargs)


def transformers_class(declared: str | None, names: list[str], resolve: Any) -> type:
    """The first of `names` that `resolve` finds among transformers' own classes (a class of the checkpoint's own
    code, imported or not, is refused: only `trust_remote_code=True` may load it)."""
    for candidate in names if declared else []:
        found = resolve(candidate)
        if found is not None and found.__module__.startswith("transformers."):
            return found
    raise ValueError(
        f"the checkpoint names {declared!r}, which is not a transformers class; its code comes with the checkpoint: "
        "load with trust_remote_code=True to run it"
    )


def pad_offsets(offsets: list[tuple[int, int]], width: int, side: str) -> list[tuple[int, int]]:
    """Pad offsets like the ids they describe; (0, 0) is the zero-width span of a padding token."""
    fill = [(0, 0)] * (width - len(offsets))
    return fill + offsets if side == "left" else offsets + fill


ValignProcessor.register_for_auto_class()

__all__ = ["ValignProcessor"]
