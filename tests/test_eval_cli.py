"""The evaluation command line on local data in the Hub schemas: recorded outputs and scores agree."""

from __future__ import annotations

import json

import pytest

from valign.data.synthetic import load_easy_vqa, make_caption_eval_set, write_parquet
from valign.eval.__main__ import main
from valign.eval.caption_metrics import score_captions
from valign.eval.vqa_metrics import score_vqa


def test_caption_command_records_captions_scores_and_settings(checkpoint, tmp_path):
    eval_set = make_caption_eval_set(6, image_size=32)
    write_parquet(eval_set, tmp_path / "captions.parquet")
    output = tmp_path / "captions.json"
    main(["captions", "--model", str(checkpoint), "--dataset", str(tmp_path / "captions.parquet"),
          "--num-beams", "2", "--max-new-tokens", "8", "--output", str(output)])  # fmt: skip
    results = json.loads(output.read_text())
    references = {str(i): refs for i, refs in zip(eval_set["image_id"], eval_set["captions"])}
    assert results["captions"].keys() == references.keys()
    assert results["scores"] == pytest.approx(score_captions(results["captions"], references))
    assert results["decoding"] == {"max_new_tokens": 8, "num_beams": 2, "batch_size": 16, "attn_mode": None}
    assert results["images_per_second"] > 0
    table = output.with_suffix(".md").read_text()
    assert "| CIDEr |" in table and "127.1" not in table  # paper numbers only beside COCO and Flickr30k


def test_vqa_command_scores_the_recorded_predictions_with_baselines(checkpoint, tmp_path):
    test = load_easy_vqa("test", 24)
    write_parquet(test, tmp_path / "test.parquet")
    write_parquet(load_easy_vqa("train", 48), tmp_path / "train.parquet")
    output = tmp_path / "vqa.json"
    main(["vqa", "--model", str(checkpoint), "--dataset", str(tmp_path), "--max-new-tokens", "3",
          "--output", str(output)])  # fmt: skip
    results = json.loads(output.read_text())
    expected = score_vqa(results["predictions"], list(test["answer"]), list(test["question_type"]))
    assert results["model"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert results["model"]["n"] == 24 and results["answer_prior"]["n"] == 24
    assert {"answer prior (blind)", "mismatched images (blind)"} <= {
        line.split("|")[1].strip() for line in output.with_suffix(".md").read_text().splitlines()[2:]
    }
