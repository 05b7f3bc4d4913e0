"""How far the exported and quantized variants of a trained checkpoint agree with it on the demo's test sets.

Exports CHECKPOINT to ONNX (fp32, then int8 and int4 weights), runs it on the compiled PyTorch runtime (bf16 where
the CPU computes it, with int8 weights, and with int8 weights and activations), and scores PyTorch and every variant
on the demo's held-out data: easy-VQA test questions (accuracy per type) and captions of held-out scenes (CIDEr),
with the share of answers and captions identical to PyTorch's. Results replace the `agreement` section of BENCHMARKS.md.

    .venv/bin/python bench/export_agreement.py CHECKPOINT [--weights fp32 int8 int4] [--compiled native int8 w8a8]
                                               [--no-write]

CHECKPOINT: a demo checkpoint on the packaged backbones, e.g. `outputs/demo/stages/stage-3` after
`python -m valign.train`, or a snapshot of `python -m valign.train curve`.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import torch
from harness import compiled_variant, machine_description, replace_section
from transformers.utils import logging as hf_logging

from valign.checkpoint import load_checkpoint, native_bf16
from valign.data.prompts import CAPTION_PROMPT
from valign.data.synthetic import make_caption_eval_set
from valign.eval.captions import evaluate_captions
from valign.eval.generate import DecodingSettings
from valign.export.compiled_runtime import WEIGHTS, CompiledValign
from valign.export.onnx_runtime import OnnxValign, export_onnx, quantize_export
from valign.train.demo import DemoSizes, evaluate_demo_vqa


def scores(model, processor, sizes: DemoSizes) -> dict:
    eval_set = make_caption_eval_set(sizes.caption_eval, image_size=sizes.image_size)
    settings = DecodingSettings(max_new_tokens=40, batch_size=32)
    start = time.perf_counter()
    captions = evaluate_captions(
        model, processor, eval_set["image"], eval_set["captions"], eval_set["image_id"], CAPTION_PROMPT, settings
    )
    vqa = evaluate_demo_vqa(model, processor, sizes)
    return {"captions": captions, "vqa": vqa, "seconds": time.perf_counter() - start}


def same_share(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def caption_texts(result: dict) -> list[str]:
    return [item["caption"] for item in result["captions"]["captions"]]


def report(checkpoint: str, results: dict[str, dict]) -> str:
    reference = results["PyTorch eager, fp32"]
    lines = [
        f"Measured {datetime.date.today().isoformat()} by `bench/export_agreement.py {checkpoint}` on "
        f"{machine_description()}: {len(reference['vqa']['predictions'])} easy-VQA test questions and "
        f"{len(caption_texts(reference))} held-out scene captions (greedy), PyTorch eager fp32 against valign's "
        "compiled runtime and ONNX export.",
        "",
        "| runtime, weights | VQA accuracy | shape | colour | yes/no | answers identical to PyTorch | caption CIDEr | "
        "captions identical to PyTorch | evaluation seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        model = result["vqa"]["model"]
        per_type = " | ".join(f"{100 * model['per_type'][t]['accuracy']:.1f}" for t in ("shape", "colour", "yes/no"))
        answers = same_share(result["vqa"]["predictions"], reference["vqa"]["predictions"])
        captions = same_share(caption_texts(result), caption_texts(reference))
        lines.append(
            f"| {name} | {100 * model['accuracy']:.1f} ± {100 * model['accuracy_stderr']:.1f} | {per_type} | "
            f"{100 * answers:.1f} % | {100 * result['captions']['scores']['CIDEr']:.1f} | {100 * captions:.1f} % | "
            f"{result['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--weights", nargs="*", default=["fp32", "int8", "int4"], choices=["fp32", "int8", "int4"])
    parser.add_argument(
        "--compiled", nargs="*", default=list(WEIGHTS), choices=WEIGHTS, help="compiled runtime weights"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    sizes = DemoSizes()
    model, processor = load_checkpoint(args.checkpoint)
    results = {"PyTorch eager, fp32": scores(model, processor, sizes)}
    dtype = torch.bfloat16 if native_bf16() else torch.float32  # what `--precision auto` computes in
    for weights in args.compiled:
        compiled = CompiledValign(load_checkpoint(args.checkpoint, dtype=dtype)[0], weights)
        results[compiled_variant(weights, dtype)] = scores(compiled, processor, sizes)
        print(report(args.checkpoint, results), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = export_onnx(args.checkpoint, Path(scratch) / "fp32") if args.weights else None
        for weights in args.weights:
            folder = fp32 if weights == "fp32" else quantize_export(fp32, weights, Path(scratch) / weights)
            results[f"onnxruntime, {weights} weights"] = scores(OnnxValign(folder), processor, sizes)
            print(report(args.checkpoint, results), flush=True)
    text = report(args.checkpoint, results)
    if not args.no_write:
        replace_section(text, "agreement")


if __name__ == "__main__":
    main()
