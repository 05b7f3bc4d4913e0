"""Loading a valign checkpoint (local folder or Hub id): the one loader every command and the app use."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from .modeling_valign import ValignForConditionalGeneration
from .processing_valign import ValignProcessor


def load_checkpoint(
    name_or_path: str | Path,
    revision: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    remote_code: bool = False,
) -> tuple[torch.nn.Module, ValignProcessor]:
    """The model (eval mode, `sdpa` attention) and processor of a valign checkpoint.

    By default the model is built with the installed valign classes, so it runs the code of the valign you call;
    `remote_code=True` loads the checkpoint's own files through the Auto classes, as Hub users do. The processor's
    tokenizer and image processor loaders need `trust_remote_code` either way: the checkpoint's configs name its
    remote-code classes, and without it transformers asks interactively. `device="auto"`: the GPU when there is one.
    """
    name = str(name_or_path)
    # AutoModelForImageTextToText exists in 4.57 and 5.x (4.x's AutoModelForVision2Seq warns that it is going).
    model_class = transformers.AutoModelForImageTextToText if remote_code else ValignForConditionalGeneration
    processor_class = transformers.AutoProcessor if remote_code else ValignProcessor
    remote = {"trust_remote_code": True} if remote_code else {}
    model = model_class.from_pretrained(name, revision=revision, dtype=dtype, attn_implementation="sdpa", **remote)
    processor = processor_class.from_pretrained(name, revision=revision, trust_remote_code=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None:
        model.to(device)
    return model, processor
