"""Optional Weights & Biases mirror of what the results store records."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Protocol

from suite.config import LoggerConfig, WandbMode


class MetricsLogger(Protocol):
    """Receives the same metrics the results store writes."""

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        """Log one row of metrics at an optimizer step."""

    def finish(self, summary: dict[str, Any]) -> None:
        """Record the run summary and close."""


class NullLogger:
    """Logs nothing (``logger=none``)."""

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        """Discard metrics."""

    def finish(self, summary: dict[str, Any]) -> None:
        """Nothing to close."""


def account_configured() -> bool:
    """True when an API key is set or stored by ``wandb login``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: WandbMode) -> str:
    """The W&B mode to use: an explicit setting or WANDB_MODE wins, else online iff logged in."""
    if mode is not WandbMode.auto:
        return mode.value
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if account_configured() else "offline"


class WandbLogger:
    """Mirrors metrics and summary to a W&B run (offline files unless an account is set)."""

    def __init__(
        self,
        cfg: LoggerConfig,
        *,
        run_id: str,
        run_dir: Path,
        group: str | None,
        config: dict[str, Any],
        resume: bool,
    ) -> None:
        import wandb  # lazy: optional heavy dependency, loaded only when used

        self.mode = resolve_mode(cfg.mode)
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            id=run_id,
            name=run_id,
            group=group,
            tags=list(cfg.tags),
            config=config,
            dir=str(run_dir),
            mode=self.mode,  # type: ignore[arg-type]
            resume="allow" if resume else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self._run.define_metric("wall_time_s")
        self._run.define_metric("*", step_metric="step")

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        """Log metrics against the optimizer step (wall_time_s is logged alongside)."""
        self._run.log({**metrics, "step": step})

    def finish(self, summary: dict[str, Any]) -> None:
        """Copy the summary's scalars and close the run."""
        for key, value in summary.items():
            if isinstance(value, int | float | str | bool) or value is None:
                self._run.summary[key] = value
        self._run.finish()


def make_logger(
    cfg: LoggerConfig,
    *,
    run_id: str,
    run_dir: Path,
    group: str | None,
    config: dict[str, Any],
    resume: bool,
) -> MetricsLogger:
    """The logger that ``logger.backend`` names."""
    if cfg.backend == "none" or resolve_mode(cfg.mode) == "disabled":
        return NullLogger()
    return WandbLogger(
        cfg, run_id=run_id, run_dir=run_dir, group=group, config=config, resume=resume
    )
