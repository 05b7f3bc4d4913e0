"""valign.data: loading, schema adapters, lazy datasets and skip accounting, all offline."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import datasets
import easy_vqa
import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from PIL import Image

from valign.data.adapters import AdaptedDataset, AdaptedIterableDataset, RowAdapter, adapt, build_dataset, detect_schema
from valign.data.prompts import user_content
from valign.data.skips import SkipCounter, SkipRow
from valign.data.sources import load_rows
from valign.data.synthetic import (
    CONVERSATION_FEATURES,
    make_caption_dataset,
    make_caption_eval_set,
    make_scene,
    render_scene,
    write_parquet,
)

IMAGE, DESCRIBE = {"type": "image"}, {"type": "text", "text": "Describe it."}


def png_bytes(colour: str = "red", size: tuple[int, int] = (16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def turns(*values: str) -> list[dict[str, str]]:
    """Alternating human/gpt turns."""
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def llava_rows_with_bad_ones() -> Dataset:
    """a, d: usable; b: garbage image bytes; c: two <image> tags; e: a truncated PNG."""
    good = png_bytes()
    rows = {
        "id": ["a", "b", "c", "d", "e"],
        "image": [{"bytes": b, "path": None} for b in (good, b"not an image", good, good, good[: len(good) // 2])],
        "conversations": [
            turns("<image>\nDescribe it.", "A red picture."),
            turns("<image>\nDescribe it.", "Broken."),
            turns("<image>\n<image>\nCompare them.", "Same."),
            turns("What colour?\n<image>", "Red.", "Sure?", "Yes."),
            turns("<image>\nDescribe it.", "Cut short."),
        ],
    }
    return Dataset.from_dict(rows, features=CONVERSATION_FEATURES)


# --------------------------------------------------------------------------- adapters


def test_llava_row_becomes_chat_messages():
    row = {"id": 7, "image": Image.new("L", (20, 10), 128), "conversations": turns("<image>\nDescribe it.", "Grey.")}
    sample = RowAdapter("llava")(row, index=0)
    assert sample["id"] == "7"
    assert sample["messages"] == [
        {"role": "user", "content": [IMAGE, DESCRIBE]},
        {"role": "assistant", "content": [{"type": "text", "text": "Grey."}]},
    ]
    assert sample["image"].mode == "RGB" and sample["image"].size == (20, 10)


@pytest.mark.parametrize(
    "text, content",
    [
        ("<image>\nDescribe it.", [IMAGE, DESCRIBE]),
        ("Describe it.\n<image>", [DESCRIBE, IMAGE]),
        ("See <image> here", [{"type": "text", "text": "See "}, IMAGE, {"type": "text", "text": " here"}]),
        ("<image>", [IMAGE]),
    ],
)
def test_image_tag_becomes_an_image_item_at_its_position(text, content):
    assert user_content(text) == content


def test_multi_turn_conversation_is_kept_and_text_only_rows_pass():
    two_turns = RowAdapter("llava")({"image": None, "conversations": turns("Hi.", "Hello.", "Bye.", "Bye!")}, 3)
    assert two_turns["image"] is None and two_turns["id"] == "3"
    assert [m["role"] for m in two_turns["messages"]] == ["user", "assistant", "user", "assistant"]
    assert two_turns["messages"][2]["content"] == [{"type": "text", "text": "Bye."}]


def test_bad_rows_are_skipped_counted_and_reported_while_good_ones_come_through_in_order():
    dataset = adapt(llava_rows_with_bad_ones())
    assert isinstance(dataset, AdaptedDataset)
    samples = list(dataset)
    assert [s["id"] for s in samples] == ["a", "d"]
    assert samples[1]["messages"][0]["content"] == [{"type": "text", "text": "What colour?"}, IMAGE]
    assert len(samples[1]["messages"]) == 4
    assert dataset.skips.rows_read == 5
    assert dataset.skips.counts == {"unreadable_image": 2, "image_tag_count": 1}
    report = dataset.skips.report()
    assert report.startswith("read 5 rows, skipped 3 (60.0%)")
    assert "row 'b'" in report and "row 'c'" in report and "row 'e'" in report and "2 <image> tags" in report


def test_text_only_row_with_an_image_tag_is_malformed():
    skips = SkipCounter()
    dataset = adapt(Dataset.from_dict({"image": [None], "conversations": [turns("<image>\nHi.", "Yo.")]}), skips=skips)
    assert list(dataset) == []
    assert skips.counts == {"image_tag_count": 1}


def test_sampler_index_of_a_bad_row_gets_the_next_usable_one():
    dataset = adapt(llava_rows_with_bad_ones())
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["a", "d", "d", "d", "a"]  # e wraps around to a


def test_dataloader_workers_counts_reach_the_main_process():
    dataset = adapt(llava_rows_with_bad_ones())
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=list)
    ids = [sample["id"] for batch in loader for sample in batch]
    assert ids == ["a", "d", "d", "d", "a"]
    # index 1 reads b, c, d; 2 reads c, d; 4 reads e, a: distinct rows count once, whichever worker read them
    assert dataset.skips.rows_read == 5
    assert dataset.skips.counts == {"unreadable_image": 2, "image_tag_count": 1}


def test_skip_counter_copies_are_snapshots():
    skips = SkipCounter()
    part = skips.track(2)
    skips.count(part, 0, "x", SkipRow("missing_text", "no caption"))
    clone = copy.deepcopy(skips)
    clone.count(part, 1, "y", SkipRow("missing_text", "no caption"))
    assert skips.counts == {"missing_text": 1} and clone.counts == {"missing_text": 2}
    assert "row 'x': no caption" in skips.report()


def test_vqa_row_yields_question_and_answer():
    row = {"image": {"bytes": png_bytes("blue"), "path": None}, "question": "what colour is it?", "answer": "blue"}
    sample = RowAdapter("vqa", vqa_instruction="Answer with one word.")(row, index=4)
    assert sample["id"] == "4"
    assert sample["messages"] == [
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "What colour is it? Answer with one word."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
    ]
    assert np.asarray(sample["image"])[0, 0].tolist() == [0, 0, 255]


def test_easy_vqa_in_pathvqa_schema_is_detected_and_adapted():
    from valign.data.synthetic import load_easy_vqa

    dataset = adapt(load_easy_vqa("test", limit=3))
    samples = list(dataset)
    assert len(samples) == 3 and dataset.skips.skipped == 0
    question = "What is the red shape? Answer the question using a single word or phrase."
    assert samples[0]["id"] == "0"  # the row's image_id
    assert samples[0]["messages"] == [
        {"role": "user", "content": [IMAGE, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": "triangle"}]},
    ]
    with Image.open(easy_vqa.get_test_image_paths()[0]) as original:
        assert np.array_equal(np.asarray(samples[0]["image"]), np.asarray(original.convert("RGB")))


def test_caption_sets_use_the_prompt_and_pick_a_reference_deterministically():
    rows = make_caption_eval_set(3)
    first = list(adapt(rows, caption_prompt="Caption it."))
    assert first[0]["messages"][0]["content"] == [IMAGE, {"type": "text", "text": "Caption it."}]
    golden = "A purple circle in the top right and a black triangle on the left, on a faintly striped cream background."
    assert first[0]["messages"][1]["content"][0]["text"] == golden

    def picks(seed: int) -> list[str]:
        return [s["messages"][1]["content"][0]["text"] for s in adapt(rows, reference="random", seed=seed)]

    assert picks(1) == picks(1) != picks(2)  # a pure function of seed and references
    assert all(pick in refs for pick, refs in zip(picks(2), rows["captions"]))
    assert picks(2) != [refs[0] for refs in rows["captions"]]


def test_karpathy_sentences_and_a_missing_caption():
    image = {"bytes": png_bytes(), "path": None}
    rows = Dataset.from_dict(
        {
            "cocoid": [11, 12],
            "image": [image, image],
            "sentences": [[{"raw": " A red square. ", "tokens": ["a"]}], []],
        },
        features=Features(
            {
                "cocoid": Value("int64"),
                "image": datasets.Image(),
                "sentences": datasets.List({"raw": Value("string"), "tokens": datasets.List(Value("string"))}),
            }
        ),
    )
    dataset = adapt(rows)
    samples = list(dataset)
    assert [s["id"] for s in samples] == ["11"]
    assert samples[0]["messages"][1]["content"] == [{"type": "text", "text": "A red square."}]
    assert dataset.skips.counts == {"missing_text": 1}


@pytest.mark.parametrize(
    "columns, schema",
    [
        (["id", "image", "conversations"], "llava"),
        (["image", "question", "answer"], "vqa"),
        (["image", "image_id", "captions"], "caption"),
        (["image", "caption", "sentids"], "caption"),
    ],
)
def test_detect_schema(columns, schema):
    assert detect_schema(columns) == schema


def test_schema_detection_error_names_the_columns():
    with pytest.raises(ValueError, match=r"\['filename', 'sentences', 'url'\]"):
        detect_schema(["filename", "url", "sentences"])  # Karpathy COCO without images


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_round_trips_through_load_rows(tmp_path, streaming):
    source = make_caption_dataset(3, seed=5)
    path = write_parquet(source, tmp_path / "caps.parquet")
    rows = load_rows(path, streaming=streaming)
    assert isinstance(rows, datasets.IterableDataset if streaming else Dataset)
    dataset = adapt(rows)
    assert isinstance(dataset, AdaptedIterableDataset if streaming else AdaptedDataset)
    samples = list(dataset)
    assert [s["id"] for s in samples] == source["id"]
    for sample, scene_index, conversation in zip(samples, range(3), source["conversations"]):
        assert sample["messages"][1]["content"][0]["text"] == conversation[1]["value"]
        assert np.array_equal(np.asarray(sample["image"]), np.asarray(render_scene(make_scene(5, scene_index))))


def test_streamed_bad_rows_are_skipped_and_counted(tmp_path):
    path = write_parquet(llava_rows_with_bad_ones(), tmp_path / "bad.parquet")
    dataset = adapt(load_rows(path, streaming=True))
    assert [s["id"] for s in dataset] == ["a", "d"]
    assert dataset.skips.counts == {"unreadable_image": 2, "image_tag_count": 1}


def test_folder_splits_are_found_by_file_name(tmp_path):
    write_parquet(make_caption_dataset(2, seed=1), tmp_path / "data" / "train-00000.parquet")
    write_parquet(make_caption_dataset(1, seed=2), tmp_path / "data" / "test-00000.parquet")
    assert load_rows(tmp_path)["id"] == ["shapes-1-000000", "shapes-1-000001"]
    assert load_rows(tmp_path, split="test")["id"] == ["shapes-2-000000"]
    with pytest.raises(ValueError, match="found splits"):
        load_rows(tmp_path, split="validation")


def test_saved_to_disk_folder(tmp_path):
    make_caption_dataset(2).save_to_disk(tmp_path / "saved")
    assert len(list(adapt(load_rows(tmp_path / "saved", streaming=True)))) == 2


@pytest.mark.parametrize("suffix, streaming", [(".json", False), (".jsonl", True)])
def test_json_with_relative_image_paths(tmp_path, suffix, streaming):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes(png_bytes("red"))
    rows = [
        {"id": "ok", "image": "images/red.png", "conversations": turns("<image>\nDescribe it.", "Red.")},
        {"id": "gone", "image": "images/missing.png", "conversations": turns("<image>\nDescribe it.", "?")},
        {"id": "text", "image": None, "conversations": turns("Say hi.", "Hi.")},
    ]
    path = tmp_path / f"chat{suffix}"
    text = json.dumps(rows) if suffix == ".json" else "\n".join(json.dumps(r) for r in rows)
    path.write_text(text)
    dataset = build_dataset(path, streaming=streaming)
    samples = list(dataset)
    assert [s["id"] for s in samples] == ["ok", "text"]
    assert samples[0]["image"].size == (16, 12) and samples[1]["image"] is None
    assert dataset.skips.counts == {"unreadable_image": 1}
    assert "missing.png" in dataset.skips.report()


# --------------------------------------------------------------------------- through the real processor


def test_adapted_sample_renders_with_exactly_one_image_placeholder(model_and_processor):
    _, processor = model_and_processor
    sample = next(iter(adapt(make_caption_dataset(1))))
    text = processor.apply_chat_template(sample["messages"])
    assert text.count(processor.image_token) == 1
    batch = processor(images=[sample["image"]], text=[text])
    assert (batch["input_ids"] == processor.image_token_id).sum() == processor.image_seq_length
    assert batch["pixel_values"].shape[0] == 1


def test_loaded_path_type_is_accepted(tmp_path):
    path = write_parquet(make_caption_dataset(1), tmp_path / "one.parquet")
    assert len(load_rows(str(path))) == len(load_rows(Path(path))) == 1
