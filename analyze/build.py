"""Build every figure, table and the report from the results store into one folder."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from analyze.aggregate import Axis, Band, GroupKey, LossKind, groups_of
from analyze.labels import Caption
from analyze.load import ResultsSet, SkippedRun, load_results
from analyze.plots import (
    MAX_GROUPS_PER_AXIS,
    group_pages,
    plot_benchmark,
    plot_main,
    plot_profile,
    save_figure,
)
from analyze.report import ReportInputs, write_report
from analyze.running import with_running_loss
from analyze.source_plots import author_presets, plot_source
from analyze.stats import N_BOOTSTRAP, performance_profile
from analyze.study import load_study
from analyze.study_plots import plot_study, tuned_studies
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
FIGURE_INDEX = "figures.md"


@dataclass(frozen=True)
class BuildOptions:
    """What to analyse and how (the CLI's options)."""

    results: tuple[Path, ...] = (Path("results"),)
    out: Path = Path("figures")
    benchmarks: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()
    sweep: str | None = None
    trials: bool = False  # include tuning trials and pilots (tuning.stage "tune", "pilot")
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

    figures = FigureWriter(out=out, output=output)
    benchmark_figures: dict[str, str] = {}
    experiment_figures: dict[str, dict[str, str]] = {}

    def curves(
        subset: ResultsSet, stem: str, *, subtitle: str | None = None, keys: list[GroupKey] | None
    ) -> str:
        caption = Caption()
        fig = plot_benchmark(
            subset,
            benchmark=benchmark,
            axes=options.axes,
            band=options.band,
            loss_kind=options.loss_kind,
            palette=palette,
            subtitle=subtitle,
            keys=keys,
            caption=caption,
        )
        return figures.save(fig, stem, caption)

    for benchmark in benchmarks:
        benchmark_figures[benchmark] = curves(results, f"{file_stem(benchmark)}_curves", keys=None)
        experiments = results.experiments(benchmark)
        keys = groups_of(results, benchmark=benchmark)
        if len(experiments) < 2 and len(keys) <= MAX_GROUPS_PER_AXIS:
            continue
        presets: list[str | None] = list(experiments) or [None]
        for experiment in presets:  # readable figures beside the overview
            subset = results if experiment is None else results.of_experiment(experiment)
            pages = group_pages(subset, groups_of(subset, benchmark=benchmark))
            for number, page in enumerate(pages, start=1):
                part = f" part {number}/{len(pages)}" if len(pages) > 1 else ""
                name = f"preset {experiment}" if experiment else "all settings"
                stem = f"{file_stem(benchmark)}_{file_stem(experiment or 'all')}_curves"
                stem += f"_part{number}" if len(pages) > 1 else ""
                experiment_figures.setdefault(benchmark, {})[
                    f"{experiment or 'all settings'}{part}"
                ] = curves(subset, stem, subtitle=f"{name}{part}", keys=page)
    main_figure = None
    if benchmarks:
        main_axes = tuple(a for a in options.axes if a is not Axis.STEP) or options.axes
        caption = Caption()
        fig = plot_main(
            results,
            benchmarks=benchmarks,
            axes=main_axes,
            band=options.band,
            loss_kind=options.loss_kind,
            palette=palette,
            caption=caption,
        )
        main_figure = figures.save(fig, "main_figure", caption)
    source_figures = _source_figures(results, options=options, palette=palette, figures=figures)
    _study_figures(options, palette=palette, figures=figures)

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
        caption = Caption()
        fig = plot_profile(profiles, optimizer_of=optimizer_of, palette=palette, caption=caption)
        profile_figure = figures.save(fig, "performance_profile", caption)

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
    output.files.append(figures.write_index(source_figures))
    return output


@dataclass
class FigureWriter:
    """Saves figures with their captions and remembers them for the figure index."""

    out: Path
    output: BuildOutput
    captions: dict[str, Caption] = field(default_factory=dict)

    def save(self, fig: Figure, stem: str, caption: Caption) -> str:
        """Write PNG, PDF and caption; returns the PNG's file name."""
        paths = save_figure(fig, self.out, stem, caption=caption)
        self.output.files.extend(paths)
        self.captions[paths[0].name] = caption
        return paths[0].name

    def write_index(self, source_figures: dict[str, str]) -> Path:
        """``figures.md``: every figure inline with its caption (legend mapping included)."""
        lines = ["# Figures", ""]
        if source_figures:
            lines += ["Counterparts of the source papers' figures, one per author-named preset:"]
            lines += [f"- [{preset}]({name})" for preset, name in source_figures.items()]
            lines.append("")
        for name, caption in self.captions.items():
            lines += [f"## {name}", "", f"![{caption.title}]({name})", "", caption.markdown()]
        path = self.out / FIGURE_INDEX
        path.write_text("\n".join(lines))
        return path


def _source_figures(
    results: ResultsSet, *, options: BuildOptions, palette: Palette, figures: FigureWriter
) -> dict[str, str]:
    """One counterpart of the source figure per author-named preset: preset -> PNG name."""
    presets = author_presets(results)
    if not presets:
        return {}
    with_running = with_running_loss(results)
    written = {}
    for preset in presets:
        caption = Caption()
        fig = plot_source(
            with_running, preset=preset, band=options.band, palette=palette, caption=caption
        )
        written[preset] = figures.save(fig, f"source_{file_stem(preset)}", caption)
    return written


def _study_figures(options: BuildOptions, *, palette: Palette, figures: FigureWriter) -> None:
    """One figure per tuned study under the results roots (``study_<study>.png``); only the
    benchmark filter applies: a study is drawn from all of its final runs or not at all."""
    runs = load_study(options.results)
    if options.benchmarks:
        runs = [r for r in runs if r.model in options.benchmarks]
    for study in tuned_studies(runs):
        caption = Caption()
        fig = plot_study(runs, study=study, palette=palette, caption=caption)
        figures.save(fig, f"study_{file_stem(study)}", caption)


def _write_runs_csv(results: ResultsSet, out: Path) -> Path:
    path = out / RUNS_CSV
    results.runs.to_csv(path, index=False)
    return path
