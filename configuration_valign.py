"""Configuration of valign: a vision encoder, a 2-layer MLP projector and a decoder-only language model.

Defaults reproduce the shapes of arXiv 2503.19508: SigLIP so400m-patch14-224 (256 patch tokens) and
Qwen2.5-0.5B-Instruct. This file is served as Hub remote code, so it imports nothing but transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

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
# One config.json serves both majors: 4.x users reach the model through AutoModelForVision2Seq, which 5.x removed.
AUTO_MAP = {
    "AutoConfig": "configuration_valign.ValignConfig",
    "AutoModel": "modeling_valign.ValignModel",
    "AutoModelForVision2Seq": "modeling_valign.ValignForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_valign.ValignForConditionalGeneration",
    "AutoProcessor": "processing_valign.ValignProcessor",
}


def _as_config(value: dict | PretrainedConfig | None, default: dict) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    kwargs = dict(default if value is None else value)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def _portable_rope(text_config: dict) -> dict:
    """Write the RoPE base under both spellings: transformers 5 reads `rope_parameters`, 4.x reads `rope_theta`.

    Without this, a 5.x-saved checkpoint loads in 4.x with the default base of 10,000 and silently wrong logits.
    """
    rope = text_config.get("rope_parameters") or {}
    if "rope_theta" in rope and text_config.get("rope_theta") is None:
        text_config["rope_theta"] = rope["rope_theta"]
    return text_config


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
        image_token_id (`int`, *optional*, defaults to 151655):
            Token id that stands for one image patch in `input_ids` (Qwen2.5's `<|image_pad|>`).
        attn_mode (`str`, *optional*, defaults to `"hybrid"`):
            Attention policy applied inside `forward`: `"hybrid"` (image tokens of one image attend to each other
            both ways, the rest is causal), `"bidirectional"` (every token sees every token; alignment stage only)
            or `"causal"` (a plain language model).
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
        image_token_id: int = QWEN_IMAGE_PAD_ID,
        attn_mode: str = "hybrid",
        **kwargs: Any,
    ) -> None:
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
        self.vision_config = _as_config(vision_config, DEFAULT_VISION_CONFIG)
        self.text_config = _as_config(text_config, DEFAULT_TEXT_CONFIG)
        self.projector_hidden_size = projector_hidden_size or self.text_config.hidden_size
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_layer = vision_feature_layer
        self.image_token_id = image_token_id
        self.attn_mode = attn_mode
        # The outer model owns lm_head, so it must know whether the language model ties it to its embeddings.
        kwargs["tie_word_embeddings"] = getattr(self.text_config, "tie_word_embeddings", False)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)

    @property
    def image_seq_length(self) -> int:
        """Number of patch tokens one image becomes (CLS and register tokens excluded)."""
        vision = self.vision_config
        if getattr(vision, "num_patches", None):  # SigLIP2 NaFlex counts patches directly
            return vision.num_patches
        return (vision.image_size // vision.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["text_config"] = _portable_rope(output["text_config"])
        return output


ValignConfig.register_for_auto_class()
