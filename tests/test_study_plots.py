"""The study figure (analyze/study_plots.py): drawn from the final runs the verdicts use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PathCollection

from analyze.build import BuildOptions, build_all
from analyze.labels import Caption
from analyze.study import ARM_ORDER, load_study
from analyze.study_plots import ARM_STYLE, _style, plot_study, tuned_studies
from analyze.style import Palette
from tests.test_reproduction import BASELINE, EPOCHS, store, write_run  # noqa: F401  (fixture)


def test_study_figure_draws_the_usable_final_runs(store: Path) -> None:  # noqa: F811
    runs = load_study([store])
    assert tuned_studies(runs) == ["toy_study"]
    caption = Caption()
    fig = plot_study(runs, study="toy_study", caption=caption)
    by_epoch, by_wall, by_seed = fig.axes[:3]
    lines = {line.get_label(): line for line in by_epoch.get_lines()}
    assert {"sgd", "adam", "kfac", "kfac2"} <= set(lines)
    # the mean curve ends at the arm's mean final running loss (every last-epoch batch = final)
    kfac = [r.final_running_loss for r in runs if r.arm == "kfac" and r.stage == "final"]
    assert lines["kfac"].get_ydata()[-1] == pytest.approx(np.mean(kfac), rel=1e-9)
    assert len(lines["kfac"].get_xdata()) == EPOCHS
    # the baseline is drawn at the trivial predictor's loss
    assert any(np.allclose(line.get_ydata(), BASELINE) for line in by_epoch.get_lines())
    # one dot per usable final run: SGD seed 8 did not learn, so 8 + 8 + 8 + 7
    dots = sum(len(c.get_offsets()) for c in by_seed.collections if isinstance(c, PathCollection))
    assert dots == 31
    text = caption.markdown()
    assert "sgd = SGD: 7 usable runs" in text
    assert "not drawn: did not learn (seeds [8])" in text
    assert by_wall.get_xlabel().startswith("wall-clock")


def test_study_figure_says_when_arms_ran_on_different_cpus(store: Path) -> None:  # noqa: F811
    caption = Caption()
    fig = plot_study(load_study([store]), study="toy_study", caption=caption)
    assert fig.axes[1].get_title() == "vs wall-clock" and "same CPU" not in caption.markdown()
    for folder in store.iterdir():
        if folder.name.startswith("kfac_final"):
            (folder / "environment.json").write_text('{"cpu": "CPU B"}')
    caption = Caption()
    fig = plot_study(load_study([store]), study="toy_study", caption=caption)
    assert fig.axes[1].get_title() == "vs wall-clock (CPUs differ: see caption)"
    assert "the arms ran on sgd: unknown; adam: unknown; kfac: CPU B; kfac2: unknown" in (
        caption.markdown()
    )


def test_study_figure_refuses_a_study_without_usable_runs(tmp_path: Path) -> None:
    write_run(tmp_path, arm="kfac", optimizer="kfac", seed=1, final=199.5)
    runs = load_study([tmp_path])
    assert tuned_studies(runs) == []
    with pytest.raises(ValueError, match="toy_study: no usable final run"):
        plot_study(runs, study="toy_study")


def test_build_writes_the_study_figure(store: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "figures"
    build_all(BuildOptions(results=(store,), out=out, n_bootstrap=50))
    assert (out / "study_toy_study.png").stat().st_size > 0
    caption = (out / "study_toy_study.caption.md").read_text()
    assert "final runs of every arm after equal tuning" in caption
    # the benchmark filter keeps a study of that benchmark
    other = tmp_path / "other"
    build_all(BuildOptions(results=(store,), out=other, benchmarks=("mnist_ae",), n_bootstrap=50))
    assert (other / "study_toy_study.png").exists()


def test_the_arms_of_a_tuned_study_are_told_apart_by_colour_and_line_style() -> None:
    # kfac2_authors is an arm of source-settings studies only, where kfac2_accumulate never runs
    arms = [arm for arm in ARM_ORDER if arm != "kfac2_authors"]
    palette = Palette.for_optimizers(ARM_STYLE[a][0] for a in arms)
    styles = {arm: _style(arm, palette) for arm in arms}
    assert len(set(styles.values())) == len(arms), styles
