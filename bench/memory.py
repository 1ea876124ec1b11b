"""Peak memory of one method's training steps, each in a fresh subprocess.

The child (`python -m bench.memory '<json>'`) imports torch, runs a tiny step on a 3×3 layer and
two 3×3 factorisations (lazily loaded kernels and thread pools add about 160 MB on the CPU; they
belong to the runtime, not to the method), builds the problem and one model, records its peak
resident set (VmHWM; `ru_maxrss` where there is no /proc; on CUDA
`torch.cuda.max_memory_allocated`) as the baseline, then builds the optimizer and runs a few
steps (the first step of a K-FAC-family method computes statistics, inverses and the
preconditioned update, so every buffer exists by then) and records the peak again. It prints
one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bench.methods import Method
from bench.problems import ProblemName, build_problem
from bench.timing import Contender
from suite.seeding import seed_everything

REPO = Path(__file__).resolve().parent.parent
KIB = 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM (Linux), else ru_maxrss.

    ru_maxrss survives execve on Linux, so a child started by a big parent would report the
    parent's peak; VmHWM belongs to the child's own address space.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * KIB


def _warm_runtime(device: Any) -> None:
    """A tiny step and factorisations, so lazily loaded kernels and pools count as baseline."""
    layer = torch.nn.Linear(3, 3).to(device)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(4, 3, device=device)).sum().backward()
    optimizer.step()
    eye = torch.eye(3, device=device)
    torch.linalg.eigh(eye)
    torch.cholesky_inverse(torch.linalg.cholesky(eye))


def child(request: dict[str, Any]) -> dict[str, Any]:
    """Measure in this process (the subprocess side)."""
    if request.get("flush_denormal") is not None:  # before the thread pool starts
        torch.set_flush_denormal(bool(request["flush_denormal"]))
    torch.set_num_threads(int(request["threads"]))
    seed_everything(0)
    device = torch.device(request["device"])
    problem = build_problem(
        ProblemName(request["problem"]), batch=int(request["batch"]), device=device
    )
    method = Method.from_json(request["method"])
    cuda = device.type == "cuda"
    _warm_runtime(device)
    model = problem.new_model()  # alive while the baseline is taken: one model counts in it
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
    del model
    contender = Contender(method=method, problem=problem)
    for _ in range(int(request["steps"])):
        contender.step()
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
    return {
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "increment_bytes": peak - baseline,
        "measure": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)",
        "steps": int(request["steps"]),
    }


def measure(
    *,
    problem: str,
    batch: int,
    method_json: str,
    steps: int,
    threads: int,
    device: str,
    flush_denormal: bool | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run the child in a fresh interpreter and return its measurement."""
    request = {
        "problem": problem,
        "batch": batch,
        "method": method_json,
        "steps": steps,
        "threads": threads,
        "device": device,
        "flush_denormal": flush_denormal,
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", json.dumps(request)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory subprocess failed for {problem}: {last}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str]) -> int:
    """Entry point of the child."""
    if len(argv) != 1:
        print("usage: python -m bench.memory '<json request>'", file=sys.stderr)
        return 2
    print(json.dumps(child(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
