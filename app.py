"""valign's demo app (Gradio): caption an image, or ask a question about it.

    python -m valign.app [--model PATH_OR_HUB_ID] [--host 127.0.0.1] [--port 7860] [--no-instruction]
                         [--trust-remote-code] [--runtime auto|torch|compiled|onnx]
                         [--precision auto|fp32|bf16|int8|w8a8]

A question is sent with the short-answer instruction the recipe trains VQA with (`--no-instruction`: alone); an
empty question asks for a caption.

As a Hugging Face Space (README metadata `sdk: gradio`, `app_file: app.py`; valign in requirements.txt), set the
Space variable `VALIGN_MODEL` to a Hub repo id; Spaces set `GRADIO_SERVER_NAME`/`GRADIO_SERVER_PORT`, which
gradio reads when `--host`/`--port` are not given. Without a model the app takes the offline demo's last
checkpoint (`outputs/demo/stages/stage-3`, from `python -m valign.train`) if it exists, else builds a tiny random
checkpoint offline (`outputs/app/tiny`) so that it starts anywhere; that one's answers are noise. valign's own
classes load the model: the checkpoint's Python files run only with `--trust-remote-code`. The runtime is chosen as
for the `valign` command (`export/runtime.py`) for a server's many requests: with `auto`, compiled PyTorch in bf16 on
a CPU with native bf16 (the first answer waits for the compiler), a cached ONNX export on onnxruntime on a CPU
without it.

The app sends nothing anywhere: analytics are off and no share link is made.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import gradio as gr
import torch

import valign
from valign.checkpoint import save_checkpoint
from valign.cli import default_model
from valign.data.prompts import CAPTION_PROMPT, vqa_prompt
from valign.eval.generate import DecodingSettings, PromptTooLongError, generate_answers
from valign.export.runtime import PRECISIONS, RUNTIMES, load_for_generation
from valign.processing_valign import load_image

# gradio reads this whenever it would send usage analytics or check PyPI for a newer version: never, here.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
TINY_CHECKPOINT = Path("outputs") / "app" / "tiny"
# Uploads over this size are refused by gradio (HTTP 413) before the app sees them; images within it but over
# PIL's pixel limit (Image.MAX_IMAGE_PIXELS, ~89 M) are refused by load_image from their header, before decoding.
MAX_FILE_SIZE = "20mb"


def tiny_checkpoint(folder: Path = TINY_CHECKPOINT) -> Path:
    """A valign checkpoint from tiny random backbones, built offline once (a few seconds) and reused."""
    if (folder / "config.json").is_file():
        return folder
    from valign.train.backbones import build_tiny_backbones

    # Built beside the target and renamed at the end, so an interrupted build is never taken for a checkpoint.
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    vision, text = build_tiny_backbones(partial / "backbones")
    model, processor = valign.from_backbones(str(vision), str(text))
    save_checkpoint(model, processor, partial)
    partial.rename(folder)
    return folder


def resolve_model(name: str | None) -> str | Path:
    if name:
        return name
    try:
        return default_model()
    except FileNotFoundError:
        return tiny_checkpoint()


def answer(
    model, processor, settings: DecodingSettings, image_path: str | None, question: str, instruction: bool = True
) -> str:
    """What the app shows for an uploaded image and a question: a caption when the question is empty; with
    `instruction`, the question goes with the short-answer instruction the recipe trains VQA with."""
    if image_path is None:
        raise gr.Error("Upload an image first.")
    try:
        image = load_image(image_path)
    except ValueError as error:
        raise gr.Error(str(error)) from error
    question = question.strip()
    asked = vqa_prompt(question) if instruction else question
    prompt = asked if question else CAPTION_PROMPT
    try:
        return generate_answers(model, processor, [image], [prompt], settings, progress=False)[0]
    except PromptTooLongError as error:  # a question past the language model's positions: say so in the app
        raise gr.Error(str(error)) from error


def build_app(model, processor, settings: DecodingSettings, instruction: bool = True) -> gr.Blocks:
    def reply(image_path: str | None, question: str) -> str:
        return answer(model, processor, settings, image_path, question, instruction)

    with gr.Blocks(title="valign", analytics_enabled=False) as app:
        gr.Markdown(
            "# valign\nCaption an image, or ask a question about it: leave the question empty for a caption. "
            "Model: [arXiv 2503.19508](https://arxiv.org/abs/2503.19508)-style SigLIP → MLP → Qwen2.5 with "
            "hybrid image attention."
        )
        with gr.Row():
            # filepath + image_mode=None: gradio hands over the uploaded file untouched (no re-encoding), and
            # load_image converts it exactly as the `valign` command does.
            image = gr.Image(type="filepath", image_mode=None, label="Image", height=320, elem_id="image")
            with gr.Column():
                question = gr.Textbox(label="Question", placeholder="Empty: describe the image", elem_id="question")
                run = gr.Button("Run", variant="primary", elem_id="run")
                output = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
        run.click(reply, [image, question], output)
        question.submit(reply, [image, question], output)
    return app


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_argument("--model", help="checkpoint folder or Hub repo id (default: $VALIGN_MODEL, else the demo's)")
    cli.add_argument("--revision", help="Hub branch, tag or commit")
    cli.add_argument(
        "--trust-remote-code", action="store_true", help="load with the checkpoint's own Python files (they run here)"
    )
    cli.add_argument("--runtime", choices=RUNTIMES, default="auto", help="as for `valign caption` (default: auto)")
    cli.add_argument("--precision", choices=PRECISIONS, default="auto", help="as for `valign caption` (default: auto)")
    cli.add_argument("--host", help="address to listen on (default: gradio's, 127.0.0.1)")
    cli.add_argument("--port", type=int, help="port (default: gradio's, 7860)")
    cli.add_argument("--max-new-tokens", type=int, default=40)
    cli.add_argument(
        "--no-instruction", action="store_true", help="send questions alone, without the short-answer instruction"
    )
    return cli


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    name = resolve_model(args.model)
    model, processor, runtime = load_for_generation(
        name, args.revision, args.runtime, args.trust_remote_code, args.precision
    )
    print(f"valign app: model {name} on {runtime}", flush=True)
    settings = DecodingSettings(max_new_tokens=args.max_new_tokens, batch_size=1)
    app = build_app(model, processor, settings, instruction=not args.no_instruction)
    launch(app, args.host, args.port)


def launch(app: gr.Blocks, host: str | None, port: int | None, **options):
    """Serve `app` locally (no share link), refusing uploads over `MAX_FILE_SIZE`."""
    return app.launch(server_name=host, server_port=port, share=False, max_file_size=MAX_FILE_SIZE, **options)


if __name__ == "__main__":
    main()
