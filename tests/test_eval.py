"""`navit eval`: accuracy of a trained checkpoint on an image folder at two resolutions and on a
pack, as a table, JSON and a plot; bad arguments are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import run_cli, trained_run, write_image_folder

from packer.errors import NavitError
from trainer.evaluate import parse_resolutions, target_grid


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads that
    # spin-wait for each other make every op many times slower: use one, restore afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_eval_two_resolutions_json_and_plot(tmp_path_factory, tmp_path, capsys):
    t = trained_run(tmp_path_factory)
    folder = write_image_folder(tmp_path / "val", t["val_images"], t["val_labels"])
    plot = tmp_path / "acc.png"
    code, cap = run_cli(
        ["eval", str(folder), "--checkpoint", str(t["run"]), "--resolutions", "32,native", "--json"]
        + ["--plot", str(plot), "--device", "cpu"],
        capsys,
    )
    assert code == 0, cap.err
    out = json.loads(cap.out)
    res = {r["resolution"]: r for r in out["results"]}
    assert set(res) == {"32", "native"}
    assert all(r["images"] == 80 for r in res.values())
    # At native size (the training distribution: 16-32 px sides) the 4-class model is far above the
    # 25% of chance; top-5 with 4 classes is always 100%.
    assert res["native"]["top1"] >= 0.8
    assert res["native"]["top5"] == 1.0
    # Resizing so the longer side is 32 px changes the token count of images smaller than that.
    assert res["32"]["tokens_per_image"] > res["native"]["tokens_per_image"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, cap = run_cli(["eval", str(t["pack"]), "--checkpoint", str(t["run"]), "--device", "cpu"], capsys)
    assert code == 0, cap.err
    assert "pack" in cap.out and "top-1" in cap.out


def test_eval_bad_arguments(tmp_path, capsys):
    code, cap = run_cli(["eval", str(tmp_path), "--checkpoint", str(tmp_path / "none")], capsys)
    assert code == 2 and "not a checkpoint directory" in cap.err and cap.err.strip().count("\n") == 0
    with pytest.raises(NavitError, match="'big'"):
        parse_resolutions("64,big")


def test_target_grid_caps_tokens_and_keeps_aspect():
    assert target_grid(100, 200, 64, 16, 1024) == (2, 4)
    assert target_grid(100, 200, None, 16, 1024) == (6, 12)
    gh, gw = target_grid(3000, 1000, None, 16, 64)
    assert gh * gw <= 64 and gh > gw
    assert target_grid(5, 5, 8, 16, 64) == (1, 1)


def test_square_resolution_squashes_every_image_to_the_same_grid(tmp_path):
    """sqN: every image becomes N x N pixels whatever its aspect ratio (a plain ViT's resize);
    a longer-side size keeps the aspect ratio, so the same images get different grids."""
    import numpy as np
    from train_fixtures import write_image_folder

    from model import NaViT, NaViTConfig
    from trainer.evaluate import Square, evaluate_folder, square_grid

    assert parse_resolutions("64,sq32,native") == [64, Square(32), None]
    assert str(Square(32)) == "sq32"
    with pytest.raises(NavitError, match="'sq0'"):
        parse_resolutions("sq0")
    assert square_grid(32, 16, 1024) == (2, 2)
    assert square_grid(1000, 16, 64) == (8, 8)  # capped at the token budget
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(16, 64), (64, 16), (40, 40)]]
    folder = write_image_folder(tmp_path / "val", images, [0, 1, 2])
    net = NaViT(NaViTConfig(patch_size=8, dim=16, depth=1, heads=1, num_classes=4)).eval()
    sq, keep = evaluate_folder(net, folder, [Square(32), 32], patch=8, seq_len=64, device=torch.device("cpu"))
    assert (sq.resolution, sq.images, sq.tokens_per_image) == ("sq32", 3, 16.0)  # 4 x 4 grids
    assert keep.resolution == "32" and keep.tokens_per_image == (4 * 1 + 1 * 4 + 4 * 4) / 3
