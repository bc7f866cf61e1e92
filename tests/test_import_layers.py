"""Data flows one way: every module of learned_opt imports only modules of its own layer or below
(imports inside functions included), so that a low-level module never depends on a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "learned_opt"

#: The top-level modules and packages of learned_opt, lowest layer first.
LAYERS: list[set[str]] = [
    # no import of the library: files, kernels, datasets, corpus, shipped weights, processes
    {"files", "preprocess", "kernels", "pretrained", "corpus", "distributed", "data"},
    {"tasks", "rules"},
    {"checkpoint", "learners"},
    {"optim"},
    {"lstm_optimizer"},
    # evaluation against tuned baselines, its task suites, records; the higher interop
    {"evaluate", "ood", "report", "higher_interop"},
    # the outer loop
    {"outer"},
    {"cli", "__main__", "__init__"},
]


def _layer(component: str) -> int:
    for i, names in enumerate(LAYERS):
        if component in names:
            return i
    raise AssertionError(f"learned_opt.{component} is in no layer of {__file__}: add it to one")


def _imported_components(path: Path) -> set[str]:
    """The top-level learned_opt modules that the file at ``path`` imports."""
    parts = ["learned_opt", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = parts if parts[-1] == "__init__" else parts[:-1]
    if package[-1] == "__init__":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[list[str]] = []
        if isinstance(node, ast.Import):
            targets = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            targets = [module] if node.module else [module + [a.name] for a in node.names]
        for target in targets:
            if target[0] == "learned_opt" and len(target) > 1:
                found.add(target[1])
    return found


def test_every_module_imports_only_its_layer_or_below() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).parts
        own = Path(rel[0]).stem
        for component in _imported_components(path) - {own}:
            if _layer(component) > _layer(own):
                wrong.append(f"{'/'.join(rel)} imports learned_opt.{component}")
    assert not wrong, wrong


def test_low_level_modules_import_nothing_above_them() -> None:
    data = _imported_components(PACKAGE / "data.py")
    assert "checkpoint" not in data and data <= {"files"}
    assert _imported_components(PACKAGE / "files.py") == set()
