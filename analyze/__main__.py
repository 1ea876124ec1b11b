"""CLI: ``python -m analyze [--results DIR ...] [--out DIR] ...`` builds figures, tables, report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import matplotlib

from analyze.aggregate import Axis, Band, LossKind
from analyze.build import BuildOptions, build_all
from analyze.stats import N_BOOTSTRAP
from suite.figures_layout import FIGURES_ROOT, STANDARD_RESULTS, figures_folder


def _enum_list(kind: type[Enum], option: str, text: str) -> tuple[Enum, ...]:
    allowed = [m.value for m in kind]  # type: ignore[var-annotated]
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"{option}: unknown {', '.join(bad) or '(empty)'}; allowed: {', '.join(allowed)}"
        )
    return tuple(kind(item) for item in dict.fromkeys(items))


def parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m analyze",
        description="Build figures, tables and the reproduction report from run folders.",
    )
    p.add_argument(
        "--results",
        type=Path,
        nargs="+",
        action="extend",
        default=None,
        help=f"results folders to scan for run folders (default: {STANDARD_RESULTS[0]}, "
        "the committed runs; a user's own runs are in results/runs)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: figures/<name of the results folder>, e.g. "
        "figures/reference, figures/runs; figures/ when several results folders are given)",
    )
    p.add_argument(
        "--benchmark",
        nargs="+",
        action="extend",
        default=[],
        help="only these benchmarks (model or experiment names)",
    )
    p.add_argument(
        "--optimizer",
        nargs="+",
        action="extend",
        default=[],
        help="only these optimizers (preset or family names)",
    )
    p.add_argument("--sweep", default=None, help="only runs of this sweep_id")
    p.add_argument(
        "--with-trials",
        action="store_true",
        help="include tuning trials and pilots (tuning.stage tune, pilot; left out by default)",
    )
    p.add_argument(
        "--axes",
        type=lambda t: _enum_list(Axis, "--axes", t),
        default=(Axis.EPOCH, Axis.STEP, Axis.WALL),
        help="x-axes, comma-separated from epoch,step,wall",
    )
    p.add_argument(
        "--band",
        choices=[b.value for b in Band],
        default=Band.CI95.value,
        help="shaded band: ci95 (95 %% t-CI of the mean) or minmax over seeds",
    )
    p.add_argument(
        "--loss",
        choices=[k.value for k in LossKind],
        default=LossKind.SUM.value,
        help="losses summed over outputs (sum) or per-output mean (per_output)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=N_BOOTSTRAP,
        help="bootstrap resamples for time-to-target CIs",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="one line (files written, runs skipped) instead of every file and skipped run",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = parser().parse_args(argv)
    matplotlib.use("Agg")  # files only; figures are built as Figure objects, never shown
    if args.bootstrap < 1:
        print("--bootstrap: must be a positive integer", file=sys.stderr)
        return 2
    results = tuple(args.results or [STANDARD_RESULTS[0]])
    out = args.out or (figures_folder(results[0]) if len(results) == 1 else FIGURES_ROOT)
    options = BuildOptions(
        results=results,
        out=out,
        benchmarks=tuple(args.benchmark),
        optimizers=tuple(args.optimizer),
        sweep=args.sweep,
        trials=args.with_trials,
        axes=args.axes,
        band=Band(args.band),
        loss_kind=LossKind(args.loss),
        n_bootstrap=args.bootstrap,
    )
    try:
        output = build_all(options)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    runs = output.results.runs
    if args.quiet:
        left_out = f", {len(output.skipped)} not averaged" if output.skipped else ""
        sources = ", ".join(map(str, results))
        print(
            f"{sources}: {len(runs)} runs{left_out}; wrote {len(output.files)} files into {out}/ "
            f"(start with {out / 'report.md'})"
        )
        return 0
    print(f"loaded {len(runs)} runs, {int(runs['usable'].sum())} averaged")
    if output.skipped:
        print(f"skipped {len(output.skipped)} runs (not averaged):")
        for skipped in output.skipped:
            print(f"  {skipped.run_id} [{skipped.status}] {skipped.reason}  ({skipped.path})")
    print(f"wrote {len(output.files)} files:")
    for path in output.files:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
