"""Build every figure, table and the report from the results store into one folder."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from analyze.aggregate import Axis, Band, LossKind
from analyze.load import ResultsSet, SkippedRun, load_results
from analyze.plots import plot_benchmark, plot_main, plot_profile, save_figure
from analyze.report import ReportInputs, write_report
from analyze.stats import N_BOOTSTRAP, performance_profile
from analyze.style import Palette
from analyze.tables import (
    final_loss_table,
    paired_numbers,
    paired_table,
    skipped_table,
    time_to_target_analysis,
    time_to_target_table,
)

RUNS_CSV = "runs.csv"


@dataclass(frozen=True)
class BuildOptions:
    """What to analyse and how (the CLI's options)."""

    results: tuple[Path, ...] = (Path("results"),)
    out: Path = Path("figures")
    benchmarks: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()
    sweep: str | None = None
    trials: bool = False  # include tuning trials (tuning.stage == "tune")
    axes: tuple[Axis, ...] = (Axis.EPOCH, Axis.STEP, Axis.WALL)
    band: Band = Band.CI95
    loss_kind: LossKind = LossKind.SUM
    n_bootstrap: int = N_BOOTSTRAP


@dataclass
class BuildOutput:
    """Files written and runs left out of averages."""

    results: ResultsSet
    files: list[Path] = field(default_factory=list)
    skipped: list[SkippedRun] = field(default_factory=list)


def file_stem(name: str) -> str:
    """A safe file stem from a benchmark name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "benchmark"


def build_all(options: BuildOptions) -> BuildOutput:
    """Load, filter, and write figures, tables, ``runs.csv`` and ``report.md`` into ``out``."""
    results = load_results(options.results, with_steps=False).filter(
        benchmarks=options.benchmarks or None,
        optimizers=options.optimizers or None,
        sweep=options.sweep,
        trials=options.trials,
    )
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    output = BuildOutput(results=results, skipped=results.skipped())
    output.files.append(_write_runs_csv(results, out))
    benchmarks = results.benchmarks()
    palette = Palette.for_optimizers(results.runs["optimizer"].dropna().astype(str))

    benchmark_figures: dict[str, str] = {}
    experiment_figures: dict[str, dict[str, str]] = {}
    for benchmark in benchmarks:
        fig = plot_benchmark(
            results,
            benchmark=benchmark,
            axes=options.axes,
            band=options.band,
            loss_kind=options.loss_kind,
            palette=palette,
        )
        paths = save_figure(fig, out, f"{file_stem(benchmark)}_curves")
        output.files.extend(paths)
        benchmark_figures[benchmark] = paths[0].name
        experiments = results.experiments(benchmark)
        if len(experiments) < 2:
            continue
        for experiment in experiments:  # one readable figure per preset, beside the overview
            fig = plot_benchmark(
                results.of_experiment(experiment),
                benchmark=benchmark,
                axes=options.axes,
                band=options.band,
                loss_kind=options.loss_kind,
                palette=palette,
                subtitle=f"preset {experiment}",
            )
            paths = save_figure(fig, out, f"{file_stem(benchmark)}_{file_stem(experiment)}_curves")
            output.files.extend(paths)
            experiment_figures.setdefault(benchmark, {})[experiment] = paths[0].name
    main_figure = None
    if benchmarks:
        main_axes = tuple(a for a in options.axes if a is not Axis.STEP) or options.axes
        fig = plot_main(
            results,
            benchmarks=benchmarks,
            axes=main_axes,
            band=options.band,
            loss_kind=options.loss_kind,
            palette=palette,
        )
        paths = save_figure(fig, out, "main_figure")
        output.files.extend(paths)
        main_figure = paths[0].name

    final = final_loss_table(results, loss_kind=options.loss_kind)
    other_kind = LossKind.PER_OUTPUT if options.loss_kind is LossKind.SUM else LossKind.SUM
    final_other = final_loss_table(results, loss_kind=other_kind)
    analysis = time_to_target_analysis(
        results, loss_kind=options.loss_kind, n_bootstrap=options.n_bootstrap
    )
    targets = time_to_target_table(analysis, loss_kind=options.loss_kind)
    paired = paired_table(paired_numbers(results, loss_kind=options.loss_kind))
    skipped = skipped_table(results)
    for table in (final, final_other, targets, paired, skipped):
        output.files.extend(table.write(out))

    profile_figure = None
    if not analysis.wall_times.empty:
        optimizer_of = {str(row.label): str(row.optimizer) for row in analysis.numbers.itertuples()}
        profiles = {
            "wall-clock": performance_profile(analysis.wall_times),
            "epochs": performance_profile(analysis.epoch_times),
        }
        fig = plot_profile(profiles, optimizer_of=optimizer_of, palette=palette)
        paths = save_figure(fig, out, "performance_profile")
        output.files.extend(paths)
        profile_figure = paths[0].name

    report = write_report(
        ReportInputs(
            results=results,
            roots=options.results,
            final=final,
            final_other=final_other,
            targets=targets,
            paired=paired,
            skipped=skipped,
            benchmark_figures=benchmark_figures,
            experiment_figures=experiment_figures,
            main_figure=main_figure,
            profile_figure=profile_figure,
            band=options.band,
            loss_kind=options.loss_kind,
            n_bootstrap=options.n_bootstrap,
        ),
        out,
    )
    output.files.append(report)
    return output


def _write_runs_csv(results: ResultsSet, out: Path) -> Path:
    path = out / RUNS_CSV
    results.runs.to_csv(path, index=False)
    return path
