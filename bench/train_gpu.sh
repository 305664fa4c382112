#!/usr/bin/env bash
# Training-step throughput and MFU of the 470m preset on one GPU (bench/train.py), in a few minutes.
#
#   export PYTHONPATH=/tmp/site:$PWD/src     # after installing the carried transformers wheel into /tmp/site
#   bash bench/train_gpu.sh [TOKENIZER_JSON] # default: the published 51200 tokenizer if found, else train one
#
# Environment: PEAK (nominal dense bf16 FLOP/s, default 989e12 = H100 SXM; H200 is the same),
# ROWS (micro-batch rows, default 8), STEPS (timed steps, default 6), COMPILE (1 = also time
# train.compile=true, default 1). Expect 2-3 minutes on an H100, most of it compiling (COMPILE=0
# skips that) and ~60 GiB of GPU memory at ROWS=8 (four 470m models with optimiser state are held at once).
set -euo pipefail
cd "$(dirname "$0")/.."

tok="${1:-}"
if [[ -z "$tok" ]]; then
  for candidate in tests/fixtures/reference/tokenizer-51200.json ../shared/reference/tokenizer-51200.json; do
    [[ -f "$candidate" ]] && tok="$candidate" && break
  done
fi
if [[ -n "$tok" ]]; then src=(--tokenizer "$tok"); else src=(--vocab 51200); fi
[[ "${COMPILE:-1}" == 1 ]] && compile=(--compile) || compile=()

[[ ":${PYTHONPATH:-}:" == *":$PWD/src:"* ]] || echo "warning: PYTHONPATH lacks $PWD/src (export PYTHONPATH=/tmp/site:\$PWD/src)" >&2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

python3 bench/train.py --device cuda --dtype bfloat16 --preset 470m --shape '' \
  --seq-len 2048 --micro-batch-rows "${ROWS:-8}" --warmup 2 --steps "${STEPS:-6}" --rounds 3 \
  --peak-flops "${PEAK:-989e12}" --matmul-size 8192 "${src[@]}" "${compile[@]}"
