"""Sweeps: a unique dated id per sweep, and one line per job in the sweep's summary.

The default sweep folder is ``multirun/<date>_<time>_<4 hex>`` (``conf/config.yaml``); its name
is the sweep id that every run of the sweep records and that names the W&B group. Each job
writes ``outcome.json`` into its Hydra job folder; when the sweep ends, ``SweepSummary`` writes
``sweep_summary.txt`` next to them (one line per job: status, run folder, first error line),
prints the failed ones and makes the sweep exit 1 if any job failed.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from suite.store import atomic_write_json, atomic_write_text

OUTCOME_FILE = "outcome.json"  # in a Hydra job folder
SUMMARY_FILE = "sweep_summary.txt"  # in the sweep folder
TAG_RESOLVER = "sweep_tag"


def register_resolvers() -> None:
    """``${sweep_tag:}``: 4 random hex digits, drawn once per sweep (cached like ``${now:}``)."""
    if not OmegaConf.has_resolver(TAG_RESOLVER):
        OmegaConf.register_new_resolver(TAG_RESOLVER, lambda: secrets.token_hex(2), use_cache=True)


def write_outcome(
    job_dir: Path, *, status: str, run_folder: Path | None, error: str | None, overrides: list[str]
) -> None:
    """Record how one job of a sweep ended (read by ``SweepSummary``)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        job_dir / OUTCOME_FILE,
        {
            "status": status,
            "run_folder": str(run_folder) if run_folder is not None else None,
            "error": error,
            "overrides": overrides,
        },
    )


def summary_lines(sweep_dir: Path) -> tuple[list[str], int]:
    """One line per job of a sweep (in job order) and the number of jobs that did not finish."""
    lines: list[str] = []
    failed = 0

    def order(path: Path) -> tuple[int, str]:
        name = path.parent.name
        return (int(name), "") if name.isdigit() else (-1, name)

    outcomes = sorted(sweep_dir.glob(f"*/{OUTCOME_FILE}"), key=order)
    for path in outcomes:
        try:
            outcome: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        status = str(outcome.get("status"))
        where = outcome.get("run_folder") or str(path.parent.resolve())
        overrides = " ".join(outcome.get("overrides") or [])
        line = f"job {path.parent.name}: {status}: {where} ({overrides})"
        if outcome.get("error"):
            line += f": {outcome['error']}"
        if status in ("failed", "interrupted"):
            failed += 1
        lines.append(line)
    return lines, failed


class SweepSummary(Callback):
    """Writes ``sweep_summary.txt`` at the end of a multirun and fails the sweep on failed jobs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarise the sweep's jobs; exit 1 (after printing them) if any failed."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        lines, failed = summary_lines(sweep_dir)
        if not lines:
            return
        atomic_write_text(sweep_dir / SUMMARY_FILE, "\n".join(lines) + "\n")
        if failed:
            for line in lines:
                if ": failed: " in line or ": interrupted: " in line:
                    print(f"error: {line}", file=sys.stderr)
            print(
                f"sweep {sweep_dir.name}: {failed} of {len(lines)} jobs did not complete; "
                f"see {sweep_dir / SUMMARY_FILE}",
                file=sys.stderr,
            )
            sys.exit(1)
