"""LoRA stages (a stage file's `lora:` section, run by `run_stage`): PEFT adapters on the language model.

LoRA goes into the language model only: the adapter targets are a regex anchored at ``model.language_model.``,
because SigLIP's attention has ``q_proj``/``k_proj``/``v_proj`` too and a plain name list would adapt the vision
tower. The projector is trained in full (``modules_to_save``). A stage's folder holds the adapter and the processor;
with `merge`, ``OUTPUT/merged`` holds a complete, Hub-ready checkpoint (weights, remote code, processor).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from ..checkpoint import save_checkpoint
from ..hub.push import checkpoint_files
from .config import ATTENTION_PROJECTIONS, LoraSettings


def language_model_targets(projections: Sequence[str] = ATTENTION_PROJECTIONS) -> str:
    """A regex (PEFT full-matches it against module names) for `projections` inside the language model only."""
    return rf"model\.language_model\.(?:.*\.)?(?:{'|'.join(projections)})"


def lora_config(
    r: int = 16,
    alpha: int = 32,
    targets: str | Sequence[str] | None = None,
    dropout: float = 0.05,
    modules_to_save: Sequence[str] = ("multi_modal_projector",),
) -> LoraConfig:
    """LoRA on the language model's projections (`targets`: a regex, or projection names for
    `language_model_targets`), `modules_to_save` (the projector) trained in full and saved with the adapter."""
    if targets is None or not isinstance(targets, str):
        targets = language_model_targets(targets or ATTENTION_PROJECTIONS)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=list(modules_to_save),
        bias="none",
    )


def stage_lora_config(settings: LoraSettings) -> LoraConfig:
    """The PEFT configuration of a stage's `lora:` section."""
    return lora_config(settings.r, settings.alpha, settings.targets, settings.dropout, settings.modules_to_save)


def add_lora(model: torch.nn.Module, config: LoraConfig, base_model_name_or_path: str | None = None) -> PeftModel:
    """Wrap `model` with LoRA; everything else (vision tower, embeddings, LM head) stays frozen.

    `base_model_name_or_path` is what the adapter config records as its base: pass the Hub id the base came from,
    so that the adapter loads anywhere (PEFT would otherwise record `model.name_or_path`, a local path if the base
    was read from one).
    """
    peft_model = get_peft_model(model, config)
    if base_model_name_or_path is not None:
        peft_model.peft_config["default"].base_model_name_or_path = str(base_model_name_or_path)
    return peft_model


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA adapter."""
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


def save_adapter(model: PeftModel, processor, folder: str | Path) -> Path:
    """The adapter (LoRA + projector weights, adapter_config.json, PEFT's card) and the processor, side by side."""
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_merged(model: PeftModel, processor, folder: str | Path) -> PreTrainedModel:
    """Merge the adapter into the base weights and save a complete checkpoint: weights, config, remote code, processor.

    Returns the merged model. `merge_and_unload` works in place: `model` is spent afterwards. `save_pretrained` of
    the merged (remote-code) model copies the .py files but writes no processor files, so those are added, and
    `hub.push.checkpoint_files` checks that nothing a Hub checkpoint needs is missing.
    """
    folder = Path(folder)
    merged = model.merge_and_unload()
    save_checkpoint(merged, processor, folder)
    checkpoint_files(folder)  # raises if config, weights, remote code or processor files are missing
    return merged
