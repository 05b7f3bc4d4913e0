"""The Gradio app (app.py), end to end: a real server, driven in headless Chromium through Selenium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, direct_answer, shape_image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from valign.checkpoint import load_checkpoint
from valign.eval.generate import DecodingSettings

QUESTION = "What colour is the shape?"
# The user texts the app must send, written out (not taken from valign.data.prompts).
QUESTION_TEXT = "What colour is the shape? Answer the question using a single word or phrase."
CAPTION_TEXT = "Describe the image in detail."
MAX_NEW_TOKENS = 12
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,800",
    # Every host name but the app's fails to resolve: the page must work with nothing from the internet.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def wait_until_serving(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the app exited with status {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2):
                    return
            except OSError:
                time.sleep(0.25)
        pytest.fail(f"the app did not answer at {self.url} within {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")


@pytest.fixture
def app(checkpoint: Path, tmp_path: Path) -> Iterator[Server]:
    """app.py serving the tiny checkpoint on a free loopback port, stopped after the test. It is not waited for
    here: the browser starts while the app imports its libraries (most of its start-up time)."""
    port = free_port()
    log = tmp_path / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "GRADIO_ANALYTICS_ENABLED": "False"}
    env["VALIGN_CACHE"] = str(tmp_path / "cache")  # no cached export of the user's can answer for it
    arguments = ["--model", str(checkpoint), "--host", "127.0.0.1", "--port", str(port)]
    arguments += ["--max-new-tokens", str(MAX_NEW_TOKENS)]
    # app.py as `python app.py` runs it, with the runtime choice kept to fp32 on every CPU, as in this process.
    start = (
        "import runpy, sys\nimport valign.export.runtime as runtime\n"
        "runtime.native_bf16 = lambda device='cpu': False\n"
        f"sys.argv = [{str(REPO / 'app.py')!r}, *sys.argv[1:]]\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    )
    command = [sys.executable, "-c", start, *arguments]
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield Server(f"http://127.0.0.1:{port}/", process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("headless Chromium is missing: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager (which downloads drivers) is never started.
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    chrome.set_page_load_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()


def test_asking_about_an_uploaded_image_shows_the_models_answer(
    app: Server, browser: webdriver.Chrome, model_and_processor, tmp_path: Path
) -> None:
    image = tmp_path / "red.png"
    shape_image("red").save(image)
    expected = direct_answer(*model_and_processor, shape_image("red"), QUESTION_TEXT, MAX_NEW_TOKENS)
    assert expected  # an empty answer could not be told from no answer

    app.wait_until_serving()
    browser.get(app.url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#image input[type=file]")).send_keys(str(image))
    wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#image img"))  # the upload has landed
    browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    answer = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#answer textarea").get_property("value"))

    # A textarea's value normalises line breaks to "\n"; nothing else may differ.
    assert answer == expected.replace("\r\n", "\n").replace("\r", "\n")
    assert browser.title == "valign"


def test_without_a_model_the_app_builds_a_tiny_checkpoint_offline_once(monkeypatch, tmp_path: Path) -> None:
    from valign import app as app_module  # app.py: the repository root is the valign package
    from valign import cli

    monkeypatch.setattr(cli, "DEMO_CHECKPOINT", Path("no-such-folder") / "stage-3")
    monkeypatch.delenv("VALIGN_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = app_module.resolve_model(None)
    assert Path(folder).resolve() == (tmp_path / app_module.TINY_CHECKPOINT).resolve()
    model, processor = load_checkpoint(folder)
    vision, text = model.config.vision_config, model.config.text_config
    # build_tiny_backbones' defaults: 32-px images in 8-px patches, 32-wide vision, 64-wide 2-layer LM.
    assert (model.config.image_size, vision.patch_size, model.config.image_seq_length) == (32, 8, 16)
    assert (vision.hidden_size, text.hidden_size, text.num_hidden_layers) == (32, 64, 2)
    image = tmp_path / "red.png"
    shape_image("red").save(image)
    caption = app_module.answer(model, processor, DecodingSettings(max_new_tokens=4), str(image), "  ")
    assert caption == direct_answer(model, processor, shape_image("red"), CAPTION_TEXT, 4) and caption
    stamp = (Path(folder) / "model.safetensors").stat().st_mtime_ns
    assert app_module.resolve_model(None) == folder
    assert (Path(folder) / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
