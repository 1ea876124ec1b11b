"""Small reproduction presets refresh K-FAC's curvature often enough to mean something."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from datasets import load_dataset
from suite.preflight import compose_job, compose_with_choices

ROOT = Path(__file__).resolve().parents[1]
SMALL = sorted(
    p.stem
    for p in (ROOT / "conf" / "experiment").glob("*_small.yaml")
    if p.stem.startswith(("tselepidis_", "koroko_"))
)
MIN_REFRESHES = 10  # inverse refreshes a run (issue #16)


def inverse_refreshes(preset: str) -> int | None:
    """Inverse refreshes of the preset's K-FAC run; None when its data is not on this machine."""
    cfg = compose_job([f"experiment={preset}", "optimizer=kfac"])
    try:
        data = load_dataset(str(cfg.model.dataset), cfg.data, device=torch.device("cpu"), seed=0)
    except Exception:  # any reason (real CIFAR-10, FACES are not stored offline)
        return None
    steps = data.train.x.shape[0] // int(cfg.trainer.batch_size) * int(cfg.trainer.epochs)
    return math.ceil(steps / int(cfg.optimizer.inv_period))


@pytest.mark.parametrize("preset", SMALL)
def test_small_preset_refreshes_inverses_at_least_ten_times(preset: str) -> None:
    refreshes = inverse_refreshes(preset)
    if refreshes is None:
        pytest.skip(f"{preset}: data not available offline")
    assert refreshes >= MIN_REFRESHES, (preset, refreshes)


FIRST_ORDER = sorted(  # halves of author presets split per optimizer family
    p.stem
    for p in (ROOT / "conf" / "experiment").glob("*_small_first_order.yaml")
    if p.stem.startswith(("tselepidis_", "koroko_"))
)


@pytest.mark.parametrize("half", FIRST_ORDER)
def test_first_order_half_records_the_same_experiment_with_the_same_protocol(half: str) -> None:
    """A preset split per optimizer family stays one experiment: same name, data and trainer."""
    preset = half.removesuffix("_first_order")
    kfac = compose_job([f"experiment={preset}", "optimizer=kfac"])
    first_order = compose_job([f"experiment={half}", "optimizer=sgd"])
    assert first_order.experiment == kfac.experiment == preset
    assert first_order.data == kfac.data and first_order.model == kfac.model
    assert first_order.trainer == kfac.trainer


# Small presets whose K-FAC must get clearly below the trivial baseline within LEARN_STEPS steps
# (the cheap ones; the autoencoder presets take minutes a run on a shared CPU).
LEARN_PRESETS = ["tselepidis_deep_linear_small"]
LEARN_STEPS = 200


@pytest.mark.slow
@pytest.mark.parametrize("preset", LEARN_PRESETS)
def test_small_preset_kfac_learns(preset: str, tmp_path: Path) -> None:
    from suite.store import RunStatus, find_run_folders, read_run
    from suite.train import RunContext, run

    cfg, choices = compose_with_choices(
        [f"experiment={preset}", "optimizer=kfac", f"trainer.max_steps={LEARN_STEPS}",
         "logger=none", "trainer.progress=false", "trainer.threads=1", f"results.root={tmp_path}"]
    )  # fmt: skip
    ctx = RunContext(model_preset=choices["model"], optimizer_preset=choices["optimizer"])
    assert run(cfg, ctx).status is RunStatus.COMPLETED
    (folder,) = find_run_folders(tmp_path)
    summary = read_run(folder).summary
    assert summary["status"] == RunStatus.COMPLETED.value
    assert summary["learned"] is True, (
        summary["final_train_running_loss"],
        summary["baseline_train_loss"],
    )


@pytest.mark.parametrize("half", FIRST_ORDER)
def test_tuning_preset_keeps_the_small_kfac_periods(half: str) -> None:
    """The tuning grid of a split preset gives its K-FAC family the preset's periods."""
    preset = half.removesuffix("_first_order")
    kfac = compose_job([f"experiment={preset}", "optimizer=kfac"]).optimizer
    grid = compose_job([f"experiment=tune_{preset}"]).tuning.grid
    for family in ("kfac", "kfac2"):
        assert list(grid[family].cov_period) == [kfac.cov_period], family
        assert list(grid[family].inv_period) == [kfac.inv_period], family
