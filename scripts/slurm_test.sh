#!/usr/bin/env bash
# End-to-end test of the SLURM launcher on a one-node cluster brought up on this machine:
#   1. a 2-job multirun (sgd, adam on the offline MNIST subset) through launcher=slurm: every
#      job's run folder must land with status completed and one shared sweep id;
#   2. requeue: a longer job gets SIGUSR2 (what SLURM sends before a time limit), checkpoints,
#      is requeued by submitit and must resume in the same run folder and complete.
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

common=(
  model=mnist_ae logger=none trainer.progress=false data.source=offline data.max_train=400
  trainer.batch_size=100 trainer.eval_batch_size=1000 trainer.threads=1
  launcher=slurm hydra.launcher.partition=debug hydra.launcher.mem_gb=2
  hydra.launcher.timeout_min=10
)

# ---------------------------------------------------------------- 1. sweep through SLURM
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

# ----------------------------------------------------- 2. signal, requeue and resume
say "requeue: SIGUSR2 mid-run, then resume from the checkpoint"
steps=400
"$PY" run.py -m "${common[@]}" optimizer=sgd trainer.epochs=1000 trainer.max_steps=$steps \
  trainer.eval_every_steps=25 results.root="$work/requeue" \
  hydra.sweep.dir="$work/requeue_sweep" >"$work/requeue.log" 2>&1 &
launcher=$!

progress() {  # steps recorded in the run's summary (0 before it exists)
  "$PY" -c 'import json, sys, glob
paths = glob.glob(sys.argv[1] + "/*/summary.json")
print(json.load(open(paths[0]))["steps_completed"] if paths else 0)' "$work/requeue"
}
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
# submitit requeues the job; SLURM holds a requeued job back (BeginTime): release it now.
deadline=$((SECONDS + 60))
until squeue -h -j "$job" -t pending -o %i 2>/dev/null | grep -q .; do
  [ "$SECONDS" -lt "$deadline" ] || { say "job $job was not requeued"; exit 1; }
  sleep 0.5
done
scontrol update JobId="$job" StartTime=now
say "job $job requeued; released"
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
say "OK"
