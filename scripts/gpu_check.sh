#!/usr/bin/env bash
# The GPU check, in one go (≤ 8 minutes on one H100/H200-class GPU): the CUDA-marked tests, forward+
# backward of the base preset at seq_len 1024 in bf16 for the dense / flex / varlen backends and the
# unmasked ceiling (tokens/s, TFLOP/s, MFU), and 200 steps of `navit train --preset base
# --attention auto` with its data-wait. One JSON with every figure (benchmarks/bench_gpu.py says
# what each one is).
#
#   scripts/gpu_check.sh                        # uses .venv/bin/python if present, else python3
#   WHEELS=.wheels scripts/gpu_check.sh         # first install what is missing from a wheel folder
#   OUT=dir scripts/gpu_check.sh                # the JSON goes to $OUT/gpu_check.json (default: .)
#
# Without a CUDA device it says so in one line and exits 0. Ray is not needed (the pack for the
# training steps is written without Ray). For a machine without package registries, fetch the
# wheels here first with scripts/fetch_gpu_wheels.sh (README: "GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch" >&2
    exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing measured"
    exit 0
fi

# Packages navit needs that a bare GPU image may lack (module name=distribution name), installed
# from $WHEELS only when missing, into a private folder put first on PYTHONPATH.
if [[ -n "${WHEELS:-}" ]]; then
    SITE=${GPU_CHECK_SITE:-/tmp/navit-gpu-site}
    missing=()
    for pair in pydantic=pydantic yaml=pyyaml safetensors=safetensors psutil=psutil pytest=pytest; do
        "$PY" -c "import ${pair%%=*}" 2>/dev/null || missing+=("${pair#*=}")
    done
    if ((${#missing[@]})); then
        echo "gpu_check: installing ${missing[*]} from $WHEELS" >&2
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-compile --no-cache-dir \
            --target "$SITE" "${missing[@]}"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

OUT_DIR=${OUT:-.}
exec "$PY" benchmarks/bench_gpu.py check --json "$OUT_DIR/gpu_check.json"
