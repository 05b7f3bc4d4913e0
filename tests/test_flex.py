"""Flex attention: the same policy as the dense mask, rendered as a BlockMask that skips fully blocked blocks.

Gradients are compared on CUDA only: torch (2.13) has no flex-attention backward on CPU ("FlexAttention does not
support backward on CPU", eager and compiled alike), so on a CPU-only machine that test is skipped and the forward
tests below are what runs. And compiled with dynamic shapes, which dynamo turns on once a second sequence length
arrives, torch's CPU flex template fails to compile (a C++ error, `cur_qSplitSize4` undeclared; plain Qwen2
generating with left padding hits it too), so these tests compile each shape statically (`STATIC_SHAPES`; README,
"Attention kernels").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import other_major_python, prompts, run_script, shape_image
from safetensors.torch import load_file
from test_attention import reference_allowed
from test_packing import conversation, uneven_samples

import valign
from valign import ValignForConditionalGeneration, ValignProcessor
from valign.checkpoint import save_checkpoint
from valign.modeling_valign import build_attention_mask, document_ids_of
from valign.train.backbones import build_tiny_backbones
from valign.train.collator import ConversationCollator


def packed_row(lengths: list[int], image_at: int, per_image: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Position ids, image flags and the element-by-element reference mask of one packed row: samples of `lengths`
    tokens, each with one image of `per_image` tokens starting at its token `image_at`."""
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    flags = [[image_at <= i < image_at + per_image for i in range(n)] for n in lengths]
    expected = torch.block_diag(*(reference_allowed([1] * len(f), f, "hybrid", per_image) for f in flags))
    return positions, torch.tensor([[flag for sample in flags for flag in sample]]), expected


def test_the_block_mask_computes_exactly_the_blocks_someone_sees():
    # 3 packed samples over 4 blocks of 128 tokens: most block pairs belong to no sample and must be skipped.
    positions, is_image, expected = packed_row([200, 100, 212], image_at=10, per_image=64)
    documents = document_ids_of(positions)
    blocks = build_attention_mask(None, is_image, "hybrid", 0, 64, torch.float32, documents, "flex_attention")
    dense = build_attention_mask(None, is_image, "hybrid", 0, 64, torch.float32, documents)
    torch.testing.assert_close(dense[0, 0] == 0, expected)
    size = blocks.BLOCK_SIZE[0]
    n = expected.shape[0] // size
    anything_seen = expected.reshape(n, size, n, size).any(dim=(1, 3))
    everything_seen = expected.reshape(n, size, n, size).all(dim=(1, 3))
    assert torch.equal(blocks.to_dense()[0, 0].bool(), anything_seen)
    assert int(anything_seen.sum()) < n * (n + 1) // 2  # fewer than causal attention would compute
    full = torch.zeros(n, n, dtype=torch.bool)
    for q_block in range(n):
        count = int(blocks.full_kv_num_blocks[0, 0, q_block])
        full[q_block, blocks.full_kv_indices[0, 0, q_block, :count]] = True
    assert torch.equal(full, everything_seen)  # no mask evaluated inside blocks that are wholly visible


STATIC_SHAPES = {"automatic_dynamic_shapes": False}


@pytest.fixture(scope="module")
def flex_and_sdpa(checkpoint):
    with torch._dynamo.config.patch(**STATIC_SHAPES):
        yield [
            ValignForConditionalGeneration.from_pretrained(checkpoint, attn_implementation=kernel).eval()
            for kernel in ("flex_attention", "sdpa")
        ]


@pytest.mark.parametrize("mode", ["hybrid", "bidirectional", "causal"])
def test_flex_logits_equal_sdpa_on_a_padded_batch(flex_and_sdpa, model_and_processor, mode):
    processor = model_and_processor[1]
    questions = ["Describe.", "What colour is the big round shape in this picture?"]
    batch = processor(images=[shape_image("red"), shape_image("green")], text=prompts(processor, questions))
    assert not batch["attention_mask"].all()  # left padding
    with torch.no_grad():
        flex, sdpa = (model(**batch, attn_mode=mode).logits for model in flex_and_sdpa)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(flex[real], sdpa[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["hybrid", "causal"])
def test_flex_logits_equal_sdpa_on_packed_rows(flex_and_sdpa, model_and_processor, mode):
    batch = ConversationCollator(model_and_processor[1], max_length=512, packing=True)(uneven_samples())
    batch.pop("labels")
    with torch.no_grad():
        flex, sdpa = (model(**batch, attn_mode=mode).logits for model in flex_and_sdpa)
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def cuda_checkpoint(tmp_path_factory) -> tuple[Path, ValignProcessor]:
    """A tiny checkpoint whose heads are 16 wide in both towers: flex attention's CUDA kernel needs at least 16."""
    folder = tmp_path_factory.mktemp("flex-cuda")
    torch.manual_seed(0)
    model, processor = valign.from_backbones(*map(str, build_tiny_backbones(folder / "backbones", vision_width=64)))
    return save_checkpoint(model, processor, folder / "checkpoint"), processor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no flex-attention backward on CPU")
@pytest.mark.parametrize(
    ("mode", "packing"), [("hybrid", False), ("hybrid", True), ("bidirectional", False), ("causal", True)]
)
def test_flex_gradients_equal_sdpa_on_cuda(cuda_checkpoint, mode, packing):
    checkpoint, processor = cuda_checkpoint
    # One sample longer than 128 tokens, as real ones are (256 image tokens alone): below 128 query tokens inductor
    # picks flex's decoding kernel, which finds no valid configuration for these fp32 GQA heads (torch 2.11).
    samples = [*uneven_samples(), conversation("long", "A red circle on a white ground. " * 20, "red")]
    batch = ConversationCollator(processor, max_length=512, packing=packing)(samples)
    assert batch["input_ids"].shape[1] > 128
    batch = {key: value.cuda() if torch.is_tensor(value) else value for key, value in batch.items()}
    losses, gradients = [], []
    for kernel in ("flex_attention", "sdpa"):
        model = ValignForConditionalGeneration.from_pretrained(checkpoint, attn_implementation=kernel).cuda().train()
        loss = model(**batch, attn_mode=mode).loss
        loss.backward()
        losses.append(loss.item())
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    flex, sdpa = gradients
    assert flex.keys() == sdpa.keys() and len(sdpa) > 0
    scale = max(g.abs().max().item() for g in sdpa.values())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert max((flex[n] - sdpa[n]).abs().max().item() for n in sdpa) <= 1e-4 * scale


def test_flex_logits_equal_sdpa_on_the_other_major(checkpoint, tmp_path):
    out = tmp_path / "flex.safetensors"
    run_script(other_major_python(), "flex", str(checkpoint), str(out))
    result = load_file(out)
    real = result["attention_mask"].bool()
    torch.testing.assert_close(result["flex_attention"][real], result["sdpa"][real], rtol=1e-4, atol=1e-4)
