"""Compose and validate every job of a command line before any work starts.

Hydra's own composition errors span several lines; this turns them (and the suite's semantic
checks) into one line naming the setting and what is allowed, and exits with status 2. A sweep
(``-m``) also has each job's data located before anything is submitted (SLURM included).
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from core.errors import ConfigError
from datasets import load_dataset
from suite.config import register_configs
from suite.optimizer_settings import apply_optimizer_settings
from suite.presets import CONF_DIR, group_options
from suite.validate import UNKNOWN_SETTING, check_writable, validate_config

MAX_JOBS_CHECKED = 512
# Hydra flags after which preflight stands aside (they print or install, never train).
PASSIVE_FLAGS = (
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--help",
    "-h",
    "--hydra-help",
    "-sc",
    "--shell-completion",
)
HIDDEN_PREFIX = "schema_"  # structured-config schemas: building blocks, never a choice
FLAGS_WITH_VALUE = (
    "-cn",
    "--config-name",
    "-cp",
    "--config-path",
    "-cd",
    "--config-dir",
    "-p",
    "--package",
)


def check_override(override: str) -> None:
    """Refuse a schema as a preset and ``+`` additions of settings that no schema declares."""
    key, _, value = override.partition("=")
    group = key.lstrip("+~")
    if "." not in group and (CONF_DIR / group).is_dir():
        if value.startswith(HIDDEN_PREFIX) or any(
            v.strip().startswith(HIDDEN_PREFIX) for v in value.split(",")
        ):
            allowed = ", ".join(group_options(group)) or "(none)"
            raise ConfigError(group, f"unknown option '{value}'; allowed: {allowed}")
        return
    if key.startswith("+") and not key.startswith("++"):
        raise ConfigError(group, UNKNOWN_SETTING)


def optimizer_family(preset: str) -> str:
    """The family (schema ``name``) of an optimizer preset, as composition resolves it."""
    if preset not in group_options("optimizer"):
        allowed = ", ".join(group_options("optimizer"))
        raise ConfigError("optimizer", f"unknown option '{preset}'; allowed: {allowed}")
    register_configs()
    return str(compose_job([f"optimizer={preset}", "logger=none"]).optimizer.name)


def one_line(err: Exception) -> str:
    """A single-line description of a composition or validation error."""
    if isinstance(err, ConfigError):
        return str(err)
    text = str(err)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        allowed = ", ".join(group_options(group)) or "(none)"
        return f"{group}: unknown option '{option}'; allowed: {allowed}"
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(cause, ConfigKeyError):
        key = getattr(cause, "full_key", None) or "setting"
        return f"{key}: {UNKNOWN_SETTING}"
    if isinstance(cause, ValidationError):
        key = getattr(cause, "full_key", None) or "setting"
        first = str(cause).splitlines()[0]
        return f"{key}: {first}"
    override = re.search(r"Could not override '([^']+)'", text)
    if override:
        return f"{override.group(1)}: {UNKNOWN_SETTING}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:300]


def job_overrides(argv: list[str]) -> tuple[str, list[list[str]]] | None:
    """Config name and the override list of each job the command line would run."""
    config_name = "config"
    plain: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in PASSIVE_FLAGS:
            return None
        if arg in FLAGS_WITH_VALUE:
            value = next(args, "")
            if arg in ("-cn", "--config-name"):
                config_name = value
            continue
        if arg.startswith("-"):
            continue
        key = arg.lstrip("+~").split("=", 1)[0]
        if key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        check_override(arg)
        plain.append(arg)
    parsed = OverridesParser.create().parse_overrides(plain)
    choices: list[list[str]] = []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line or ""])
    jobs = [
        list(combo) for combo in itertools.islice(itertools.product(*choices), MAX_JOBS_CHECKED)
    ]
    return config_name, jobs


def compose_job(overrides: list[str], *, config_name: str = "config") -> DictConfig:
    """Compose the config one job would get (as ``run.py`` would, without running it)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="preflight"):
        cfg = compose(config_name=config_name, overrides=overrides)
    return apply_optimizer_settings(cfg, overrides) if "optimizer" in cfg else cfg


def compose_with_choices(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """Compose a job's config and return it with Hydra's chosen preset per group."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="preflight"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    choices = {str(k): str(v) for k, v in cfg.hydra.runtime.choices.items()}
    with open_dict(cfg):
        del cfg["hydra"]
    return apply_optimizer_settings(cfg, overrides), choices


def check_data(cfgs: list[DictConfig]) -> None:
    """Locate (load on the CPU) each distinct dataset of the jobs; raises its one-line error."""
    seen: set[str] = set()
    for cfg in cfgs:
        key = f"{cfg.model.dataset}\n{OmegaConf.to_yaml(cfg.data)}"
        if key in seen:
            continue
        seen.add(key)
        load_dataset(
            str(cfg.model.dataset),
            cfg.data,
            device=torch.device("cpu"),
            seed=int(cfg.trainer.seed),
            task=cfg.model.task,
        )


def preflight(argv: list[str]) -> None:
    """Exit with one line on stderr and status 2 if any job of this command line is invalid."""
    try:
        planned = job_overrides(argv)
        if planned is None:
            return
        config_name, jobs = planned
        roots: set[Path] = set()
        cfgs: list[DictConfig] = []
        for overrides in jobs:
            cfg = compose_job(overrides, config_name=config_name)
            validate_config(cfg)
            roots.add(Path(str(cfg.results.root)))
            cfgs.append(cfg)
        for root in sorted(roots):
            check_writable(root)
        if "-m" in argv or "--multirun" in argv:
            check_data(cfgs)
    except (HydraException, OmegaConfBaseException, ConfigError, ValueError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
