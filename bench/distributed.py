"""Data-parallel K-FAC step cost: ``python -m bench.distributed --ranks 2,4 --out bench/out``.

Spawns W gloo processes on this machine (CPU), each running K-FAC on its B/W rows of a global
batch of mnist_ae-sized layers (784-1000-500-250-30 and back, the conf/model/mnist_ae preset)
wrapped in DistributedDataParallel, and reports per W: the mean step time, K-FAC's own
communication (the statistics all-reduce and, with distributed inverses, the broadcasts): its
time share of the step and its bytes per step, and the gradient all-reduce volume of DDP (which
overlaps the backward pass and is not timed separately). W = 1 is the single-process run. The
load average of the machine is recorded with the numbers: on a shared machine the ranks compete
for cores, so the times are an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.problems import SPECS, ProblemName, build_problem_model
from optimizers.distributed import InverseStrategy
from optimizers.kfac import KFAC
from suite.distributed import free_port
from suite.environment import code_version


def _measure(rank: int, world: int, settings: dict[str, Any], out: str) -> None:
    torch.set_num_threads(1)
    spec = SPECS[ProblemName.MNIST_AE]
    torch.manual_seed(0)
    model: torch.nn.Module = build_problem_model(spec)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = KFAC(model, cov_period=settings["cov_period"], inv_period=settings["inv_period"])
    if opt.data_parallel is not None:
        opt.data_parallel.inverses = InverseStrategy(settings["inverses"])
    rows = settings["batch"] // world
    gen = torch.Generator().manual_seed(rank)
    x = torch.rand(rows, *spec.input_shape, generator=gen)
    target = x.reshape(rows, -1)
    times = []
    for step in range(settings["warmup"] + settings["steps"]):
        if step == settings["warmup"] and opt.data_parallel is not None:
            opt.data_parallel.comm.__init__()  # type: ignore[misc]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with opt.capture():
            output = model(x)
        loss = spec.likelihood.nll(output, target)
        opt.fisher_backward(output, likelihood=spec.likelihood, target=target)
        loss.backward()
        opt.step()
        if step >= settings["warmup"]:
            times.append(time.perf_counter() - start)
    comm = opt.data_parallel.comm if opt.data_parallel is not None else None
    n = settings["steps"]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "rank": rank,
        "step_s": sum(times) / n,
        "kfac_comm_s": (comm.seconds / n) if comm else 0.0,
        "kfac_comm_bytes": (comm.bytes / n) if comm else 0.0,
        "ddp_grad_bytes": float(params) if world > 1 else 0.0,
    }
    Path(out, f"rank{world}-{rank}.json").write_text(json.dumps(result))


def _entry(rank: int, world: int, port: int, settings: dict[str, Any], out: str) -> None:
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    try:
        _measure(rank, world, settings, out)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(ranks: list[int], settings: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Measure each world size; returns one row per world size (means over its ranks)."""
    rows = []
    for world in ranks:
        context = mp.start_processes(
            _entry,
            args=(world, free_port(), settings, str(out)),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        while not context.join(timeout=30):
            pass
        per_rank = [
            json.loads(Path(out, f"rank{world}-{r}.json").read_text()) for r in range(world)
        ]
        step = max(r["step_s"] for r in per_rank)
        comm = sum(r["kfac_comm_s"] for r in per_rank) / world
        rows.append(
            {
                "ranks": world,
                "step_s": step,
                "kfac_comm_s": comm,
                "kfac_comm_share": comm / step if step > 0 else 0.0,
                "kfac_comm_MB_per_step": per_rank[0]["kfac_comm_bytes"] / 1e6,
                "ddp_grad_MB_per_step": per_rank[0]["ddp_grad_bytes"] / 1e6,
            }
        )
        for r in range(world):
            Path(out, f"rank{world}-{r}.json").unlink()
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line: measure, print a Markdown table, write JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__)
    p.add_argument("--ranks", default="1,2", help="world sizes, e.g. 1,2,4")
    p.add_argument("--batch", type=int, default=1000, help="global batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--cov-period", type=int, default=1)
    p.add_argument("--inv-period", type=int, default=5)
    p.add_argument("--inverses", choices=[s.value for s in InverseStrategy], default="redundant")
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    args = p.parse_args(argv)
    ranks = [int(v) for v in args.ranks.split(",")]
    settings = {
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "cov_period": args.cov_period,
        "inv_period": args.inv_period,
        "inverses": args.inverses,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rows = run(ranks, settings, args.out)
    record = {
        "settings": settings,
        "model": "mnist_ae (784-1000-500-250-30-250-500-1000-784), float32, CPU, gloo",
        "threads_per_rank": 1,
        "cpu_count": os.cpu_count(),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "code_version": code_version()["commit"],
        "rows": rows,
    }
    path = args.out / f"distributed_{args.inverses}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"data-parallel K-FAC, mnist_ae, global batch {args.batch}, T_cov {args.cov_period}, "
        f"T_inv {args.inv_period}, inverses {args.inverses}; load {load_before:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    print("| ranks | step (s) | K-FAC comm (s) | comm share | K-FAC MB/step | DDP grad MB/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['step_s']:.3f} | {r['kfac_comm_s']:.4f} | "
            f"{100 * r['kfac_comm_share']:.1f} % | {r['kfac_comm_MB_per_step']:.2f} | "
            f"{r['ddp_grad_MB_per_step']:.2f} |"
        )
    print(f"written: {path}")


if __name__ == "__main__":
    main()
