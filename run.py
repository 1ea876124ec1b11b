"""Train one configuration, or sweep many with ``-m``: ``python run.py optimizer=kfac2``."""

from __future__ import annotations

import sys
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
from suite.train import RunContext, run

register_configs()


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
    )
    try:
        status = run(cfg, ctx).status
    except ConfigError as err:
        if multirun:  # let the launcher record this job as failed; the sweep goes on
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if status is RunStatus.INTERRUPTED and not multirun:
        sys.exit(130)
    return status.value


if __name__ == "__main__":
    torch.set_flush_denormal(True)  # before torch's thread pool starts (see seed_everything)
    preflight(sys.argv[1:])
    main()
