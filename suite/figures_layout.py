"""Where the figures of a results folder go: one figures folder per results folder, never mixed.

``results/reference`` (the committed runs) -> ``figures/reference``; ``results/runs`` (a user's
own runs, the default ``results.root``) -> ``figures/runs``; any other folder ``X`` ->
``figures/<name of X>``. ``python -m analyze --results X`` writes there by default, ``make
figures`` builds the two standard folders, and the end-of-run block names the file.
"""

from __future__ import annotations

from pathlib import Path

FIGURES_ROOT = Path("figures")
# The results folders that `make figures` builds (each into its own figures folder).
STANDARD_RESULTS = (Path("results/reference"), Path("results/runs"))


def figures_folder(results_root: Path) -> Path:
    """The figures folder for one results folder (relative to the working directory)."""
    name = Path(results_root).name or Path(results_root).resolve().name
    return FIGURES_ROOT / name


def curves_figure(results_root: Path, *, model: str) -> Path:
    """The overview figure of one benchmark (model preset): every run of it in the folder."""
    return figures_folder(results_root) / f"{model}_curves.png"


def figures_command(results_root: Path) -> str:
    """The command that (re)builds the figures of ``results_root``."""
    root = Path(results_root)
    if not root.is_absolute() and root in STANDARD_RESULTS:
        return "make figures"
    return f"python -m analyze --results {root}"
