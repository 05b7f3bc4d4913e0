"""Padding-free packed training: samples end to end in a row compute exactly what they compute alone."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import shape_image
from test_attention import reference_allowed
from test_training import assert_trained_alike, data_root, stage, weights  # noqa: F401  (data_root is a fixture)

import valign.train.run
from valign.checkpoint import load_checkpoint
from valign.modeling_valign import IGNORE_INDEX, SDPA_PER_SAMPLE, build_attention_mask, document_ids_of
from valign.train.collator import ConversationCollator, pack_rows
from valign.train.run import run_stage

COLORS = ["red", "green", "blue", "yellow", "purple"]


def conversation(sample_id: str, answer: str, color: str, image: bool = True) -> dict:
    question = [{"type": "text", "text": "Describe the picture."}]
    messages = [
        {"role": "user", "content": ([{"type": "image"}] if image else []) + question},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return {"id": sample_id, "image": shape_image(color) if image else None, "messages": messages}


def uneven_samples() -> list[dict]:
    """Five samples of very different lengths, one without an image."""
    answers = ["A red circle.", "Two shapes " * 9, "Green.", "A blue square on white " * 4, "Nothing at all here."]
    return [conversation(f"s{i}", a, c, image=i != 2) for i, (a, c) in enumerate(zip(answers, COLORS))]


def test_rows_hold_every_sample_once_within_capacity():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 30))]
        rows = pack_rows(lengths, 100)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert pack_rows([60, 40, 30, 70], 100) == [[3, 2], [0, 1]]
    assert pack_rows([340, 330, 320, 310], 1024) == [[0, 3], [1, 2]]  # two even rows, not 3 + 1


def test_packed_mask_keeps_each_sample_to_itself():
    # two samples: [text, image(3), text] then [image(3), text, text], and a padding tail sample of 2 tokens
    is_image = [0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0]
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]])
    documents = document_ids_of(positions)
    for mode in ("causal", "hybrid", "bidirectional"):
        mask = build_attention_mask(
            None, torch.tensor([is_image]).bool(), mode, 0, 3, torch.float32, document_ids=documents
        )
        expected = torch.block_diag(
            *(
                reference_allowed([1] * n, [bool(f) for f in flags], mode, 3)
                for n, flags in ((5, is_image[:5]), (5, is_image[5:10]), (2, is_image[10:]))
            )
        )
        torch.testing.assert_close(mask[0, 0] == 0, expected, msg=mode)


def test_collator_packs_the_same_tokens_into_fewer_rows(model_and_processor):
    _, processor = model_and_processor
    samples = uneven_samples()
    padded = ConversationCollator(processor, max_length=512)(samples)
    packed = ConversationCollator(processor, max_length=512, packing=True)(samples)
    assert "attention_mask" not in packed and packed["input_ids"].numel() < padded["input_ids"].numel()
    pad_id = processor.tokenizer.pad_token_id

    def multiset(batch: dict, name: str, skip: int) -> list[int]:
        return sorted(batch[name][batch[name] != skip].tolist())

    assert multiset(packed, "input_ids", pad_id) == multiset(padded, "input_ids", pad_id)
    assert multiset(packed, "labels", IGNORE_INDEX) == multiset(padded, "labels", IGNORE_INDEX)
    assert int((packed["position_ids"] == 0).sum()) >= len(samples)  # one restart per sample (+ padding tails)
    assert packed["pixel_values"].shape == padded["pixel_values"].shape  # their order: see the logits test


@pytest.mark.parametrize("mode", ["causal", "hybrid", "bidirectional"])
def test_packed_loss_and_gradients_equal_the_padded_ones(model_and_processor, mode):
    model, processor = model_and_processor
    samples = uneven_samples()
    results = []
    for packing in (False, True):
        batch = ConversationCollator(processor, max_length=512, packing=packing)(samples)
        model.zero_grad()
        loss = model(**batch, attn_mode=mode).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    model.zero_grad()
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == padded_grads.keys() and len(padded_grads) > 20
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_logits_of_each_sample_equal_its_logits_alone(model_and_processor):
    model, processor = model_and_processor
    samples = uneven_samples()
    collator = ConversationCollator(processor, max_length=512, packing=True)
    packed = collator(samples)
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        for sample in samples:
            alone = ConversationCollator(processor, max_length=512)([sample])
            expected = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
            row, start = locate(packed["input_ids"], alone["input_ids"][0])
            torch.testing.assert_close(logits[row, start : start + len(expected)], expected, rtol=1e-4, atol=1e-4)


def locate(rows: torch.Tensor, ids: torch.Tensor) -> tuple[int, int]:
    for row in range(rows.shape[0]):
        for start in range(rows.shape[1] - len(ids) + 1):
            if torch.equal(rows[row, start : start + len(ids)], ids):
                return row, start
    raise AssertionError("sample not found in the packed rows")


def test_a_sample_never_predicts_the_next_samples_first_token(model_and_processor):
    model, _ = model_and_processor
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with_boundary_label = ids.clone()  # every token supervised, including the second sample's first one
    without = ids.clone()
    without[0, 3] = IGNORE_INDEX
    with torch.no_grad():
        a = model(input_ids=ids, position_ids=positions, labels=with_boundary_label).loss
        b = model(input_ids=ids, position_ids=positions, labels=without).loss
    torch.testing.assert_close(a, b)


def test_packed_rows_refuse_kernels_without_custom_masks(model_and_processor):
    model, _ = model_and_processor
    text_config = model.config.text_config
    original = text_config._attn_implementation
    text_config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="packed rows need a custom 4D attention mask"):
            model(input_ids=torch.tensor([[5, 6, 7, 8]]), position_ids=torch.tensor([[0, 1, 0, 1]]), attn_mode="causal")
    finally:
        text_config._attn_implementation = original


def test_pack_length_shorter_than_max_length_is_refused(model_and_processor):
    with pytest.raises(ValueError, match="pack_length=64 must be at least max_length=128"):
        ConversationCollator(model_and_processor[1], max_length=128, packing=True, pack_length=64)


def test_packed_stage_trains_to_the_same_weights_with_per_sample_sdpa(checkpoint, data_root, tmp_path, monkeypatch):  # noqa: F811
    kernels = []

    def loading(*args, **kwargs):
        kernels.append(kwargs["attn_implementation"])
        return load_checkpoint(*args, **kwargs)

    monkeypatch.setattr(valign.train.run, "load_checkpoint", loading)
    for packing in (False, True):
        run_stage(
            stage("s", max_steps=3, packing=packing, max_length=256), checkpoint, tmp_path / str(packing), data_root
        )
    assert kernels == ["sdpa", SDPA_PER_SAMPLE]
    padded, packed = weights(tmp_path / "False"), weights(tmp_path / "True")
    assert_trained_alike(packed, padded)
