#!/usr/bin/env bash
# End-to-end test of the SLURM launcher on a one-node cluster brought up on this machine:
#   1. a 2-job multirun (sgd, adam on the offline MNIST subset) through launcher=slurm: every
#      job's run folder must land with status completed and one shared sweep id;
#   2. requeue: a longer job gets SIGUSR2 (what SLURM sends before a time limit), checkpoints,
#      is requeued by submitit and must resume in the same run folder and complete;
#   3. `scontrol requeue` of a job that mirrors to W&B (offline): SLURM sends SIGTERM to every
#      process of the job, W&B's service included; the run must stop with a checkpoint, resume
#      in the same run folder after the requeue, keep one W&B offline folder, and end with
#      metrics bitwise equal to an uninterrupted run of the same config;
#   4. data-parallel K-FAC through the launcher: kfac and kfac2 jobs of 2 tasks each
#      (trainer.distributed=slurm) must end with identical parameters on both ranks and the
#      batch losses of the single-process run on the same global batch (float64).
# Daemons are stopped by PID on exit. Needs root and slurmctld/slurmd/munge (see
# scripts/slurm_local.sh). KEEP=1 keeps the temporary folder; PY picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-${VENV:-.venv}/bin/python}
work=$(mktemp -d /tmp/slurm-test.XXXXXX)
cluster=$work/cluster

cleanup() {
  local status=$?
  bash scripts/slurm_local.sh down "$cluster" || true
  if [ "$status" -ne 0 ]; then
    echo "slurm_test: FAILED; job logs:" >&2
    tail -n 30 "$work"/*/.submitit/*/*_log.err 2>/dev/null >&2 || true
  fi
  if [ -n "${KEEP:-}" ]; then echo "slurm_test: kept $work" >&2; else rm -rf "$work"; fi
  exit "$status"
}
trap cleanup EXIT
say() { echo "slurm_test: $*" >&2; }

bash scripts/slurm_local.sh up "$cluster" >/dev/null
# shellcheck disable=SC1091
source "$cluster/env.sh"
export WANDB_MODE=disabled OMP_NUM_THREADS=1

base=(
  model=mnist_ae trainer.progress=false data.source=offline data.max_train=400
  trainer.batch_size=100 trainer.eval_batch_size=1000 trainer.threads=1
)
slurm=(launcher=slurm hydra.launcher.partition=debug hydra.launcher.mem_gb=2 hydra.launcher.timeout_min=10)
common=("${base[@]}" logger=none "${slurm[@]}")

progress() {  # steps recorded in the run's summary under $1 (0 before it exists)
  "$PY" -c 'import json, sys, glob
paths = glob.glob(sys.argv[1] + "/*/summary.json")
print(json.load(open(paths[0]))["steps_completed"] if paths else 0)' "${1:-$work/requeue}"
}

release_requeued() {  # JOB: wait until it is pending again, then release it
  # SLURM holds a requeued job back (BeginTime): release it now.
  local deadline=$((SECONDS + 90))
  until squeue -h -j "$1" -t pending -o %i 2>/dev/null | grep -q .; do
    [ "$SECONDS" -lt "$deadline" ] || { say "job $1 was not requeued"; exit 1; }
    sleep 0.5
  done
  scontrol update JobId="$1" StartTime=now
  say "job $1 requeued; released"
}

parts=${SLURM_TEST_PARTS:-1 2 3 4}  # e.g. SLURM_TEST_PARTS=3 runs only the W&B requeue
part() { [[ " $parts " == *" $1 "* ]]; }

# ---------------------------------------------------------------- 1. sweep through SLURM
if part 1; then
say "sweep: optimizer=sgd,adam through launcher=slurm"
"$PY" run.py -m "${common[@]}" optimizer=sgd,adam trainer.max_steps=8 \
  results.root="$work/results" hydra.sweep.dir="$work/sweep" >"$work/sweep.log" 2>&1 ||
  { cat "$work/sweep.log" >&2; exit 1; }
"$PY" - "$work/results" <<'EOF'
import json, sys
from pathlib import Path
summaries = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*/summary.json"))]
found = sorted((s["optimizer"], s["status"], s["sweep_id"], s["steps_completed"]) for s in summaries)
expected = [("adam", "completed", "sweep", 8), ("sgd", "completed", "sweep", 8)]
assert found == expected, f"run folders: {found}; expected {expected}"
print(f"slurm_test: sweep ok: {len(found)} run folders completed, sweep id 'sweep'", file=sys.stderr)
EOF

fi

# ----------------------------------------------------- 2. signal, requeue and resume
if part 2; then
say "requeue: SIGUSR2 mid-run, then resume from the checkpoint"
steps=400
"$PY" run.py -m "${common[@]}" optimizer=sgd trainer.epochs=1000 trainer.max_steps=$steps \
  trainer.eval_every_steps=25 results.root="$work/requeue" \
  hydra.sweep.dir="$work/requeue_sweep" >"$work/requeue.log" 2>&1 &
launcher=$!

deadline=$((SECONDS + 180))
until [ "$(progress)" -ge 25 ]; do
  [ "$SECONDS" -lt "$deadline" ] || { say "job made no progress"; cat "$work/requeue.log" >&2; exit 1; }
  kill -0 "$launcher" 2>/dev/null || { say "launcher exited early"; cat "$work/requeue.log" >&2; exit 1; }
  sleep 0.5
done
job=$(squeue -h -o %i | head -n1)
[ -n "$job" ] || { say "no job in the queue"; exit 1; }
scancel --signal=USR2 "$job"
say "sent SIGUSR2 to job $job at step $(progress)"
release_requeued "$job"
wait "$launcher" || { cat "$work/requeue.log" >&2; exit 1; }
"$PY" - "$work/requeue" "$work/requeue_sweep" "$steps" <<'EOF'
import json, sys
from pathlib import Path
import pandas as pd
results, sweep, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
folders = sorted(p.parent for p in results.glob("*/summary.json"))
assert len(folders) == 1, f"expected one run folder after the requeue, found {len(folders)}"
summary = json.loads((folders[0] / "summary.json").read_text())
assert summary["status"] == "completed", summary["status"]
assert summary["steps_completed"] == steps, summary["steps_completed"]
recorded = pd.read_parquet(folders[0] / "metrics_steps.parquet")["step"].tolist()
assert recorded == list(range(1, steps + 1)), "step records not contiguous after the resume"
logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.err"))
assert "resuming" in logs, "the requeued job did not resume from its checkpoint"
assert "Requeued job" in "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
print(f"slurm_test: requeue ok: resumed in {folders[0].name}, {steps} steps, completed",
      file=sys.stderr)
EOF
fi

# ------------------------------------------ 3. scontrol requeue with the W&B logger (offline)
if part 3; then
say "requeue with W&B: scontrol requeue mid-run, resume, compare with an uninterrupted run"
steps=120
wb=(optimizer=kfac optimizer.cov_period=2 optimizer.inv_period=20 trainer.epochs=1000
  trainer.max_steps=$steps trainer.eval_every_steps=20 logger=wandb logger.step_every=5)
WANDB_MODE=offline "$PY" run.py -m "${base[@]}" "${slurm[@]}" "${wb[@]}" \
  results.root="$work/wandb" hydra.sweep.dir="$work/wandb_sweep" >"$work/wandb.log" 2>&1 &
launcher=$!
# The same config without SLURM, W&B or interruption: the reference the requeued run must match.
"$PY" run.py "${base[@]}" "${wb[@]}" logger.mode=disabled results.root="$work/wandb_reference" \
  hydra.run.dir="$work/wandb_reference_job" >"$work/wandb_reference.log" 2>&1 &
reference=$!
deadline=$((SECONDS + 600))
until [ "$(progress "$work/wandb")" -ge 40 ]; do
  [ "$SECONDS" -lt "$deadline" ] || { say "job made no progress"; cat "$work/wandb.log" >&2; exit 1; }
  kill -0 "$launcher" 2>/dev/null || { say "launcher exited early"; cat "$work/wandb.log" >&2; exit 1; }
  sleep 0.5
done
job=$(squeue -h -t running -o %i | head -n1)
[ -n "$job" ] || { say "no running job"; exit 1; }
scontrol requeue "$job"
say "scontrol requeue $job at step $(progress "$work/wandb")"
release_requeued "$job"
wait "$launcher" || { cat "$work/wandb.log" >&2; exit 1; }
wait "$reference" || { cat "$work/wandb_reference.log" >&2; exit 1; }
"$PY" - "$work/wandb" "$work/wandb_reference" "$work/wandb_sweep" "$steps" <<'EOF'
import json, sys
from pathlib import Path
import pandas as pd
results, reference, sweep = (Path(a) for a in sys.argv[1:4])
steps = int(sys.argv[4])
(folder,) = sorted(p.parent for p in results.glob("*/summary.json"))
(ref,) = sorted(p.parent for p in reference.glob("*/summary.json"))
summary = json.loads((folder / "summary.json").read_text())
assert summary["status"] == "completed", summary["status"]
assert summary["steps_completed"] == steps, summary["steps_completed"]
assert not (folder / "checkpoint.pt").exists(), "the completed run kept its checkpoint"
logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.err"))
assert "interrupted at step" in logs and "resuming" in logs, "no stop and resume in the job log"
for name, drop in (("metrics_steps.parquet", ["step_time_s", "wall_time_s"]),
                   ("metrics_evals.parquet", ["wall_time_s"])):
    ours = pd.read_parquet(folder / name).drop(columns=drop)
    theirs = pd.read_parquet(ref / name).drop(columns=drop)
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
offline = sorted((folder / "wandb").glob("offline-run-*"))
assert len(offline) == 1 and offline[0].name.endswith(folder.name), offline
print(f"slurm_test: wandb requeue ok: {folder.name} resumed after scontrol requeue, {steps} "
      "steps bitwise equal to the uninterrupted run, one W&B offline folder", file=sys.stderr)
EOF
fi

# ------------------------------ 4. one run over 2 SLURM tasks (data-parallel K-FAC, kfac2)
if part 4; then
say "data-parallel: kfac,kfac2 over 2 tasks per job vs one process"
dp=(optimizer=kfac,kfac2 optimizer.fisher=empirical optimizer.cov_period=2 optimizer.inv_period=6
  trainer.max_steps=12 trainer.dtype=float64 trainer.eval_every_steps=6 trainer.threads=1)
"$PY" run.py -m "${common[@]}" "${dp[@]}" trainer.distributed=slurm \
  hydra.launcher.tasks_per_node=2 hydra.launcher.cpus_per_task=1 \
  results.root="$work/ddp" hydra.sweep.dir="$work/ddp_sweep" >"$work/ddp.log" 2>&1 ||
  { cat "$work/ddp.log" >&2; tail -n 40 "$work"/ddp_sweep/.submitit/*/*_log.err >&2; exit 1; }
"$PY" run.py -m "${base[@]}" logger=none "${dp[@]}" results.root="$work/ddp_reference" \
  hydra.sweep.dir="$work/ddp_reference_sweep" >"$work/ddp_reference.log" 2>&1 ||
  { cat "$work/ddp_reference.log" >&2; exit 1; }
"$PY" - "$work/ddp" "$work/ddp_reference" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
import pandas as pd
def runs(root):
    out = {}
    for path in Path(root).glob("*/summary.json"):
        summary = json.loads(path.read_text())
        out[summary["optimizer"]] = (summary, path.parent)
    return out
ours, reference = runs(sys.argv[1]), runs(sys.argv[2])
assert sorted(ours) == sorted(reference) == ["kfac", "kfac2"], (sorted(ours), sorted(reference))
for name, (summary, folder) in sorted(ours.items()):
    assert summary["status"] == "completed", (name, summary["status"])
    assert summary["world_size"] == 2, (name, summary.get("world_size"))
    assert summary["ranks_identical_params"] is True, (name, summary.get("ranks_identical_params"))
    mine = pd.read_parquet(folder / "metrics_steps.parquet")["batch_loss"].to_numpy()
    single = pd.read_parquet(reference[name][1] / "metrics_steps.parquet")["batch_loss"].to_numpy()
    assert len(mine) == len(single) == 12, (name, len(mine), len(single))
    # float64 round-off of a different reduction order only (sum over 2 ranks vs one batch)
    np.testing.assert_allclose(mine, single, rtol=1e-9, atol=0)
print("slurm_test: data-parallel ok: kfac, kfac2 over 2 SLURM tasks, identical parameters on "
      "both ranks, batch losses equal to the single-process run (float64, rtol 1e-9)",
      file=sys.stderr)
EOF
fi
say "OK"
