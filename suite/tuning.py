"""Tuning protocol: equal-budget grid search, selection on validation loss, multi-seed rerun.

The protocol, applied the same way to every optimizer of a benchmark:

1. ``tune``: a tuning preset (``conf/experiment/tune_*.yaml``) states the budget (trials per
   optimizer) and one grid per optimizer preset in ``cfg.tuning``: a log grid of learning rates
   for every optimizer, learning rate x damping x update period for the K-FAC family, each with
   exactly ``budget`` points. Tuning presets hold out a validation split (``data.val_fraction``)
   and every run records the ``tuning`` node in its summary. All optimizers' trials share one
   sweep id.
2. ``select``: per (benchmark, optimizer) the trial with the lowest *final validation loss*
   wins; diverged or failed trials lose. The selection is written as JSON.
3. rerun: the winning setting is rerun with ``rerun_seeds`` (>= 5) fresh seeds (disjoint from
   the tuning seed), same data split, into the sweep ``<id>-final``; figures use those runs.

``python -m suite.tuning protocol --experiment tune_koroko_mnist_ae_small`` does all three.

A planned extension of a grid (``tuning.round`` >= 2: the same experiment name, the new points
only) is tuned with ``protocol --after <earlier sweep id>``: the earlier rounds' trials join the
selection, an optimizer's budget is the sum of its rounds' budgets, and a winner whose fresh-seed
reruns are already stored is not rerun.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from core.errors import ConfigError
from optimizers.registry import FAMILIES
from suite.config import TuningConfig, TuningStage, register_configs
from suite.preflight import compose_job, group_options, optimizer_family
from suite.store import POINTER_FILE, RunStatus, atomic_write_json, find_run_folders, utc_now

REPO = Path(__file__).resolve().parent.parent
SELECTION_RULE = (
    "lowest final validation loss (final_val_loss) among completed runs; diverged or failed "
    "runs lose; ties go to the earlier run id"
)
DEFAULT_RERUN_SEEDS = 5


UNFINISHED = (RunStatus.RUNNING.value, RunStatus.INTERRUPTED.value)
LOSING = (RunStatus.DIVERGED.value, RunStatus.FAILED.value)


@dataclass(frozen=True)
class Trial:
    """One tuning run read back from the results store."""

    path: Path
    run_id: str
    sweep_id: str
    benchmark: str
    experiment: str | None
    model: str
    optimizer: str
    status: str
    seed: int
    val_loss: float | None
    hyperparameters: dict[str, Any]
    tuning: dict[str, Any] | None

    @property
    def score(self) -> float:
        """Selection score: final validation loss; ``inf`` for runs that did not complete."""
        if self.status != RunStatus.COMPLETED.value or self.val_loss is None:
            return math.inf
        return self.val_loss if math.isfinite(self.val_loss) else math.inf


@dataclass
class Selection:
    """The outcome of tuning one optimizer on one benchmark."""

    benchmark: str
    experiment: str | None
    model: str
    optimizer: str
    budget: int | None
    trials: int
    statuses: dict[str, int]
    best_run: str | None
    best_val_loss: float | None
    hyperparameters: dict[str, Any]  # the swept settings of the winner
    tuning_seeds: list[int]
    rerun_seeds: list[int] = field(default_factory=list)
    stored_seeds: list[int] = field(default_factory=list)  # reruns already in the store
    command: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ reading trials
def _trial(path: Path, summary: dict[str, Any]) -> Trial:
    tuning = summary.get("tuning")
    experiment = summary.get("experiment")
    val_loss = summary.get("final_val_loss")
    return Trial(
        path=path,
        run_id=str(summary.get("run_id") or path.name),
        sweep_id=str(summary.get("sweep_id")),
        benchmark=str(experiment or summary.get("model")),
        experiment=experiment,
        model=str(summary.get("model")),
        optimizer=str(summary.get("optimizer")),
        status=str(summary.get("status")),
        seed=int(summary.get("seed", 0)),
        val_loss=None if val_loss is None else float(val_loss),
        hyperparameters=dict(summary.get("hyperparameters") or {}),
        tuning=tuning if isinstance(tuning, dict) else None,
    )


def read_runs(results: Path) -> list[Trial]:
    """Every run stored under ``results``, whatever its stage."""
    return [
        _trial(path, json.loads((path / "summary.json").read_text()))
        for path in find_run_folders(results)
    ]


def tuning_trials(runs: Sequence[Trial], sweeps: Sequence[str]) -> list[Trial]:
    """The runs of the given sweeps that are tuning trials (final reruns, edge checks and
    pilots out)."""
    wanted = set(sweeps)
    tune = TuningStage.TUNE.value
    return [
        t
        for t in runs
        if t.sweep_id in wanted and (t.tuning is None or t.tuning.get("stage") in (None, tune))
    ]


def collect_trials(results: Path, sweeps: Sequence[str]) -> list[Trial]:
    """Tuning-stage runs of the given sweeps under ``results`` (final reruns, edge checks and
    pilots out)."""
    trials = tuning_trials(read_runs(results), sweeps)
    if not trials:
        raise ConfigError("--sweep", f"no runs of sweep(s) {', '.join(sweeps)} under '{results}'")
    return trials


# ---------------------------------------------------------------------------------- selection
def swept_keys(trials: Sequence[Trial]) -> list[str]:
    """Optimizer settings tuned for these trials: the recorded grid's keys, else those that vary."""
    grids = [t.tuning.get("grid", {}).get(t.optimizer) for t in trials if t.tuning]
    recorded = [g for g in grids if isinstance(g, dict)]
    if recorded:
        return sorted({k for grid in recorded for k in grid})
    keys = sorted({k for t in trials for k in t.hyperparameters})
    return [k for k in keys if len({repr(t.hyperparameters.get(k)) for t in trials}) > 1]


def _budget(trials: Sequence[Trial]) -> int | None:
    """The trials one optimizer had to spend: the sum of its sweeps' (tuning rounds') budgets."""
    per_sweep: dict[str, set[int]] = {}
    for t in trials:
        if t.tuning and "budget" in t.tuning:
            per_sweep.setdefault(t.sweep_id, set()).add(int(t.tuning["budget"]))
    for sweep, budgets in sorted(per_sweep.items()):
        if len(budgets) > 1:
            raise ConfigError(
                "tuning.budget",
                f"trials of one optimizer in sweep {sweep} disagree: {sorted(budgets)}",
            )
    return sum(min(b) for b in per_sweep.values()) if per_sweep else None


def _repeated_points(trials: Sequence[Trial], keys: Sequence[str]) -> int:
    """Trials whose swept settings repeat an earlier trial's (a round re-spending a point)."""
    points = Counter(repr([t.hyperparameters.get(k) for k in keys]) for t in trials)
    return sum(n - 1 for n in points.values())


def select_best(trials: Sequence[Trial], *, allow_incomplete: bool = False) -> list[Selection]:
    """The winning trial per (benchmark, optimizer), checking that every budget was spent."""
    groups: dict[tuple[str, str], list[Trial]] = {}
    for trial in trials:
        groups.setdefault((trial.benchmark, trial.optimizer), []).append(trial)
    if all(t.val_loss is None for t in trials):
        raise ConfigError(
            "data.val_fraction",
            "no run recorded a validation loss; tuning presets need data.val_fraction > 0",
        )
    problems: list[str] = []
    selections = []
    for (benchmark, optimizer), group in sorted(groups.items()):
        statuses = Counter(t.status for t in group)
        budget = _budget(group)
        notes = []
        unfinished = sum(statuses[s] for s in UNFINISHED)
        if unfinished:
            notes.append(f"{unfinished} trial(s) unfinished (running or interrupted); they lose")
        if budget is not None and len(group) != budget:
            notes.append(f"{len(group)} trial(s) found, budget is {budget}")
        keys = swept_keys(group)
        repeated = _repeated_points(group, keys)
        if repeated:
            notes.append(f"{repeated} trial(s) repeat another trial's settings")
        if notes:
            problems.append(f"{benchmark}/{optimizer}: " + "; ".join(notes))
        ranked = sorted(group, key=lambda t: (t.score, t.run_id))
        best = ranked[0] if math.isfinite(ranked[0].score) else None
        if best is None:
            notes.append("every trial diverged, failed or lacks a validation loss")
        selections.append(
            Selection(
                benchmark=benchmark,
                experiment=group[0].experiment,
                model=group[0].model,
                optimizer=optimizer,
                budget=budget,
                trials=len(group),
                statuses=dict(sorted(statuses.items())),
                best_run=None if best is None else best.run_id,
                best_val_loss=None if best is None else best.score,
                hyperparameters={}
                if best is None
                else {k: best.hyperparameters.get(k) for k in keys},
                tuning_seeds=sorted({t.seed for t in group}),
                notes=notes,
            )
        )
    if problems and not allow_incomplete:
        raise ConfigError(
            "--sweep",
            "unequal or unfinished tuning budget: "
            + " | ".join(problems)
            + " (finish or resume those runs, or pass --allow-incomplete)",
        )
    return selections


# ---------------------------------------------------------------------------- rerun commands
def format_value(value: Any) -> str:
    """A Hydra override value for a scalar setting."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, Enum):
        return str(value.value)
    return repr(value) if isinstance(value, float) else str(value)


def find_job_dirs(multirun_root: Path) -> dict[Path, Path]:
    """Run folder -> Hydra job dir, from the pointer files that suite.train leaves in job dirs."""

    mapping: dict[Path, Path] = {}
    if not multirun_root.is_dir():
        return mapping
    for pointer in multirun_root.rglob(POINTER_FILE):
        mapping[Path(pointer.read_text().strip()).resolve()] = pointer.parent
    return mapping


def job_overrides(job_dir: Path) -> list[str] | None:
    """The task overrides Hydra recorded for a job (``.hydra/overrides.yaml``), if present."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    return [str(o) for o in yaml.safe_load(path.read_text()) or []]


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def rerun_overrides(
    selection: Selection,
    *,
    base: list[str] | None,
    seeds: Sequence[int],
    source_sweep: str,
    launcher: str | None,
    record_stage: bool,
) -> list[str]:
    """Overrides of the rerun: the winner's job overrides with fresh seeds and the final stage."""
    replaced = {"trainer.seed", "tuning.stage", "tuning.source_sweep"}
    if launcher is not None:
        replaced.add("launcher")
    if base is None:  # no Hydra job dir: rebuild from the summary
        base = (
            [f"experiment={selection.experiment}"]
            if selection.experiment
            else [f"model={selection.model}"]
        )
        base.append(f"optimizer={selection.optimizer}")
        base += [f"optimizer.{k}={format_value(v)}" for k, v in selection.hyperparameters.items()]
    out = [o for o in base if _key(o) not in replaced]
    if launcher is not None:
        out.append(f"launcher={launcher}")
    out.append("trainer.seed=" + ",".join(str(s) for s in seeds))
    if record_stage:
        out += [f"tuning.stage={TuningStage.FINAL.value}", f"tuning.source_sweep={source_sweep}"]
    return out


def rerun_seeds(tuning_seeds: Sequence[int], count: int) -> list[int]:
    """``count`` seeds after the largest tuning seed, so no rerun reuses a tuning seed."""
    if count < 1:
        raise ConfigError("--seeds", f"got {count}; allowed: an integer >= 1 (the protocol uses 5)")
    start = max(tuning_seeds, default=-1) + 1
    return list(range(start, start + count))


def stored_rerun_seeds(runs: Sequence[Trial], best: Trial) -> set[int]:
    """Seeds whose fresh-seed rerun of ``best`` is among ``runs`` and finished: final-stage runs
    selected from its sweep, of its experiment and optimizer, with all its optimizer settings."""
    return {
        run.seed
        for run in runs
        if run.tuning is not None
        and run.tuning.get("stage") == TuningStage.FINAL.value
        and run.tuning.get("source_sweep") == best.sweep_id
        and run.experiment == best.experiment
        and run.optimizer == best.optimizer
        and run.hyperparameters == best.hyperparameters
        and run.status in (RunStatus.COMPLETED.value, RunStatus.DIVERGED.value)
    }


def plan_reruns(
    selections: Sequence[Selection],
    trials: Sequence[Trial],
    *,
    results: Path,
    seeds: int | None,
    multirun_root: Path,
    launcher: str | None,
    python: str = sys.executable,
) -> None:
    """Fill each selection's rerun seeds and command (one multirun per optimizer, into the
    winner's sweep's ``-final`` folder); seeds already rerun for that winner are left out."""
    by_run = {t.run_id: t for t in trials}
    job_dirs = find_job_dirs(multirun_root)
    stored_runs = read_runs(results)
    for selection in selections:
        if selection.best_run is None:
            continue
        best = by_run[selection.best_run]
        count = seeds
        if count is None:
            count = int((best.tuning or {}).get("rerun_seeds", DEFAULT_RERUN_SEEDS))
        selection.rerun_seeds = rerun_seeds(selection.tuning_seeds, count)
        stored = stored_rerun_seeds(stored_runs, best) & set(selection.rerun_seeds)
        selection.stored_seeds = sorted(stored)
        missing = [s for s in selection.rerun_seeds if s not in stored]
        if not missing:
            selection.notes.append(
                f"the winner's reruns on seeds {selection.rerun_seeds} are already stored; "
                "nothing to rerun"
            )
            continue
        job_dir = job_dirs.get(best.path.resolve())
        base = job_overrides(job_dir) if job_dir is not None else None
        if base is None:
            selection.notes.append(
                "Hydra job dir not found: command rebuilt from the summary (experiment, optimizer,"
                " swept settings); other command-line overrides of the tuning run are not carried"
            )
        overrides = rerun_overrides(
            selection,
            base=base,
            seeds=missing,
            source_sweep=best.sweep_id,
            launcher=launcher,
            record_stage=best.tuning is not None and "stage" in best.tuning,
        )
        selection.command = [
            python,
            str(REPO / "run.py"),
            "-m",
            *overrides,
            f"hydra.sweep.dir={multirun_root / (best.sweep_id + '-final')}",
            f"hydra.sweep.subdir={selection.optimizer}_${{hydra.job.num}}",
        ]


def write_selection(
    path: Path, selections: Sequence[Selection], *, sweeps: Sequence[str], results: Path
) -> None:
    """Store the selection (rule, sweeps, winners, rerun commands) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        path,
        {
            "created_at": utc_now(),
            "results": str(results),
            "sweeps": list(sweeps),
            "rule": SELECTION_RULE,
            "selections": [asdict(s) for s in selections],
        },
    )


def print_selection(selections: Sequence[Selection]) -> None:
    """A readable table of the winners, then the rerun commands."""
    for s in selections:
        loss = "-" if s.best_val_loss is None else f"{s.best_val_loss:.6g}"
        settings = ", ".join(f"{k}={format_value(v)}" for k, v in s.hyperparameters.items())
        budget = "?" if s.budget is None else str(s.budget)
        print(
            f"{s.benchmark:32s} {s.optimizer:16s} trials {s.trials}/{budget}  "
            f"best val loss {loss:>10s}  {settings}"
        )
        for note in s.notes:
            print(f"  note: {note}")
    commands = [s.command for s in selections if s.command]
    if commands:
        print("\n# rerun of each winner with fresh seeds:")
        for command in commands:
            print(shlex.join(command))


# ---------------------------------------------------------------------------------- tune step
def grid_points(grid: Mapping[str, Sequence[Any]]) -> int:
    """Number of trials of one optimizer's grid (the product of its axes' lengths)."""
    return math.prod(len(values) for values in grid.values())


def grid_combinations(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every point of one optimizer's grid, in a stable order (settings sorted by name)."""
    keys = sorted(grid)
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(grid[k] for k in keys))
    ]


def tuning_record(experiment: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The ``tuning`` node of a composed tuning preset, checked for an equal budget."""
    register_configs()
    cfg = compose_job([f"experiment={experiment}", *overrides])
    if cfg.tuning is None:
        raise ConfigError("experiment", f"'{experiment}' is not a tuning preset (no tuning node)")
    container = OmegaConf.to_container(cfg.tuning, resolve=True)
    if not isinstance(container, dict):
        raise ConfigError("tuning", "must be a mapping with budget and grid")
    record = {str(k): v for k, v in container.items()}
    check_record(record)
    if not float(cfg.data.val_fraction) > 0:
        raise ConfigError(
            "data.val_fraction", "is 0 in a tuning preset; allowed: a number in (0, 1)"
        )
    for optimizer, grid in record["grid"].items():
        known = optimizer_settings(optimizer)
        for key in grid:
            if key not in known:
                raise ConfigError(
                    f"tuning.grid.{optimizer}.{key}",
                    f"optimizer '{optimizer}' has no setting '{key}'",
                )
    return record


def optimizer_settings(preset: str) -> set[str]:
    """Settings of an optimizer preset, from its family's schema (no composition needed)."""
    if preset not in group_options("optimizer"):
        allowed = ", ".join(group_options("optimizer"))
        raise ConfigError("tuning.grid", f"unknown optimizer preset '{preset}'; allowed: {allowed}")
    family = optimizer_family(preset)
    return {f.name for f in fields(FAMILIES[family].schema)}


def check_record(record: dict[str, Any]) -> TuningConfig:
    """The tuning record as its schema (`suite.config.TuningConfig`), which checks it."""
    try:
        return TuningConfig(**record)
    except ConfigError as err:
        raise ConfigError(f"tuning.{err.setting}", err.problem) from None
    except TypeError as err:
        raise ConfigError("tuning", str(err)) from None


def tune_commands(
    experiment: str,
    record: dict[str, Any],
    *,
    sweep_dir: Path,
    overrides: Sequence[str] = (),
    python: str = sys.executable,
) -> list[list[str]]:
    """One multirun per optimizer of the grid, all into one sweep dir (one sweep id)."""
    commands = []
    for optimizer, grid in record["grid"].items():
        axes = [
            f"optimizer.{k}=" + ",".join(format_value(v) for v in vals) for k, vals in grid.items()
        ]
        commands.append(
            [
                python,
                str(REPO / "run.py"),
                "-m",
                f"experiment={experiment}",
                f"optimizer={optimizer}",
                *axes,
                *overrides,
                f"hydra.sweep.dir={sweep_dir}",
                f"hydra.sweep.subdir={optimizer}_${{hydra.job.num}}",
            ]
        )
    return commands


def _run_all(commands: Sequence[list[str]]) -> None:
    for command in commands:
        print("+ " + shlex.join(command), flush=True)
        done = subprocess.run(command, check=False)
        if done.returncode != 0:
            raise SystemExit(f"error: command failed with status {done.returncode}")


# ----------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m suite.tuning", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common_tune(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--experiment", required=True, help="a tuning preset (conf/experiment/tune_*)"
        )
        p.add_argument(
            "--launcher", help="launcher preset for every multirun (local, joblib, slurm)"
        )
        p.add_argument("--multirun", type=Path, default=Path("multirun"), help="Hydra sweep root")
        p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")

    def common_select(p: argparse.ArgumentParser) -> None:
        p.add_argument("--results", type=Path, default=Path("results"), help="results root")
        p.add_argument("--seeds", type=int, help="rerun seeds (default: tuning.rerun_seeds or 5)")
        p.add_argument(
            "--out", type=Path, help="selection JSON (default: RESULTS/tuning/SWEEP.json)"
        )
        p.add_argument(
            "--allow-incomplete", action="store_true", help="select despite missing trials"
        )

    tune = sub.add_parser("tune", help="run every optimizer's grid of a tuning preset (one sweep)")
    common_tune(tune)
    tune.add_argument("--dry-run", action="store_true", help="print the commands only")

    select = sub.add_parser("select", help="pick the best setting per benchmark and optimizer")
    select.add_argument("--sweep", action="append", required=True, help="sweep id (repeatable)")
    select.add_argument("--multirun", type=Path, default=Path("multirun"), help="Hydra sweep root")
    select.add_argument("--launcher", help="launcher preset for the reruns")
    select.add_argument("--launch", action="store_true", help="run the rerun commands")
    common_select(select)

    protocol = sub.add_parser("protocol", help="tune, select and rerun the winners")
    common_tune(protocol)
    common_select(protocol)
    protocol.add_argument(
        "--after",
        action="append",
        default=[],
        metavar="SWEEP",
        help="an earlier tuning round's sweep id whose trials join the selection (repeatable)",
    )
    return parser


def _tune(args: argparse.Namespace) -> str:
    record = tuning_record(args.experiment, args.overrides)
    after = getattr(args, "after", [])
    if after:
        if int(record.get("round", 1)) < 2:
            raise ConfigError(
                "--after",
                f"'{args.experiment}' is tuning round 1; allowed: a preset with tuning.round >= 2"
                " (an extension of the earlier round's grid)",
            )
        stored = read_runs(args.results)
        for sweep in after:
            if not tuning_trials(stored, [sweep]):
                raise ConfigError(
                    "--after", f"no tuning trials of sweep '{sweep}' under '{args.results}'"
                )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    sweep_id = f"{args.experiment}-{stamp}"
    overrides = [*args.overrides, *([f"launcher={args.launcher}"] if args.launcher else [])]
    commands = tune_commands(
        args.experiment, record, sweep_dir=args.multirun.resolve() / sweep_id, overrides=overrides
    )
    print(
        f"# tuning {args.experiment}: {len(commands)} optimizers x budget {record['budget']}"
        f" = {len(commands) * record['budget']} runs, sweep id {sweep_id}"
    )
    if getattr(args, "dry_run", False):
        for command in commands:
            print(shlex.join(command))
    else:
        _run_all(commands)
        print(f"# done; next: python -m suite.tuning select --sweep {sweep_id}")
    return sweep_id


def _select(args: argparse.Namespace, sweeps: list[str], *, launch: bool) -> None:
    trials = collect_trials(args.results, sweeps)
    selections = select_best(trials, allow_incomplete=args.allow_incomplete)
    plan_reruns(
        selections,
        trials,
        results=args.results,
        seeds=args.seeds,
        multirun_root=args.multirun.resolve(),
        launcher=args.launcher,
    )
    out = args.out or args.results / "tuning" / f"{sweeps[0]}.json"
    write_selection(out, selections, sweeps=sweeps, results=args.results)
    print_selection(selections)
    print(f"\n# selection written to {out}")
    if launch:
        _run_all([s.command for s in selections if s.command])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "tune":
            _tune(args)
        elif args.command == "select":
            _select(args, args.sweep, launch=args.launch)
        else:
            sweep_id = _tune(args)
            _select(args, [sweep_id, *args.after], launch=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
