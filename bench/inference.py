"""Caption generation at the paper's shape against the floor the machine allows, both measured in the same run.

The floor: a warm dense matmul's rate (best of several) bounds the prefill (vision tower, projector and prompt; its
FLOPs counted by `torch.utils.flop_counter`), and the rate at which memory streams weights bounds each decode step,
which must read the language model's weights once (its decoder layers and head; the embedding lookup reads one row
per token): the fastest of a warm matrix–vector product and a warm sum, each cycling through as many bytes of
distinct weights as a step reads, since one matrix read again and again stays partly in the last-level cache. (A
product's kernel alone is no floor: torch's own bf16 one can read at a quarter of what the memory gives.) Every
figure is reported beside its floor and as time / floor (1.0× = at the limit); the rates are read before and after
the timed calls and each kept at its best, since one reading on a shared machine can be far low.

The model is valign's default shape (SigLIP so400m-patch14-224 + Qwen2.5-0.5B) with random weights, prompted with
256 image tokens + 15 text tokens and made to generate exactly `--new-tokens` tokens greedily: PyTorch eager (fp32,
and bf16 where the hardware computes it), the compiled runtime in the fastest float dtype (as loaded, int8 weights,
int8 weights and activations: `--compiled`), then the model exported to ONNX (fp32, and its int8 / int4 weight-only
variants) run by onnxruntime. Results replace the inference section of BENCHMARKS.md. `--checkpoint` times a saved
checkpoint instead (e.g. the demo's, to see where the export pays: the time the export took is reported) and only
prints.

    .venv/bin/python bench/inference.py [--batches 1 8] [--new-tokens 20] [--repeats 3] [--onnx fp32 int8 int4]
                                        [--compiled native int8 w8a8] [--checkpoint FOLDER]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import onnxruntime
import torch
import transformers
from harness import (
    TokenClock,
    compiled_variant,
    count_flops,
    device,
    dtype_name,
    machine_description,
    matmul_flops_per_second,
    replace_section,
    synchronize,
    weight_stream_rates,
)
from transformers import StoppingCriteriaList
from transformers.utils import logging as hf_logging

from valign import ValignConfig, ValignForConditionalGeneration
from valign.checkpoint import load_checkpoint, native_bf16
from valign.export.compiled_runtime import WEIGHTS, CompiledValign
from valign.export.onnx_runtime import DECODER_FILE, OnnxValign, export_model, quantize_export

TEXT_TOKENS = 15  # the prompt around the image: a chat turn asking for a caption


def decode_weight_bytes(model: ValignForConditionalGeneration, int8_linear: bool = False) -> int:
    """Bytes a decode step must read: the language model's parameters except its embedding table, plus the head;
    `int8_linear`: with every linear weight stored in one byte (the compiled runtime's int8 and w8a8; scales not
    counted)."""
    embedding = model.get_input_embeddings().weight
    linear = {id(m.weight) for m in model.language_model.modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings().weight
    weights = [p for p in model.language_model.parameters() if p is not embedding] + [head]
    return sum(p.numel() * (1 if int8_linear and (id(p) in linear or p is head) else p.element_size()) for p in weights)


def prompt_inputs(config: ValignConfig, batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random text tokens around one image's placeholder tokens, and random pixels."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, config.image_token_id, (batch, TEXT_TOKENS), generator=generator)
    image = torch.full((batch, config.image_seq_length), config.image_token_id)
    input_ids = torch.cat([text[:, :5], image, text[:, 5:]], dim=1)
    size = config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(dtype)
    return {
        "input_ids": input_ids.to(device()),
        "attention_mask": torch.ones_like(input_ids).to(device()),
        "pixel_values": pixels.to(device()),
    }


def measure_torch(model, inputs: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median time to the first token and per decode step over `repeats` greedy generations (after a warm-up)."""
    clock = TokenClock()

    def generate() -> None:
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]),
        )

    return token_times(generate, clock, new_tokens, repeats)


def measure_runtime(runtime, calls: list[tuple[object, str]], inputs: dict, new_tokens: int, repeats: int) -> dict:
    """The same figures for valign's own runtimes (ONNX, compiled), clocked after each call of the named methods,
    which together run once per token (the first call is the prefill)."""
    runtime.generation_config.eos_token_id = None  # random weights: never stop early
    clock = TokenClock()

    def clocked(call):
        def run(*args, **kwargs):
            outputs = call(*args, **kwargs)
            clock.times.append(time.perf_counter())
            return outputs

        return run

    originals = [(owner, name, getattr(owner, name)) for owner, name in calls]
    for owner, name, call in originals:
        setattr(owner, name, clocked(call))
    try:
        return token_times(lambda: runtime.generate(**inputs, max_new_tokens=new_tokens), clock, new_tokens, repeats)
    finally:
        for owner, name, call in originals:
            setattr(owner, name, call)


def token_times(generate: Callable[[], object], clock: TokenClock, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median time to the first token and per decode step, read off `clock` within each of `repeats` generations
    (after a warm-up): within one call, so the prefill's run-to-run variation does not leak into the decode step."""
    first, step, calls = [], [], []
    for index in range(repeats + 1):
        clock.times.clear()
        synchronize()
        start = time.perf_counter()
        generate()
        calls.append(time.perf_counter() - start)
        if len(clock.times) != new_tokens:
            raise RuntimeError(f"expected {new_tokens} new tokens, clocked {len(clock.times)}")
        if index:  # the first call warms up (and compiles, for the compiled runtime)
            first.append(clock.times[0] - start)
            step.append((clock.times[-1] - clock.times[0]) / (new_tokens - 1))
    return {
        "first_token_s": statistics.median(first),
        "decode_s": statistics.median(step),
        "warmup_extra_s": calls[0] - statistics.median(calls[1:]),
    }


def onnx_decode_bytes(folder: Path, config: ValignConfig) -> int:
    """Bytes a decode step of an export must read: its decoder's stored weights less the embedding table (a
    Gather reads one row per token)."""
    text = config.text_config
    return (folder / f"{DECODER_FILE}.data").stat().st_size - text.vocab_size * text.hidden_size * 4


def row(variant: str, batch: int, result: dict, work: tuple[int, int, torch.dtype], new_tokens: int) -> dict:
    """A timed variant with the `work` its floors are computed from once the run is over: the prompt's FLOPs, the
    bytes of weights a decode step reads, and the dtype the FLOPs are computed in."""
    caption = result["first_token_s"] + (new_tokens - 1) * result["decode_s"]
    print(
        f"{variant} batch {batch}: first token {result['first_token_s']:.3f} s, decode "
        f"{1000 * result['decode_s']:.1f} ms/token, caption {caption:.2f} s",
        flush=True,
    )
    return {
        "variant": variant,
        "batch": batch,
        **result,
        "caption_s": caption,
        "work": work,
    }


def build_model(checkpoint: Path | None) -> ValignForConditionalGeneration:
    """The checkpoint in fp32, or the paper's shape with random weights (the same in every process: seeded)."""
    if checkpoint:
        return load_checkpoint(checkpoint, dtype=torch.float32)[0]
    torch.manual_seed(0)
    return ValignForConditionalGeneration(ValignConfig(attn_implementation="sdpa")).eval()


def compiled_rows(
    args: argparse.Namespace, weights: str, dtype: torch.dtype, flops: dict[int, int], decode_bytes: int
) -> list[dict]:
    """The compiled runtime with `weights`, timed at each batch size (run in a process of its own)."""
    hf_logging.set_verbosity_error()
    model = build_model(args.checkpoint).to(device(), dtype)
    runtime = CompiledValign(model, weights)
    calls = [(runtime, "prefill"), (runtime, "decode_step")]
    name = compiled_variant(weights, dtype)
    rows = []
    for batch in args.batches:
        inputs = prompt_inputs(model.config, batch, dtype)
        result = measure_runtime(runtime, calls, inputs, args.new_tokens, args.repeats)
        rows.append(row(name, batch, result, (flops[batch], decode_bytes, dtype), args.new_tokens))
    return rows


def measure_limits(step_bytes: dict[torch.dtype, int]) -> dict:
    """Per dtype: the dense matmul rate and the weight streaming rates over `step_bytes` of distinct weights."""
    return {
        dtype: (matmul_flops_per_second(dtype), weight_stream_rates(dtype, size)) for dtype, size in step_bytes.items()
    }


def best_limits(*readings: dict) -> dict:
    """Each rate at its best over `readings` taken at different moments of the run: the machine is shared, and its
    memory streamed 47 GB/s in one minute and 81 GB/s a few minutes later."""
    return {
        dtype: (
            max(reading[dtype][0] for reading in readings),
            {kernel: max(reading[dtype][1][kernel] for reading in readings) for kernel in streams},
        )
        for dtype, (_, streams) in readings[0].items()
    }


def bench(args: argparse.Namespace, scratch: Path) -> tuple[list[dict], dict]:
    model = build_model(args.checkpoint)
    config = model.config
    # bf16 only where the hardware computes it (CUDA, AMX / AVX512-BF16): elsewhere its kernels are emulated.
    dtypes = [torch.float32, *([torch.bfloat16] if native_bf16(device()) else [])]
    # Streaming is measured over as many bytes of distinct weights as the model's decode step reads in that dtype.
    step_bytes = {dtype: decode_weight_bytes(model) // model.dtype.itemsize * dtype.itemsize for dtype in dtypes}
    limits = measure_limits(step_bytes)
    inputs = {batch: prompt_inputs(config, batch, torch.float32) for batch in args.batches}
    with torch.no_grad():
        # Generation needs the logits of the prompt's last position only (both runtimes compute no others).
        flops = {batch: count_flops(lambda x=inputs[batch]: model(**x, logits_to_keep=1)) for batch in args.batches}
    rows = []
    for dtype in dtypes:
        typed = model.to(device(), dtype)
        with torch.no_grad():
            for batch in args.batches:
                batch_inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs[batch].items()}
                result = measure_torch(typed, batch_inputs, args.new_tokens, args.repeats)
                work = flops[batch], decode_weight_bytes(typed), dtype
                rows.append(row(f"PyTorch eager, {dtype_name(dtype)}", batch, result, work, args.new_tokens))
        if dtype == torch.float32 and len(dtypes) > 1:
            continue  # compiled: in the fastest float dtype only (compiling each variant takes about a minute)
        spawn = multiprocessing.get_context("spawn")
        for weights in args.compiled:
            bytes_read = decode_weight_bytes(typed, int8_linear=weights != "native")
            # A process per variant: inductor's frozen graphs outlive `torch._dynamo.reset()`, and three variants'
            # weights in one process overflowed 24 GiB once the ONNX export began.
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                job = pool.submit(compiled_rows, args, weights, dtype, flops, bytes_read)
                rows += job.result()
    if args.onnx:
        model = model.to("cpu", torch.float32)
        start = time.perf_counter()
        fp32 = export_model(model, scratch / "fp32")
        print(f"export (fp32 graphs): {time.perf_counter() - start:.1f} s", flush=True)
        del model
        for weights in args.onnx:
            folder = fp32 if weights == "fp32" else quantize_export(fp32, weights, scratch / weights)
            runtime = OnnxValign(folder)
            for batch in args.batches:
                calls = [(runtime.decoder, "run")]
                result = measure_runtime(runtime, calls, inputs[batch], args.new_tokens, args.repeats)
                # onnxruntime computes in fp32: int weights are unpacked on the fly.
                work = flops[batch], onnx_decode_bytes(folder, config), torch.float32
                rows.append(row(f"onnxruntime, {weights} weights", batch, result, work, args.new_tokens))
            del runtime
    return rows, best_limits(limits, measure_limits(step_bytes))


def report(rows: list[dict], limits: dict, new_tokens: int, subject: str) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} by `bench/inference.py` on {machine_description()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"onnxruntime {onnxruntime.__version__}. {subject}, its image tokens + {TEXT_TOKENS} "
        f"text tokens, {new_tokens} greedy tokens; PyTorch: eager `generate` (dynamic KV cache, SDPA) and the compiled "
        "runtime (`--runtime compiled`: static KV cache, inductor graphs with frozen weights; the prompt in float, "
        "decode steps with torchao's int8 weight-only or int8 weights and dynamic int8 activations); onnxruntime: "
        "valign's export (`valign export`; int weights block-quantized by `MatMulNBits`, whose kernels quantize "
        "activations per block on the fly). Medians of the timed calls. Floors from this run "
        "(each rate the best of readings before and after the timed calls):",
        "",
        "| dtype | dense matmul (warm, best) | weights streamed by a matrix–vector product / by a sum (warm, best) |",
        "|---|---|---|",
    ]
    for dtype, (rate, streams) in limits.items():
        streamed = " / ".join(f"{stream / 1e9:.1f}" for stream in streams.values())
        lines.append(f"| {dtype_name(dtype)} | {rate / 1e12:.2f} TFLOP/s | {streamed} GB/s |")
    lines += [
        "",
        f"| runtime, weights | batch | time to first token (floor, ×) | decode per token (floor, ×) | "
        f"{new_tokens}-token caption (floor, ×) | first call's extra time (compiling) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        flops, decode_bytes, dtype = r["work"]
        rate, streams = limits[dtype]
        prefill_floor, decode_floor = flops / rate, decode_bytes / max(streams.values())
        caption_floor = prefill_floor + (new_tokens - 1) * decode_floor
        lines.append(
            f"| {r['variant']} | {r['batch']} | {ratio(r['first_token_s'], prefill_floor)} | "
            f"{ratio(r['decode_s'], decode_floor, ms=True)} | {ratio(r['caption_s'], caption_floor)} | "
            f"{r['warmup_extra_s']:.1f} s |"
        )
    lines += [
        "",
        "Prefill floor: the model's FLOPs for the prompt (`torch.utils.flop_counter`; logits of the last position "
        "only, as generation computes them) at the dense matmul rate of the weights' compute dtype (fp32 for every "
        "onnxruntime variant; fp32 on a CPU: the faster of torch's and onnxruntime's). Decode floor: the bytes of "
        "weights one step reads (the language model and head; for an export, its decoder's stored weights less the "
        "embedding table) at the faster of the two streaming rates, each over as many bytes of distinct weights.",
    ]
    return "\n".join(lines)


def ratio(seconds: float, floor: float, ms: bool = False) -> str:
    shown = f"{1000 * seconds:.1f} ms ({1000 * floor:.1f} ms" if ms else f"{seconds:.3f} s ({floor:.3f} s"
    return f"{shown}, {seconds / floor:.1f}×)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--onnx", nargs="*", default=["fp32", "int8", "int4"], help="exported variants to time")
    parser.add_argument(
        "--compiled",
        nargs="*",
        default=list(WEIGHTS),
        choices=WEIGHTS,
        help="compiled-runtime weights to time (native: as eager)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    parser.add_argument("--checkpoint", type=Path, help="time this checkpoint instead of the random paper shape")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as scratch:
        rows, limits = bench(args, Path(scratch))
    subject = f"Checkpoint {args.checkpoint}" if args.checkpoint else "Random weights at the paper's shape"
    text = report(rows, limits, args.new_tokens, subject)
    print("\n" + text)
    if not (args.no_write or args.checkpoint):
        replace_section(text, "inference")


if __name__ == "__main__":
    main()
