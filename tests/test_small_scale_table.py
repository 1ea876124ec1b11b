"""The README's generated small-scale table (analyze/small_scale.py)."""

from __future__ import annotations

import json
from pathlib import Path

from analyze.small_scale import render_small_scale


def summary(root: Path, name: str, **fields: object) -> None:
    base = {
        "experiment": "koroko_mnist_ae_small",
        "status": "completed",
        "seed": 0,
        "data_variant": "mnist-5k",
        "batch_size": 512,
        "epochs_completed": 15.0,
        "baseline_train_loss": 200.0,
        "hyperparameters": {"lr": 0.1},
    }
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({**base, **fields}))


def test_rows_cells_and_marks_come_from_the_summaries(tmp_path: Path) -> None:
    for seed, loss in enumerate([100.0, 110.0, 120.0]):  # all learned
        summary(tmp_path, f"adam{seed}", optimizer="adam", seed=seed,
                final_train_running_loss=loss, learned=True)  # fmt: skip
    summary(tmp_path, "sgd0", optimizer="sgd", final_train_running_loss=199.0, learned=False)
    summary(tmp_path, "sgd1", optimizer="sgd", seed=1, status="diverged", learned=False,
            final_train_running_loss=None)  # fmt: skip
    summary(tmp_path, "sgd2", optimizer="sgd", seed=2, final_train_running_loss=150.0,
            learned=True)  # fmt: skip
    for damping, loss, ok in ((1.0, 300.0, False), (10.0, 90.0, True)):
        hp = {"lr": 0.1, "damping": damping}
        summary(tmp_path, f"kfac{damping}", optimizer="kfac", learned=ok,
                final_train_running_loss=loss, hyperparameters=hp)  # fmt: skip
    summary(tmp_path, "seed7", optimizer="adam", seed=7, final_train_running_loss=1.0, learned=True)
    summary(tmp_path, "other", optimizer="adam", experiment="tune_mnist_ae_small",
            final_train_running_loss=1.0, learned=True)  # fmt: skip

    table = render_small_scale([tmp_path]).splitlines()
    assert len(table) == 3  # header, rule, one preset
    row = table[2].split(" | ")
    assert row[0] == "| koroko_mnist_ae_small (mnist-5k, batch 512, 15 ep)"
    assert row[1] == "200"
    assert row[2] == "174.5 ± 35, 1 of 3 diverged *1 of 3 learned*"  # SGD
    assert row[3] == "110 ± 10"  # Adam: seeds 0-2 only, all learned
    assert row[4] == "damping 1.0: 300 *did not learn*; damping 10.0: 90"  # per setting
    assert row[5].startswith("—")  # no two-level runs
