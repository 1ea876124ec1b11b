"""The reproduction report: one Markdown file, figures embedded, benchmark by benchmark."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from analyze.aggregate import Band, LossKind, group_runs, groups_of
from analyze.load import FIRST_ORDER_FAMILIES, KFAC_FAMILY, TWO_LEVEL_FAMILY, ResultsSet
from analyze.published import CAVEATS, SOURCE, TENSORFLOW_KFAC_NOTE, published_for
from analyze.stats import N_BOOTSTRAP, PairedResult, Verdict
from analyze.style import LOSS_NOTE
from analyze.tables import Table, fmt, fmt_mean_std, profile_note

REPORT_FILE = "report.md"


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report shows, already computed."""

    results: ResultsSet
    roots: Sequence[Path]
    final: Table
    final_other: Table
    targets: Table
    paired: Table
    skipped: Table
    benchmark_figures: dict[str, str]  # benchmark -> PNG file name (relative to the report)
    experiment_figures: dict[str, dict[str, str]]  # benchmark -> experiment preset -> PNG
    main_figure: str | None
    profile_figure: str | None
    band: Band
    loss_kind: LossKind
    n_bootstrap: int = N_BOOTSTRAP


def verdict_sentence(result: PairedResult, *, two_level: str, kfac: str, metric: str) -> str:
    """One sentence: does two-level beat K-FAC on ``metric``, by how much, how sure."""
    if result.verdict is Verdict.TOO_FEW:
        return (
            f"{two_level} vs {kfac} on `{metric}`: not testable, only {result.n} seed(s) "
            "completed under both (a paired test needs at least 2)."
        )
    direction = "lower" if result.mean_diff < 0 else "higher"
    size = (
        f"mean difference {fmt(result.mean_diff)} ({100 * result.relative_diff:+.2f} % of "
        f"K-FAC's {fmt(result.kfac_mean)}), 95 % CI [{fmt(result.ci_low)}, {fmt(result.ci_high)}]"
    )
    test = (
        f"paired t-test over n = {result.n} seeds: "
        f"t = {fmt(result.t_stat)}, p = {fmt(result.p_value)}"
    )
    if result.verdict is Verdict.NO_DIFFERENCE:
        p_text = "p undefined (identical differences)" if math.isnan(result.p_value) else "p ≥ 0.05"
        return (
            f"{two_level} vs {kfac} on `{metric}`: **no significant difference** ({p_text}); "
            f"{size}; {test}."
        )
    winner = (
        "two-level beats K-FAC"
        if result.verdict is Verdict.TWO_LEVEL_BETTER
        else ("K-FAC beats two-level")
    )
    return (
        f"{two_level} vs {kfac} on `{metric}`: **{winner}** ({direction} loss, p < 0.05); "
        f"{size}; {test}."
    )


def _verdict_line(row: Any) -> str:
    """A verdict sentence with the diverged-run counts of both optimizers."""
    sentence = verdict_sentence(
        row.result, two_level=row.two_level, kfac=row.kfac, metric=row.metric
    )
    return (
        f"{sentence} Diverged runs (not in the test): {row.two_level} {row.two_level_diverged}, "
        f"{row.kfac} {row.kfac_diverged}."
    )


def _rows_for(table: Table, benchmark: str, *, others: Sequence[str]) -> Table:
    """The rows (and notes) of a table that belong to one benchmark."""
    notes = tuple(
        note for note in table.notes if not any(note.startswith(f"{b} (") for b in others)
    )
    if "benchmark" not in table.numbers or table.text.empty:
        return Table(table.name, table.title, table.numbers, table.text, notes)
    keep = (table.numbers["benchmark"] == benchmark).to_numpy()
    return Table(table.name, table.title, table.numbers[keep], table.text[keep], notes)


def published_comparison(results: ResultsSet, *, benchmark: str) -> str:
    """Markdown comparing our final losses with the published ones for this benchmark."""
    entry = published_for(benchmark)
    if entry is None:
        return "No published numbers for this benchmark in REFERENCE §5.\n"
    column = f"final_{entry.our_column}"
    lines = [
        f"Published ({entry.setting}, batch {entry.batch_size}"
        + (f", {entry.epochs} epochs" if entry.epochs else "")
        + f"): `{entry.our_column}` column compared "
        + ("(per-pixel mean losses)." if entry.our_column.endswith("per_output") else "."),
        "",
        "| data variant | optimizer | published | ours: mean ± std (n) | comparable |",
        "|---|---|---|---|---|",
    ]
    published = entry.by_family()
    keys = groups_of(results, benchmark=benchmark)
    for variant in sorted({k.data_variant for k in keys}):
        comparable = (
            "yes" if variant in entry.variants else f"no: `{variant}` is not the published data"
        )
        for family in (*FIRST_ORDER_FAMILIES, KFAC_FAMILY, TWO_LEVEL_FAMILY):
            best: tuple[float, float, int, str] | None = None
            for key in keys:
                if key.data_variant != variant:
                    continue
                runs = group_runs(results, key)
                fam = runs["optimizer_family"].dropna().astype(str)
                if (fam.iloc[0] if len(fam) else key.optimizer) != family:
                    continue
                usable = runs[runs["usable"]]
                if column not in usable.columns:
                    continue
                values = pd.to_numeric(usable[column], errors="coerce").dropna().to_numpy(float)
                if values.size == 0:
                    continue
                mean = float(values.mean())
                std = float(values.std(ddof=1)) if values.size > 1 else math.nan
                if best is None or mean < best[0]:
                    best = (mean, std, int(values.size), key.optimizer)
            ours = (
                "–" if best is None else f"{fmt_mean_std(best[0], best[1])} ({best[2]}, {best[3]})"
            )
            name = "best two-level" if family == TWO_LEVEL_FAMILY else family
            lines.append(
                f"| {variant} | {name} | {fmt(published[family])} | {ours} | {comparable} |"
            )
    usable = results.usable_runs()
    usable = usable[usable["benchmark"] == benchmark]
    budget = [
        f"{name} {', '.join(sorted({f'{v:g}' for v in pd.to_numeric(usable[name]).dropna()}))}"
        for name in ("batch_size", "epochs")
        if name in usable.columns and usable[name].notna().any()
    ]
    if budget:
        lines.extend(["", f"Our runs: {'; '.join(budget)}."])
    if entry.kfac_wall_s is not None:
        lines.extend(["", f"Published K-FAC wall-clock: {entry.kfac_wall_s:g} s (their hardware)."])
    return "\n".join(lines) + "\n"


def render_report(inputs: ReportInputs) -> str:
    """The report's Markdown text."""
    results = inputs.results
    runs = results.runs
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    versions = sorted({str(v) for v in runs.get("code_version", pd.Series(dtype=str)).dropna()})
    status_counts = runs["status"].value_counts().to_dict()
    out: list[str] = [
        "# Reproduction report: two-level K-FAC vs K-FAC",
        "",
        f"Generated {now} from {len(runs)} run folders under "
        + ", ".join(f"`{r}`" for r in inputs.roots)
        + ". Runs by status: "
        + ", ".join(f"{k} {v}" for k, v in sorted(status_counts.items()))
        + ".",
        f"Code versions: {', '.join(f'`{v}`' for v in versions) or 'unknown'}.",
        f"Figures and the first tables show {LOSS_NOTE[inputs.loss_kind.value]}.",
        "",
        "Question (REFERENCE §1): does the coarse-space correction of two-level K-FAC lower the "
        "loss reached by K-FAC? Each answer below is a paired comparison over seeds with its "
        "test, so either outcome is reported as measured.",
        "",
        "## Verdicts",
        "",
    ]
    paired = inputs.paired.numbers
    if paired.empty:
        out.append("No benchmark has both a K-FAC and a two-level run family.\n")
    else:
        out.extend(f"- **{row.problem}**: {_verdict_line(row)}" for row in paired.itertuples())
        out.append("")
    if inputs.main_figure:
        out.extend(
            [
                "## Main figure",
                "",
                f"![Train loss over benchmarks]({inputs.main_figure})",
                "",
                f"_Mean over completed seeds; {inputs.band.description}. Diverged runs are drawn "
                "dotted up to divergence and never averaged. On log axes the mean is geometric "
                "and the CI is computed on the log losses. Wall-clock curves are interpolated "
                "onto a common grid over the time span all seeds cover._",
                "",
            ]
        )
    for benchmark in results.benchmarks():
        others = [b for b in results.benchmarks() if b != benchmark]
        out.extend([f"## {benchmark}", ""])
        figure = inputs.benchmark_figures.get(benchmark)
        if figure:
            out.extend(
                [f"![{benchmark} curves]({figure})", "", f"_{inputs.band.description}._", ""]
            )
        for experiment, name in inputs.experiment_figures.get(benchmark, {}).items():
            out.extend([f"![{benchmark}: {experiment} only]({name})", ""])
        out.append(_rows_for(inputs.final, benchmark, others=others).to_markdown())
        rows = paired[paired["benchmark"] == benchmark] if not paired.empty else paired
        if not rows.empty:
            out.append("Two-level vs K-FAC:")
            out.append("")
            out.extend(f"- {_verdict_line(r)}" for r in rows.itertuples())
            out.append("")
        out.append(_rows_for(inputs.targets, benchmark, others=others).to_markdown())
        out.append(published_comparison(results, benchmark=benchmark))
        out.append(_rows_for(inputs.final_other, benchmark, others=others).to_markdown())
    if inputs.profile_figure:
        out.extend(
            [
                "## Performance profiles",
                "",
                f"![Performance profiles]({inputs.profile_figure})",
                "",
                f"_{profile_note()}_",
                "",
            ]
        )
    out.extend(["## Runs not averaged", "", inputs.skipped.to_markdown()])
    out.extend(
        [
            "## Methods",
            "",
            f"- Curves: mean over completed seeds; {inputs.band.description}.",
            "- Tables: mean ± sample std (ddof 1); n = completed seeds; diverged and incomplete "
            "runs are counted in their own columns and never averaged; corrupt run folders are "
            "listed above.",
            "- Runs of different data variants are never pooled: every group and every test is "
            "per (benchmark, data variant).",
            "- Time-to-target: target = mean final train loss of the strongest sgd/adam baseline; "
            "time read off the seed-mean curve; percentile bootstrap CIs over seeds "
            f"({inputs.n_bootstrap} resamples).",
            "- Two-level vs K-FAC: difference paired by seed; two-sided paired t-test "
            "(scipy.stats.ttest_rel); p ≥ 0.05 is reported as no significant difference.",
            f"- Published numbers: {SOURCE}.",
            *(f"  - Caveat: {c}" for c in CAVEATS),
            f"- Also reported elsewhere: {TENSORFLOW_KFAC_NOTE}",
            "",
        ]
    )
    return "\n".join(out)


def write_report(inputs: ReportInputs, out_dir: Path) -> Path:
    """Write ``report.md`` into ``out_dir``."""
    path = Path(out_dir) / REPORT_FILE
    path.write_text(render_report(inputs))
    return path
