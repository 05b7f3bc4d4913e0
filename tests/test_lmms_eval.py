"""The lmms-eval plugin (eval/lmms_eval_plugin.py): `lmms-eval --model valign` found through the entry point, scoring
a local copy of coco_karpathy_test exactly as `python -m valign.eval captions` scores the same images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import direct_answer

from valign.data.synthetic import load_easy_vqa, make_caption_eval_set, write_parquet
from valign.eval.__main__ import main

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by setup.sh (--no-deps)")
from lmms_eval.api.instance import Instance

from valign.eval.lmms_eval_plugin import Valign

TASK_FOLDER = Path(__file__).parent / "data" / "lmms"
TASK = "valign_coco_karpathy_local"
PROMPT = "Describe the image briefly."  # coco_karpathy_test's doc_to_text
MAX_NEW_TOKENS = 16  # the local task's generation_kwargs
SCORES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def karpathy_rows(model_and_processor, n: int = 6):
    """Rendered scenes in yerevann/coco-karpathy's columns. A random model's captions share no word with the human
    references, which would score 0 whatever either path generated, so each image also gets the model's own
    caption cut to 8 tokens as a reference: the scores are then neither 0 nor 1."""
    rows = make_caption_eval_set(n, image_size=32)
    own = [direct_answer(*model_and_processor, image, PROMPT, 8) for image in rows["image"]]
    sentences = [[*refs, caption] for refs, caption in zip(rows["captions"], own, strict=True)]
    rows = rows.remove_columns(["captions", "image_id"]).add_column("sentences", sentences)
    rows = rows.add_column("imgid", list(range(n))).add_column("cocoid", [100 + i for i in range(n)])
    return rows.add_column("filename", [f"COCO_val2014_{100 + i:012d}.jpg" for i in range(n)])


def task_folder(tmp_path: Path, data_file: Path) -> Path:
    """The local task (YAML and its functions) with the data file's path filled in."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "utils.py").write_text((TASK_FOLDER / "utils.py").read_text())
    yaml = (TASK_FOLDER / f"{TASK}.yaml").read_text().replace("DATA_FILE", str(data_file))
    (folder / f"{TASK}.yaml").write_text(yaml)
    return folder


def run_lmms_eval(checkpoint: Path, tasks: Path, output: Path, batch_size: int) -> dict:
    """The lmms-eval command line in a fresh process (so the model is found through the installed entry point);
    returns its results file and the per-document samples."""
    lmms_eval = Path(sys.executable).parent / "lmms-eval"
    cache = str(output.parent / "datasets-cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": cache}
    command = [
        str(lmms_eval), "--model", "valign", "--model_args", f"pretrained={checkpoint}", "--tasks", TASK,
        "--include_path", str(tasks), "--batch_size", str(batch_size), "--output_path", str(output), "--log_samples",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=output, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The coco scorer also writes submissions/coco_captions_val2014_alg_results.json.
    (results_file,) = (path for path in output.rglob("*_results.json") if path.parent.name != "submissions")
    (samples_file,) = output.rglob(f"*_samples_{TASK}.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return {"results": json.loads(results_file.read_text())["results"][TASK], "samples": samples}


def test_lmms_eval_scores_the_captions_of_valign_eval(checkpoint, model_and_processor, tmp_path):
    data_file = write_parquet(karpathy_rows(model_and_processor), tmp_path / "data" / "test.parquet")
    (tmp_path / "lmms").mkdir()
    lmms = run_lmms_eval(checkpoint, task_folder(tmp_path, data_file), tmp_path / "lmms", batch_size=4)
    output = tmp_path / "valign.json"
    main(["captions", "--model", str(checkpoint), "--dataset", str(data_file), "--prompt", PROMPT,
          "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "4", "--output", str(output)])  # fmt: skip
    valign = json.loads(output.read_text())

    by_doc = {sample["doc_id"]: sample["coco_CIDEr"]["pred"] for sample in lmms["samples"]}  # what was scored
    assert [by_doc[i] for i in range(len(by_doc))] == [c["caption"] for c in valign["captions"]]
    lmms_scores = {name: lmms["results"][f"coco_{name},none"] for name in SCORES}
    assert lmms_scores["CIDEr"] > 0 and 0 < lmms_scores["Bleu_1"] < 1
    assert lmms_scores == pytest.approx(valign["scores"], rel=1e-9, abs=1e-12)


def request(context: str, gen_kwargs: dict, doc_id: int) -> Instance:
    arguments = (context, gen_kwargs, lambda doc: [doc["image"]], doc_id, "qa", "test")
    return Instance("generate_until", arguments, idx=0, metadata={"task": "qa", "doc_id": doc_id, "repeats": 1})


def test_batched_left_padded_generation_answers_as_one_at_a_time(checkpoint, model_and_processor):
    rows = load_easy_vqa("test", 6)
    questions = list(rows["question"])
    tokenizer = model_and_processor[1].tokenizer
    assert len({len(tokenizer(q)["input_ids"]) for q in questions}) > 1  # so batches are padded
    oracle = [direct_answer(*model_and_processor, image, q, 6) for image, q in zip(rows["image"], questions)]
    stop = oracle[1][2:4]  # a stop string inside an answer of the second group
    plain, stopped = {"max_new_tokens": 6, "until": ["\n\n"]}, {"max_new_tokens": 6, "until": [stop]}
    # Two generation_kwargs groups, interleaved; half the contexts carry lmms-eval's <image> tag.
    kwargs = [plain if i % 2 == 0 else stopped for i in range(6)]
    contexts = [f"<image>\n{q}" if i % 3 == 0 else q for i, q in enumerate(questions)]
    expected = [a if k is plain else a.split(stop, 1)[0].strip() for a, k in zip(oracle, kwargs)]
    assert expected[1] != oracle[1]

    lm = Valign(pretrained=str(checkpoint))
    lm.task_dict = {"qa": {"test": [{"image": image} for image in rows["image"]]}}
    requests = [request(c, k, i) for i, (c, k) in enumerate(zip(contexts, kwargs))]
    answers = {}
    for batch_size in (1, 3):
        lm.batch_size = batch_size
        answers[batch_size] = lm.generate_until(requests)
    assert answers[3] == answers[1] == expected
