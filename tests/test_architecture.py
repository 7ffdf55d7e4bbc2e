"""The layering and size rules of docs/ARCHITECTURE.md, checked on the source tree.

* A module may import only from its own layer or the layers below it (table ``LAYERS``).
* The library (everything below the application layer) never imports matplotlib at module level.
* No source file over 600 lines, no function over 80 lines, ``experiments/`` under 3,000 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sgdnoise"

#: layer number of each top-level part of the package (a module or a sub-package).
LAYERS: dict[str, int] = {
    "_utils": 0,
    "_stats": 0,
    "results": 0,
    "_check_results": 0,
    "_data": 0,
    "data": 0,
    "models": 0,
    "_per_sample": 1,
    "problem": 1,
    "_finite_differences": 1,
    "linalg": 2,
    "noise": 3,
    "measures": 4,
    "noise_scale": 4,
    "blocks": 4,
    "diagnostics": 4,
    "optim": 4,
    "engine": 4,
    "_engine_plan": 4,
    "_optim_params": 4,
    "_measure_context": 4,
    "sharpness": 4,
    "monitor": 5,
    "measure_cli": 6,
    "runs": 5,
    "phases": 5,
    "config": 5,
    "_user_code": 5,
    "figures": 6,
    "experiments": 6,
    "report": 7,
    "commands": 7,
    "cli": 8,
    "__init__": 5,
    "__main__": 8,
}
APPLICATION = 6  # layers from here on are the applications (CLI, experiments, figures, report)


def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def _imported_parts(path: Path) -> list[tuple[int, str, bool]]:
    """(line, top-level part of sgdnoise imported, at module level?) for every internal import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = list(path.relative_to(SRC).parts[:-1])
    module_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not target:  # `from . import x` at the package root
                    target = [a.name for a in node.names][:1]
            elif node.module and node.module.split(".")[0] == "sgdnoise":
                target = node.module.split(".")[1:] or [a.name for a in node.names][:1]
            else:
                continue
            if target:
                found.append((node.lineno, target[0], id(node) in module_level))
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "sgdnoise" and len(parts) > 1:
                    found.append((node.lineno, parts[1], id(node) in module_level))
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_layers(path: Path) -> None:
    part = _part(path)
    assert part in LAYERS, (
        f"{path.relative_to(SRC)}: add its part {part!r} to LAYERS and to docs/ARCHITECTURE.md"
    )
    mine = LAYERS[part]
    for line, target, _ in _imported_parts(path):
        if target == part or target not in LAYERS:
            continue
        assert LAYERS[target] <= mine or part == "__init__", (
            f"{path.relative_to(SRC)}:{line} imports sgdnoise.{target} (layer {LAYERS[target]}) "
            f"from layer {mine}; see docs/ARCHITECTURE.md"
        )


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_library_does_not_import_matplotlib_at_import_time(path: Path) -> None:
    if LAYERS.get(_part(path), 0) >= APPLICATION:
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        assert not any(n.split(".")[0] == "matplotlib" for n in names), (
            f"{path.relative_to(SRC)}:{node.lineno} imports matplotlib at module level; "
            "import it inside the plotting function (it is the optional extra sgdnoise[plot])"
        )


def test_sizes() -> None:
    long_files, long_functions = [], []
    experiments = 0
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        n = text.count("\n")
        if _part(path) == "experiments":
            experiments += n
        if n > 600:
            long_files.append(f"{path.relative_to(SRC)} ({n} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 80:
                    long_functions.append(
                        f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length})"
                    )
    assert not long_files, f"files over 600 lines: {long_files}"
    assert not long_functions, f"functions over 80 lines: {long_functions}"
    assert experiments < 3000, f"experiments/ has {experiments} lines (limit 3,000)"
