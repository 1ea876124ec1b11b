#!/usr/bin/env bash
# Small-scale reproduction of both papers: every `*_small` paper preset in conf/experiment/ runs
# as a multirun over its own grid (optimizers x 3 seeds, see each preset), writing run folders
# into $RESULTS. Presets whose data is not on this machine (real CIFAR-10, FACES: none exists
# offline) are skipped with the reason; put the files in data/ to include them.
#
#   bash scripts/reproduce_small.sh [extra Hydra overrides for every run]
#   RESULTS=results/reference LAUNCHER=joblib bash scripts/reproduce_small.sh logger=none
#
# LAUNCHER: local (default: one job after another) or joblib (2 jobs at a time); THREADS: torch
# threads per job (default 1: multi-threaded torch slows down badly when the cores are shared,
# see docs/clusters.md). Estimated time for the five offline presets: docs/clusters.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-${VENV:-.venv}/bin/python}
RESULTS=${RESULTS:-results/reference}
LAUNCHER=${LAUNCHER:-local}
THREADS=${THREADS:-1}
ONLY=${ONLY:-}  # a space-separated subset of presets (default: every *_small paper preset)
stamp=$(date -u +%Y%m%d-%H%M%S)
say() { echo "reproduce_small: $*" >&2; }

presets=()
for path in conf/experiment/*_small.yaml; do
  name=$(basename "$path" .yaml)
  [[ $name == tune_* || $name == study_* ]] && continue
  [[ -z $ONLY || " $ONLY " == *" $name "* ]] && presets+=("$name")
done
[ ${#presets[@]} -gt 0 ] || { say "no presets selected (ONLY='$ONLY')"; exit 2; }

# Which presets have their data here: load each preset's dataset once (CPU), report why not.
available=$("$PY" - "${presets[@]}" "$@" <<'EOF'
import logging
import sys

import torch

from datasets import load_dataset
from suite.config import register_configs
from suite.preflight import compose_job

logging.disable(logging.WARNING)
register_configs()
names = [a for a in sys.argv[1:] if "=" not in a]
overrides = [a for a in sys.argv[1:] if "=" in a]
for name in names:
    cfg = compose_job([f"experiment={name}", *overrides])
    try:
        data = load_dataset(str(cfg.model.dataset), cfg.data, device=torch.device("cpu"), seed=0)
    except Exception as err:  # any reason the data cannot be loaded: report it, skip the preset
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"reproduce_small: skip {name}: {reason}", file=sys.stderr)
        continue
    print(f"reproduce_small: {name}: {data.variant}", file=sys.stderr)
    print(name)
EOF
) || { say "could not check the presets' data"; exit 2; }

failed=()
start=$SECONDS
for name in $available; do
  say "running $name (launcher=$LAUNCHER)"
  t0=$SECONDS
  if "$PY" run.py -m "experiment=$name" "launcher=$LAUNCHER" "results.root=$RESULTS" \
    "trainer.threads=$THREADS" trainer.progress=false \
    "hydra.sweep.dir=multirun/reproduce_small/$name-$stamp" "$@"; then
    say "$name done in $((SECONDS - t0)) s (sweep id $name-$stamp)"
  else
    say "$name FAILED after $((SECONDS - t0)) s"
    failed+=("$name")
  fi
done
say "finished in $((SECONDS - start)) s; run folders in $RESULTS/"
if [ ${#failed[@]} -gt 0 ]; then
  say "failed presets: ${failed[*]}"
  exit 1
fi
