"""Instantiate valign with the paper's shapes (SigLIP so400m-patch14-224 + Qwen2.5-0.5B, random weights) and
print its parameter count per component. Built on the meta device: no memory is allocated for the weights.

    python scripts/paper_shape.py
"""

from __future__ import annotations

import torch

from valign import ValignConfig, ValignForConditionalGeneration


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied weight once


def main() -> None:
    config = ValignConfig()
    with torch.device("meta"):
        model = ValignForConditionalGeneration(config)
    parts = {
        "vision_tower": model.model.vision_tower,
        "multi_modal_projector": model.model.multi_modal_projector,
        "language_model (+ tied lm_head)": model.model.language_model,
    }
    for name, module in parts.items():
        print(f"{name:32s} {count(module) / 1e6:9.2f} M")
    print(f"{'total':32s} {count(model) / 1e6:9.2f} M  (image tokens per image: {config.image_seq_length})")


if __name__ == "__main__":
    main()
