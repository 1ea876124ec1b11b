"""Figures stay readable for any set of runs: layout geometry, honest ranges, baselines,
running losses, and the source papers' counterparts."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox
from scipy import stats

from analyze.aggregate import Axis, Band, GroupKey, groups_of
from analyze.build import BuildOptions, build_all
from analyze.labels import MAX_LABEL_CHARS, Caption
from analyze.load import ResultsSet, load_results, setting_of
from analyze.plots import (
    MAX_GROUPS_PER_AXIS,
    group_pages,
    plot_benchmark,
    plot_main,
    plot_profile,
    settings_off_default,
)
from analyze.running import RUNNING_LOSS, running_means, with_running_loss
from analyze.source_plots import plot_source
from analyze.stats import performance_profile
from analyze.style import Palette
from analyze.tables import time_to_target_analysis
from suite.store import RunFolder, RunRecord

EPOCHS = 6
STEPS_PER_EPOCH = 4
LONG = "kfac2_with_a_remarkably_long_preset_name"
MIN_AXES_IN = (1.2, 0.9)  # width, height every panel keeps (inches)
MAX_LEGEND_SHARE = 0.35  # of the canvas height


def write_run(
    root: Path,
    run_id: str,
    *,
    benchmark: str = "mnist_ae",
    optimizer: str,
    family: str,
    seed: int,
    train: np.ndarray,
    hyper: dict[str, object],
    experiment: str,
    status: str = "completed",
    acc: np.ndarray | None = None,
    baseline: float | None = None,
) -> None:
    """One run folder through the suite's writer: evals per epoch, one step row per step."""
    folder = RunFolder.create(root, run_id)
    record = RunRecord()
    epochs = np.arange(len(train), dtype=float)
    for i, loss in enumerate(train):
        record.evals.append(
            {
                "step": i * STEPS_PER_EPOCH,
                "epoch": epochs[i],
                "wall_time_s": 1.5 * epochs[i] + 0.1 * seed,
                "train_loss": float(loss),
                "train_loss_per_output": float(loss) / 784,
                "test_loss": float(loss) * 1.1,
                "test_loss_per_output": float(loss) * 1.1 / 784,
                **({} if acc is None else {"test_acc": float(acc[i])}),
            }
        )
    for step in range(1, (len(train) - 1) * STEPS_PER_EPOCH + 1):
        epoch = step / STEPS_PER_EPOCH
        batch = float(np.interp(epoch, epochs, train)) * (1.0 + 0.01 * (step % 2))
        record.steps.append(
            {
                "step": step,
                "epoch": epoch,
                "batch_loss": batch,
                "lr": 0.01,
                "step_time_s": 0.1,
                "wall_time_s": 1.5 * epoch + 0.1 * seed,
            }
        )
    folder.write_metrics(record)
    folder.write_config(f"trainer:\n  epochs: {EPOCHS}\n  batch_size: 100\n  seed: {seed}\n")
    folder.write_environment({"python": "3.11"})
    finite = train[np.isfinite(train)]
    summary: dict[str, object] = {
        "run_id": run_id,
        "sweep_id": "sweep",
        "experiment": experiment,
        "scale": "small",
        "status": status,
        "model": benchmark,
        "dataset": "mnist",
        "data_variant": "mnist-5k",
        "optimizer": optimizer,
        "optimizer_family": family,
        "seed": seed,
        "device": "cpu",
        "epochs_completed": len(train) - 1,
        "steps_completed": (len(train) - 1) * STEPS_PER_EPOCH,
        "wall_clock_s": 1.5 * (len(train) - 1),
        "final_train_loss": float(train[-1]),
        "best_train_loss": float(finite.min()),
        "final_train_loss_per_output": float(train[-1]) / 784,
        "final_test_loss": float(train[-1]) * 1.1,
        "best_test_loss": float(finite.min()) * 1.1,
        "diverged_step": 9 if status == "diverged" else None,
        "error": None,
        "started_at": "2024-01-01T00:00:00+00:00",
        "finished_at": f"2024-01-01T01:00:{seed:02d}+00:00",
        "code_version": "abc1234",
        "hyperparameters": hyper,
        "tuning": None,
        "likelihood": "bernoulli",
        "loss_reduction": "sum_outputs_mean_batch",
    }
    if baseline is not None:
        summary.update(
            baseline_train_loss=baseline,
            baseline_test_loss=baseline * 1.1,
            baseline_predictor="mean image",
        )
    folder.write_summary(summary)


def curve(final: float, start: float = 400.0) -> np.ndarray:
    epochs = np.arange(EPOCHS + 1, dtype=float)
    return final + (start - final) * np.exp(-0.8 * epochs)


def accuracy(seed: int) -> np.ndarray:
    """Test accuracy of the classifier runs: spread wide enough for a t-CI beyond 1."""
    return np.clip(np.linspace(0.5, 0.97, EPOCHS + 1) + (seed - 1) * 0.1, 0.0, 1.0)


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 groups of two seeds (long names, many differing settings), a diverged run reaching
    1e8, a running run, a classifier benchmark, and author-named presets."""
    root = tmp_path_factory.mktemp("crowded")
    optimizers = [("sgd", "sgd"), ("adam", "adam"), ("kfac", "kfac"), (LONG, "kfac2")]
    group = 0
    for optimizer, family in optimizers:
        for variant in range(4 if optimizer != "sgd" else 3):
            hyper: dict[str, object] = {"lr": 10.0 ** -(variant + 1)}
            if optimizer != "sgd":  # sgd groups differ in lr only: short labels
                hyper |= {
                    "damping": 10.0 ** -(variant % 3 + 2),
                    "cov_update_period_in_steps": 10 * (variant + 1),
                    "inverse_update_period_in_steps": 100 * (variant + 1),
                }
            preset = "tselepidis_mnist_ae_small" if variant == 0 else "study_crowded_sweep"
            for seed in (0, 1):
                final = 60.0 + 5 * group + seed
                write_run(
                    root,
                    f"g{group}_s{seed}",
                    optimizer=optimizer,
                    family=family,
                    seed=seed,
                    train=curve(final),
                    hyper=hyper,
                    experiment=preset,
                    baseline=210.0,
                )
            group += 1
    assert group == 15
    exploding = curve(80.0)
    exploding[3:5] = [1e5, 1e8]
    exploding[5:] = np.nan
    write_run(
        root,
        "diverged_s2",
        optimizer="kfac",
        family="kfac",
        seed=2,
        status="diverged",
        train=exploding,
        hyper={"lr": 0.1, "damping": 0.01},
        experiment="tselepidis_mnist_ae_small",
    )
    write_run(
        root,
        "running_s3",
        optimizer="kfac",
        family="kfac",
        seed=3,
        status="running",
        train=curve(70.0)[:3],
        hyper={"lr": 0.1, "damping": 0.01},
        experiment="tselepidis_mnist_ae_small",
    )
    for seed in range(3):
        acc = accuracy(seed)
        for optimizer in ("sgd", "kfac"):
            write_run(
                root,
                f"cls_{optimizer}_s{seed}",
                benchmark="cifar10_simple_cnn",
                optimizer=optimizer,
                family=optimizer,
                seed=seed,
                train=curve(1.0 + seed, start=2.3),
                hyper={"lr": 0.1},
                experiment="koroko_cifar10_small",
                acc=acc,
            )
    return root


@pytest.fixture(scope="module")
def results(crowded: Path) -> ResultsSet:
    return load_results([crowded])


def _texts(fig: Figure) -> list[Text]:
    """Every visible, non-empty text of the figure (titles, labels, tick labels, legend)."""
    found = [
        t
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and t.get_figure() is fig
    ]
    return found


def _visible_ticklabels(fig: Figure) -> set[int]:
    """Ids of tick labels inside their axis' view (matplotlib keeps off-view ones unrendered)."""
    keep = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if low - 1e-12 * abs(high) <= tick.get_loc() <= high + 1e-12 * abs(high):
                    keep.add(id(tick.label1))
    return keep


def assert_readable(fig: Figure) -> None:
    """Panels keep a reasonable size, the legend a bounded share, no text overlaps another."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    dpi = fig.dpi
    for ax in fig.axes:
        box = ax.get_window_extent(renderer)
        assert box.width / dpi >= MIN_AXES_IN[0] and box.height / dpi >= MIN_AXES_IN[1], box
    legend_height = sum(lg.get_window_extent(renderer).height for lg in fig.legends)
    assert legend_height <= MAX_LEGEND_SHARE * fig.bbox.height
    ticklabels = {id(t) for ax in fig.axes for t in ax.get_xticklabels(which="both")}
    ticklabels |= {id(t) for ax in fig.axes for t in ax.get_yticklabels(which="both")}
    shown = _visible_ticklabels(fig)
    texts = [t for t in _texts(fig) if id(t) not in ticklabels or id(t) in shown]
    boxes: list[tuple[str, Bbox]] = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    for text, box in boxes:
        assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, text
        assert fig.bbox.y0 - 1 <= box.y0 and box.y1 <= fig.bbox.y1 + 1, text
    for (a_text, a), (b_text, b) in combinations(boxes, 2):
        overlap_w = min(a.x1, b.x1) - max(a.x0, b.x0)
        overlap_h = min(a.y1, b.y1) - max(a.y0, b.y0)
        assert overlap_w <= 1 or overlap_h <= 1, (a_text, b_text)
    for legend in fig.legends:
        for text in legend.get_texts():
            label = text.get_text().split(" (n=")[0]
            assert len(label) <= MAX_LABEL_CHARS + len(" (two-level)"), label


def test_many_groups_stay_readable(results: ResultsSet) -> None:
    keys = groups_of(results, benchmark="mnist_ae")
    assert len(keys) == 16  # 15 completed groups and the diverged/running one
    caption = Caption()
    overview = plot_benchmark(results, benchmark="mnist_ae", caption=caption)
    assert_readable(overview)
    means = [line for line in overview.axes[0].get_lines() if line.get_gid().startswith("mean:")]
    assert len(means) <= MAX_GROUPS_PER_AXIS
    assert any("too many for one axis" in note for note in caption.notes)
    pages = group_pages(results, keys)
    assert sorted(k for page in pages for k in page) == sorted(keys)
    assert all(len(page) <= MAX_GROUPS_PER_AXIS for page in pages)
    for page in pages:
        caption = Caption()
        fig = plot_benchmark(results, benchmark="mnist_ae", keys=page, caption=caption)
        assert_readable(fig)
        # the caption spells out every short label in full
        shown = {
            t.get_text() for lg in fig.legends for t in lg.get_texts() if "(n=" in t.get_text()
        }
        assert shown <= set(caption.legend)
        assert all("lr=" in caption.legend[label] for label in shown)
    assert_readable(plot_main(results, benchmarks=["cifar10_simple_cnn", "mnist_ae"]))
    with_running = with_running_loss(results)
    assert_readable(plot_source(with_running, preset="tselepidis_mnist_ae_small"))
    assert_readable(plot_source(with_running, preset="koroko_cifar10_small"))
    analysis = time_to_target_analysis(results, n_bootstrap=10)
    names = list(analysis.wall_times.columns)
    assert_readable(
        plot_profile(
            {"wall-clock": performance_profile(analysis.wall_times)},
            optimizer_of={n: n.split(" ")[0] for n in names},
            palette=Palette.for_optimizers(n.split(" ")[0] for n in names),
        )
    )


def _band(ax: object, label: str) -> tuple[np.ndarray, np.ndarray]:
    poly = [
        c
        for c in ax.collections  # type: ignore[attr-defined]
        if isinstance(c, PolyCollection) and c.get_gid() == f"band:{label}"
    ]
    assert len(poly) == 1
    vertices = poly[0].get_paths()[0].vertices
    n = (len(vertices) - 3) // 2
    return vertices[1 : n + 1, 1], vertices[n + 2 : 2 * n + 2, 1][::-1]


def fig_runs(results: ResultsSet) -> set[str]:
    return set(results.of_experiment("tselepidis_mnist_ae_small").runs["run_id"])


def test_diverged_run_is_marked_not_scaled_to(results: ResultsSet) -> None:
    fig = plot_source(with_running_loss(results), preset="tselepidis_mnist_ae_small")
    ax = fig.axes[1]  # test loss vs epochs: the diverged run reaches 1.1e8
    low, high = ax.get_ylim()
    evals = results.evals
    completed = evals[evals["usable"] & evals["run_id"].isin(fig_runs(results))]
    assert high < 1e4 and high >= 400.0 * 1.1  # the start of every curve stays in view
    assert low <= completed["test_loss"].min()
    edge = [line for line in ax.get_lines() if line.get_gid() == "diverged-edge:diverged_s2"]
    assert len(edge) == 1
    at = math.log(edge[0].get_ydata()[0] / low) / math.log(high / low)
    assert 0.9 < at < 1.0  # just inside the top edge, where it left
    assert edge[0].get_xdata()[0] == pytest.approx(3.0)
    assert not any((line.get_gid() or "").endswith("running_s3") for line in ax.get_lines())


def test_log_band_is_a_t_interval_on_log_loss(results: ResultsSet) -> None:
    sgd = [k for k in groups_of(results, benchmark="mnist_ae") if k.optimizer == "sgd"]
    fig = plot_benchmark(
        results, benchmark="mnist_ae", axes=(Axis.EPOCH,), band=Band.CI95, keys=sgd
    )
    ax = fig.axes[0]
    label = "sgd · lr=0.1"
    line = next(line for line in ax.get_lines() if line.get_gid() == f"mean:{label}")
    seeds = np.array([curve(60.0), curve(61.0)])
    logs = np.log(seeds)
    half = stats.t.ppf(0.975, 1) * logs.std(axis=0, ddof=1) / math.sqrt(2)
    np.testing.assert_allclose(line.get_ydata(), np.exp(logs.mean(0)), rtol=1e3 * 2.2e-16)
    lower, upper = _band(ax, label)
    low, high = ax.get_ylim()
    np.testing.assert_allclose(lower, np.clip(np.exp(logs.mean(0) - half), low, high), rtol=1e-12)
    np.testing.assert_allclose(upper, np.clip(np.exp(logs.mean(0) + half), low, high), rtol=1e-12)
    # never below the data's scale: the band stays within the axis, the axis near the data
    assert lower.min() >= low and low >= 0.5 * seeds.min()


def test_accuracy_band_is_clipped_to_the_unit_interval(results: ResultsSet) -> None:
    fig = plot_benchmark(results, benchmark="cifar10_simple_cnn", axes=(Axis.EPOCH,))
    ax = next(a for a in fig.axes if a.get_ylabel().startswith("test accuracy"))
    lower, upper = _band(ax, "kfac")
    assert lower.min() >= 0.0 and upper.max() <= 1.0
    values = np.array([accuracy(seed) for seed in range(3)])
    half = stats.t.ppf(0.975, 2) * values.std(axis=0, ddof=1) / math.sqrt(3)
    assert (values.mean(0) + half).max() > 1.0  # the interval itself would leave [0, 1]
    low, high = ax.get_ylim()
    assert low >= -0.05 and high <= 1.05


def test_baseline_line_when_recorded_and_a_note_when_not(results: ResultsSet) -> None:
    caption = Caption()
    fig = plot_benchmark(results, benchmark="mnist_ae", axes=(Axis.EPOCH,), caption=caption)
    train, test = fig.axes[0], fig.axes[1]
    for ax, value in ((train, 210.0), (test, 231.0)):
        lines = [line for line in ax.get_lines() if line.get_gid() == "baseline:mnist-5k"]
        assert len(lines) == 1 and lines[0].get_ydata()[0] == pytest.approx(value)
    texts = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert "best constant predictor (mean image)" in texts
    caption = Caption()
    fig = plot_benchmark(results, benchmark="cifar10_simple_cnn", caption=caption)
    assert not any((line.get_gid() or "").startswith("baseline:") for line in fig.axes[0].lines)
    assert any(note.startswith("no baseline line on train_loss") for note in caption.notes)


def test_running_loss_falls_back_to_the_step_log(results: ResultsSet) -> None:
    steps = np.arange(1, 9, dtype=float)
    losses = np.array([8.0, 6.0, 4.0, 2.0, 1.0, 1.0, 3.0, 3.0])
    np.testing.assert_allclose(
        running_means(np.array([0.0, 4.0, 8.0]), steps, losses), [np.nan, 5.0, 2.0]
    )
    filled = with_running_loss(results)
    one = filled.evals[filled.evals["run_id"] == "g0_s0"].sort_values("step")
    train = curve(60.0)
    epochs = np.arange(EPOCHS + 1, dtype=float)
    expected = [
        np.mean(
            [
                np.interp(s / STEPS_PER_EPOCH, epochs, train) * (1.0 + 0.01 * (s % 2))
                for s in range(e * STEPS_PER_EPOCH - STEPS_PER_EPOCH + 1, e * STEPS_PER_EPOCH + 1)
            ]
        )
        for e in range(1, EPOCHS + 1)
    ]
    assert math.isnan(one[RUNNING_LOSS].iloc[0])
    np.testing.assert_allclose(one[RUNNING_LOSS].iloc[1:], expected, rtol=1e-12)
    # a recorded column is kept as it is
    recorded = results.evals.copy()
    recorded[RUNNING_LOSS] = 7.0
    kept = with_running_loss(ResultsSet(results.runs, recorded, results.steps))
    assert (kept.evals[RUNNING_LOSS] == 7.0).all()


def test_build_writes_source_counterparts_and_captions(crowded: Path, tmp_path: Path) -> None:
    out = build_all(BuildOptions(results=(crowded,), out=tmp_path, n_bootstrap=10))
    names = {path.name for path in out.files}
    assert {"source_tselepidis_mnist_ae_small.png", "source_koroko_cifar10_small.png"} <= names
    for name in names:
        if name.endswith(".png"):
            assert name.removesuffix(".png") + ".caption.md" in names
    pages = [n for n in names if n.startswith("mnist_ae_study_crowded_sweep_curves_part")]
    assert len(pages) >= 2 * 2  # PNG and PDF of at least two pages
    caption = (tmp_path / "source_tselepidis_mnist_ae_small.caption.md").read_text()
    assert "Tselepidis" in caption and "metrics_steps.parquet" in caption
    index = (tmp_path / "figures.md").read_text()
    assert "source_koroko_cifar10_small.png" in index
    fig = plot_source(with_running_loss(out.results), preset="tselepidis_mnist_ae_small")
    assert [ax.get_title() for ax in fig.axes] == ["Training Loss", "Test Loss"]
    assert fig.axes[0].get_yscale() == "log"
    assert fig.get_suptitle().startswith("tselepidis_mnist_ae_small")
    fig = plot_source(with_running_loss(out.results), preset="koroko_cifar10_small")
    assert [ax.get_xlabel() for ax in fig.axes] == [Axis.EPOCH.label, Axis.WALL.label]


def test_headline_tie_break_prefers_the_optimizer_defaults() -> None:
    """Among groups with as many seeds, the overview shows the one closest to the defaults."""

    def key(**settings: object) -> GroupKey:
        setting = json.dumps({"name": "kfac2", "damping": 0.001, **settings}, sort_keys=True)
        return GroupKey("mnist_ae", "mnist-5k", "kfac2", setting)

    assert settings_off_default(key(coarse_refresh="rebuild")) == 0
    assert settings_off_default(key(coarse_refresh="accumulate")) == 1
    assert settings_off_default(key(coarse_refresh="accumulate", damping=0.1)) == 2


def test_settings_added_later_group_with_runs_that_predate_them() -> None:
    """A run recording a later-added setting at its default groups with the older runs."""
    old = {"scale": "small", "optimizer": "kfac", "hyperparameters": {"name": "kfac", "lr": 0.01}}
    new = {**old, "hyperparameters": {"name": "kfac", "lr": 0.01, "grad_accumulation": 1}}
    other = {**old, "hyperparameters": {"name": "kfac", "lr": 0.01, "grad_accumulation": 2}}
    assert setting_of(new) == setting_of(old) != setting_of(other)
    # fixed_pi (factored_unit damping's π) came later still: the toy's eleventh seeds record 1.0
    pi = {**old, "hyperparameters": {"name": "kfac", "lr": 0.01, "fixed_pi": 1.0}}
    pi_other = {**old, "hyperparameters": {"name": "kfac", "lr": 0.01, "fixed_pi": 0.5}}
    assert setting_of(pi) == setting_of(old) != setting_of(pi_other)
