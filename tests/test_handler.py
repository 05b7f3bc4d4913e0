"""The endpoint handler every checkpoint carries (handler.py), and the image URLs, data URIs and base64 it passes to
the processor: the card's own widget examples answered as the pipeline answers them, on both transformers majors."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CURRENT_PYTHON, REPO, other_major_python, shape_image
from huggingface_hub import ModelCard
from image_server import image_server

import valign.processing_valign as processing
from valign.hub.card import EXAMPLE_IMAGE_URL, write_model_card
from valign.processing_valign import ImageError, load_image


def image_bytes(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    shape_image(color, (64, 48)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server() -> str:
    with image_server(image_bytes()) as url:
        yield url


def pixels(image) -> np.ndarray:
    return np.asarray(load_image(image))


# --- image sources: what the pipeline and the handler hand the processor ---------------------------------------


def test_a_url_a_data_uri_and_base64_read_as_the_same_image(server: str, tmp_path: Path) -> None:
    (tmp_path / "shape.png").write_bytes(image_bytes())
    encoded = base64.b64encode(image_bytes()).decode()
    reference = pixels(tmp_path / "shape.png")
    for source in (f"{server}/images/shape.png", f"data:image/png;base64,{encoded}", encoded):
        np.testing.assert_array_equal(pixels(source), reference)
    np.testing.assert_array_equal(pixels(str(tmp_path / "shape.png")), reference)  # a path string stays a path


def test_url_errors_name_the_url_and_the_reason(server: str, monkeypatch) -> None:
    with pytest.raises(ImageError, match=r"cannot fetch image http://127\.0\.0\.1:\d+/missing\.png: HTTP 404"):
        load_image(f"{server}/missing.png")
    monkeypatch.setattr(processing, "MAX_IMAGE_BYTES", 1000)
    load_image_of = f"{server}/bytes?n=1001"
    for url in (f"{load_image_of}&declare=1", load_image_of):  # refused from the header, and while reading
        with pytest.raises(ImageError, match=r"is larger than 1,000 bytes"):
            load_image(url)
    with pytest.raises(ImageError, match=r"cannot read image .*bytes\?n=1000"):  # within the limit: not an image
        load_image(f"{server}/bytes?n=1000")


def test_the_timeout_bounds_the_whole_transfer_not_each_read(server: str, monkeypatch) -> None:
    monkeypatch.setattr(processing, "URL_TIMEOUT_SECONDS", 1.0)
    start = time.monotonic()
    with pytest.raises(ImageError, match=r"within 1 s"):
        load_image(f"{server}/drip?seconds=20")  # a byte every 0.1 s: no single read times out
    assert time.monotonic() - start < 3


def test_a_closed_port_and_bad_inline_data_are_clear_errors(server: str) -> None:
    with pytest.raises(ImageError, match=r"cannot fetch image http://127\.0\.0\.1:9/x\.png"):
        load_image("http://127.0.0.1:9/x.png")  # the discard port: nothing listens
    with pytest.raises(ImageError, match=r"only base64 data URIs"):
        load_image("data:image/png,rawbytes")
    garbage = base64.b64encode(b"not an image" * 1000).decode()
    with pytest.raises(ImageError, match=r"cannot read image <base64 string of 16,000 characters>") as error:
        load_image(garbage)
    assert garbage not in str(error.value)  # the message names inline data by its length, not its 16 kB


# --- the handler ----------------------------------------------------------------------------------------------


def widget_examples(folder: Path) -> list[dict]:
    """The widget examples of the card valign writes into `folder`, read back from its README.md."""
    write_model_card(folder, repo_id="user/valign")
    return ModelCard.load(folder / "README.md").data.to_dict()["widget"]


def with_image(messages: list[dict], chunk: dict) -> list[dict]:
    """`messages` with their image chunk replaced by `chunk`."""
    return [{**m, "content": [chunk if c["type"] == "image_url" else c for c in m["content"]]} for m in messages]


def requests_for(examples: list[dict], server: str) -> dict[str, list]:
    local = EXAMPLE_IMAGE_URL.replace("https://huggingface.co", server)  # the same path, served here
    encoded = base64.b64encode(image_bytes()).decode()
    caption, question = (json.loads(json.dumps(e["messages"]).replace(EXAMPLE_IMAGE_URL, local)) for e in examples)
    forms = [
        {"type": "image", "url": f"data:image/png;base64,{encoded}"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}},
        {"type": "image", "base64": encoded},
    ]
    parameters = {"max_new_tokens": 6}
    good = [{"inputs": caption, "parameters": parameters}, {"inputs": question, "parameters": parameters}]
    good += [{"inputs": with_image(question, form), "parameters": parameters} for form in forms]
    good.append({"inputs": [caption, question], "parameters": {**parameters, "return_full_text": False}})
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    bad = [
        ({"parameters": parameters}, 'a JSON object with "inputs"'),
        ({"inputs": text_only}, "the conversation has no image chunk"),
        (
            {"inputs": with_image(question, {"type": "image_url", "image_url": {"url": f"{server}/missing.png"}})},
            "HTTP 404",
        ),
        (
            {"inputs": with_image(question, {"type": "image", "base64": base64.b64encode(b"junk!!").decode()})},
            "cannot read image",
        ),
        ({"inputs": with_image(question, {"type": "image", "url": "/etc/hosts"})}, "must be an http(s) URL"),
        ({"inputs": with_image(question, {"type": "image", "path": "/etc/hosts"})}, "needs exactly one of"),
        ({"inputs": question, "parameters": {"max_new_tokens": 6, "stream": True}}, "unknown parameters ['stream']"),
        ({"inputs": question, "parameters": {"max_new_tokens": "6"}}, "max_new_tokens must be int"),
        ({"inputs": question, "parameters": {"max_new_tokens": 5000}}, "between 1 and 1024"),
        ({"inputs": [{"role": "robot", "content": "hi"}]}, "a role among"),
    ]
    return {"good": good, "bad": [request for request, _ in bad], "expected": [message for _, message in bad]}


def reply(answer: list) -> str:
    """The assistant's text in a pipeline answer for one conversation (full chat or the new text alone)."""
    generated = answer[0]["generated_text"]
    return generated if isinstance(generated, str) else generated[-1]["content"]


def test_the_handler_answers_the_cards_widget_examples_as_the_pipeline_on_both_majors(
    checkpoint: Path, server: str, tmp_path: Path
) -> None:
    folder = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, folder)
    assert (folder / "handler.py").read_bytes() == (REPO / "handler.py").read_bytes()  # save_checkpoint put it there
    requests = requests_for(widget_examples(folder), server)
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    script = REPO / "tests" / "scripts" / "endpoint.py"
    processes = {}
    for name, python in (("transformers 5", CURRENT_PYTHON), ("transformers 4.57", other_major_python())):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["HF_MODULES_CACHE"] = str(tmp_path / f"modules-{len(processes)}")
        command = [str(python), str(script), str(folder), str(tmp_path / "requests.json")]
        processes[name] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name}:\n{stderr.decode()[-4000:]}"
        results = json.loads(stdout)
        assert results["handler"] == results["pipeline"], name
        url, *inline, batch = results["handler"][1:]
        assert [reply(answer) for answer in inline] == [reply(url)] * 3, name  # same image, same answer
        assert [answer[0]["generated_text"] for answer in batch] == [reply(results["handler"][0]), reply(url)], name
        for error, expected in zip(results["errors"], requests["expected"], strict=True):
            assert error is not None and error[:2] == ["RequestError", True] and expected in error[2], (name, error)
        assert results["after_errors"] == results["handler"][0], name  # the handler kept serving
        assert results["threads"] == results["handler"] * 2, name  # one shared model, the same answers


def handler_module():
    """handler.py imported from its file, as Inference Endpoints import it (no package around it)."""
    spec = importlib.util.spec_from_file_location("endpoint_handler", REPO / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("parameters", "refusal"),
    [
        ({"temperature": 1, "top_p": 0.9, "do_sample": True, "return_full_text": False}, None),  # 1 is a JSON float
        ({"do_sample": 1}, "do_sample must be bool"),
        ({"max_new_tokens": True}, "max_new_tokens must be int"),  # a bool is no count, though Python says int
        ({"top_k": 2.5}, "top_k must be int"),
        ({"max_new_tokens": 0}, "between 1 and 1024"),
        ([1, 2], '"parameters" must be an object'),
    ],
)
def test_request_parameters_are_checked_with_jsons_types(parameters, refusal: str | None) -> None:
    module = handler_module()
    chunks = [{"type": "image", "url": "http://x/a.png"}, {"type": "text", "text": "?"}]
    messages = [{"role": "user", "content": chunks}]
    request = {"inputs": messages, "parameters": parameters}
    if refusal is None:
        assert module.parse_request(request) == (messages, parameters)
    else:
        with pytest.raises(module.RequestError, match=re.escape(refusal)):
            module.parse_request(request)
