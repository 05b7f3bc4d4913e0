"""The compiled runtime (export/compiled_runtime.py): a static KV cache and compiled graphs decode the same greedy
tokens as eager `generate`, with the hybrid mask and left padding; int8 weights are int8 and mostly agree; bad
settings get clear errors; the runtime choice takes it where it pays."""

from __future__ import annotations

import pytest
import torch
from conftest import prompts, shape_image

from valign.checkpoint import load_checkpoint
from valign.export.compiled_runtime import CompiledValign
from valign.export.runtime import choose_runtime, load_for_generation

QUESTIONS = ["What colour is the shape?", "Describe the image in detail, with many words, please."]


@pytest.fixture(scope="module", autouse=True)
def no_silent_eager_fallback():
    """A graph recompiled at every step (e.g. for a new stride) hits dynamo's limit, after which it runs eagerly:
    the same tokens, the speed lost. Here that is an error."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


@pytest.fixture(scope="module")
def eager_and_compiled(checkpoint):
    """The test checkpoint twice, in fp32: as loaded (eager `generate`) and wrapped by the compiled runtime."""
    eager, processor = load_checkpoint(checkpoint)
    compiled = CompiledValign(load_checkpoint(checkpoint)[0])
    return eager.eval(), compiled, processor


@pytest.fixture(scope="module")
def batch(eager_and_compiled) -> dict:
    """Two prompts of different lengths (so one is left-padded), each with its own image."""
    processor = eager_and_compiled[2]
    return processor(images=[shape_image("red"), shape_image("blue")], text=prompts(processor, QUESTIONS))


@pytest.mark.parametrize("mode", ["hybrid", "causal"])
def test_compiled_runtime_decodes_the_tokens_eager_generate_decodes(eager_and_compiled, batch, mode: str):
    eager, compiled, _ = eager_and_compiled
    expected = eager.generate(**batch, attn_mode=mode, max_new_tokens=12, do_sample=False)
    assert batch["attention_mask"][:, 0].tolist() == [0, 1]  # the short prompt is left-padded
    assert torch.equal(compiled.generate(**batch, attn_mode=mode, max_new_tokens=12), expected)
    one = {key: value[1:] for key, value in batch.items()}  # a batch of one: no padding, another graph
    assert torch.equal(compiled.generate(**one, attn_mode=mode, max_new_tokens=12), expected[1:])


def test_compiled_runtime_refuses_what_it_cannot_decode(eager_and_compiled, batch):
    _, compiled, _ = eager_and_compiled
    with pytest.raises(ValueError, match="greedily only"):
        compiled.generate(**batch, do_sample=True)
    with pytest.raises(ValueError, match="bidirectional"):
        compiled.generate(**batch, attn_mode="bidirectional")
    with pytest.raises(ValueError, match="weights must be one of"):
        CompiledValign(compiled.model, weights="int3")


def test_int8_weights_are_int8_and_decode_mostly_the_same_tokens(checkpoint, eager_and_compiled, batch):
    eager, _, _ = eager_and_compiled
    quantized = CompiledValign(load_checkpoint(checkpoint)[0], weights="int8")
    projections = quantized.model.model.language_model.layers[0].mlp.gate_proj.weight
    assert projections.qdata.dtype == torch.int8
    head = quantized.model.lm_head.weight
    assert head.qdata.dtype == torch.int8
    expected = eager.generate(**batch, max_new_tokens=12, do_sample=False)
    tokens = quantized.generate(**batch, max_new_tokens=12)
    prompt = batch["input_ids"].shape[1]
    agreement = (tokens[:, prompt:] == expected[:, prompt:]).float().mean().item()
    assert agreement >= 0.5  # random tiny weights: near ties are common, yet most greedy tokens survive int8


def test_auto_takes_the_compiled_runtime_where_it_pays(checkpoint, monkeypatch):
    monkeypatch.setattr("valign.export.runtime.native_bf16", lambda device="cpu": True)
    assert choose_runtime("auto", checkpoint, generations=1) == "torch"  # compiling costs more than one caption
    assert choose_runtime("auto", checkpoint) == "compiled"  # unknown count: a server, many generations
    assert choose_runtime("auto", checkpoint, precision="int8", generations=1) == "compiled"
    monkeypatch.setattr("valign.export.runtime.native_bf16", lambda device="cpu": False)
    assert choose_runtime("auto", checkpoint) == "torch"  # fp32 compiled decodes no faster than the fp32 export
    model, _, used = load_for_generation(checkpoint, runtime="compiled", precision="fp32")
    assert used == "compiled" and isinstance(model, CompiledValign)
    assert next(model.model.parameters()).dtype == torch.float32
