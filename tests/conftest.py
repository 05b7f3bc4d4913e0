"""Shared fixtures: tiny random backbones and valign checkpoints, built offline once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from scripts.crossload import chat, shape_image  # noqa: F401  (re-exported for the tests)
from transformers import TrainerCallback

import valign
from valign.checkpoint import save_checkpoint
from valign.train.backbones import build_tiny_backbones

REPO = Path(__file__).resolve().parent.parent
IS_V5 = int(transformers.__version__.split(".")[0]) >= 5
# The other transformers major's Python (setup.sh: .venv-tf4 has 4.57, .venv the locked 5.x).
OTHER_MAJOR_PYTHON = Path(
    os.environ.get("VALIGN_OTHER_MAJOR_PYTHON", REPO / (".venv-tf4" if IS_V5 else ".venv") / "bin" / "python")
)


@pytest.fixture(autouse=True)
def own_cache_and_fp32(monkeypatch, tmp_path_factory) -> None:
    """Every test gets its own cache of ONNX exports (never the user's), and the runtime choice never takes bf16 (its
    pick on AMX / AVX512-BF16 CPUs), so comparisons with fp32 hold on every machine kind; the bf16 branch is tested
    on its own (test_runtime.py). Converted backbones stay in the shared cache: converting takes a minute."""
    exports = tmp_path_factory.mktemp("onnx-cache")
    real = valign.checkpoint.valign_cache
    monkeypatch.setattr("valign.export.runtime.valign_cache", lambda kind: exports if kind == "onnx" else real(kind))
    monkeypatch.setattr("valign.export.runtime.native_bf16", lambda device="cpu": False)


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_backbones(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="session")
def model_and_processor(backbones):
    torch.manual_seed(0)
    model, processor = valign.from_backbones(*map(str, backbones))
    return model.eval(), processor


@pytest.fixture(scope="session")
def checkpoint(model_and_processor, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint")
    return save_checkpoint(*model_and_processor, folder)


@torch.no_grad()
def direct_answer(model, processor, image, text: str, max_new_tokens: int) -> str:
    """The model's greedy reply to the literal user text `text` about `image`, as an oracle for the commands: the
    ChatML prompt is spelled out here, and neither valign's prompt helpers nor its batching are used."""
    prompt = f"<|im_start|>user\n{processor.image_token}{text}<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(images=[image], text=[prompt])
    tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def prompts(processor, questions: list[str]) -> list[str]:
    return [processor.apply_chat_template(chat(q), add_generation_prompt=True) for q in questions]


def assert_bad_requests_refused(generate, batch: dict) -> None:
    """What a runtime of traced graphs (compiled, ONNX) must refuse with eager's errors, given a batch of two prompts
    with an image each: settings it cannot decode, and what its graphs cannot check (non-finite pixels; a number of
    image tokens that does not match the images)."""
    for settings in ({"do_sample": True}, {"num_beams": 2}):
        with pytest.raises(ValueError, match="greedily only"):
            generate(**batch, **settings)
    with pytest.raises(ValueError, match="bidirectional"):
        generate(**batch, attn_mode="bidirectional")
    broken = {**batch, "pixel_values": batch["pixel_values"].clone()}
    broken["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        generate(**broken)
    one_image = {**batch, "pixel_values": batch["pixel_values"][:1]}
    with pytest.raises(ValueError, match=r"1 image\(s\) need 16 image tokens .* but input_ids hold 32"):
        generate(**one_image)


def other_major_python() -> Path:
    if not OTHER_MAJOR_PYTHON.exists():
        pytest.fail(
            f"the other transformers major's environment is missing at {OTHER_MAJOR_PYTHON}: run `bash setup.sh` "
            "(or set VALIGN_OTHER_MAJOR_PYTHON to a Python with that major and valign installed)"
        )
    return OTHER_MAJOR_PYTHON


def run_script(python: Path | str, *args: str) -> str:
    """Run tests/scripts/crossload.py in a fresh process; return its stdout, failing with its stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [str(python), str(REPO / "tests" / "scripts" / "crossload.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"{python} crossload.py {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result.stdout


CURRENT_PYTHON = sys.executable


class RepositoryRootIsNoTestPackage:
    """The repository root is the valign package (it has an `__init__.py`), so pytest would collect it as a test
    package and import that file under the clone folder's name, which fails when the name is no Python identifier
    (a clone in "valign-ci"). The tests use the installed valign instead. Registered as a plugin, not a conftest
    hook: a conftest's hooks never see its own parent folder."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector) -> pytest.Dir | None:
        return pytest.Dir.from_parent(parent, path=path) if path == REPO else None


class Kill(TrainerCallback):
    """Raises like a kill at `step`: after the step (`on_step_end`) or after the Trainer saved its checkpoint
    but before the later callbacks wrote theirs (`on_save`, when it goes first)."""

    def __init__(self, event: str, step: int) -> None:
        self.event, self.step = event, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.event == "step" and state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")

    def on_save(self, args, state, control, **kwargs):
        if self.event == "save" and state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill while saving")


def killed_run(monkeypatch, config, init: Path, folder: Path, data_root: Path, kill: Kill) -> None:
    """`run_stage` killed by `kill`: it raises out, and no final model is saved."""
    import valign.train.run as run_module

    original = run_module.ValignTrainer

    class KilledTrainer(original):
        def __init__(self, *args, callbacks=(), **kwargs):
            super().__init__(*args, callbacks=[kill, *callbacks], **kwargs)

    monkeypatch.setattr(run_module, "ValignTrainer", KilledTrainer)
    with pytest.raises(KeyboardInterrupt):
        run_module.run_stage(config, init, folder, data_root)
    monkeypatch.setattr(run_module, "ValignTrainer", original)
    assert not (folder / "model.safetensors").exists()


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(RepositoryRootIsNoTestPackage())
