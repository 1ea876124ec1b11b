"""Tables (Markdown and LaTeX): final/best losses, time-to-target, two-level minus K-FAC.

Each table has a numeric frame (``numbers``, what tests and the report read) and a formatted
frame rendered to Markdown and LaTeX. Statistics and their conventions live in ``stats.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analyze.aggregate import (
    AlignedSeeds,
    GroupKey,
    LossKind,
    align_on_steps,
    group_evals,
    group_labels,
    group_runs,
    groups_of,
)
from analyze.load import (
    FIRST_ORDER_FAMILIES,
    KFAC_FAMILY,
    TWO_LEVEL_FAMILY,
    AnalysisStatus,
    ResultsSet,
)
from analyze.stats import (
    N_BOOTSTRAP,
    R_MAX,
    Interval,
    compare_paired,
    judge,
    mean_std,
    times_to_target,
)

INCOMPLETE_STATUSES = (
    AnalysisStatus.RUNNING.value,
    AnalysisStatus.FAILED.value,
    AnalysisStatus.INTERRUPTED.value,
)


@dataclass(frozen=True)
class Table:
    """A table as numbers and as formatted text, with notes printed under it."""

    name: str
    title: str
    numbers: pd.DataFrame
    text: pd.DataFrame
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown with the title as a bold line and notes below."""
        lines = [f"**{self.title}**", ""]
        if self.text.empty:
            lines.append("_(no rows)_")
        else:
            header = [str(c) for c in self.text.columns]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            for row in self.text.itertuples(index=False):
                cells = [str(v).replace("|", "\\|") for v in row]
                lines.append("| " + " | ".join(cells) + " |")
        for note in self.notes:
            lines.extend(["", note])
        return "\n".join(lines).rstrip() + "\n"

    def to_latex(self) -> str:
        """A booktabs ``table`` environment with the title as caption and notes below."""
        columns = [str(c) for c in self.text.columns]
        spec = "l" * min(3, len(columns)) + "r" * max(0, len(columns) - 3)
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            rf"\caption{{{latex_escape(self.title)}}}",
            rf"\begin{{tabular}}{{{spec}}}",
            r"\toprule",
            " & ".join(latex_escape(c) for c in columns) + r" \\",
            r"\midrule",
        ]
        for row in self.text.itertuples(index=False):
            lines.append(" & ".join(latex_escape(str(v)) for v in row) + r" \\")
        lines.extend([r"\bottomrule", r"\end{tabular}"])
        for note in self.notes:
            lines.append(rf"\par\smallskip\footnotesize {latex_escape(note)}")
        lines.append(r"\end{table}")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> list[Path]:
        """Write ``<name>.md`` and ``<name>.tex`` into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / f"{self.name}.md", out_dir / f"{self.name}.tex"]
        paths[0].write_text(self.to_markdown())
        paths[1].write_text(self.to_latex())
        return paths


_LATEX_REPLACEMENTS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "∞": r"$\infty$",
    "·": r"$\cdot$",
    "×": r"$\times$",
    "−": r"$-$",
    "–": "--",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "τ": r"$\tau$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the few non-ASCII symbols the tables use."""
    return "".join(_LATEX_REPLACEMENTS.get(ch, ch) for ch in text)


def fmt(value: float) -> str:
    """Four significant digits; '–' for missing, '∞' for never."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.4g}"


def fmt_mean_std(mean: float, std: float) -> str:
    """'mean ± std', or the mean alone when the std is undefined (one seed)."""
    if math.isnan(mean):
        return "–"
    return fmt(mean) if math.isnan(std) else f"{fmt(mean)} ± {fmt(std)}"


def fmt_interval(interval: Interval) -> str:
    """'value [low, high]'."""
    return f"{fmt(interval.value)} [{fmt(interval.low)}, {fmt(interval.high)}]"


def problems_of(results: ResultsSet) -> list[tuple[str, str]]:
    """(benchmark, data variant) pairs with readable runs: the units never pooled."""
    keys = {
        (k.benchmark, k.data_variant)
        for b in results.benchmarks()
        for k in groups_of(results, benchmark=b)
    }
    return sorted(keys)


def _all_groups(results: ResultsSet) -> list[GroupKey]:
    return [k for b in results.benchmarks() for k in groups_of(results, benchmark=b)]


def _family(results: ResultsSet, key: GroupKey) -> str:
    runs = group_runs(results, key)
    families = runs["optimizer_family"].dropna().astype(str).unique() if len(runs) else []
    return str(families[0]) if len(families) else key.optimizer


def metric_columns(loss_kind: LossKind, results: ResultsSet) -> list[tuple[str, str]]:
    """(run-table column, heading) of the final/best metrics present in ``results``."""
    suffix = "" if loss_kind is LossKind.SUM else "_per_output"
    candidates = [
        (f"final_train_loss{suffix}", "final train loss"),
        (f"best_train_loss{suffix}", "best train loss"),
        (f"final_test_loss{suffix}", "final test loss"),
        (f"best_test_loss{suffix}", "best test loss"),
        ("final_test_acc", "final test acc"),
        ("best_test_acc", "best test acc"),
    ]
    usable = results.usable_runs()
    return [
        (column, heading)
        for column, heading in candidates
        if column in usable.columns and pd.to_numeric(usable[column], errors="coerce").notna().any()
    ]


def final_loss_table(results: ResultsSet, *, loss_kind: LossKind = LossKind.SUM) -> Table:
    """Final and best metrics per optimizer: mean ± std over completed seeds, with counts."""
    keys = _all_groups(results)
    labels = group_labels(results, keys, with_variant=False)  # the table has a variant column
    metrics = metric_columns(loss_kind, results)
    rows, text_rows = [], []
    for key in keys:
        runs = group_runs(results, key)
        usable = runs[runs["usable"]]
        row: dict[str, object] = {
            "benchmark": key.benchmark,
            "data_variant": key.data_variant,
            "optimizer": key.optimizer,
            "setting": key.setting,
            "label": labels[key],
            "n_seeds": len(usable),
            "n_diverged": int((runs["status"] == AnalysisStatus.DIVERGED.value).sum()),
            "n_incomplete": int(runs["status"].isin(INCOMPLETE_STATUSES).sum()),
        }
        text = {
            "benchmark": key.benchmark,
            "data variant": key.data_variant,
            "optimizer": labels[key],
            "n": str(row["n_seeds"]),
            "diverged": str(row["n_diverged"]),
            "incomplete": str(row["n_incomplete"]),
        }
        for column, heading in metrics:
            summary = mean_std(pd.to_numeric(usable[column], errors="coerce").to_numpy(float))
            row[f"{column}_mean"] = summary.mean
            row[f"{column}_std"] = summary.std
            text[heading] = fmt_mean_std(summary.mean, summary.std)
        rows.append(row)
        text_rows.append(text)
    kind = "NLL summed over outputs" if loss_kind is LossKind.SUM else "per-output mean NLL"
    notes = (
        f"Losses: {kind}, mean over examples (nats). Mean ± sample std (ddof 1) over the n "
        "completed seeds; diverged and incomplete runs are counted, never averaged.",
    )
    return Table(
        name="table_final_loss" + ("" if loss_kind is LossKind.SUM else "_per_output"),
        title=f"Final and best metrics per optimizer ({kind}; mean ± std over seeds)",
        numbers=pd.DataFrame(rows),
        text=pd.DataFrame(text_rows),
        notes=notes,
    )


@dataclass(frozen=True)
class TargetAnalysis:
    """Time-to-target per problem and group: numbers, targets and the profile's input."""

    numbers: pd.DataFrame
    problems: pd.DataFrame
    wall_times: pd.DataFrame  # problems × group labels (inf: not reached)
    epoch_times: pd.DataFrame
    n_bootstrap: int


def time_to_target_analysis(
    results: ResultsSet,
    *,
    loss_kind: LossKind = LossKind.SUM,
    n_bootstrap: int = N_BOOTSTRAP,
) -> TargetAnalysis:
    """Time-to-target of every group against its problem's first-order-baseline target."""
    metric = loss_kind.column("train")
    keys = _all_groups(results)
    labels = group_labels(results, keys, with_variant=False)  # the problem names the variant
    rows, problem_rows = [], []
    wall_times: dict[str, dict[str, float]] = {}
    epoch_times: dict[str, dict[str, float]] = {}
    for benchmark, variant in problems_of(results):
        problem = f"{benchmark} ({variant})"
        aligned: dict[GroupKey, AlignedSeeds] = {}
        for key in keys:
            if (key.benchmark, key.data_variant) != (benchmark, variant):
                continue
            seeds = align_on_steps(
                group_evals(results, key, usable=True), (metric, "wall_time_s", "epoch")
            )
            if seeds is not None:
                aligned[key] = seeds
        baselines = [k for k in aligned if _family(results, k) in FIRST_ORDER_FAMILIES]
        if not baselines:
            problem_rows.append(
                {
                    "problem": problem,
                    "target": math.nan,
                    "baseline": None,
                    "note": "no completed sgd/adam baseline: no target",
                }
            )
            continue
        baseline = min(baselines, key=lambda k: aligned[k].columns[metric][:, -1].mean())
        target, found = times_to_target(
            {labels[k]: v for k, v in aligned.items()},
            baseline=labels[baseline],
            metric=metric,
            n_bootstrap=n_bootstrap,
        )
        problem_rows.append(
            {"problem": problem, "target": target, "baseline": labels[baseline], "note": ""}
        )
        for key in aligned:
            result = found[labels[key]]
            wall_times.setdefault(problem, {})[labels[key]] = result.wall_s.value
            epoch_times.setdefault(problem, {})[labels[key]] = result.epochs.value
            rows.append(
                {
                    "problem": problem,
                    "benchmark": benchmark,
                    "data_variant": variant,
                    "optimizer": key.optimizer,
                    "label": labels[key],
                    "target": target,
                    "baseline": labels[baseline],
                    "wall_s": result.wall_s,
                    "epochs": result.epochs,
                    "speedup_wall": result.speedup_wall,
                    "speedup_epochs": result.speedup_epochs,
                    "seeds_reaching": result.seeds_reaching,
                    "n_seeds": result.n_seeds,
                }
            )
    return TargetAnalysis(
        numbers=pd.DataFrame(rows),
        problems=pd.DataFrame(problem_rows, columns=["problem", "target", "baseline", "note"]),
        wall_times=pd.DataFrame(wall_times).T,
        epoch_times=pd.DataFrame(epoch_times).T,
        n_bootstrap=n_bootstrap,
    )


def time_to_target_table(analysis: TargetAnalysis, *, loss_kind: LossKind) -> Table:
    """Formatted time-to-target table with speed-ups vs the baseline and bootstrap CIs."""
    text_rows = [
        {
            "problem": row.problem,
            "optimizer": row.label,
            "target": fmt(row.target),
            "seeds reaching": f"{row.seeds_reaching}/{row.n_seeds}",
            "wall-clock (s) [95 % CI]": fmt_interval(row.wall_s),
            "epochs [95 % CI]": fmt_interval(row.epochs),
            "speed-up wall [95 % CI]": fmt_interval(row.speedup_wall),
            "speed-up epochs [95 % CI]": fmt_interval(row.speedup_epochs),
        }
        for row in analysis.numbers.itertuples()
    ]
    column = loss_kind.column("train")
    notes = [
        f"Target: mean over seeds of the final `{column}` of the strongest first-order baseline "
        "(sgd/adam with the lowest such mean) on the same benchmark and data variant. Time is "
        "read off the seed-mean curve at the first evaluation at or below the target (∞: never). "
        "Speed-up = baseline time / optimizer time (> 1: faster). CIs: percentile bootstrap "
        f"over seeds, {analysis.n_bootstrap} resamples, target re-estimated in each.",
    ]
    notes.extend(f"{row.problem}: {row.note}" for row in analysis.problems.itertuples() if row.note)
    return Table(
        name="table_time_to_target",
        title="Time to reach the first-order baseline's final train loss",
        numbers=analysis.numbers,
        text=pd.DataFrame(text_rows),
        notes=tuple(notes),
    )


def paired_numbers(results: ResultsSet, *, loss_kind: LossKind = LossKind.SUM) -> pd.DataFrame:
    """Two-level minus K-FAC per problem, pair of optimizers and final loss, paired by seed."""
    keys = _all_groups(results)
    labels = group_labels(results, keys, with_variant=False)  # the problem names the variant
    rows = []
    splits = [
        s for s in ("train", "test") if f"final_{loss_kind.column(s)}" in results.runs.columns
    ]
    for benchmark, variant in problems_of(results):
        local = [k for k in keys if (k.benchmark, k.data_variant) == (benchmark, variant)]
        kfacs = [k for k in local if _family(results, k) == KFAC_FAMILY]
        two_levels = [k for k in local if _family(results, k) == TWO_LEVEL_FAMILY]
        for two in two_levels:
            for kfac in kfacs:
                two_runs, kfac_runs = group_runs(results, two), group_runs(results, kfac)
                if not _same_shared_setting(two_runs, kfac_runs):
                    continue  # a paired difference only isolates the coarse level
                for split in splits:
                    column = f"final_{loss_kind.column(split)}"
                    result = compare_paired(
                        f"{labels[two]} vs {labels[kfac]}",
                        labels[two],
                        labels[kfac],
                        _by_seed(two_runs, column),
                        _by_seed(kfac_runs, column),
                    )
                    rows.append(
                        {
                            "problem": f"{benchmark} ({variant})",
                            "benchmark": benchmark,
                            "data_variant": variant,
                            "two_level": labels[two],
                            "kfac": labels[kfac],
                            "metric": column,
                            "result": result,
                            "two_level_diverged": _count(two_runs, AnalysisStatus.DIVERGED),
                            "kfac_diverged": _count(kfac_runs, AnalysisStatus.DIVERGED),
                        }
                    )
    frame = pd.DataFrame(rows)
    if not frame.empty:  # one Holm family: every row of the table
        frame["judged"] = judge(list(frame["result"]))
    return frame


# Settings two-level K-FAC shares with K-FAC: a pair must agree on all of them, so that the
# paired difference measures the coarse-space correction and nothing else.
SHARED_SETTINGS = ("experiment", "scale", "batch_size", "epochs", "max_steps")


def _same_shared_setting(two_runs: pd.DataFrame, kfac_runs: pd.DataFrame) -> bool:
    if two_runs.empty or kfac_runs.empty:
        return False
    two, kfac = two_runs.iloc[0], kfac_runs.iloc[0]
    shared_hp = [c for c in kfac_runs.columns if c.startswith("hp.") and c != "hp.name"]
    shared_hp = [c for c in shared_hp if kfac_runs[c].notna().any()]
    for column in (*SHARED_SETTINGS, *shared_hp):
        if column not in two_runs.columns or column not in kfac_runs.columns:
            continue
        a, b = two[column], kfac[column]
        if pd.isna(a) and pd.isna(b):
            continue
        if str(a) != str(b):
            return False
    return True


def _by_seed(runs: pd.DataFrame, column: str) -> dict[int, float]:
    usable = runs[runs["usable"]]
    if column not in usable.columns:
        return {}
    values = pd.to_numeric(usable[column], errors="coerce")
    return {int(s): float(v) for s, v in zip(usable["seed"], values, strict=True)}


def _count(runs: pd.DataFrame, status: AnalysisStatus) -> int:
    return int((runs["status"] == status.value).sum())


def paired_table(numbers: pd.DataFrame) -> Table:
    """Formatted two-level minus K-FAC table: exact sign-flip p, Holm, TOST, verdict."""
    text_rows = []
    for row in numbers.itertuples():
        r, j = row.result, row.judged
        text_rows.append(
            {
                "problem": row.problem,
                "two-level": row.two_level,
                "K-FAC": row.kfac,
                "metric": row.metric,
                "n pairs": str(r.n),
                "K-FAC mean": fmt(r.b_mean),
                "two-level mean": fmt(r.a_mean),
                "diff [95 % CI]": f"{fmt(r.mean_diff)} [{fmt(r.ci_low)}, {fmt(r.ci_high)}]",
                "rel. diff": "–"
                if math.isnan(r.relative_diff)
                else f"{100 * r.relative_diff:+.2f} %",
                "p sign-flip": fmt(r.p_diff),
                "p Holm": fmt(j.p_diff_holm),
                "p TOST (Holm)": fmt(j.p_tost_holm),
                "diverged (2L/K)": f"{row.two_level_diverged}/{row.kfac_diverged}",
                "verdict": j.verdict_text(),
            }
        )
    notes = (
        "diff = two-level − K-FAC, paired by seed over seeds where both completed (negative: "
        "two-level reached a lower loss). p sign-flip: exact two-sided permutation test over "
        "all 2^n sign patterns (with n pairs p ≥ 2/2^n); p Holm: Holm-corrected over every row "
        "of this table; TOST: exact sign-flip equivalence test against ±1 % of K-FAC's mean, "
        "Holm-corrected. Verdict: equivalent within ±m (TOST), else better/worse (p Holm "
        "< 0.05), else inconclusive. CI: t-interval of the mean difference.",
    )
    return Table(
        name="table_two_level_vs_kfac",
        title="Two-level K-FAC minus K-FAC, paired by seed",
        numbers=numbers,
        text=pd.DataFrame(text_rows),
        notes=notes,
    )


def skipped_table(results: ResultsSet) -> Table:
    """Every run left out of averages (incomplete, diverged, corrupt, superseded) and why."""
    rows = [
        {"run": s.run_id, "status": s.status, "reason": s.reason, "path": s.path}
        for s in results.skipped()
    ]
    return Table(
        name="table_skipped_runs",
        title="Runs not averaged",
        numbers=pd.DataFrame(rows, columns=["run", "status", "reason", "path"]),
        text=pd.DataFrame(rows, columns=["run", "status", "reason", "path"]),
        notes=(),
    )


def profile_note(r_max: float = R_MAX) -> str:
    """Caption of the performance-profile figure."""
    return (
        "Performance profile (AlgoPerf style): for each optimizer, the fraction of problems "
        "(benchmark × data variant) on which its time-to-target is within τ times the fastest "
        f"optimizer's; τ from 1 to r_max = {r_max:g}; not reaching the target counts as unsolved."
    )
