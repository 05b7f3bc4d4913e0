"""transformers' `LlavaForConditionalGeneration` built from the very parts of a valign model: the reference the
benchmark compares against, and the model valign's causal mode must agree with (tests/test_llava_parity.py)."""

from __future__ import annotations

from transformers import LlavaConfig, LlavaForConditionalGeneration

from valign import ValignForConditionalGeneration
from valign.modeling_valign import unwrap_vision_encoder


def llava_config_of(model: ValignForConditionalGeneration) -> LlavaConfig:
    config = model.config
    if config.projector_hidden_size != config.text_config.hidden_size:
        raise ValueError("LLaVA's projector is vision width → text width → text width; valign's is wider here")
    return LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        projector_hidden_act=config.projector_hidden_act,
        # SigLIP has no CLS token: every patch is a feature ("full"). LLaVA reads `hidden_states[layer]`, which for
        # layer -1 is before SigLIP's post-layernorm; valign's -1 is after it (see DESIGN.md).
        vision_feature_select_strategy="full",
        vision_feature_layer=config.vision_feature_layer,
        image_seq_length=config.image_seq_length,
        tie_word_embeddings=config.text_config.tie_word_embeddings,
    )


def llava_twin(model: ValignForConditionalGeneration) -> LlavaForConditionalGeneration:
    """A LLaVA with valign's vision tower, projector, language model and head, weights copied."""
    llava = LlavaForConditionalGeneration(llava_config_of(model)).to(model.dtype)
    unwrap_vision_encoder(llava.model.vision_tower).load_state_dict(model.model.vision_tower.state_dict())
    llava.model.multi_modal_projector.load_state_dict(model.model.multi_modal_projector.state_dict())
    llava.model.language_model.load_state_dict(model.model.language_model.state_dict())
    llava.lm_head.load_state_dict(model.lm_head.state_dict())
    llava.generation_config.pad_token_id = model.generation_config.pad_token_id
    llava.generation_config.eos_token_id = model.generation_config.eos_token_id
    return llava.eval()
