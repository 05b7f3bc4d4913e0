"""lmms-eval model plugin: ``lmms-eval --model valign --model_args pretrained=REPO_OR_DIR --tasks ...``.

lmms-eval (0.7.3) finds the model through the ``lmms_eval.models`` entry point of valign's distribution
(setup.cfg), which names :func:`manifest`. Generation is valign's own (`eval.generate.generate_answers`: the same
chat prompt, left-padded batches and greedy/beam decoding as ``python -m valign.eval``), so a task with the same
images, prompt and `max_new_tokens` scores what ``python -m valign.eval captions`` scores.

model_args: ``pretrained`` (Hub id or folder), ``revision``, ``runtime`` and ``precision`` (as the `valign`
command's options; the defaults torch and fp32 are what ``python -m valign.eval`` computes with, `auto` picks the
fastest), ``trust_remote_code``, ``attn_mode``. lmms-eval's ``--batch_size`` is the generation batch size (its
default is 1). One process only: under ``accelerate launch`` every process would evaluate every document.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

from ..data.prompts import user_content
from ..export.runtime import load_for_generation
from .generate import DecodingSettings, generate_answers

MODEL_ID = "valign"
# Keys of a task's generation_kwargs that greedy or beam decoding can honour (sampling's are checked apart).
KNOWN_GENERATION_KEYS = {"until", "max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "top_k"}


def manifest() -> ModelManifest:
    """The payload of the entry point: lmms-eval imports the class only when ``--model valign`` asks for it."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.Valign")


def user_text(context: str) -> str:
    """A task's context without its ``<image>`` tags: valign's prompt always puts the one image first."""
    return "".join(item["text"] for item in user_content(context) if item["type"] == "text")


def truncate(text: str, until: Sequence[str]) -> str:
    """The text up to the first stop string (generate_until's contract), stripped as valign strips answers."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


def one_image(visuals: Sequence[Any], doc_id: Any) -> Image.Image:
    """The document's image; valign reads exactly one image per prompt, so anything else is refused."""
    images = [v for v in visuals if isinstance(v, Image.Image)]
    if len(images) != 1 or len(visuals) != 1:
        raise ValueError(f"document {doc_id}: valign takes exactly one image per prompt, got {len(visuals)} visuals")
    return images[0].convert("RGB")


def skip_filelock_patch() -> None:
    """lmms-eval 0.7.3's `simple_evaluate`, right after building the model, patches `filelock._api` against a
    deadlock of nested `load_dataset` calls under filelock 3.x; filelock 4 (valign's lock) has no such module, so the
    patch fails before any task runs. Mark it applied: it is lmms-eval's guard for filelock 3.x only."""
    if importlib.util.find_spec("filelock._api") is None:
        from lmms_eval import evaluator

        evaluator._enable_reentrant_filelocks._patched = True


def batch_size_of(value: int | str | None) -> int:
    if value is None:
        return DecodingSettings().batch_size
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"valign takes a whole-number --batch_size, got {value!r} (no automatic search)") from None


class Valign(lmms):
    """valign checkpoints in lmms-eval: batched, left-padded generation through valign's own helpers."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        runtime: str = "torch",
        precision: str = "fp32",
        trust_remote_code: bool = False,
        attn_mode: str | None = None,
        batch_size: int | str | None = None,
        device: str | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes it, for --batch_size auto only
    ) -> None:
        super().__init__()
        skip_filelock_patch()
        revision = None if revision is None else str(revision)  # lmms-eval parses an all-digit value as a number
        self.model, self.processor, self.runtime = load_for_generation(
            str(pretrained), revision, runtime, trust_remote_code, precision
        )
        if device is not None and self.runtime == "torch":
            self.model.to(device)
        elif device not in (None, "cpu"):
            raise ValueError(f"the onnx runtime computes on the CPU; got --device {device}")
        self.batch_size = batch_size_of(batch_size)
        self.attn_mode = attn_mode

    def settings(self, gen_kwargs: dict[str, Any]) -> DecodingSettings:
        """valign's decoding settings for a task's generation_kwargs (greedy or beam search; sampling is refused so
        that scores are reproducible)."""
        if gen_kwargs.get("do_sample"):
            raise ValueError(f"valign decodes greedily or by beam search; the task asks for sampling: {gen_kwargs}")
        unknown = set(gen_kwargs) - KNOWN_GENERATION_KEYS
        if unknown:
            raise ValueError(f"generation_kwargs valign cannot honour: {sorted(unknown)}")
        defaults = DecodingSettings()
        return DecodingSettings(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", defaults.max_new_tokens)),
            num_beams=int(gen_kwargs.get("num_beams", defaults.num_beams)),
            batch_size=self.batch_size,
            attn_mode=self.attn_mode,
        )

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One caption or answer per request, in request order. Requests are generated in groups of equal task,
        split and generation_kwargs, each in request order, so a captioning task batches its images exactly as
        ``python -m valign.eval captions`` does."""
        answers: list[str | None] = [None] * len(requests)
        for positions in self.groups(requests).values():
            for position, answer in zip(positions, self.generate_group([requests[i] for i in positions]), strict=True):
                answers[position] = answer
        return answers  # type: ignore[return-value]  (every position is filled: the groups partition the requests)

    @staticmethod
    def groups(requests: list[Instance]) -> dict[str, list[int]]:
        """Request positions by (task, split, generation_kwargs), in first-seen order."""
        grouped: dict[str, list[int]] = {}
        for position, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            grouped.setdefault(repr((task, split, sorted(gen_kwargs.items()))), []).append(position)
        return grouped

    def generate_group(self, requests: list[Instance]) -> list[str]:
        contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*(r.args for r in requests))
        kwargs = dict(gen_kwargs[0])
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        docs = [self.task_dict[task][split][doc_id] for task, split, doc_id in zip(tasks, splits, doc_ids)]
        images = [one_image(to_visual(doc), i) for to_visual, doc, i in zip(doc_to_visual, docs, doc_ids)]
        prompts = [user_text(context) for context in contexts]
        raw = generate_answers(self.model, self.processor, images, prompts, self.settings(kwargs), desc="valign")
        answers = [truncate(answer, until) for answer in raw]
        for context, answer in zip(contexts, answers):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs[0]), answer)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the valign plugin generates only (generate_until tasks); likelihood-scored tasks are not supported"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "the valign plugin answers one turn per image (generate_until tasks); multi-round tasks are not supported"
        )
