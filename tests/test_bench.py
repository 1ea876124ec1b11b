"""The performance harness: JSON structure, ratios from medians, floors by hand, Markdown written.

No timing assertions: every check recomputes something from the stored numbers or uses a fake
clock.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from bench import stages as stages_module
from bench.cli import main, parser, settings_from
from bench.floors import (
    Periods,
    Stage,
    StepKind,
    amortised_flops,
    layer_shapes,
    stage_floor_flops,
    stage_flops,
)
from bench.memory import measure as measure_memory
from bench.memory import peak_rss_bytes
from bench.methods import Method
from bench.problems import ProblemName, build_problem
from bench.stages import Stopwatch
from bench.targets import Target, problem_targets
from bench.timing import Contender, StepClass, StepTimes, denormal_fraction, summarise
from bench.ttt import (
    DEFAULT_GRID,
    TTTSettings,
    first_reaching,
    grid_points,
    overrides,
    run_time_to_target,
    selection_key,
    verdict,
    write_ttt,
)
from bench.ttt import summarise as summarise_reruns
from suite.step import train_step

REL = 1e-12


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One quick run on the toy problem: 2 repeats, SGD, K-FAC and kfac2 (memory: its own test)."""
    out = tmp_path_factory.mktemp("bench")
    args = ["--quick", "--problems", "toy", "--periods", "1/2,2/4", "--threads", "1", "--no-memory"]
    args += ["--methods", "kfac[factored],kfac2", "--repeats", "2", "--out", str(out)]
    assert main(args) == 0
    return json.loads((out / "bench.json").read_text()), out


def test_json_structure(smoke: tuple[dict[str, Any], Path]) -> None:
    result, _ = smoke
    assert set(result) == {"meta", "throughput", "problems", "targets"}
    assert result["meta"]["threads"] == 1
    assert result["meta"]["environment"]["cpu"]
    assert result["throughput"]["before"]["flops_per_s"] > 0
    toy = result["problems"]["toy"]
    assert toy["batch"] == 16
    assert set(toy["groups"]) == {"T1/2", "T2/4"}
    for group in toy["groups"].values():
        assert set(group["methods"]) == {"sgd", "kfac[factored]", "kfac2"}
        assert group["repeats"] == 2
        for entry in group["methods"].values():
            assert len(entry["cycle_means_s"]) == 2
    assert set(toy["stages"]) == {"sgd", "kfac[factored]", "kfac2"}
    assert "coarse_correction" in toy["stages"]["kfac2"]["stages"]
    assert "coarse_correction" not in toy["stages"]["kfac[factored]"]["stages"]
    assert "memory" not in toy


def test_memory_is_measured_in_a_fresh_subprocess() -> None:
    ballast = torch.ones(128, 1024, 1024)  # 512 MiB in this process: the child must not see it
    method = Method(label="kfac", preset="kfac", overrides={"damping_mode": "factored"})
    found = measure_memory(
        problem="toy", batch=8, method_json=method.to_json(), steps=2, threads=1, device="cpu"
    )
    assert found["measure"] == "peak RSS (VmHWM)"
    assert found["peak_bytes"] >= found["baseline_bytes"] > 0
    assert found["increment_bytes"] == found["peak_bytes"] - found["baseline_bytes"]
    assert found["peak_bytes"] < peak_rss_bytes()
    del ballast


def test_ratios_come_from_the_medians(smoke: tuple[dict[str, Any], Path]) -> None:
    result, _ = smoke
    for group in result["problems"]["toy"]["groups"].values():
        methods = group["methods"]
        sgd = statistics.median(methods["sgd"]["cycle_means_s"])
        for entry in methods.values():
            median = statistics.median(entry["cycle_means_s"])
            assert entry["amortised_s"] == pytest.approx(median, rel=REL)
            assert entry["ratio_vs_sgd"] == pytest.approx(median / sgd, rel=REL)
            assert entry["over_floor"] == pytest.approx(median / entry["floor_s"], rel=REL)
            floor_ratio = entry["floor_s"] / methods["sgd"]["floor_s"]
            assert entry["floor_ratio_vs_sgd"] == pytest.approx(floor_ratio, rel=REL)
    for name, row in result["problems"]["toy"]["stages"]["kfac[factored]"]["stages"].items():
        if row["floor_s"] is not None:
            assert row["over_floor"] == pytest.approx(row["median_s"] / row["floor_s"]), name
    for target in result["targets"]:
        assert target["met"] is None or target["met"] == (target["value"] <= target["limit"])


def test_markdown_is_written(smoke: tuple[dict[str, Any], Path]) -> None:
    result, out = smoke
    text = (out / "bench.md").read_text()
    assert "quick smoke run" in text
    assert "| method | step ms | × SGD | floor ms | × floor |" in text
    assert "## Targets" in text
    for method in ("sgd", "kfac[factored]", "kfac2"):
        assert f"| {method} |" in text
    ratio = result["problems"]["toy"]["groups"]["T2/4"]["methods"]["kfac2"]["ratio_vs_sgd"]
    assert f"{ratio:.2f}×" in text


def test_floor_counts_by_hand() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Sigmoid(), nn.Linear(2, 4, bias=False))
    layers = layer_shapes(model, torch.zeros(1, 3))
    assert [(x.d_in, x.d_in_aug, x.d_out, x.positions, x.first) for x in layers] == [
        (3, 4, 2, 1, True),
        (2, 2, 4, 1, False),
    ]
    flops = stage_flops(layers, batch=5, stats_rows=3)
    # forward: 2·B·d_in'·d_out = 2·5·4·2 + 2·5·2·4
    assert flops.forward == 80 + 80
    # backward: weight gradients (= forward) + input gradient of the second layer 2·5·2·4
    assert flops.backward == 160 + 80
    assert flops.fisher_pass == 80
    # factors: 2·m·(d_in'² + d_out²) = 2·3·(16 + 4) + 2·3·(4 + 16)
    assert flops.factor_update == 120 + 120
    # Cholesky inverse n³ per factor; eigh 4n³
    assert flops.inversion_factored == (64 + 8) + (8 + 64)
    assert flops.inversion_eigen == 4 * 144
    # G⁻¹ M A⁻¹: 2·d_out·d_in'·(d_out + d_in') = 2·2·4·6 + 2·4·2·6
    assert flops.precondition_factored == 96 + 96
    assert flops.precondition_eigen == 2 * 192
    # coarse: restrict + prolong 2·d_out·d_in' per layer, solve 2·L²
    assert flops.coarse_correction == 16 + 16 + 8
    per_stage = stage_floor_flops(flops, kind=StepKind.KFAC_FACTORED, coarse=False)
    amortised = amortised_flops(per_stage, Periods(cov=2, inv=4))
    assert amortised == 160 + 240 + 192 + (80 + 240) / 2 + 144 / 4
    assert (
        amortised_flops(stage_floor_flops(flops, kind=StepKind.FIRST_ORDER, coarse=False), None)
        == 400
    )


def test_conv_layer_positions() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 1))
    conv, linear = layer_shapes(model, torch.zeros(1, 1, 5, 5))
    assert (conv.d_in, conv.d_in_aug, conv.d_out, conv.positions) == (9, 10, 2, 9)
    assert (linear.d_in, linear.positions, linear.first) == (18, 1, False)
    assert stage_flops([conv], batch=2, stats_rows=2).forward == 2 * 2 * 9 * 10 * 2


def test_summarise_takes_the_median_of_cycle_means() -> None:
    seconds = [[4.0, 1.0, 1.0, 2.0], [6.0, 1.0, 1.0, 2.0], [5.0, 3.0, 1.0, 3.0]]
    kinds = [StepClass.INVERSE, StepClass.PLAIN, StepClass.STATISTICS, StepClass.PLAIN]
    summary = summarise(StepTimes(seconds, [kinds] * 3), Periods(cov=2, inv=4))
    assert summary["cycle_means_s"] == [2.0, 2.5, 3.0]
    assert summary["amortised_s"] == 2.5
    assert summary["class_medians_s"] == {"inverse": 5.0, "plain": 2.0, "statistics": 1.0}
    weighted = 0.25 * 5.0 + 0.25 * 1.0 + 0.5 * 2.0
    assert summary["class_weighted_s"] == pytest.approx(weighted)
    assert summary["crosscheck"] == pytest.approx(weighted / 2.5)


def test_stopwatch_times_are_exclusive(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 1.0, 5.0, 10.0])  # outer starts, inner starts, inner ends, outer ends
    monkeypatch.setattr(stages_module.time, "perf_counter", lambda: next(clock))
    watch = Stopwatch(torch.device("cpu"))
    with watch.stage(Stage.UPDATE), watch.stage(Stage.PRECONDITION):
        pass
    assert watch.take() == {Stage.PRECONDITION: 4.0, Stage.UPDATE: 6.0}


def test_the_timed_step_is_the_trainers() -> None:
    problem = build_problem(ProblemName.TOY, batch=4, device=torch.device("cpu"))
    contender = Contender(method=Method(label="sgd", preset="sgd"), problem=problem)
    assert contender.step_fn.func is train_step  # type: ignore[attr-defined]
    before = [p.detach().clone() for p in contender.model.parameters()]
    contender.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, contender.model.parameters()))


def test_targets_flag_met_and_missed() -> None:
    def group(ratio: float) -> dict[str, Any]:
        methods = {
            "sgd": {"amortised_s": 1.0, "settings": {}},
            "kfac[factored]": {"amortised_s": ratio, "settings": {"damping_mode": "factored"}},
            "kfac[eigen]": {"amortised_s": 2.0, "settings": {"damping_mode": "eigen"}},
        }
        return {"methods": methods}

    problem = {"groups": {"T10/100": group(1.8), "T1/5": group(2.5)}}
    found = {t.name: t for t in problem_targets("p", problem)}
    assert found["K-FAC factored step ÷ SGD at T10/100"] == Target(
        "p", "K-FAC factored step ÷ SGD at T10/100", 1.8, 1.7, False
    )
    assert found["K-FAC eigen step ÷ SGD at T10/100"].met is True
    assert found["K-FAC factored step ÷ SGD at T1/5"].met is True
    assert found["K-FAC factored memory peak ÷ SGD"].met is None


def test_bad_periods_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["--periods", "10/15"])
    assert err.value.code == 2
    assert "T_inv a multiple of T_cov" in capsys.readouterr().err


def test_time_to_target_reads_the_first_evaluation_at_target(tmp_path: Path) -> None:
    evals = pd.DataFrame(
        {
            "step": [0, 8, 16, 24],
            "wall_time_s": [0.0, 1.5, 3.0, 4.5],
            "train_loss": [500, 150, 99, 80],
        }
    )
    assert first_reaching(evals, 100.0) == {"step": 16, "wall_time_s": 3.0}
    assert first_reaching(evals, 50.0) is None
    from suite.config import register_configs
    from suite.preflight import compose_with_choices
    from suite.validate import validate_config

    register_configs()
    settings = TTTSettings()
    for optimizer in ("sgd", "kfac2"):
        point = grid_points(settings.grid[optimizer])[-1]
        cfg, _ = compose_with_choices(overrides(optimizer, settings, tmp_path, point=point, seed=7))
        validate_config(cfg)
        assert cfg.trainer.eval_every_steps == 4 and cfg.trainer.seed == 7
        assert all(cfg.optimizer[key] == value for key, value in point.items())
    assert cfg.optimizer.cov_period == 10 and cfg.optimizer.inv_period == 100


def test_time_to_target_gives_every_optimizer_the_same_budget() -> None:
    budgets = {name: len(grid_points(grid)) for name, grid in DEFAULT_GRID.items()}
    assert set(budgets) == {"sgd", "adam", "kfac", "kfac2"} and set(budgets.values()) == {4}
    assert grid_points({"lr": [1.0, 2.0], "damping": [0.1]}) == [
        {"damping": 0.1, "lr": 1.0},
        {"damping": 0.1, "lr": 2.0},
    ]
    with pytest.raises(ValueError, match="no grid for optimizer"):
        TTTSettings(optimizers=["sgd", "lbfgs"])


def _row(wall: float | None, final: float | None, step: int = 8) -> dict[str, Any]:
    hit = None if wall is None else {"step": step, "wall_time_s": wall}
    return {"wall_to_target_s": wall, "final_train_loss": final, "targets": {"150": hit}}


def test_time_to_target_selection_summary_and_verdict() -> None:
    rows = [_row(None, 160.0), _row(9.0, 80.0), _row(4.0, 120.0), _row(None, None)]
    assert min(rows, key=selection_key) is rows[2]  # fastest to the target wins
    assert min([rows[0], rows[3]], key=selection_key) is rows[0]  # else the lowest final loss
    reached = summarise_reruns([_row(3.0, 1.0, 12), _row(5.0, 1.0, 16), _row(4.0, 1.0, 12)], "150")
    assert reached == {
        "reached": 3,
        "of": 3,
        "median_s": 4.0,
        "min_s": 3.0,
        "max_s": 5.0,
        "median_steps": 12,
    }
    partly = summarise_reruns([_row(3.0, 1.0), _row(None, 200.0)], "150")
    assert partly["reached"] == 1 and partly["median_s"] is None
    summary = {
        "sgd": {"150": partly},
        "adam": {"150": {**reached, "median_s": 6.0}},
        "kfac": {"150": reached},
    }
    assert verdict(summary, "150") == {
        "met": True,
        "kfac_s": 4.0,
        "others_s": {"sgd": None, "adam": 6.0},
    }
    summary["adam"]["150"]["median_s"] = 3.5
    slower = verdict(summary, "150")
    assert slower is not None and slower["met"] is False


def test_time_to_target_end_to_end(tmp_path: Path) -> None:
    """Quick mode through the real loop: a grid point per optimizer, one rerun, files written."""
    settings = TTTSettings(
        optimizers=["sgd", "kfac"], quick=True, target_loss=1e6, extra_targets=(1.0,)
    )
    settings.epochs = 1
    result = run_time_to_target(settings, root=tmp_path / "runs")
    assert [r["seed"] for r in result["runs"]] == [1, 1]
    assert [len(trials) for trials in result["tuning_runs"].values()] == [1, 1]
    for row in result["runs"]:
        assert row["status"] == "completed" and row["data_variant"] == "mnist-5k"
        assert row["steps_to_target"] == 0 and row["targets"]["1"] is None  # evaluated at step 0
    assert result["summary"]["kfac"]["1"]["reached"] == 0
    assert result["environment"]["code"]["commit"] and result["environment"]["cpu_count"] >= 1
    json_path, md_path = write_ttt(result, tmp_path / "out")
    assert json.loads(json_path.read_text())["winners"]["kfac"] == {"damping": 0.01, "lr": 0.1}
    assert "| kfac | damping [0.01], lr [0.1] | damping 0.01, lr 0.1 |" in md_path.read_text()


def test_exact_coarse_fisher_target_picks_the_closest_preset() -> None:
    paper = {"coarse_fisher": "kron", "combination": "additive", "basis_norm": "none"}
    settings = {
        "kfac2": paper,
        "kfac2_balanced": {**paper, "coarse_fisher": "exact", "combination": "balanced"},
        "kfac2_exact": {**paper, "coarse_fisher": "exact", "basis_norm": "max"},
        "kfac2_spectral": {"coarse_fisher": "exact", "combination": "additive"},
    }
    seconds = {"kfac2": 1.1, "kfac2_balanced": 3.0, "kfac2_exact": 1.2, "kfac2_spectral": 2.0}
    methods: dict[str, Any] = {
        label: {"amortised_s": seconds[label], "settings": {**s, "damping_mode": "eigen"}}
        for label, s in settings.items()
    }
    methods["kfac[eigen]"] = {"amortised_s": 1.0, "settings": {"damping_mode": "eigen"}}
    found = {t.name: t for t in problem_targets("p", {"groups": {"T10/100": {"methods": methods}}})}
    exact = found["kfac2_exact ÷ kfac[eigen] at T10/100"]
    assert exact.value == pytest.approx(1.2) and exact.met is False
    paper_target = found["kfac2 (paper settings) ÷ kfac[eigen] at T10/100"]
    assert paper_target.value == pytest.approx(1.1) and paper_target.met is False


def test_denormal_fraction_counts_subnormal_gradient_entries() -> None:
    layer = nn.Linear(2, 2)
    tiny = torch.finfo(torch.float32).tiny
    torch.set_flush_denormal(False)  # the training loop turns flushing on for the process
    try:
        layer.weight.grad = torch.tensor([[tiny / 4, 0.0], [1.0, -tiny / 8]])
        layer.bias.grad = torch.tensor([tiny, 0.5])
        fraction = denormal_fraction(layer)
    finally:
        torch.set_flush_denormal(True)
    assert fraction == pytest.approx(2 / 6)


def test_flush_denormal_is_an_explicit_setting(smoke: tuple[dict[str, Any], Path]) -> None:
    result, _ = smoke
    assert result["meta"]["flush_denormal"] is None
    toy = result["problems"]["toy"]["groups"]["T1/2"]["methods"]["sgd"]
    assert 0.0 <= toy["denormal_grad_fraction"] <= 1.0
    assert settings_from(parser().parse_args(["--flush-denormal", "on"])).flush_denormal is True
    assert settings_from(parser().parse_args(["--flush-denormal", "off"])).flush_denormal is False
    assert settings_from(parser().parse_args([])).flush_denormal is None
