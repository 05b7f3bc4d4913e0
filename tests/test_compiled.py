"""The compiled runtime (export/compiled_runtime.py): a static KV cache and compiled graphs decode the same greedy
tokens as eager `generate`, with the hybrid mask and left padding; int8 weights are int8 and mostly agree; bad
settings get clear errors; the runtime choice takes it where it pays."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_bad_requests_refused, prompts, shape_image
from torch._dynamo.utils import counters

from valign.checkpoint import load_checkpoint
from valign.eval.generate import DecodingSettings, generate_answers
from valign.export import compiled_runtime
from valign.export.compiled_runtime import PROMPT_BUCKET, CompiledValign
from valign.export.runtime import checkpoint_parameters, choose_runtime, load_for_generation

QUESTIONS = ["What colour is the shape?", "Describe the image in detail, with many words, please."]
# Before transformers 5.24 (the canary's 4.57 and 5.23) the runtime refuses to start, as the last test asserts.
needs_the_runtime = pytest.mark.skipif(not compiled_runtime.AVAILABLE, reason="the compiled runtime needs 5.24")


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


@needs_the_runtime
@pytest.mark.parametrize("mode", ["hybrid", "causal"])
def test_compiled_runtime_decodes_the_tokens_eager_generate_decodes(eager_and_compiled, batch, mode: str):
    eager, compiled, _ = eager_and_compiled
    expected = eager.generate(**batch, attn_mode=mode, max_new_tokens=12, do_sample=False)
    assert batch["attention_mask"][:, 0].tolist() == [0, 1]  # the short prompt is left-padded
    assert torch.equal(compiled.generate(**batch, attn_mode=mode, max_new_tokens=12), expected)
    one = {key: value[1:] for key, value in batch.items()}  # a batch of one: no padding, another graph
    assert torch.equal(compiled.generate(**one, attn_mode=mode, max_new_tokens=12), expected[1:])


@needs_the_runtime
def test_graphs_are_compiled_per_shape_not_per_token_or_prompt_length(checkpoint, eager_and_compiled, monkeypatch):
    processor = eager_and_compiled[2]
    runtime = CompiledValign(load_checkpoint(checkpoint)[0])
    monkeypatch.setattr(compiled_runtime, "cpu_has_amx", lambda: True)  # one-row steps by the GEMM template
    short, longer = (
        processor(images=[shape_image("green")], text=prompts(processor, [q])) for q in ("Green?", "Is it green?")
    )
    lengths = short["input_ids"].shape[1], longer["input_ids"].shape[1]
    assert lengths[0] < lengths[1] and math.ceil(lengths[0] / PROMPT_BUCKET) == math.ceil(lengths[1] / PROMPT_BUCKET)

    def graphs_compiled(inputs: dict, new_tokens: int) -> tuple[int, int]:
        """Graphs compiled by one generation, and the C++ GEMM template kernels among their code."""
        graphs, templates = counters["stats"]["unique_graphs"], counters["inductor"]["cpp_templated_kernel_counter"]
        with torch._inductor.config.patch(fx_graph_cache=False):  # generate the code, not a cached graph's
            runtime.generate(**inputs, max_new_tokens=new_tokens)
        return (
            counters["stats"]["unique_graphs"] - graphs,
            counters["inductor"]["cpp_templated_kernel_counter"] - templates,
        )

    graphs, templates = graphs_compiled(short, 2)
    # The prompt's graph, unbroken (the runner checks the images before it), and one decode step's, whose products
    # are the template's.
    assert graphs == 2 and templates > 0
    assert graphs_compiled(longer, 12) == (0, 0)  # another prompt length in the bucket, more steps: nothing new
    two_rows = processor(images=[shape_image("green")] * 2, text=prompts(processor, ["Green?"] * 2))
    graphs, templates = graphs_compiled(two_rows, 2)
    assert graphs == 2 and templates == 0  # several rows decode through oneDNN
    monkeypatch.setattr(compiled_runtime, "cpu_has_amx", lambda: False)  # so does one row without AMX
    runtime = CompiledValign(load_checkpoint(checkpoint)[0])
    graphs, templates = graphs_compiled(short, 2)
    assert graphs > 0 and templates == 0


@needs_the_runtime
def test_a_last_smaller_batch_is_filled_up_and_compiles_nothing(checkpoint, eager_and_compiled):
    eager, _, processor = eager_and_compiled
    runtime = CompiledValign(load_checkpoint(checkpoint)[0])
    images = [shape_image(color) for color in ("red", "blue", "green")]
    questions = ["What colour is the shape?"] * 3
    settings = DecodingSettings(max_new_tokens=6, batch_size=2)
    generate_answers(runtime, processor, images[:2], questions[:2], settings, progress=False)  # batch 2's graphs
    graphs = counters["stats"]["unique_graphs"]
    answers = generate_answers(runtime, processor, images, questions, settings, progress=False)
    assert counters["stats"]["unique_graphs"] == graphs  # the last batch of one ran as two rows
    # the filler's answer (the green one's copy) is dropped: three answers, each eager generate's
    assert answers == generate_answers(eager, processor, images, questions, settings, progress=False)


@needs_the_runtime
def test_compiled_runtime_refuses_what_it_cannot_decode(eager_and_compiled, batch):
    _, compiled, _ = eager_and_compiled
    assert_bad_requests_refused(compiled.generate, batch)
    with pytest.raises(ValueError, match="weights must be one of"):
        CompiledValign(compiled.model, weights="int3")


@needs_the_runtime
@pytest.mark.parametrize("weights", ["int8", "w8a8"])
def test_quantized_decoding_has_int8_weights_and_mostly_the_same_tokens(checkpoint, eager_and_compiled, batch, weights):
    eager, _, _ = eager_and_compiled
    quantized = CompiledValign(load_checkpoint(checkpoint)[0], weights=weights)
    projections = quantized.decoder.layers[0].mlp.gate_proj.weight
    assert projections.qdata.dtype == torch.int8
    assert quantized.decoder_head.weight.qdata.dtype == torch.int8
    # The prompt keeps the float weights; the embedding table is shared, not copied.
    assert quantized.model.model.language_model.layers[0].mlp.gate_proj.weight.dtype == torch.float32
    assert quantized.decoder.get_input_embeddings() is quantized.model.get_input_embeddings()
    expected = eager.generate(**batch, max_new_tokens=12, do_sample=False)
    tokens = quantized.generate(**batch, max_new_tokens=12)
    prompt = batch["input_ids"].shape[1]
    agreement = (tokens[:, prompt:] == expected[:, prompt:]).float().mean().item()
    assert agreement >= 0.5  # random tiny weights: near ties are common, yet most greedy tokens survive int8


@needs_the_runtime
def test_auto_takes_the_compiled_runtime_where_it_pays(checkpoint, model_and_processor, monkeypatch):
    monkeypatch.setattr("valign.export.runtime.native_bf16", lambda device="cpu": True)
    stored = sum(p.numel() for p in model_and_processor[0].parameters())  # a tied weight counted once
    assert checkpoint_parameters(checkpoint) == stored
    assert choose_runtime("auto", checkpoint) == "torch"  # too small for compiling to pay, however many captions
    monkeypatch.setattr("valign.export.runtime.COMPILE_PAYS_FROM", stored)  # as if it were large
    assert choose_runtime("auto", checkpoint, generations=1) == "torch"  # compiling costs more than one caption
    assert choose_runtime("auto", checkpoint) == "compiled"  # unknown count: a server, many generations
    with monkeypatch.context() as older:  # transformers before 5.24 (the compiled runtime refuses to start there)
        older.setattr("valign.export.runtime.COMPILED_AVAILABLE", False)
        assert choose_runtime("auto", checkpoint) == "torch"
    assert choose_runtime("auto", checkpoint, precision="int8", generations=1) == "compiled"
    assert choose_runtime("auto", checkpoint, precision="w8a8", generations=1) == "compiled"
    with pytest.raises(ValueError, match="w8a8 weights run on the compiled runtime"):
        load_for_generation(checkpoint, runtime="torch", precision="w8a8")
    with pytest.raises(ValueError, match="not w8a8"):
        load_for_generation(checkpoint, runtime="onnx", precision="w8a8")
    monkeypatch.setattr("valign.export.runtime.native_bf16", lambda device="cpu": False)
    assert choose_runtime("auto", checkpoint) == "torch"  # fp32 compiled decodes no faster than the fp32 export
    model, _, used = load_for_generation(checkpoint, runtime="compiled", precision="fp32")
    assert used == "compiled" and isinstance(model, CompiledValign)
    assert next(model.model.parameters()).dtype == torch.float32


def test_the_runtime_refuses_to_start_before_transformers_5_24(checkpoint, monkeypatch):
    monkeypatch.setattr(compiled_runtime, "AVAILABLE", False)  # as it is there: no appending StaticCache.update
    with pytest.raises(RuntimeError, match=r"needs transformers 5\.24 or newer"):
        CompiledValign(load_checkpoint(checkpoint)[0])
