"""valign against transformers' LLaVA built from identical parts (random weights), in one process and run.

Training steps (stage-1: towers frozen; stage-2: everything trains; forward + backward + AdamW) on caption
batches from the embedded data, padded and packed; caption generation (time to first token, decode tokens/s at batch 1
and 8); peak memory of each; achieved FLOP/s against the machine's matmul rate; the attention mask's and the
processor's time as a share of a step. Results replace the measured section of BENCHMARKS.md.

    .venv/bin/python bench/run.py                 # small and paper shapes (CPU: about 30 minutes)
    .venv/bin/python bench/run.py --shapes small  # about a minute
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from harness import (
    TokenClock,
    count_flops,
    device,
    machine_description,
    matmul_flops_per_second,
    median_time,
    peak_memory,
    release_memory,
    replace_section,
    synchronize,
    timed,
    trainer_optimizer,
)
from llava_twin import llava_twin
from transformers import Dinov2Config, LlamaConfig, StoppingCriteriaList
from transformers.utils import logging as hf_logging

from valign import ValignConfig, ValignForConditionalGeneration
from valign.checkpoint import native_bf16
from valign.data.adapters import adapt
from valign.data.prompts import CAPTION_PROMPT
from valign.data.synthetic import make_caption_dataset
from valign.eval.generate import chat_prompt
from valign.modeling_valign import IGNORE_INDEX
from valign.processing_valign import ValignProcessor
from valign.train.assembly import prepare_tokenizer
from valign.train.backbones import image_processor_class, train_tokenizer
from valign.train.collator import ConversationCollator
from valign.train.demo import PACKAGED_IMAGE_SIZE, PACKAGED_PIXEL_SHUFFLE, DemoSizes, demo_corpus
from valign.train.packaged import DINOV2_SMALL_CONFIG
from valign.train.trainer import freed_memory_kept

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Shape:
    name: str
    description: str
    config: Callable[[int, int], ValignConfig]  # (vocab size, image token id) -> config
    batch_size: int  # training samples per step
    max_length: int  # the recipe's; also the packed row length
    steps: int  # timed training steps (after one warm-up step)
    new_tokens: int  # generated per caption
    dtype: torch.dtype  # autocast dtype in training, weight dtype in generation
    repeats: int  # timings per generation measurement (the median is reported)


def small_config(vocab_size: int, image_token_id: int) -> ValignConfig:
    """The embedded default's shape (`train/recipes/demo`): DINOv2-small seeing 112 px, pixel shuffle 2 → 16 image
    tokens, SmolLM2-135M's dimensions (the packaged backbones), random weights."""
    text = LlamaConfig(
        vocab_size=max(vocab_size, 49_152),  # SmolLM2's vocabulary, so the head costs what it costs in training
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100_000.0,
    )
    return ValignConfig(
        vision_config=Dinov2Config(**DINOV2_SMALL_CONFIG),
        text_config=text,
        image_token_id=image_token_id,
        image_size=PACKAGED_IMAGE_SIZE,
        pixel_shuffle_factor=PACKAGED_PIXEL_SHUFFLE,
        attn_implementation="sdpa",
    )


def paper_config(vocab_size: int, image_token_id: int) -> ValignConfig:
    """SigLIP so400m-patch14-224 + Qwen2.5-0.5B (valign's defaults); the vocabulary stays Qwen's 151,936."""
    return ValignConfig(image_token_id=image_token_id, attn_implementation="sdpa")


def shapes() -> dict[str, Shape]:
    paper_dtype = torch.bfloat16 if native_bf16(device()) else torch.float32
    return {
        "small": Shape(
            "small",
            "the embedded default's shape (DINOv2-small + SmolLM2-135M, 16 image tokens)",
            small_config,
            16,
            256,
            12,
            32,
            torch.float32,
            25,
        ),
        "paper": Shape(
            "paper", "SigLIP so400m-patch14-224 + Qwen2.5-0.5B", paper_config, 4, 1024, 2, 16, paper_dtype, 3
        ),
    }


@dataclass
class Variant:
    label: str
    llava: bool = False
    attn_mode: str = "causal"
    packing: bool = False


VARIANTS = [
    Variant("LLaVA (transformers)", llava=True),
    Variant("valign causal", attn_mode="causal"),
    Variant("valign hybrid", attn_mode="hybrid"),
    Variant("valign hybrid, packed", attn_mode="hybrid", packing=True),
]


@dataclass
class Workload:
    """What every variant of a shape runs on: the processor, caption batches and images to caption."""

    processor: ValignProcessor
    batches: dict[bool, list[dict]]  # packing -> batches
    collate_seconds: dict[bool, float]  # median time the collator took for one batch
    images: list


def build_processor(shape: Shape, tokenizer) -> tuple[ValignProcessor, ValignConfig]:
    """The shape's processor (its image size and image-token count) around `tokenizer`, and the shape's config."""
    config = shape.config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    size = config.image_size
    processor = ValignProcessor(
        image_processor=image_processor_class()(size={"height": size, "width": size}),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    return processor, config


def build_workload(shape: Shape, tokenizer, seed: int = 1) -> Workload:
    processor, config = build_processor(shape, tokenizer)
    size = config.image_size
    count = shape.batch_size * (shape.steps + 1)
    dataset = adapt(make_caption_dataset(count, "recap", seed=seed, image_size=max(64, size)))
    samples = [dataset[i] for i in range(count)]
    groups = [samples[i : i + shape.batch_size] for i in range(0, count, shape.batch_size)]
    batches, collate_seconds = {}, {}
    for packing in (False, True):
        collator = ConversationCollator(processor, shape.max_length, packing=packing)
        batches[packing] = []
        seconds = [timed(lambda g=g, c=collator, b=batches[packing]: b.append(c(g))) for g in groups]
        collate_seconds[packing] = statistics.median(seconds)
    return Workload(processor, batches, collate_seconds, [s["image"] for s in samples[:8]])


def sample_lengths(workload: Workload) -> tuple[list[int], list[int]]:
    """Tokens and supervised tokens of each sample, read off the padded batches."""
    padded = workload.batches[False]
    lengths = [n for b in padded for n in b["attention_mask"].sum(1).tolist()]
    supervised = [n for b in padded for n in (b["labels"] != IGNORE_INDEX).sum(1).tolist()]
    return lengths, supervised


def build_models(shape: Shape, workload: Workload) -> dict[bool, torch.nn.Module]:
    """valign (random weights) and its LLaVA twin, keyed by `Variant.llava`."""
    tokenizer = workload.processor.tokenizer
    config = shape.config(len(tokenizer), workload.processor.image_token_id)
    torch.manual_seed(0)
    model = ValignForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return {False: model.to(device()), True: llava_twin(model).to(device())}


def interleaved(calls: dict[str, Callable[[int], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of `calls[label](round)` for each round, the calls taking turns within a round, so a slow moment
    of a shared machine hits every variant alike."""
    seconds: dict[str, list[float]] = {label: [] for label in calls}
    for index in range(rounds):
        order = list(calls.items())
        for label, call in order if index % 2 == 0 else reversed(order):  # nobody always goes first
            seconds[label].append(timed(lambda c=call, i=index: c(i)))
    return seconds


def to_device(batch: dict) -> dict:
    return {k: v.to(device()) for k, v in batch.items()}


def useful_tokens(batch: dict, pad_id: int) -> int:
    return int((batch["input_ids"] != pad_id).sum())


def supervised_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def train(models, shape: Shape, workload: Workload, variants: list[Variant], setting: str) -> dict[str, dict]:
    """Time `shape.steps` optimizer steps per variant, taking turns, after one warm-up step each; memory and FLOPs
    are measured on extra, untimed steps (a sampling thread or a FLOP counter would slow the timed ones)."""
    for model in models.values():  # the twin shares valign's parameters: one AdamW state serves both
        model.train()
    for name, parameter in models[False].named_parameters():
        parameter.requires_grad = setting == "stage-2" or "multi_modal_projector" in name
    optimizer = trainer_optimizer([p for p in models[False].parameters() if p.requires_grad])
    batches = {packing: [to_device(b) for b in workload.batches[packing]] for packing in (False, True)}
    autocast = torch.autocast(device().type, dtype=shape.dtype, enabled=shape.dtype != torch.float32)

    def forward_backward(variant: Variant, index: int) -> None:
        model = models[variant.llava]
        if not variant.llava:  # valign's modes share one model
            model.config.attn_mode = variant.attn_mode
        with autocast:
            loss = model(**batches[variant.packing][index]).loss
        loss.backward()

    def step(variant: Variant, index: int) -> None:
        forward_backward(variant, index)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for variant in variants:
        step(variant, 0)  # warm-up; the first one allocates the optimizer state
    seconds = interleaved({v.label: (lambda i, v=v: step(v, i + 1)) for v in variants}, shape.steps)
    pad_id = workload.processor.tokenizer.pad_token_id
    results = {}
    for variant in variants:
        with peak_memory() as peak:
            step(variant, 1)
        timed_batches, times = batches[variant.packing][1:], seconds[variant.label]
        results[variant.label] = {
            "seconds": times,  # per round, aligned across variants (same round, same samples)
            "seconds_per_step": statistics.median(times),
            "spread": (min(times), max(times)),
            # medians of per-step rates: one hiccup of the machine does not move them
            "samples_per_s": statistics.median(shape.batch_size / t for t in times),
            "tokens_per_s": statistics.median(useful_tokens(b, pad_id) / t for b, t in zip(timed_batches, times)),
            "supervised_per_s": statistics.median(supervised_tokens(b) / t for b, t in zip(timed_batches, times)),
            "peak_gib": peak.gib,
            "flops_per_s": 0.0,
        }
        if setting == "stage-2":  # the first timed step's FLOPs over its time
            flops = count_flops(lambda v=variant: forward_backward(v, 1))
            optimizer.zero_grad(set_to_none=True)
            results[variant.label]["flops_per_s"] = flops / times[0]
            if not variant.llava:
                mask = mask_seconds(models[False], timed_batches, variant)
                results[variant.label]["mask_share"] = mask / sum(times)
    return results


def packing_loss_gap(model, workload: Workload) -> float:
    """Largest |padded loss − packed loss| over the workload's batches, same weights (valign hybrid)."""
    model.config.attn_mode = "hybrid"
    with torch.no_grad():
        losses = [[model(**to_device(b)).loss.item() for b in workload.batches[packing]] for packing in (False, True)]
    return max(abs(a - b) for a, b in zip(*losses))


def mask_seconds(model, batches: list[dict], variant: Variant) -> float:
    """Time spent building the attention mask for these batches (once per forward pass)."""
    dtype = next(model.parameters()).dtype

    def build(batch: dict) -> None:
        image_mask = batch["input_ids"] == model.config.image_token_id
        model.model.attention_mask_for(
            image_mask, batch.get("attention_mask"), batch.get("position_ids"), variant.attn_mode, dtype=dtype
        )

    return sum(median_time(lambda b=b: build(b), repeats=5) for b in batches)


def generation(models, shape: Shape, workload: Workload, variants: list[Variant], batch_size: int) -> dict:
    """Time to the first token (prefill: vision tower, projector, prompt) and decode tokens/s between the first and
    the last token, from the same generate calls, the variants taking turns; peak memory on an extra call."""
    processor = workload.processor
    prompt = chat_prompt(processor, CAPTION_PROMPT)
    inputs = processor(images=workload.images[:batch_size], text=[prompt] * batch_size)
    inputs = {k: (v.to(shape.dtype) if v.is_floating_point() else v).to(device()) for k, v in inputs.items()}
    n = shape.new_tokens
    clocks: dict[str, list[tuple[float, float]]] = {v.label: [] for v in variants}

    def run(variant: Variant) -> None:
        model = models[variant.llava]
        if not variant.llava:
            model.config.attn_mode = variant.attn_mode
        clock = TokenClock()
        synchronize()
        start = time.perf_counter()
        model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
        clocks[variant.label].append((clock.times[0] - start, clock.times[-1] - clock.times[0]))

    with torch.no_grad():
        for variant in variants:
            run(variant)  # warm-up
            clocks[variant.label].clear()
        interleaved({v.label: (lambda i, v=v: run(v)) for v in variants}, shape.repeats)
        results = {}
        for variant in variants:
            with peak_memory() as peak:
                run(variant)
            prefill, decode = zip(*clocks[variant.label][: shape.repeats])
            results[variant.label] = {
                "prefill_seconds": prefill,  # per round, aligned across variants
                "decode_seconds": decode,
                "prefill_s": statistics.median(prefill),
                "decode_per_s": batch_size * (n - 1) / statistics.median(decode),
                "peak_gib": peak.gib,
            }
    return results


def bench_shape(shape: Shape, tokenizer) -> dict:
    print(f"\n== {shape.name}: {shape.description}", flush=True)
    workload = build_workload(shape, tokenizer)
    models = build_models(shape, workload)
    results: dict[str, dict] = {v.label: {} for v in VARIANTS}
    results["valign hybrid, packed"]["loss_gap"] = packing_loss_gap(models[False], workload)
    for setting in ("stage-1", "stage-2"):
        with freed_memory_kept(device()):  # as `ValignTrainer.train` runs
            trained = train(models, shape, workload, VARIANTS, setting)
        for label, result in trained.items():
            results[label][setting] = result
            print(f"{label:24s} {setting}: {result['seconds_per_step']:.3f} s/step", flush=True)
        release_memory()
    for model in models.values():
        model.eval().to(shape.dtype)
    unpacked = [v for v in VARIANTS if not v.packing]  # generation does not pack
    for batch in (1, 8):
        for label, result in generation(models, shape, workload, unpacked, batch).items():
            results[label].setdefault("generation", {})[batch] = result
    return {"shape": shape, "workload": workload, "variants": results}


def padding_share(workload: Workload) -> float:
    pad_id = workload.processor.tokenizer.pad_token_id
    batches = workload.batches[False][1:]
    return 1 - sum(useful_tokens(b, pad_id) for b in batches) / sum(b["input_ids"].numel() for b in batches)


def speedup(reference_seconds: list[float], seconds: list[float]) -> str:
    """Median over rounds of reference time / time. Within a round the variants ran back to back, so a slow moment
    of a shared machine cancels out of each ratio; above 1× the variant is faster than the reference."""
    return f"{statistics.median(r / s for r, s in zip(reference_seconds, seconds)):.2f}×"


def report_shape(result: dict, matmul: dict[torch.dtype, float]) -> str:
    shape, workload, variants = result["shape"], result["workload"], result["variants"]
    reference = variants[VARIANTS[0].label]
    lengths, supervised = sample_lengths(workload)
    dtype = str(shape.dtype).replace("torch.", "")
    lines = [
        f"### {shape.name}: {shape.description}",
        "",
        f"Training batches: {shape.batch_size} recap-caption samples per step, {shape.steps} timed steps after one "
        f"warm-up; tokens per sample {min(lengths)}–{max(lengths)} (mean {statistics.mean(lengths):.0f}, of which "
        f"{statistics.mean(supervised):.0f} supervised caption tokens); {dtype} "
        f"{'autocast (fp32 weights and AdamW state)' if shape.dtype != torch.float32 else 'throughout'}. "
        f"Packed rows hold up to {shape.max_length} tokens.",
        "",
        "| variant | setting | s/step, median (fastest–slowest) | samples/s | tokens/s (non-pad) | "
        "supervised tokens/s | speed vs LLaVA | peak memory above weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in variants.items():
        for setting in ("stage-1", "stage-2"):
            r, ref = row[setting], reference[setting]
            fastest, slowest = r["spread"]
            lines.append(
                f"| {label} | {setting} | {r['seconds_per_step']:.3f} ({fastest:.3f}–{slowest:.3f}) | "
                f"{r['samples_per_s']:.1f} | "
                f"{r['tokens_per_s']:.0f} | {r['supervised_per_s']:.0f} | "
                f"{speedup(ref['seconds'], r['seconds'])} | {r['peak_gib']:.2f} GiB |"
            )
    lines += [
        "",
        "| variant | batch | time to first token | speed vs LLaVA | decode tokens/s | speed vs LLaVA | peak memory |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for label, row in variants.items():
        for batch, g in row.get("generation", {}).items():
            ref = reference["generation"][batch]
            lines.append(
                f"| {label} | {batch} | {1000 * g['prefill_s']:.1f} ms | "
                f"{speedup(ref['prefill_seconds'], g['prefill_seconds'])} | {g['decode_per_s']:.1f} | "
                f"{speedup(ref['decode_seconds'], g['decode_seconds'])} | {g['peak_gib']:.2f} GiB |"
            )
    peak = matmul[shape.dtype]
    hybrid, packed = variants["valign hybrid"]["stage-2"], variants["valign hybrid, packed"]["stage-2"]
    step_seconds = hybrid["seconds_per_step"]
    lines += [
        "",
        f"Achieved FLOP/s in the stage-2 step (FLOPs counted by `torch.utils.flop_counter`) against a {dtype} "
        f"matmul measured in this run ({peak / 1e9:.0f} GFLOP/s):",
        "",
        "| variant | GFLOP/s | share of matmul rate |",
        "|---|---|---|",
    ]
    lines += [
        f"| {label} | {row['stage-2']['flops_per_s'] / 1e9:.1f} | {row['stage-2']['flops_per_s'] / peak:.0%} |"
        for label, row in variants.items()
    ]
    lines += [
        "",
        f"Share of a valign hybrid stage-2 step ({step_seconds:.3f} s): building the attention mask "
        f"{hybrid['mask_share']:.2%} (packed: {packed['mask_share']:.2%}); the processor and collator making the "
        f"batch {workload.collate_seconds[False] / step_seconds:.1%} (packed: "
        f"{workload.collate_seconds[True] / step_seconds:.1%}; a DataLoader worker overlaps it with the step).",
        "",
        f"Padding is {padding_share(workload):.0%} of the padded batches' token slots, so removing it can speed a "
        f"step up by at most {1 / (1 - padding_share(workload)):.2f}× (the rest of the step does not shrink).",
        "",
        "Packed vs padded (valign hybrid, stage-2; each step holds the same samples either way, so this is also the "
        f"ratio of useful and of supervised tokens/s): {speedup(hybrid['seconds'], packed['seconds'])}; token slots "
        f"over the timed steps {sum(b['input_ids'].numel() for b in workload.batches[True][1:])} packed vs "
        f"{sum(b['input_ids'].numel() for b in workload.batches[False][1:])} padded; largest loss difference on the "
        f"same batches and weights {variants['valign hybrid, packed']['loss_gap']:.1e}.",
    ]
    return "\n".join(lines)


def report(results: list[dict], matmul: dict[torch.dtype, float]) -> str:
    header = [
        f"Measured {datetime.date.today().isoformat()} by `bench/run.py` on {machine_description()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}. "
        "Random weights; LLaVA is `transformers.LlavaForConditionalGeneration` holding valign's own vision tower, "
        "projector and language model (shared modules, SDPA attention in both); all variants take turns step by step.",
        "",
    ]
    return "\n".join(header + [report_shape(r, matmul) + "\n" for r in results]).rstrip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=["small", "paper"], default=["small", "paper"])
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer = prepare_tokenizer(train_tokenizer(demo_corpus(DemoSizes())), "<|image_pad|>")
    selected = [shapes()[name] for name in args.shapes]
    matmul = {dtype: matmul_flops_per_second(dtype) for dtype in {s.dtype for s in selected}}
    results = [bench_shape(shape, tokenizer) for shape in selected]
    text = report(results, matmul)
    print("\n" + text)
    replace_section(text, "bench", args.output)
    print(f"\nwritten to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
