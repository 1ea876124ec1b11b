"""The study (issue 17): campaign runs read back, per-arm outcomes, verdicts per benchmark.

A campaign run is a run folder whose ``tuning`` record names a ``study`` (the benchmark of the
campaign, e.g. ``mnist_ae_small``); its *arm* is ``tuning.arm`` when its preset tunes one
optimizer, else its optimizer preset (the first-order preset tunes SGD and Adam together).
Tuning-stage runs show the budget spent; final-stage runs (the winners on fresh seeds) are the
evidence. The metric of every claim is the papers' train loss: the final epoch's running mean of
the train-mode mini-batch losses (``train_running_loss``; computed from metrics_steps.parquet for
runs recorded before the column existed). A final run enters a claim only when it completed and
*learned* (its final running loss at least ``LEARNED_MARGIN`` below the trivial baseline, the
best constant predictor); every other final run is listed with its reason.

A benchmark can also be compared *at its source's own settings* (``SOURCE_SETTINGS_STUDIES``):
no tuning budget, every arm runs the author-named preset with only the optimizer changed. Its
runs record no tuning node; they join by the experiment name in their summary, their arm is
read from their optimizer settings, and all of them count as final runs. A run whose settings
(apart from the optimizer, the seed and bookkeeping that cannot change a trajectory) differ
from the rest of its study, or whose optimizer settings differ from the rest of its arm, is
listed with the differing keys and left out of the claims.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from omegaconf import OmegaConf

from analyze.stats import Comparison, Judged, compare_paired, judge
from core.likelihood import Likelihood
from datasets import load_dataset
from suite.config import TuningStage
from suite.metrics import learned, running_means_from_steps, trivial_baseline
from suite.store import RunStatus, find_run_folders
from suite.train import split_targets

FINAL_STAGE = TuningStage.FINAL.value
TUNE_STAGE = TuningStage.TUNE.value
EXTENSION_STAGE = TuningStage.EXTENSION.value  # beyond a winner's grid edge: never selected
PILOT_STAGE = TuningStage.PILOT.value  # a source's variant outside the arms: never selected
MULTI_OPTIMIZER_ARM = "first_order"  # a preset that tunes several optimizers: arm = optimizer


@dataclass(frozen=True)
class ComparisonSpec:
    """A comparison the study asks on every benchmark that has both arms: A vs B."""

    label: str
    a: str
    b: str


COMPARISONS = (
    ComparisonSpec("two-level (paper) vs K-FAC", "kfac2", "kfac"),
    ComparisonSpec("K-FAC vs Adam", "kfac", "adam"),
    ComparisonSpec("K-FAC vs SGD", "kfac", "sgd"),
    ComparisonSpec("two-level accumulate vs rebuild", "kfac2_accumulate", "kfac2"),
    ComparisonSpec("two-level (Koroko exact) vs K-FAC", "kfac2_exact", "kfac"),
    # where a pilot found another of Koroko et al.'s spaces best (docs/study.md)
    ComparisonSpec("two-level (Koroko Krylov) vs K-FAC", "kfac2_krylov", "kfac"),
    ComparisonSpec("two-level (Koroko Krylov-residual) vs K-FAC", "kfac2_krylov_residual", "kfac"),
    ComparisonSpec("two-level (Koroko spectral) vs K-FAC", "kfac2_spectral", "kfac"),
    ComparisonSpec("two-level (Koroko residual) vs K-FAC", "kfac2_residual", "kfac"),
    ComparisonSpec("two-level authors' code (accumulate) vs rebuild", "kfac2_authors", "kfac2"),
    ComparisonSpec("two-level authors' code (accumulate) vs K-FAC", "kfac2_authors", "kfac"),
)
ARM_ORDER = (
    "sgd", "adam", "kfac", "kfac2", "kfac2_accumulate", "kfac2_authors", "kfac2_exact",
    "kfac2_krylov", "kfac2_krylov_residual", "kfac2_spectral", "kfac2_residual",
)  # fmt: skip
ARM_NAMES = {
    "sgd": "SGD",
    "adam": "Adam",
    "kfac": "K-FAC",
    "kfac2": "two-level K-FAC (paper, rebuild)",
    "kfac2_accumulate": "two-level K-FAC (paper, authors' accumulating coarse matrix)",
    "kfac2_exact": "two-level K-FAC (Koroko: Nicolaides, exact coarse Fisher)",
    "kfac2_authors": "two-level K-FAC (authors' paper-time code: accumulate, nearest)",
    # Koroko et al.'s other coarse spaces (pilots of which one their arm stands for)
    "kfac2_spectral": "two-level K-FAC (Koroko: spectral, exact coarse Fisher)",
    "kfac2_residual": "two-level K-FAC (Koroko: residual, exact coarse Fisher)",
    "kfac2_krylov": "two-level K-FAC (Koroko: Krylov from all-ones, exact coarse Fisher)",
    "kfac2_krylov_residual": "two-level K-FAC (Koroko: Krylov from residual, exact coarse Fisher)",
}


@dataclass(frozen=True)
class SourceSettingsStudy:
    """A benchmark compared at its source's settings: one author-named preset, no tuning.

    ``arms``: arm -> the optimizer settings (config ``optimizer.<key>``) that identify it; the
    first arm whose settings all match a run's takes it, a run matching none is not part of it.
    """

    experiment: str  # the preset's experiment name (summary ``experiment``); also the study name
    arms: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]

    def arm_of(self, optimizer: dict[str, Any]) -> str | None:
        """The arm a run with these optimizer settings belongs to (None: not an arm)."""
        for arm, settings in self.arms:
            if all(str(optimizer.get(k)) == v for k, v in settings):
                return arm
        return None


# Koroko et al.'s coarse spaces, each an arm where a pilot chose it (docs/study.md): the arm ->
# its optimizer preset's coarse_space, with their exact coarse Fisher
KOROKO_SPACES = (
    ("kfac2_exact", "nicolaides"),
    ("kfac2_spectral", "spectral"),
    ("kfac2_residual", "residual"),
    ("kfac2_krylov", "krylov_nicolaides"),
    ("kfac2_krylov_residual", "krylov_residual"),
)
# The arms told apart by their optimizer settings, each named with the coarse settings that set
# it apart (a run of another two-level form matches none): kfac2_exact is Koroko et al.'s
# two-level form (Nicolaides space), their other spaces arms of their own, kfac2_authors the
# two-level authors' paper-time coarse matrix
SIX_ARMS = (
    ("sgd", (("name", "sgd"),)),
    ("adam", (("name", "adam"),)),
    ("kfac", (("name", "kfac"),)),
    *(
        (arm, (("name", "kfac2"), ("coarse_fisher", "exact"), ("coarse_space", space)))
        for arm, space in KOROKO_SPACES
    ),
    (
        "kfac2",
        (
            ("name", "kfac2"),
            ("coarse_fisher", "kron"),
            ("coarse_refresh", "rebuild"),
            ("coarse_downsample", "centre"),
        ),
    ),
    (
        "kfac2_authors",
        (
            ("name", "kfac2"),
            ("coarse_fisher", "kron"),
            ("coarse_refresh", "accumulate"),
            ("coarse_downsample", "nearest"),
        ),
    ),
)
SOURCE_SETTINGS_STUDIES = (
    # Tselepidis et al.'s deep-linear toy at small scale (issue 17 item 5: does the paper's gain
    # need the authors' accumulating coarse matrix?); kfac2_authors = conf/optimizer/kfac2_authors
    SourceSettingsStudy(
        experiment="tselepidis_deep_linear_small",
        arms=(
            ("kfac", (("name", "kfac"),)),
            (
                "kfac2",
                (("name", "kfac2"), ("coarse_refresh", "rebuild"), ("coarse_downsample", "centre")),
            ),
            (
                "kfac2_authors",
                (
                    ("name", "kfac2"),
                    ("coarse_refresh", "accumulate"),
                    ("coarse_downsample", "nearest"),
                ),
            ),
        ),
    ),
    # Koroko et al.'s Fashion-MNIST 64-layer linear + BatchNorm network at small scale and at
    # full scale (60,000 images, batch 512, up to 100 epochs with their early stopping)
    SourceSettingsStudy(experiment="koroko_fmnist_deep_linear_small", arms=SIX_ARMS),
    SourceSettingsStudy(experiment="koroko_fmnist_deep_linear", arms=SIX_ARMS),
    # the authors' toy at their full settings (depth 128, 25,000 examples, 100 epochs, the
    # plateau schedule): every arm at the preset's settings, only the optimizer changed
    SourceSettingsStudy(experiment="tselepidis_deep_linear", arms=SIX_ARMS),
)
SOURCE_STUDIES = {s.experiment: s for s in SOURCE_SETTINGS_STUDIES}
# config keys that cannot change a trajectory (where results go, logging, resuming, progress)
BOOKKEEPING_KEYS = frozenset(
    {
        "experiment",
        "tuning",
        "results",
        "logger",
        "trainer.seed",
        "trainer.progress",
        "trainer.resume",
        "trainer.checkpoint_every_steps",
        "trainer.checkpoint_every_minutes",
        "trainer.keep_checkpoint",
    }
)


@dataclass(frozen=True)
class EpochCurve:
    """Per-epoch running train loss of a run, with the step and wall-clock at each epoch's end."""

    epochs: np.ndarray
    steps: np.ndarray
    wall_s: np.ndarray
    running_loss: np.ndarray


@dataclass(frozen=True)
class StudyRun:
    """One campaign run, read back with the numbers the study uses."""

    path: Path
    run_id: str
    study: str
    arm: str
    stage: str
    seed: int
    status: str
    sweep_id: str
    hyperparameters: dict[str, Any]
    grid: dict[str, list[Any]]
    code_version: str
    cpu: str  # from environment.json: wall-clock compares only between runs on the same CPU
    data_variant: str
    model: str
    final_running_loss: float  # NaN when unknown
    final_running_loss_per_output: float
    final_val_loss: float
    final_test_loss: float
    baseline_train_loss: float
    baseline_predictor: str
    learned: bool
    wall_clock_s: float
    curve: EpochCurve = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict, repr=False)  # flat config, for checks
    settings_mismatch: str = ""  # source-settings studies: keys that differ from the study's

    @property
    def usable(self) -> bool:
        """Whether the run may enter a claim: completed, learned, same settings as its study."""
        return (
            self.status == RunStatus.COMPLETED.value and self.learned and not self.settings_mismatch
        )

    def exclusion_reason(self) -> str | None:
        """Why the run is left out of claims (None when it is not)."""
        if self.status != RunStatus.COMPLETED.value:
            return f"status {self.status}"
        if self.settings_mismatch:
            return f"settings differ from the rest of its study or arm: {self.settings_mismatch}"
        if not self.learned:
            return (
                f"did not learn: final running loss {self.final_running_loss:.4g} vs "
                f"baseline {self.baseline_train_loss:.4g}"
            )
        return None


def _float(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


@cache
def _computed_baseline(model_yaml: str, data_yaml: str) -> tuple[float, str]:
    """Trivial baseline for runs recorded before the summary carried it (data -> loss)."""
    model = yaml.safe_load(model_yaml)
    data = yaml.safe_load(data_yaml)
    bundle = load_dataset(
        str(model["dataset"]),
        OmegaConf.create(data),
        device=torch.device("cpu"),
        seed=0,
        task=model.get("task"),
    )
    autoencoder = model.get("task") == "autoencoder"
    targets = {"train": split_targets(bundle.train, autoencoder=autoencoder)}
    baseline = trivial_baseline(
        Likelihood(model["likelihood"]),
        targets,
        autoencoder=autoencoder,
        classes=int(model.get("num_classes") or 0),
    )
    return baseline.losses["train"], baseline.predictor


def _baseline(summary: dict[str, Any], config: dict[str, Any]) -> tuple[float, str]:
    recorded = summary.get("baseline_train_loss")
    if recorded is not None:
        return float(recorded), str(summary.get("baseline_predictor") or "")
    return _computed_baseline(
        yaml.safe_dump(config["model"], sort_keys=True),
        yaml.safe_dump(config["data"], sort_keys=True),
    )


def _curve(path: Path) -> EpochCurve:
    """Per-epoch running loss: the recorded column if present, else from the step losses."""
    evals = pd.read_parquet(path / "metrics_evals.parquet")
    steps = pd.read_parquet(path / "metrics_steps.parquet")
    evals = evals[evals["step"] > 0].sort_values("step")
    if "train_running_loss" in evals.columns and evals["train_running_loss"].notna().all():
        running = evals["train_running_loss"].to_numpy(float)
    else:
        running = np.asarray(
            running_means_from_steps(steps, [int(s) for s in evals["step"]]), dtype=float
        )
    return EpochCurve(
        epochs=evals["epoch"].to_numpy(float),
        steps=evals["step"].to_numpy(int),
        wall_s=evals["wall_time_s"].to_numpy(float),
        running_loss=running,
    )


def _arm(summary: dict[str, Any]) -> str:
    tuning = summary["tuning"]
    arm = str(tuning.get("arm") or summary.get("optimizer"))
    grids = tuning.get("grid") or {}
    return str(summary.get("optimizer")) if arm == MULTI_OPTIMIZER_ARM or len(grids) > 1 else arm


def flat_settings(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` as dotted keys (``trainer.epochs``), lists and scalars as leaves."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{name}."))
        else:
            out[name] = value
    return out


def _source_study(summary: dict[str, Any], config: dict[str, Any]) -> tuple[str, str] | None:
    """(study, arm) of a run of a source-settings study, else None."""
    if summary.get("tuning"):
        return None
    study = SOURCE_STUDIES.get(str(summary.get("experiment")))
    if study is None:
        return None
    arm = study.arm_of(config.get("optimizer") or {})
    return None if arm is None else (study.experiment, arm)


def _cpu(path: Path) -> str:
    """The CPU a run ran on, as its environment.json records it ("unknown" when it does not)."""
    try:
        environment = json.loads((path / "environment.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    return str(environment.get("cpu") or "unknown") if isinstance(environment, dict) else "unknown"


def read_study_run(path: Path) -> StudyRun | None:
    """A campaign run (None when the folder is not one or cannot be read)."""
    try:
        summary = json.loads((path / "summary.json").read_text())
        config = yaml.safe_load((path / "config.yaml").read_text())
        tuning = summary.get("tuning")
        source = _source_study(summary, config)
        if source is not None:
            tuning = {"study": source[0], "arm": source[1], "stage": FINAL_STAGE}
            summary = {**summary, "tuning": tuning}
        if not isinstance(tuning, dict) or not tuning.get("study"):
            return None
        curve = _curve(path)
        cpu = _cpu(path)
    except (OSError, ValueError, KeyError, yaml.YAMLError):
        return None
    arm = _arm(summary)
    baseline, predictor = _baseline(summary, config)
    running = float(curve.running_loss[-1]) if curve.running_loss.size else math.nan
    complete = summary.get("status") == RunStatus.COMPLETED.value
    recorded_learned = summary.get("learned")
    outputs = _float(summary.get("final_train_loss")) / _float(
        summary.get("final_train_loss_per_output")
    )
    grid = (tuning.get("grid") or {}).get(str(summary.get("optimizer"))) or {}
    hyper = summary.get("hyperparameters") or {}
    return StudyRun(
        path=path,
        run_id=str(summary["run_id"]),
        study=str(tuning["study"]),
        arm=arm,
        stage=str(tuning.get("stage") or TUNE_STAGE),
        seed=int(summary["seed"]),
        status=str(summary.get("status")),
        sweep_id=str(summary.get("sweep_id")),
        hyperparameters={k: hyper.get(k) for k in grid},
        grid={str(k): list(v) for k, v in grid.items()},
        code_version=str(summary.get("code_version") or "unknown")[:7],
        cpu=cpu,
        data_variant=str(summary.get("data_variant")),
        model=str(summary.get("model")),
        final_running_loss=running,
        final_running_loss_per_output=running / outputs if outputs else math.nan,
        final_val_loss=_float(summary.get("final_val_loss")),
        final_test_loss=_float(summary.get("final_test_loss")),
        baseline_train_loss=baseline,
        baseline_predictor=predictor,
        learned=bool(recorded_learned)
        if recorded_learned is not None
        else bool(complete and learned(running, baseline)),
        wall_clock_s=_float(summary.get("wall_clock_s")),
        curve=curve,
        settings={
            k: v
            for k, v in flat_settings(config).items()
            if k not in BOOKKEEPING_KEYS and k.split(".")[0] not in BOOKKEEPING_KEYS
        },
    )


def _mismatches(group: Sequence[StudyRun], keys: Callable[[str], bool]) -> dict[str, str]:
    """run id -> the keys (of ``keys``) where it differs from the group's most common value.

    A key is compared only among the runs that record it (a setting added after older runs
    were recorded is absent from their config); ties go to the earliest run's value.
    """
    modal: dict[str, Any] = {}
    for key in sorted({k for r in group for k in r.settings if keys(k)}):
        values = [repr(r.settings[key]) for r in group if key in r.settings]
        counts = Counter(values)
        top = max(counts.values())
        modal[key] = next(v for v in values if counts[v] == top)
    out = {}
    for run in group:
        differ = [
            f"{k} {run.settings[k]!r} (others {modal[k]})"
            for k in modal
            if k in run.settings and repr(run.settings[k]) != modal[k]
        ]
        if differ:
            out[run.run_id] = "; ".join(differ)
    return out


def check_source_settings(runs: Sequence[StudyRun]) -> list[StudyRun]:
    """Runs of source-settings studies marked when their settings differ from their study's.

    Apart from the optimizer, every final run of the study must share its settings; within an
    arm, the optimizer settings too. Other runs (a pilot's, on a validation split) are returned
    unchanged.
    """
    marks: dict[str, list[str]] = {}
    for study in SOURCE_STUDIES:
        of_study = sorted(
            (r for r in runs if r.study == study and r.stage == FINAL_STAGE),
            key=lambda r: r.run_id,
        )
        found = [_mismatches(of_study, lambda k: not k.startswith("optimizer."))]
        for arm in sorted({r.arm for r in of_study}):
            group = [r for r in of_study if r.arm == arm]
            found.append(_mismatches(group, lambda k: k.startswith("optimizer.")))
        for mismatch in found:
            for run_id, text in mismatch.items():
                marks.setdefault(run_id, []).append(text)
    return [
        replace(r, settings_mismatch="; ".join(marks[r.run_id])) if r.run_id in marks else r
        for r in runs
    ]


def load_study(roots: Sequence[Path]) -> list[StudyRun]:
    """Every campaign run under ``roots``, sorted by study, arm, stage, seed, run id."""
    runs = []
    for root in roots:
        for path in find_run_folders(Path(root)):
            run = read_study_run(path)
            if run is not None:
                runs.append(run)
    runs = check_source_settings(runs)
    return sorted(runs, key=lambda r: (r.study, arm_rank(r.arm), r.stage, r.seed, r.run_id))


def arm_rank(arm: str) -> tuple[int, str]:
    """Sort key of an arm: the report's order, unknown arms last by name."""
    return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), arm)


# -------------------------------------------------------------------------------- per arm
@dataclass(frozen=True)
class TuningOutcome:
    """The tuning stage of one arm: trials spent, the winner, and whether it sits on an edge."""

    arm: str
    trials: int
    budget_grid: dict[str, list[Any]]
    winner: dict[str, Any]
    winner_val_loss: float
    on_edge: tuple[str, ...]  # grid axes (with > 1 value) whose winning value is an end point
    distinct: int  # distinct final validation losses among the trials (ties: same trajectory)


def tuning_outcome(
    runs: Sequence[StudyRun], study: str, arm: str, *, stage: str = TUNE_STAGE
) -> TuningOutcome | None:
    """Lowest final validation loss among the arm's completed tuning trials in ``study``
    (ties: run id); arms of other studies with the same name never mix in. ``stage``
    ``PILOT_STAGE``: the same over a pilot's runs."""
    trials = [r for r in runs if r.study == study and r.arm == arm and r.stage == stage]
    if not trials:
        return None
    done = [r for r in trials if r.status == RunStatus.COMPLETED.value]
    done = [r for r in done if math.isfinite(r.final_val_loss)]
    best = min(done, key=lambda r: (r.final_val_loss, r.run_id)) if done else None
    grid = merged_grid(trials)
    edges: tuple[str, ...] = ()
    if best is not None:
        edges = tuple(
            k
            for k, values in grid.items()
            if len(values) > 1 and best.hyperparameters.get(k) in (min(values), max(values))
        )
    return TuningOutcome(
        arm=arm,
        trials=len(trials),
        budget_grid=grid,
        winner={} if best is None else dict(best.hyperparameters),
        winner_val_loss=math.nan if best is None else best.final_val_loss,
        on_edge=edges,
        distinct=len({r.final_val_loss for r in trials}),
    )


def merged_grid(trials: Sequence[StudyRun]) -> dict[str, list[Any]]:
    """The grid the trials spanned: per setting, the sorted union of every round's values."""
    grid: dict[str, list[Any]] = {}
    for trial in trials:
        for key, values in trial.grid.items():
            grid[key] = [*grid.get(key, []), *(v for v in values if v not in grid.get(key, []))]
    return {k: sorted(v, key=lambda x: (x is None, x)) for k, v in grid.items()}


@dataclass(frozen=True)
class ArmOutcome:
    """Final-stage (fresh-seed) runs of one arm: usable values by seed and the excluded runs.

    ``runs`` are the reruns of the arm's current tuning winner; reruns of an earlier winner,
    replaced when a later tuning round found a better setting, are kept apart in ``superseded``
    and never enter claims."""

    arm: str
    runs: tuple[StudyRun, ...]
    superseded: tuple[StudyRun, ...] = ()

    @property
    def usable(self) -> tuple[StudyRun, ...]:
        """Runs that enter claims."""
        return tuple(r for r in self.runs if r.usable)

    @property
    def excluded(self) -> tuple[StudyRun, ...]:
        """Runs left out of claims (not completed or did not learn)."""
        return tuple(r for r in self.runs if not r.usable)

    def by_seed(self, metric: str = "final_running_loss") -> dict[int, float]:
        """Usable values of ``metric`` by seed (latest run of a seed wins)."""
        return {r.seed: float(getattr(r, metric)) for r in self.usable}


def arm_outcomes(runs: Sequence[StudyRun], study: str) -> dict[str, ArmOutcome]:
    """Final-stage runs of a study, per arm, in the report's arm order."""
    finals = [r for r in runs if r.study == study and r.stage == FINAL_STAGE]
    arms = sorted({r.arm for r in finals}, key=arm_rank)
    out = {}
    for arm in arms:
        of_arm = [r for r in finals if r.arm == arm]
        tuned = tuning_outcome(runs, study, arm)
        if tuned is None or not tuned.winner:  # source-settings studies: no tuning stage
            out[arm] = ArmOutcome(arm, tuple(of_arm))
            continue
        current = [_same_setting(r.hyperparameters, tuned.winner) for r in of_arm]
        out[arm] = ArmOutcome(
            arm,
            tuple(r for r, now in zip(of_arm, current, strict=True) if now),
            tuple(r for r, now in zip(of_arm, current, strict=True) if not now),
        )
    return out


def _same_setting(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs' swept settings agree on every setting both record."""
    return all(a[k] == b[k] for k in a.keys() & b.keys())


# ---------------------------------------------------------------------------- time to target
@dataclass(frozen=True)
class TimeToTarget:
    """Steps and wall-clock until a run's per-epoch running loss first reaches the target."""

    reached: int
    n: int
    median_steps: float  # over the runs that reached it; NaN when none did
    median_wall_s: float


def study_target(outcomes: dict[str, ArmOutcome]) -> tuple[float, str]:
    """One target per benchmark: the best first-order arm's mean final running loss."""
    candidates = []
    for arm in ("sgd", "adam"):
        if arm in outcomes and outcomes[arm].usable:
            values = [r.final_running_loss for r in outcomes[arm].usable]
            candidates.append((float(np.mean(values)), arm))
    if not candidates:
        return math.nan, ""
    return min(candidates)


def time_to_target(outcome: ArmOutcome, target: float) -> TimeToTarget:
    """Per usable run: the first epoch end with running loss ≤ target; medians over reachers."""
    steps, walls = [], []
    for run in outcome.usable:
        hits = np.flatnonzero(run.curve.running_loss <= target)
        if hits.size:
            steps.append(float(run.curve.steps[hits[0]]))
            walls.append(float(run.curve.wall_s[hits[0]]))
    n = len(outcome.usable)
    return TimeToTarget(
        reached=len(steps),
        n=n,
        median_steps=float(np.median(steps)) if steps else math.nan,
        median_wall_s=float(np.median(walls)) if walls else math.nan,
    )


# -------------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class StudyVerdictRow:
    """One judged comparison of one benchmark."""

    study: str
    spec: ComparisonSpec
    judged: Judged
    usable_a: tuple[int, int]  # (runs that learned, final runs) of arm A
    usable_b: tuple[int, int]


def comparisons_of(
    runs: Sequence[StudyRun],
) -> list[tuple[str, ComparisonSpec, Comparison, dict[str, ArmOutcome]]]:
    """Every comparison of ``COMPARISONS`` whose two arms both have final runs, per study."""
    out = []
    for study in sorted({r.study for r in runs}):
        outcomes = arm_outcomes(runs, study)
        for spec in COMPARISONS:
            if spec.a in outcomes and spec.b in outcomes:
                comparison = compare_paired(
                    spec.label,
                    spec.a,
                    spec.b,
                    outcomes[spec.a].by_seed(),
                    outcomes[spec.b].by_seed(),
                )
                out.append((study, spec, comparison, outcomes))
    return out


def _counts(outcome: ArmOutcome) -> tuple[int, int]:
    return len(outcome.usable), len(outcome.runs)


def study_verdicts(runs: Sequence[StudyRun]) -> list[StudyVerdictRow]:
    """All comparisons reported together, Holm-corrected as one family, with their verdicts."""
    found = comparisons_of(runs)
    judged = judge([c for _, _, c, _ in found])
    return [
        StudyVerdictRow(s, spec, j, _counts(o[spec.a]), _counts(o[spec.b]))
        for (s, spec, _, o), j in zip(found, judged, strict=True)
    ]
