"""The ONNX export (export/onnx_runtime.py): onnxruntime decodes the same greedy tokens as PyTorch, with the
hybrid mask, left padding and the `valign` command; quantized weights are smaller; bad input gets clear errors. The
runtime choice (export/runtime.py): a cached export serves its checkpoint only, bf16 where the CPU computes it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_bad_requests_refused, prompts, shape_image

from valign import cli
from valign.export.onnx_runtime import DECODER_FILE, OnnxValign, export_onnx
from valign.export.runtime import cached_export, choose_runtime, load_for_generation

QUESTIONS = ["What colour is the shape?", "Describe the image in detail, with many words, please."]


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory) -> Path:
    return export_onnx(checkpoint, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def batch(model_and_processor) -> dict:
    """Two prompts of different lengths (so one is left-padded), each with its own image."""
    _, processor = model_and_processor
    return processor(images=[shape_image("red"), shape_image("blue")], text=prompts(processor, QUESTIONS))


@pytest.mark.parametrize("mode", ["hybrid", "causal"])
def test_onnx_runtime_decodes_the_tokens_pytorch_decodes(exported: Path, model_and_processor, batch, mode: str):
    model, _ = model_and_processor
    expected = model.generate(**batch, attn_mode=mode, max_new_tokens=12, do_sample=False)
    other = model.generate(**batch, attn_mode="causal" if mode == "hybrid" else "hybrid", max_new_tokens=12)
    assert not torch.equal(expected, other)  # the masks differ in what they decode, so the mask reached the graph
    assert batch["attention_mask"][:, 0].tolist() == [0, 1]  # the short prompt is left-padded
    assert torch.equal(OnnxValign(exported).generate(**batch, attn_mode=mode, max_new_tokens=12), expected)


def test_the_command_answers_alike_on_both_runtimes(exported: Path, checkpoint: Path, tmp_path: Path, capsys):
    paths = []
    for color in ("red", "blue", "green"):
        paths.append(str(tmp_path / f"{color}.png"))
        shape_image(color).save(paths[-1])
    texts = {}
    for runtime, model in (("torch", checkpoint), ("onnx", exported)):
        argv = ["caption", *paths, "--model", str(model), "--runtime", runtime, "--batch-size", "2", "--json"]
        assert cli.main([*argv, "--max-new-tokens", "10"]) == 0
        texts[runtime] = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    assert texts["onnx"] == texts["torch"] and len(set(texts["torch"])) == 3


def test_int8_weights_are_smaller_and_mostly_agree(exported: Path, checkpoint: Path, tmp_path: Path, batch):
    quantized = export_onnx(checkpoint, tmp_path / "int8", weights="int8")
    weights = {folder: (folder / f"{DECODER_FILE}.data").stat().st_size for folder in (exported, quantized)}
    assert weights[quantized] < 0.6 * weights[exported]  # the embedding table (a Gather) stays fp32
    reference = OnnxValign(exported).generate(**batch, max_new_tokens=12)
    tokens = OnnxValign(quantized).generate(**batch, max_new_tokens=12)
    assert (tokens == reference).float().mean() >= 0.75  # prompt included; greedy paths may part after a flip
    assert json.loads((quantized / "onnx_export.json").read_text())["weights"] == "int8"


def test_bad_requests_get_clear_errors(exported: Path, checkpoint: Path, batch, tmp_path: Path, capsys):
    runtime = OnnxValign(exported)
    assert_bad_requests_refused(runtime.generate, batch)
    with pytest.raises(FileNotFoundError, match="not a valign ONNX export"):
        OnnxValign(checkpoint)
    with pytest.raises(ValueError, match="weights must be one of"):
        export_onnx(checkpoint, tmp_path / "x", weights="int2")
    assert cli.main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "cannot export" in capsys.readouterr().err


@pytest.fixture
def own_checkpoint(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the session checkpoint that a test may rewrite."""
    return Path(shutil.copytree(checkpoint, tmp_path / "checkpoint"))


def test_an_export_replaces_an_earlier_export_and_nothing_else(
    exported: Path, checkpoint: Path, own_checkpoint: Path, tmp_path: Path, capsys
):
    before = {path.name: path.read_bytes() for path in own_checkpoint.iterdir() if path.is_file()}
    assert cli.main(["export", str(checkpoint), str(own_checkpoint)]) == 2  # a checkpoint folder given by mistake
    assert "is not an ONNX export" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in own_checkpoint.iterdir() if path.is_file()} == before
    note = tmp_path / "notes.txt"
    note.write_text("mine")
    with pytest.raises(FileExistsError, match="is a file"):
        export_onnx(checkpoint, note)
    earlier = Path(shutil.copytree(exported, tmp_path / "earlier"))
    (earlier / "stale.onnx").write_text("from the earlier export")
    export_onnx(checkpoint, earlier)
    assert not (earlier / "stale.onnx").exists()
    assert sorted(path.name for path in earlier.iterdir()) == sorted(path.name for path in exported.iterdir())


def test_auto_runs_the_cached_export_once_there_is_one(own_checkpoint: Path, tmp_path: Path, capsys):
    image = tmp_path / "red.png"
    shape_image("red").save(image)
    assert choose_runtime("auto", own_checkpoint) == "torch"  # no export yet: exporting costs more than a caption
    answers = {}
    for runtime in ("torch", "onnx", "auto"):  # onnx given a checkpoint exports it into the cache on first use
        argv = ["caption", str(image), "--model", str(own_checkpoint), "--runtime", runtime, "--json"]
        assert cli.main(argv) == 0
        answers[runtime] = json.loads(capsys.readouterr().out)["text"]
    assert answers["onnx"] == answers["auto"] == answers["torch"]
    assert load_for_generation(own_checkpoint)[2] == "onnx"
    assert cli.main(["export", str(own_checkpoint), "--json"]) == 0  # already there: reported, not redone
    assert json.loads(capsys.readouterr().out)["folder"] == str(cached_export(own_checkpoint))
    weights = own_checkpoint / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # retrained, say
    assert choose_runtime("auto", own_checkpoint) == "torch"  # the old export no longer answers for it


def test_auto_takes_bf16_pytorch_where_the_cpu_computes_bf16(exported: Path, own_checkpoint: Path, monkeypatch):
    shutil.copytree(exported, cached_export(own_checkpoint))  # even with an export at hand
    assert choose_runtime("auto", own_checkpoint) == "onnx"
    monkeypatch.setattr("valign.export.runtime.native_bf16", lambda device="cpu": True)
    model, _, used = load_for_generation(own_checkpoint, generations=1)  # too few to pay for compiling
    assert used == "torch" and model.dtype == torch.bfloat16
    # Asked for fp32 (to match the export token for token), auto picks as on a CPU without native bf16.
    assert load_for_generation(own_checkpoint, precision="fp32")[2] == "onnx"
    model, _, used = load_for_generation(own_checkpoint, runtime="torch", precision="fp32")
    assert used == "torch" and model.dtype == torch.float32
    with pytest.raises(ValueError, match="ONNX runtime computes in fp32"):
        load_for_generation(own_checkpoint, runtime="onnx", precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        load_for_generation(own_checkpoint, precision="fp16")


def test_an_export_given_as_the_model_runs_on_onnxruntime_only(exported: Path):
    assert isinstance(load_for_generation(exported)[0], OnnxValign)
    with pytest.raises(ValueError, match="is an ONNX export"):
        load_for_generation(exported, runtime="torch")
    with pytest.raises(ValueError, match="runtime must be one of"):
        load_for_generation(exported, runtime="openvino")
