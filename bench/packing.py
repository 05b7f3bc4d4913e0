"""Training on multi-turn image conversations: padded vs packed rows, sdpa vs flex attention (#16 items 2 and 5).

    .venv/bin/python bench/packing.py                  # the embedded default's shape, on whatever device there is
    .venv/bin/python bench/packing.py --shape paper    # SigLIP so400m + Qwen2.5-0.5B; the GPU benchmark (bf16)

Each variant trains the same samples in the same order (stage 2: everything trains, forward + backward + AdamW;
random weights; the loss as `ValignTrainer` computes it, from logits at the supervised positions only), the
variants taking turns step by step so a slow moment of a shared machine hits all alike.
Reported per variant: useful (non-padding) and supervised tokens per second, as medians of per-step rates, and
model FLOP utilisation: the FLOPs torch's counter finds in the packed step (the work the samples need; the counter
has no formula for CPU attention kernels, so attention is left out on CPU) over each step's time, against the
machine's warm best-of matmul rate and, on a GPU whose datasheet peak is known, against that peak. The packed /
padded speed-up is the median of per-round paired ratios. Flex attention runs where torch can train with it: on
CUDA (torch 2.13 has no flex backward on CPU). `--profile N` adds each variant's N operators costing most self
time (device time on a GPU) in one more step; `--checkpointing` turns activation checkpointing on in every variant
and `--loss-chunk-size N` computes the loss N supervised tokens at a time (`ValignConfig.loss_chunk_size`);
`--pack-length N` caps packed rows at N tokens (default: the paper recipe's stage 3, whose rows hold a batch of 8);
`--no-keep-freed-memory` leaves glibc to hand freed memory back (a paper-shape run on a 24 GiB CPU needs it).
The section of BENCHMARKS.md between the markers named for the shape and the device type is rewritten.

The workload (`conversations`): every sample has one image and 1 + Geometric(0.45) turns (at most 8), questions
of 5-30 words and answers of log-normal length (median 30 words, sigma 1), text capped at 1,500 tokens: the shape
the issue describes for LLaVA-NeXT-Data (one image, several turns, 50-1,500 text tokens; its own length statistics
cannot be read offline). Answer lengths of chat data are heavy-tailed, which is what makes padding costly.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from harness import (
    count_flops,
    device,
    machine_description,
    matmul_flops_per_second,
    release_memory,
    replace_section,
    synchronize,
    top_operators,
    trainer_optimizer,
)
from PIL import Image
from run import REPO, Shape, build_processor, interleaved, shapes, supervised_tokens, to_device, useful_tokens
from transformers.utils import logging as hf_logging

from valign import ValignForConditionalGeneration
from valign.configuration_valign import enable_checkpointing
from valign.modeling_valign import SDPA_PER_SAMPLE
from valign.train.assembly import prepare_tokenizer
from valign.train.backbones import train_tokenizer
from valign.train.collator import ConversationCollator
from valign.train.config import StageConfig
from valign.train.demo import DemoSizes, demo_corpus
from valign.train.run import RECIPES
from valign.train.trainer import freed_memory_kept, supervised_positions

MAX_TEXT_TOKENS = 1500
# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s), by a word of the device name.
GPU_PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


@dataclass
class Variant:
    label: str
    kernel: str
    packing: bool

    @property
    def weights(self) -> str:
        """The model it trains: `sdpa_per_sample` is sdpa on other blocks, so it shares sdpa's model (and memory)."""
        return "sdpa" if self.kernel == SDPA_PER_SAMPLE else self.kernel


def variants_for(kernels: list[str]) -> list[Variant]:
    """Padded and packed rows for each kernel; `sdpa_per_sample` differs from sdpa on packed rows only."""
    return [
        Variant(f"{k}, {'packed' if p else 'padded'}", k, p)
        for k in kernels
        for p in (False, True)
        if p or k != SDPA_PER_SAMPLE
    ]


def conversations(count: int, words: list[str], image, seed: int = 0) -> list[dict]:
    """`count` multi-turn samples in the collator's format, of uneven length (see the module docstring)."""
    rng = random.Random(seed)

    def text(length: int) -> str:
        return " ".join(rng.choices(words, k=max(1, length)))

    samples = []
    for index in range(count):
        turns, budget, messages = min(8, 1 + int(math.log(rng.random()) / math.log(0.55))), MAX_TEXT_TOKENS, []
        for turn in range(turns):
            question, answer = rng.randint(5, 30), round(rng.lognormvariate(math.log(30), 1.0))
            answer = min(answer, budget - question)
            if answer < 1:
                break
            budget -= question + answer
            content = ([{"type": "image"}] if turn == 0 else []) + [{"type": "text", "text": text(question)}]
            messages += [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": text(answer)}]},
            ]
        samples.append({"id": f"c{index}", "image": image, "messages": messages})
    return samples


def batches(
    processor, samples: list[dict], batch_size: int, max_length: int, pack_length: int | None = None
) -> dict[bool, list[dict]]:
    groups = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    return {
        packing: [
            to_device(ConversationCollator(processor, max_length, packing=packing, pack_length=pack_length)(g))
            for g in groups
        ]
        for packing in (False, True)
    }


def train(
    config,
    data: dict[bool, list[dict]],
    variants: list[Variant],
    shape: Shape,
    profile: int = 0,
    checkpointing: bool = False,
) -> dict[str, dict]:
    """Seconds of each variant's steps (one warm-up step each, then taking turns), the packed step's FLOPs and, with
    `profile`, the `profile` operators costing most in one more step of each variant."""
    models = {}
    for kernel in sorted({v.weights for v in variants}):
        kernel_config = copy.deepcopy(config)
        kernel_config.text_config._attn_implementation = kernel  # the vision tower keeps sdpa
        torch.manual_seed(0)  # the same weights for every kernel
        models[kernel] = ValignForConditionalGeneration(kernel_config).to(device()).train()
        if checkpointing:
            enable_checkpointing(models[kernel])
    optimizers = {k: trainer_optimizer(m.parameters()) for k, m in models.items()}
    autocast = torch.autocast(device().type, dtype=shape.dtype, enabled=shape.dtype != torch.float32)

    def forward_backward(variant: Variant, index: int) -> torch.Tensor:
        batch = data[variant.packing][index]
        keep = supervised_positions(batch["labels"])  # the loss as ValignTrainer computes it
        model = models[variant.weights]
        model.config.text_config._attn_implementation = variant.kernel  # the language model's own config object
        with autocast:
            loss = model(**batch, attn_mode="hybrid", logits_to_keep=keep).loss
        loss.backward()
        return loss.detach()

    def step(variant: Variant, index: int) -> None:
        forward_backward(variant, index)
        optimizers[variant.weights].step()
        optimizers[variant.weights].zero_grad(set_to_none=True)
        synchronize()

    agreement = first_batch_agreement(variants, forward_backward, models)
    # Counted before any optimizer holds state: under the counter, memory grew by ~1.3 GB a call at the paper shape.
    packed = next(v for v in variants if v.packing)
    flops = [count_flops(lambda i=i: forward_backward(packed, i)) for i in range(1, len(data[True]))]
    models[packed.weights].zero_grad(set_to_none=True)
    release_memory()  # what the checks freed goes back to the OS before the optimizers' state arrives
    for variant in variants:
        step(variant, 0)
    seconds = interleaved({v.label: (lambda i, v=v: step(v, i + 1)) for v in variants}, len(data[False]) - 1)
    profiles = {v.label: top_operators(lambda v=v: step(v, 1), profile) for v in variants} if profile else {}
    return {"seconds": seconds, "flops": flops, "agreement": agreement, "profiles": profiles}


def first_batch_agreement(
    variants: list[Variant], forward_backward: Callable[[Variant, int], torch.Tensor], models: dict
) -> dict[str, float]:
    """Largest loss and gradient differences between the variants on the first batch, before any step: packing
    and the attention kernel must not change what is learnt (every kernel's model starts from the same weights).

    No gradient is copied (at the paper's shape one set is 3.6 GB, on a 24 GiB machine): the first variant's stay
    in its model, other models are compared with them there, and then each other variant of the first variant's
    model runs its backward onto the negated reference, so its gradients arrive as the difference (and, negated
    and run once more, give the reference back for the next one)."""
    reference, *others = variants
    home = models[reference.weights]
    for model in models.values():
        model.zero_grad(set_to_none=True)
    reference_loss = float(forward_backward(reference, 0))
    scale = max(g.abs().max().item() for g in gradients(home))
    loss_gap, gradient_gap = 0.0, 0.0
    others = sorted(others, key=lambda v: v.weights == reference.weights)  # other models first
    for index, variant in enumerate(others):
        model = models[variant.weights]
        if model is home:
            negate(gradients(home))
        loss_gap = max(loss_gap, abs(float(forward_backward(variant, 0)) - reference_loss))
        found = gradients(model)
        differences = found if model is home else (g - r for g, r in zip(found, gradients(home), strict=True))
        gradient_gap = max(gradient_gap, *(d.abs().max().item() for d in differences))
        if model is not home:
            model.zero_grad(set_to_none=True)
        elif index < len(others) - 1:  # r - v, then + v: the reference's gradients again
            negate(gradients(home))
            forward_backward(variant, 0)
    home.zero_grad(set_to_none=True)
    return {"loss": loss_gap, "gradient": gradient_gap / scale}


def negate(tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.neg_()


def gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def gpu_peak() -> tuple[str, float] | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next(((word, peak * 1e12) for word, peak in GPU_PEAKS.items() if word in name), None)


def report(
    shape: Shape,
    data,
    variants: list[Variant],
    result: dict,
    matmul: float,
    pad_id: int,
    settings: list[str],
    recomputed: bool,
) -> str:
    timed = {packing: batch[1:] for packing, batch in data.items()}
    padded = timed[False]
    slots = sum(b["input_ids"].numel() for b in padded)
    padding = 1 - sum(useful_tokens(b, pad_id) for b in padded) / slots
    lengths = [n for b in padded for n in b["attention_mask"].sum(1).tolist()]
    peak = gpu_peak()
    lines = [
        f"Measured {datetime.date.today().isoformat()} by `bench/packing.py --shape {shape.name}` on "
        f"{machine_description()}; Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {shape.description}, {shape.dtype}, hybrid mask, stage 2 (everything trains; "
        f"logits at supervised positions only, as ValignTrainer computes the loss"
        f"{''.join('; ' + s for s in settings)}), "
        f"{len(padded)} timed steps of {shape.batch_size} samples after one warm-up step, random weights.",
        "",
        f"Samples: {len(lengths)} timed, {min(lengths)}-{max(lengths)} tokens "
        f"(median {statistics.median(lengths):.0f}); "
        f"padding is {padding:.0%} of the padded batches' token slots, packed rows hold "
        f"{sum(b['input_ids'].numel() for b in timed[True])} slots for the same samples.",
        "",
        "| variant | s/step (median) | useful tokens/s | supervised tokens/s | model FLOP/s | of matmul rate |"
        + (f" of {peak[0]} peak |" if peak else ""),
        "|---|---|---|---|---|---|" + ("---|" if peak else ""),
    ]
    for variant in variants:
        times = result["seconds"][variant.label]
        batch = timed[variant.packing]
        mfu = statistics.median(f / t for f, t in zip(result["flops"], times))
        lines.append(
            f"| {variant.label} | {statistics.median(times):.2f} | "
            f"{statistics.median(useful_tokens(b, pad_id) / t for b, t in zip(batch, times)):,.0f} | "
            f"{statistics.median(supervised_tokens(b) / t for b, t in zip(batch, times)):,.0f} | "
            f"{mfu / 1e12:.3f} T | {mfu / matmul:.0%} |" + (f" {mfu / peak[1]:.1%} |" if peak else "")
        )
    lines.append("")
    for variant in (v for v in variants if v.packing):
        padded = next(v for v in variants if not v.packing and v.weights == variant.weights)
        pad, pack = result["seconds"][padded.label], result["seconds"][variant.label]
        ratios = [a / b for a, b in zip(pad, pack)]
        lines.append(
            f"- {variant.kernel}: packed rows train the same samples {statistics.median(ratios):.3f}× as fast as "
            f"{padded.label} (median; each step: {', '.join(f'{r:.2f}' for r in ratios)})."
        )
    agreement = result["agreement"]
    lines.append(
        f"- Same weights, first batch, every variant: losses within {agreement['loss']:.1e}, gradients within "
        f"{agreement['gradient']:.1e} of the largest gradient entry."
    )
    if device().type == "cpu":
        lines.append("- flex attention: not measured on CPU (torch has no flex backward there).")
    if recomputed:
        lines.append("- Model FLOPs are counted as run: they include the forward passes recomputed for the backward.")
    for label, top in result["profiles"].items():
        where = "device" if device().type == "cuda" else "CPU"
        lines += ["", f"Self {where} time of one `{label}` step under `torch.profiler`:", ""]
        lines += ["| operator | share |", "|---|---|"] + [f"| `{name}` | {share:.0%} |" for name, share in top]
    lines.append(
        f"- Matmul rate ({shape.dtype}, 2048², warm, best of 10 before and 10 after the steps) measured in the same "
        f"run: {matmul / 1e12:.2f} TFLOP/s."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["small", "paper"], default="small")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--pack-length",
        type=int,
        default=StageConfig.from_yaml(RECIPES / "paper" / "stage3.yaml").pack_length,
        metavar="N",
        help="tokens per packed row (default: the paper recipe's stage 3)",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="list each variant's N costliest operators")
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing in every variant",
    )
    parser.add_argument(
        "--loss-chunk-size",
        type=int,
        metavar="N",
        help="the loss over supervised tokens, N at a time (with --checkpointing, what lets 8 paper-shape samples "
        "train in 24 GiB on a CPU)",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep what a CPU step frees for the next, as ValignTrainer does (--no-keep-freed-memory: glibc's "
        "default, which a paper-shape run on a 24 GiB CPU needs: the kept heap fragments past it)",
    )
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    shape = shapes()[args.shape]
    shape.batch_size = args.batch_size
    corpus = demo_corpus(DemoSizes())
    tokenizer = prepare_tokenizer(train_tokenizer(corpus), "<|image_pad|>")
    processor, config = build_processor(shape, tokenizer)
    config.loss_chunk_size = args.loss_chunk_size
    words = sorted({w for line in corpus for w in line.split() if w.isalpha()})
    image = Image.new("RGB", (config.image_size, config.image_size), (120, 80, 200))
    samples = conversations(args.batch_size * (args.steps + 1), words, image)
    max_length = processor.image_seq_length + MAX_TEXT_TOKENS + 256  # the template's tokens on top of the text
    data = batches(processor, samples, args.batch_size, max_length, args.pack_length)
    kernels = ["sdpa", SDPA_PER_SAMPLE] + (["flex_attention"] if device().type == "cuda" else [])
    variants = variants_for(kernels)
    matmul = matmul_flops_per_second(shape.dtype)
    with freed_memory_kept(device(), args.keep_freed_memory):  # as `ValignTrainer.train` runs
        result = train(config, data, variants, shape, args.profile, args.checkpointing)
    # Once more after the steps: one reading on a shared machine can be far low (0.53 vs 0.92 TFLOP/s an hour apart).
    matmul = max(matmul, matmul_flops_per_second(shape.dtype))
    settings = [f"packed rows of up to {args.pack_length} tokens"]
    if args.checkpointing:
        settings.append("activation checkpointing")
    if args.loss_chunk_size:
        settings.append(f"the loss {args.loss_chunk_size} tokens at a time")
    if not args.keep_freed_memory and device().type == "cpu":
        settings.append("freed memory handed back to the OS, glibc's default")
    recomputed = args.checkpointing or bool(args.loss_chunk_size)  # layers, or the loss's chunks, run twice
    text = report(shape, data, variants, result, matmul, tokenizer.pad_token_id, settings, recomputed)
    print("\n" + text)
    replace_section(text, f"packing-{shape.name}-{device().type}", args.output)
    print(f"\nwritten to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
