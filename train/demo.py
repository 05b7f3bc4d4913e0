"""Offline demo: build a tiny valign checkpoint from local random backbones, load it back as a Hub user would,
and caption a few rendered scenes. It exercises the whole package without network or GPU; the captions are
those of an untrained model until the training recipe runs.

    python -m valign.train.demo [--output outputs/demo] [--images 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from ..modeling_valign import ValignForConditionalGeneration
from .backbones import build_tiny_backbones
from .synthetic import make_scene, recap_caption, render_scene

AUTO_MODEL = getattr(transformers, "AutoModelForVision2Seq", None) or transformers.AutoModelForImageTextToText


def build_checkpoint(folder: Path) -> Path:
    vision, text = build_tiny_backbones(folder / "backbones")
    model, processor = ValignForConditionalGeneration.from_backbones(str(vision), str(text))
    model.save_pretrained(folder / "checkpoint")
    processor.save_pretrained(folder / "checkpoint")
    return folder / "checkpoint"


def caption(checkpoint: Path, images: list, max_new_tokens: int = 24) -> list[str]:
    model = AUTO_MODEL.from_pretrained(checkpoint, trust_remote_code=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    batch = processor(images=images, text=[prompt] * len(images))
    with torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args(argv)

    checkpoint = build_checkpoint(args.output)
    scenes = [make_scene(seed=0, index=i, split="test") for i in range(args.images)]
    captions = caption(checkpoint, [render_scene(scene, 32) for scene in scenes])
    print(f"checkpoint: {checkpoint}")
    for scene, text in zip(scenes, captions):
        print(f"- scene: {recap_caption(scene)}\n  model: {text!r}")


if __name__ == "__main__":
    main()
