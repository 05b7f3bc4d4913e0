"""Model cards (train/card.py): Hub metadata that huggingface_hub parses, and usage snippets that run."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import CURRENT_PYTHON, other_major_python, shape_image
from huggingface_hub import ModelCard
from image_server import image_server

from valign.data.prompts import CAPTION_PROMPT
from valign.eval.generate import DecodingSettings, generate_answers
from valign.hub.card import (
    EXAMPLE_IMAGE_URL,
    EXAMPLE_QUESTION,
    Benchmark,
    eval_results_from_json,
    stage_model_card,
    write_model_card,
)
from valign.train.demo import PACKAGED_BASE_MODELS, DemoSizes, write_last_stage_card

REPO_ID = "user/valign"
BASE_MODELS = ["google/siglip-so400m-patch14-224", "Qwen/Qwen2.5-0.5B-Instruct"]
# As run_demo writes results.json: pycocoevalcap scores and VQA accuracy on a 0–1 scale.
RESULTS = {
    "captions": {"scores": {"Bleu_4": 0.323, "METEOR": 0.314, "ROUGE_L": 0.656, "CIDEr": 0.567}},
    "vqa": {"model": {"accuracy": 0.754, "n": 500}, "answer_prior": {"accuracy": 0.642}},
}
CAPTIONS = Benchmark("valign-demo-scenes", "Rendered shape scenes", "test")
VQA = Benchmark("easy-vqa", "easy-VQA", "test")


def test_metadata_parses_with_model_index_from_a_results_file(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    results = eval_results_from_json(tmp_path / "results.json", CAPTIONS, VQA)
    local_backbone = str(tmp_path)  # a local folder: named in the text, kept out of the metadata
    text = stage_model_card(
        "stage-3",
        {"name": "stage-3", "attn_mode": "hybrid"},
        ["lmms-lab/LLaVA-NeXT-Data"],
        [*BASE_MODELS, local_backbone],
        repo_id=REPO_ID,
        eval_results=results,
    )

    card = ModelCard(text)  # parses the YAML block; model-index becomes card.data.eval_results
    data = card.data.to_dict()
    assert (data["pipeline_tag"], data["library_name"], data["license"]) == (
        "image-text-to-text",
        "transformers",
        "apache-2.0",
    )
    assert data["base_model"] == BASE_MODELS
    assert data["datasets"] == ["lmms-lab/LLaVA-NeXT-Data"]
    assert {"valign", "vision-language", "conversational", "stage-3"} <= set(data["tags"])
    assert "model-index" in text and "&id" not in text  # no YAML anchors: each widget example is its own dict

    parsed = {(r.task_type, r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert parsed == {
        ("image-to-text", "valign-demo-scenes", "cider"): 56.7,
        ("image-to-text", "valign-demo-scenes", "bleu"): 32.3,
        ("image-to-text", "valign-demo-scenes", "meteor"): 31.4,
        ("image-to-text", "valign-demo-scenes", "rouge"): 65.6,
        ("visual-question-answering", "easy-vqa", "accuracy"): 75.4,
    }
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert "| Image captioning | Rendered shape scenes | test | CIDEr | 56.7 |" in card.text

    # The Hub's image-text-to-text widget is the chat widget: messages with an image_url chunk and a text chunk.
    for example in data["widget"]:
        (message,) = example["messages"]
        chunks = {chunk["type"]: chunk for chunk in message["content"]}
        assert message["role"] == "user" and set(chunks) == {"image_url", "text"}
        assert chunks["image_url"]["image_url"]["url"] == EXAMPLE_IMAGE_URL and chunks["text"]["text"]

    for section in ("## Usage", "## Training", "## Evaluation", "## Limitations", "## Citation"):
        assert section in card.text
    for text in (
        "AutoModelForImageTextToText",
        "AutoModelForVision2Seq",
        'pipeline("image-text-to-text"',
        "2503.19508",
    ):
        assert text in card.text
    assert local_backbone in card.text


def test_the_demos_last_card_keeps_its_backbones_with_the_results(tmp_path: Path) -> None:
    sizes = DemoSizes()  # the packaged backbones, as `python -m valign.train` runs
    (tmp_path / "stage_config.json").write_text(json.dumps({"name": "stage-3", "attn_mode": "hybrid"}))
    card = ModelCard.load(write_last_stage_card(tmp_path, RESULTS, sizes))
    assert card.data.to_dict()["base_model"] == PACKAGED_BASE_MODELS == sizes.base_models
    assert "Base models: `facebook/dinov2-small`, `HuggingFaceTB/SmolLM2-135M-Instruct`." in card.text
    assert [result.metric_value for result in card.data.eval_results][-1] == 75.4  # VQA accuracy, ×100


def test_a_stage_folder_card_records_its_stage_and_no_results_means_no_model_index(tmp_path: Path) -> None:
    config = {"name": "stage-2", "attn_mode": "hybrid", "learning_rates": {"language_model": 2e-5}}
    config["data"] = [{"source": "lmms-lab/LLaVA-ReCap-118K"}, {"source": "captions.parquet"}]
    (tmp_path / "stage_config.json").write_text(json.dumps(config))
    card = ModelCard.load(write_model_card(tmp_path, base_models=BASE_MODELS))
    data = card.data.to_dict()
    assert "model-index" not in data and card.data.eval_results is None
    assert data["datasets"] == ["lmms-lab/LLaVA-ReCap-118K"]  # a local file is not a Hub data set
    assert "stage-2" in data["tags"] and 'revision="stage-2"' in card.text
    assert "Training stage: **stage-2**, attention mode `hybrid`." in card.text
    assert "language_model: 2.0e-05" in card.text and "`captions.parquet`" in card.text
    assert "## Evaluation" not in card.text


def usage_snippets(card_text: str, checkpoint: Path, image_url: str) -> list[str]:
    """The card's Python usage blocks, pointed at a local folder and an image served on 127.0.0.1 instead of the
    Hub's."""
    usage = card_text.split("## Usage", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", usage, flags=re.DOTALL)
    assert len(blocks) == 2, "expected a model snippet and a pipeline snippet"
    for block in blocks:
        assert f'"{REPO_ID}"' in block and f'"{EXAMPLE_IMAGE_URL}"' in block
    return [
        block.replace(f'"{REPO_ID}"', json.dumps(str(checkpoint))).replace(
            f'"{EXAMPLE_IMAGE_URL}"', json.dumps(image_url)
        )
        for block in blocks
    ]


# Runs each file given in its own namespace, as a user would paste it, and prints what each printed (a JSON list).
RUNNER = """
import contextlib, io, json, sys
printed = []
for path in sys.argv[1:]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(open(path).read(), path, "exec"), {"__name__": "__main__"})
    printed.append(out.getvalue())
print(json.dumps(printed))
"""


@pytest.fixture(scope="module")
def image_url() -> str:
    """The red shape as a PNG (lossless: the snippets see the reference's pixels) served on 127.0.0.1."""
    image = io.BytesIO()
    shape_image("red").save(image, "PNG")
    with image_server(image.getvalue()) as server:
        yield f"{server}/shape.png"


@pytest.fixture(scope="module")
def bidirectional_checkpoint(checkpoint: Path, tmp_path_factory) -> Path:
    """The session checkpoint as an alignment stage (stage 0) saves it: `attn_mode` bidirectional."""
    folder = tmp_path_factory.mktemp("stage-0")
    shutil.copytree(checkpoint, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attn_mode": "bidirectional"}))
    return folder


# Stage 0 trains with bidirectional attention, which generate() refuses: its card's snippets must still run, and
# decode with the hybrid mask (the same answers as the hybrid checkpoint with the same weights).
@pytest.mark.parametrize("stage", ["stage-3", "stage-0"])
def test_usage_snippets_run_in_fresh_processes(
    stage: str, request: pytest.FixtureRequest, model_and_processor, image_url: str, tmp_path: Path
) -> None:
    config = {"name": stage, "attn_mode": "bidirectional"} if stage == "stage-0" else {}
    checkpoint = request.getfixturevalue("bidirectional_checkpoint" if stage == "stage-0" else "checkpoint")
    # A stage card pins revision="stage-N": loading a local folder must still work.
    card = stage_model_card(stage, config, [], BASE_MODELS, repo_id=REPO_ID)
    files = []
    for index, snippet in enumerate(usage_snippets(card, checkpoint, image_url)):
        files.append(tmp_path / f"snippet{index}.py")
        files[-1].write_text(snippet)
    model_snippet, pipeline_snippet = map(str, files)
    runs = {  # in parallel; the 4.57 run takes the AutoModelForVision2Seq branch
        "transformers 5": (CURRENT_PYTHON, [model_snippet, pipeline_snippet]),
        "transformers 4.57": (other_major_python(), [model_snippet]),
    }
    processes = {}
    for name, (python, snippets) in runs.items():
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["HF_MODULES_CACHE"] = str(tmp_path / f"modules-{len(processes)}")  # each copies the remote code there
        command = [str(python), "-c", RUNNER, *snippets]
        processes[name] = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    printed = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"the snippets failed under {name}:\n{stderr.decode()[-3000:]}"
        printed[name] = [text.strip() for text in json.loads(stdout)]

    model, processor = model_and_processor
    settings = DecodingSettings(max_new_tokens=40)
    caption, answer = (
        generate_answers(model, processor, [shape_image("red")], [prompt], settings)[0]
        for prompt in (CAPTION_PROMPT, EXAMPLE_QUESTION)
    )
    assert caption and answer  # the tiny model says something, so the comparisons below are informative
    assert printed == {"transformers 5": [caption, answer], "transformers 4.57": [caption]}


def test_the_card_says_where_its_widget_runs_and_names_a_space_given_at_push_time() -> None:
    plain = ModelCard(stage_model_card("stage-3", {}, [], BASE_MODELS, repo_id=REPO_ID))
    named = ModelCard(stage_model_card("stage-3", {}, [], BASE_MODELS, repo_id=REPO_ID, space="user/valign-demo"))
    assert "spaces" not in plain.data.to_dict() and named.data.to_dict()["spaces"] == ["user/valign-demo"]
    assert "[user/valign-demo](https://huggingface.co/spaces/user/valign-demo)" in named.text
    assert f"`VALIGN_MODEL` set to `{REPO_ID}`" in plain.text  # without a Space: how to make one
    serving = named.text.split("## Serving", 1)[1].split("\n## ", 1)[0]
    assert "does not run models with custom code" in serving and "`handler.py` (branch `stage-3`)" in serving
    # The curl example's body is the card's own question example, as the handler takes it.
    body = json.loads(re.search(r"-d '(.*)'", serving).group(1))
    assert body["inputs"] == named.data.to_dict()["widget"][-1]["messages"]


@pytest.mark.parametrize("part", ["captions", "vqa"])
def test_results_without_a_benchmark_are_left_out(part: str) -> None:
    only = {"captions": CAPTIONS} if part == "captions" else {"vqa": VQA}
    results = eval_results_from_json(RESULTS, **only)
    tasks = {r.task_type for r in results}
    assert tasks == ({"image-to-text"} if part == "captions" else {"visual-question-answering"})
