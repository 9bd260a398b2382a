"""scripts/gpu_check.sh and benchmarks/bench_gpu.py on a machine without CUDA: the one-line exit,
and the harness's own code paths (figures, peak table, the exact `navit train` command the check
runs) exercised on CPU with a tiny model, so a GPU lease is not spent finding a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402


def _no_cuda_env(tmp_path: Path) -> dict[str, str]:
    # Hide any GPU so the no-CUDA path is what runs, whatever the machine.
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, OUT=str(tmp_path))


def test_script_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env=_no_cuda_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("gpu_check: no CUDA device")
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_check_without_cuda_exits_0_without_a_report(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "check", "--json", str(out)],
        env=_no_cuda_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.startswith("gpu_check: no CUDA device")
    assert not out.exists()


def test_peak_table():
    assert bench_gpu.peak_tflops("NVIDIA H200") == 989.0
    assert bench_gpu.peak_tflops("NVIDIA H200 NVL") == 835.0
    assert bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench_gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench_gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench_gpu.peak_tflops("NVIDIA GeForce GTX 1080") is None  # unknown → MFU null


def test_train_figures_leave_out_the_first_window(tmp_path):
    def rec(step, s, tok, img, wait):
        return {"step": step, "loss": 1.0 / step, "window_s": s, "window_steps": 10}, tok, img, wait

    rows = [rec(10, 30.0, 100.0, 1.0, 0.9), rec(20, 1.0, 1000.0, 10.0, 0.1), rec(30, 3.0, 2000.0, 20.0, 0.0)]
    lines = [json.dumps({"event": "start"})]
    for r, tok, img, wait in rows:
        lines.append(json.dumps(dict(r, tokens_per_s=tok, images_per_s=img, data_wait_fraction=wait)))
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    fig = bench_gpu.train_figures(path)
    # Steady state = windows 2 and 3: 1 s at 1000 tok/s + 3 s at 2000 tok/s.
    assert fig["steady_steps"] == 20 and fig["steady_seconds"] == 4.0
    assert fig["tokens_per_s"] == round((1000 + 6000) / 4)
    assert fig["images_per_s"] == round((10 + 60) / 4, 1)
    assert fig["data_wait_fraction"] == round(0.1 / 4, 4)
    assert fig["first_window"]["data_wait_fraction"] == 0.9 and fig["final_loss"] == 1 / 30


def test_model_benchmark_runs_on_cpu():
    small = {"depth": 2, "dim": 64, "heads": 2}
    res = bench_gpu.bench_model(["ceiling", "dense"], "tiny", 32, 2, 1, 0, "cpu", overrides=small)
    dense, ceiling = res["methods"]["dense"], res["methods"]["ceiling"]
    assert "error" not in dense and "error" not in ceiling
    assert dense["real_tokens_per_s"] > 0 and dense["mfu"] is None  # no peak known for a CPU
    # Useful FLOPs: a packed row counts attention within images only, the ceiling the full rows.
    assert dense["flops_per_step"] < ceiling["flops_per_step"]
    assert dense["vs_ceiling"] == round(dense["real_tokens_per_s"] / ceiling["real_tokens_per_s"], 3)


@pytest.mark.slow
def test_train_part_runs_the_real_command_on_cpu(tmp_path):
    """The check's training part end to end on CPU: synthetic pack written without Ray, then the
    same `navit train` command line (GPU config, --attention auto) with a tiny model and no
    DataLoader workers."""
    small = {"depth": 1, "dim": 32, "heads": 2}
    res = bench_gpu.run_train(
        tmp_path,
        300,
        device="cpu",
        preset="tiny",
        steps=4,
        rows=8,
        seq_len=32,
        batch_size=2,
        workers=0,
        overrides=small,
    )
    assert res["returncode"] == 0, res.get("tail")
    assert res["summary"]["steps"] == 4 and res["summary"]["images"] > 0
    assert res["windows"] == 4 and res["steady_steps"] == 3
    assert 0 <= res["data_wait_fraction"] <= 1 and res["tokens_per_s"] > 0
    assert "--attention auto" in res["command"] and "train_base_gpu.yaml" in res["command"]
