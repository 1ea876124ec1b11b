"""Top-level structured config and its registration in Hydra's ConfigStore.

Every group's YAML file starts from a schema registered here (``schema_<name>``), so a misspelled
key or a value of the wrong type fails at composition with a message naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, ListConfig

from core.errors import ConfigError
from core.settings import bounded, check_settings, one_of, required
from datasets.config import DataConfig
from models.config import SCHEMAS as MODEL_SCHEMAS
from optimizers.distributed import InverseStrategy
from optimizers.registry import SCHEMAS as OPTIMIZER_SCHEMAS
from suite.distributed import Launch
from suite.presets import register_help_resolver
from suite.sweep import register_resolvers


class DeviceChoice(str, Enum):
    """Where to train; ``auto`` picks CUDA when present."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    """Floating-point type of model and data."""

    float32 = "float32"
    float64 = "float64"


class Scale(str, Enum):
    """Scale of an experiment preset: the paper's settings or a laptop-sized version."""

    full = "full"
    small = "small"


class TuningStage(str, Enum):
    """Which part of the tuning protocol a run belongs to (``tuning.stage``)."""

    TUNE = "tune"
    FINAL = "final"  # set by suite.tuning on the reruns of a winner
    EXTENSION = "extension"  # beyond a winner's grid edge: reported, never selected
    # a setting outside the campaign's arms, run to check a design choice (which of a source's
    # variants an arm stands for): reported apart, never selected, never in a claim
    PILOT = "pilot"


class WandbMode(str, Enum):
    """W&B mode; ``auto`` = online when an account is configured, else offline."""

    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class TrainerConfig:
    """How long and how a run trains, evaluates and checkpoints."""

    epochs: int = bounded(10, ge=0, integer=True)
    max_steps: int | None = bounded(  # stop after this many optimizer steps
        None, ge=1, integer=True, null="the epochs decide"
    )
    batch_size: int = bounded(1000, ge=1, integer=True)
    eval_every_steps: int | None = bounded(None, ge=1, integer=True, null="once per epoch")
    eval_batch_size: int = bounded(10000, ge=1, integer=True)
    seed: int = bounded(0, ge=0, integer=True)
    device: DeviceChoice = DeviceChoice.auto
    dtype: DType = DType.float32
    threads: int | None = bounded(None, ge=1, integer=True, null="torch's default")  # intra-op
    lr_milestones: list[int] = field(default_factory=list)  # epochs at which lr *= lr_gamma
    lr_gamma: float = bounded(0.1, gt=0)
    # ReduceLROnPlateau on the test loss of epoch-end evaluations (lr *= lr_gamma after this many
    # epochs without improvement; the two-level authors' toy: 10)
    lr_plateau_patience: int | None = bounded(None, ge=0, integer=True, null="off")
    lr_min: float = bounded(1.0e-7, ge=0)  # floor of the plateau schedule (the authors' min_lr)
    # stop (completed) after this many epochs without a lower epoch-mean running train loss
    # (Koroko et al.'s EarlyStopping(patience=10) on their train loss); null: run every epoch
    early_stop_patience: int | None = bounded(None, ge=1, integer=True, null="off")
    checkpoint_every_steps: int | None = bounded(None, ge=1, integer=True, null="off")
    checkpoint_every_minutes: float | None = bounded(10.0, gt=0, null="off")
    resume: str | None = None  # a run folder to continue; None: new run (or auto-requeue)
    keep_checkpoint: bool = False  # keep checkpoint.pt of completed/diverged runs (else removed)
    diverge_loss: float = bounded(1.0e8, gt=0)  # a batch loss above this (or not finite) diverges
    diagnostics: bool = False  # curvature diagnostics at evaluations (small models only)
    progress: bool = True
    distributed: Launch = Launch.none  # none | auto | torchrun | slurm (suite/distributed.py)
    # K-FAC over several ranks: inverses on every rank (redundant) or split and broadcast
    distributed_inverses: InverseStrategy = InverseStrategy.redundant

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class LoggerConfig:
    """Optional Weights & Biases mirror of the results store."""

    backend: str = one_of("none", "wandb")  # wandb | none
    project: str = "two-level-kfac"
    entity: str | None = None
    mode: WandbMode = WandbMode.auto
    tags: list[str] = field(default_factory=list)
    step_every: int = bounded(10, ge=1, integer=True)  # per-step rows to W&B every this many

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class ResultsConfig:
    """Where run folders go."""

    root: str = "results/runs"


TUNING_PROTOCOL = (
    "equal-budget grid search; selection by final validation loss; rerun with fresh seeds"
)


@dataclass(kw_only=True)
class TuningConfig:
    """The tuning protocol of a tuning preset (``conf/experiment/tune_*``; `suite.tuning`).

    Every optimizer preset in ``grid`` gets exactly ``budget`` trials (the product of its axes'
    lengths); runs record this node in their summary.
    """

    protocol: str = TUNING_PROTOCOL
    stage: str = one_of(*(stage.value for stage in TuningStage))  # TuningStage above
    source_sweep: str | None = None  # on reruns: the tuning sweep they were selected from
    budget: int = required(ge=1, integer=True)  # trials per optimizer
    selection: str = one_of("final_val_loss")  # the summary field the lowest of which wins
    rerun_seeds: int = bounded(5, ge=1, integer=True)  # fresh seeds for the winner's rerun
    grid: dict[str, dict[str, list[Any]]] = field(
        default_factory=dict
    )  # optimizer preset -> {setting: [values]}; one trial per point
    study: str | None = None  # the campaign (benchmark) a study preset belongs to (analyze.study)
    arm: str | None = None  # the arm of that campaign this preset tunes (analyze.study)
    # 1: the planned grid; 2, 3, ...: a planned extension of it, whose trials join the earlier
    # rounds' in one selection (`python -m suite.tuning protocol --after <earlier sweep>`)
    round: int = bounded(1, ge=1, integer=True)

    def __post_init__(self) -> None:
        check_settings(self)
        if not self.grid:
            raise ConfigError("grid", "allowed: a mapping optimizer preset -> {setting: [values]}")
        for optimizer, axes in self.grid.items():
            if not all(isinstance(v, list | ListConfig) and len(v) for v in axes.values()):
                raise ConfigError(f"grid.{optimizer}", "allowed: {setting: [values, ...]}")
            points = math.prod(len(values) for values in axes.values())
            if points != self.budget:
                raise ConfigError(
                    f"grid.{optimizer}",
                    f"has {points} points but the budget is {self.budget}; every optimizer gets "
                    "the same",
                )


@dataclass
class Config:
    """The whole run configuration (``python run.py --cfg job`` prints it)."""

    model: Any = MISSING
    optimizer: Any = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    experiment: str | None = None  # name of the experiment preset, if any
    scale: Scale | None = None  # scale of that preset
    tuning: TuningConfig | None = None  # the tuning protocol, set by tuning presets
    # family (sgd, adam, kfac, kfac2) -> settings merged over the chosen optimizer preset, below
    # the command line (suite/optimizer_settings.py); emptied once applied
    optimizer_settings: dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Register the top-level schema and every group schema with Hydra."""
    register_resolvers()
    register_help_resolver()
    store = ConfigStore.instance()
    store.store(name="schema_config", node=Config)
    store.store(group="logger", name="schema_logger", node=LoggerConfig)
    for name, node in MODEL_SCHEMAS.items():
        store.store(group="model", name=name, node=node)
    for name, node in OPTIMIZER_SCHEMAS.items():
        store.store(group="optimizer", name=name, node=node)
