"""The README's generated step-cost table (analyze/bench_table.py) comes from the stored results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analyze.bench_table import COLUMNS, PERIODS, SOURCES, render_bench_table


def stored_result(problem: str, sgd_s: float, scale: float) -> dict[str, object]:
    """A `make bench` result: every method's step ``scale`` × its index × SGD's."""
    groups = {}
    for p, period in enumerate(PERIODS):
        methods = {"sgd": {"amortised_s": sgd_s, "ratio_vs_sgd": 1.0, "floor_ratio_vs_sgd": 1.0}}
        for i, (key, _, _) in enumerate(COLUMNS):
            ratio = 1 + scale * (i + 1) + p
            methods[key] = {
                "amortised_s": sgd_s * ratio,
                "ratio_vs_sgd": ratio,
                "floor_ratio_vs_sgd": ratio + 0.5,
            }
        groups[period] = {"methods": methods}
    return {
        "meta": {
            "elapsed_s": 600.0,
            "started_unix": 0.0,  # 1970-01-01
            "threads": 2,
            "settings": {"repeats": 3},
            "environment": {
                "code": {"commit": "abcdef0123", "dirty": False},
                "cpu": "Test CPU",
                "cpu_count": 2,
            },
        },
        "problems": {problem: {"batch": 7, "groups": groups}},
    }


def write_reference(folder: Path) -> None:
    for k, (name, problem) in enumerate(SOURCES):
        (folder / name).write_text(json.dumps(stored_result(problem, 0.1 * (k + 1), 0.1)))


def test_cells_are_the_stored_ratios_and_floors(tmp_path: Path) -> None:
    write_reference(tmp_path)
    lines = render_bench_table(tmp_path).splitlines()
    first, second = SOURCES[0][1], SOURCES[1][1]
    assert lines[0].startswith("| problem (batch), T_cov/T_inv | SGD step | Adam |")
    # Adam (index 0) at T10/100: 1.1×, no floor; K-FAC factored (index 1, with floor): 1.2× (1.70)
    assert (
        lines[2]
        == f"| {first} (7), 10/100 | 100 ms | 1.10× | 1.20× (1.70) | 1.30× (1.80) | 1.40× | 1.50× |"
    )
    # the second period adds 1 to every ratio in the stored result
    assert (
        lines[3]
        == f"| {first} (7), 1/5 | 100 ms | 2.10× | 2.20× (2.70) | 2.30× (2.80) | 2.40× | 2.50× |"
    )
    assert lines[4].startswith(f"| {second} (7), 10/100 | 200 ms | 1.10× |")
    text = "\n".join(lines)
    # two-level ÷ K-FAC eigen step: 1.4 / 1.3 and 1.5 / 1.3
    assert f"{first} kfac2 1.08×, kfac2_exact 1.15×" in text
    assert "1970-01-01, commit abcdef0, Test CPU (2 logical CPUs), 2 threads" in text
    assert "10 minutes" in text


def test_a_result_without_the_problem_is_an_error(tmp_path: Path) -> None:
    write_reference(tmp_path)
    name, problem = SOURCES[0]
    (tmp_path / name).write_text(json.dumps(stored_result("other_problem", 0.1, 0.1)))
    with pytest.raises(ValueError, match=f"no problem '{problem}'"):
        render_bench_table(tmp_path)


def test_a_missing_result_or_method_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no stored benchmark result"):
        render_bench_table(tmp_path)
    write_reference(tmp_path)
    name, problem = SOURCES[0]
    result = stored_result(problem, 0.1, 0.1)
    del result["problems"][problem]["groups"][PERIODS[1]]["methods"]["kfac2_exact"]  # type: ignore[index]
    (tmp_path / name).write_text(json.dumps(result))
    with pytest.raises(ValueError, match=f"{PERIODS[1]}: no method kfac2_exact"):
        render_bench_table(tmp_path)
