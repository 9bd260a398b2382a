#!/usr/bin/env bash
# `make demo`: the main job end to end on a synthetic dataset — embedded local Ray, CPU only.
# synth → plan → pack → stats (+plot) → inspect one row → train the tiny preset → eval at several
# resolutions. Any failing step stops the demo with a non-zero exit (set -e).
set -euo pipefail
OUT="${1:-$(mktemp -d -t navit-demo-XXXXXX)}"
NAVIT="${NAVIT:-.venv/bin/navit}"
PY="${PY:-.venv/bin/python}"
STEPS="${DEMO_STEPS:-1200}"
mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
t0=$(date +%s)

step "0/7 environment"
$NAVIT doctor

step "1/7 navit synth: 3000 labelled training images + 300 held-out images (6 shape classes)"
$NAVIT synth --out "$OUT/images" --n 3000 --seed 0
$NAVIT synth --out "$OUT/heldout" --n 300 --seed 1

step "2/7 navit plan: padding at three sequence lengths (headers only, no decode)"
$NAVIT plan "$OUT/images" --config configs/demo.yaml --seq-len 256,512,1024 | tail -n 8

step "3/7 navit pack: Ray Data writes packed Parquet shards"
pack_t0=$(date +%s.%N)
$NAVIT pack "$OUT/images" --out "$OUT/pack" --config configs/demo.yaml --epochs 2
pack_t1=$(date +%s.%N)

step "4/7 navit stats: packing efficiency and padding"
$NAVIT stats "$OUT/pack" --plot "$OUT/stats.png" > "$OUT/stats.txt"
head -n 12 "$OUT/stats.txt"
$NAVIT stats "$OUT/pack" --json > "$OUT/stats.json"

step "5/7 navit inspect: row 0 rebuilt from its patches"
$NAVIT inspect "$OUT/pack" --row 0
$NAVIT inspect "$OUT/pack" --row 0 --out "$OUT/row0.png"

step "6/7 navit train: tiny NaViT (4 blocks, width 128), $STEPS steps on CPU"
$NAVIT train --data "$OUT/pack" --out "$OUT/run" --config configs/train_demo_cpu.yaml --steps "$STEPS" \
  --checkpoint-every "$STEPS"

step "7/7 navit eval: one model, several resolutions (held-out images)"
$NAVIT eval --checkpoint "$OUT/run" "$OUT/heldout" --resolutions 32,64,96,128,native \
  --json --plot "$OUT/eval.png" > "$OUT/eval.json"
$PY - "$OUT" "$pack_t0" "$pack_t1" "$t0" <<'PY'
import json, sys, time
out, p0, p1, t0 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
stats = json.load(open(f"{out}/stats.json"))
ev = json.load(open(f"{out}/eval.json"))
rows = ev.get("results", ev) if isinstance(ev, dict) else ev
print("resolution  top1    top5")
for r in rows:
    print(f"{str(r['resolution']):>10}  {r['top1']:.3f}  {r['top5']:.3f}")
best = max(rows, key=lambda r: r["top1"])
print()
print("== summary")
print(f"padding fraction      {stats['padding_fraction']:.4%}  ({stats['sequences']} sequences, "
      f"{stats['images_packed'] if 'images_packed' in stats else stats.get('images')} images, 2 epochs)")
n = stats.get("images_packed") or stats.get("images")
print(f"pack throughput       {n / (p1 - p0):.1f} images/s (whole command, incl. Ray start-up)")
print(f"best held-out top-1   {best['top1']:.3f} at resolution {best['resolution']} (chance = 1/6)")
print(f"total demo time       {time.time() - t0:.0f} s")
PY
cat <<EOF

== outputs
  images        $OUT/images, $OUT/heldout
  packed shards $OUT/pack   (index.json, images.parquet, rejected.jsonl, shards/)
  stats         $OUT/stats.txt, $OUT/stats.json, plot $OUT/stats.png
  inspect       $OUT/row0.png
  training run  $OUT/run    (checkpoints/, metrics.jsonl)
  eval          $OUT/eval.json, plot $OUT/eval.png
EOF
