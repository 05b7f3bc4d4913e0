"""bench/packing.py's workload: uneven multi-turn image conversations, the same samples padded and packed."""

from __future__ import annotations

import copy
import statistics
from collections import Counter

import packing
import pytest
import torch
from conftest import shape_image
from harness import trainer_optimizer
from transformers import TrainingArguments

from valign.modeling_valign import IGNORE_INDEX, SDPA_PER_SAMPLE
from valign.train.trainer import ValignTrainer

WORDS = ["red", "circle", "square", "on", "the", "left", "a", "blue", "big", "small"]


def text_words(sample: dict) -> int:
    return sum(len(p["text"].split()) for m in sample["messages"] for p in m["content"] if p["type"] == "text")


def test_conversations_are_uneven_multi_turn_with_one_image_and_capped_text():
    samples = packing.conversations(400, WORDS, image=None)
    turns = [len(s["messages"]) // 2 for s in samples]
    words = [text_words(s) for s in samples]
    assert min(turns) == 1 and max(turns) > 4 and max(turns) <= 8
    assert max(words) <= packing.MAX_TEXT_TOKENS
    assert statistics.quantiles(words, n=10)[-1] > 3 * statistics.median(words)  # a heavy tail: padding costs
    for sample in samples:
        images = [p for m in sample["messages"] for p in m["content"] if p["type"] == "image"]
        assert len(images) == 1 and sample["messages"][0]["content"][0]["type"] == "image"
        assert [m["role"] for m in sample["messages"]] == ["user", "assistant"] * (len(sample["messages"]) // 2)


def test_packed_steps_train_the_same_supervised_tokens_in_fewer_slots(model_and_processor):
    processor = model_and_processor[1]
    samples = packing.conversations(8, WORDS, shape_image("red"))
    max_length = processor.image_seq_length + 4 * packing.MAX_TEXT_TOKENS
    data = packing.batches(processor, samples, 4, max_length)
    assert len(data[False]) == len(data[True]) == 2
    for padded, packed in zip(data[False], data[True]):

        def supervised(batch: dict) -> Counter:
            labels = batch["labels"]
            return Counter(labels[labels != IGNORE_INDEX].tolist())

        assert supervised(packed) == supervised(padded) and sum(supervised(padded).values()) > 0
        # rows long enough for the whole batch (the paper recipe's `pack_length`): one row, no padding left
        assert len(packed["input_ids"]) == 1 and packed["input_ids"].numel() == padded["attention_mask"].sum()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_benchmark_trains_the_same_model_packed_and_padded(model_and_processor, checkpointing):
    """Its training loop on the tiny model (the CPU run that keeps the GPU benchmark from rotting): before any step,
    the packed and padded first batches give the same loss and gradients (from logits at the supervised positions,
    as the trainer computes it), with and without activation checkpointing; every step is timed and each variant's
    step is profiled."""
    model, processor = model_and_processor
    samples = packing.conversations(6, WORDS, shape_image("red"))
    data = packing.batches(processor, samples, 2, processor.image_seq_length + 4 * packing.MAX_TEXT_TOKENS)
    variants = packing.variants_for(["sdpa", SDPA_PER_SAMPLE])
    shape = packing.Shape("tiny", "the tests' model", None, 2, 0, 2, 0, torch.float32, 1)
    result = packing.train(copy.deepcopy(model.config), data, variants, shape, profile=3, checkpointing=checkpointing)
    assert result["agreement"]["loss"] < 1e-5 and result["agreement"]["gradient"] < 1e-4
    assert all(len(result["seconds"][v.label]) == 2 for v in variants) and min(result["flops"]) > 0
    assert result["profiles"].keys() == {v.label for v in variants}
    for top in result["profiles"].values():  # each variant's costliest operators, costliest first
        shares = [share for _, share in top]
        assert len(top) == 3 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1


def test_the_benchmarks_step_with_the_optimizer_the_trainer_builds(model_and_processor, tmp_path):
    """A bare `torch.optim.AdamW` on a CPU runs a per-tensor loop, the trainer a fused kernel: the benchmarks would
    time an optimizer no run uses."""
    model = copy.deepcopy(model_and_processor[0])
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    rates = {"vision_tower": 1e-5, "multi_modal_projector": 1e-3, "language_model": 1e-4}
    built_by_trainer = ValignTrainer(model=model, args=args, learning_rates=rates).create_optimizer()
    built_by_benchmarks = trainer_optimizer(model.parameters())
    assert type(built_by_benchmarks) is type(built_by_trainer)

    def settings(optimizer) -> dict:
        return {k: v for k, v in optimizer.defaults.items() if k not in ("lr", "weight_decay")}

    assert settings(built_by_benchmarks) == settings(built_by_trainer) and settings(built_by_trainer)["fused"]


def test_agreement_in_place_equals_comparing_copies_of_every_gradient():
    # first_batch_agreement copies no gradient (negates the reference in place, three variants sharing its model
    # here); copies give the same numbers
    torch.manual_seed(0)
    models = {"a": torch.nn.Linear(4, 3), "b": torch.nn.Linear(4, 3)}
    models["b"].load_state_dict(models["a"].state_dict())
    variants = [packing.Variant(f"{k} {i}", k, bool(i)) for k, i in [("a", 0), ("a", 1), ("b", 0), ("a", 2), ("b", 1)]]
    inputs = {v.label: torch.randn(5, 4) for v in variants}

    def forward_backward(variant: packing.Variant, index: int) -> torch.Tensor:
        loss = models[variant.weights](inputs[variant.label]).sin().mean()
        loss.backward()
        return loss.detach()

    copies = []
    for variant in variants:
        models[variant.weights].zero_grad(set_to_none=True)
        loss = float(forward_backward(variant, 0))
        copies.append((loss, [p.grad.clone() for p in models[variant.weights].parameters()]))
    (loss, grads), others = copies[0], copies[1:]
    expected_loss = max(abs(other - loss) for other, _ in others)
    expected_gradient = max((g - r).abs().max().item() for _, o in others for g, r in zip(o, grads))
    expected_gradient /= max(g.abs().max().item() for g in grads)

    agreement = packing.first_batch_agreement(variants, forward_backward, models)
    assert expected_gradient > 0.1  # different inputs: the check is not comparing zeros
    assert agreement == {"loss": pytest.approx(expected_loss), "gradient": pytest.approx(expected_gradient)}
    assert all(p.grad is None for m in models.values() for p in m.parameters())  # nothing left behind
    for index in range(1, len(variants)):  # each variant's own difference counts (the largest is not always last)
        alone = packing.first_batch_agreement([variants[0], variants[index]], forward_backward, models)
        difference = max((g - r).abs().max().item() for g, r in zip(copies[index][1], grads))
        assert alone["gradient"] == pytest.approx(difference / max(g.abs().max().item() for g in grads))


def test_per_sample_sdpa_variants_share_sdpas_model_and_run_on_packed_rows_only():
    variants = packing.variants_for(["sdpa", SDPA_PER_SAMPLE, "flex_attention"])
    assert [(v.label, v.weights) for v in variants] == [
        ("sdpa, padded", "sdpa"),
        ("sdpa, packed", "sdpa"),
        (f"{SDPA_PER_SAMPLE}, packed", "sdpa"),
        ("flex_attention, padded", "flex_attention"),
        ("flex_attention, packed", "flex_attention"),
    ]
