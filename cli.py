"""The `valign` command: caption images or ask a question about one, with a local or Hub checkpoint.

    valign caption IMAGE... [--prompt TEXT] [--model PATH_OR_HUB_ID] [--batch-size 8] [--max-new-tokens 40] [--json]
    valign ask IMAGE "QUESTION" [--no-instruction] [--model PATH_OR_HUB_ID] [--max-new-tokens 40] [--json]
    (both: [--revision REV] [--trust-remote-code] [--runtime auto|torch|compiled|onnx]
           [--precision auto|fp32|bf16|int8|w8a8])
    valign export CHECKPOINT [FOLDER] [--weights fp32|int8|int4] [--revision REV]

`export` writes the model as ONNX graphs run by onnxruntime (`export/onnx_runtime.py`), into FOLDER or, without
one, into valign's cache, where `--runtime auto` (the default) finds it. `auto` picks the fastest runtime that
decodes the same tokens (`export/runtime.py`): an export given as `--model` or cached for the checkpoint runs on
onnxruntime on a CPU without native bf16; PyTorch otherwise (bf16 on a CPU that computes it natively, through
compiled graphs and a static KV cache when there are enough images to pay for compiling: `compiled`).
`--runtime onnx` with a checkpoint exports it into the cache on first use. The ONNX and compiled runtimes decode
greedily only; ONNX computes in fp32. `--precision fp32` makes PyTorch compute in fp32 too where `auto` would take
bf16, for captions that must match the export's or another machine's token for token (bf16 rounding can tip a near
tie between two tokens); `--precision int8` stores the language model's weights as int8 (compiled runtime, or the
cached int8 export with `--runtime onnx`); `w8a8` (compiled runtime) quantizes its activations too, the fastest
decode on a CPU.

`ask` sends the question with the short-answer instruction the recipe trains VQA with (`data.prompts.vqa_prompt`);
`--no-instruction` sends the question alone.

Without `--model`, `$VALIGN_MODEL` is used, else the offline demo's final checkpoint in the working directory
(`outputs/demo/stages/stage-3`, made by `python -m valign.train`). A `--model` that exists on disk or looks like a
path (starts with `.`, `/` or `~`, or has more than one slash) is a local folder, anything else a Hub repo id. The
checkpoint's own Python files never run unless `--trust-remote-code` is given (then they load it, as for Hub users).

Plain output is one `PATH: TEXT` line per image (`ask`: the answer alone); `--json` prints one JSON object per
image instead: `{"path", "text"}` or `{"path", "error"}`. An unreadable image is reported and skipped while the
others are processed. Exit status:

- 0: every image answered;
- 1: some images could not be read (the others were answered);
- 2: a usage or model error: bad arguments, a model that cannot be found or loaded, a prompt that does not fit
  the language model's positions;
- 3: an internal error (e.g. generation crashed); answers printed before it stand.

With `--json`, a failure with status 2 or 3 also prints one object `{"error", "exit_status"}` on stdout, so stdout
is never empty (argparse's own errors excepted: they come before `--json` is known).

It lives at the package root (`valign.cli`) next to the model files because it is a user-facing front end of the
model, not an evaluation or training tool; `app.py` shares its default model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import transformers
from tqdm.auto import tqdm

from .checkpoint import is_local
from .data.prompts import CAPTION_PROMPT, vqa_prompt
from .eval.generate import DecodingSettings, PromptTooLongError, generate_answers
from .export.onnx_runtime import export_onnx
from .export.runtime import PRECISIONS, RUNTIMES, checkpoint_folder, ensure_export, load_for_generation
from .processing_valign import load_image

DEMO_CHECKPOINT = Path("outputs") / "demo" / "stages" / "stage-3"
MODEL_VARIABLE = "VALIGN_MODEL"  # a checkpoint folder or Hub repo id, for the command and the app
EXIT_IMAGE_ERRORS = 1
EXIT_USAGE = 2  # argparse's status for bad arguments; also a missing or unloadable model, a prompt too long
EXIT_INTERNAL = 3


class UsageError(Exception):
    """What the user asked for cannot be done (exit status 2); the message says why."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, whose errors (unknown option, invalid choice, ...) go through `main` like valign's own: with
    `--json`, they print the JSON error object too."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(message)


@dataclass
class Result:
    path: str
    text: str | None = None
    error: str | None = None

    def to_json(self) -> str:
        fields = {"path": self.path, **({"error": self.error} if self.error is not None else {"text": self.text})}
        return json.dumps(fields, ensure_ascii=False)


def default_model() -> str | Path:
    """The model to use without `--model`: `$VALIGN_MODEL` when set, else the demo's final checkpoint in the working
    directory (where `python -m valign.train` writes it). Raises FileNotFoundError saying how to make one."""
    if os.environ.get(MODEL_VARIABLE):
        return os.environ[MODEL_VARIABLE]
    if (DEMO_CHECKPOINT / "config.json").is_file():
        return DEMO_CHECKPOINT
    raise FileNotFoundError(
        f"no --model given and no demo checkpoint at {DEMO_CHECKPOINT}: train one with `python -m valign.train` "
        "(the offline demo, a few minutes on a CPU), or pass --model with a checkpoint folder or a Hub repo id"
    )


def run(
    model, processor, paths: Sequence[str], prompt: str, settings: DecodingSettings, progress: bool
) -> Iterator[Result]:
    """One Result per path, in order, a batch at a time (results appear as they are made; memory stays bounded)."""
    # Every batch as many rows as the first, so the compiled runtime compiles one batch size only.
    rows = min(settings.batch_size, len(paths))
    with tqdm(total=len(paths), unit="image", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(paths), settings.batch_size):
            chunk = paths[start : start + settings.batch_size]
            results = [Result(path) for path in chunk]
            readable: list[tuple[Result, Any]] = []
            for result in results:
                try:
                    readable.append((result, load_image(result.path)))
                except ValueError as error:  # load_image's message names the file and the reason
                    result.error = str(error)
            if readable:
                images = [image for _, image in readable]
                prompts = [prompt] * len(images)
                texts = generate_answers(model, processor, images, prompts, settings, progress=False, rows=rows)
                for (result, _), text in zip(readable, texts):
                    result.text = text
            yield from results
            bar.update(len(chunk))


def parser() -> argparse.ArgumentParser:
    root = ArgumentParser(prog="valign", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    caption = commands.add_parser("caption", help="describe each image")
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    caption.add_argument("--prompt", default=CAPTION_PROMPT, help="the instruction sent with each image")
    ask = commands.add_parser("ask", help="answer a question about one image")
    ask.add_argument("image", metavar="IMAGE")
    ask.add_argument("question")
    ask.add_argument(
        "--no-instruction", action="store_true", help="send the question alone, without the short-answer instruction"
    )
    for command in (caption, ask):
        command.add_argument(
            "--runtime",
            choices=RUNTIMES,
            default="auto",
            help="auto: onnxruntime when an export is given or cached and the CPU lacks native bf16, else PyTorch "
            "(compiled for many images); onnx: exports the checkpoint into the cache on first use",
        )
        command.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="auto",
            help="what the model computes in; auto: bf16 on a GPU or a CPU with native bf16, else as saved (fp32); "
            "int8: int8 language-model weights (compiled or onnx runtime); w8a8: int8 weights and activations "
            "(compiled runtime)",
        )
        command.add_argument(
            "--model", help=f"checkpoint folder or Hub repo id (default: ${MODEL_VARIABLE}, else {DEMO_CHECKPOINT})"
        )
        command.add_argument("--revision", help="Hub branch, tag or commit")
        command.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="load with the checkpoint's own Python files (they run on this machine); default: valign's classes",
        )
        command.add_argument("--batch-size", type=int, default=8)
        command.add_argument("--max-new-tokens", type=int, default=40)
        command.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    export = commands.add_parser("export", help="write a checkpoint as ONNX graphs for onnxruntime")
    export.add_argument("checkpoint", help="checkpoint folder or Hub repo id")
    export.add_argument(
        "folder", type=Path, nargs="?", help="where the graphs, config and processor go (default: valign's cache)"
    )
    export.add_argument("--weights", choices=("fp32", "int8", "int4"), default="fp32", help="matrix weights")
    export.add_argument("--revision", help="Hub branch, tag or commit")
    export.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser().parse_args(argv)
    except UsageError as error:
        return failure("--json" in argv, EXIT_USAGE, str(error))
    try:
        return export_model(args) if args.command == "export" else answer_images(args)
    except (UsageError, PromptTooLongError) as error:
        return failure(args.json, EXIT_USAGE, str(error))
    except Exception as error:  # a crash: reported once, with its own status, after any answers already printed
        traceback.print_exc()
        return failure(args.json, EXIT_INTERNAL, f"internal error: {type(error).__name__}: {error}")


def failure(as_json: bool, status: int, message: str) -> int:
    print(f"valign: error: {message}", file=sys.stderr, flush=True)
    if as_json:
        print(json.dumps({"error": message, "exit_status": status}, ensure_ascii=False), flush=True)
    return status


def load_model(args: argparse.Namespace, generations: int) -> tuple[Any, Any]:
    try:
        name = args.model or default_model()
    except FileNotFoundError as error:  # no --model and no demo checkpoint: the message says how to get one
        raise UsageError(str(error)) from error
    kind = "local folder" if is_local(name) else "Hub repo id"
    try:
        model, processor, _ = load_for_generation(
            name, args.revision, args.runtime, args.trust_remote_code, args.precision, generations
        )
        return model, processor
    except Exception as error:  # missing folder, unknown repo, not a valign checkpoint, broken weights
        raise UsageError(f"cannot load the model {name} ({kind}): {error}") from error


def export_model(args: argparse.Namespace) -> int:
    transformers.logging.set_verbosity_error()
    try:
        if args.folder is None:
            folder = ensure_export(checkpoint_folder(args.checkpoint, args.revision), args.weights)
        else:
            folder = export_onnx(args.checkpoint, args.folder, weights=args.weights, revision=args.revision)
    except (OSError, ValueError) as error:  # missing or broken checkpoint, unknown repo
        raise UsageError(f"cannot export {args.checkpoint}: {error}") from error
    message = f"wrote {args.weights} ONNX graphs of {args.checkpoint} to {folder}"
    print(json.dumps({"folder": str(folder), "weights": args.weights}) if args.json else message, flush=True)
    return 0


def answer_images(args: argparse.Namespace) -> int:
    """Print an answer (or an error) for every image; the exit status. Raises UsageError."""
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be positive")
    if args.command == "caption":
        paths, text, name = args.images, args.prompt, "--prompt"
    else:
        paths, text, name = [args.image], args.question, "question"
    if not text.strip():  # e.g. an unset shell variable: the model would answer it all the same
        raise UsageError(f"the {name} is empty")
    prompt = text if args.command == "caption" or args.no_instruction else vqa_prompt(text)
    # Loading notices and the weight-loading bar would bury the answers; errors still raise.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model, processor = load_model(args, generations=len(paths))

    settings = DecodingSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    failed = 0
    # The bar only helps with many images; it goes to stderr, so stdout stays parseable.
    for result in run(model, processor, paths, prompt, settings, progress=len(paths) > args.batch_size):
        failed += result.error is not None
        if args.json:
            print(result.to_json(), flush=True)
        elif result.error is not None:
            print(f"valign: error: {result.error}", file=sys.stderr, flush=True)
        else:
            print(result.text if args.command == "ask" else f"{result.path}: {result.text}", flush=True)
    if failed:
        print(f"valign: {failed} of {len(paths)} images failed", file=sys.stderr)
    return EXIT_IMAGE_ERRORS if failed else 0


if __name__ == "__main__":
    sys.exit(main())
