#!/usr/bin/env bash
# make demo: the main job end to end on a synthetic dataset (embedded Ray, CPU). Fails loudly.
set -euo pipefail
OUT="${1:-$(mktemp -d -t navit-demo-XXXXXX)}"
NAVIT=".venv/bin/navit"
mkdir -p "$OUT"
echo "== navit demo → $OUT"
$NAVIT doctor
$NAVIT synth --out "$OUT/images" --n 300 --seed 0
$NAVIT plan "$OUT/images" --config configs/demo.yaml --seq-len 256,512,1024
echo "== outputs in $OUT"
