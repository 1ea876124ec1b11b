"""Data-parallel K-FAC on 2 and 3 gloo ranks (CPU): ranks agree, and agree with one process.

- Every rank holds identical parameters, factors, inverses and coarse statistics after several
  statistics and inverse steps: K-FAC (MC and empirical Fisher, eigen and factored damping, both
  inverse strategies) and two-level K-FAC.
- Empirical Fisher: the distributed run equals a single-process run on the concatenated global
  batch (float64; parameters and factors within rtol 1e3·eps).
- MC Fisher: the ranks draw different samples, so no single-process run draws the same ones;
  instead each statistics step's reduced factors are checked against the single-process factor
  update computed from the concatenated captured statistics (same sampled targets).
- A distributed run saved and resumed midway equals the uninterrupted run (MC Fisher: the
  per-rank sampling streams continue).
- Unsupported use is refused: an unwrapped model, adaptive damping, non-Nicolaides coarse spaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from core.errors import ConfigError
from core.likelihood import Likelihood
from optimizers.coarse import LayerStats, nicolaides_moments
from optimizers.curvature import ema_decay
from optimizers.distributed import InverseStrategy, assign_blocks, mc_seed
from optimizers.kfac import KFAC
from optimizers.twolevel import TwoLevelKFAC
from suite.distributed import (
    Launch,
    Ranks,
    check_batch,
    check_resume_ranks,
    first_slurm_host,
    free_port,
    resolve_ranks,
)
from suite.preflight import compose_with_choices
from suite.store import RunStatus, find_run_folders
from suite.train import RunContext, run
from tests.conftest import REPO
from tests.distributed_harness import (
    D,
    Scenario,
    global_batch,
    make_model,
    make_optimizer,
    protocol_step,
    save,
    shard,
    snapshot,
    spawn,
    wrap,
)

STEPS = 5  # statistics on every step, inverses on steps 0, 2, 4
RTOL = 1e3 * torch.finfo(D).eps
SCENARIOS = [
    Scenario("kfac", "empirical", "eigen"),
    Scenario("kfac", "empirical", "factored"),
    Scenario("kfac", "mc", "eigen"),
    Scenario("kfac", "mc", "factored"),
    Scenario("kfac", "mc", "eigen", InverseStrategy.distributed),
    Scenario("kfac", "empirical", "factored", InverseStrategy.distributed),
    Scenario("kfac2", "empirical", "eigen"),
    Scenario("kfac2", "mc", "factored"),
]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to round-off: rtol 1e3·eps, plus 1e3·eps of the largest entry (cancellation)."""
    assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()))


def _concat_factors(gathered: list[list[tuple[torch.Tensor, torch.Tensor]]], block: int):
    """Â, Ĝ of the concatenated statistics rows of every rank (single-process formulas)."""
    x = torch.cat([per_rank[block][0] for per_rank in gathered]).flatten(0, 1)
    g = torch.cat([per_rank[block][1] for per_rank in gathered])
    n = g.shape[0]
    a = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    g = g.flatten(0, 1)
    return a.T @ a / a.shape[0], g.T @ g / n


def _train_part(rank: int, world: int, out: str) -> None:
    for scenario in SCENARIOS:
        model = wrap(make_model())
        opt = make_optimizer(model, scenario)
        for step in range(STEPS):
            x, y = shard(global_batch(step), rank, world)
            before = [(b.A.clone(), b.G.clone()) for b in opt.blocks]
            coarse_before = (
                [t.clone() if t is not None else None for t in opt.coarse_running_statistics()[0]]
                if isinstance(opt, TwoLevelKFAC)
                else None
            )
            opt.zero_grad(set_to_none=True)
            with opt.capture():
                output = model(x)
            loss = Likelihood.categorical.nll(output, y)
            opt.fisher_backward(output, likelihood=Likelihood.categorical, target=y)
            loss.backward()
            captured = [(b.inputs.clone(), b.g.clone()) for b in opt.blocks]
            grids = [b.grid for b in opt.blocks]
            decay = ema_decay(opt.blocks[0].num_updates, opt.ema_max)
            opt.step()
            # the reduction equals the single-process update on the concatenated statistics
            gathered: list = [None] * world
            dist.all_gather_object(gathered, captured)
            for index, block in enumerate(opt.blocks):
                a_hat, g_hat = _concat_factors(gathered, index)
                a_prev, g_prev = before[index]
                _close(block.A, decay * a_prev + (1 - decay) * a_hat)
                _close(block.G, decay * g_prev + (1 - decay) * g_hat)
            if coarse_before is not None:
                stats = []
                for index, grid in enumerate(grids):
                    x_all = torch.cat([r[index][0] for r in gathered])
                    ones = x_all.new_ones(*x_all.shape[:2], 1)
                    g_all = torch.cat([r[index][1] for r in gathered])
                    stats.append(LayerStats(a=torch.cat([x_all, ones], 2), g=g_all, grid=grid))
                expected = nicolaides_moments(stats)
                now = opt.coarse_running_statistics()[0]
                cdecay = ema_decay(opt.coarse_updates - 1, opt.ema_max)
                for new, prev, exp in zip(now, coarse_before, expected, strict=True):
                    prev = torch.zeros_like(exp) if prev is None else prev
                    _close(new, cdecay * prev + (1 - cdecay) * exp)
        save(Path(out) / f"{scenario.name}-{rank}.pt", snapshot(model.module, opt))
        assert opt.data_parallel is not None and opt.data_parallel.comm.calls >= STEPS


def _single_process(scenario: Scenario) -> dict[str, torch.Tensor]:
    model = make_model()
    opt = make_optimizer(model, scenario)
    for step in range(STEPS):
        protocol_step(model, opt, *global_batch(step))
    return snapshot(model, opt)


def _worker(rank: int, world: int, out: str) -> None:
    """Every part on this rank; a failing part is recorded (its test re-raises it), not fatal."""
    parts = {"train": _train_part, "resume": _resume_part, "refusal": _refusal_part}
    for name, part in parts.items():
        if name != "train" and world != 2:
            continue
        try:
            part(rank, world, out)
        except Exception:  # reported by the part's own test
            (Path(out) / f"failed-{name}-{rank}.txt").write_text(traceback.format_exc())
            dist.barrier()  # keep the ranks in step for the next part
        else:
            dist.barrier()


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def ranks_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One spawn of ``world`` gloo ranks running every part; yields (world, output folder)."""
    world = int(request.param)
    out = tmp_path_factory.mktemp(f"ranks{world}")
    spawn(_worker, world, str(out))
    return world, out


def _part_ok(out: Path, name: str, world: int) -> None:
    for rank in range(world):
        failed = out / f"failed-{name}-{rank}.txt"
        if failed.exists():
            pytest.fail(f"rank {rank}: {failed.read_text()}")


@pytest.mark.slow  # spawns gloo ranks: ~30 s on an idle 2-core machine
def test_ranks_agree_and_match_single_process(ranks_run: tuple[int, Path]) -> None:
    world, out = ranks_run
    _part_ok(out, "train", world)
    for scenario in SCENARIOS:
        ranks = [torch.load(out / f"{scenario.name}-{r}.pt") for r in range(world)]
        for other in ranks[1:]:
            for key, value in ranks[0].items():
                assert torch.equal(value, other[key]), (scenario.name, key)
        if scenario.fisher == "empirical":
            single = _single_process(scenario)
            for key in ("params", "factors", "coarse"):
                if key in single:
                    _close(ranks[0][key], single[key])
    # the distributed inverses give what every rank computes redundantly
    for fisher, mode in (("mc", "eigen"), ("empirical", "factored")):
        base = Scenario("kfac", fisher, mode)
        spread = Scenario("kfac", fisher, mode, InverseStrategy.distributed)
        a = torch.load(out / f"{base.name}-0.pt")
        b = torch.load(out / f"{spread.name}-0.pt")
        _close(a["params"], b["params"])


def _resume_part(rank: int, world: int, out: str) -> None:
    for scenario in (Scenario("kfac", "mc", "eigen"), Scenario("kfac2", "mc", "factored")):
        model = wrap(make_model())
        opt = make_optimizer(model, scenario)
        for step in range(6):
            protocol_step(model, opt, *shard(global_batch(step), rank, world))
        straight = snapshot(model.module, opt)

        model = wrap(make_model())
        opt = make_optimizer(model, scenario)
        for step in range(3):
            protocol_step(model, opt, *shard(global_batch(step), rank, world))
        path = Path(out) / f"ckpt-{scenario.name}.pt"
        if rank == 0:  # the state is held once
            torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, path)
        dist.barrier()
        state = torch.load(path, weights_only=False)
        model = wrap(make_model(seed=99))
        model.module.load_state_dict(state["model"])
        opt = make_optimizer(model, scenario)
        opt.load_state_dict(state["opt"])
        for step in range(3, 6):
            protocol_step(model, opt, *shard(global_batch(step), rank, world))
        resumed = snapshot(model.module, opt)
        for key, value in straight.items():
            assert torch.equal(value, resumed[key]), (scenario.name, key)
    (Path(out) / f"resumed-ok-{rank}").write_text("ok")


def _refusal_part(rank: int, world: int, out: str) -> None:
    plain = make_model()
    with pytest.raises(RuntimeError, match="not wrapped in torch"):
        KFAC(plain)
    with pytest.raises(RuntimeError, match="adaptive_damping"):
        KFAC(wrap(make_model()), adaptive_damping=True)
    with pytest.raises(RuntimeError, match="coarse_space=spectral"):
        TwoLevelKFAC(wrap(make_model()), coarse_space="spectral")
    with pytest.raises(RuntimeError, match="combination=deflated"):
        TwoLevelKFAC(wrap(make_model()), combination="deflated")
    (Path(out) / f"refused-ok-{rank}").write_text("ok")


@pytest.mark.slow  # spawns gloo ranks: ~30 s on an idle 2-core machine
def test_resumed_distributed_run_equals_uninterrupted(ranks_run: tuple[int, Path]) -> None:
    world, out = ranks_run
    if world != 2:
        pytest.skip("resume is exercised on 2 ranks")
    _part_ok(out, "resume", world)
    assert (out / "resumed-ok-0").exists() and (out / "resumed-ok-1").exists()


@pytest.mark.slow  # spawns gloo ranks: ~30 s on an idle 2-core machine
def test_unsupported_use_is_refused(ranks_run: tuple[int, Path]) -> None:
    world, out = ranks_run
    if world != 2:
        pytest.skip("refusals are exercised on 2 ranks")
    _part_ok(out, "refusal", world)
    assert (out / "refused-ok-0").exists()


def test_mc_streams_differ_per_rank_and_step() -> None:
    seeds = {mc_seed(7, rank, step) for rank in range(4) for step in range(50)}
    assert len(seeds) == 200


def test_block_assignment_balances_cost() -> None:
    shapes = [(1000, 785), (500, 1001), (250, 501), (30, 251), (250, 31), (500, 251)]
    owners = assign_blocks(shapes, ranks=2)
    assert set(owners) == {0, 1}
    assert owners[0] != owners[1]  # the two most expensive blocks go to different ranks


# ----------------------------------------------------------------------------- the suite

# Long enough to be still running when rank 1 is killed (after 2 recorded steps).
KILLED_RUN_STEPS = 60
E2E = [
    "logger=none",
    "trainer.progress=false",
    "trainer.batch_size=100",
    "trainer.max_steps=4",
    "trainer.epochs=1",
    "trainer.eval_every_steps=2",
    "trainer.eval_batch_size=1000",
    "trainer.device=cpu",
    "trainer.dtype=float64",
    "data.max_train=400",
    "optimizer.fisher=empirical",  # same targets in both runs (MC draws differ per rank)
    "optimizer.cov_period=1",
    "optimizer.inv_period=2",
    "trainer.keep_checkpoint=true",  # the tests read the final parameters from the checkpoint
]
# Round-off of the reduction (summation order) amplified through the damped inverses (λ 1e-3).
E2E_RTOL = 1e-8


def _launch_env() -> dict[str, str]:
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {
        k: v for k, v in os.environ.items() if k not in launch_vars and not k.startswith("SLURM_")
    }
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    return env


@pytest.mark.slow  # two torchrun processes plus a single-process run: ~1 min on an idle machine
@pytest.mark.parametrize(
    "setup",
    [
        ["model=mnist_ae", "optimizer=kfac"],
        # a CNN on generated images (offline)
        ["model=cifar10_simple_cnn", "model.dataset=synthetic_images", "optimizer=kfac2"],
    ],
    ids=["mnist_ae-kfac", "cnn-kfac2"],
)
def test_torchrun_run_matches_single_process(setup: list[str], tmp_path: Path, run_job) -> None:
    overrides = [*E2E, *setup]
    root = tmp_path / "dist"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "run.py"), *overrides, "trainer.distributed=torchrun",
        f"results.root={root}", f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=_launch_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = find_run_folders(root)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["world_size"] == 2 and summary["ranks_identical_params"] is True
    status, single = run_job(*overrides, root=tmp_path / "single")
    assert status is RunStatus.COMPLETED
    dist_steps = pd.read_parquet(folder / "metrics_steps.parquet")
    single_steps = pd.read_parquet(single / "metrics_steps.parquet")
    assert len(dist_steps) == 4
    assert_close(
        torch.tensor(dist_steps["batch_loss"].to_numpy()),
        torch.tensor(single_steps["batch_loss"].to_numpy()),
        rtol=E2E_RTOL,
        atol=0,
    )
    theirs = torch.load(folder / "checkpoint.pt", weights_only=False)["model"]
    ours = torch.load(single / "checkpoint.pt", weights_only=False)["model"]
    for key, value in ours.items():
        assert_close(theirs[key], value, rtol=E2E_RTOL, atol=E2E_RTOL * float(value.abs().max()))


@pytest.mark.slow  # two processes of run.py; one is killed mid-run, then the run resumed
def test_killed_rank_leaves_the_run_interrupted_and_resumable(tmp_path: Path) -> None:
    """Two tasks started as srun would (SLURM_PROCID/NTASKS, node list); rank 1 is killed.

    The run is recorded as interrupted; resuming it on 1 process is refused; on 2 (torchrun) it
    continues from its checkpoint to completion.
    """
    root = tmp_path / "runs"
    port = free_port()
    base = [
        sys.executable, str(REPO / "run.py"), *E2E, "model=mnist_ae", "optimizer=kfac",
        f"trainer.max_steps={KILLED_RUN_STEPS}", "trainer.epochs=1000", "trainer.distributed=slurm",
        "trainer.checkpoint_every_steps=2", f"results.root={root}",
    ]  # fmt: skip
    procs = []
    for rank in range(2):
        env = _launch_env()
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))  # fmt: skip
        procs.append(subprocess.Popen(
            [*base, f"hydra.run.dir={tmp_path / f'hydra{rank}'}"], cwd=tmp_path, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    deadline = time.monotonic() + 300
    summary: dict = {}
    while time.monotonic() < deadline:  # until rank 0 has recorded a few training steps
        folders = find_run_folders(root) if root.exists() else []
        if folders and (folders[0] / "summary.json").exists():
            summary = json.loads((folders[0] / "summary.json").read_text())
            if summary.get("steps_completed", 0) >= 2:
                break
        try:  # wait on rank 0 a moment: it must not exit before rank 1 is killed
            procs[0].wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"rank 0 exited early: {procs[0].stderr.read()[-3000:]}")  # type: ignore[union-attr]
    procs[1].kill()
    procs[1].wait(timeout=60)
    code = procs[0].wait(timeout=300)
    assert code != 0
    (folder,) = find_run_folders(root)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary.get("error")
    saved = int(torch.load(folder / "checkpoint.pt", weights_only=False)["progress"]["step"])
    # The run folder owns its config: only the folder and settings that leave results alone.
    resume = ["logger=none", "trainer.progress=false", f"trainer.resume={folder}"]
    cfg, choices = compose_with_choices([*resume, f"results.root={root}"])
    with pytest.raises(ConfigError, match=r"trainer\.resume: .* over 2 rank"):
        run(cfg, RunContext(model_preset=choices["model"], optimizer_preset=choices["optimizer"]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "run.py"), *resume, "trainer.distributed=torchrun", f"results.root={root}",
        f"hydra.run.dir={tmp_path / 'hydra_resume'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=_launch_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert saved < KILLED_RUN_STEPS
    assert summary["status"] == "completed" and summary["steps_completed"] == KILLED_RUN_STEPS
    assert summary["ranks_identical_params"] is True


def test_launch_switch_reads_torchrun_and_slurm_and_refuses_a_mismatch() -> None:
    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    slurm = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0"}
    assert resolve_ranks("torchrun", torchrun) == Ranks(1, 4, 1, Launch.torchrun)
    assert resolve_ranks("auto", torchrun) == Ranks(1, 4, 1, Launch.torchrun)
    assert resolve_ranks("slurm", slurm) == Ranks(2, 3, 0, Launch.slurm)
    assert resolve_ranks("auto", slurm) == Ranks(2, 3, 0, Launch.slurm)
    assert resolve_ranks("auto", {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == Ranks()
    with pytest.raises(ConfigError, match=r"trainer\.distributed: got none but this process"):
        resolve_ranks("none", torchrun)
    with pytest.raises(ConfigError, match=r"trainer\.distributed: got slurm but SLURM_PROCID"):
        resolve_ranks("slurm", {})
    with pytest.raises(ConfigError, match=r"trainer\.batch_size: got 10 .*multiple of the 4"):
        check_batch(Ranks(0, 4), 10)
    with pytest.raises(ConfigError, match=r"trainer\.resume: .* over 2 rank"):
        check_resume_ranks({"world_size": 2}, Ranks(0, 3))
    assert first_slurm_host("node[03-05,07],gpu1") == "node03"
    assert first_slurm_host("gpu1,node[03-05]") == "gpu1"
