"""`navit train --val`: held-out numbers logged during training equal `navit eval` on the same
checkpoint (image folder and pack), `checkpoints/best` keeps the best held-out top-1, and a bad
`--val` is a one-line error."""

from __future__ import annotations

import json
import re

import pytest
import torch
from train_fixtures import make_images, run_cli, tiny_train_config, write_image_folder, write_pack

from packer.errors import NavitError
from trainer import checkpoint as ck
from trainer.data import open_source
from trainer.loop import train


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("val")
    images, labels = make_images(96, seed=5)
    val_images, val_labels = make_images(40, seed=9)
    return {
        "pack": write_pack(base / "pack", images, labels, seq_len=64, shard_rows=6),
        "folder": write_image_folder(base / "heldout", val_images, val_labels),
        "val_pack": write_pack(base / "val_pack", val_images, val_labels, seq_len=64, shard_rows=4),
    }


def _records(run, event="val"):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("event") == event]


def _eval(capsys, source, checkpoint, *extra):
    argv = ["eval", str(source), "--checkpoint", str(checkpoint), "--device", "cpu", "--json", *extra]
    code, cap = run_cli(argv, capsys)
    assert code == 0, cap.err
    return json.loads(cap.out)


def test_val_numbers_equal_navit_eval_and_best_is_kept(tmp_path, data, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", str(data["pack"]), "--out", str(run), "--val", str(data["folder"])]
    argv += ["--steps", "12", "--batch-size", "4", "--warmup", "2", "--lr", "3e-3", "--device", "cpu"]
    argv += ["--set", 'model.overrides={"depth": 2, "dim": 64, "heads": 2}', "--eval-every", "4"]
    argv += ["--checkpoint-every", "4", "--set", "checkpoint.keep=5"]
    code, cap = run_cli(argv, capsys)
    assert code == 0, cap.err
    vals = _records(run)
    assert [r["step"] for r in vals] == [4, 8, 12]
    assert all(r["val_images"] == 40 and r["val_resolution"] == "native" for r in vals)
    assert re.search(r"val +4/12 +top-1", cap.err) and "best held-out top-1" in cap.err
    # Every evaluation equals `navit eval` of the checkpoint of that step, to the last bit.
    for r in vals:
        out = _eval(
            capsys, data["folder"], run / "checkpoints" / f"step-{r['step']:08d}", "--resolutions", "native"
        )
        (res,) = out["results"]
        assert (res["top1"], res["top5"], res["loss"], res["images"]) == (
            r["val_top1"],
            r["val_top5"],
            r["val_loss"],
            r["val_images"],
        )
    # best = the first evaluation with the highest top-1; its checkpoint is a full copy of that step.
    top = max(r["val_top1"] for r in vals)
    first = next(r for r in vals if r["val_top1"] == top)
    best = ck.load_checkpoint(run / "checkpoints" / "best")
    assert best.step == first["step"] and best.meta["val"]["top1"] == top
    same = ck.load_checkpoint(run / "checkpoints" / f"step-{first['step']:08d}")
    assert all(torch.equal(best.weights[k], same.weights[k]) for k in same.weights)
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000004", "step-00000008", "step-00000012"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_top1"] == top and summary["best_step"] == first["step"]
    assert vals[-1]["best_val_top1"] == top
    # navit eval of the run still picks the newest step checkpoint, not best
    assert _eval(capsys, data["folder"], run, "--resolutions", "native")["step"] == 12


def test_val_on_a_pack_equals_navit_eval_of_the_pack(tmp_path, data, capsys):
    cfg = tiny_train_config(**{"schedule.steps": 6, "eval_every": 3})
    src = lambda info: open_source(str(data["pack"]), batch_size=4, seed=0)  # noqa: E731
    result = train(cfg, src, tmp_path / "r", verbose=False, val=str(data["val_pack"]))
    vals = _records(tmp_path / "r")
    assert [r["step"] for r in vals] == [3, 6] and all(r["val_resolution"] == "pack" for r in vals)
    (res,) = _eval(capsys, data["val_pack"], tmp_path / "r")["results"]
    assert (res["top1"], res["loss"], res["images"]) == (vals[-1]["val_top1"], vals[-1]["val_loss"], 40)
    assert result.best_val_top1 == max(r["val_top1"] for r in vals)


def test_bad_val_is_one_line(tmp_path, data, capsys):
    argv = [
        "train",
        "--data",
        str(data["pack"]),
        "--out",
        str(tmp_path / "r"),
        "--steps",
        "2",
        "--warmup",
        "1",
    ]
    code, cap = run_cli([*argv, "--val", str(tmp_path / "nope")], capsys)
    assert code == 2 and "--val" in cap.err and cap.err.strip().count("\n") == 0, cap.err
    assert not (tmp_path / "r").exists()
    # a folder whose class folders are not the training classes
    (tmp_path / "odd" / "zebra").mkdir(parents=True)
    cfg = tiny_train_config(**{"schedule.steps": 2})
    src = lambda info: open_source(str(data["pack"]), batch_size=4, seed=0)  # noqa: E731
    with pytest.raises(NavitError, match="no images|not classes"):
        train(cfg, src, tmp_path / "r2", verbose=False, val=str(tmp_path / "odd"))


def test_val_folder_files_that_cannot_be_scored_are_listed_with_reasons(tmp_path, data):
    import shutil

    folder = tmp_path / "heldout"
    shutil.copytree(data["folder"], folder)
    cls = sorted(p for p in folder.iterdir() if p.is_dir())[0]
    (cls / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = tiny_train_config(**{"schedule.steps": 2, "eval_every": 0})
    src = lambda info: open_source(str(data["pack"]), batch_size=4, seed=0)  # noqa: E731
    run = tmp_path / "r"
    train(cfg, src, run, verbose=False, val=str(folder))
    (val,) = _records(run)
    assert val["val_images"] == 40 and val["val_skipped"] == 1
    (rec,) = [json.loads(line) for line in (run / "val_rejected.jsonl").read_text().splitlines()]
    assert rec["path"].endswith("broken.png") and rec["reason"]
    # a clean held-out folder: the list exists and is empty
    train(cfg, src, tmp_path / "r2", verbose=False, val=str(data["folder"]))
    assert (tmp_path / "r2" / "val_rejected.jsonl").read_text() == ""
