"""The prompts valign trains and asks with, and chat-message builders: one definition of each (stdlib only, so
the `valign` command and the app import it without `datasets`)."""

from __future__ import annotations

import re
from typing import Any

IMAGE_TAG = "<image>"
DEFAULT_CAPTION_PROMPT = "Write a short caption for this image."
DEFAULT_VQA_INSTRUCTION = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt

_TAG_WITH_NEWLINES = re.compile(r"\n?" + re.escape(IMAGE_TAG) + r"\n?")


def text_item(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def image_item() -> dict[str, str]:
    return {"type": "image"}


def user_content(text: str) -> list[dict[str, str]]:
    """Split a turn's text at ``<image>`` tags (and a newline either side) into text and image content items."""
    content: list[dict[str, str]] = []
    for i, part in enumerate(_TAG_WITH_NEWLINES.split(text)):
        if i:
            content.append(image_item())
        if part:
            content.append(text_item(part))
    return content


def caption_messages(caption: str, prompt: str = DEFAULT_CAPTION_PROMPT) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [image_item(), text_item(prompt)]},
        {"role": "assistant", "content": [text_item(caption)]},
    ]


def vqa_prompt(question: str, instruction: str = DEFAULT_VQA_INSTRUCTION) -> str:
    """The user text for a question, as `data.synthetic.vqa_as_conversations` writes it: capitalised + instruction."""
    question = question.strip()
    return f"{question[:1].upper()}{question[1:]} {instruction}".strip()


def vqa_messages(question: str, answer: str, instruction: str = DEFAULT_VQA_INSTRUCTION) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [image_item(), text_item(vqa_prompt(question, instruction))]},
        {"role": "assistant", "content": [text_item(answer)]},
    ]
