"""A training stage as data: one YAML file per stage (see train/recipes/), read into `StageConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..configuration_valign import ATTN_MODES, check_loss_chunk_size
from ..data.prompts import CAPTION_PROMPT

MODULES = ("vision_tower", "multi_modal_projector", "language_model")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 where the device computes it natively (`resolve_precision`)
# What a LoRA stage adapts: the language model's projections (by these names) and, in full, the projector.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ("language_model", "multi_modal_projector")


@dataclass
class DataSource:
    """One data set feeding a stage: a Hub id or a local parquet/JSON file or folder."""

    source: str
    split: str = "train"
    limit: int | None = None  # first rows only (smoke runs, the CPU demo)
    streaming: bool = False


@dataclass
class LoraSettings:
    """A stage's `lora:` section: PEFT LoRA adapters instead of full fine-tuning.

    `targets`: projection names inside the language model (see `train.lora.language_model_targets`), or a regex
    PEFT full-matches against module names. `modules_to_save` train in full beside the adapters. With `merge`, the
    stage also writes `OUTPUT/merged`, the adapter merged into the weights, which the next stage starts from.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] | str = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    modules_to_save: list[str] = field(default_factory=lambda: ["multi_modal_projector"])
    merge: bool = False


@dataclass
class StageConfig:
    """Everything that distinguishes one stage of the recipe from another.

    `learning_rates` names the modules that train (the others are frozen): keys among `MODULES`; `lm_head` counts
    as part of `language_model`. `text_mask_ratio` > 0 turns on the alignment-stage objective: that share of the
    answer tokens is replaced by `mask_token` and only those positions are supervised. `attn_mode` None keeps the
    checkpoint's mode. `lora` makes it a LoRA stage (see `LoraSettings`): `learning_rates` then name the language
    model (its adapters) and the projector.
    """

    name: str
    attn_mode: str | None
    learning_rates: dict[str, float]
    data: list[DataSource]
    text_mask_ratio: float = 0.0
    mask_token: str = "<|mask|>"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    packing: bool = False  # samples end to end in rows (no padding), each attending only to itself
    pack_length: int | None = None  # tokens per packed row; None = max_length
    precision: str = "auto"
    gradient_checkpointing: bool = False
    loss_chunk_size: int | None = None  # ValignConfig.loss_chunk_size for this stage; None keeps the checkpoint's
    # On a CPU the heap keeps what a step frees for the next (1.3x faster steps); a kept heap can fragment past the
    # machine's memory where glibc's default (false) fits (docs/DESIGN.md, "Training on a CPU").
    keep_freed_memory: bool = True
    save_steps: int = 500
    logging_steps: int = 10
    seed: int = 0
    caption_prompt: str = CAPTION_PROMPT
    extra_training_args: dict[str, Any] = field(default_factory=dict)  # any other TrainingArguments field
    lora: LoraSettings | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name in ("", ".", "..") or any(c in self.name for c in "/\\\0"):
            # The name is a folder inside --output (and a Hub branch): a path would write outside it.
            raise ValueError(f"stage name must be a plain folder name (no '/', '\\', '..'), got {self.name!r}")
        self.data = [d if isinstance(d, DataSource) else DataSource(**d) for d in self.data]
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.attn_mode is not None and self.attn_mode not in ATTN_MODES:
            raise ValueError(f"{self.name}: attn_mode must be one of {ATTN_MODES}, got {self.attn_mode!r}")
        unknown = set(self.learning_rates) - set(MODULES)
        if unknown or not self.learning_rates:
            raise ValueError(
                f"{self.name}: learning_rates needs keys among {MODULES}, got {sorted(self.learning_rates)}"
            )
        if not 0.0 <= self.text_mask_ratio < 1.0:
            raise ValueError(f"{self.name}: text_mask_ratio must be in [0, 1), got {self.text_mask_ratio}")
        if self.text_mask_ratio > 0 and self.attn_mode != "bidirectional":
            raise ValueError(f"{self.name}: token masking is the bidirectional stage's objective; set attn_mode")
        try:
            check_loss_chunk_size(self.loss_chunk_size)
        except ValueError as error:
            raise ValueError(f"{self.name}: {error}") from None
        if self.precision not in PRECISIONS:
            raise ValueError(f"{self.name}: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.data:
            raise ValueError(f"{self.name}: no data sources")
        if self.lora is not None and not set(self.learning_rates) <= set(LORA_MODULES):
            raise ValueError(f"{self.name}: a LoRA stage trains only {LORA_MODULES}, got {sorted(self.learning_rates)}")
        if self.lora is not None and self.extra_training_args.get("fsdp"):
            # run_stage saves a sharded model by gathering it into the plain model class, which a PeftModel is not.
            raise ValueError(f"{self.name}: a LoRA stage is not sharded (its trained weights are few); use DDP")
        if self.lora is not None and self.text_mask_ratio > 0:
            raise ValueError(f"{self.name}: a LoRA stage has no token masking; set text_mask_ratio to 0")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> StageConfig:
        """Read a stage file; `overrides` replace top-level fields (e.g. from the command line)."""
        values = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
