"""Faults at the command line and in loading (issue 13, items 3 and 7): a checkpoint's own code never runs unasked,
a missing folder is named as such, failures have their own exit status (and a JSON object with `--json`), and a
prompt past the language model's positions is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import CURRENT_PYTHON, direct_answer, other_major_python, shape_image

from valign import cli
from valign.checkpoint import is_local, load_checkpoint
from valign.eval import __main__ as eval_main
from valign.eval.generate import DecodingSettings, PromptTooLongError, check_positions, generate_answers

CAPTION_TEXT = "Describe the image in detail."
MAX_NEW_TOKENS = 6
# A module that leaves a marker when imported, and classes that work, so a load that runs it still answers.
CHECKPOINT_CODE = """
from pathlib import Path

import transformers

Path({marker!r}).write_text("ran")


class SneakyTokenizer(transformers.PreTrainedTokenizerFast):
    pass


class SneakyImageProcessor(transformers.SiglipImageProcessor):
    pass
"""
TOKENIZER_MAP = {"AutoTokenizer": ["sneaky.SneakyTokenizer", "sneaky.SneakyTokenizer"]}
IMAGE_PROCESSOR_MAP = {"AutoImageProcessor": "sneaky.SneakyImageProcessor"}


def add_auto_map(path: Path, entries: dict) -> None:
    """Add `entries` to the `auto_map` of a JSON config (and of the image processor section 5.x nests in it)."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    for section in (config, config.get("image_processor")):
        if isinstance(section, dict):
            section["auto_map"] = {**section.get("auto_map", {}), **entries}
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def sneaky_checkpoint(checkpoint: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The session checkpoint with a Python file every config's `auto_map` points at; (folder, marker)."""
    folder = tmp_path_factory.mktemp("sneaky")
    shutil.copytree(checkpoint, folder, dirs_exist_ok=True)
    marker = folder.parent / f"{folder.name}-marker"
    (folder / "sneaky.py").write_text(CHECKPOINT_CODE.format(marker=str(marker)))
    add_auto_map(folder / "tokenizer_config.json", TOKENIZER_MAP)
    add_auto_map(folder / "config.json", {**TOKENIZER_MAP, **IMAGE_PROCESSOR_MAP})
    for name in ("processor_config.json", "preprocessor_config.json"):
        add_auto_map(folder / name, IMAGE_PROCESSOR_MAP)
    return folder, marker


@pytest.fixture
def red(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    shape_image("red").save(path)
    return path


def run_cli(python: Path | str, *args: str, cwd: Path, preamble: str = "") -> subprocess.CompletedProcess:
    """`valign ARGS` in a fresh process of `python` (its exit status is the process's); `preamble` runs first. As in
    this process (conftest), the runtime choice keeps fp32 on every CPU and a cache of its own."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VALIGN_CACHE": str(cwd / "cache")}
    env["HF_MODULES_CACHE"] = str(cwd / "modules")  # where trust_remote_code copies a checkpoint's code
    fp32 = "import valign.export.runtime as runtime\nruntime.native_bf16 = lambda device='cpu': False"
    code = f"import sys\n{fp32}\n{preamble}\nfrom valign.cli import main\nsys.exit(main(sys.argv[1:]))"
    command = [str(python), "-c", code, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def majors() -> list:
    return [pytest.param(lambda: CURRENT_PYTHON, id="this-major"), pytest.param(other_major_python, id="other-major")]


# --------------------------------------------------------------------------- a checkpoint's code


@pytest.mark.parametrize("python", majors())
@pytest.mark.parametrize("trust", [False, True], ids=["default", "trust-remote-code"])
def test_the_checkpoints_code_runs_only_when_trusted(
    python, trust: bool, sneaky_checkpoint, red: Path, model_and_processor, tmp_path: Path
) -> None:
    folder, marker = sneaky_checkpoint
    marker.unlink(missing_ok=True)
    args = ["caption", str(red), "--model", str(folder), "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"]
    result = run_cli(python(), *args, *(["--trust-remote-code"] if trust else []), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists() == trust  # without the flag nothing of the folder ran, and nothing asked
    expected = direct_answer(*model_and_processor, shape_image("red"), CAPTION_TEXT, MAX_NEW_TOKENS)
    assert json.loads(result.stdout) == {"path": str(red), "text": expected}


def test_valigns_classes_load_the_processor_without_the_checkpoints_code(sneaky_checkpoint) -> None:
    folder, marker = sneaky_checkpoint
    marker.unlink(missing_ok=True)
    _, processor = load_checkpoint(folder)
    assert not marker.exists()
    for part in (processor.tokenizer, processor.image_processor):
        assert type(part).__module__.startswith("transformers.") and "Sneaky" not in type(part).__name__


def test_a_tokenizer_only_the_checkpoint_defines_is_refused_without_trust(sneaky_checkpoint, tmp_path: Path) -> None:
    folder, marker = sneaky_checkpoint
    marker.unlink(missing_ok=True)
    custom = tmp_path / "custom"
    shutil.copytree(folder, custom)
    config = json.loads((custom / "tokenizer_config.json").read_text())
    (custom / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "SneakyTokenizer"}))
    with pytest.raises(ValueError, match=r"'SneakyTokenizer', which is not a transformers class.*trust_remote_code"):
        load_checkpoint(custom)
    assert not marker.exists()


def test_eval_loads_with_valigns_classes_unless_asked(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(eval_main, "load_checkpoint", lambda *args, **kwargs: calls.append(kwargs) or (None, None))
    for extra in ([], ["--trust-remote-code"]):
        eval_main.model_and_settings(eval_main.parser().parse_args(["captions", "--model", "m", *extra]))
    assert calls == [{"trust_remote_code": False}, {"trust_remote_code": True}]


# --------------------------------------------------------------------------- the --model name


@pytest.mark.parametrize(
    ("name", "local"),
    [("./missing", True), ("/abs/missing", True), ("~/missing", True), ("a/b/c", True), ("owner/name", False)],
)
def test_a_name_is_a_folder_when_it_looks_like_a_path(name: str, local: bool) -> None:
    assert is_local(name) == local


def test_an_existing_folder_is_local_whatever_its_name(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert is_local("owner/name")


@pytest.mark.parametrize("name", ["./no/such/checkpoint", "deep/no/such-checkpoint"])
def test_a_missing_local_model_is_named_as_a_missing_folder(name: str, red: Path, tmp_path: Path) -> None:
    result = run_cli(CURRENT_PYTHON, "caption", str(red), "--model", name, "--json", cwd=tmp_path)
    assert result.returncode == cli.EXIT_USAGE
    message = f"cannot load the model {name} (local folder): no such folder: {name}"
    assert json.loads(result.stdout) == {"error": message, "exit_status": cli.EXIT_USAGE}
    assert message in result.stderr and "Repo id must be" not in result.stderr


def test_a_file_given_as_the_model_is_named_as_a_file(red: Path, capsys) -> None:
    assert cli.main(["caption", str(red), "--model", str(red)]) == cli.EXIT_USAGE
    assert f"{red} is a file, not a checkpoint folder" in capsys.readouterr().err


def test_a_hub_id_that_cannot_load_is_named_as_a_hub_id(red: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["caption", str(red), "--model", "nobody-valign-test/absent", "--json"]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert "cannot load the model nobody-valign-test/absent (Hub repo id)" in err
    assert json.loads(out)["exit_status"] == cli.EXIT_USAGE


# --------------------------------------------------------------------------- exit statuses


FAIL_SECOND_GENERATE = """
import valign.modeling_valign as modeling
calls = []
original = modeling.ValignForConditionalGeneration.generate
def generate(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("injected generation failure")
    return original(self, *args, **kwargs)
modeling.ValignForConditionalGeneration.generate = generate
"""


def test_a_generation_crash_has_its_own_status_and_keeps_the_answers_before_it(
    checkpoint: Path, red: Path, model_and_processor, tmp_path: Path
) -> None:
    blue = tmp_path / "blue.png"
    shape_image("blue").save(blue)
    args = ["caption", str(red), str(blue), "--model", str(checkpoint), "--batch-size", "1", "--json"]
    args += ["--max-new-tokens", str(MAX_NEW_TOKENS)]
    result = run_cli(CURRENT_PYTHON, *args, cwd=tmp_path, preamble=FAIL_SECOND_GENERATE)
    assert result.returncode == cli.EXIT_INTERNAL == 3
    first, crash = map(json.loads, result.stdout.splitlines())
    expected = direct_answer(*model_and_processor, shape_image("red"), CAPTION_TEXT, MAX_NEW_TOKENS)
    assert first == {"path": str(red), "text": expected}
    message = "internal error: RuntimeError: injected generation failure"
    assert crash == {"error": message, "exit_status": 3}
    assert "Traceback" in result.stderr and message in result.stderr


def test_unreadable_images_and_crashes_exit_differently(checkpoint: Path, red: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    result = run_cli(CURRENT_PYTHON, "caption", str(red), str(broken), "--model", str(checkpoint), cwd=tmp_path)
    assert result.returncode == cli.EXIT_IMAGE_ERRORS == 1
    assert result.stdout.startswith(f"{red}: ") and "1 of 2 images failed" in result.stderr


def test_usage_errors_print_a_json_object_too(red: Path, capsys) -> None:
    assert cli.main(["caption", str(red), "--batch-size", "0", "--json"]) == cli.EXIT_USAGE
    message = "--batch-size and --max-new-tokens must be positive"
    assert json.loads(capsys.readouterr().out) == {"error": message, "exit_status": 2}
    # argparse's own errors too, after its usage line
    assert cli.main(["caption", str(red), "--runtime", "gpu", "--json"]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert json.loads(out)["error"].startswith("argument --runtime: invalid choice: 'gpu'")
    assert err.startswith("usage: valign caption")
    assert cli.main(["caption", str(red), "--max-new-tokens", "abc"]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and "valign: error: argument --max-new-tokens: invalid int value: 'abc'" in err


@pytest.mark.parametrize(
    "argv, name",
    [
        (["ask", "IMAGE", ""], "question"),
        (["ask", "IMAGE", "  \t"], "question"),
        (["caption", "IMAGE", "--prompt", " "], "--prompt"),
    ],
)
def test_an_empty_question_or_prompt_is_refused(argv: list[str], name: str, red: Path, capsys) -> None:
    argv = [str(red) if arg == "IMAGE" else arg for arg in argv]
    assert cli.main([*argv, "--model", "never-loaded", "--json"]) == cli.EXIT_USAGE
    assert json.loads(capsys.readouterr().out) == {"error": f"the {name} is empty", "exit_status": 2}


# --------------------------------------------------------------------------- the language model's positions


def prompt_length(processor, text: str) -> int:
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], add_generation_prompt=True
    )
    return processor(images=[shape_image("red")], text=[chat])["input_ids"].shape[1]


def test_positions_up_to_the_limit_pass_and_one_more_is_refused(model_and_processor) -> None:
    model, processor = model_and_processor
    limit = model.config.text_config.max_position_embeddings
    length = prompt_length(processor, CAPTION_TEXT)
    assert length > processor.image_seq_length  # the image tokens count
    check_positions(model, length, limit - length)
    with pytest.raises(PromptTooLongError, match=f"{limit + 1} positions, more than the language model's {limit}"):
        check_positions(model, length, limit - length + 1)


def test_a_prompt_too_long_is_refused_before_generating(model_and_processor, monkeypatch) -> None:
    model, processor = model_and_processor
    limit = model.config.text_config.max_position_embeddings

    def never(*args, **kwargs):
        raise AssertionError("generate ran")

    monkeypatch.setattr(model, "generate", never)
    text = "word " * limit
    with pytest.raises(PromptTooLongError, match=r"max_position_embeddings\); shorten the prompt"):
        generate_answers(model, processor, [shape_image("red")], [text], DecodingSettings(max_new_tokens=4))


@pytest.mark.parametrize("option", ["prompt", "max-new-tokens"])
def test_the_command_refuses_a_generation_past_the_positions(
    option: str, checkpoint: Path, red: Path, model_and_processor, capsys
) -> None:
    limit = model_and_processor[0].config.text_config.max_position_embeddings
    extra = ["--prompt", "word " * limit] if option == "prompt" else ["--max-new-tokens", str(limit)]
    assert cli.main(["caption", str(red), "--model", str(checkpoint), "--json", *extra]) == cli.EXIT_USAGE
    (record,) = map(json.loads, capsys.readouterr().out.splitlines())
    assert record["exit_status"] == 2 and "text_config.max_position_embeddings" in record["error"]


def test_the_app_shows_a_question_past_the_positions_as_an_error(model_and_processor, red: Path) -> None:
    gradio = pytest.importorskip("gradio")
    from valign import app

    limit = model_and_processor[0].config.text_config.max_position_embeddings
    settings = DecodingSettings(max_new_tokens=4, batch_size=1)
    with pytest.raises(gradio.Error, match=r"text_config\.max_position_embeddings"):
        app.answer(*model_and_processor, settings, str(red), "word " * limit)
