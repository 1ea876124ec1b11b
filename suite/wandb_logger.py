"""Optional Weights & Biases mirror of what the results store records.

The mirror never decides a run's fate: if W&B fails (its service killed with the job's process
group on a SLURM requeue, a reset connection, any exception in init, log or finish), a warning
is printed once and the run continues with the results store alone. A resumed run continues its
W&B run (same id, ``resume="allow"``).
"""

from __future__ import annotations

import contextlib
import netrc
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from suite.config import LoggerConfig, WandbMode


class MetricsLogger(Protocol):
    """Receives the same metrics the results store writes."""

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        """Log one row of metrics at an optimizer step."""

    def finish(self, summary: dict[str, Any]) -> None:
        """Record the run summary and close."""

    def resumed(self, history: Iterable[dict[str, Any]]) -> None:
        """Called once when a run continues from its checkpoint, with the rows logged so far."""


class NullLogger:
    """Logs nothing (``logger=none``)."""

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        """Discard metrics."""

    def finish(self, summary: dict[str, Any]) -> None:
        """Nothing to close."""

    def resumed(self, history: Iterable[dict[str, Any]]) -> None:
        """Nothing to continue."""


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
        self.run_id = run_id

    def resumed(self, history: Iterable[dict[str, Any]]) -> None:
        """Continue the run's W&B history.

        Online, W&B continues the run itself (same id, ``resume="allow"``). Offline, every
        ``wandb.init`` starts a new ``offline-run-<time>-<id>`` folder, so the history so far is
        replayed into the new folder from the results store and the run's older offline folders
        are removed: one folder per run, holding its whole history, for ``wandb sync``.
        """
        if self.mode != "offline":
            return
        for row in history:
            self._run.log(dict(row))
        current = Path(self._run.settings.sync_dir).resolve()
        for older in current.parent.glob(f"offline-run-*-{self.run_id}"):
            if older.resolve() != current and older.is_dir():
                shutil.rmtree(older, ignore_errors=True)

    def abandon(self) -> None:
        """After a failure: drop W&B's exit hook (it would fail again, with a traceback)."""
        import wandb  # lazy: optional heavy dependency, loaded only when used

        # The service is gone; teardown unregisters its exit hook before it fails.
        with contextlib.suppress(Exception):
            wandb.teardown()

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        """Log metrics against the optimizer step (wall_time_s is logged alongside)."""
        self._run.log({**metrics, "step": step})

    def finish(self, summary: dict[str, Any]) -> None:
        """Copy the summary's scalars and close the run."""
        for key, value in summary.items():
            if isinstance(value, int | float | str | bool) or value is None:
                self._run.summary[key] = value
        self._run.finish()


class SafeLogger:
    """Forwards to a logger until its first exception; then warns once and drops it."""

    def __init__(self, inner: MetricsLogger) -> None:
        self._inner: MetricsLogger | None = inner

    def _failed(self, action: str, err: BaseException) -> None:
        abandon = getattr(self._inner, "abandon", None)
        if callable(abandon):
            abandon()
        first = str(err).splitlines()[0] if str(err) else ""
        print(
            f"warning: W&B {action} failed ({type(err).__name__}: {first}); the run continues, "
            "recorded in its run folder only",
            file=sys.stderr,
        )
        self._inner = None

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        """Forward one row unless W&B has failed."""
        if self._inner is not None:
            try:
                self._inner.log(metrics, step=step)
            except Exception as err:
                self._failed("log", err)

    def resumed(self, history: Iterable[dict[str, Any]]) -> None:
        """Forward the history so far unless W&B has failed."""
        if self._inner is not None:
            try:
                self._inner.resumed(history)
            except Exception as err:
                self._failed("resume", err)

    def finish(self, summary: dict[str, Any]) -> None:
        """Forward the summary and close, unless W&B has failed."""
        if self._inner is not None:
            inner, self._inner = self._inner, None
            try:
                inner.finish(summary)
            except Exception as err:
                self._inner = inner
                self._failed("finish", err)


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
    try:
        inner = WandbLogger(
            cfg, run_id=run_id, run_dir=run_dir, group=group, config=config, resume=resume
        )
    except Exception as err:
        safe = SafeLogger(NullLogger())
        safe._failed("init", err)
        return safe
    return SafeLogger(inner)
