"""Which run a job continues, and with which config: a run folder owns its config.

- ``trainer.resume=<folder>`` continues that run with the config stored in its ``config.yaml``.
  Overrides given with it are refused (one line naming them) unless they leave the run's
  results unchanged (``RESUMABLE``: progress bar, threads, checkpoint cadence, logger, ...) or
  only extend it (``EXTENDABLE``: a larger ``trainer.epochs`` / ``trainer.max_steps``); an
  override equal to the stored value is accepted as a no-op. How the process was launched
  (``LAUNCH``: ``trainer.distributed``) always comes from the command line.
- Automatic resume (a requeued job, a re-launched sweep) follows a pointer in the job's Hydra
  folder named by a hash of the job's full resolved config (seed included): another config
  sharing the folder (a fixed ``hydra.run.dir``) never finds it. The same config finds it, which
  is safe: it continues the identical computation, and the folder lock keeps a concurrent twin
  out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from core.errors import ConfigError
from models import as_model_config
from optimizers.registry import FAMILIES
from suite.config import Config
from suite.store import atomic_write_text

POINTERS_DIR = ".resume"  # in a Hydra job folder: <key>.txt holds the run folder of that job
# Settings that change how a run is executed or mirrored, never its numbers.
RESUMABLE = (
    "trainer.resume",
    "trainer.progress",
    "trainer.threads",
    "trainer.checkpoint_every_steps",
    "trainer.checkpoint_every_minutes",
    "trainer.keep_checkpoint",
    "results.root",
)
RESUMABLE_GROUPS = ("logger", "launcher", "hydra")  # whole groups (and their settings)
EXTENDABLE = ("trainer.epochs", "trainer.max_steps")  # only larger values (a longer run)
# How this process was launched: always the given value (a different number of ranks is refused
# by the trainer, `suite.distributed.check_resume_ranks`).
LAUNCH = ("trainer.distributed",)
PRESET_GROUPS = ("model", "optimizer")  # compared by preset name with the run's summary


_ABSENT = object()


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return getattr(value, "value", value)


def load_config(yaml_text: str) -> DictConfig:
    """A stored ``config.yaml`` as a typed config (schemas of the run's model and optimizer)."""
    raw = OmegaConf.create(yaml_text)
    assert isinstance(raw, DictConfig)
    rest = {k: v for k, v in raw.items() if k not in ("model", "optimizer")}
    cfg = OmegaConf.merge(OmegaConf.structured(Config), rest)
    family = FAMILIES.get(str(raw.optimizer.name))
    if family is None:
        raise ConfigError("optimizer.name", f"unknown '{raw.optimizer.name}' in the stored config")
    with open_dict(cfg):
        cfg.model = OmegaConf.structured(as_model_config(raw.model))
        cfg.optimizer = OmegaConf.merge(OmegaConf.structured(family.schema), raw.optimizer)
    assert isinstance(cfg, DictConfig)
    return cfg


def _larger(key: str, given: Any, stored: Any) -> bool:
    if key == "trainer.max_steps":  # null = no step limit, the largest
        return given is None or (stored is not None and given >= stored)
    return given is not None and stored is not None and given >= stored


def resume_config(
    stored: DictConfig,
    given: DictConfig,
    *,
    overrides: Sequence[str],
    stored_presets: dict[str, str],
    given_presets: dict[str, str],
    folder: Path,
) -> DictConfig:
    """The config a resumed run continues with: the stored one plus the allowed overrides."""
    effective = stored.copy()
    for key in LAUNCH:
        OmegaConf.update(effective, key, _plain(OmegaConf.select(given, key)), merge=False)
    refused: list[str] = []
    for override in overrides:
        key = _key(override)
        group = key.split(".")[0].split("/")[0]
        if group in RESUMABLE_GROUPS:
            if group == "logger":
                with open_dict(effective):
                    effective.logger = given.logger
            continue
        if key in PRESET_GROUPS:
            if given_presets.get(key) != stored_presets.get(key):
                refused.append(f"{override} (the run's is {stored_presets.get(key)})")
            continue
        given_value = _plain(OmegaConf.select(given, key, default=None))
        stored_value = _plain(OmegaConf.select(stored, key, default=None))
        known = OmegaConf.select(stored, key, default=_ABSENT) is not _ABSENT
        if key in LAUNCH:
            continue
        if key in RESUMABLE or (key in EXTENDABLE and _larger(key, given_value, stored_value)):
            OmegaConf.update(effective, key, given_value, merge=False)
        elif given_value != stored_value or not known:
            refused.append(f"{override} (the run's is {stored_value})")
    if refused:
        raise ConfigError(
            "trainer.resume",
            f"run '{folder}' owns its config; refused: {'; '.join(refused)}; allowed with "
            "trainer.resume: larger trainer.epochs or trainer.max_steps, "
            f"{', '.join(RESUMABLE[1:])}, logger.*",
        )
    with open_dict(effective):
        effective.trainer.resume = None
    return effective


def job_key(cfg: DictConfig) -> str:
    """Names one job's pointer: a hash of its full resolved config (seed included)."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    return "config-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def pointer_path(job_dir: Path, key: str) -> Path:
    """Where a job's pointer to its run folder lives."""
    return job_dir / POINTERS_DIR / f"{key}.txt"


def own_run(job_dir: Path | None, key: str) -> Path | None:
    """The run folder this very job started before (a requeue), if it recorded one."""
    if job_dir is None:
        return None
    path = pointer_path(job_dir, key)
    if not path.is_file():
        return None
    return Path(path.read_text().strip())


def remember_run(job_dir: Path | None, key: str, folder: Path) -> None:
    """Record the run folder this job writes, for its own requeue."""
    if job_dir is None:
        return
    path = pointer_path(job_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, str(folder.resolve()) + "\n")
