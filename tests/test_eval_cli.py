"""The evaluation command line on local data in the Hub schemas, checked against expectations computed here."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

import pytest
from conftest import direct_answer

from valign.data.synthetic import load_easy_vqa, make_caption_eval_set, write_parquet
from valign.eval.__main__ import main

CAPTION_TEXT = "Describe the image in detail."
VQA_INSTRUCTION = "Answer the question using a single word or phrase."


def test_caption_command_scores_captions_that_equal_their_references_as_perfect(
    checkpoint, model_and_processor, tmp_path
):
    eval_set = make_caption_eval_set(6, image_size=32)
    # The references are the model's own greedy captions: the command must reproduce them and score them 1.
    own = [direct_answer(*model_and_processor, image, CAPTION_TEXT, 8) for image in eval_set["image"]]
    assert all(own) and len(set(own)) > 1
    references = eval_set.remove_columns("captions").add_column("captions", [[caption] for caption in own])
    write_parquet(references, tmp_path / "c.parquet")
    output = tmp_path / "captions.json"
    start = time.perf_counter()
    main(["captions", "--model", str(checkpoint), "--dataset", str(tmp_path / "c.parquet"),
          "--num-beams", "1", "--max-new-tokens", "8", "--output", str(output)])  # fmt: skip
    wall = time.perf_counter() - start
    results = json.loads(output.read_text())
    assert results["captions"] == [{"image_id": str(i), "caption": c} for i, c in zip(eval_set["image_id"], own)]
    assert results["scores"]["Bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert results["scores"]["ROUGE_L"] == pytest.approx(1.0, abs=1e-6)
    assert results["decoding"] == {"max_new_tokens": 8, "num_beams": 1, "batch_size": 16, "attn_mode": None}
    assert results["prompt"] == CAPTION_TEXT
    assert 0 < results["generation_seconds"] < wall
    assert results["images_per_second"] == pytest.approx(6 / results["generation_seconds"])
    table = output.with_suffix(".md").read_text()
    assert "| CIDEr |" in table and "127.1" not in table  # paper numbers only beside COCO and Flickr30k


def test_vqa_command_asks_with_the_instruction_and_scores_model_and_answer_prior(
    checkpoint, model_and_processor, tmp_path
):
    test, train = load_easy_vqa("test", 24), load_easy_vqa("train", 48)
    write_parquet(test, tmp_path / "test.parquet")
    write_parquet(train, tmp_path / "train.parquet")
    output = tmp_path / "vqa.json"
    main(["vqa", "--model", str(checkpoint), "--dataset", str(tmp_path), "--max-new-tokens", "3",
          "--output", str(output)])  # fmt: skip
    results = json.loads(output.read_text())

    expected = [
        direct_answer(*model_and_processor, image, f"{q[0].upper()}{q[1:]} {VQA_INSTRUCTION}", 3)
        for image, q in zip(test["image"], test["question"])
    ]
    assert results["predictions"] == expected
    # easy-VQA answers are single lower-case words.
    correct = [p.strip().lower().strip(".") == a for p, a in zip(expected, test["answer"])]
    assert results["model"]["accuracy"] == pytest.approx(sum(correct) / 24) and results["model"]["n"] == 24

    by_question: dict[str, Counter] = defaultdict(Counter)
    for q, a in zip(train["question"], train["answer"]):
        by_question[q][a] += 1
    overall = Counter(train["answer"]).most_common(1)[0][0]
    prior = [by_question[q].most_common(1)[0][0] if q in by_question else overall for q in test["question"]]
    prior_accuracy = sum(p == a for p, a in zip(prior, test["answer"])) / 24
    assert results["answer_prior"]["accuracy"] == pytest.approx(prior_accuracy) and prior_accuracy > 0
    assert {"answer prior (blind)", "mismatched images (blind)"} <= {
        line.split("|")[1].strip() for line in output.with_suffix(".md").read_text().splitlines()[2:]
    }
