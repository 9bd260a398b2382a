#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh may have to install on a GPU machine that cannot reach a
# package registry: pydantic (+ pydantic-core, annotated-types, typing-inspection,
# typing-extensions), pyyaml, safetensors, psutil, pytest (+ its needs), at the versions of this
# checkout's .venv, built for that machine's Python (default 3.12) on x86-64 Linux.
#
#   scripts/fetch_gpu_wheels.sh                 # into .wheels/ (git-ignored)
#   GPU_PYTHON=3.11 scripts/fetch_gpu_wheels.sh DIR
#
# Then on the GPU machine: WHEELS=.wheels scripts/gpu_check.sh (only missing packages are installed).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.wheels}
PYV=${GPU_PYTHON:-3.12}
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
pins=()
for dist in pydantic pyyaml safetensors psutil pytest; do
    v=$("$PY" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null || true)
    pins+=("$dist${v:+==$v}")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux_2_5_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
mkdir -p "$DEST"
"$PY" -m pip download -q --only-binary=:all: --implementation cp --python-version "$PYV" \
    "${platforms[@]}" -d "$DEST" "${pins[@]}"
echo "fetch_gpu_wheels: ${pins[*]} (+ dependencies) for CPython $PYV in $DEST: $(du -sh "$DEST" | cut -f1)"
