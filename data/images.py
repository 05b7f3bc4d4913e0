"""Image cells (PIL images, {"bytes", "path"} dicts, bytes, paths) → RGB images."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from .skips import SkipRow


def has_image(value: Any) -> bool:
    """Whether an image cell holds an image (decoded or not) rather than None / an empty path-bytes struct."""
    if isinstance(value, Mapping):
        return value.get("bytes") is not None or bool(value.get("path"))
    return bool(value) if isinstance(value, str) else value is not None


def decode_image(value: Any, image_root: str | os.PathLike | None = None) -> PILImage.Image | None:
    """An RGB image from a PIL image, ``{"bytes", "path"}`` dict, bytes or path (relative ones under `image_root`).

    Returns None for an empty cell; raises :class:`SkipRow` ("unreadable_image") when decoding fails.
    """
    if not has_image(value):
        return None
    if isinstance(value, Mapping):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    if isinstance(value, PILImage.Image):
        return _to_rgb(value)
    source = _image_source(value, image_root)
    try:
        with PILImage.open(source) as image:
            return _to_rgb(image)
    except Exception as error:  # PIL raises many types on corrupt data (OSError, ValueError, SyntaxError, ...)
        name = "<bytes>" if isinstance(source, io.BytesIO) else str(source)
        raise SkipRow("unreadable_image", f"cannot read image {name}: {error}") from error


def _image_source(value: Any, image_root: str | os.PathLike | None) -> io.BytesIO | Path:
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value)
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        return path if path.is_absolute() or image_root is None else Path(image_root) / path
    raise SkipRow("unreadable_image", f"unsupported image value of type {type(value).__name__}")


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Decode fully (truncated files fail here, not in the collator) and convert to RGB; transparency becomes white."""
    image.load()
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = PILImage.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")  # a copy even for RGB input, so samples never share pixels with the source
