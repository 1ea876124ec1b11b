"""`make report`: the study's generated report and README section (analyze/reproduction.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from analyze.reproduction import (
    BEGIN,
    END,
    generated_files,
    render_report,
    render_summary,
    replace_section,
)
from analyze.study import ARM_ORDER, COMPARISONS, KOROKO_SPACES, load_study

REPO = Path(__file__).resolve().parent.parent
SOURCE = "tselepidis_deep_linear_small"  # a study at its source's settings (analyze.study)
BASELINE = 200.0
EPOCHS = 3
STEPS_PER_EPOCH = 4


def write_run(
    root: Path,
    *,
    arm: str,
    optimizer: str,
    seed: int,
    final: float,
    stage: str = "final",
    status: str = "completed",
    val: float | None = None,
    lr: float = 0.1,
    config: dict[str, Any] | None = None,
    study: str = "toy_study",
    grid: list[float] | None = None,
) -> None:
    """A run folder as the trainer writes it, the last epoch's mini-batch losses all ``final``.

    With ``config`` the run is a plain preset run (no tuning node, experiment ``arm``'s study
    name ``SOURCE``), as the runs of a source-settings study are.
    """
    run_id = f"{arm}_{stage}_s{seed}_lr{lr}"
    run_id = run_id if study == "toy_study" else f"{study}_{run_id}"
    path = root / run_id
    path.mkdir(parents=True)
    steps = np.arange(1, EPOCHS * STEPS_PER_EPOCH + 1)
    epoch_of = (steps - 1) // STEPS_PER_EPOCH
    losses = np.where(epoch_of == EPOCHS - 1, final, BASELINE * (1.0 - 0.02 * (epoch_of + 1)))
    pd.DataFrame(
        {
            "step": steps,
            "epoch": steps / STEPS_PER_EPOCH,
            "batch_loss": losses,
            "wall_time_s": steps * 0.5,
        }
    ).to_parquet(path / "metrics_steps.parquet")
    eval_steps = np.arange(0, EPOCHS + 1) * STEPS_PER_EPOCH
    pd.DataFrame(
        {
            "step": eval_steps,
            "epoch": eval_steps / STEPS_PER_EPOCH,
            "wall_time_s": eval_steps * 0.5,
            "train_loss": final,
            "test_loss": final + 1.0,
        }
    ).to_parquet(path / "metrics_evals.parquet")
    grids = {optimizer: {"lr": grid or [0.1, 0.3]}}
    summary = {
        "run_id": run_id,
        "seed": seed,
        "status": status,
        "model": "mnist_ae",
        "optimizer": optimizer,
        "data_variant": "mnist-5k",
        "sweep_id": f"{arm}-{stage}",
        "hyperparameters": {"lr": lr},
        "code_version": "abcdef0123",
        "final_train_loss": final,
        "final_train_loss_per_output": final / 784,
        "final_val_loss": final if val is None else val,
        "final_test_loss": final + 1.0,
        "wall_clock_s": 6.0,
        "baseline_train_loss": BASELINE,
        "baseline_predictor": "mean image (bernoulli)",
        "tuning": {"study": study, "arm": arm, "stage": stage, "grid": grids, "budget": 2},
    }
    if config is not None:
        summary.update(tuning=None, experiment=SOURCE, run_id=f"{run_id}_{config['tag']}")
        config = {k: v for k, v in config.items() if k != "tag"}
        path = path.rename(path.with_name(summary["run_id"]))
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "config.yaml").write_text(yaml.safe_dump(config or {"model": {"name": "mnist_ae"}}))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    offsets = [0.3, -0.2, 0.5, 0.1, -0.1, 0.4, 0.2, 0.0]
    for seed in range(1, 9):
        kfac = 100.0 + offsets[seed - 1]
        write_run(root, arm="kfac", optimizer="kfac", seed=seed, final=kfac, lr=0.3)  # the winner
        write_run(root, arm="kfac2", optimizer="kfac2", seed=seed, final=kfac - 0.01 * (seed % 3))
        write_run(root, arm="adam", optimizer="adam", seed=seed, final=150.0 + offsets[seed - 1])
    # SGD seed 8 does not learn: 199 is not 5 % below the baseline 200
    for seed in range(1, 9):
        write_run(root, arm="sgd", optimizer="sgd", seed=seed, final=199.0 if seed == 8 else 180.0)
    for lr, val in ((0.1, 101.0), (0.3, 99.0)):
        write_run(
            root, arm="kfac", optimizer="kfac", seed=0, final=val, stage="tune", lr=lr, val=val
        )
    write_run(root, arm="kfac", optimizer="kfac", seed=0, final=98.0, stage="extension", lr=0.9)
    return root


def test_verdicts_from_a_hand_made_store(store: Path) -> None:
    runs = load_study([store])
    report = render_report(runs)
    # K-FAC beats Adam and SGD on all 8 (7) pairs: exact p 2/256 (2/128), Holm over 3 rows
    assert "| toy_study | K-FAC vs Adam | 8/8, 8/8 | 8 |" in report
    # the SGD run that did not learn is out of the pairs
    assert "| toy_study | K-FAC vs SGD | 8/8, 7/8 | 7 |" in report
    lines = {
        line.split("|")[2].strip(): line for line in report.splitlines() if "toy_study |" in line
    }
    assert lines["K-FAC vs Adam"].rstrip().endswith("**better** |")
    assert "0.0234" in lines["K-FAC vs Adam"]  # Holm: 3 × 2/256
    assert lines["K-FAC vs SGD"].rstrip().endswith("**better** |")
    # two-level within 0.02 of K-FAC on every seed: equivalent within ±1 % of K-FAC's mean
    assert "equivalent within ±1.002" in lines["two-level (paper) vs K-FAC"]
    assert "did not learn: final running loss 199" in report
    assert (
        "- toy_study, SGD: 1 of 8 final runs did not learn (final running train loss 199 (n 1) "
        "against the trivial baseline 200); their seeds are out of its pairs." in report
    )
    assert "- toy_study, K-FAC vs Adam: **better** (8 pairs, A − B = -50" in report
    assert "| K-FAC | lr {0.1, 0.3} | 2 | 2 | lr 0.3 | 99 | lr |" in report  # winner on the edge
    # a trial beyond the edge is reported beside the winner, not counted in the budget
    assert "- K-FAC: lr 0.9 → final val loss 98 (the selected winner: 99)" in report


def test_pilot_runs_are_listed_apart_and_change_no_claim(store: Path) -> None:
    """Pilots (another variant over an arm's grid, seed 0): one row each with its best trial by
    the selection rule; a failed pilot is counted but cannot be best; the tuning table, the
    verdicts and the answer are those of the store without them."""
    before = render_report(load_study([store]))
    trials = ((0.1, 97.5, "completed"), (0.3, 50.0, "failed"), (0.9, 98.5, "completed"))
    for lr, val, status in trials:
        write_run(store, arm="kfac2_spectral", optimizer="kfac2_spectral", seed=0, final=val,
                  stage="pilot", lr=lr, val=val, status=status, grid=[0.1, 0.3, 0.9])  # fmt: skip
    report = render_report(load_study([store]))
    toy = report.split("## toy_study")[1]
    spectral = "two-level K-FAC (Koroko: spectral, exact coarse Fisher)"
    row = f"| {spectral} | 3 | 2 | 2 | lr 0.1 | 97.5 | lr |"  # best on the grid's lower edge
    assert row in toy
    assert "Pilot runs (a source's variants outside the campaign's arms" in toy
    assert "an arm chosen by a pilot spent these trials beside its own budget" in toy
    assert "Pilot runs" not in before
    assert "(3 tuning trials, 3 pilot runs, 32 final runs" in toy

    def claims(text: str) -> list[str]:
        return [line for line in text.splitlines() if "**" in line or "| K-FAC | lr" in line]

    assert claims(report) == claims(before)
    # counted in the compute the study spent, with the tuning-stage runs
    compute = render_summary(load_study([store]))
    assert "| two-level K-FAC (Koroko: spectral, exact coarse Fisher) | 3 | 0 |" in compute


def test_the_answer_groups_each_question_by_verdict(store: Path) -> None:
    """The report's first section: per question, where the arm is better, equivalent, worse,
    or cannot be told apart, each benchmark under exactly one of them."""
    report = render_report(load_study([store]))
    answer = report.split("## The answer, benchmark by benchmark")[1].split("## Verdicts")[0]
    coarse, first_order = answer.split("- **Does K-FAC beat tuned first-order methods?")
    # K-FAC won on its grid's edge (lr 0.3) and its check at lr 0.9 did better (val 98 < 99):
    # the equivalence may come from an under-tuned K-FAC, so it carries the caveat; K-FAC's own
    # wins over Adam and SGD do not (an under-tuned winner only makes them conservative)
    caveat = (
        " [caveat: K-FAC won on its grid's edge and a check beyond the edge did better, so it may"
        " be under-tuned]"
    )
    assert f"  - equivalent within ±1 %: toy_study (two-level (paper) vs K-FAC){caveat}." in coarse
    assert "  - helps (lower loss than K-FAC): nowhere." in coarse
    assert "  - hurts (higher loss than K-FAC): nowhere." in coarse
    assert "  - K-FAC better: toy_study (K-FAC vs Adam); toy_study (K-FAC vs SGD)." in first_order
    assert "cannot tell" not in answer  # every comparison of the store has a verdict
    assert "Does the authors' accumulating coarse matrix matter?" not in answer  # no such arm
    assert render_summary(load_study([store])).count("toy_study (K-FAC vs Adam)") == 1


def test_tuning_tables_keep_each_study_to_its_own_trials(store: Path) -> None:
    """Two studies with the same arm names: each tuning table and each "no run learned" line
    counts only its own study's trials and grid-edge checks."""
    for lr, val in ((0.1, 50.0), (0.3, 60.0), (0.9, 70.0)):
        write_run(store, arm="kfac", optimizer="kfac", seed=0, final=val, stage="tune", lr=lr,
                  val=val, study="other_study")  # fmt: skip
    write_run(store, arm="kfac", optimizer="kfac", seed=0, final=40.0, stage="extension",
              lr=0.03, study="other_study")  # fmt: skip
    for seed in (1, 2):
        write_run(store, arm="kfac", optimizer="kfac", seed=seed, final=45.0, study="other_study")
    report = render_report(load_study([store]))
    toy = report.split("## toy_study")[1].split("\n## ")[0]
    other = report.split("## other_study")[1].split("\n## ")[0]
    assert "| K-FAC | lr {0.1, 0.3} | 2 | 2 | lr 0.3 | 99 | lr |" in toy
    assert "lr 0.03 → final val loss 40" not in toy
    assert "| K-FAC | lr {0.1, 0.3} | 3 | 3 | lr 0.1 | 50 | lr |" in other
    assert "- K-FAC: lr 0.03 → final val loss 40 (the selected winner: 50)" in other
    assert "lr 0.9 → final val loss 98" not in other


def test_a_second_tuning_round_supersedes_the_first_winners_finals(store: Path) -> None:
    """K-FAC's round 2 (lr 0.9, 2.7) finds a better setting than round 1's edge winner: the
    tuning table spans both rounds, the new winner's reruns enter the claims, the old winner's
    are listed as superseded, and the grid-edge check now inside the grid raises no caveat."""
    round2 = [0.9, 2.7]
    for lr, val in ((0.9, 97.0), (2.7, 120.0)):
        write_run(store, arm="kfac", optimizer="kfac", seed=0, final=val, stage="tune", lr=lr,
                  val=val, grid=round2)  # fmt: skip
    for seed in range(1, 9):  # the new winner ends 60 below its old reruns on every seed
        write_run(store, arm="kfac", optimizer="kfac", seed=seed, final=40.0 + seed, lr=0.9,
                  grid=round2)  # fmt: skip
    runs = load_study([store])
    report = render_report(runs)
    toy = report.split("## toy_study")[1].split("\n## ")[0]
    assert "| K-FAC | lr {0.1, 0.3, 0.9, 2.7} | 4 | 4 | lr 0.9 | 97 | no |" in toy
    assert "- K-FAC: lr 0.9 → final val loss 98 (the selected winner: 97); inside the grid" in toy
    assert "- K-FAC: 8 runs at lr 0.3 (final running train loss 100.2 ± 0.24 (n 8))" in toy
    assert "16 final runs" not in toy and "8 of them of a superseded winner" in toy
    runs_behind = toy.split("### Runs behind it")[1].split("###")[0]
    kfac_ids = next(line for line in runs_behind.splitlines() if line.startswith("- K-FAC:"))
    assert kfac_ids.count("lr0.9") == 8 and "lr0.3" not in kfac_ids
    lines = {
        line.split("|")[2].strip(): line for line in report.splitlines() if "toy_study |" in line
    }
    # the two-level arm (≈ 100) is now far above K-FAC (≈ 44.5): hurts, no longer equivalent
    assert lines["two-level (paper) vs K-FAC"].rstrip().endswith("**worse** |")
    assert "[caveat" not in report


def test_final_runs_on_different_cpus_are_flagged(store: Path) -> None:
    """Wall-clock compares only within one CPU: the final-runs table says which arm ran where."""
    assert "Hardware:" not in render_report(load_study([store]))  # one (unknown) CPU
    for folder in store.iterdir():
        if folder.name.startswith("kfac_final"):
            cpu = "CPU B" if folder.name.startswith("kfac_final_s1_") else "CPU A"
            (folder / "environment.json").write_text(json.dumps({"cpu": cpu}))
    report = render_report(load_study([store]))
    assert "Hardware: these final runs ran on more than one CPU (" in report
    assert "K-FAC: CPU A (7), CPU B (1); two-level K-FAC (paper, rebuild): unknown (8)" in report


def test_summary_section_round_trip(store: Path, tmp_path: Path) -> None:
    runs = load_study([store])
    section = render_summary(runs)
    text = f"intro\n{BEGIN}\nold numbers\n{END}\noutro\n"
    replaced = replace_section(text, section, where="x")
    assert replaced.startswith(f"intro\n{BEGIN}\n{section}")
    assert replaced.endswith(f"{END}\noutro\n")
    assert "old numbers" not in replaced
    assert replace_section(replaced, section, where="x") == replaced  # idempotent
    with pytest.raises(ValueError, match="markers"):
        replace_section("no markers here", section, where="README.md")


def test_committed_readme_and_reports_match_the_stored_results() -> None:
    """The README's generated section, docs/study.md and docs/report.md are current."""
    files = generated_files([REPO / "results" / "reference"], REPO)
    stale = [str(p.relative_to(REPO)) for p, text in files.items() if p.read_text() != text]
    assert not stale, f"stale generated files (run `make report`): {stale}"


def source_config(tag: str, optimizer: str, **changes: Any) -> dict[str, Any]:
    """A preset run's config: ``changes`` as dotted keys (``trainer.epochs``); None drops one."""
    config: dict[str, Any] = {
        "tag": tag,
        "model": {"name": "deep_linear", "depth": 64},
        "optimizer": {"name": "kfac", "lr": 0.01, "damping": 0.001},
        "trainer": {"epochs": 13, "seed": 0, "progress": False, "grad_accumulation": 1},
        "logger": {"backend": "none"},
        "results": {"root": "results/reference"},
    }
    if optimizer != "kfac":
        refresh, downsample = (
            ("rebuild", "centre") if optimizer == "kfac2" else ("accumulate", "nearest")
        )
        config["optimizer"].update(
            name="kfac2", coarse_refresh=refresh, coarse_downsample=downsample
        )
    for key, value in changes.items():
        section, name = key.split(".")
        if value is None:
            del config[section][name]
        else:
            config[section][name] = value
    return config


def test_source_settings_study_groups_preset_runs_into_arms(tmp_path: Path) -> None:
    root = tmp_path / "results"
    offsets = [0.3, -0.2, 0.5, 0.1, -0.1, 0.4, 0.2, 0.0]
    for seed in range(8):
        kfac = 100.0 + offsets[seed]
        for arm, final in (("kfac", kfac), ("kfac2", kfac - 5.0), ("kfac2_authors", 199.5)):
            changes: dict[str, Any] = {"trainer.seed": seed, "trainer.progress": seed == 3}
            if seed < 2:  # recorded before grad_accumulation existed: compared where recorded
                changes["trainer.grad_accumulation"] = None
            write_run(
                root,
                arm=arm,
                optimizer=arm,
                seed=seed,
                final=final,
                config=source_config("ok", arm, **changes),
            )
    odd: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
        ("kfac", "kfac", "epochs", {"trainer.epochs": 20}),  # not the study's settings
        ("kfac2", "kfac2", "damping", {"optimizer.damping": 0.1}),  # not the arm's settings
        ("sgd", "kfac", "sgd", {"optimizer.name": "sgd"}),  # outside the arms: not joined
    )
    for arm, preset, tag, changes in odd:
        config = source_config(tag, preset, **changes)
        write_run(root, arm=arm, optimizer=arm, seed=8, final=90.0, config=config)
    runs = load_study([root])
    arms = {(r.arm, r.seed, r.usable) for r in runs}
    assert {r.study for r in runs} == {SOURCE} and {r.stage for r in runs} == {"final"}
    assert {a for a, _, _ in arms} == {"kfac", "kfac2", "kfac2_authors"}
    assert ("kfac", 8, False) in arms and ("kfac2", 8, False) in arms
    usable = [r for r in runs if r.usable]
    assert {(r.arm, r.seed) for r in usable} == {
        (arm, seed) for arm in ("kfac", "kfac2") for seed in range(8)
    }
    reasons = {r.run_id: r.exclusion_reason() for r in runs if not r.usable}
    assert "trainer.epochs 20 (others 13)" in reasons["kfac_final_s8_lr0.1_epochs"]
    assert "optimizer.damping 0.1 (others 0.001)" in reasons["kfac2_final_s8_lr0.1_damping"]
    assert all("did not learn" in v for k, v in reasons.items() if "authors" in k)
    report = render_report(runs)
    assert "No tuning: a comparison at the source's own settings" in report
    lines = {
        line.split("|")[2].strip(): line for line in report.splitlines() if f"{SOURCE} |" in line
    }
    # two-level 5 below K-FAC on all 8 seeds: exact p 2/256 = 0.0078, Holm over 1 testable row
    assert lines["two-level (paper) vs K-FAC"].rstrip().endswith("**better** |")
    assert "| 8/9, 8/9 | 8 |" in lines["two-level (paper) vs K-FAC"]
    assert "| 0/8, 8/9 | 0 |" in lines["two-level authors' code (accumulate) vs rebuild"]
    assert "| 0/8, 8/9 | 0 |" in lines["two-level authors' code (accumulate) vs K-FAC"]
    assert (
        "0 of 8 learned; final running train loss 199.5 ± 0 (n 8) against the trivial "
        "baseline 200" in report
    )


def test_a_source_study_tells_koroko_spaces_apart_and_reports_its_pilot(tmp_path: Path) -> None:
    study = "koroko_fmnist_deep_linear_small"  # a source-settings study with SIX_ARMS
    root = tmp_path / "results"
    spaces = {"kfac2_exact": "nicolaides", "kfac2_krylov": "krylov_nicolaides"}
    offsets = [0.3, -0.2, 0.5, 0.1, -0.1, 0.4, 0.2, 0.0]
    for seed in range(8):
        kfac = 100.0 + offsets[seed]
        for arm, final in (("kfac", kfac), ("kfac2_exact", kfac), ("kfac2_krylov", kfac - 5.0)):
            config = source_config("ok", "kfac", **{"trainer.seed": seed})
            if arm != "kfac":
                config["optimizer"].update(
                    name="kfac2", coarse_fisher="exact", coarse_space=spaces[arm]
                )
            write_run(root, arm=arm, optimizer=arm, seed=seed, final=final, config=config)
    for folder in root.iterdir():  # these ran the Koroko preset
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps({**summary, "experiment": study}))
    # the pilot: each space once on seed 0 with a validation split (settings differ from the
    # finals' on purpose: it is not one of the study's final runs)
    for arm, val in (("kfac2_exact", 1.5), ("kfac2_krylov", 1.25)):
        write_run(
            root, arm=arm, optimizer=arm, seed=0, final=val, val=val, stage="pilot", study=study
        )
    for folder in root.glob(f"{study}_*_pilot_*"):  # trained on 90 %: its own baseline
        summary = json.loads((folder / "summary.json").read_text())
        summary["baseline_train_loss"] = BASELINE - 1.0
        (folder / "summary.json").write_text(json.dumps(summary))
    runs = load_study([root])
    finals = [r for r in runs if r.stage == "final"]
    assert {r.study for r in runs} == {study}
    assert {(r.arm, r.usable) for r in finals} == {
        (arm, True) for arm in ("kfac", "kfac2_exact", "kfac2_krylov")
    }
    assert all(not r.settings_mismatch for r in runs)
    report = render_report(runs)
    section = report.split(f"## {study}")[1]
    assert "Trivial baseline (mean image (bernoulli), train split): 200. A run" in section
    assert "Pilot runs" in section
    assert "| two-level K-FAC (Koroko: Krylov from all-ones, exact coarse Fisher) | 1 | 1 |" in (
        section
    )
    rows = {
        line.split("|")[2].strip(): line for line in section.splitlines() if f"{study} |" in line
    }
    # 5 below K-FAC on all 8 seeds; the Nicolaides arm ties K-FAC on every seed
    assert rows["two-level (Koroko Krylov) vs K-FAC"].rstrip().endswith("**better** |")
    assert "| 8/8, 8/8 | 8 |" in rows["two-level (Koroko exact) vs K-FAC"]


@pytest.mark.parametrize("arm", [arm for arm, _ in KOROKO_SPACES])
def test_every_koroko_space_that_a_pilot_can_choose_is_compared_with_kfac(arm: str) -> None:
    assert arm in ARM_ORDER
    assert any(c.a == arm and c.b == "kfac" for c in COMPARISONS)
