"""Configuration of valign: a vision encoder, a 2-layer MLP projector and a decoder-only language model.

Defaults reproduce the shapes of arXiv 2503.19508: SigLIP so400m-patch14-224 (256 patch tokens) and
Qwen2.5-0.5B-Instruct. This file is served as Hub remote code, so it imports nothing but transformers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import transformers
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

ATTN_MODES = ("hybrid", "bidirectional", "causal")

# google/siglip-so400m-patch14-224 without its pooling head, which valign never uses.
DEFAULT_VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "vision_use_head": False,
}
# Qwen/Qwen2.5-0.5B-Instruct.
DEFAULT_TEXT_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN_IMAGE_PAD_ID = 151655  # "<|image_pad|>" in the Qwen2.5 tokenizer


def _as_config(value: dict | PretrainedConfig | None, default: dict) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    kwargs = dict(default if value is None else value)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


class ValignConfig(PretrainedConfig):
    r"""
    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Any transformers vision encoder whose output is a sequence of patch tokens (SigLIP, SigLIP2, CLIP
            vision, DINOv2, ...). Leading CLS/register tokens are dropped. Defaults to SigLIP so400m-patch14-224.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Any decoder-only language model that `AutoModel` builds. Defaults to Qwen2.5-0.5B.
        projector_hidden_size (`int`, *optional*):
            Width of the MLP projector's hidden layer. The paper does not state it; the default is the language
            model's hidden size, as in LLaVA-1.5 (vision → text → text).
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation between the two projector layers.
        vision_feature_layer (`int`, *optional*, defaults to -1):
            Which vision hidden state feeds the projector. -1 is the encoder's final output (after its last layer
            norm, as PaliGemma and nanoVLM use SigLIP); other values index `hidden_states`.
        standardize_vision_features (`bool`, *optional*, defaults to `False`):
            Standardise each dimension of the projector's input (the chosen vision layer's tokens, pixel-shuffled)
            with a mean and standard deviation estimated once from images (`calibrate_vision_features`, which
            `from_backbones(calibration_images=...)` calls) and saved with the checkpoint as buffers. The paper's
            projector reads SigLIP's normed output and has no such step (False). An inner layer has not passed the
            encoder's final norm and its dimensions differ in scale by up to 7× (DINOv2-small, layer 8); the
            embedded demo standardises them (docs/DESIGN.md, "Why colour was slow").
        image_token_id (`int`, *optional*, defaults to 151655):
            Token id that stands for one image patch in `input_ids` (Qwen2.5's `<|image_pad|>`).
        image_size (`int`, *optional*):
            Side in pixels of the square images the vision encoder is fed, i.e. what the paired image processor
            makes. Defaults to the encoder's own `image_size`; a different value (DINOv2 folders declare 518 while
            their processor crops 224) makes the encoder interpolate its position embeddings.
        pixel_shuffle_factor (`int`, *optional*, defaults to 1):
            Image-token compression before the projector (space-to-depth, as Idefics3, SmolVLM and nanoVLM do):
            each `f × f` block of the encoder's patch grid becomes one token `f²` times as wide, so an image becomes
            `(grid side / f)²` tokens. 1 keeps every patch (the paper's 256 tokens); 2 gives 64, 4 gives 16. The
            grid side must be divisible by it.
        attn_mode (`str`, *optional*, defaults to `"hybrid"`):
            Attention policy applied inside `forward`: `"hybrid"` (image tokens of one image attend to each other
            both ways, the rest is causal), `"bidirectional"` (every token sees every token; alignment stage only)
            or `"causal"` (a plain language model).
        loss_chunk_size (`int`, *optional*):
            In training (`model.train()`, gradients on, `labels` given), compute the loss over the supervised tokens
            only, this many at a time, each chunk's logits recomputed in the backward pass instead of kept; the
            output's `logits` are then `None`. Qwen2.5's 151,936-wide head makes fp32 logits the largest activation
            of a step (1.7 GB for 3,000 tokens, plus as much again for their gradient); chunks of 1,024 hold 0.6 GB.
            The paper does not say; `None` (the default) computes every kept position's logits at once, as
            transformers' language models do, and what code that reads `outputs.logits` in training needs.
    """

    model_type = "valign"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        projector_hidden_size: int | None = None,
        projector_hidden_act: str = "gelu",
        vision_feature_layer: int = -1,
        standardize_vision_features: bool = False,
        image_token_id: int = QWEN_IMAGE_PAD_ID,
        attn_mode: str = "hybrid",
        image_size: int | None = None,
        pixel_shuffle_factor: int = 1,
        loss_chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
        check_loss_chunk_size(loss_chunk_size)
        self.vision_config = _as_config(vision_config, DEFAULT_VISION_CONFIG)
        self.text_config = _as_config(text_config, DEFAULT_TEXT_CONFIG)
        self.projector_hidden_size = projector_hidden_size or self.text_config.hidden_size
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_layer = vision_feature_layer
        self.standardize_vision_features = standardize_vision_features
        self.image_token_id = image_token_id
        self.attn_mode = attn_mode
        self.image_size = image_size or getattr(self.vision_config, "image_size", None)
        self.pixel_shuffle_factor = pixel_shuffle_factor
        self.loss_chunk_size = loss_chunk_size
        _ = self.image_seq_length  # refuses, at once, a factor that does not divide the patch grid
        # The outer model owns lm_head, so it must know whether the language model ties it to its embeddings.
        kwargs["tie_word_embeddings"] = getattr(self.text_config, "tie_word_embeddings", False)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)

    @property
    def image_grid_size(self) -> int:
        """Patches per side of the encoder's square grid for `image_size`-px images."""
        return self.image_size // self.vision_config.patch_size

    @property
    def image_seq_length(self) -> int:
        """Number of tokens one image becomes: its patch grid (CLS and register tokens excluded), pixel-shuffled.

        The one place the count is computed: the model's image features, its attention mask (which keys image
        identity by it) and, through `from_backbones`, the processor's image span all read it.
        """
        side, factor = self.image_grid_size, self.pixel_shuffle_factor
        if not isinstance(factor, int) or factor < 1 or side % factor:
            raise ValueError(
                f"pixel_shuffle_factor must be a positive integer dividing the {side}×{side} patch grid "
                f"({self.image_size}-px images, {self.vision_config.patch_size}-px patches), got {factor!r}"
            )
        return (side // factor) ** 2

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["text_config"] = _portable_rope(output["text_config"])
        return output


ValignConfig.register_for_auto_class()


def check_loss_chunk_size(size: Any) -> None:
    """Refuse a `loss_chunk_size` that is neither None nor a positive int (a YAML string, 0, a float)."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"loss_chunk_size must be a positive int or None, got {size!r}")


# ==== transformers version bridges =============================================================================
# Every difference between the supported transformers releases (4.57 to 5.x) that valign has to bridge is handled
# here and nowhere else. Each shim says which releases need it and when it can go.

# 4.x reaches image-text models through AutoModelForVision2Seq, which 5.0 removed: one config.json names both.
# Remove "AutoModelForVision2Seq" when 4.x support ends.
AUTO_MAP = {
    "AutoConfig": "configuration_valign.ValignConfig",
    "AutoModel": "modeling_valign.ValignModel",
    "AutoModelForVision2Seq": "modeling_valign.ValignForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_valign.ValignForConditionalGeneration",
    "AutoProcessor": "processing_valign.ValignProcessor",
}

# The installed major, for what differs by major as a whole: a 5.x `save_pretrained` writes tokenizer and RoPE fields
# 4.x misreads, so files converted for one major are kept apart from the other's (`train/packaged.py`).
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# 4.x's ProcessorMixin resolves its attributes' classes from these class-level names; 5.x infers them and warns when
# they are named. Remove with 4.x support.
PROCESSOR_NAMES_ATTRIBUTE_CLASSES = TRANSFORMERS_MAJOR < 5

# 5.24 renamed `past_key_values` to `cache`: in output classes, decoder keywords and what `generate` passes.
# Older releases only know `past_key_values`. Remove when the oldest supported release is 5.24 or newer.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(cache: Any, past_key_values: Any) -> Any:
    """The KV cache a caller passed, under either name (5.24's `cache`, or `past_key_values` before it)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def _portable_rope(text_config: dict) -> dict:
    """Write the RoPE base under both spellings: 5.x reads `rope_parameters`, 4.x reads `rope_theta`.

    Without this, a 5.x-saved checkpoint loads in 4.x with the default base of 10,000 and silently wrong logits.
    Remove when 4.x support ends.
    """
    rope = text_config.get("rope_parameters") or {}
    if "rope_theta" in rope and text_config.get("rope_theta") is None:
        text_config["rope_theta"] = rope["rope_theta"]
    return text_config


def portable_tokenizer_config(config: dict) -> dict:
    """A `tokenizer_config.json` both majors read the same way. Remove both fixes when 4.x support ends.

    - 5.x writes `tokenizer_class: "TokenizersBackend"`, a class 4.x does not have.
    - 5.x writes the additional special tokens as a list under `extra_special_tokens`; 4.x reads that field as a
      dict of named tokens and fails (a misleading protobuf ImportError), but reads `additional_special_tokens`,
      which 5.x still accepts and converts.
    """
    config = dict(config)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        config["additional_special_tokens"] = extra
    return config


# Some 5.x release before 5.23 renamed gradient checkpointing to activation checkpointing (`TrainingArguments`
# fields and `PreTrainedModel` methods) and warns on the old names; 4.57 knows only the old ones. Remove with 4.x.
def checkpointing_arguments(use_reentrant: bool = False) -> dict:
    """`TrainingArguments` keywords that turn activation checkpointing on, in the installed release's names."""
    from transformers import TrainingArguments

    name = "activation_checkpointing"
    if name not in TrainingArguments.__dataclass_fields__:
        name = "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": use_reentrant}}


def enable_checkpointing(model: Any, use_reentrant: bool = False) -> None:
    """Turn activation checkpointing on for `model` (a `PreTrainedModel` or a PEFT model around one)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def warmup_argument(ratio: float) -> dict[str, float]:
    """`TrainingArguments` keywords for a warmup over `ratio` of the steps: 5.x takes a ratio as a float
    `warmup_steps` < 1 and dropped `warmup_ratio`; 4.x has both. Remove with 4.x."""
    from transformers import TrainingArguments

    name = "warmup_ratio" if "warmup_ratio" in TrainingArguments.__dataclass_fields__ else "warmup_steps"
    return {name: ratio}


def fsdp_plugin_arguments(args: Any) -> dict | None:
    """The FSDP plugin's arguments a `TrainingArguments` carries (5.x), or None. 4.x hands FSDP to accelerate through
    environment variables, from which accelerate builds no FSDP for CPU processes (it failed: "no available
    devices"): refused there. Remove with 4.x."""
    if TRANSFORMERS_MAJOR < 5 and args.fsdp and args.use_cpu:
        raise ValueError(
            "FSDP on CPU processes needs transformers 5; with 4.x, train on CPUs without `fsdp` (DDP) or on GPUs"
        )
    return getattr(args, "fsdp_plugin_args", None)


@contextlib.contextmanager
def accelerate_environment_kept() -> Iterator[None]:
    """Run a stage's Trainer in this block: 4.x's `TrainingArguments` hand mixed precision and FSDP to accelerate by
    writing environment variables (`ACCELERATE_MIXED_PRECISION`, `ACCELERATE_USE_FSDP`, `FSDP_*`), which later
    stages of the process then inherited (an fp32 stage after a bf16 one trained in bf16: tests/test_training.py);
    after the block those variables are as before. 5.x hands them to accelerate directly. Remove with 4.x."""
    prefixes = ("ACCELERATE_", "FSDP_")  # every variable 4.57's TrainingArguments write
    saved = {key: value for key, value in os.environ.items() if key.startswith(prefixes)}
    try:
        yield
    finally:
        if TRANSFORMERS_MAJOR < 5:
            for key in [key for key in os.environ if key.startswith(prefixes)]:
                del os.environ[key]
            os.environ.update(saved)


def unmarked_gguf_config(config: PretrainedConfig) -> PretrainedConfig:
    """`config` of a model loaded from a GGUF file, without the quantization mark 5.x gives it (its `save_pretrained`
    refuses a model so marked, though the weights are dequantized); 4.57 sets none. Remove with 4.x: then always."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config
