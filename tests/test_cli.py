"""The `valign` command (cli.py): captions, questions, JSON output, per-file errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import direct_answer, shape_image

from valign import cli

QUESTION = "What colour is the shape?"
# The user texts the commands must send, written out (not taken from valign.data.prompts).
CAPTION_TEXT = "Describe the image in detail."
QUESTION_TEXT = "What colour is the shape? Answer the question using a single word or phrase."


def test_importing_valign_prints_nothing_and_leaves_third_party_logging_as_it_was() -> None:
    """Every command imports valign first. torchao's import-time records (CUDA kernels a CPU build of torch cannot
    load; deprecated Enum registrations) are quieted during that import only: a later torchao warning still shows."""
    code = "import logging, valign; logging.getLogger('torchao').warning('a later warning')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (run.stdout, run.stderr) == ("", "a later warning\n")


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """Two readable pictures and a corrupt file between them."""
    paths = {name: tmp_path / f"{name}.png" for name in ("red", "corrupt", "blue")}
    shape_image("red").save(paths["red"])
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n truncated, not an image")
    shape_image("blue").save(paths["blue"])
    return paths


def expected(model_and_processor, color: str, text: str, max_new_tokens: int) -> str:
    return direct_answer(*model_and_processor, shape_image(color), text, max_new_tokens)


def test_captions_json_reports_the_corrupt_file_and_processes_the_rest(
    checkpoint: Path, images: dict[str, Path], model_and_processor, capsys
) -> None:
    paths = [str(images[name]) for name in ("red", "corrupt", "blue")]
    # Batches of two: the corrupt file shares a batch with a good one, the last batch has one image.
    argv = ["caption", *paths, "--model", str(checkpoint), "--batch-size", "2", "--max-new-tokens", "12", "--json"]
    status = cli.main(argv)
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]

    assert status == 1
    assert [record["path"] for record in records] == paths
    red, corrupt, blue = records
    assert red == {"path": paths[0], "text": expected(model_and_processor, "red", CAPTION_TEXT, 12)}
    assert blue == {"path": paths[2], "text": expected(model_and_processor, "blue", CAPTION_TEXT, 12)}
    assert red["text"] != blue["text"]  # the model looked at each image
    assert set(corrupt) == {"path", "error"} and str(images["corrupt"]) in corrupt["error"]
    assert "1 of 3 images failed" in err


def test_images_batched_together_get_the_captions_they_get_alone(
    checkpoint: Path, images: dict[str, Path], model_and_processor, capsys
) -> None:
    paths = [str(images["red"]), str(images["blue"])]
    argv = ["caption", *paths, "--model", str(checkpoint), "--batch-size", "2", "--max-new-tokens", "12", "--json"]
    assert cli.main(argv) == 0
    texts = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    assert texts == [expected(model_and_processor, color, CAPTION_TEXT, 12) for color in ("red", "blue")]


def test_plain_output_prints_a_line_per_image_and_errors_on_stderr(
    checkpoint: Path, images: dict[str, Path], capsys
) -> None:
    paths = [str(images[name]) for name in ("red", "corrupt", "blue")]
    status = cli.main(["caption", *paths, "--model", str(checkpoint), "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert status == 1
    assert [line.split(": ", 1)[0] for line in out.splitlines()] == [paths[0], paths[2]]
    assert f"cannot read image {paths[1]}" in err


@pytest.mark.parametrize("bare", [False, True], ids=["with-instruction", "no-instruction"])
def test_ask_prints_the_answer(
    checkpoint: Path, images: dict[str, Path], model_and_processor, capsys, bare: bool
) -> None:
    argv = ["ask", str(images["red"]), QUESTION, "--model", str(checkpoint), "--max-new-tokens", "8"]
    status = cli.main(argv + ["--no-instruction"] * bare)
    out, _ = capsys.readouterr()
    answer = expected(model_and_processor, "red", QUESTION if bare else QUESTION_TEXT, max_new_tokens=8)
    assert status == 0 and answer
    assert out == answer + "\n"


def test_without_a_model_the_error_says_how_to_get_one(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(cli, "DEMO_CHECKPOINT", Path("no-such-folder") / "stage-3")
    monkeypatch.delenv("VALIGN_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ask", "any.png", QUESTION]) == 2
    assert "python -m valign.train" in capsys.readouterr().err


def test_without_a_model_valign_model_names_it(
    monkeypatch, checkpoint: Path, images: dict[str, Path], model_and_processor, capsys
) -> None:
    monkeypatch.setenv("VALIGN_MODEL", str(checkpoint))
    assert cli.main(["ask", str(images["red"]), QUESTION, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == expected(model_and_processor, "red", QUESTION_TEXT, 4) + "\n"


def test_the_console_script_is_installed() -> None:
    (entry,) = entry_points(group="console_scripts", name="valign")
    assert entry.value == "valign.cli:main"  # the script does sys.exit(main()): main returns the exit status
    assert (Path(sys.executable).parent / "valign").is_file(), "reinstall valign (bash setup.sh) to get the script"
