"""Run a valign checkpoint in a fresh process, under whichever transformers major this Python has.

    python crossload.py score FOLDER OUT.safetensors [REVISION]
                                                        logits, input ids and pixels for a fixed left-padded batch
    python crossload.py generate FOLDER OUT.json        greedy continuations of that batch with `generate`
    python crossload.py pipeline FOLDER OUT.json        the image-text-to-text pipeline, one chat and a batch of two
    python crossload.py flex FOLDER OUT.safetensors     that batch's logits with sdpa and with flex attention
    python crossload.py build FOLDER                    build and save a tiny checkpoint with this major
    python crossload.py real-shapes SPEC.json           build checkpoints from backbones shaped like the real ones
                                                        and report on them, then load and report on other folders
                                                        (SPEC: {"build": [[FOLDER, VISION, TEXT, OUT], ...],
                                                        "load": [[FOLDER, OUT], ...]}; see `report`)

Only building imports valign; every folder is loaded as Hub remote code, as a user would. FOLDER may also be a
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


def flex(folder: str, out: str) -> None:
    torch._dynamo.config.automatic_dynamic_shapes = False  # torch's CPU flex template fails with dynamic shapes
    logits = {}
    for kernel in ("sdpa", "flex_attention"):
        model = AUTO_MODEL.from_pretrained(folder, trust_remote_code=True, attn_implementation=kernel).eval()
        batch = fixed_batch(transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=True))
        with torch.no_grad():
            logits[kernel] = model(**batch).logits.contiguous()
    save_file({**logits, "attention_mask": batch["attention_mask"].contiguous()}, out)


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


# Two prompts of different lengths, so a batch of them is padded.
CHAT_QUESTIONS = ["Describe the image.", "What shape is in the picture, and what colour is it? Answer in 3 words."]


def report(model, processor, out: str) -> None:
    """What a user gets from a checkpoint, for a fixed chat: `OUT.safetensors` (input ids, attention mask, pixels,
    logits, batched generation) and `OUT.json` (prompts, padding side, special tokens, one-by-one generation)."""
    prompts = [processor.apply_chat_template(chat(q), add_generation_prompt=True) for q in CHAT_QUESTIONS]
    images = [shape_image(c) for c in COLORS]
    batch = processor(images=images, text=prompts)
    settings = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = model(**batch).logits
        batched = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
        single = []
        for image, prompt in zip(images, prompts):
            alone = processor(images=[image], text=[prompt])
            single.append(model.generate(**alone, **settings)[0, alone["input_ids"].shape[1] :].tolist())
    tensors = {"logits": logits, "batched": batched, **batch}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out + ".safetensors")
    tokenizer = processor.tokenizer
    info = {
        "prompts": prompts,
        "padding_side": tokenizer.padding_side,
        "special_tokens": sorted(set(tokenizer.all_special_tokens)),
        "pad_token_id": tokenizer.pad_token_id,
        "single": single,
    }
    Path(out + ".json").write_text(json.dumps(info))


def real_shapes(spec_file: str) -> None:
    import valign
    from valign.train.backbones import build_tiny_backbones

    spec = json.loads(Path(spec_file).read_text())
    for folder, vision, text, out in spec.get("build", []):
        backbones = build_tiny_backbones(folder + "-bb", **backbone_kwargs(vision, text))
        torch.manual_seed(0)
        model, processor = valign.from_backbones(*map(str, backbones))
        model.eval().save_pretrained(folder)
        processor.save_pretrained(folder)
        report(model, processor, out)
    for folder, out in spec.get("load", []):
        report(*load(folder), out)


def backbone_kwargs(vision: str, text: str) -> dict:
    """The backbones of the real-shape tests. CLIP's config declares 48 px while its processor makes 32 px, so the
    encoder interpolates its position embeddings (as DINOv2's does, 64 px declared)."""
    return {"vision": vision, "text": text, **({"encoder_image_size": 48} if vision == "clip" else {})}


def build(folder: str) -> None:
    import valign
    from valign.train.backbones import build_tiny_backbones

    torch.manual_seed(0)
    model, processor = valign.from_backbones(*map(str, build_tiny_backbones(folder + "-bb")))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    commands = {
        "score": score,
        "flex": flex,
        "generate": generate,
        "pipeline": pipeline,
        "build": build,
        "real-shapes": real_shapes,
    }
    commands[command](*args)
    print(transformers.__version__)
