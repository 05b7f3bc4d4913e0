"""Batches for training: chat samples → padded input ids, labels on answer tokens only, pixel values.

Labels come from the chat template's `{% generation %}` markers (`return_assistant_tokens_mask`): prompt, image
and padding tokens are never supervised. With `text_mask_ratio` > 0 (the bidirectional alignment stage) a share of
the answer tokens is replaced by a mask token and only those are supervised: under full attention every position
sees its successor, so plain next-token loss would be trivial.

With `packing`, the samples of a batch are laid end to end in rows of at most `pack_length` tokens instead of
one padded row each (transformers' padding-free convention: no attention mask, position ids restarting at 0 per
sample). The model then keeps every sample to itself (`build_attention_mask`), so the loss is the unpacked one.

A sample that cannot train (`max_length` would cut into its image, or leave none of its answer) raises `SkipRow`
in `encode`: a dataset given `encode` (`data.adapters.adapt`) skips and counts it and the collator reuses the
encoding it made, so a bad row never reaches a batch and nothing is tokenized twice.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from ..data.skips import SkipRow
from ..modeling_valign import IGNORE_INDEX


def conversation_with_image(messages: list[dict], image: Any) -> list[dict]:
    """Attach the sample's image to its (single) image content item, where the processor looks for it."""
    if image is None:
        return messages
    return [
        {**m, "content": [{**c, "image": image} if c.get("type") == "image" else c for c in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]


def sample_generator(sample_id: str, seed: int) -> torch.Generator:
    """A generator seeded by the sample itself, so masking is reproducible across resumes and processes."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def mask_answer_tokens(
    input_ids: torch.Tensor, labels: torch.Tensor, ratio: float, mask_token_id: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace `ratio` of the supervised tokens (at least one) by the mask token; supervise only those."""
    candidates = (labels != IGNORE_INDEX).nonzero().flatten()
    if len(candidates) == 0:
        return input_ids, labels
    count = max(1, round(ratio * len(candidates)))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    masked_labels = torch.full_like(labels, IGNORE_INDEX)
    masked_labels[chosen] = input_ids[chosen]
    masked_ids = input_ids.clone()
    masked_ids[chosen] = mask_token_id
    return masked_ids, masked_labels


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row, as few and as even rows as fit: longest sample first onto the shortest row that has
    room (a new row when none has). Even rows matter because every row is padded to the longest one."""
    rows: list[list[int]] = [[] for _ in range(-(-sum(lengths) // capacity))]
    loads = [0] * len(rows)
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fitting = [r for r in range(len(rows)) if loads[r] + lengths[index] <= capacity]
        if not fitting:
            rows.append([])
            loads.append(0)
            fitting = [len(rows) - 1]
        row = min(fitting, key=loads.__getitem__)
        rows[row].append(index)
        loads[row] += lengths[index]
    return rows


class ConversationCollator:
    """Turn samples `{"id", "image", "messages"}` into a training batch for valign."""

    def __init__(
        self,
        processor,
        max_length: int = 2048,
        text_mask_ratio: float = 0.0,
        mask_token_id: int | None = None,
        seed: int = 0,
        packing: bool = False,
        pack_length: int | None = None,
    ) -> None:
        if text_mask_ratio > 0 and mask_token_id is None:
            raise ValueError("text_mask_ratio > 0 needs a mask_token_id")
        if pack_length is not None and pack_length < max_length:
            raise ValueError(f"pack_length={pack_length} must be at least max_length={max_length}: a sample must fit")
        self.processor = processor
        self.max_length = max_length
        self.text_mask_ratio = text_mask_ratio
        self.mask_token_id = mask_token_id
        self.seed = seed
        self.packing = packing
        self.pack_length = pack_length or max_length

    @property
    def placeholders(self) -> tuple[str, ...]:
        """What a sample's text must not spell out: the processor reads these strings as (parts of) image spans."""
        tokens = (self.processor.image_token, self.processor.vision_start_token, self.processor.vision_end_token)
        return tuple(token for token in tokens if token)

    def encode(self, sample: dict) -> dict[str, torch.Tensor]:
        """One sample: token ids, labels (answer tokens only), pixel values; cut to `max_length`. Raises `SkipRow`
        ("too_long") when the cut would reach into the image or leave no supervised token."""
        encoded = self.processor.apply_chat_template(
            [conversation_with_image(sample["messages"], sample["image"])],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
        )
        input_ids = encoded["input_ids"][0]
        labels = input_ids.masked_fill(~encoded["assistant_masks"][0].bool(), IGNORE_INDEX)
        if (labels == IGNORE_INDEX).all():
            raise ValueError(f"sample {sample['id']}: the chat template marks no answer token ({{% generation %}})")
        if (length := len(input_ids)) > self.max_length:
            if (input_ids[self.max_length :] == self.processor.image_token_id).any():
                raise SkipRow("too_long", f"{length} tokens: max_length={self.max_length} cuts into the image")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            if (labels == IGNORE_INDEX).all():
                raise SkipRow("too_long", f"{length} tokens: max_length={self.max_length} cuts off the whole answer")
        if self.text_mask_ratio > 0:
            generator = sample_generator(str(sample["id"]), self.seed)
            input_ids, labels = mask_answer_tokens(
                input_ids, labels, self.text_mask_ratio, self.mask_token_id, generator
            )
        return {"input_ids": input_ids, "labels": labels, "pixel_values": encoded.get("pixel_values")}

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [sample.get("encoded") or self.encode(sample) for sample in samples if sample is not None]
        if not encoded:
            raise ValueError("a batch in which every sample was skipped: check the data report")
        if self.packing:
            rows = self.group_into_rows(encoded)
            encoded = [e for row in rows for e in row]  # the images' order must follow their tokens' order
            batch = self.pack(rows)
        else:
            batch = self.pad(encoded)
        pixels = [e["pixel_values"] for e in encoded if e["pixel_values"] is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch

    def pad(self, encoded: list[dict]) -> dict[str, torch.Tensor]:
        """One right-padded row per sample."""
        pad_id = self.processor.tokenizer.pad_token_id
        input_ids = pad_sequence([e["input_ids"] for e in encoded], batch_first=True, padding_value=pad_id)
        lengths = torch.tensor([len(e["input_ids"]) for e in encoded])
        return {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long(),
            "labels": pad_sequence([e["labels"] for e in encoded], batch_first=True, padding_value=IGNORE_INDEX),
        }

    def group_into_rows(self, encoded: list[dict]) -> list[list[dict]]:
        lengths = [len(e["input_ids"]) for e in encoded]
        return [[encoded[i] for i in row] for row in pack_rows(lengths, self.pack_length)]

    def pack(self, rows: list[list[dict]]) -> dict[str, torch.Tensor]:
        """The samples of each row end to end, position ids restarting per sample; a row's padding tail is a
        sample of its own (positions from 0, no labels), so it never touches the real ones."""
        width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
        pad_id = self.processor.tokenizer.pad_token_id
        packed = [pack_row(row, width, pad_id) for row in rows]
        return {name: torch.stack([row[name] for row in packed]) for name in packed[0]}


def pack_row(samples: list[dict], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    fill = width - sum(len(e["input_ids"]) for e in samples)
    return {
        "input_ids": torch.cat([e["input_ids"] for e in samples] + [torch.full((fill,), pad_id)]),
        "labels": torch.cat([e["labels"] for e in samples] + [torch.full((fill,), IGNORE_INDEX)]),
        "position_ids": torch.cat([torch.arange(len(e["input_ids"])) for e in samples] + [torch.arange(fill)]),
    }
