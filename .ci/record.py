"""Writes the record of a passed `.ci/run` (CI_RECORD=<file>): the source of the README's
test-time table (analyze/ci_table.py). Standard library only; called by .ci/run as

    printf 'command<TAB>seconds<TAB>log file\\n' ... | python .ci/record.py

with CI_RECORD, CI_STARTED (ISO UTC), CI_LOAD_START, CI_TOTAL_S, CI_COMMIT, CI_CPU_COUNT and
optionally CI_RECORD_NOTE in the environment.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path

# pytest's summary line, e.g. "1246 passed, 5 deselected in 204.12s (0:03:24)"
SUMMARY = re.compile(r"(\d+ passed(?:, \d+ \w+)*) in [\d.]+s")


def pytest_summary(log: str) -> str | None:
    """The counts of the last pytest summary line in a step's output, or None (not pytest)."""
    found = SUMMARY.findall(log)
    return found[-1] if found else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    env = os.environ
    steps = []
    for line in sys.stdin.read().splitlines():
        command, seconds, log = line.split("\t")
        text = Path(log).read_text(errors="replace")
        steps.append({"command": command, "seconds": int(seconds), "tests": pytest_summary(text)})
    load = env.get("CI_LOAD_START", "")
    record = {
        "schema": 1,
        "started_utc": env["CI_STARTED"],
        "commit": env["CI_COMMIT"],
        "cpu": cpu_name(),
        "cpu_count": int(env["CI_CPU_COUNT"]),
        "load_start": float(load) if load else None,
        "note": env.get("CI_RECORD_NOTE", ""),
        "steps": steps,
        "total_seconds": int(env["CI_TOTAL_S"]),
        "result": "passed",
    }
    Path(env["CI_RECORD"]).write_text(json.dumps(record, indent=2) + "\n")
    print(f"ci: record written to {env['CI_RECORD']}")


if __name__ == "__main__":
    main()
