"""The trainer's GPU-user features on CPU: EMA of the weights (the right average, resumed bit for bit,
`navit eval --ema`), activation checkpointing (equal gradients), TensorBoard / W&B sinks, and a step
loop that reads device values back only at sync points (a NaN is still caught there)."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import make_images, run_cli, tiny_train_config, write_image_folder, write_pack

from model import NaViT, NaViTConfig, pack_images
from packer.errors import NavitError
from trainer import checkpoint as ck
from trainer.data import open_source
from trainer.loop import build_model, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    images, labels = make_images(96, seed=5)
    return write_pack(tmp_path_factory.mktemp("ex") / "pack", images, labels, seq_len=64, shard_rows=6)


def _src(pack):
    return lambda info: open_source(str(pack), batch_size=4, seed=0)


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_is_the_average_of_the_weights_and_resumes_exactly(tmp_path, pack, capsys):
    cfg = tiny_train_config(
        **{"schedule.steps": 6, "ema_decay": 0.9, "checkpoint.every": 1, "checkpoint.keep": 9}
    )
    full = train(cfg, _src(pack), tmp_path / "a", verbose=False)
    # The average, recomputed by hand from the init and each step's weights.
    torch.manual_seed(cfg.seed)
    init, _ = build_model(cfg, full_classes(tmp_path / "a"), 8)
    avg = {k: v.clone() for k, v in init.state_dict().items()}
    for s in range(1, 4):
        c = ck.load_checkpoint(tmp_path / "a" / "checkpoints" / f"step-{s:08d}")
        d = min(0.9, (1 + s) / (10 + s))
        avg = {k: avg[k] + (1 - d) * (c.weights[k] - avg[k]) for k in avg}
        ema = c.extra_weights("ema")
        assert all(torch.allclose(ema[k], avg[k], atol=1e-6) for k in avg), s
    assert not all(torch.equal(ema[k], c.weights[k]) for k in ema)

    part = train(cfg, _src(pack), tmp_path / "b", stop_after=4, verbose=False)
    rest = train(cfg, _src(pack), tmp_path / "b", resume=True, verbose=False)
    assert part.losses + rest.losses == full.losses
    ea = ck.load_checkpoint(tmp_path / "a").extra_weights("ema")
    eb = ck.load_checkpoint(tmp_path / "b").extra_weights("ema")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)  # bit for bit

    # navit eval --ema scores the EMA weights; a checkpoint without them is a one-line error.
    images, labels = make_images(12, seed=3)
    folder = write_image_folder(tmp_path / "val", images, labels)
    argv = ["eval", str(folder), "--checkpoint", str(tmp_path / "a"), "--resolutions", "native", "--json"]
    code, cap = run_cli([*argv, "--ema"], capsys)
    assert code == 0, cap.err
    assert json.loads(cap.out)["results"][0]["images"] == 12
    plain = train(tiny_train_config(**{"schedule.steps": 2}), _src(pack), tmp_path / "c", verbose=False)
    code, cap = run_cli(["eval", str(folder), "--checkpoint", plain.checkpoint, "--ema"], capsys)
    assert code == 2 and "no EMA weights" in cap.err and cap.err.strip().count("\n") == 0


def full_classes(run: Path) -> int:
    return int(ck.load_checkpoint(run).meta["model_config"]["num_classes"])


# ------------------------------------------------------------------------------ activation checkpointing


def _grads(grad_checkpoint: bool, calls: list | None = None) -> dict[str, torch.Tensor]:
    cfg = NaViTConfig.preset(
        "tiny", depth=3, dim=32, heads=2, patch_size=8, num_classes=4, dropout=0.1, drop_path=0.2,
        grad_checkpoint=grad_checkpoint,
    )  # fmt: skip
    torch.manual_seed(0)
    net = NaViT(cfg).train()
    images, labels = make_images(10, seed=1)
    batch = pack_images(images, patch_size=8, seq_len=64)
    torch.manual_seed(1)  # dropout / drop-path draws
    out = net(batch)
    torch.nn.functional.cross_entropy(out.logits, torch.tensor(labels)).backward()
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def test_activation_checkpointing_gives_equal_gradients(monkeypatch):
    import torch.utils.checkpoint as tuc

    plain = _grads(False)
    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    recomputed = _grads(True)
    assert len(calls) == 3  # one per block: the blocks really were checkpointed
    assert plain.keys() == recomputed.keys()
    for k in plain:  # dropout and drop-path masks are replayed in the recomputation
        assert torch.allclose(plain[k], recomputed[k], rtol=1e-5, atol=1e-7), k


def test_grad_checkpoint_is_a_runtime_knob_for_resume(tmp_path, pack):
    cfg = tiny_train_config(**{"schedule.steps": 4})
    full = train(cfg, _src(pack), tmp_path / "a", verbose=False)
    train(cfg, _src(pack), tmp_path / "b", stop_after=2, verbose=False)
    on = tiny_train_config(**{"schedule.steps": 4, "model.grad_checkpoint": True})
    rest = train(on, _src(pack), tmp_path / "b", resume=True, verbose=False)
    assert rest.losses == pytest.approx(full.losses[2:], rel=1e-5)


# ---------------------------------------------------------------------------------------------- sinks


def test_tensorboard_event_file_is_written_and_readable(tmp_path, pack):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images, labels = make_images(12, seed=3)
    folder = write_image_folder(tmp_path / "val", images, labels)
    cfg = tiny_train_config(
        **{"schedule.steps": 4, "log_every": 2, "loggers": ["tensorboard"], "ema_decay": 0.5}
    )
    train(cfg, _src(pack), tmp_path / "r", verbose=False, val=str(folder))
    acc = EventAccumulator(str(tmp_path / "r" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "train/lr", "val/top1", "val/loss", "val_ema/top1"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    loss4 = next(r["loss"] for r in recs if r.get("step") == 4 and "loss" in r)
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(loss4, rel=1e-6)
    val = next(r for r in recs if r.get("event") == "val")
    assert acc.Scalars("val/top1")[0].value == pytest.approx(val["val_top1"])


def test_no_tensorboard_without_asking(tmp_path, pack):
    train(tiny_train_config(**{"schedule.steps": 2}), _src(pack), tmp_path / "r", verbose=False)
    assert not (tmp_path / "r" / "tb").exists()


def test_wandb_offline(tmp_path, pack, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_train_config(**{"schedule.steps": 2, "log_every": 1, "loggers": ["wandb"]})
    train(cfg, _src(pack), tmp_path / "r", verbose=False)
    assert (tmp_path / "r" / "wandb-id").is_file()
    assert any((tmp_path / "r" / "wandb").glob("offline-run-*"))


def test_missing_logger_package_is_one_line(tmp_path, pack, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    argv = ["train", "--data", str(pack), "--out", str(tmp_path / "r"), "--steps", "2", "--warmup", "1"]
    code, cap = run_cli([*argv, "--log", "wandb"], capsys)
    assert code == 2 and "pip install wandb" in cap.err and cap.err.strip().count("\n") == 0, cap.err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ host syncs in the loop

SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu")


def _count_syncs(monkeypatch, run) -> collections.Counter:
    """Calls of tensor → host methods made by navit's own code (trainer/, model/, packer/) during
    ``run()``. On CUDA each of them waits for the device; torch's own host-side scalars (AdamW's CPU
    step counter) are not ours and not counted."""
    calls: collections.Counter = collections.Counter()
    ours = tuple(str(ROOT / d) for d in ("trainer", "model", "packer"))
    for name in SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            f = sys._getframe(1).f_code.co_filename
            if f.startswith(ours):
                calls[(_name, Path(f).name)] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        run()
    finally:
        monkeypatch.undo()
    return calls


def test_step_loop_reads_the_device_only_at_sync_points(tmp_path, pack, monkeypatch):
    def run(steps):
        cfg = tiny_train_config(**{"schedule.steps": steps, "log_every": 1000, "data.grad_accum": 2})
        return lambda: train(cfg, _src(pack), tmp_path / f"r{steps}", verbose=False)

    short = _count_syncs(monkeypatch, run(2))
    long = _count_syncs(monkeypatch, run(6))
    # The same reads for 2 and 6 steps (one sync: the end of the run), none per step.
    assert short == long, (short, long)
    assert sum(long.values()) <= 2, long


def test_nonfinite_loss_after_the_last_checkpoint_is_caught_before_the_final_save(
    tmp_path, pack, monkeypatch
):
    import torch.nn.functional as F

    real = F.cross_entropy
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(F, "cross_entropy", flaky)
    cfg = tiny_train_config(**{"schedule.steps": 8, "checkpoint.every": 4, "log_every": 1000})
    with pytest.raises(NavitError, match=r"loss is nan at step 5 .*last good checkpoint: .*step-00000004"):
        train(cfg, _src(pack), tmp_path / "n", verbose=False)
    # the weights after step 5 are never saved: the sync before the final checkpoint stops the run
    assert [p.name for p in ck.list_checkpoints(tmp_path / "n")] == ["step-00000004"]
