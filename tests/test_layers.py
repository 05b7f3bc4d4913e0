"""The package's layers: which folder may import which (docs/DESIGN.md, "Package layout"), read from the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from transformers.dynamic_module_utils import get_imports, get_relative_imports

MODEL_FILES = ("configuration_valign", "modeling_valign", "processing_valign")
# Layer -> the layers it may import (itself always). The remote-code model files import only each other; `data`
# only the model files (images are decoded by the processor's `load_image`, the bottom layer); the package root
# exports the model and `from_backbones` (train.assembly); cli and app sit on top.
ALLOWED = {
    "model": set(),
    "handler": set(),  # served beside the remote code, loaded by file path: it can import no valign module
    "checkpoint": {"model"},
    "data": {"model"},
    "eval": {"data", "checkpoint", "export", "model"},  # the lmms-eval plugin loads through the runtime choice
    "export": {"checkpoint", "model"},  # ONNX graphs and their runner: used by the command, uses no evaluation
    "hub": {"data"},
    "train": {"eval", "hub", "data", "checkpoint", "model"},
    "root": {"model", "train"},
    "cli": {"root", "model", "checkpoint", "data", "eval", "export", "hub", "train"},
    "app": {"root", "model", "checkpoint", "data", "eval", "export", "hub", "train", "cli"},
}
NOT_PACKAGE = {"tests", "bench", "scripts", "docs", "outputs", "build", "dist", "constraints"}


def layer(module: str) -> str:
    """The layer of a module given by its dotted name inside valign ("" for the package itself)."""
    head = module.split(".")[0] if module else ""
    if head in MODEL_FILES:
        return "model"
    return {"": "root", "__init__": "root"}.get(head, head)


def package_modules() -> dict[str, Path]:
    """Dotted names (inside valign) of every module of the package, from the repository root (the package)."""
    modules = {}
    # Only the package's own entries are walked: the virtual environments beside them hold tens of thousands of files.
    tops = [p for p in REPO.iterdir() if p.name not in NOT_PACKAGE and not p.name.startswith(".")]
    for path in sorted(f for top in tops for f in ([top] if top.is_file() else top.rglob("*")) if f.suffix == ".py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(p for p in parts if p != "__init__")] = path
    return modules


def imports_of(name: str, path: Path) -> set[str]:
    """The valign modules `path` imports (anywhere in the file, lazy imports included), as dotted names."""
    package = list(path.relative_to(REPO).parent.parts)  # what `from .` means in this file
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("valign").lstrip(".") for a in node.names if a.name.split(".")[0] == "valign"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.split(".")[0] == "valign":
                target = node.module.removeprefix("valign").lstrip(".")
            else:
                continue
            # `from .data import prompts` names a module; `from .x import Class` names x.
            found |= {f"{target}.{a.name}" if target else a.name for a in node.names} | {target}
    modules = package_modules()
    return {module for module in found if module in modules}


def test_every_import_goes_to_an_allowed_layer():
    modules = package_modules()
    assert {"modeling_valign", "checkpoint", "data.prompts", "eval.vqa", "hub.push", "train.run", "cli"} <= set(modules)
    wrong = [
        f"{name} ({layer(name)}) imports {target} ({layer(target)})"
        for name, path in modules.items()
        for target in sorted(imports_of(name, path))
        if layer(target) != layer(name) and layer(target) not in ALLOWED[layer(name)]
    ]
    assert wrong == []


def test_the_module_import_graph_has_no_cycle():
    modules = package_modules()
    graph = {name: imports_of(name, path) - {name} for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> list[str] | None:
        state[name] = "open"
        for target in sorted(graph[name]):
            # A package's __init__ runs before its modules: importing a parent package is no cycle.
            if name.startswith(f"{target}.") or target == "":
                continue
            if state.get(target) == "open":
                return [*trail, name, target]
            if target not in state and (cycle := visit(target, [*trail, name])):
                return cycle
        state[name] = "done"
        return None

    cycles = [cycle for name in sorted(graph) if name not in state and (cycle := visit(name, []))]
    assert cycles == []


def third_party_imports(path: Path) -> set[str]:
    """What transformers checks before running a Hub checkpoint's code: the modules it must find installed."""
    return set(get_imports(str(path))) - set(sys.stdlib_module_names)


def test_the_remote_code_needs_only_torch_and_transformers():
    assert third_party_imports(REPO / "modeling_valign.py") == {"torch", "transformers"}
    assert get_relative_imports(str(REPO / "modeling_valign.py")) == ["configuration_valign"]
    assert third_party_imports(REPO / "configuration_valign.py") <= {"torch", "transformers"}
    # The processor also needs what transformers itself installs for images (numpy, Pillow).
    assert third_party_imports(REPO / "processing_valign.py") <= {"torch", "transformers", "numpy", "PIL"}
    # The endpoint handler runs where only the checkpoint's files are: no valign module, nothing else to install.
    assert third_party_imports(REPO / "handler.py") == {"torch", "transformers"}
    assert get_relative_imports(str(REPO / "handler.py")) == []


def test_the_command_line_does_not_import_datasets():
    code = "import sys, valign, valign.cli; print(sorted({'datasets', 'peft', 'trl'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"
