#!/usr/bin/env bash
# Budget-curve points on a GPU, for a session that has the device (issue 23 #6): each arm of evals/budget-gpu.yaml
# trains for at most SECONDS (default 240: both arms in about 10 minutes with loading), its budgets in order; the
# points that finish land in evals/results/budget/curve.json tagged `device: cuda`. An arm stopped by the time limit
# keeps its checkpoint (the next run continues it) and the points it finished.
#   bash evals/gpu_train.sh [SECONDS]
#   GPU_TRAIN_TABLE=... GPU_TRAIN_OUT=... bash evals/gpu_train.sh 30     (tests/test_budget.py runs it on CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_ARM=${1:-240}
TABLE=${GPU_TRAIN_TABLE:-evals/budget-gpu.yaml}
OUT=${GPU_TRAIN_OUT:-evals/results/budget}
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
for arm in $("$PYTHON" -c "from attnsurgery.eval.budget import load_budget_table as l; print(' '.join(a.name for a in l('$TABLE').arms))"); do
  # SIGINT: the trainer saves its checkpoint and stops; finished points are already on disk
  timeout -s INT -k 30 "$SECONDS_PER_ARM" "$PYTHON" -m attnsurgery.eval.budget "$TABLE" --arm "$arm" --out "$OUT"
  rc=$?
  if [ $rc -ne 0 ]; then echo "arm $arm: stopped after ${SECONDS_PER_ARM}s or failed (exit $rc); its finished points are in $OUT/curve.json"; fi
done
"$PYTHON" -c "import json; c = json.load(open('$OUT/curve.json')); [print(a, p['device'], p['tokens'], round(p['rel_pct'], 1)) for a, v in c['arms'].items() for p in v['points']]"
