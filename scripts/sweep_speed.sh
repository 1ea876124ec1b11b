#!/usr/bin/env bash
# Measures what the joblib launcher buys on this machine: the same 4-job sweep (2 optimizers x
# 2 seeds of a short MNIST-autoencoder run on the offline subset) run
#   A. sequentially in one process (launcher=local), torch using $THREADS threads per job;
#   B. sequentially with one torch thread per job;
#   C. in parallel (launcher=joblib: 2 worker processes, trainer.threads=1 each).
# Prints the three wall-clock times and the speed-up of C over the faster of A and B. Run it on
# an otherwise idle machine: other work on the same cores distorts the ratios (multi-threaded
# torch suffers most when the cores are shared).
#
#   bash scripts/sweep_speed.sh            # EPOCHS=2 MAX_TRAIN=2000 BATCH=100 THREADS=2
#   OPTIMIZERS=kfac,kfac2 MODEL=deep_linear EPOCHS=4 bash scripts/sweep_speed.sh   # other jobs; EXTRA="..." adds
#                                                                  # Hydra overrides to every job
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-${VENV:-.venv}/bin/python}
EPOCHS=${EPOCHS:-2}
MAX_TRAIN=${MAX_TRAIN:-2000}
BATCH=${BATCH:-100}
THREADS=${THREADS:-$(nproc)}
OPTIMIZERS=${OPTIMIZERS:-sgd,adam}
MODEL=${MODEL:-mnist_ae}
read -r -a extra <<<"${EXTRA:-}"
work=$(mktemp -d /tmp/sweep-speed.XXXXXX)
trap 'rm -rf "$work"' EXIT
export WANDB_MODE=disabled

sweep=(
  -m "optimizer=$OPTIMIZERS" trainer.seed=0,1 "model=$MODEL" data.source=offline
  "data.max_train=$MAX_TRAIN" "trainer.batch_size=$BATCH" "trainer.epochs=$EPOCHS"
  trainer.eval_batch_size=1000 logger=none trainer.progress=false "${extra[@]}"
)

timed() {  # NAME OVERRIDES...: run the sweep, print its wall-clock seconds
  local name=$1
  shift
  local t0 t1
  t0=$(date +%s.%N)
  "$PY" run.py "${sweep[@]}" "$@" results.root="$work/$name/results" \
    hydra.sweep.dir="$work/$name/sweep" >"$work/$name.log" 2>&1 ||
    { cat "$work/$name.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  local runs
  runs=$(find "$work/$name/results" -name summary.json | wc -l)
  [ "$runs" -eq 4 ] || { echo "sweep_speed: $name wrote $runs run folders, expected 4" >&2; exit 1; }
  "$PY" - "$work/$name/results" >&2 <<'PYEOF'
import json, pathlib, sys
times = [json.loads(p.read_text())["wall_clock_s"] for p in pathlib.Path(sys.argv[1]).rglob("summary.json")]
print(f"sweep_speed:   training steps of the 4 jobs: {sum(times):.1f} s (each {', '.join(f'{t:.1f}' for t in times)})")
PYEOF
  "$PY" -c "print(f'{$t1 - $t0:.1f}')"
}

echo "sweep_speed: 4 jobs ($OPTIMIZERS x seeds 0, 1), $MODEL, $MAX_TRAIN examples, batch $BATCH," \
  "$EPOCHS epochs, $(nproc) cores" >&2
seq_s=$(timed sequential launcher=local "trainer.threads=$THREADS")
echo "sweep_speed: sequential (launcher=local, $THREADS threads/job): $seq_s s" >&2
one_s=$(timed sequential1 launcher=local trainer.threads=1)
echo "sweep_speed: sequential (launcher=local, 1 thread/job): $one_s s" >&2
par_s=$(timed parallel launcher=joblib)
echo "sweep_speed: parallel (launcher=joblib, n_jobs=2, 1 thread/job): $par_s s" >&2
"$PY" -c "print(f'sweep_speed: speed-up of joblib over the faster sequential run = '
               f'{min($seq_s, $one_s) / $par_s:.2f}x (over {$THREADS} threads: {$seq_s / $par_s:.2f}x)')"
