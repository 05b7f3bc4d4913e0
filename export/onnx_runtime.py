"""The model as three ONNX graphs run by onnxruntime, with the hybrid mask intact.

`export_onnx(checkpoint, folder)` writes

- `vision.onnx`: pixel values → image features (vision tower, pixel shuffle, projector: `get_image_features`);
- `decoder.onnx`: token ids, the image features, a 4D additive attention mask, position ids and the KV cache →
  the logits of the last position and the new KV cache. The mask is an *input*: `build_attention_mask`, the one
  definition of valign's attention policy, computes it outside the graph at every step, so hybrid, causal and
  padded batches need no second rendering of the policy inside the graph;
- the checkpoint's config, generation config and processor files, so the folder alone is enough to caption.

`weights="int8"` or `"int4"` stores the graphs' matrix weights block-quantized (onnxruntime's `MatMulNBits`; its
fast kernels quantize activations to int8 per block on the fly). `OnnxValign(folder)` generates greedily like
`model.generate` (same tokens as PyTorch for fp32 graphs: tested) and stands in for the model wherever
`eval.generate.generate_answers` is used.

No released exporter handles this model family (optimum cannot export Idefics3; Apple's FastVLM export fails):
the decoder here is traced with `torch.onnx.export(dynamo=True)` around transformers' own language model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig

from ..checkpoint import load_checkpoint
from ..configuration_valign import CACHE_NAME, ValignConfig
from ..modeling_valign import build_attention_mask, check_images, positions_from_padding
from ..processing_valign import ValignProcessor
from .greedy import check_generation_config, check_greedy, decode_greedily

VISION_FILE, DECODER_FILE, MANIFEST_FILE = "vision.onnx", "decoder.onnx", "onnx_export.json"
EXPORT_FORMAT = 2  # raised whenever the graphs' inputs or outputs change (2: logits of the last position only)
WEIGHT_BITS = {"fp32": None, "int8": 8, "int4": 4}
QUANT_BLOCK_SIZE = 32  # weights per scale; 32 keeps int4 close to fp32 on small models (onnxruntime's default: 128)
# onnxruntime's fast MatMulNBits kernels quantize activations to int8 per block (accuracy level 4); with fp32
# activations (level 0) an int8 decode step of the paper-shape model took 1.78 s instead of 0.05 s on 2 AVX2 cores.
QUANT_ACCURACY_LEVEL = 4


class ImageEncoder(nn.Module):
    """`get_image_features` as a graph: pixel values → one row of features per image token."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)


class Decoder(nn.Module):
    """One decoding step of the language model with image features placed at the image tokens, as `forward` does
    (`masked_scatter`), under a given 4D mask; the KV cache goes in and out as flat tensors (key, value per layer)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.image_token_id = model, model.config.image_token_id
        # A head of its own: tied to the embedding table it would reach the graph as a transpose of the Gather's
        # weights, which the weight-only quantizer skips, leaving the largest matrix of a decode step in fp32.
        self.head = nn.Linear(*reversed(model.lm_head.weight.shape), bias=False)
        self.head.weight = nn.Parameter(model.lm_head.weight.detach().clone())

    def forward(self, input_ids, image_features, attention_mask, position_ids, past: tuple[torch.Tensor, ...]):
        embeds = self.model.get_input_embeddings()(input_ids)
        image_mask = (input_ids == self.image_token_id)[..., None]
        embeds = embeds.masked_scatter(image_mask, image_features.to(embeds.dtype))
        cache = DynamicCache(config=self.model.config.text_config)
        for layer, (key, value) in enumerate(zip(past[::2], past[1::2])):
            cache.update(key, value, layer)
        outputs = self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{CACHE_NAME: cache},
        )
        # Generation reads the last position only: the head over a 271-token prompt would cost as much as 0.6 s of
        # the paper-shape prefill on 2 cores (151,936 x 896 per token) for nothing.
        logits = self.head(outputs.last_hidden_state[:, -1:])
        return logits, *(tensor for layer in cache.layers for tensor in (layer.keys, layer.values))


def cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


def kv_shape(config: ValignConfig) -> tuple[int, int]:
    """(key/value heads, head size) of the language model."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_key_value_heads, head_dim


def export_graph(module: nn.Module, example: tuple, path: Path, names: dict[str, list[str]], shapes: tuple) -> None:
    """`module` traced on `example` into `path` (weights beside it in `path.data`), `shapes` naming dynamic dims."""
    # The dynamo exporter (torch.export) is the maintained one; the dims named dynamic stay symbolic in the graph.
    torch.onnx.export(
        module.eval(),
        example,
        str(path),
        input_names=names["inputs"],
        output_names=names["outputs"],
        dynamic_shapes=shapes,
        dynamo=True,
        external_data=True,
        verbose=False,
    )


def quantize_graph(path: Path, bits: int) -> None:
    """Block-wise weight-only quantization of every MatMul with a constant weight, in place."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node
    quantizer = MatMulNBitsQuantizer(
        str(path), bits=bits, block_size=QUANT_BLOCK_SIZE, is_symmetric=True, accuracy_level=QUANT_ACCURACY_LEVEL
    )
    quantizer.process()
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(quantizer.model.model, str(path), save_as_external_data=True, location=data.name)


def export_onnx(checkpoint: str | Path, folder: str | Path, weights: str = "fp32", revision: str | None = None) -> Path:
    """Write the ONNX graphs of `checkpoint` (folder or Hub id), its configs and its processor into `folder`."""
    check_weights(weights)
    check_export_folder(Path(folder))  # before the minutes of loading and exporting
    model, processor = load_checkpoint(checkpoint, revision, dtype=torch.float32)
    export_model(model, folder, weights, source=str(checkpoint))
    processor.save_pretrained(folder)
    return Path(folder)


def check_export_folder(folder: Path) -> None:
    """Refuse a folder that holds anything but an earlier export: a checkpoint folder given by mistake would be
    overwritten with another model's files, and then served as that model."""
    if folder.is_file():
        raise FileExistsError(f"{folder} is a file; give a new or empty folder for the export")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST_FILE).is_file():
        raise FileExistsError(f"{folder} holds files and is not an ONNX export; give a new or empty folder")


def check_weights(weights: str) -> None:
    if weights not in WEIGHT_BITS:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_BITS)}, got {weights!r}")


@torch.no_grad()
def export_model(model: nn.Module, folder: str | Path, weights: str = "fp32", source: str = "") -> Path:
    """Write the graphs of a float32 valign `model` with its config and generation config into `folder`."""
    check_weights(weights)
    folder = Path(folder)
    check_export_folder(folder)
    shutil.rmtree(folder, ignore_errors=True)  # an earlier export: none of its files may outlive it
    folder.mkdir(parents=True)
    config = model.config
    layers, (heads, head_dim) = config.text_config.num_hidden_layers, kv_shape(config)
    batch, query, past, keys, image_rows = map(torch.export.Dim, ("batch", "query", "past", "keys", "image_rows"))

    pixels = torch.zeros(2, 3, config.image_size, config.image_size)
    names = {"inputs": ["pixel_values"], "outputs": ["image_features"]}
    export_graph(ImageEncoder(model), (pixels,), folder / VISION_FILE, names, ({0: batch},))

    # Traced with 2 rows of 3 cached and L + 2 new tokens (sizes 0 and 1 would be specialised by torch.export).
    text = torch.full((2, 1), config.text_config.bos_token_id or 0)
    image = torch.full((2, config.image_seq_length), config.image_token_id)
    tokens = torch.cat([text, image, text], dim=1)
    features = torch.zeros(2 * config.image_seq_length, config.text_config.hidden_size)
    q = tokens.shape[1]
    example = (
        tokens,
        features,
        torch.zeros(2, 1, q, 3 + q),  # attention mask
        torch.arange(3, 3 + q).expand(2, q),  # position ids
        tuple(torch.zeros(2, heads, 3, head_dim) for _ in range(2 * layers)),
    )
    shapes = (
        {0: batch, 1: query},
        {0: image_rows},
        {0: batch, 2: query, 3: keys},
        {0: batch, 1: query},
        tuple({0: batch, 2: past} for _ in range(2 * layers)),
    )
    inputs = ["input_ids", "image_features", "attention_mask", "position_ids"]
    names = {
        "inputs": [*inputs, *cache_names(layers, "past_key_values")],
        "outputs": ["logits", *cache_names(layers, "present")],
    }
    export_graph(Decoder(model), example, folder / DECODER_FILE, names, shapes)

    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    write_manifest(folder, {"format": EXPORT_FORMAT, "weights": "fp32", "source": source})
    return quantize_export(folder, weights)


def quantize_export(folder: Path, weights: str, target: Path | None = None) -> Path:
    """Turn the fp32 graphs of an export into `weights` ("fp32": left as they are), in place or, given `target`, in
    a copy there (the fp32 export is kept)."""
    check_weights(weights)
    if target is not None:
        folder = Path(shutil.copytree(folder, target))
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    if manifest["weights"] != "fp32":
        raise ValueError(f"{folder} already holds {manifest['weights']} weights; quantize an fp32 export")
    if (bits := WEIGHT_BITS[weights]) is not None:
        for name in (VISION_FILE, DECODER_FILE):
            quantize_graph(folder / name, bits)
    write_manifest(folder, {**manifest, "weights": weights})
    return folder


def write_manifest(folder: Path, fields: dict) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(fields, indent=2) + "\n")


class OnnxValign:
    """An exported valign model run by onnxruntime: `generate` decodes greedily as `model.generate` does (the
    checkpoint's end-of-turn and padding tokens, the image token suppressed), so it can stand in for the model in
    `eval.generate.generate_answers` (the `valign` command's `--runtime onnx`)."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        import onnxruntime

        self.folder = Path(folder)
        missing = [name for name in (VISION_FILE, DECODER_FILE, MANIFEST_FILE) if not (self.folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} is not a valign ONNX export (missing {', '.join(missing)}): "
                "make one with `valign export CHECKPOINT FOLDER`"
            )
        self.config = ValignConfig.from_pretrained(self.folder)
        self.generation_config = GenerationConfig.from_pretrained(self.folder)
        check_generation_config(self.generation_config, str(folder), "ONNX")
        self.manifest = json.loads((self.folder / MANIFEST_FILE).read_text())
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = lambda name: onnxruntime.InferenceSession(  # noqa: E731
            str(self.folder / name), options, providers=["CPUExecutionProvider"]
        )
        self.vision, self.decoder = session(VISION_FILE), session(DECODER_FILE)
        self.device = torch.device("cpu")
        self.layers = self.config.text_config.num_hidden_layers

    def processor(self) -> ValignProcessor:
        return ValignProcessor.from_pretrained(self.folder)

    def step_mask(self, attention_mask: torch.Tensor, image_mask: torch.Tensor, mode: str, past: int) -> np.ndarray:
        """The 4D mask of one decoder call from `build_attention_mask`. The graph always takes a 4D mask, so a causal
        model is asked for hybrid attention over a chunk without image tokens, which is causal attention."""
        if mode == "causal":
            image_mask, mode = torch.zeros_like(image_mask), "hybrid"
        mask = build_attention_mask(attention_mask, image_mask, mode, past, self.config.image_seq_length, torch.float32)
        return mask.numpy()

    def image_features(self, pixel_values: torch.Tensor | None) -> np.ndarray:
        if pixel_values is None:
            return np.zeros((0, self.config.text_config.hidden_size), dtype=np.float32)
        features = self.vision.run(None, {"pixel_values": pixel_values.float().numpy()})[0]
        return features.reshape(-1, features.shape[-1])

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attn_mode: str | None = None,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        do_sample: bool = False,
    ) -> torch.Tensor:
        """Prompt and new tokens, `(batch, prompt + new)`, finished rows padded, as `generate` returns them."""
        mode = attn_mode or self.config.attn_mode
        check_greedy(mode, num_beams, do_sample, "ONNX")
        check_images(input_ids, pixel_values, self.config)  # the graphs were traced without value checks
        heads, head_dim = kv_shape(self.config)
        cache = [np.zeros((input_ids.shape[0], heads, 0, head_dim), dtype=np.float32) for _ in range(2 * self.layers)]
        features = self.image_features(pixel_values)

        def step(chunk: torch.Tensor, attention_mask: torch.Tensor, past: int) -> torch.Tensor:
            nonlocal cache
            feeds = {
                "input_ids": chunk.numpy(),
                "image_features": features if past == 0 else features[:0],
                "attention_mask": self.step_mask(attention_mask, chunk == self.config.image_token_id, mode, past),
                "position_ids": positions_from_padding(attention_mask, *chunk.shape, past, "cpu").numpy(),
                **dict(zip(cache_names(self.layers, "past_key_values"), cache)),
            }
            logits, *cache = self.decoder.run(None, feeds)
            return torch.from_numpy(logits[:, -1])

        return decode_greedily(step, input_ids, attention_mask, self.generation_config, max_new_tokens)
