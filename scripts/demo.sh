#!/usr/bin/env bash
# `make demo`: the main job end to end on a synthetic dataset — embedded local Ray, CPU only.
# synth → plan → pack → stats (+plot) → inspect one row → train a tiny NaViT → eval at several
# resolutions. Any failing step stops the demo with a non-zero exit (set -e).
#
# The task (`navit synth --task aspect`): a dark ellipse or rectangle whose class is its kind AND its
# own aspect ratio (tall 1:2, round 1:1, wide 2:1), in images whose aspect ratio (1:2..2:1) is drawn
# independently of the label. NaViT keeps every image's aspect ratio, so it can tell them apart;
# squashing images to a square (a plain ViT's resize) makes tall/round/wide ambiguous — the last
# eval row shows the same model on squashed images.
set -euo pipefail
OUT="${1:-$(mktemp -d -t navit-demo-XXXXXX)}"
NAVIT="${NAVIT:-.venv/bin/navit}"
PY="${PY:-.venv/bin/python}"
N_TRAIN="${DEMO_IMAGES:-6000}"
EPOCHS="${DEMO_EPOCHS:-5}"
STEPS="${DEMO_STEPS:-}"  # empty: the config's schedule.steps (one pass over the packed epochs)
RESOLUTIONS="32,48,64,96,128,native,sq64"
# OpenMP threads that spin while they wait make every training step ~20x slower when other jobs
# share the cores (measured on the shared 2-core VM at load ~7: 34 tokens/s spinning, 2,529 passive,
# 720 with one thread, for the demo model). Set OMP_WAIT_POLICY yourself to override.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; echo "$(date +%s.%N) ${1%% *}" >> "$OUT/.phases"; }
: > "$OUT/.phases"
t0=$(date +%s)

step "0/7 environment"
$NAVIT doctor

step "1/7 navit synth --task aspect: $N_TRAIN training + 600 held-out images (6 classes)"
$NAVIT synth --out "$OUT/images" --n "$N_TRAIN" --seed 0 --task aspect
$NAVIT synth --out "$OUT/heldout" --n 600 --seed 1 --task aspect

step "2/7 navit plan: padding at three sequence lengths (headers only, no decode)"
$NAVIT plan "$OUT/images" --config configs/demo.yaml --seq-len 256,512,1024 | tail -n 8

step "3/7 navit pack: Ray Data writes packed Parquet shards ($EPOCHS epochs, fresh resolution + flip per epoch)"
pack_t0=$(date +%s.%N)
$NAVIT pack "$OUT/images" --out "$OUT/pack" --config configs/demo.yaml --epochs "$EPOCHS"
pack_t1=$(date +%s.%N)

step "4/7 navit stats: packing efficiency and padding"
$NAVIT stats "$OUT/pack" --plot "$OUT/stats.png" > "$OUT/stats.txt"
head -n 12 "$OUT/stats.txt"
$NAVIT stats "$OUT/pack" --json > "$OUT/stats.json"

step "5/7 navit inspect: row 0 rebuilt from its patches"
$NAVIT inspect "$OUT/pack" --row 0 --out "$OUT/row0.png"

step "6/7 navit train: tiny NaViT (4 blocks, width 128) on CPU (configs/train_demo_cpu.yaml), held-out top-1 once per epoch"
train_t0=$(date +%s)
$NAVIT train --data "$OUT/pack" --out "$OUT/run" --config configs/train_demo_cpu.yaml --val "$OUT/heldout" \
  ${STEPS:+--steps "$STEPS" --checkpoint-every "$STEPS"}
train_t1=$(date +%s)

step "7/7 navit eval: one model, several resolutions, on the 600 held-out images"
$NAVIT eval --checkpoint "$OUT/run" "$OUT/heldout" --resolutions "$RESOLUTIONS" \
  --json --plot "$OUT/eval.png" > "$OUT/eval.json"
$PY - "$OUT" "$pack_t0" "$pack_t1" "$t0" "$train_t0" "$train_t1" "$EPOCHS" <<'PY'
import json, sys, time
out, p0, p1, t0, tr0, tr1 = sys.argv[1], *map(float, sys.argv[2:7])
epochs = int(sys.argv[7])
now = time.time()
marks = [line.split(maxsplit=1) for line in open(f"{out}/.phases")]
names = {"0/7": "doctor", "1/7": "synth", "2/7": "plan", "3/7": "pack", "4/7": "stats", "5/7": "inspect",
         "6/7": "train", "7/7": "eval"}
phases = [(names.get(m[1].strip(), m[1].strip()), float(nxt[0]) - float(m[0]))
          for m, nxt in zip(marks, marks[1:] + [[str(now), ""]])]
stats = json.load(open(f"{out}/stats.json"))
ev = json.load(open(f"{out}/eval.json"))
rows = {str(r["resolution"]): r for r in ev["results"]}
print("resolution            tokens/img   top-1")
for key, r in rows.items():
    what = {"native": "native (as stored)"}.get(key, f"{key} px longer side")
    if key.startswith("sq"):
        what = f"squashed to {key[2:]}x{key[2:]}"
    print(f"{what:<22}{r['tokens_per_image']:>10.1f}   {r['top1']:.3f}")
summary = json.load(open(f"{out}/run/summary.json"))
n = stats.get("images_packed") or stats.get("images")
native, sq = rows["native"], next(r for k, r in rows.items() if k.startswith("sq"))
print()
print("== summary")
print("task                  navit synth --task aspect: {ellipse, rectangle} x {tall, round, wide}; chance 1/6")
print(f"held-out top-1        {native['top1']:.3f} at native resolution ({native['images']} held-out images)")
print(f"same images squashed  {sq['top1']:.3f} at {sq['resolution'][2:]}x{sq['resolution'][2:]} (a plain ViT's "
      "resize: tall/round/wide become ambiguous)")
print(f"training              {summary['steps']} steps, {summary['images']} images, "
      f"{tr1 - tr0:.0f} s; final train loss {summary['final_loss']:.3f}")
if summary.get("best_val_top1") is not None:
    vals = [json.loads(line) for line in open(f"{out}/run/metrics.jsonl")]
    vals = [r for r in vals if r.get("event") == "val"]
    print("held-out during train " + "  ".join(f"{r['val_top1']:.3f} @{r['step']}" for r in vals)
          + "  (top-1 at native resolution, --val)")
    print(f"best during training  {summary['best_val_top1']:.3f} at step {summary['best_step']} "
          f"({summary['best_checkpoint']})")
print(f"padding fraction      {stats['padding_fraction']:.4%}  ({stats['sequences']} sequences, "
      f"{n} images, {epochs} epochs)")
print(f"pack throughput       {n / (p1 - p0):.1f} images/s (whole command, incl. Ray start-up)")
print(f"total demo time       {now - t0:.0f} s  (" + ", ".join(f"{k} {v:.0f}" for k, v in phases) + ")")
PY
cat <<EOF

== outputs
  images        $OUT/images, $OUT/heldout
  packed shards $OUT/pack   (index.json, images.parquet, rejected.jsonl, shards/)
  stats         $OUT/stats.txt, $OUT/stats.json, plot $OUT/stats.png
  inspect       $OUT/row0.png
  training run  $OUT/run    (checkpoints/ with best/, metrics.jsonl with the held-out records, summary.json)
  eval          $OUT/eval.json, plot $OUT/eval.png
EOF
