"""Measuring tools for the benchmark: wall time, peak memory, FLOPs and the machine's matmul rate."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, schedule
from torch.utils.flop_counter import FlopCounterMode
from transformers import StoppingCriteria, Trainer, TrainingArguments


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TokenClock(StoppingCriteria):
    """Never stops generation; records when each new token is ready (generate calls it once per token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call takes, waiting for the accelerator to finish."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def release_memory() -> None:
    """Free what can be freed, and hand freed heap pages back to the OS so the next RSS peak is this phase's."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Peak:
    bytes: int = 0

    @property
    def gib(self) -> float:
        return self.bytes / 2**30


@contextmanager
def peak_memory() -> Iterator[Peak]:
    """Peak memory above the level at entry: the CUDA allocator's peak on a GPU, else the process's resident set
    sampled every millisecond (CPU tensors have no allocator statistics)."""
    peak = Peak()
    release_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield peak
        synchronize()
        peak.bytes = torch.cuda.max_memory_allocated() - start
        return
    start, highest, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            highest[0] = max(highest[0], resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak.bytes = max(highest[0], resident_bytes()) - start


def trainer_optimizer(parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as `ValignTrainer` builds it, from transformers' default `optim`: fused on torch >= 2.8, on CPUs too. A
    bare `torch.optim.AdamW` runs its per-tensor loop on a CPU (its fused and foreach paths default to GPUs only)."""
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(report_to="none"))
    return optimizer_class(parameters, **{**kwargs, "lr": 1e-6})


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call as counted by `torch.utils.flop_counter` (matmuls, convolutions, and attention where
    its kernel has a formula: the CUDA SDPA kernels do, the CPU one does not)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def top_operators(fn: Callable[[], object], count: int) -> list[tuple[str, float]]:
    """The `count` operators costing most self time in one call under `torch.profiler`, each with its share of the
    call's total: device (CUDA) time on a GPU, where the host only queues kernels, CPU time otherwise. One call
    runs under the profiler unrecorded first: the profiler's own allocations move the heap, and the first call
    after them page-faults fresh memory, which showed the copies and fills that touch it as 3-10x their cost."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    recorded = []
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=1, active=1),
        on_trace_ready=lambda done: recorded.extend(done.key_averages()),
    ) as profiler:
        for _ in range(2):
            fn()
            synchronize()
            profiler.step()
    attribute = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    operators = [e for e in recorded if not e.key.startswith("ProfilerStep")]
    events = sorted(operators, key=lambda e: getattr(e, attribute), reverse=True)
    total = sum(getattr(e, attribute) for e in events)
    return [(e.key, getattr(e, attribute) / total) for e in events[:count]]


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """The fastest of `repeats` warm calls. A machine limit is what its quietest moment shows: on a shared machine
    one reading can be 3x low, and a median of a few still carries the noise into every ratio built on it."""
    for _ in range(warmup):
        fn()
    return min(timed(fn) for _ in range(repeats))


def matmul_flops_per_second(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """The machine's dense matmul rate in `dtype` (warm, best of `repeats`): what a step could reach at best. On a
    CPU, fp32 takes the faster of torch's product and onnxruntime's: torch's runs through MKL, which runs no AVX-512
    kernels on AMD CPUs (2-core Zen 5 EPYC: 0.22 TFLOP/s against onnxruntime's 0.46)."""
    a, b = (torch.randn(size, size, device=device(), dtype=dtype) for _ in range(2))
    rate = 2 * size**3 / best_time(lambda: a @ b, repeats)
    if dtype == torch.float32 and device().type == "cpu":
        rate = max(rate, 2 * size**3 / onnxruntime_matmul_time(a.numpy(), b.numpy(), repeats))
    return rate


def onnxruntime_matmul_time(a: np.ndarray, b: np.ndarray, repeats: int) -> float:
    """Seconds onnxruntime's CPU MatMul (MLAS) takes for `a @ b` on torch's thread count (warm, best of `repeats`)."""
    import onnxruntime
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, x.shape) for name, x in (("a", a), ("b", b))]
    output = helper.make_tensor_value_info("c", TensorProto.FLOAT, (a.shape[0], b.shape[1]))
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", inputs, [output])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return best_time(lambda: session.run(None, {"a": a, "b": b}), repeats)


STREAM_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {
    "matrix–vector product": lambda weight, vector: weight @ vector,
    "sum": lambda weight, vector: weight.sum(),
}


def weight_stream_rates(
    dtype: torch.dtype, working_set: int, rows: int = 8192, cols: int = 8192, repeats: int = 10
) -> dict[str, float]:
    """Bytes/s at which each of `STREAM_KERNELS` reads weights (warm, best of `repeats`), cycling through distinct
    matrices of `working_set` bytes in all: a decode step reads that many bytes of weights once per token, and one
    matrix read again and again partly stays in the last-level cache (480 MiB on one 2-core VM: it streamed 30-36
    GB/s where 1 GB of distinct matrices streamed 26 GB/s). The matrix–vector product is what eager decoding runs;
    the sum shows what the memory allows, which a product's kernel may fall well short of: on a 2-core EPYC torch
    2.13's bf16 product read 19 GB/s, its sum 71 GB/s, and oneDNN's prepacked products about 40 GB/s."""
    size = rows * cols * torch.finfo(dtype).bits // 8
    weights = [torch.randn(rows, cols, device=device(), dtype=dtype) for _ in range(max(1, -(-working_set // size)))]
    vector = torch.randn(cols, device=device(), dtype=dtype)

    def stream(kernel: Callable[[torch.Tensor, torch.Tensor], object]) -> Callable[[], None]:
        return lambda: [kernel(weight, vector) for weight in weights]

    return {name: len(weights) * size / best_time(stream(kernel), repeats) for name, kernel in STREAM_KERNELS.items()}


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo() if line.startswith("model name")), "CPU")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cores = len(os.sched_getaffinity(0))  # those this process may use (`taskset` on a larger host)
    return f"{model}, {cores} cores, {memory:.0f} GiB RAM, no GPU (torch threads: {torch.get_num_threads()})"


COMPILED_WEIGHTS = {"native": "", "int8": "int8 weights, ", "w8a8": "int8 weights and activations, "}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compiled_variant(weights: str, dtype: torch.dtype) -> str:
    """The row name of the compiled runtime with `weights` (`export.compiled_runtime.WEIGHTS`) computing in `dtype`."""
    return f"PyTorch compiled, {COMPILED_WEIGHTS[weights]}{dtype_name(dtype)}"


def cpuinfo() -> list[str]:
    return Path("/proc/cpuinfo").read_text().splitlines()


BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def replace_section(text: str, name: str, path: Path = BENCHMARKS) -> None:
    """Replace the measured section `name` of BENCHMARKS.md (between `<!-- name:start -->` and `<!-- name:end -->`),
    keeping the hand-written text around it; a missing section is appended."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if start not in current:
        current = f"{current.rstrip()}\n\n{start}\n{end}\n"
    path.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, current, flags=re.S))
