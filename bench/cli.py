"""Command line of the harness: ``python -m bench --out bench/out [--quick] [...]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from bench.floors import Periods
from bench.problems import ProblemName
from bench.report import write
from bench.runner import benchmark
from bench.settings import BenchSettings, quick_settings
from bench.ttt import TTTSettings, run_time_to_target, write_ttt


def _periods(text: str) -> list[Periods]:
    out = []
    for part in text.split(","):
        try:
            cov, inv = (int(v) for v in part.strip().split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--periods: got {part!r}; allowed: T_cov/T_inv pairs such as 10/100,1/5"
            ) from None
        try:
            out.append(Periods(cov=cov, inv=inv))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return out


def _problems(text: str) -> list[ProblemName]:
    allowed = ", ".join(p.value for p in ProblemName)
    out = []
    for part in text.split(","):
        try:
            out.append(ProblemName(part.strip()))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--problems: got {part!r}; allowed: {allowed}"
            ) from None
    return out


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: an integer >= 1")
    return value


def parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Step cost of SGD, Adam, K-FAC and two-level K-FAC, against their floors.",
    )
    p.add_argument("--out", type=Path, default=Path("bench/out"), help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke run: small batches, 2 repeats")
    p.add_argument("--problems", type=_problems, help="comma list (default mnist_ae,cifar10_3c3d)")
    p.add_argument("--periods", type=_periods, help="T_cov/T_inv pairs (default 10/100,1/5)")
    p.add_argument("--methods", help="comma list of method labels to keep (sgd always kept)")
    p.add_argument("--batch", type=_positive, help="one batch size for every problem")
    p.add_argument("--threads", type=_positive, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    p.add_argument("--repeats", type=_positive, help="timed repeats per group (default 3)")
    p.add_argument("--min-steps", type=_positive, help="steps per repeat at least (default 20)")
    p.add_argument("--warmup", type=_positive, help="untimed steps per method (default 3)")
    p.add_argument("--stage-steps", type=_positive, help="instrumented steps (default 24)")
    p.add_argument(
        "--flush-denormal",
        choices=("on", "off"),
        help="force torch.set_flush_denormal (default: as suite.seeding.seed_everything sets it)",
    )
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--time-to-target",
        action="store_true",
        help="instead: wall-clock and steps to a train loss on mnist_ae via suite.train",
    )
    return p


def settings_from(args: argparse.Namespace) -> BenchSettings:
    """BenchSettings from parsed arguments."""
    settings = quick_settings() if args.quick else BenchSettings()
    if args.problems:
        settings.problems = args.problems
    if args.periods:
        settings.periods = args.periods
    if args.methods:
        settings.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.batch:
        settings.batches = {p.value: args.batch for p in settings.problems}
    settings.threads = args.threads
    settings.device = args.device
    for name in ("repeats", "min_steps", "warmup", "stage_steps"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if args.flush_denormal is not None:
        settings.flush_denormal = args.flush_denormal == "on"
    settings.stages = not args.no_stages
    settings.memory = not args.no_memory
    return settings


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or the time-to-target mode) and write JSON and Markdown."""
    args = parser().parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device: got cuda; no CUDA device is available here", file=sys.stderr)
        return 2
    if args.time_to_target:
        ttt = TTTSettings(threads=args.threads, quick=args.quick)
        result = run_time_to_target(ttt, root=args.out / "ttt_runs")
        paths = write_ttt(result, args.out)
    else:
        result = benchmark(settings_from(args))
        paths = write(result, args.out)
    for path in paths:
        print(path)
    return 0
