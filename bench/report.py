"""The benchmark result as JSON and as a Markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from suite.store import atomic_write_json, atomic_write_text

JSON_FILE = "bench.json"
MARKDOWN_FILE = "bench.md"
MIB = 1024 * 1024


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = 1000 * seconds
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"


def _x(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×" if ratio < 100 else f"{ratio:.0f}×"


def _flush(setting: bool | None) -> str:
    if setting is None:
        return "as suite.seeding.seed_everything leaves them"
    return "flushed to zero (forced)" if setting else "kept (forced)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _meta(result: dict[str, Any]) -> list[str]:
    meta = result["meta"]
    env = meta["environment"]
    settings = meta["settings"]
    thr = result["throughput"]
    batches = ", ".join(f"{name} {p['batch']}" for name, p in result["problems"].items())
    quick = " **(quick smoke run: small batches, few repeats — not the reference numbers)**"
    return [
        "# Step-cost benchmark" + (quick if settings["quick"] else ""),
        "",
        f"- Machine: {env['cpu']} ({env['cpu_count']} logical CPUs), device {env['device']}"
        + (f", GPU {env['gpu']['name']}" if env.get("gpu") else ""),
        f"- torch {env['packages'].get('torch')}, Python {env['python']}, "
        f"threads {meta['threads']}, denormals {_flush(meta['flush_denormal'])}, "
        f"commit {str(env['code'].get('commit'))[:10]}"
        + (" (dirty)" if env["code"].get("dirty") else ""),
        f"- Batch sizes: {batches}; repeats {settings['repeats']} per group (each whole cycles of "
        f"T_inv steps, at least {settings['min_steps']} steps), warm-up {settings['warmup']} "
        f"steps; stage breakdown at {settings['stage_periods']} over {settings['stage_steps']} "
        "steps",
        f"- Matmul {thr['before']['size']}³ {thr['before']['dtype']}: "
        f"{thr['before']['flops_per_s'] / 1e9:.1f} GFLOP/s at the start, "
        f"{thr['after']['flops_per_s'] / 1e9:.1f} at the end (drift {thr['drift']:.2f}); "
        "the floors use the same matmul timed once per round, interleaved with the steps",
        f"- Timed step: {meta['timed_step']}; wall time of the run {meta['elapsed_s']:.0f} s",
        "",
        "Step time = median over repeats of the mean step of a repeat (whole T_inv cycles: the "
        "amortised cost). × SGD = that median ÷ SGD's, measured interleaved in the same group. "
        "Floor = counted matrix flops ÷ measured matmul throughput (docs/performance.md). "
        "Cross-check = step-class medians weighted by their frequencies ÷ the step time. "
        "Denormal grads = share of subnormal gradient entries after the group's last step "
        "(arithmetic on them is many times slower on x86; see docs/performance.md).",
        "",
    ]


def _groups(name: str, problem: dict[str, Any]) -> list[str]:
    lines = [f"## {name} (batch {problem['batch']})", ""]
    lines += [f"Model: {problem['model']}. Data: {problem['data']}.", ""]
    for label, group in problem["groups"].items():
        lines += [f"### {label} (T_cov={group['periods']['cov']}, T_inv={group['periods']['inv']})"]
        lines.append("")
        gflops = group["throughput"]["flops_per_s"] / 1e9
        lines += [f"Matmul during the group: {gflops:.1f} GFLOP/s.", ""]
        rows = []
        for method, e in group["methods"].items():
            rows.append(
                [
                    method,
                    _ms(e["amortised_s"]),
                    _x(e["ratio_vs_sgd"]),
                    _ms(e["floor_s"]),
                    _x(e["over_floor"]),
                    _x(e["floor_ratio_vs_sgd"]),
                    "–" if e["crosscheck"] is None else f"{e['crosscheck']:.2f}",
                    f"{100 * e['denormal_grad_fraction']:.1f}",
                    str(e["divergences"]),
                ]
            )
        header = ["method", "step ms", "× SGD", "floor ms", "× floor", "floor × SGD"]
        lines += _table([*header, "cross-check", "denormal grads %", "resets"], rows)
        lines.append("")
    return lines


FLOOR_METHODS = ("sgd", "kfac[factored]", "kfac[eigen]", "kfac2")


def _stages(problem: dict[str, Any]) -> list[str]:
    stages = problem.get("stages")
    if not stages:
        return []
    first = next(iter(stages.values()))
    lines = [
        f"### Per-stage breakdown ({first['periods']}, {first['steps']} instrumented steps)",
        "",
        "Median ms over the steps a stage runs on (exclusive times: nested stages subtracted).",
        "",
    ]
    names: list[str] = []
    for entry in stages.values():
        for stage in entry["stages"]:
            if stage not in names:
                names.append(stage)
    rows = []
    for method, entry in stages.items():
        row = [method]
        for stage in names:
            s = entry["stages"].get(stage)
            row.append("–" if s is None or s["occurrences"] == 0 else _ms(s["median_s"]))
        rows.append(row)
    lines += _table(["method", *names], rows)
    lines += ["", "Stages with a floor:", ""]
    rows = []
    for method in FLOOR_METHODS:
        entry = stages.get(method)
        if entry is None:
            continue
        for stage, s in entry["stages"].items():
            if s["floor_s"] is None:
                continue
            rows.append([method, stage, _ms(s["median_s"]), _ms(s["floor_s"]), _x(s["over_floor"])])
    lines += _table(["method", "stage", "measured ms", "floor ms", "× floor"], rows)
    lines += ["", "Amortised step predicted from the stages ÷ measured (interleaved):", ""]
    rows = []
    for method, entry in stages.items():
        for label, pred in entry["amortised"].items():
            rows.append(
                [
                    method,
                    label,
                    _ms(pred["from_stages_s"]),
                    _ms(pred["measured_s"]),
                    "–" if pred["crosscheck"] is None else f"{pred['crosscheck']:.2f}",
                ]
            )
    lines += _table(["method", "periods", "from stages ms", "measured ms", "ratio"], rows)
    lines.append("")
    return lines


def _memory(problem: dict[str, Any]) -> list[str]:
    memory = problem.get("memory")
    if not memory:
        return []
    lines = ["### Peak memory (fresh subprocess per method)", ""]
    rows = []
    for method, e in memory.items():
        rows.append(
            [
                method,
                f"{e['peak_bytes'] / MIB:.0f}",
                f"{e['increment_bytes'] / MIB:.0f}",
                _x(e.get("peak_ratio_vs_sgd")),
                _x(e.get("increment_ratio_vs_sgd")),
            ]
        )
    measure = next(iter(memory.values()))["measure"]
    header = ["method", "peak MiB", "above baseline MiB", "peak × SGD", "above baseline × SGD"]
    lines += _table(header, rows)
    lines += [
        "",
        f"Measure: {measure}; baseline = the process after imports, data and one model.",
        "",
    ]
    return lines


def _targets(result: dict[str, Any]) -> list[str]:
    lines = ["## Targets", ""]
    rows = []
    for t in result["targets"]:
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "**missed**")
        value = "–" if t["value"] is None else f"{t['value']:.2f}"
        rows.append([t["problem"], t["name"], value, f"≤ {t['limit']:.2f}", verdict])
    lines += _table(["problem", "target", "measured", "limit", ""], rows)
    lines.append("")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The whole report."""
    lines = _meta(result)
    lines += _targets(result)
    for name, problem in result["problems"].items():
        lines += _groups(name, problem)
        lines += _stages(problem)
        lines += _memory(problem)
    return "\n".join(lines).rstrip() + "\n"


def write(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write bench.json and bench.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / JSON_FILE, out / MARKDOWN_FILE
    atomic_write_json(json_path, result)
    atomic_write_text(md_path, markdown(result))
    return json_path, md_path


def load(out: Path) -> dict[str, Any]:
    """Read a written result back."""
    result: dict[str, Any] = json.loads((out / JSON_FILE).read_text())
    return result
