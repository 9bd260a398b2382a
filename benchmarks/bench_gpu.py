"""The GPU check: every GPU figure navit reports, measured in one go (run by `scripts/gpu_check.sh`).

    python benchmarks/bench_gpu.py check --json gpu_check.json     # all three parts, one JSON
    python benchmarks/bench_gpu.py tests                            # 1. pytest -m gpu
    python benchmarks/bench_gpu.py model                            # 2. fwd+bwd per attention backend
    python benchmarks/bench_gpu.py train                            # 3. 200 steps of `navit train`

1. **tests** — the CUDA-marked tests (``pytest -m gpu``, only the test files that hold any, so the
   box needs no Ray).
2. **model** — forward+backward of the ``base`` preset (ViT-B/16) at seq_len 1024, bf16 autocast,
   on rows packed with 4-16 images of mixed sizes (``benchmarks/bench_model.py``'s generator), for
   the ``dense``, ``flex`` and ``varlen`` backends, and the unmasked ceiling: the same model on full
   rows of real tokens with plain SDPA and no mask. Reported: step time, real (non-padding)
   tokens/s, model TFLOP/s (matmul FLOPs counted analytically, attention within each image only;
   see ``bench_model.model_flops``), MFU against the device's dense bf16 peak (:data:`PEAK_BF16`;
   unknown device → null), peak memory.
3. **train** — ``navit train --preset base --attention auto`` for 200 steps (configs/
   train_base_gpu.yaml, no torch.compile) from a pack written here *without Ray*
   (``bench_loader.synthetic_pack``: random pixels, 4-16 images per row, realistic layout: this
   measures speed and data-wait, not accuracy). Reported: tokens/s, images/s and data-wait fraction
   after the first logging window (which holds CUDA start-up and kernel compilation), and the run's
   summary.

Without CUDA: one line, exit code 0 (``check``); ``--device cpu`` runs the same code paths on a tiny
model, for the tests of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets. Matched against
# torch.cuda.get_device_name(), most specific first.
PEAK_BF16: list[tuple[str, float]] = [
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (named e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),  # SXM and PCIe
    ("L40S", 362.0),
    ("A10G", 70.0),
]

STEPS, SEQ_LEN, PATCH = 200, 1024, 16
TIME_LIMITS_S = {"tests": 120, "model": 170, "train": 180}  # the whole check stays under 8 minutes


def peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key.lower() in device_name.lower():
            return peak
    return None


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host_cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        env.update(device=name, peak_bf16_tflops=peak_tflops(name))
    return env


# ----------------------------------------------------------------------------------------------------
# 1. tests
# ----------------------------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "pytest.mark.gpu" in p.read_text(encoding="utf-8")
    )


def run_tests(timeout_s: float) -> dict[str, Any]:
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"files": files, "timed_out": True, "seconds": timeout_s}
    tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail[-1])}
    return {
        "files": files,
        "returncode": r.returncode,
        "counts": counts,
        "seconds": round(time.perf_counter() - t0, 1),
        "tail": tail,
    }


# ----------------------------------------------------------------------------------------------------
# 2. model: fwd+bwd per attention backend
# ----------------------------------------------------------------------------------------------------


def bench_model(
    methods: list[str],
    preset: str,
    seq_len: int,
    rows: int,
    reps: int,
    warmup: int,
    device: str,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    import numpy as np
    import torch
    from bench_model import full_rows, model_flops, packed_rows, use_layout

    from model import NaViT, NaViTConfig
    from model.attention import build_layout

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    cfg = NaViTConfig.preset(preset, num_classes=1000, **(overrides or {}))
    net = NaViT(cfg).to(dev).train()
    packed = {k: v.to(dev) for k, v in packed_rows(rng, rows, seq_len, 4, 16, cfg.patch_dim).items()}
    full = {k: v.to(dev) for k, v in full_rows(rng, rows, seq_len, cfg.patch_dim).items()}
    lengths = build_layout(packed["segment_ids"].cpu(), "segment").lengths
    real = int(lengths.sum())
    peak = peak_tflops(torch.cuda.get_device_name(dev)) if cuda else None
    out: dict[str, Any] = {
        "preset": preset,
        "seq_len": seq_len,
        "rows": rows,
        "images_per_row": round(len(lengths) / rows, 2),
        "fill": round(real / (rows * seq_len), 4),
        "dtype": "bf16 autocast" if cuda else "float32",
        "reps": reps,
        "methods": {},
    }
    for m in methods:
        ceiling = m == "ceiling"
        batch = full if ceiling else packed
        n_real = rows * seq_len if ceiling else real
        flops = model_flops(cfg, np.full(rows, seq_len) if ceiling else lengths)
        rec: dict[str, Any] = {}
        try:
            use_layout(net, m)
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            times = []
            for i in range(warmup + reps):
                sync()
                t0 = time.perf_counter()
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    res = net(batch)
                res.logits.float().square().mean().backward()
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                net.zero_grad(set_to_none=True)
            t = statistics.median(times)
            tflops = flops / t / 1e12
            rec = {
                "step_ms": round(t * 1e3, 3),
                "real_tokens_per_s": round(n_real / t),
                "tflops": round(tflops, 2),
                "mfu": round(tflops / peak, 4) if peak else None,
                "flops_per_step": flops,
                "peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None,
            }
        except Exception as e:  # one backend failing (e.g. no varlen kernel) must not hide the others
            rec = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}
        out["methods"][m] = rec
        print(f"[model] {m}: {rec}", file=sys.stderr, flush=True)
    ceil = out["methods"].get("ceiling", {}).get("real_tokens_per_s")
    for m, rec in out["methods"].items():
        if ceil and "real_tokens_per_s" in rec and m != "ceiling":
            rec["vs_ceiling"] = round(rec["real_tokens_per_s"] / ceil, 3)
    return out


# ----------------------------------------------------------------------------------------------------
# 3. train: `navit train` from a pack made without Ray
# ----------------------------------------------------------------------------------------------------


def train_figures(metrics_path: Path) -> dict[str, Any]:
    """Throughput and data-wait from metrics.jsonl, leaving out the first window (start-up)."""
    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r and "window_s" in r]
    steady = steps[1:] if len(steps) > 1 else steps
    wall = sum(r["window_s"] for r in steady)
    if not steady or wall <= 0:
        return {"windows": len(steps)}
    return {
        "windows": len(steps),
        "steady_steps": sum(r["window_steps"] for r in steady),
        "steady_seconds": round(wall, 3),
        "tokens_per_s": round(sum(r["tokens_per_s"] * r["window_s"] for r in steady) / wall),
        "images_per_s": round(sum(r["images_per_s"] * r["window_s"] for r in steady) / wall, 1),
        "data_wait_fraction": round(sum(r["data_wait_fraction"] * r["window_s"] for r in steady) / wall, 4),
        "first_window": {k: steps[0][k] for k in ("window_steps", "window_s", "data_wait_fraction")},
        "final_loss": steps[-1]["loss"],
    }


def run_train(
    work: Path,
    timeout_s: float,
    *,
    device: str = "cuda",
    preset: str = "base",
    steps: int = STEPS,
    rows: int = 1024,
    seq_len: int = SEQ_LEN,
    batch_size: int | None = None,
    workers: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``workers`` (DataLoader) and model ``overrides`` default to the config's; tests shrink them."""
    from bench_loader import synthetic_pack

    t0 = time.perf_counter()
    pack = work / "pack"
    synthetic_pack(pack, rows, seq_len, PATCH)
    pack_s = time.perf_counter() - t0
    run = work / "run"
    cmd = [sys.executable, "-m", "cli.main", "train", "--data", str(pack), "--out", str(run)]
    cmd += ["--config", str(ROOT / "configs" / "train_base_gpu.yaml"), "--preset", preset]
    cmd += ["--attention", "auto", "--steps", str(steps), "--device", device, "--no-compile"]
    cmd += ["--checkpoint-every", "0", "--set", f"schedule.warmup_steps={max(1, steps // 10)}"]
    cmd += ["--set", f"log_every={max(1, steps // 10)}"]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if overrides:
        cmd += ["--set", "model.overrides=" + json.dumps(overrides)]
    t1 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "pack_rows": rows, "pack_seconds": round(pack_s, 1)}
    out: dict[str, Any] = {
        "command": " ".join(cmd[1:]).replace(str(work), "$WORK").replace(str(ROOT) + "/", ""),
        "returncode": r.returncode,
        "pack_rows": rows,
        "pack_seconds": round(pack_s, 1),
        "seconds": round(time.perf_counter() - t1, 1),
    }
    if r.returncode != 0:
        out["tail"] = (r.stdout + r.stderr).strip().splitlines()[-15:]
        return out
    out.update(train_figures(run / "metrics.jsonl"))
    summary = json.loads((run / "summary.json").read_text())
    out["summary"] = {k: summary[k] for k in ("steps", "images", "real_tokens", "tokens", "wall_s")}
    return out


# ----------------------------------------------------------------------------------------------------
# The whole check
# ----------------------------------------------------------------------------------------------------


def _sub(part: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run one part in its own process (fresh CUDA context, bounded time); it prints its JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), part, *args]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "limit_s": timeout_s}
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        return {"returncode": r.returncode, "tail": (r.stdout + r.stderr).strip().splitlines()[-15:]}


def check(json_path: Path | None) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing measured")
        return 0
    t0 = time.perf_counter()
    report: dict[str, Any] = {"environment": environment()}
    report["tests"] = run_tests(TIME_LIMITS_S["tests"])
    report["model"] = _sub("model", [], TIME_LIMITS_S["model"])
    report["train"] = _sub("train", [], TIME_LIMITS_S["train"] + 20)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=1, sort_keys=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    print(text)
    tests_ok = report["tests"].get("returncode") == 0
    return 0 if tests_ok and report["train"].get("returncode") == 0 else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["check", "tests", "model", "train"])
    ap.add_argument("--json", type=Path, help="check: also write the report here")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for this script's own tests")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN)
    ap.add_argument("--rows", type=int, default=32, help="model: packed rows per batch")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["ceiling", "dense", "flex", "varlen"])
    ap.add_argument("--steps", type=int, default=STEPS, help="train: optimizer steps")
    ap.add_argument("--pack-rows", type=int, default=1024, help="train: rows in the synthetic pack")
    ap.add_argument("--batch-size", type=int, default=None, help="train: default from the config (32)")
    args = ap.parse_args()
    if args.part == "check":
        sys.exit(check(args.json))
    if args.part == "tests":
        res = run_tests(TIME_LIMITS_S["tests"])
    elif args.part == "model":
        res = bench_model(
            args.methods, args.preset, args.seq_len, args.rows, args.reps, args.warmup, args.device
        )
    else:
        with tempfile.TemporaryDirectory(prefix="navit-gpu-") as d:
            res = run_train(
                Path(d),
                TIME_LIMITS_S["train"],
                device=args.device,
                preset=args.preset,
                steps=args.steps,
                rows=args.pack_rows,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
            )
    print(json.dumps(res, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
