"""Which runtime generates for a checkpoint, and in which precision: the fastest one for the precision asked, chosen
in one place for the `valign` command, the app and Python users (`load_for_generation`).

`auto` (the default) takes, in order:

- an ONNX export folder given as the model: onnxruntime;
- `precision="int8"` or `"w8a8"`: the compiled runtime (eager PyTorch has no fast int8 kernels);
- a GPU: PyTorch eager;
- a CPU that computes bf16 natively (AMX / AVX512-BF16): PyTorch in bf16, compiled (`export/compiled_runtime.py`)
  when the load serves many generations (a server, or `generations` of at least `COMPILE_PAYS_AFTER`) of a model
  of at least `COMPILE_PAYS_FROM` parameters, since compiling costs more than a few captions save and a small
  model's captions gain little from it, and the compiled runtime runs here (transformers 5.24 or newer); eager
  otherwise;
- a CPU without native bf16 (e.g. AVX2 only), when the checkpoint's fp32 export is in the cache: onnxruntime, which
  runs at the weight-streaming floor there while eager PyTorch decodes 1.8x slower (BENCHMARKS.md);
- else PyTorch, as saved.

`precision` (`auto`, `fp32`, `bf16`, `int8`, `w8a8`) says what the model computes in: `auto` is bf16 on a GPU or a
CPU with native bf16 and the checkpoint's saved dtype elsewhere; `int8` stores the language model's linear weights as
int8 for decoding (compiled runtime; with `--runtime onnx`, the checkpoint's cached int8 export) and computes the rest
as `auto`; `w8a8` (compiled runtime only) also quantizes the decode steps' activations to int8, the fastest decode.
bf16 may decode other tokens than fp32 (its rounding can tip a near tie between two tokens), so `fp32` is there for
output that must match the ONNX export or another machine; with `fp32`, `auto` picks the runtime as on a CPU without
native bf16. The ONNX export computes in fp32 only.

Exporting takes minutes at the paper's shape, more than one caption saves, so `auto` never exports by itself:
`valign export CHECKPOINT` (no folder) writes the export into the cache once, and `--runtime onnx` given a checkpoint
exports it there on first use. A cached export is keyed by the checkpoint's config and weight files (their resolved
paths, sizes and modification times) and valign's export format, so a retrained checkpoint is never served by the
export of its predecessor.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..checkpoint import checkpoint_location, is_local, load_checkpoint, native_bf16, valign_cache
from .compiled_runtime import AVAILABLE as COMPILED_AVAILABLE
from .compiled_runtime import QUANTIZED, CompiledValign
from .onnx_runtime import EXPORT_FORMAT, MANIFEST_FILE, OnnxValign, export_onnx

RUNTIMES = ("auto", "torch", "compiled", "onnx")
PRECISIONS = ("auto", "fp32", "bf16", *QUANTIZED)
# Captions after which compiling has paid for itself, at the paper's shape on 2 AMX cores (BENCHMARKS.md, batch 1):
# compiling the prompt and decode graphs took 74-114 s and then saved 1.1 s a caption against eager bf16.
COMPILE_PAYS_AFTER = 100
# Parameters from which it pays at all: the demo's checkpoint (DINOv2-small + SmolLM2-135M, 0.16 B) captioned 100
# images in 163 s compiled against 21 s eager (2-core EPYC, 2026-12-07): each compile took ~70 s, each caption
# gained ~0.03 s. The paper's shape has 0.9 B.
COMPILE_PAYS_FROM = 500_000_000


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def checkpoint_folder(name: str | Path, revision: str | None = None) -> Path:
    """The local folder holding a checkpoint: the folder itself, or the Hub snapshot (downloaded if not cached)."""
    if is_local(name):
        return Path(checkpoint_location(name))
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name), revision=revision))


def cached_export(checkpoint: Path, weights: str = "fp32") -> Path:
    """Where the `weights` export of the checkpoint in local folder `checkpoint` lives in the cache."""
    files = sorted(p for p in checkpoint.iterdir() if p.suffix in {".safetensors", ".bin"} or p.name == "config.json")
    if not any(p.name == "config.json" for p in files):
        raise FileNotFoundError(f"{checkpoint} has no config.json: not a checkpoint folder")
    # A Hub snapshot's files are links to blobs named by their hash; a local file changes size or time when rewritten.
    identity = [(p.name, str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([EXPORT_FORMAT, weights, identity]).encode()).hexdigest()[:16]
    return valign_cache("onnx") / f"{checkpoint.resolve().name}-{weights}-{key}"


def ensure_export(checkpoint: Path, weights: str = "fp32") -> Path:
    """The cached export of `checkpoint`, written first if missing (beside its place, renamed when complete)."""
    folder = cached_export(checkpoint, weights)
    if is_export(folder):
        return folder
    print(f"valign: exporting {checkpoint} to {folder} once (minutes for a large model)", file=sys.stderr, flush=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    export_onnx(checkpoint, partial, weights=weights)
    partial.rename(folder)
    return folder


def choose_runtime(requested: str, checkpoint: Path, precision: str = "auto", generations: int | None = None) -> str:
    """`torch`, `compiled` or `onnx` for `requested` (one of RUNTIMES) and the checkpoint in local folder
    `checkpoint`; `generations` is how many `generate` calls the load will serve (None: many, as a server's)."""
    if requested not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {requested!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if requested != "auto":
        return requested
    if is_export(checkpoint):
        return "onnx"
    if precision in QUANTIZED:
        return "compiled"
    if torch.cuda.is_available():
        return "torch"
    if precision == "bf16" or (precision == "auto" and native_bf16("cpu")):
        many = generations is None or generations >= COMPILE_PAYS_AFTER
        pays = many and checkpoint_parameters(checkpoint) >= COMPILE_PAYS_FROM
        return "compiled" if pays and COMPILED_AVAILABLE else "torch"
    return "onnx" if is_export(cached_export(checkpoint)) else "torch"


def checkpoint_parameters(folder: Path) -> int:
    """The parameters a checkpoint folder stores, read from its safetensors files' headers (tied weights are stored
    once); 0 without any (an old `.bin` checkpoint: not worth compiling by this count)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as weights:
            names = weights.keys()  # a safe_open handle is not iterable
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
    return total


def torch_dtype(precision: str, device: str) -> torch.dtype | None:
    """The dtype PyTorch loads the weights in; None keeps the saved one (fp32 for valign's own checkpoints)."""
    if precision in ("auto", *QUANTIZED):  # emulated bf16 (a CPU without AVX512-BF16 or AMX) is slower than fp32
        return torch.bfloat16 if native_bf16(device) else None
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_for_generation(
    name: str | Path,
    revision: str | None = None,
    runtime: str = "auto",
    trust_remote_code: bool = False,
    precision: str = "auto",
    generations: int | None = None,
) -> tuple[Any, Any, str]:
    """(model, processor, runtime used) for generating with the checkpoint or export `name` (folder or Hub id).

    The model has `generate` and stands in wherever `eval.generate.generate_answers` takes one. `runtime="onnx"` with
    a checkpoint runs its cached export (fp32, or int8 for `precision="int8"`), exporting it first when missing.
    `generations` (None: many) lets `auto` weigh compiling against the time it saves.
    """
    folder = checkpoint_folder(name, revision)
    used = choose_runtime(runtime, folder, precision, generations)
    if used == "onnx":
        if precision in ("bf16", "w8a8"):
            raise ValueError(
                f"the ONNX runtime computes in fp32 or with int8 weights, not {precision}: use precision fp32, auto or "
                "int8, or another runtime"
            )
        weights = "int8" if precision == "int8" else "fp32"
        model = OnnxValign(folder if is_export(folder) else ensure_export(folder, weights))
        return model, model.processor(), used
    if is_export(folder):
        raise ValueError(f"{name} is an ONNX export: run it with the onnx runtime, or give its checkpoint")
    if precision in QUANTIZED and used == "torch":
        raise ValueError(f"{precision} weights run on the compiled runtime")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch_dtype(precision, device)
    model, processor = load_checkpoint(folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if used == "compiled":
        model = CompiledValign(model, weights=precision if precision in QUANTIZED else "native")
    return model, processor, used
