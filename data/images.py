"""Image cells (PIL images, {"bytes", "path"} dicts, bytes, paths) → RGB images, decoded by the model's own
`load_image` (processing_valign.py), so training reads exactly the pixels inference reads."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from ..processing_valign import load_image
from .skips import SkipRow


def has_image(value: Any) -> bool:
    """Whether an image cell holds an image (decoded or not) rather than None / an empty path-bytes struct."""
    if isinstance(value, Mapping):
        return value.get("bytes") is not None or bool(value.get("path"))
    return bool(value) if isinstance(value, str) else value is not None


def decode_image(value: Any, image_root: str | os.PathLike | None = None) -> PILImage.Image | None:
    """An RGB image from a PIL image, ``{"bytes", "path"}`` dict, bytes or path (relative ones under `image_root`).

    Returns None for an empty cell; raises :class:`SkipRow` ("unreadable_image") when `load_image` refuses it
    (unreadable, missing, over the pixel limit, non-finite values).
    """
    if not has_image(value):
        return None
    if isinstance(value, Mapping):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    try:
        return load_image(_image_source(value, image_root))
    except ValueError as error:  # load_image's message names the image and the reason
        raise SkipRow("unreadable_image", str(error)) from error


def _image_source(value: Any, image_root: str | os.PathLike | None) -> PILImage.Image | bytes | bytearray | Path:
    if isinstance(value, (PILImage.Image, bytes, bytearray)):
        return value
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        return path if path.is_absolute() or image_root is None else Path(image_root) / path
    raise SkipRow("unreadable_image", f"unsupported image value of type {type(value).__name__}")
