"""Top-level structured config and its registration in Hydra's ConfigStore.

Every group's YAML file starts from a schema registered here (``schema_<name>``), so a misspelled
key or a value of the wrong type fails at composition with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from datasets.config import DataConfig
from optimizers.distributed import InverseStrategy
from suite.distributed import Launch


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


class WandbMode(str, Enum):
    """W&B mode; ``auto`` = online when an account is configured, else offline."""

    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class TrainerConfig:
    """How long and how a run trains, evaluates and checkpoints."""

    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (None: epochs decide)
    batch_size: int = 1000
    eval_every_steps: int | None = None  # None: evaluate once per epoch
    eval_batch_size: int = 10000
    seed: int = 0
    device: DeviceChoice = DeviceChoice.auto
    dtype: DType = DType.float32
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    lr_milestones: list[int] = field(default_factory=list)  # epochs at which lr *= lr_gamma
    lr_gamma: float = 0.1
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float | None = 10.0
    resume: str | None = None  # a run folder to continue; None: new run (or auto-requeue)
    diverge_loss: float = 1.0e8  # a batch loss above this (or non-finite) marks divergence
    diagnostics: bool = False  # curvature diagnostics at evaluations (small models only)
    progress: bool = True
    distributed: Launch = Launch.none  # none | auto | torchrun | slurm (suite/distributed.py)
    # K-FAC over several ranks: inverses on every rank (redundant) or split and broadcast
    distributed_inverses: InverseStrategy = InverseStrategy.redundant


@dataclass
class LoggerConfig:
    """Optional Weights & Biases mirror of the results store."""

    backend: str = "none"  # wandb | none
    project: str = "two-level-kfac"
    entity: str | None = None
    mode: WandbMode = WandbMode.auto
    tags: list[str] = field(default_factory=list)


@dataclass
class ResultsConfig:
    """Where run folders go."""

    root: str = "results/runs"


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
    tuning: Any = None  # tuning-protocol record (budget, grid) set by tuning presets


def register_configs() -> None:
    """Register the top-level schema and every group schema with Hydra."""
    from models.config import SCHEMAS as MODEL_SCHEMAS
    from optimizers.registry import SCHEMAS as OPTIMIZER_SCHEMAS

    store = ConfigStore.instance()
    store.store(name="schema_config", node=Config)
    store.store(group="logger", name="schema_logger", node=LoggerConfig)
    for name, node in MODEL_SCHEMAS.items():
        store.store(group="model", name=name, node=node)
    for name, node in OPTIMIZER_SCHEMAS.items():
        store.store(group="optimizer", name=name, node=node)
