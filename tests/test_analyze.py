"""Analysis package end to end: run folders written by the store -> tables, figures, report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from scipy import stats

from analyze.__main__ import main
from analyze.aggregate import Axis, Band, LossKind
from analyze.build import BuildOptions, build_all
from analyze.load import AnalysisStatus, ResultsSet, load_results
from analyze.plots import plot_benchmark, plot_main, plot_profile
from analyze.stats import performance_profile
from analyze.style import Palette, figure_palette
from analyze.tables import (
    final_loss_table,
    fmt_mean_std,
    paired_numbers,
    time_to_target_analysis,
)
from suite.store import RunFolder, RunRecord

EPOCHS = 8
STEPS_PER_EPOCH = 20
OUTPUTS = 784
# (benchmark, data variant, optimizer, family) -> {seed: final train loss}
FINALS: dict[tuple[str, str, str, str], dict[int, float]] = {
    ("mnist_ae", "mnist-full", "sgd", "sgd"): {0: 60.0, 1: 62.0, 2: 61.0},
    ("mnist_ae", "mnist-full", "kfac", "kfac"): {0: 55.0, 1: 56.5, 2: 55.8},
    ("mnist_ae", "mnist-full", "kfac2", "kfac2"): {0: 53.9, 1: 55.2, 2: 54.9},
    ("mnist_ae", "mnist-5k", "kfac", "kfac"): {0: 40.0, 1: 41.0, 2: 43.0},
    ("curves_ae", "curves-surrogate", "adam", "adam"): {0: 30.0, 1: 31.0},
    ("curves_ae", "curves-surrogate", "kfac", "kfac"): {0: 25.0, 1: 26.0, 2: 25.5},
    ("curves_ae", "curves-surrogate", "kfac2", "kfac2"): {0: 25.3, 1: 25.6, 2: 25.7},
}
SECONDS_PER_EPOCH = {"sgd": 2.0, "adam": 2.1, "kfac": 5.0, "kfac2": 6.0}


def loss_curve(final: float, epochs: np.ndarray, *, start: float = 200.0) -> np.ndarray:
    """Decaying curve with value ``start`` at epoch 0 and exactly ``final`` at the last epoch."""
    shape = (np.exp(-0.6 * epochs) - math.exp(-0.6 * EPOCHS)) / (1 - math.exp(-0.6 * EPOCHS))
    return final + (start - final) * shape


@dataclass
class Written:
    """What the fixture wrote, for recomputing expectations independently of the package."""

    root: Path
    curves: dict[tuple[str, str, str, str], dict[int, np.ndarray]] = field(default_factory=dict)
    walls: dict[tuple[str, str, str, str], dict[int, np.ndarray]] = field(default_factory=dict)
    corrupt_ids: list[str] = field(default_factory=list)
    diverged_id: str = ""
    running_id: str = ""


def write_run(
    root: Path,
    run_id: str,
    *,
    key: tuple[str, str, str, str],
    seed: int,
    status: str,
    train: np.ndarray,
    wall: np.ndarray,
    diverged_step: int | None = None,
    acc: np.ndarray | None = None,
    tuning: dict[str, object] | None = None,
    experiment: str | None = None,
) -> RunFolder:
    """Write one run folder through the suite's results writer."""
    benchmark, variant, optimizer, family = key
    folder = RunFolder.create(root, run_id)
    record = RunRecord()
    for i, loss in enumerate(train):
        record.evals.append(
            {
                "step": i * STEPS_PER_EPOCH,
                "epoch": float(i),
                "wall_time_s": float(wall[i]),
                "train_loss": float(loss),
                "train_loss_per_output": float(loss) / OUTPUTS,
                "test_loss": float(loss) * 1.1,
                "test_loss_per_output": float(loss) * 1.1 / OUTPUTS,
                **({} if acc is None else {"test_acc": float(acc[i])}),
            }
        )
        record.steps.append(
            {
                "step": i * STEPS_PER_EPOCH,
                "epoch": float(i),
                "batch_loss": float(loss),
                "lr": 0.01,
                "step_time_s": 0.1,
                "wall_time_s": float(wall[i]),
            }
        )
    folder.write_metrics(record)
    folder.write_config(f"trainer:\n  epochs: {EPOCHS}\n  batch_size: 100\n  seed: {seed}\n")
    folder.write_environment({"python": "3.11"})
    finite = train[np.isfinite(train)]
    folder.write_summary(
        {
            "run_id": run_id,
            "sweep_id": "sweep-a",
            "experiment": experiment,
            "scale": "small",
            "status": status,
            "model": benchmark,
            "dataset": variant.split("-")[0],
            "data_variant": variant,
            "optimizer": optimizer,
            "optimizer_family": family,
            "seed": seed,
            "device": "cpu",
            "epochs_completed": len(train) - 1,
            "steps_completed": (len(train) - 1) * STEPS_PER_EPOCH,
            "wall_clock_s": float(wall[len(train) - 1]),
            "final_train_loss": float(train[-1]),
            "best_train_loss": float(finite.min()),
            "final_test_loss": float(train[-1]) * 1.1,
            "best_test_loss": float(finite.min()) * 1.1,
            "final_val_loss": None,
            "best_val_loss": None,
            "final_test_acc": None if acc is None else float(acc[-1]),
            "best_test_acc": None if acc is None else float(acc.max()),
            "diverged_step": diverged_step,
            "error": None,
            "started_at": "2024-01-01T00:00:00+00:00",
            "finished_at": f"2024-01-01T01:00:{seed:02d}+00:00",
            "code_version": "abc1234",
            "hyperparameters": {"lr": 0.01, "damping": 0.001},
            "tuning": tuning,
            "likelihood": "bernoulli",
            "loss_reduction": "sum_outputs_mean_batch",
        }
    )
    return folder


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    root = tmp_path_factory.mktemp("results")
    out = Written(root=root)
    epochs = np.arange(EPOCHS + 1, dtype=float)
    for key, finals in FINALS.items():
        for seed, final in finals.items():
            train = loss_curve(final, epochs)
            wall = epochs * SECONDS_PER_EPOCH[key[3]] * (1 + 0.05 * seed) + 0.3 * seed
            run_id = f"{key[0]}_{key[1]}_{key[2]}_s{seed}"
            write_run(root, run_id, key=key, seed=seed, status="completed", train=train, wall=wall)
            out.curves.setdefault(key, {})[seed] = train
            out.walls.setdefault(key, {})[seed] = wall
    mnist_kfac2 = ("mnist_ae", "mnist-full", "kfac2", "kfac2")
    diverged = loss_curve(54.0, epochs)
    diverged[5:] = np.nan
    out.diverged_id = "mnist_kfac2_diverged_s3"
    write_run(
        root,
        out.diverged_id,
        key=mnist_kfac2,
        seed=3,
        status="diverged",
        train=diverged,
        wall=epochs * 6.0,
        diverged_step=5 * STEPS_PER_EPOCH - 3,
    )
    out.running_id = "mnist_kfac_running_s4"
    write_run(
        root,
        out.running_id,
        key=("mnist_ae", "mnist-full", "kfac", "kfac"),
        seed=4,
        status="running",
        train=loss_curve(50.0, epochs)[:3],
        wall=epochs[:3] * 5.0,
    )
    torn = write_run(
        root,
        "mnist_sgd_torn_s5",
        key=("mnist_ae", "mnist-full", "sgd", "sgd"),
        seed=5,
        status="completed",
        train=loss_curve(1.0, epochs),
        wall=epochs,
    )
    data = (torn.path / "metrics_evals.parquet").read_bytes()
    (torn.path / "metrics_evals.parquet").write_bytes(data[: len(data) // 2])
    bad_json = write_run(
        root,
        "mnist_sgd_badjson_s6",
        key=("mnist_ae", "mnist-full", "sgd", "sgd"),
        seed=6,
        status="completed",
        train=loss_curve(1.0, epochs),
        wall=epochs,
    )
    (bad_json.path / "summary.json").write_text('{"run_id": "mnist_sgd_badjson_s6", "stat')
    out.corrupt_ids = ["mnist_sgd_torn_s5", "mnist_sgd_badjson_s6"]
    return out


@pytest.fixture(scope="module")
def results(written: Written) -> ResultsSet:
    return load_results([written.root])


def label_of(key: tuple[str, str, str, str]) -> str:
    """Expected legend label: the optimizer, plus the variant when a benchmark has two."""
    return f"{key[2]} · {key[1]}" if key[0] == "mnist_ae" else key[2]


def test_load_lists_every_run_with_its_state(written: Written, results: ResultsSet) -> None:
    runs = results.runs.set_index("run_id")
    n_completed = sum(len(f) for f in FINALS.values())
    assert len(runs) == n_completed + 4
    assert int(runs["usable"].sum()) == n_completed
    skipped = {s.run_id: s for s in results.skipped()}
    assert skipped[written.diverged_id].status == "diverged"
    assert skipped[written.diverged_id].reason == f"diverged at step {5 * STEPS_PER_EPOCH - 3}"
    assert skipped[written.running_id].reason.startswith("running (incomplete)")
    torn = skipped["mnist_sgd_torn_s5"]
    assert torn.status == AnalysisStatus.CORRUPT.value and torn.reason.startswith("unreadable")
    bad = [s for s in skipped.values() if "badjson" in s.path]
    assert len(bad) == 1 and bad[0].status == "corrupt" and "JSONDecodeError" in bad[0].reason
    assert set(results.evals["run_id"]) == set(runs.index) - {
        "mnist_sgd_torn_s5",
        bad[0].run_id,
    }
    steps = results.steps[results.steps["run_id"] == "mnist_ae_mnist-5k_kfac_s1"]
    assert len(steps) == EPOCHS + 1 and set(steps["data_variant"]) == {"mnist-5k"}
    assert list(steps.columns[:3]) == ["run_id", "benchmark", "data_variant"]
    assert runs.loc["mnist_ae_mnist-full_sgd_s0", "hp.lr"] == 0.01
    expected = FINALS[("mnist_ae", "mnist-full", "sgd", "sgd")][0] / OUTPUTS
    assert runs.loc["mnist_ae_mnist-full_sgd_s0", "final_train_loss_per_output"] == pytest.approx(
        expected
    )


def test_filter_rejects_unknown_names(results: ResultsSet) -> None:
    only = results.filter(benchmarks=["curves_ae"], optimizers=["kfac"])
    assert set(only.runs["benchmark"]) == {"curves_ae"}
    assert set(only.runs["optimizer"]) == {"kfac"}
    with pytest.raises(ValueError, match=r"--benchmark: unknown nope; allowed: .*mnist_ae"):
        results.filter(benchmarks=["nope"])
    with pytest.raises(ValueError, match="--sweep: unknown x"):
        results.filter(sweep="x")


def test_final_loss_table_matches_written_numbers(results: ResultsSet) -> None:
    table = final_loss_table(results)
    numbers = table.numbers.set_index(["benchmark", "data_variant", "optimizer"])
    assert len(numbers) == len(FINALS)  # the two kfac variants of mnist_ae are separate rows
    for key, finals in FINALS.items():
        row = numbers.loc[key[:3]]
        values = np.array(list(finals.values()))
        assert row["n_seeds"] == len(values)
        assert row["final_train_loss_mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert row["final_train_loss_std"] == pytest.approx(values.std(ddof=1), rel=1e-12)
        assert row["final_test_loss_mean"] == pytest.approx(1.1 * values.mean(), rel=1e-12)
    assert numbers.loc[("mnist_ae", "mnist-full", "kfac2"), "n_diverged"] == 1
    assert numbers.loc[("mnist_ae", "mnist-full", "kfac"), "n_incomplete"] == 1
    assert numbers.loc[("mnist_ae", "mnist-full", "sgd"), "n_diverged"] == 0
    markdown = table.to_markdown()
    sgd = np.array(list(FINALS[("mnist_ae", "mnist-full", "sgd", "sgd")].values()))
    assert fmt_mean_std(sgd.mean(), sgd.std(ddof=1)) in markdown  # 61 ± 1
    assert "| mnist_ae | mnist-5k | kfac | 3 | 0 | 0 |" in markdown
    latex = table.to_latex()
    assert r"\toprule" in latex and r"61 $\pm$ 1" in latex and r"mnist\_ae" in latex

    per_output = final_loss_table(results, loss_kind=LossKind.PER_OUTPUT).numbers
    row = per_output.set_index(["benchmark", "data_variant", "optimizer"]).loc[
        ("mnist_ae", "mnist-full", "sgd")
    ]
    assert row["final_train_loss_per_output_mean"] == pytest.approx(sgd.mean() / OUTPUTS)


def _lines(ax: object, prefix: str) -> dict[str, object]:
    return {
        line.get_gid().split(":", 1)[1]: line
        for line in ax.get_lines()  # type: ignore[attr-defined]
        if (line.get_gid() or "").startswith(prefix)
    }


def test_benchmark_figure_draws_seed_means(written: Written, results: ResultsSet) -> None:
    fig = plot_benchmark(results, benchmark="mnist_ae", axes=(Axis.EPOCH, Axis.STEP, Axis.WALL))
    grid = np.array(fig.axes).reshape(2, 3)  # rows: train loss, test loss
    mnist_keys = [k for k in FINALS if k[0] == "mnist_ae"]
    for row, scale in ((0, 1.0), (1, 1.1)):
        for col in range(3):
            ax = grid[row, col]
            means = _lines(ax, "mean:")
            assert sorted(means) == sorted(label_of(k) for k in mnist_keys)
            assert ax.get_yscale() == "log"
            if col == 2:
                continue
            for key in mnist_keys:
                # log axis: the geometric mean over seeds
                logs = np.log(np.array(list(written.curves[key].values())) * scale)
                expected = np.exp(logs.mean(axis=0))
                np.testing.assert_allclose(means[label_of(key)].get_ydata(), expected, rtol=1e-12)
            # the diverged run: its own dotted line, finite values only, never in the mean
            diverged = _lines(ax, "diverged:")
            assert list(diverged) == [written.diverged_id]
            assert len(diverged[written.diverged_id].get_ydata()) == 5
    # no pooling: the two kfac variants are two curves with their own means
    full = _lines(grid[0, 0], "mean:")["kfac · mnist-full"].get_ydata()
    small = _lines(grid[0, 0], "mean:")["kfac · mnist-5k"].get_ydata()
    assert full[-1] == pytest.approx(stats.gmean(list(FINALS[mnist_keys[1]].values())))
    assert small[-1] == pytest.approx(stats.gmean(list(FINALS[mnist_keys[3]].values())))
    # wall-clock: interpolated onto the span every seed covers
    sgd_key = mnist_keys[0]
    wall_line = _lines(grid[0, 2], "mean:")[label_of(sgd_key)]
    x = wall_line.get_xdata()
    walls = written.walls[sgd_key]
    assert x[0] == pytest.approx(max(w[0] for w in walls.values()))
    assert x[-1] == pytest.approx(min(w[-1] for w in walls.values()))
    mid = x[len(x) // 2]
    expected_mid = stats.gmean(
        [np.interp(mid, walls[s], written.curves[sgd_key][s]) for s in walls]
    )
    assert wall_line.get_ydata()[len(x) // 2] == pytest.approx(expected_mid)
    # labels with units, a legend stating the band
    assert grid[1, 0].get_xlabel().startswith("epoch")
    assert grid[1, 2].get_xlabel() == "wall-clock time (s)"
    assert grid[0, 0].get_ylabel() == "train loss (nats)"
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert Band.CI95.description in texts and "sgd · mnist-full (n=3)" in texts
    assert any(t.startswith("diverged run") for t in texts)


def test_band_is_the_t_interval_or_the_range(written: Written, results: ResultsSet) -> None:
    key = ("mnist_ae", "mnist-full", "sgd", "sgd")
    values = np.array(list(written.curves[key].values()))
    logs = np.log(values)  # log axis: the band is computed on the log losses
    half = stats.t.ppf(0.975, 2) * logs.std(axis=0, ddof=1) / np.sqrt(3)
    for band, lower, upper in (
        (Band.CI95, np.exp(logs.mean(0) - half), np.exp(logs.mean(0) + half)),
        (Band.MINMAX, values.min(0), values.max(0)),
    ):
        fig = plot_benchmark(results, benchmark="mnist_ae", axes=(Axis.EPOCH,), band=band)
        poly = [
            c
            for c in fig.axes[0].collections
            if isinstance(c, PolyCollection) and c.get_gid() == "band:sgd · mnist-full"
        ]
        assert len(poly) == 1
        vertices = poly[0].get_paths()[0].vertices
        n = values.shape[1]
        # fill_between(x, lower, upper): lower runs forward, upper comes back
        np.testing.assert_allclose(vertices[1 : n + 1, 1], lower, rtol=1e-12)
        np.testing.assert_allclose(vertices[n + 2 : 2 * n + 2, 1][::-1], upper, rtol=1e-12)


def test_main_figure_has_one_column_per_benchmark(results: ResultsSet) -> None:
    fig = plot_main(results, benchmarks=["curves_ae", "mnist_ae"], axes=(Axis.EPOCH, Axis.WALL))
    assert len(fig.axes) == 4
    titles = [ax.get_title() for ax in fig.axes[:2]]
    assert titles == ["curves_ae", "mnist_ae"]
    assert sorted(_lines(fig.axes[0], "mean:")) == ["adam", "kfac", "kfac2"]
    assert len(_lines(fig.axes[1], "mean:")) == 4
    assert fig.axes[3].get_xlabel() == "wall-clock time (s)"


def _assert_no_overlap(fig: Figure) -> None:
    """Panels (with their labels and ticks), legend and title do not overlap once drawn."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    boxes += [legend.get_window_extent(renderer) for legend in fig.legends]
    if fig._suptitle is not None:  # the public getter returns only its text
        boxes.append(fig._suptitle.get_window_extent(renderer))
    figure_box = fig.bbox
    for box in boxes:
        assert box.x0 >= figure_box.x0 - 1 and box.x1 <= figure_box.x1 + 1
        assert box.y0 >= figure_box.y0 - 1 and box.y1 <= figure_box.y1 + 1
    for a, b in combinations(boxes, 2):
        overlap_w = min(a.x1, b.x1) - max(a.x0, b.x0)
        overlap_h = min(a.y1, b.y1) - max(a.y0, b.y0)
        assert overlap_w <= 1 or overlap_h <= 1, (a, b)


def test_figures_lay_out_without_overlap(results: ResultsSet) -> None:
    _assert_no_overlap(plot_benchmark(results, benchmark="mnist_ae"))
    _assert_no_overlap(plot_main(results, benchmarks=["curves_ae", "mnist_ae"]))
    analysis = time_to_target_analysis(results, n_bootstrap=10)
    profile = plot_profile(
        {"wall-clock": performance_profile(analysis.wall_times)},
        optimizer_of={name: name for name in analysis.wall_times.columns},
        palette=Palette.for_optimizers(analysis.wall_times.columns),
    )
    _assert_no_overlap(profile)
    lines = [line for line in profile.axes[0].get_lines() if line.get_gid()]
    assert sorted(line.get_gid() for line in lines) == [
        "profile:adam",
        "profile:kfac",
        "profile:kfac2",
        "profile:sgd",
    ]


def test_time_to_target_against_the_baseline(written: Written, results: ResultsSet) -> None:
    analysis = time_to_target_analysis(results, n_bootstrap=200)
    problems = analysis.problems.set_index("problem")
    # optimizers keep one name across problems (the problem names the variant)
    assert sorted(analysis.wall_times.columns) == ["adam", "kfac", "kfac2", "sgd"]
    sgd = np.array(list(FINALS[("mnist_ae", "mnist-full", "sgd", "sgd")].values()))
    assert problems.loc["mnist_ae (mnist-full)", "target"] == pytest.approx(sgd.mean())
    assert problems.loc["mnist_ae (mnist-full)", "baseline"] == "sgd"
    assert problems.loc["curves_ae (curves-surrogate)", "baseline"] == "adam"
    assert "no completed sgd/adam baseline" in problems.loc["mnist_ae (mnist-5k)", "note"]
    rows = analysis.numbers.set_index(["problem", "label"])
    base = rows.loc[("mnist_ae (mnist-full)", "sgd")]
    assert base["speedup_wall"].value == pytest.approx(1.0)
    assert base["epochs"].value == EPOCHS  # the baseline's mean reaches its mean at the end
    key = ("mnist_ae", "mnist-full", "kfac", "kfac")
    mean = np.mean(list(written.curves[key].values()), axis=0)
    first = int(np.argmax(mean <= sgd.mean()))
    wall = np.mean([w[first] for w in written.walls[key].values()])
    base_wall = np.mean(
        [w[-1] for w in written.walls[("mnist_ae", "mnist-full", "sgd", "sgd")].values()]
    )
    kfac = rows.loc[("mnist_ae (mnist-full)", "kfac")]
    assert kfac["epochs"].value == first
    assert kfac["wall_s"].value == pytest.approx(wall)
    assert kfac["speedup_wall"].value == pytest.approx(base_wall / wall)
    assert kfac["speedup_epochs"].value == pytest.approx(EPOCHS / first)
    assert kfac["wall_s"].low <= kfac["wall_s"].value <= kfac["wall_s"].high
    assert kfac["seeds_reaching"] == 3
    assert not any("mnist-5k" in p for p in analysis.wall_times.index)


def test_paired_difference_two_level_minus_kfac(results: ResultsSet) -> None:
    numbers = paired_numbers(results)
    train = numbers[numbers["metric"] == "final_train_loss"].set_index("problem")
    assert set(train.index) == {"mnist_ae (mnist-full)", "curves_ae (curves-surrogate)"}
    for benchmark, variant in (("mnist_ae", "mnist-full"), ("curves_ae", "curves-surrogate")):
        two = FINALS[(benchmark, variant, "kfac2", "kfac2")]
        one = FINALS[(benchmark, variant, "kfac", "kfac")]
        seeds = sorted(set(two) & set(one))
        a, b = [two[s] for s in seeds], [one[s] for s in seeds]
        result = train.loc[f"{benchmark} ({variant})", "result"]
        assert result.n == 3 and result.seeds == (0, 1, 2)
        assert result.mean_diff == pytest.approx(np.mean(np.subtract(a, b)))
        # exact sign-flip p over 3 pairs: a multiple of 1/8, at least 2/8
        assert result.p_diff in (0.25, 0.5, 0.75, 1.0)
    mnist = train.loc["mnist_ae (mnist-full)"]
    assert mnist["two_level_diverged"] == 1
    # three pairs can reach neither Holm-adjusted significance nor equivalence
    assert {j.verdict.value for j in numbers["judged"]} == {"inconclusive"}


def test_build_writes_everything_and_reports_skips(
    written: Written, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures"
    code = main(
        ["--results", str(written.root), "--out", str(out), "--bootstrap", "100", "--axes", "epoch"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "mnist_sgd_torn_s5 [corrupt] unreadable" in printed
    assert f"{written.diverged_id} [diverged]" in printed
    assert f"{written.running_id} [running]" in printed
    names = {p.name for p in out.iterdir()}
    for stem in ("mnist_ae_curves", "curves_ae_curves", "main_figure", "performance_profile"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
    for stem in ("table_final_loss", "table_time_to_target", "table_two_level_vs_kfac"):
        assert {f"{stem}.md", f"{stem}.tex"} <= names
    for name in names:
        assert f"  {out / name}" in printed
    report = (out / "report.md").read_text()
    assert "![mnist_ae curves](mnist_ae_curves.png)" in report
    assert "![Performance profiles](performance_profile.png)" in report
    assert "**inconclusive**" in report and "over n = 3 pairs" in report
    assert "two-level beats" not in report and "significant difference" not in report
    assert "0.0683" in report and "per-pixel" in report  # published MNIST K-FAC, labelled
    assert "no: `curves-surrogate` is not the published data" in report
    assert f"Our runs: batch_size 100; epochs {EPOCHS}." in report
    assert "mnist_sgd_torn_s5" in report and written.diverged_id in report


def test_build_filters_and_bad_options(
    written: Written, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = build_all(
        BuildOptions(
            results=(written.root,),
            out=tmp_path,
            benchmarks=("curves_ae",),
            optimizers=("kfac", "kfac2"),
            axes=(Axis.EPOCH,),
            band=Band.MINMAX,
            n_bootstrap=50,
        )
    )
    assert set(output.results.runs["benchmark"]) == {"curves_ae"}
    assert set(output.results.runs["optimizer"]) == {"kfac", "kfac2"}
    assert not (tmp_path / "mnist_ae_curves.png").exists()
    assert not (tmp_path / "performance_profile.png").exists()  # no sgd/adam: no target
    report = (tmp_path / "report.md").read_text()
    assert "band: min–max over seeds" in report and "## mnist_ae" not in report
    assert (
        main(["--results", str(written.root), "--benchmark", "nope", "--out", str(tmp_path)]) == 2
    )
    assert "--benchmark: unknown nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--axes", "epoch,time"])
    assert "--axes: unknown time; allowed: epoch, step, wall" in capsys.readouterr().err


def test_duplicates_settings_and_non_finite_runs(tmp_path: Path) -> None:
    key = ("mnist_ae", "mnist-full", "kfac", "kfac")
    epochs = np.arange(EPOCHS + 1, dtype=float)
    first, second = tmp_path / "a", tmp_path / "b"
    old = write_run(
        first, "old", key=key, seed=0, status="completed", train=loss_curve(50, epochs), wall=epochs
    )
    summary = old.read_summary()
    old.write_summary({**summary, "finished_at": "2023-01-01T00:00:00+00:00"})

    def completed(root: Path, name: str, seed: int, level: float) -> RunFolder:
        curve = loss_curve(level, epochs)
        return write_run(
            root, name, key=key, seed=seed, status="completed", train=curve, wall=epochs
        )

    completed(first, "new", 0, 40)
    completed(second, "new", 1, 45)
    other = completed(first, "other_lr", 0, 30)
    other.write_summary({**other.read_summary(), "hyperparameters": {"lr": 0.1, "damping": 0.001}})
    nan_curve = loss_curve(45, epochs)
    nan_curve[-1] = np.nan
    write_run(first, "nan_final", key=key, seed=2, status="completed", train=nan_curve, wall=epochs)
    # the same group and seed on a validation split: a pilot stands in for no result
    pilot = completed(first, "pilot", 0, 20)
    pilot.write_summary({**pilot.read_summary(), "tuning": {"stage": "pilot"}})

    results = load_results([first, second, first])  # a root given twice is read once
    skipped = {s.run_id: s.reason for s in results.skipped()}
    assert skipped["old"] == "superseded: a later completed run has the same seed"
    assert skipped[f"new@{second / 'new'}"].startswith("duplicate run_id new")
    assert skipped["nan_final"] == "completed but the final train loss is not finite"
    assert sorted(results.usable_runs()["run_id"]) == ["new", "other_lr", "pilot"]
    table = final_loss_table(results.filter(trials=False)).numbers
    # two learning rates are two groups, labelled by the setting that differs
    assert sorted(table["label"]) == ["kfac · lr=0.01", "kfac · lr=0.1"]
    row = table.set_index("label").loc["kfac · lr=0.01"]
    assert row["n_seeds"] == 1 and row["final_train_loss_mean"] == pytest.approx(40.0)


def test_classifier_gets_an_accuracy_row(tmp_path: Path) -> None:
    key = ("fmnist_2c2d", "fmnist-full", "adam", "adam")
    epochs = np.arange(EPOCHS + 1, dtype=float)
    accs = {0: 0.80 + 0.01 * epochs, 1: 0.78 + 0.012 * epochs}
    for seed, acc in accs.items():
        train = loss_curve(0.3 + 0.01 * seed, epochs, start=2.3)
        write_run(
            tmp_path,
            f"cls_s{seed}",
            key=key,
            seed=seed,
            status="completed",
            train=train,
            wall=epochs,
            acc=acc,
        )
    results = load_results([tmp_path])
    fig = plot_benchmark(results, benchmark="fmnist_2c2d", axes=(Axis.EPOCH,))
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "train loss (nats)",
        "test loss (nats)",
        "test accuracy (fraction)",
    ]
    assert fig.axes[2].get_yscale() == "linear"
    mean = _lines(fig.axes[2], "mean:")["adam"].get_ydata()
    np.testing.assert_allclose(mean, (accs[0] + accs[1]) / 2)
    row = final_loss_table(results).numbers.iloc[0]
    assert row["final_test_acc_mean"] == pytest.approx((accs[0][-1] + accs[1][-1]) / 2)


def test_budget_from_config_splits_groups(tmp_path: Path) -> None:
    key = ("mnist_ae", "mnist-full", "sgd", "sgd")
    epochs = np.arange(EPOCHS + 1, dtype=float)
    for seed in (0, 1):
        write_run(
            tmp_path,
            f"long{seed}",
            key=key,
            seed=seed,
            status="completed",
            train=loss_curve(50 + seed, epochs),
            wall=epochs,
        )
    short = write_run(
        tmp_path,
        "short0",
        key=key,
        seed=0,
        status="completed",
        train=loss_curve(70, epochs),
        wall=epochs,
    )
    short.write_config("trainer:\n  epochs: 4\n  batch_size: 100\n")
    table = final_loss_table(load_results([tmp_path])).numbers.set_index("label")
    assert sorted(table.index) == ["sgd · epochs=4", f"sgd · epochs={EPOCHS}"]
    assert table.loc[f"sgd · epochs={EPOCHS}", "final_train_loss_mean"] == pytest.approx(50.5)
    assert table.loc["sgd · epochs=4", "n_seeds"] == 1


def test_tuning_trials_and_pilots_are_left_out_unless_asked_for(tmp_path: Path) -> None:
    key = ("mnist_ae", "mnist-5k", "sgd", "sgd")
    epochs = np.arange(EPOCHS + 1, dtype=float)
    for seed, stage in ((0, "tune"), (1, "final"), (2, "final"), (3, "pilot")):
        write_run(
            tmp_path,
            f"{stage}{seed}",
            key=key,
            seed=seed,
            status="completed",
            train=loss_curve(40 + 10 * seed, epochs),
            wall=epochs,
            tuning={"stage": stage, "budget": 6},
        )
    everything = load_results([tmp_path])
    assert len(everything.runs) == 4
    kept = everything.filter(trials=False)
    assert sorted(kept.runs["run_id"]) == ["final1", "final2"]
    assert set(kept.evals["run_id"]) == {"final1", "final2"}
    table = final_loss_table(kept).numbers
    assert table["final_train_loss_mean"].iloc[0] == pytest.approx(55.0)
    out = build_all(BuildOptions(results=(tmp_path,), out=tmp_path / "fig"))
    assert sorted(out.results.runs["run_id"]) == ["final1", "final2"]
    with_trials = build_all(BuildOptions(results=(tmp_path,), out=tmp_path / "f2", trials=True))
    assert len(with_trials.results.runs) == 4


def test_paired_difference_only_pairs_matching_kfac_settings(tmp_path: Path) -> None:
    """kfac2 is paired with the K-FAC run of the same damping, never with another setting."""
    epochs = np.arange(EPOCHS + 1, dtype=float)
    for family, damping, finals in (
        ("kfac", 0.001, (60.0, 61.0)),
        ("kfac", 0.01, (90.0, 91.0)),
        ("kfac2", 0.001, (58.0, 58.5)),
    ):
        for seed, final in enumerate(finals):
            folder = write_run(
                tmp_path,
                f"{family}-{damping}-{seed}",
                key=("mnist_ae", "mnist-full", family, family),
                seed=seed,
                status="completed",
                train=loss_curve(final, epochs),
                wall=epochs,
            )
            summary = folder.read_summary()
            summary["hyperparameters"] = {"lr": 0.01, "damping": damping}
            folder.write_summary(summary)
    numbers = paired_numbers(load_results([tmp_path]))
    train = numbers[numbers["metric"] == "final_train_loss"]
    assert len(train) == 1
    result = train.iloc[0]["result"]
    assert result.n == 2 and result.b_mean == pytest.approx(60.5)


def test_a_benchmark_run_by_several_presets_gets_a_figure_per_preset(tmp_path: Path) -> None:
    epochs = np.arange(EPOCHS + 1, dtype=float)
    for experiment, final, seeds in (("study_a", 40.0, (0, 1)), ("study_b", 80.0, (2, 3))):
        for seed in seeds:
            write_run(
                tmp_path,
                f"{experiment}{seed % 2}",
                key=("mnist_ae", "mnist-5k", "adam", "adam"),
                seed=seed,
                status="completed",
                train=loss_curve(final + seed % 2, epochs),
                wall=epochs,
                experiment=experiment,
            )
    write_run(
        tmp_path,
        "alone",
        key=("curves_ae", "curves-full", "sgd", "sgd"),
        seed=0,
        status="completed",
        train=loss_curve(60.0, epochs),
        wall=epochs,
        experiment="study_c",
    )
    results = load_results([tmp_path])
    assert results.experiments("mnist_ae") == ["study_a", "study_b"]
    assert sorted(results.of_experiment("study_b").runs["run_id"]) == ["study_b0", "study_b1"]
    assert set(results.of_experiment("study_b").evals["run_id"]) == {"study_b0", "study_b1"}
    out = build_all(BuildOptions(results=(tmp_path,), out=tmp_path / "fig"))
    names = {path.name for path in out.files}
    assert {"mnist_ae_study_a_curves.png", "mnist_ae_study_b_curves.pdf"} <= names
    assert not any(name.startswith("curves_ae_study_c") for name in names)  # one preset: no copy
    report = (tmp_path / "fig" / "report.md").read_text()
    assert "![mnist_ae: study_a only](mnist_ae_study_a_curves.png)" in report
    fig = plot_benchmark(results.of_experiment("study_a"), benchmark="mnist_ae", subtitle="a")
    title = fig.get_suptitle()
    assert title.startswith("mnist_ae (a): mean over seeds")
    means = _lines(fig.axes[0], "mean:")
    assert list(means) == ["adam"]  # one group: study_b's runs are not pooled in
    assert means["adam"].get_ydata()[-1] == pytest.approx(
        stats.gmean([40.0, 41.0])
    )  # geometric on log y


def test_a_figure_never_draws_two_optimizers_in_one_colour() -> None:
    # an analysis with more presets than spare colours: the analysis-wide palette repeats some
    names = ["sgd", "kfac", "kfac2", "kfac2_authors", "kfac2_exact", "kfac2_krylov"]
    names += ["kfac2_krylov_residual", "kfac2_residual", "kfac2_spectral"]
    palette = Palette.for_optimizers(names)
    shown = ["sgd", "kfac", "kfac2", "kfac2_authors", "kfac2_exact", "kfac2_spectral"]
    assert len({palette.colour(n) for n in shown}) < len(shown)
    mine = figure_palette(palette, shown)
    assert len({mine.colour(n) for n in shown}) == len(shown)
    assert mine.colour("kfac") == palette.colour("kfac")  # the families keep their colours
    distinct = ["sgd", "kfac", "kfac2_authors"]
    assert figure_palette(palette, distinct) is palette  # nothing to fix: stays analysis-wide
    # no analysis-wide palette: a figure's own extra preset is never drawn in SGD's black
    alone = figure_palette(None, ["kfac", "kfac2_exact"])
    assert alone.colour("kfac2_exact") not in (alone.colour("kfac"), alone.colour("sgd"))
