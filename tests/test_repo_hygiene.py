"""What git tracks: no virtual environment, no link out of the clone, no big file outside results.

A fresh clone must work on a machine that never saw the project, so the index may not hold
anything tied to the machine it was committed from. Skipped outside a git checkout (an sdist,
an unpacked archive). Also: the fast tests (`make test`) import every shipped package.
"""

from __future__ import annotations

import ast
import posixpath
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parent.parent
# Committed result folders may hold larger files (Parquet metrics); everything else stays small.
BIG_FILE_BYTES = 5 * 1024 * 1024
BIG_FILES_ALLOWED_UNDER = PurePosixPath("results/reference")
SYMLINK_MODE = "120000"
GITLINK_MODE = "160000"
# Files that exist only inside a Python virtual environment.
VENV_MARKERS = ("pyvenv.cfg", "bin/activate", "Scripts/activate.bat")


@dataclass(frozen=True)
class Entry:
    mode: str
    blob: str
    path: PurePosixPath


def _git(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout


def _blob_sizes(entries: list[Entry]) -> dict[str, int]:
    """Size in bytes of each staged blob (what a clone gets), in one git call."""
    blobs = sorted({e.blob for e in entries})
    answer = _git("cat-file", "--batch-check=%(objectname) %(objectsize)", stdin="\n".join(blobs))
    return {name: int(size) for name, size in (line.split() for line in answer.splitlines())}


def _tracked() -> list[Entry]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    probe = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--show-toplevel"], capture_output=True, text=True
    )
    if probe.returncode != 0 or Path(probe.stdout.strip()).resolve() != REPO:
        pytest.skip("not a git checkout of this project")
    entries = []
    for line in _git("ls-files", "-s", "-z").split("\0"):
        if not line:
            continue
        meta, path = line.split("\t", 1)
        mode, blob, _stage = meta.split()
        entries.append(Entry(mode=mode, blob=blob, path=PurePosixPath(path)))
    assert entries, "git ls-files listed nothing"
    return entries


def _is_venv_path(path: PurePosixPath) -> bool:
    text = path.as_posix()
    if "site-packages" in path.parts or "dist-packages" in path.parts:
        return True
    return any(text == m or text.endswith("/" + m) for m in VENV_MARKERS)


def _link_escapes(link: PurePosixPath, target: str) -> bool:
    """True when the link's target is absolute or resolves above the repository root."""
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        return True
    joined = posixpath.normpath(posixpath.join(link.parent.as_posix(), target))
    return joined == ".." or joined.startswith("../")


def test_no_virtual_environment_is_tracked() -> None:
    offenders = [e.path.as_posix() for e in _tracked() if _is_venv_path(e.path)]
    assert not offenders, f"git tracks a virtual environment: {offenders[:5]}"


def test_no_symlink_points_outside_the_repository() -> None:
    links = [e for e in _tracked() if e.mode == SYMLINK_MODE]
    if not links:
        return
    offenders = []
    for e in links:
        target = _git("cat-file", "blob", e.blob)  # a link's blob is its target path
        if _link_escapes(e.path, target):
            offenders.append(f"{e.path} -> {target}")
    assert not offenders, f"git tracks symbolic links that leave the clone: {offenders[:5]}"


def test_no_large_file_outside_committed_results() -> None:
    files = [
        e
        for e in _tracked()
        if e.mode not in (SYMLINK_MODE, GITLINK_MODE)
        and not e.path.is_relative_to(BIG_FILES_ALLOWED_UNDER)
    ]
    sizes = _blob_sizes(files)
    offenders = []
    for e in files:
        size = sizes[e.blob]
        if size > BIG_FILE_BYTES:
            offenders.append(f"{e.path} ({size / 2**20:.1f} MiB)")
    assert not offenders, (
        f"files over {BIG_FILE_BYTES // 2**20} MiB tracked outside {BIG_FILES_ALLOWED_UNDER}/: "
        f"{offenders[:5]}"
    )


@pytest.mark.parametrize(
    ("link", "target", "escapes"),
    [
        (".venv", "/root/.cache/venv-abc", True),
        ("a/b", "../../outside", True),
        ("a/b", "../inside", False),
        ("a/b", "c/d", False),
        ("link", "..", True),
        ("x", "C:/Users/venv", True),
    ],
)
def test_link_escape_rule(link: str, target: str, escapes: bool) -> None:
    assert _link_escapes(PurePosixPath(link), target) is escapes


@pytest.mark.parametrize(
    ("path", "is_venv"),
    [
        (".venv/pyvenv.cfg", True),
        ("env/bin/activate", True),
        ("env/lib/python3.11/site-packages/x.py", True),
        ("suite/activate.py", False),
        ("docs/bin/activate.md", False),
    ],
)
def test_venv_rule(path: str, is_venv: bool) -> None:
    assert _is_venv_path(PurePosixPath(path)) is is_venv


def _imported_packages(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
    return names


def _module_is_slow(tree: ast.Module) -> bool:
    """True when the module sets ``pytestmark`` to include ``pytest.mark.slow``."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            return "mark.slow" in ast.unparse(node.value)
    return False


def test_fast_tests_cover_every_package() -> None:
    """`make test` (-m "not slow") imports every package that pyproject.toml ships."""
    packages = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    covered: set[str] = set()
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        if not _module_is_slow(tree):
            covered |= _imported_packages(tree)
    assert packages - covered == set(), f"no fast test module imports {sorted(packages - covered)}"
