"""A custom handler for Hugging Face Inference Endpoints, saved into every valign checkpoint.

Inference Endpoints import `handler.py` from the repository root (the repository folder on `sys.path`), build
`EndpointHandler(path)` once and call it with each request body: `{"inputs": ..., "parameters": {...}}`, where
`inputs` is one chat conversation (a list of messages), as the model card's widget examples hold, or a list of
them. Image chunks are `{"type": "image_url", "image_url": {"url": ...}}` (the chat-completion form the widget
uses) or `{"type": "image", "url" | "image" | "base64": ...}`; an image is an http(s) URL (fetched with a timeout
and a size limit by the checkpoint's processor), a data URI or base64, never a file on the server. The answer is
what `pipeline("image-text-to-text")` returns for the same input. A bad request raises `RequestError` (a
ValueError) naming what is wrong; the endpoint's server answers it with HTTP 400 and `{"error": message}`, and the
handler keeps serving.

This file imports only torch and transformers: the model and processor load through the Auto classes with the
checkpoint's own code (valign's classes), as every Hub user loads them.
"""

from __future__ import annotations

import base64
import binascii
import threading
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

# Request parameters and how each must look; the generation ones go to `generate`, the rest to the pipeline.
GENERATION_PARAMETERS = {
    "max_new_tokens": int,
    "do_sample": bool,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "num_beams": int,
    "repetition_penalty": float,
}
PIPELINE_PARAMETERS = {"return_full_text": bool}
MAX_NEW_TOKENS_LIMIT = 1024  # a request cannot hold the model for longer than this many tokens
IMAGE_KEYS = ("url", "image", "base64")
ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request the handler cannot answer; the message says what is wrong with it."""


class EndpointHandler:
    """Loads the checkpoint in `path` once (bf16 on a GPU, the saved precision on a CPU) and answers requests.

    Requests may come from several threads: they share the one model and are answered one at a time.
    """

    def __init__(self, path: str = "") -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else None
        model = AutoModelForImageTextToText.from_pretrained(
            path, trust_remote_code=True, dtype=dtype, attn_implementation="sdpa"
        ).to(device)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        self.pipeline = pipeline("image-text-to-text", model=model, processor=processor)
        # generate() refuses bidirectional attention (not consistent with a KV cache): an alignment-stage
        # checkpoint is decoded with the hybrid mask, as its card's snippets do.
        self.mode = {"attn_mode": "hybrid"} if model.config.attn_mode == "bidirectional" else {}
        self.lock = threading.Lock()

    def __call__(self, data: dict[str, Any]) -> list[Any]:
        conversations, parameters = parse_request(data)
        generation = {k: v for k, v in parameters.items() if k in GENERATION_PARAMETERS}
        options = {k: v for k, v in parameters.items() if k in PIPELINE_PARAMETERS}
        with self.lock:
            try:
                return self.pipeline(text=conversations, generate_kwargs={**self.mode, **generation}, **options)
            except ValueError as error:  # an unreadable image (the processor's ImageError), a prompt too long
                raise RequestError(str(error)) from error


def parse_request(data: Any) -> tuple[list[dict[str, Any]] | list[list[dict[str, Any]]], dict[str, Any]]:
    """The conversation(s) and parameters of a request body, checked: a clear RequestError for anything else."""
    if not isinstance(data, dict) or "inputs" not in data:
        raise RequestError('the request body must be a JSON object with "inputs" (chat messages)')
    unknown = set(data) - {"inputs", "parameters"}
    if unknown:
        raise RequestError(f'unknown request keys {sorted(unknown)}: only "inputs" and "parameters" are read')
    inputs = data["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise RequestError('"inputs" must be a non-empty list of chat messages (or a list of such lists)')
    batch = all(isinstance(item, list) for item in inputs)
    for conversation in inputs if batch else [inputs]:
        check_conversation(conversation)
    return inputs, check_parameters(data.get("parameters") or {})


def check_conversation(messages: list[Any]) -> None:
    if not messages:
        raise RequestError("a conversation has no messages")
    images = 0
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise RequestError(f"each message must be an object with a role among {ROLES} and a content: {message!r}")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestError(f"a message's content must be a string or a list of chunks, not {content!r}")
        images += sum(check_chunk(chunk) for chunk in content)
    if images == 0:
        raise RequestError("valign answers about an image: the conversation has no image chunk")


def check_chunk(chunk: Any) -> bool:
    """Whether `chunk` is an image chunk; a malformed chunk raises."""
    kind = chunk.get("type") if isinstance(chunk, dict) else None
    if kind == "text" and isinstance(chunk.get("text"), str):
        return False
    if kind == "image_url":
        url = chunk.get("image_url")
        check_image_source(url.get("url") if isinstance(url, dict) else url)
        return True
    if kind == "image":
        sources = [chunk[key] for key in IMAGE_KEYS if key in chunk]
        if len(sources) != 1:
            raise RequestError(f'an "image" chunk needs exactly one of {IMAGE_KEYS}: {sorted(chunk)}')
        check_image_source(sources[0])
        return True
    raise RequestError(f'a content chunk must be {{"type": "text", "text": ...}}, "image_url" or "image": {chunk!r}')


def check_image_source(source: Any) -> None:
    """An image in a request is an http(s) URL, a data URI or base64: never a path (files on the server)."""
    if isinstance(source, str) and (source.startswith(("http://", "https://", "data:")) or is_base64(source)):
        return
    shown = source if not isinstance(source, str) or len(source) < 100 else source[:100] + "..."
    raise RequestError(f"an image must be an http(s) URL, a data URI or base64, not {shown!r}")


def is_base64(text: str) -> bool:
    try:
        return bool(text) and bool(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return False


def check_parameters(parameters: Any) -> dict[str, Any]:
    if not isinstance(parameters, dict):
        raise RequestError(f'"parameters" must be an object, not {parameters!r}')
    kinds = {**GENERATION_PARAMETERS, **PIPELINE_PARAMETERS}
    unknown = sorted(set(parameters) - set(kinds))
    if unknown:
        raise RequestError(f"unknown parameters {unknown}; accepted: {sorted(kinds)}")
    for name, value in parameters.items():
        if not has_type(value, kinds[name]):
            raise RequestError(f"parameter {name} must be {kinds[name].__name__}, got {value!r}")
    tokens = parameters.get("max_new_tokens")
    if tokens is not None and not 1 <= tokens <= MAX_NEW_TOKENS_LIMIT:
        raise RequestError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {tokens}")
    return parameters


def has_type(value: Any, kind: type) -> bool:
    """JSON's view of types: an integer is a valid float; a boolean is no number (though Python's bool is an int)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
