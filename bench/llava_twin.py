"""transformers' `LlavaForConditionalGeneration` built from the very parts of a valign model: the reference the
benchmark compares against, and the model valign's causal mode must agree with (tests/test_llava_parity.py)."""

from __future__ import annotations

import itertools

import torch
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
    """A LLaVA whose vision tower, projector, language model and head *are* valign's modules (shared, not copied):
    both compute from the same weights, and training either needs one set of weights, gradients and AdamW state."""
    with torch.device("meta"):  # LLaVA's own parts are replaced below: never allocate them
        llava = LlavaForConditionalGeneration(llava_config_of(model))
    tower = llava.model.vision_tower
    if unwrap_vision_encoder(tower) is tower:
        llava.model.vision_tower = model.model.vision_tower
    else:  # transformers 4.x: keep the wrapper LLaVA calls, holding valign's encoder
        tower.vision_model = model.model.vision_tower
    llava.model.multi_modal_projector = model.model.multi_modal_projector
    llava.model.language_model = model.model.language_model
    llava.lm_head = model.lm_head
    if any(t.is_meta for t in itertools.chain(llava.parameters(), llava.buffers())):
        raise RuntimeError("LLaVA holds a part valign does not share: the comparison would be meaningless")
    llava.generation_config.pad_token_id = model.generation_config.pad_token_id
    llava.generation_config.eos_token_id = model.generation_config.eos_token_id
    return llava.eval()
