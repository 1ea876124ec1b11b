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


# Small presets whose K-FAC must get clearly below the trivial baseline within LEARN_STEPS steps.
# Not here: the Koroko autoencoder presets, whose K-FAC at the source's settings does not get
# below the mean image in their 105-190 steps (docs/fidelity.md says why), and the
# tselepidis_mnist_ae_small run, minutes long on a shared CPU.
LEARN_PRESETS = ["tselepidis_deep_linear_small", "koroko_fmnist_deep_linear_small"]
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


KOROKO_SMALL = [p for p in SMALL if p.startswith("koroko_")]


@pytest.mark.parametrize("preset", KOROKO_SMALL)
def test_tuning_preset_runs_the_small_presets_settings(preset: str) -> None:
    """A tuning trial gets the small preset's per-optimizer settings (its small K-FAC periods
    included), with the grid's setting on top."""
    tune = compose_job([f"experiment=tune_{preset}"])
    for family, grid in tune.tuning.grid.items():
        small = compose_job([f"experiment={preset}", f"optimizer={family}"]).optimizer
        key, values = next(iter(grid.items()))
        trial = compose_job(
            [f"experiment=tune_{preset}", f"optimizer={family}", f"optimizer.{key}={values[0]}"]
        ).optimizer
        assert trial[key] == values[0], (family, key)
        for name in small:
            if name != key:
                assert trial[name] == small[name], (family, name)


@pytest.mark.parametrize("preset", KOROKO_SMALL)
def test_koroko_small_presets_run_every_optimizer_with_its_own_settings(preset: str) -> None:
    sgd = compose_job([f"experiment={preset}", "optimizer=sgd"]).optimizer
    kfac = compose_job([f"experiment={preset}", "optimizer=kfac"]).optimizer
    assert sgd.nesterov is True  # Koroko et al.'s SGD (train_mlp.py:86)
    assert str(kfac.damping_mode.value) == "factored_unit" and kfac.stats_fraction == 0.25
    assert kfac.cov_period == kfac.inv_period == 10
