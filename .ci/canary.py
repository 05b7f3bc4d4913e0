"""Canary: valign's model-package tests on transformers releases outside the lock, in fresh environments.

    .venv/bin/python .ci/canary.py      (from .ci/run, after the README's test command; needs .venv-tf4)

Each environment is a new virtual environment with `TORCH_SPEC -e . pytest TRANSFORMERS` installed without the
constraints files, so transformers, huggingface_hub and tokenizers resolve as a fresh install of valign does today:
  - newest      `transformers` unpinned: the newest release setup.cfg's range admits;
  - pre-release the newest pre-release (`--pre`), only when it is newer than the newest release;
  - 5.23.0      a release we promise to support.
A newer release or pre-release outside setup.cfg's range is reported on a `canary: note:` line and not tested
(a fresh install of valign cannot get it). Any install or test failure fails the canary; its last lines name
the transformers version and the first failing check of every failed environment.
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
]
SUPPORTED = ["5.23.0"]  # releases we promise to support besides the locked ones (constraints/)
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
PYTHON = os.environ.get("PYTHON", "python3")
TF4_PYTHON = Path(os.environ.get("VALIGN_TF4_PYTHON", REPO / ".venv-tf4" / "bin" / "python")).absolute()


def say(line: str) -> None:
    print(line, flush=True)


def transformers_range():
    """The transformers specifier in setup.cfg's install_requires."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    for line in cfg["options"]["install_requires"].splitlines():
        if line.strip() and (req := Requirement(line.strip())).name == "transformers":
            return req.specifier
    raise SystemExit("canary: setup.cfg's install_requires names no transformers")


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


def run_env(name: str, expected: str, spec: str, pip_args: list[str], tests: list[str]) -> tuple[str, str | None]:
    """Install one environment and run the tests; return (summary line, failure line or None).

    `expected` names the transformers version the environment is meant to get (for the install-failure line).
    """
    venv = REPO / f".venv-canary-{name}-{expected}"
    shutil.rmtree(venv, ignore_errors=True)
    python = venv / "bin" / "python"
    start = time.monotonic()
    say(f"\n=== canary [{name}]: {TORCH_SPEC} -e . pytest {spec} {' '.join(pip_args)}".rstrip())
    steps = [
        [PYTHON, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", "--quiet", *pip_args, TORCH_SPEC, "-e", ".", "pytest", spec],
    ]
    for step in steps:
        done = subprocess.run(step, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            say(done.stdout + done.stderr)
            error = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or ["(no error line)"]
            return "", f"canary: transformers {expected} ({name}) fails to install: {error[0]}"
    probe = "import huggingface_hub, tokenizers, transformers as t; print(t.__version__, huggingface_hub.__version__)"
    version, hub = subprocess.run([str(python), "-c", probe], capture_output=True, text=True).stdout.split()
    say(f"installed: transformers {version}, huggingface_hub {hub} ({time.monotonic() - start:.0f} s)")
    if version != expected and expected[0].isdigit():
        say(f"canary: note: the {name} environment got transformers {version}, not {expected}")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VALIGN_TF4_PYTHON": str(TF4_PYTHON)}
    junit = venv / "junit.xml"
    cmd = [str(python), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # shown as it runs, kept for the summary
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    code = proc.wait()
    counts = junit_counts(junit)
    minutes = f"{(time.monotonic() - start) / 60:.1f} min"
    label = f"transformers {version} ({name}, huggingface_hub {hub})"
    if code == 0:
        return f"canary: {label}: {counts}, {minutes}", None
    # -ra's short summary: "FAILED tests/x.py::test_y - AssertionError ..." / "ERROR tests/x.py - ImportError ..."
    failed = [m.group(1) for line in lines if (m := re.match(r"(?:FAILED|ERROR) (\S+)", line))]
    first = failed[0] if failed else f"pytest (exit status {code}: {lines[-1] if lines else 'no output'})"
    return f"canary: {label}: {counts}, {minutes}", f"canary: transformers {version} ({name}) fails {first}"


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
    tests = [t for t in MODEL_TESTS if (REPO / t).exists()]
    if not tests:
        say(f"canary: none of the model-package tests exist ({', '.join(MODEL_TESTS)})")
        return 1
    missing = sorted(set(MODEL_TESTS) - set(tests))
    if missing:
        say(f"canary: note: not present, not run: {', '.join(missing)}")
    if not TF4_PYTHON.exists():
        say(f"canary: {TF4_PYTHON} (transformers 4.57, for the cross-version tests) is missing: run setup.sh first")
        return 1

    allowed = transformers_range()
    summaries, failures, notes = [], [], []
    envs = []
    try:
        versions = registry_versions()
        release = max(v for v in versions if not v.is_prerelease)
        newest = max(v for v in versions if not v.is_prerelease and v in allowed)  # what a fresh install gets
        envs.append(("newest", str(newest), "transformers", []))
        pre = max((v for v in versions if v.is_prerelease), default=None)
        untested = [] if release in allowed else [release]
        if pre is not None and pre > release:
            if allowed.contains(pre, prereleases=True):
                envs.append(("pre-release", str(pre), f"transformers=={pre}", ["--pre"]))
            else:
                untested.append(pre)
        for version in untested:
            notes.append(f"canary: note: transformers {version} is out; setup.cfg admits {allowed}: not tested")
    except (RuntimeError, ValueError, KeyError, json.JSONDecodeError) as error:
        failures.append(f"canary: cannot list transformers releases: {error}")
        envs.append(("newest", "newest", "transformers", []))
    tested = {expected for _, expected, _, _ in envs}
    envs += [("supported", v, f"transformers=={v}", []) for v in SUPPORTED if v not in tested]

    for name, expected, spec, pip_args in envs:
        summary, failure = run_env(name, expected, spec, pip_args, tests)
        summaries += [summary] if summary else []
        failures += [failure] if failure else []
    say("")
    for line in [*notes, *summaries, *failures]:
        say(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
