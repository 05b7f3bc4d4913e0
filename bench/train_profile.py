"""Where a stage-2 training step's time goes, against the machine's warm best-of matmul rate measured in the same run.

One valign hybrid step (forward, backward, AdamW over every parameter; in fp32 or under bf16 autocast with fp32
weights, as the trainer runs `precision: bf16`) on `bench/run.py`'s caption batches, two
ways: the loss over every position (what `bench/run.py`'s training table times) and the loss as `ValignTrainer`
computes it (logits at the supervised positions only, `train.trainer.supervised_positions`). Each is timed (median
of `--steps`, after a warm-up step), its FLOPs counted (`torch.utils.flop_counter`) and its achieved rate given as a
share of the matmul rate; then one trainer step runs under `torch.profiler` and the operators costing most self
time are listed. Results replace the training-profile section of BENCHMARKS.md (training-profile-bf16 for bf16).

    .venv/bin/python bench/train_profile.py [--shape paper|small] [--steps 2] [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
from collections.abc import Callable

import torch
import transformers
from harness import (
    count_flops,
    device,
    machine_description,
    matmul_flops_per_second,
    replace_section,
    timed,
    top_operators,
    trainer_optimizer,
)
from run import build_models, build_workload, shapes, to_device
from transformers.utils import logging as hf_logging

from valign.modeling_valign import IGNORE_INDEX
from valign.train.assembly import prepare_tokenizer
from valign.train.backbones import train_tokenizer
from valign.train.demo import DemoSizes, demo_corpus
from valign.train.run import resolve_precision
from valign.train.trainer import freed_memory_kept, supervised_positions

TOP_OPERATORS = 8


def step_functions(
    model, batch: dict, compute_dtype: torch.dtype
) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """label -> (one forward + backward + AdamW step, its forward + backward alone), the loss computed that way."""
    optimizer = trainer_optimizer(model.parameters())
    keep = supervised_positions(batch["labels"])
    device_type = next(model.parameters()).device.type

    def forward_backward(trainer_loss: bool) -> None:
        extra = {"logits_to_keep": keep} if trainer_loss else {}
        with torch.autocast(device_type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            loss = model(**batch, **extra).loss
        loss.backward()

    def step(trainer_loss: bool) -> None:
        forward_backward(trainer_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {
        "loss over every position": (lambda: step(False), lambda: forward_backward(False)),
        "supervised positions only (ValignTrainer)": (lambda: step(True), lambda: forward_backward(True)),
    }


def measure(args: argparse.Namespace) -> tuple[list[dict], list[tuple[str, float]], float, dict]:
    shape = shapes()[args.shape]
    tokenizer = prepare_tokenizer(train_tokenizer(demo_corpus(DemoSizes())), "<|image_pad|>")
    workload = build_workload(shape, tokenizer)
    model = build_models(shape, workload)[False].train()
    model.config.attn_mode = "hybrid"
    batch = to_device({key: value[: args.samples] for key, value in workload.batches[False][0].items()})
    compute_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rate = matmul_flops_per_second(compute_dtype)
    rows = []
    with freed_memory_kept(device()):  # as `ValignTrainer.train` runs
        for label, (step, forward_backward) in step_functions(model, batch, compute_dtype).items():
            for _ in range(2):  # warm-up: the optimizer state, then a heap that holds a whole step
                step()
            seconds = statistics.median(timed(step) for _ in range(args.steps))
            flops = count_flops(forward_backward)
            model.zero_grad(set_to_none=True)
            rows.append({"label": label, "seconds": seconds, "flops": flops, "share": flops / seconds / rate})
            print(f"{label}: {seconds:.2f} s, {flops / 1e12:.2f} TFLOP, {rows[-1]['share']:.0%} of the matmul rate")
        top = top_operators(step, TOP_OPERATORS)
    context = {"tokens": int(batch["attention_mask"].sum()), "samples": batch["input_ids"].shape[0]}
    context["supervised"] = int((batch["labels"] != IGNORE_INDEX).sum())
    context["positions"] = int(supervised_positions(batch["labels"]).numel())
    context["width"] = batch["input_ids"].shape[1]
    return rows, top, rate, context


def report(args: argparse.Namespace, rows: list[dict], top: list[tuple[str, float]], rate: float, context) -> str:
    shape = shapes()[args.shape]
    precision = "bf16 autocast, fp32 weights" if args.precision == "bf16" else "fp32"
    lines = [
        f"Measured {datetime.date.today().isoformat()} by `bench/train_profile.py --shape {args.shape} --precision "
        f"{args.precision}` on {machine_description()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Shape: {shape.description}, random weights, {precision}, valign "
        f"hybrid: one stage-2 step (everything trains, AdamW) on {context['samples']} caption samples, "
        f"{context['tokens']} tokens ({context['supervised']} supervised; {context['positions']} of the "
        f"{context['width']} positions hold one: the trainer computes logits there only), median of {args.steps} warm "
        f"steps. Reference: a warm {args.precision} 2048² matmul, best of 10, {rate / 1e9:.0f} GFLOP/s.",
        "",
        "| loss computed over | step | FLOPs (forward + backward) | share of the matmul rate |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['seconds']:.2f} s | {r['flops'] / 1e12:.2f} T | {r['share']:.0%} |")
    lines += ["", "Self time of one trainer step under `torch.profiler`:", "", "| operator | share |", "|---|---|"]
    lines += [f"| `{name}` | {share:.0%} |" for name, share in top]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["paper", "small"], default="paper")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8, help="samples per step (the demo recipe's batch: 8)")
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: as the trainer resolves it"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args(argv)
    args.precision = resolve_precision(args.precision)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    text = report(args, *measure(args))
    print("\n" + text)
    if not args.no_write:
        replace_section(text, "training-profile" + ("-bf16" if args.precision == "bf16" else ""))


if __name__ == "__main__":
    main()
