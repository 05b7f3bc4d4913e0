"""Saving and loading valign checkpoints: the one writer every training path uses and the one loader every command
and the app use."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import transformers

from .modeling_valign import ValignForConditionalGeneration
from .processing_valign import ValignProcessor

# Saved beside the remote code in every checkpoint: Inference Endpoints serve a repository through its handler.py.
ENDPOINT_HANDLER = Path(__file__).with_name("handler.py")
CACHE_VARIABLE = "VALIGN_CACHE"  # where valign keeps what it derives once: converted backbones, ONNX exports


def valign_cache(kind: str) -> Path:
    """The cache folder for `kind` ("backbones", "onnx"): under $VALIGN_CACHE, default ~/.cache/valign."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "valign") / kind


def save_checkpoint(model: torch.nn.Module, processor: ValignProcessor, folder: str | Path) -> Path:
    """A complete checkpoint in `folder`: weights, config, processor, remote code (`save_pretrained` copies the
    three model files) and the endpoint handler."""
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    shutil.copyfile(ENDPOINT_HANDLER, folder / ENDPOINT_HANDLER.name)
    return folder


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` computes bf16 natively, so bf16 is faster than fp32 there.

    On CUDA, what torch reports. On a CPU only AVX512-BF16 or AMX count: without them torch's bf16 matmuls fall
    back to generic kernels, measured 5-200x *slower* than fp32 on an AVX2-only 2-core machine (see DESIGN.md).
    """
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has("_is_avx512_bf16_supported") or cpu_has_amx()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), whose bf16 products the compiled runtime's
    decode steps run by inductor's GEMM template (`export/compiled_runtime.decode_graph_settings`)."""
    return cpu_has("_is_amx_tile_supported")


def cpu_has(probe: str) -> bool:
    # torch.cpu has no public capability query for these; the private probes exist since torch 2.1.
    return getattr(torch.cpu, probe, lambda: False)()


def is_local(name: str | Path) -> bool:
    """Whether `name` means a local folder rather than a Hub repo id, as transformers decides: it exists on disk, or
    it looks like a path (starts with `.`, `/` or `~`, or has more than one slash; a repo id is `owner/name`)."""
    text = str(name)
    return Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") > 1


def checkpoint_location(name: str | Path) -> str:
    """`name` as `from_pretrained` should get it; a local path that does not exist raises FileNotFoundError (rather
    than huggingface_hub's "Repo id must be in the form ..." for a path mistaken for a repo id)."""
    if not is_local(name):
        return str(name)
    path = Path(str(name)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name} is a file, not a checkpoint folder" if path.exists() else f"no such folder: {name}"
        )
    return str(path)


def load_checkpoint(
    name_or_path: str | Path,
    revision: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> tuple[torch.nn.Module, ValignProcessor]:
    """The model (eval mode, `sdpa` attention unless told) and processor of a valign checkpoint.

    By default the installed valign classes load it, model and processor alike (the tokenizer and image processor
    are the transformers classes its configs name): no file of the checkpoint runs, whatever its configs'
    `auto_map` say. `trust_remote_code=True` loads it through the Auto classes with the checkpoint's own code, as
    Hub users do. `device="auto"`: the GPU when there is one.
    """
    name = checkpoint_location(name_or_path)
    # AutoModelForImageTextToText exists in 4.57 and 5.x (4.x's AutoModelForVision2Seq warns that it is going).
    model_class = transformers.AutoModelForImageTextToText if trust_remote_code else ValignForConditionalGeneration
    processor_class = transformers.AutoProcessor if trust_remote_code else ValignProcessor
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    model = model_class.from_pretrained(
        name, revision=revision, dtype=dtype, attn_implementation=attn_implementation, **remote
    )
    processor = processor_class.from_pretrained(name, revision=revision, **remote)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None:
        model.to(device)
    return model, processor
