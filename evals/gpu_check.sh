#!/usr/bin/env bash
# One GPU lease's checks, in one command (the device machine is lent for minutes): the CUDA tests, the tiled
# pass's block size, and the 7B-shaped bf16 benchmark. Results go to $OUT (default gpu-out/); each step has its
# own time limit so a slow one cannot take the others' results with it.
#   bash evals/gpu_check.sh            # on any CUDA machine with this repo's dependencies installed
# Carried wheels in .whl/ (the project's own wheel, transformers at CI's version, datasets) are installed first
# when present: the lent machine has its own image and no package index.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${OUT:-gpu-out}" && cd "${OUT:-gpu-out}" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -d "$REPO/.whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
# run from outside the checkout: its attnsurgery/ folder lacks the patches/ mapping an install provides
cd /tmp
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
    python3 -c "import datasets, pyarrow; print('datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "== tests/test_cuda.py"
timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -n 8 "$REPO/tests/test_cuda.py" -rfE \
    > "$OUT/cuda-tests.log" 2>&1
echo "pytest rc $?"; tail -25 "$OUT/cuda-tests.log"
echo "== tile sweep (TILE_S=0 skips it)"
[ "${TILE_S:-45}" = 0 ] || timeout "${TILE_S:-45}" python3 "$REPO/evals/gpu_tiles.py" --out "$OUT/gpu-tiles.json" 2>&1 | tail -14
echo "== bench 2k/8k, every arm but MoH"
timeout "${BENCH_S:-150}" python3 "$REPO/evals/bench.py" --device cuda --dtype bfloat16 --model shape:llama-7b \
    --lengths 2048 8192 --repeats 2 --arms identity temperature head_scale clipped act gated \
    --out "$OUT/benchmarks-gpu.json" 2>"$OUT/bench.log" | tail -30
echo "== bench MoH 2k"
timeout "${BENCHMOH_S:-50}" python3 "$REPO/evals/bench.py" --device cuda --dtype bfloat16 --model shape:llama-7b \
    --lengths 2048 --repeats 2 --arms moh --out "$OUT/benchmarks-gpu-moh.json" 2>>"$OUT/bench.log" | tail -8
echo "== bench 32k, the arms that stay on fused kernels"
timeout "${BENCH32_S:-150}" python3 "$REPO/evals/bench.py" --device cuda --dtype bfloat16 --model shape:llama-7b \
    --lengths 32768 --repeats 1 --arms identity temperature head_scale "act beta=0.4 thr=0.1 (fused" gated \
    --no-memory --out "$OUT/benchmarks-gpu-32k.json" 2>>"$OUT/bench.log" | tail -12
tail -40 "$OUT/bench.log"
# the lent machine hands back at most 8 files: the two short runs keep their JSON (which holds every figure)
rm -f "$OUT/benchmarks-gpu-moh.md" "$OUT/benchmarks-gpu-32k.md"
ls -la "$OUT"
