"""Fault injection, training data: each bad row is skipped and counted once (never a crash, never a batch that
trains on nothing), the report counts distinct rows and reaches disk, and a resumed run keeps counting."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from conftest import Kill, killed_run
from datasets import Dataset
from PIL import Image

from valign.data.adapters import RowAdapter, adapt
from valign.data.skips import SkipCounter
from valign.data.synthetic import CONVERSATION_FEATURES, write_parquet
from valign.modeling_valign import IGNORE_INDEX
from valign.train.collator import ConversationCollator
from valign.train.config import StageConfig
from valign.train.run import run_stage

MAX_LENGTH = 56  # a usable row is 41 tokens (16 of them the image); 40 extra words push the answer or image out
LONG = "what " * 40


def png(colour: str = "red") -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def llava(row_id: str, question: str, answer, image: dict | None = None) -> dict:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": row_id, "image": image or png(), "conversations": turns}


def llava_rows(rows: list[dict]) -> Dataset:
    return Dataset.from_dict({k: [r[k] for r in rows] for k in ("id", "image", "conversations")}, CONVERSATION_FEATURES)


def good(row_id: str) -> dict:
    return llava(row_id, "<image>\nDescribe it.", "A red circle.")


@pytest.fixture(scope="module")
def collator(model_and_processor) -> ConversationCollator:
    return ConversationCollator(model_and_processor[1], max_length=MAX_LENGTH)


def checked(rows: Dataset, collator: ConversationCollator, **kwargs):
    """The dataset as training builds it: the collator's placeholders refused, each sample encoded (checked)."""
    return adapt(rows, placeholders=collator.placeholders, encode=collator.encode, **kwargs)


def supervised(batch: dict) -> list[int]:
    return (batch["labels"] != IGNORE_INDEX).sum(1).tolist()


@pytest.mark.parametrize(
    "bad",
    [
        llava("token-in-question", "<image>\nWhat is <|image_pad|>?", "A token."),
        llava("token-in-answer", "<image>\nDescribe it.", "It is <|image_pad|>."),
        llava("vision-start", "<image>\n<|vision_start|> Describe it.", "Red."),
    ],
    ids=lambda row: row["id"],
)
def test_a_literal_image_placeholder_in_the_text_is_skipped_and_counted(collator, bad):
    dataset = checked(llava_rows([good("a"), bad, good("c")]), collator)
    samples = [dataset[i] for i in range(3)]
    assert [s["id"] for s in samples] == ["a", "c", "c"]  # the bad row's slot gets the next usable row
    assert supervised(collator(samples)) == [5, 5, 5]
    assert dataset.skips.counts == {"placeholder_in_text": 1} and dataset.skips.rows_read == 3
    assert f"row {bad['id']!r}" in dataset.skips.report()


def test_a_caption_row_spelling_out_the_image_tag_is_skipped(collator):
    rows = Dataset.from_dict({"image": [png(), png()], "caption": ["A red square.", "See <image> above."]})
    dataset = checked(rows, collator)
    assert [s["id"] for s in dataset] == ["0"]
    assert dataset.skips.counts == {"placeholder_in_text": 1}


@pytest.mark.parametrize(
    "bad, detail",
    [
        (llava("image-too-late", f"{LONG}\n<image>", "Red."), "cuts into the image"),
        (llava("answer-cut-off", f"<image>\n{LONG}", "Red."), "cuts off the whole answer"),
    ],
    ids=["image-beyond-max-length", "answer-beyond-max-length"],
)
def test_a_row_too_long_for_max_length_is_skipped_and_counted(collator, bad, detail):
    dataset = checked(llava_rows([bad, good("b")]), collator)
    samples = [dataset[0], dataset[1], dataset[0]]  # the bad row is read once, then known
    assert [s["id"] for s in samples] == ["b", "b", "b"]
    assert min(supervised(collator(samples))) > 0
    assert dataset.skips.counts == {"too_long": 1} and dataset.skips.rows_read == 2
    assert detail in dataset.skips.report()


def test_a_partly_cut_answer_is_kept_with_what_remains(collator, model_and_processor):
    whole = collator.encode(next(iter(adapt(llava_rows([good("a")])))))
    answer = (whole["labels"] != IGNORE_INDEX).nonzero().flatten().tolist()
    short = ConversationCollator(model_and_processor[1], max_length=answer[2])  # keeps 2 answer tokens
    dataset = checked(llava_rows([good("a")]), short)
    assert len(answer) > 2 and supervised(short([dataset[0]])) == [2] and dataset.skips.skipped == 0


@pytest.mark.parametrize("answer, text", [(3, "3"), (2.0, "2"), (0.5, "0.5")], ids=["int", "integral-float", "float"])
def test_a_numeric_answer_or_caption_is_text(model_and_processor, answer, text):
    tokenizer, collator = model_and_processor[1].tokenizer, ConversationCollator(model_and_processor[1])
    vqa = Dataset.from_dict({"image": [png()], "question": ["how many?"], "answer": [answer]})
    caption = Dataset.from_dict({"image": [png()], "caption": [answer]})
    for rows in (vqa, caption):
        dataset = checked(rows, collator)
        labels = collator([dataset[0]])["labels"][0]
        assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == f"{text}<|im_end|>"
        assert dataset.skips.skipped == 0
    conversation = llava("n", "<image>\nHow many?", answer)  # as JSON gives it: a number as the turn's value
    assert RowAdapter("llava")(conversation, 0)["messages"][1]["content"] == [{"type": "text", "text": text}]


@pytest.mark.parametrize("answer", [None, "", "   ", math.nan], ids=["none", "empty", "blank", "nan"])
def test_only_a_missing_or_blank_answer_is_no_text(collator, answer):
    rows = Dataset.from_dict({"image": [png()], "question": ["how many?"], "answer": [answer]})
    dataset = checked(rows, collator)
    assert list(dataset) == [] and dataset.skips.counts == {"missing_text": 1}


def eighteen_rows() -> tuple[Dataset, dict[str, int]]:
    """18 rows, 5 bad in runs (so their slots and their neighbours' are drawn again and again)."""
    rows = [good(f"g{i}") for i in range(18)]
    rows[3] = llava("b3", "<image>\nWhat is <|image_pad|>?", "A token.")
    rows[4] = llava("b4", f"<image>\n{LONG}", "Red.")
    rows[5] = llava("b5", "<image>\nDescribe it.", "Broken.", {"bytes": b"not an image", "path": None})
    rows[11] = llava("b11", f"{LONG}\n<image>", "Red.")
    rows[17] = llava("b17", "<image>\nDescribe it.", "   ")
    return llava_rows(rows), {"placeholder_in_text": 1, "too_long": 2, "unreadable_image": 1, "bad_conversation": 1}


def test_the_report_counts_distinct_rows_over_epochs_and_worker_processes(collator):
    rows, expected = eighteen_rows()
    dataset = checked(rows, collator)
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, shuffle=True, num_workers=2, collate_fn=collator, generator=generator
    )
    for _ in range(3):  # three epochs, each drawing every slot: bad rows and their neighbours many times
        assert sum(len(batch["input_ids"]) for batch in loader) == 18
    assert dataset.skips.rows_read == 18 and dataset.skips.counts == expected
    assert dataset.skips.report().startswith(
        "read 18 rows, skipped 5 (27.8%): unreadable_image 1, bad_conversation 1, placeholder_in_text 1, too_long 2"
    )


def test_a_stream_read_twice_counts_its_rows_once(collator, tmp_path):
    rows, expected = eighteen_rows()
    path = write_parquet(rows, tmp_path / "rows.parquet")
    stream = checked(datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True), collator)
    assert [len(list(stream)) for _ in range(2)] == [13, 13]
    assert stream.skips.rows_read == 18 and stream.skips.counts == expected


def test_counts_saved_for_other_data_are_refused():
    saved, other = SkipCounter(), SkipCounter()
    saved.track(6)
    other.track(7)
    with pytest.raises(ValueError, match=r"saved for datasets of \[6\] rows .* this run's have \[7\]"):
        other.load_state_dict(json.loads(json.dumps(saved.state_dict())))


# --------------------------------------------------------------------------- through the Trainer


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """Ten rows, two of them with the answer cut off by MAX_LENGTH, and one with a literal image token."""
    rows = [good(f"g{i}") for i in range(10)]
    rows[1] = llava("cut-1", f"<image>\n{LONG}", "Red.")
    rows[2] = llava("token", "<image>\nWhat is <|image_pad|>?", "A token.")
    rows[4] = llava("cut-4", f"<image>\n{LONG}", "Blue.")
    root = tmp_path_factory.mktemp("faults")
    write_parquet(llava_rows(rows), root / "bad.parquet")
    return root


def stage(batch_size: int, **fields) -> StageConfig:
    return StageConfig(
        name="faults",
        attn_mode="hybrid",
        learning_rates={"multi_modal_projector": 1e-3, "language_model": 1e-3},
        data=[{"source": "bad.parquet"}],
        batch_size=batch_size,
        max_length=MAX_LENGTH,
        precision="fp32",
        logging_steps=1,
        save_steps=1,
        warmup_ratio=0.0,
        **fields,
    )


EXPECTED = {"rows_read": 10, "skipped": 3, "by_reason": {"placeholder_in_text": 1, "too_long": 2}}


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "training_log.jsonl").read_text().splitlines()]


def test_rows_cut_off_by_max_length_train_at_batch_size_1(checkpoint, bad_data, tmp_path):
    result = run_stage(stage(1), checkpoint, tmp_path / "out", bad_data)
    assert len(losses(tmp_path / "out")) == 10 and all(math.isfinite(x) for x in losses(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "skips.json").read_text())
    assert {k: report[k] for k in EXPECTED} == EXPECTED
    assert sorted(report["examples"]["too_long"]) == [
        f"row 'cut-{i}': 78 tokens: max_length=56 cuts off the whole answer" for i in (1, 4)
    ]
    assert result.skip_report.startswith("read 10 rows, skipped 3 (30.0%)")


def test_a_killed_run_resumes_past_its_bad_rows_and_keeps_counting(checkpoint, bad_data, tmp_path, monkeypatch):
    run_stage(stage(2), checkpoint, tmp_path / "straight", bad_data)
    straight = json.loads((tmp_path / "straight" / "skips.json").read_text())
    assert {k: straight[k] for k in EXPECTED} == EXPECTED and all(
        math.isfinite(x) for x in losses(tmp_path / "straight")
    )

    killed_run(monkeypatch, stage(2), checkpoint, tmp_path / "resumed", bad_data, Kill("step", 3))
    saved = json.loads((tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "skips.json").read_text())
    assert 0 < saved["rows_read"] < 10 and "ledger" in saved
    run_stage(stage(2), checkpoint, tmp_path / "resumed", bad_data, resume=True)
    assert json.loads((tmp_path / "resumed" / "skips.json").read_text()) == straight
