"""The README's generated test-time table (analyze/ci_table.py) comes from the stored CI records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from analyze.ci_table import STEPS, render_ci_table


def record(started: str, seconds: tuple[int, ...], **changes: Any) -> dict[str, Any]:
    """A record as `CI_RECORD=... bash .ci/run` writes it: step k took ``seconds[k]``."""
    tests = ("", "1246 passed, 5 deselected", "", "26 passed, 2 skipped")
    out: dict[str, Any] = {
        "schema": 1,
        "started_utc": started,
        "commit": "0123456789abcdef",
        "cpu": "Test CPU",
        "cpu_count": 2,
        "load_start": 0.5,
        "note": "quiet machine",
        "steps": [
            {"command": command, "seconds": s, "tests": t or None}
            for command, s, t in zip(STEPS, seconds, tests, strict=True)
        ],
        "total_seconds": sum(seconds) + 3,
        "result": "passed",
    }
    out.update(changes)
    return out


def write(folder: Path, name: str, content: dict[str, Any]) -> None:
    (folder / name).write_text(json.dumps(content))


def test_one_row_per_record_oldest_first_with_the_stored_times(tmp_path: Path) -> None:
    # file names sort the other way round from the start times: rows follow the start times
    write(tmp_path, "a.json", record("2026-12-05T10:00:00Z", (100, 200, 15, 431), load_start=3.25))
    write(tmp_path, "b.json", record("2026-12-04T09:30:00Z", (59, 61, 7, 3600), note=""))
    lines = render_ci_table(tmp_path).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| started (UTC), commit | machine | load average at start |")
    assert lines[2] == (
        "| 2026-12-04 09:30:00, 0123456 | Test CPU (2 logical CPUs) | 0.50 | – | 59 s "
        "| 1 min 1 s (1246 passed, 5 deselected) | 7 s | 60 min 0 s (26 passed, 2 skipped) "
        "| 62 min 10 s |"
    )
    assert lines[3] == (
        "| 2026-12-05 10:00:00, 0123456 | Test CPU (2 logical CPUs) | 3.25 | quiet machine "
        "| 1 min 40 s | 3 min 20 s (1246 passed, 5 deselected) | 15 s "
        "| 7 min 11 s (26 passed, 2 skipped) | 12 min 29 s |"
    )


def test_an_unknown_load_is_a_dash(tmp_path: Path) -> None:
    write(tmp_path, "a.json", record("2026-12-05T10:00:00Z", (1, 2, 3, 4), load_start=None))
    assert "| Test CPU (2 logical CPUs) | – | quiet machine |" in render_ci_table(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"started_utc": "x"}), "no commit, cpu"),
        (json.dumps(record("2026-12-05T10:00:00Z", (1, 2, 3, 4), result="failed")), "only passed"),
        (
            json.dumps(record("2026-12-05T10:00:00Z", (1, 2, 3, 4), steps=[])),
            "are not the steps of .ci/run",
        ),
        (
            json.dumps(record("2026-12-05T10:00:00Z", (1, 2, 3, 4), steps=[{"command": "x"}])),
            "each step needs a command and its seconds",
        ),
    ],
)
def test_a_bad_record_is_a_one_line_error_naming_the_file(
    tmp_path: Path, content: str, message: str
) -> None:
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        render_ci_table(tmp_path)
    assert "bad.json" in str(err.value) and "\n" not in str(err.value)


def test_no_record_yet_says_how_to_make_one(tmp_path: Path) -> None:
    for records in (tmp_path / "records", tmp_path):  # missing, empty
        assert render_ci_table(records) == (
            "No stored CI record in `.ci/records/` yet: "
            "`CI_RECORD=<file> bash .ci/run` writes one.\n"
        )


def test_the_ci_script_writes_a_record_of_the_steps_this_table_reads() -> None:
    # the record's step names are the commands .ci/run passes to `step`
    script = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    called = [
        line.removeprefix("step ").strip()
        for line in script.splitlines()
        if line.startswith("step ")
    ]
    assert called == list(STEPS)
    assert "CI_RECORD" in script


def test_the_record_the_ci_script_writes_is_one_this_table_reads(tmp_path: Path) -> None:
    # .ci/record.py as .ci/run calls it: one line per step with the file holding its output
    outputs = (
        "run: done\n",
        "....\n=== 1246 passed, 5 deselected, 2 warnings in 204.12s (0:03:24) ===\n",
        "ruff: All checks passed!\nSuccess: no issues found in 120 source files\n",
        "2 passed in 1.0s\n..\n26 passed, 2 skipped in 431.50s (0:07:11)\n",
    )
    lines = []
    for k, (command, output) in enumerate(zip(STEPS, outputs, strict=True)):
        log = tmp_path / f"{k}.log"
        log.write_text(output)
        lines.append(f"{command}\t{10 * (k + 1)}\t{log}")
    records = tmp_path / "records"
    records.mkdir()
    env = {
        "CI_RECORD": str(records / "r.json"),
        "CI_STARTED": "2026-12-04T19:00:00Z",
        "CI_LOAD_START": "0.25",
        "CI_TOTAL_S": "123",
        "CI_COMMIT": "fedcba9876543210",
        "CI_CPU_COUNT": "2",
        "CI_RECORD_NOTE": "quiet machine",
        "PATH": os.environ.get("PATH", ""),
    }
    script = Path(__file__).resolve().parents[1] / ".ci" / "record.py"
    subprocess.run(
        [sys.executable, str(script)], input="\n".join(lines) + "\n", text=True, env=env, check=True
    )
    stored = json.loads((records / "r.json").read_text())
    assert [s["tests"] for s in stored["steps"]] == [
        None,
        "1246 passed, 5 deselected, 2 warnings",
        None,
        "26 passed, 2 skipped",
    ]
    row = render_ci_table(records).splitlines()[2]
    assert row.startswith("| 2026-12-04 19:00:00, fedcba9 | ")
    assert row.endswith(
        "| 0.25 | quiet machine | 10 s | 20 s (1246 passed, 5 deselected, 2 warnings) | 30 s "
        "| 40 s (26 passed, 2 skipped) | 2 min 3 s |"
    )
