"""`transformers.Trainer` with per-module learning rates and freezing, and a loss/learning-rate log per stage."""

from __future__ import annotations

import ctypes
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..configuration_valign import fsdp_plugin_arguments
from ..data.skips import SkipCounter
from .config import MODULES

logger = logging.getLogger(__name__)


def module_of(parameter_name: str) -> str:
    """Which of valign's three parts a parameter belongs to (`lm_head` is part of the language model)."""
    for module in MODULES:
        if f".{module}." in f".{parameter_name}":
            return module
    if parameter_name.startswith("lm_head") or ".lm_head." in parameter_name:
        return "language_model"
    raise ValueError(f"parameter {parameter_name!r} belongs to none of {MODULES}")


def set_trainable(model: torch.nn.Module, learning_rates: dict[str, float]) -> dict[str, int]:
    """Freeze every module without a learning rate; return the trainable parameter count per module."""
    counts = dict.fromkeys(learning_rates, 0)
    for name, parameter in model.named_parameters():
        module = module_of(name)
        parameter.requires_grad_(module in learning_rates)
        if module in learning_rates:
            counts[module] += parameter.numel()
    return counts


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """The sequence positions whose next token is supervised in some row: the only logits a loss needs."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)


@contextmanager
def freed_memory_kept(device: torch.device, keep: bool = True):
    """While training on a CPU, keep glibc's malloc from handing freed memory back to the kernel; hand it back after.
    `keep=False` (a stage's `keep_freed_memory: false`) leaves glibc's default.

    A training step frees and reallocates the same gigabytes every step. By default glibc serves each block over
    32 MB with a fresh `mmap` and unmaps it when freed, and trims the heap's free top, so every step page-faults the
    kernel into zeroing those pages again (measured in docs/DESIGN.md, "Training on a CPU"). jemalloc or tcmalloc
    (`LD_PRELOAD`) avoid it too; this needs no install. Elsewhere than glibc it does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6") if keep and device.type == "cpu" else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    mallopt(m_mmap_max, 0)  # every block from the heap, which keeps what is freed ...
    mallopt(m_trim_threshold, -1)  # ... at any size: glibc reads the int as a size_t, so -1 is SIZE_MAX
    try:
        yield
    finally:
        # glibc's default values (DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD); its mmap threshold stays where it had
        # grown, as any mallopt of the trim threshold ends glibc's adjusting of it
        mallopt(m_mmap_max, 65536)
        mallopt(m_trim_threshold, 128 * 1024)
        malloc_trim(0)


class ValignTrainer(Trainer):
    """A Trainer whose optimizer has one learning rate per module (vision tower, projector, language model), and
    whose loss computes logits only where a token is supervised: the 49k–152k-wide vocabulary head over every
    position is about a fifth of a 135M language model's training step, for the two answer tokens of a VQA sample."""

    def __init__(self, *args, learning_rates: dict[str, float], keep_freed_memory: bool = True, **kwargs) -> None:
        self.learning_rates = learning_rates
        self.keep_freed_memory = keep_freed_memory
        super().__init__(*args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        plugin_args = fsdp_plugin_arguments(self.args)  # before accelerate fails on what transformers 4.x cannot do
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            # accelerate keeps an FSDP plugin only on GPU kinds and silently trains CPU processes with DDP instead;
            # torch's FSDP2 shards over gloo as well (tests/test_fsdp.py), so CPU processes get it too.
            # In PartialState too, as accelerate does for GPUs: every later AcceleratorState() copies it from there.
            state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
            if state.mixed_precision != "no":
                state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
            self.is_fsdp_enabled = True

    def train(self, *args, **kwargs):
        with freed_memory_kept(self.args.device, self.keep_freed_memory):
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if "labels" in inputs and "logits_to_keep" not in inputs:
            inputs = {**inputs, "logits_to_keep": supervised_positions(inputs["labels"])}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups = []
        for module, lr in self.learning_rates.items():
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and module_of(n) == module]
            for with_decay in (True, False):
                params = [p for n, p in named if (n in decay) == with_decay]
                if params:
                    weight_decay = self.args.weight_decay if with_decay else 0.0
                    groups.append({"params": params, "lr": lr, "weight_decay": weight_decay, "module": module})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)  # each group carries its own
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


class TrainingLogCallback(TrainerCallback):
    """Write the loss and per-module learning rates as JSON lines (`plot_stage_log` draws them once the stage is
    saved)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "training_log.jsonl"

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"]}
        if optimizer is not None:
            record["learning_rates"] = {g["module"]: g["lr"] for g in optimizer.param_groups if "module" in g}
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as log:
            log.write(json.dumps(record) + "\n")


class SkipReportCallback(TrainerCallback):
    """The skip report of a training set: logged at each epoch end, written to `folder/skips.json` when training
    ends (`SkipCounter.summary`). Each checkpoint holds the counts so far with their ledgers (`skips.json`, from
    `SkipCounter.state_dict`), and a run resumed from it continues them: rows read before the checkpoint are not
    read again, and rows read again after it are not counted twice."""

    FILE = "skips.json"

    def __init__(self, skips: SkipCounter, folder: str | Path) -> None:
        self.skips = skips
        self.folder = Path(folder)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or state.global_step == 0:
            return
        path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / self.FILE
        if path.is_file():
            self.skips.load_state_dict(json.loads(path.read_text()))
        else:
            logger.warning(
                "%s is missing: the skip report counts only the rows read from step %s", path, state.global_step
            )

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            (checkpoint / self.FILE).write_text(json.dumps(self.skips.state_dict(), indent=1) + "\n")

    def on_epoch_end(self, args, state, control, **kwargs):
        logger.info("training data, epoch %s: %s", state.epoch, self.skips.report())

    def on_train_end(self, args, state, control, **kwargs):
        logger.info("training data: %s", self.skips.report())
        if state.is_world_process_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / self.FILE).write_text(json.dumps(self.skips.summary(), indent=1) + "\n")


def read_training_log(path: str | Path) -> list[dict]:
    """The records of a log, keeping the last one per step (a resumed run re-logs steps after its checkpoint)."""
    records = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return [records[step] for step in sorted(records)]


def plot_stage_log(folder: Path, title: str) -> None:
    """Plot a saved stage's training log. Drawn after the model is saved, and an error is only reported: the plot
    must never cost the trained stage."""
    log = folder / "training_log.jsonl"
    if not log.exists():
        return
    try:
        plot_training_log(log, folder / "training_log.png", title=title)
    except Exception as error:  # matplotlib missing, a malformed log, a full disk: nothing to lose the stage over
        logger.error(
            "%s: no loss plot (%s: %s); the trained stage is saved in %s", title, type(error).__name__, error, folder
        )


def plot_training_log(log_path: str | Path, png_path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_training_log(log_path)
    steps = [r["step"] for r in records]
    figure, (loss_axis, lr_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot(steps, [r["loss"] for r in records])
    loss_axis.set(title=f"{title}: training loss", xlabel="step", ylabel="loss")
    for module in records[0].get("learning_rates", {}):
        lr_axis.plot(steps, [r["learning_rates"][module] for r in records], label=module)
    lr_axis.set(title="learning rate", xlabel="step")
    lr_axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
