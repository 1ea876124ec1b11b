"""Layers depend one way: core -> {datasets, models, optimizers} (peers) -> suite ->
{analyze, bench, run.py}. Imports sit at the top of files; an import inside a function needs a
``# lazy: <reason>`` comment (optional heavy dependencies)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Layer of each first-party top-level package (or script); a package may import its own layer's
# *same* package and anything in a lower layer, never a peer or a higher layer.
LAYERS: dict[str, int] = {
    "core": 0,
    "datasets": 1,
    "models": 1,
    "optimizers": 1,
    "suite": 2,
    "analyze": 3,
    "bench": 3,
    "run": 3,
}
PACKAGES = [name for name in LAYERS if name != "run"]
SOURCES = sorted([p for name in PACKAGES for p in (ROOT / name).rglob("*.py")] + [ROOT / "run.py"])
LAZY_MARK = "# lazy:"


def owner(path: Path) -> str:
    """The package (or script) a source file belongs to."""
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Top-level names of the modules an import statement reads (absolute imports)."""
    if isinstance(node, ast.ImportFrom):
        return [] if node.level or node.module is None else [node.module.split(".")[0]]
    return [alias.name.split(".")[0] for alias in node.names]


def imports(path: Path) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a file, with whether it sits inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nested = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for sub in ast.walk(node)
    }
    return [
        (node, id(node) in nested)
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]


def violations(path: Path, *, package: str | None = None) -> list[str]:
    """What a file imports against the layer order, and unjustified in-function imports."""
    me = package or owner(path)
    lines = path.read_text().splitlines()
    out = []
    for node, in_function in imports(path):
        for name in imported(node):
            if name in LAYERS and name != me and LAYERS[name] >= LAYERS[me]:
                out.append(f"{path.name}:{node.lineno}: {me} imports {name}")
        statement = "\n".join(lines[node.lineno - 1 : (node.end_lineno or node.lineno)])
        if in_function and LAZY_MARK not in statement:
            out.append(f"{path.name}:{node.lineno}: import inside a function")
    return out


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_layers_and_sit_at_the_top(path: Path) -> None:
    assert violations(path) == []


def test_the_checker_catches_upward_peer_and_hidden_imports(tmp_path: Path) -> None:
    """The rule fails where it should (a file that breaks it three ways)."""
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import suite.train\nfrom models import build_model\n\n\ndef f():\n    import torch\n"
    )
    found = violations(bad, package="optimizers")
    assert [v.split(": ", 1)[1] for v in found] == [
        "optimizers imports suite",
        "optimizers imports models",
        "import inside a function",
    ]


def test_architecture_page_lists_every_module() -> None:
    """docs/architecture.md names every package and module (kept current with the code)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        str(p.relative_to(ROOT))
        for p in SOURCES
        if p.name not in ("__init__.py", "__main__.py") and p.name not in text
    ]
    assert not missing
    assert all(f"{name}/" in text for name in PACKAGES)
