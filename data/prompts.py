"""The prompts valign trains and asks with, and chat-message builders: one definition of each (stdlib only, so
the `valign` command and the app import it without `datasets`)."""

from __future__ import annotations

import re
from typing import Any

IMAGE_TAG = "<image>"
# What the recipes train caption rows with (`StageConfig.caption_prompt`) and what captioning asks by default.
CAPTION_PROMPT = "Describe the image in detail."
# LLaVA-1.5's short-answer instruction: VQA rows are trained with it, so questions are asked with it too.
VQA_INSTRUCTION = "Answer the question using a single word or phrase."

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


def user_turn(text: str) -> dict[str, Any]:
    """One user turn: an image, then `text` (every prompt valign trains on or asks with has this shape)."""
    return {"role": "user", "content": [image_item(), text_item(text)]}


def caption_messages(caption: str, prompt: str = CAPTION_PROMPT) -> list[dict[str, Any]]:
    return [user_turn(prompt), {"role": "assistant", "content": [text_item(caption)]}]


def vqa_prompt(question: str, instruction: str = VQA_INSTRUCTION) -> str:
    """The user text for a question, as `data.synthetic.vqa_as_conversations` writes it: capitalised + instruction."""
    question = question.strip()
    return f"{question[:1].upper()}{question[1:]} {instruction}".strip()


def vqa_messages(question: str, answer: str, instruction: str = VQA_INSTRUCTION) -> list[dict[str, Any]]:
    return [user_turn(vqa_prompt(question, instruction)), {"role": "assistant", "content": [text_item(answer)]}]
