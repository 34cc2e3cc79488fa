#!/usr/bin/env bash
# One GPU lease's checks, in one command (the device machine is lent for minutes): the CUDA tests (the compiled
# flex_attention paths against float64 among them) and the 7B-shaped bf16 benchmark at 2k / 8k and 32k tokens, every
# arm. Results go to $OUT (default gpu-out/); each step has its own time limit so a slow one cannot take the others'
# results with it.
#   bash evals/gpu_check.sh            # on any CUDA machine with torch, transformers, peft and accelerate
# The package is laid out as an install lays it out (patches/, recipes/ and evals/tasks/ inside attnsurgery/) by
# links under /tmp, so nothing is built there; carried wheels in .whl/ (another transformers, say) are installed
# first when present: the lent machine has its own image and no package index.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${OUT:-gpu-out}" && cd "${OUT:-gpu-out}" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=/tmp/attnsurgery-site
rm -rf "$SITE" && mkdir -p "$SITE/attnsurgery"
for f in "$REPO"/attnsurgery/*; do ln -s "$f" "$SITE/attnsurgery/"; done
ln -s "$REPO/patches" "$SITE/attnsurgery/patches"
ln -s "$REPO/recipes" "$SITE/attnsurgery/recipes"
ln -s "$REPO/evals/tasks" "$SITE/attnsurgery/tasks"
export PYTHONPATH="$SITE"
if [ -d "$REPO/.whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl \
        && export PYTHONPATH="$SITE:/tmp/site"
fi
# run from outside the checkout: its attnsurgery/ folder lacks the patches/ mapping
cd /tmp
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, transformers, peft, accelerate, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
    python3 -c "import attnsurgery, attnsurgery.flex as f; print('attnsurgery from', attnsurgery.__file__, '; flex_attention', f.flex_attention is not None)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
BENCH=(python3 "$REPO/evals/bench.py" --device cuda --dtype bfloat16 --model shape:llama-7b)
echo "== bench 2k/8k, every arm (the flex paths and, beside them, the tiled passes they replace)"
timeout "${BENCH_S:-210}" "${BENCH[@]}" --lengths 2048 8192 --repeats 2 \
    --arms identity temperature head_scale clipped act gated moh \
    --out "$OUT/benchmarks-gpu.json" 2>"$OUT/bench.log" | tail -22
echo "== bench 32k, every arm on its fast path"
timeout "${BENCH32_S:-170}" "${BENCH[@]}" --lengths 32768 --repeats 1 \
    --arms identity temperature head_scale "clipped_softmax (own kernel" "act beta=0.4 thr=0.1 (fused" gated moh \
    --out "$OUT/benchmarks-gpu-32k.json" 2>>"$OUT/bench.log" | tail -12
grep -i "warn\|error\|fail" "$OUT/bench.log" | sort | uniq -c | head -20
echo "== tests/test_cuda.py"
timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -n 12 "$REPO/tests/test_cuda.py" -rfE \
    > "$OUT/cuda-tests.log" 2>&1
echo "pytest rc $?"; tail -30 "$OUT/cuda-tests.log"
# the lent machine hands back at most 8 files
rm -f "$OUT/benchmarks-gpu-32k.md"
ls -la "$OUT"
