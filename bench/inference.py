"""Caption generation at the paper's shape against the floor the machine allows, both measured in the same run.

The floor: a warm dense matmul's rate (best of several) bounds the prefill (vision tower, projector and prompt; its
FLOPs counted by `torch.utils.flop_counter`), and a warm matrix–vector product's weight streaming rate bounds each
decode step, which must read the language model's weights once (its decoder layers and head; the embedding lookup
reads one row per token). Every figure is reported beside its floor and as time / floor (1.0× = at the limit).

The model is valign's default shape (SigLIP so400m-patch14-224 + Qwen2.5-0.5B) with random weights, prompted with
256 image tokens + 15 text tokens and made to generate exactly `--new-tokens` tokens greedily. Results replace the
inference section of BENCHMARKS.md.

    .venv/bin/python bench/inference.py [--batches 1 8] [--new-tokens 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
import transformers
from harness import count_flops, cpu_supports_bf16, device, machine_description, replace_section, synchronize
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.utils import logging as hf_logging

from valign import ValignConfig, ValignForConditionalGeneration

TEXT_TOKENS = 15  # the prompt around the image: a chat turn asking for a caption


def best_time(fn, repeats: int, warmup: int = 2) -> float:
    """The fastest of `repeats` warm calls: a machine limit is what the quietest moment shows."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a warm dense size² matmul in `dtype`."""
    a, b = (torch.randn(size, size, device=device(), dtype=dtype) for _ in range(2))
    return 2 * size**3 / best_time(lambda: a @ b, repeats)


def weight_stream_rate(dtype: torch.dtype, rows: int = 8192, cols: int = 8192, repeats: int = 10) -> float:
    """Bytes/s of weights a warm matrix–vector product reads (a matrix far larger than the CPU's caches)."""
    weight = torch.randn(rows, cols, device=device(), dtype=dtype)
    vector = torch.randn(cols, device=device(), dtype=dtype)
    return weight.numel() * weight.element_size() / best_time(lambda: weight @ vector, repeats)


def decode_weight_bytes(model: ValignForConditionalGeneration) -> int:
    """Bytes a decode step must read: the language model's parameters except its embedding table, plus the head."""
    embedding = model.get_input_embeddings().weight
    language = sum(p.numel() * p.element_size() for p in model.language_model.parameters() if p is not embedding)
    head = model.get_output_embeddings().weight
    return language + head.numel() * head.element_size()


class TokenClock(StoppingCriteria):
    """Never stops generation; records when each new token is ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


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


def measure(model, inputs: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median time to the first token and per decode step over `repeats` greedy generations (after a warm-up)."""
    first, step = [], []
    for index in range(repeats + 1):
        clock = TokenClock()
        synchronize()
        start = time.perf_counter()
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
        if index:  # the first call warms up
            first.append(clock.times[0] - start)
            step.append((clock.times[-1] - clock.times[0]) / (new_tokens - 1))
    return {"first_token_s": statistics.median(first), "decode_s": statistics.median(step)}


def bench(dtype: torch.dtype, batches: list[int], new_tokens: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    config = ValignConfig(attn_implementation="sdpa")
    model = ValignForConditionalGeneration(config).to(device(), dtype).eval()
    rate, stream = matmul_rate(dtype), weight_stream_rate(dtype)
    decode_floor = decode_weight_bytes(model) / stream
    rows = []
    with torch.no_grad():
        for batch in batches:
            inputs = prompt_inputs(config, batch, dtype)
            prefill_floor = count_flops(lambda inputs=inputs: model(**inputs)) / rate
            result = measure(model, inputs, new_tokens, repeats)
            caption = result["first_token_s"] + (new_tokens - 1) * result["decode_s"]
            caption_floor = prefill_floor + (new_tokens - 1) * decode_floor
            rows.append(
                {
                    "dtype": dtype,
                    "batch": batch,
                    **result,
                    "prefill_floor_s": prefill_floor,
                    "decode_floor_s": decode_floor,
                    "caption_s": caption,
                    "caption_floor_s": caption_floor,
                    "matmul_flops": rate,
                    "stream_bytes": stream,
                }
            )
            print(
                f"{dtype} batch {batch}: first token {result['first_token_s']:.3f} s, decode "
                f"{1000 * result['decode_s']:.1f} ms/token, caption {caption:.2f} s",
                flush=True,
            )
    return rows


def report(rows: list[dict], new_tokens: int) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} by `bench/inference.py` on {machine_description()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}. Eager "
        f"`generate` (dynamic KV cache, SDPA), random weights at the paper's shape, 256 image + {TEXT_TOKENS} text "
        f"tokens, {new_tokens} greedy tokens; medians of the timed calls. Floors from this run:",
        "",
        "| dtype | dense matmul (warm, best) | weight streaming, matrix–vector (warm, best) |",
        "|---|---|---|",
    ]
    for row in {r["dtype"]: r for r in rows}.values():
        lines.append(
            f"| {dtype_name(row['dtype'])} | {row['matmul_flops'] / 1e12:.2f} TFLOP/s | "
            f"{row['stream_bytes'] / 1e9:.1f} GB/s |"
        )
    lines += [
        "",
        f"| weights | batch | time to first token (floor, ×) | decode per token (floor, ×) | "
        f"{new_tokens}-token caption (floor, ×) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {dtype_name(r['dtype'])} | {r['batch']} | {ratio(r['first_token_s'], r['prefill_floor_s'])} | "
            f"{ratio(r['decode_s'], r['decode_floor_s'], ms=True)} | {ratio(r['caption_s'], r['caption_floor_s'])} |"
        )
    return "\n".join(lines)


def ratio(seconds: float, floor: float, ms: bool = False) -> str:
    shown = f"{1000 * seconds:.1f} ms ({1000 * floor:.1f} ms" if ms else f"{seconds:.3f} s ({floor:.3f} s"
    return f"{shown}, {seconds / floor:.1f}×)"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    # bf16 only where the hardware computes it (CUDA, AMX / AVX512-BF16): elsewhere its kernels are emulated.
    native = torch.cuda.is_available() or cpu_supports_bf16()
    dtypes = [torch.float32, *([torch.bfloat16] if native else [])]
    rows = [row for dtype in dtypes for row in bench(dtype, args.batches, args.new_tokens, args.repeats)]
    text = report(rows, args.new_tokens)
    print("\n" + text)
    if not args.no_write:
        replace_section(text, "inference")


if __name__ == "__main__":
    main()
