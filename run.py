"""Train one configuration, or sweep many with ``-m``: ``python run.py optimizer=kfac2``."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from core.errors import ConfigError
from suite.config import register_configs
from suite.preflight import preflight
from suite.store import RunStatus
from suite.sweep import write_outcome
from suite.train import RunContext, run

register_configs()
TRACEBACK_FILE = "traceback.txt"  # in a failed sweep job's Hydra folder


def _job_failed(ctx: RunContext, err: Exception) -> str:
    """A failed job of a sweep: one line here and in the sweep summary; the sweep goes on."""
    first = str(err).splitlines()[0] if str(err) else ""
    message = first if isinstance(err, ConfigError) else f"{type(err).__name__}: {first}"
    where = ctx.run_folder
    assert ctx.job_dir is not None
    ctx.job_dir.mkdir(parents=True, exist_ok=True)
    if not isinstance(err, ConfigError):
        (ctx.job_dir / TRACEBACK_FILE).write_text(traceback.format_exc())
        message += f" (traceback: {ctx.job_dir / TRACEBACK_FILE})"
    write_outcome(
        ctx.job_dir, status="failed", run_folder=where, error=message, overrides=ctx.overrides
    )
    print(f"error: {message}; see {where or ctx.job_dir}", file=sys.stderr)
    return RunStatus.FAILED.value


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> str:
    """Hydra entry point: one job."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    ctx = RunContext(
        model_preset=hc.runtime.choices["model"],
        optimizer_preset=hc.runtime.choices["optimizer"],
        sweep_id=Path(hc.sweep.dir).name if multirun else None,
        job_dir=Path(hc.runtime.output_dir),
        overrides=[str(o) for o in hc.overrides.task],
    )
    try:
        status = run(cfg, ctx).status
    except ConfigError as err:
        if multirun:
            return _job_failed(ctx, err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if multirun:
            return _job_failed(ctx, err)
        raise
    if multirun:
        write_outcome(
            ctx.job_dir,  # type: ignore[arg-type]
            status=status.value,
            run_folder=ctx.run_folder,
            error=None,
            overrides=ctx.overrides,
        )
    if status is RunStatus.INTERRUPTED:
        if not multirun:
            sys.exit(130)
        if os.environ.get("SLURM_JOB_ID"):
            # Stopped (SIGTERM: requeue or preemption) with a checkpoint: leave no result, so that
            # submitit waits for the requeued job, which resumes this run.
            sys.exit(128 + signal.SIGTERM)
    return status.value


if __name__ == "__main__":
    torch.set_flush_denormal(True)  # before torch's thread pool starts (see seed_everything)
    preflight(sys.argv[1:])
    main()
