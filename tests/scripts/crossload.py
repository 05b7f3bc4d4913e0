"""Run a valign checkpoint in a fresh process, under whichever transformers major this Python has.

    python crossload.py score FOLDER OUT.safetensors [REVISION]
                                                        logits, input ids and pixels for a fixed left-padded batch
    python crossload.py generate FOLDER OUT.json        greedy continuations of that batch with `generate`
    python crossload.py pipeline FOLDER OUT.json        the image-text-to-text pipeline, one chat and a batch of two
    python crossload.py build FOLDER                    build and save a tiny checkpoint with this major

Only `build` imports valign; the others load the folder as Hub remote code, as a user would. FOLDER may also be a
Hub repo id (with `HF_ENDPOINT` set), and `score` takes the branch, tag or commit to load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageDraw
from safetensors.torch import save_file

AUTO_MODEL = transformers.AutoModelForImageTextToText  # 4.57 and 5.x (4.x's AutoModelForVision2Seq is deprecated)
QUESTIONS = ["Describe the image.", "What shape is in the picture, and what colour is it?"]
COLORS = ["red", "blue"]


def shape_image(color: str, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A white picture with a coloured ellipse, so different colours differ in most pixels."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((5, 5, size[0] - 5, size[1] - 5), fill=color)
    return image


def chat(question: str, image: Image.Image | None = None) -> list[dict]:
    image_item = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [image_item, {"type": "text", "text": question}]}]


def fixed_batch(processor) -> dict:
    texts = [processor.apply_chat_template(chat(q), add_generation_prompt=True) for q in QUESTIONS]
    return processor(images=[shape_image(c) for c in COLORS], text=texts)


def load(folder: str, revision: str | None = None):
    model = AUTO_MODEL.from_pretrained(folder, revision=revision, trust_remote_code=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder, revision=revision, trust_remote_code=True)
    return model, processor


def score(folder: str, out: str, revision: str | None = None) -> None:
    model, processor = load(folder, revision)
    batch = fixed_batch(processor)
    with torch.no_grad():
        logits = model(**batch).logits
    save_file({"logits": logits.contiguous(), **{k: v.contiguous() for k, v in batch.items()}}, out)


def generate(folder: str, out: str) -> None:
    model, processor = load(folder)
    batch = fixed_batch(processor)
    tokens = model.generate(**batch, max_new_tokens=6, do_sample=False)
    Path(out).write_text(json.dumps(tokens[:, batch["input_ids"].shape[1] :].tolist()))


def pipeline(folder: str, out: str) -> None:
    pipe = transformers.pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    conversations = [chat(q, shape_image(c)) for q, c in zip(QUESTIONS, COLORS)]
    single = pipe(text=conversations[0], max_new_tokens=6, return_full_text=False)
    batched = pipe(text=conversations, max_new_tokens=6, return_full_text=False, batch_size=2)
    answers = {"single": single[0]["generated_text"], "batched": [item[0]["generated_text"] for item in batched]}
    Path(out).write_text(json.dumps(answers))


def build(folder: str) -> None:
    from valign import ValignForConditionalGeneration
    from valign.train.backbones import build_tiny_backbones

    torch.manual_seed(0)
    model, processor = ValignForConditionalGeneration.from_backbones(*map(str, build_tiny_backbones(folder + "-bb")))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"score": score, "generate": generate, "pipeline": pipeline, "build": build}[command](*args)
    print(transformers.__version__)
