"""`navit eval` names every file it could not evaluate, with the reason (issue 20: it printed only
"(3 undecodable files skipped)", called a decompression bomb undecodable, had no count in --json,
and exited 0 with a 0-image table when nothing could be evaluated)."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_images import bad_files, write_files
from train_fixtures import CLASSES, make_images, run_cli, tiny_train_config, write_image_folder, write_pack


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A one-step run of the tiny model (its weights do not matter here, only that it loads)."""
    from trainer.data import open_source
    from trainer.loop import train

    base = tmp_path_factory.mktemp("evalrej")
    images, labels = make_images(16, seed=3)
    pack = write_pack(base / "pack", images, labels)
    cfg = tiny_train_config(**{"schedule.steps": 1, "schedule.warmup_steps": 0})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, lambda info: open_source(str(pack), batch_size=2, seed=0), base / "run", verbose=False)
    finally:
        torch.set_num_threads(n)
    return base / "run"


BAD = {k: v for k, v in bad_files().items() if k in ("text.jpg", "truncated.jpg", "bomb.png", "zero.jpg")}


def test_rejected_files_are_listed_with_reasons(checkpoint, tmp_path, capsys):
    images, labels = make_images(4, seed=5)
    folder = write_image_folder(tmp_path / "val", images, labels)
    write_files(folder / CLASSES[0], BAD)
    argv = ["eval", str(folder), "--checkpoint", str(checkpoint), "--resolutions", "16,native"]
    argv += ["--device", "cpu"]

    code, cap = run_cli([*argv, "--json"], capsys)
    assert code == 0, cap.err
    out = json.loads(cap.out)
    assert (out["images_listed"], out["images_rejected"]) == (8, 4)
    assert all(r["images"] == 4 for r in out["results"])
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in out["rejected"]}
    assert set(reasons) == set(BAD)
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert reasons["zero.jpg"] == "zero-byte file"
    assert reasons["truncated.jpg"].startswith("corrupt or truncated")

    code, cap = run_cli(argv, capsys)
    assert code == 0, cap.err
    assert "4 of 8 files rejected" in cap.out
    for name in BAD:
        assert name in cap.out
    assert "decompression bomb" in cap.out and "undecodable" not in cap.out


def test_nothing_evaluable_is_an_error(checkpoint, tmp_path, capsys):
    folder = tmp_path / "val"
    write_files(folder / CLASSES[0], BAD)
    code, cap = run_cli(["eval", str(folder), "--checkpoint", str(checkpoint), "--device", "cpu"], capsys)
    err = cap.err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "none of the 4 images could be evaluated" in err and "decompression bomb" in err
    assert "top-1" not in cap.out
