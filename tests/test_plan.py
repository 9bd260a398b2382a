"""The planner end to end on generated images: every input planned or rejected, sequences within
limits, deterministic across runs, Ray worker counts and partitions; the report and `navit plan`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures_images import messy_image_folder

from packer.analysis.report import plan_report, render_table, render_text
from packer.config import PackConfig
from packer.errors import NavitError
from packer.plan import binpack
from packer.plan.planner import make_plan, pack_partitioned, plan_source, scan_source
from packer.plan.types import Plan

ARRAYS = (
    "image_id",
    "label",
    "orig_h",
    "orig_w",
    "grid_h",
    "grid_w",
    "n_full",
    "n_kept",
    "seq_offsets",
    "seq_members",
)


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("messy")
    files = messy_image_folder(root, n_good=30)
    (root / "notes.txt").write_text("not an input")
    (root / "circle" / ".DS_Store").write_bytes(b"\0")
    return root, files


def _cfg(**kw) -> PackConfig:
    base = {
        "resolution": {"kind": "uniform", "lo": 32, "hi": 160},
        "packing": {"seq_len": 64, "max_images_per_seq": 5},
    }
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v}
    return PackConfig.model_validate(base)


def assert_valid(plan: Plan, cfg: PackConfig, images_in: int) -> None:
    n = len(plan.image_id)
    # Every input exactly once: planned or rejected.
    ids = np.concatenate([plan.image_id, [r.image_id for r in plan.rejected]]).astype(np.int64)
    np.testing.assert_array_equal(np.sort(ids), np.arange(images_in))
    # Every planned image in exactly one sequence.
    np.testing.assert_array_equal(np.sort(plan.seq_members), np.arange(n))
    assert plan.seq_offsets[0] == 0 and plan.seq_offsets[-1] == n and (np.diff(plan.seq_offsets) >= 1).all()
    for s in range(plan.num_sequences):
        m = plan.sequence(s)
        assert len(m) <= cfg.packing.max_images_per_seq
        assert int(plan.n_kept[m].sum()) <= cfg.packing.seq_len
    assert (plan.n_full == plan.grid_h * plan.grid_w).all()
    assert (plan.n_kept >= 1).all() and (plan.n_kept <= plan.n_full).all()
    assert (plan.n_full <= cfg.packing.token_cap).all()


def assert_same(a: Plan, b: Plan) -> None:
    for f in ARRAYS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert a.path == b.path and a.key == b.key and a.rejected == b.rejected and a.classes == b.classes


def test_messy_folder_is_fully_accounted(messy) -> None:
    root, files = messy
    cfg = _cfg()
    scan = scan_source(str(root), cfg, use_ray=False)
    assert scan.images_in == len(files["good"]) + len(files["bad"])  # notes.txt and .DS_Store skipped
    assert {Path(s.path).name for s in scan.listing.skipped} == {"notes.txt", ".DS_Store"}
    plan = make_plan(scan, cfg, epoch=0)
    assert_valid(plan, cfg, scan.images_in)
    rejected = {Path(r.path).name: r.reason for r in plan.rejected}
    # truncated.jpg has a readable header: it is planned, and rejected later by the decoder.
    assert set(rejected) == {"zero.jpg", "text.jpg", "garbage.png", "bomb.png"}
    assert rejected["zero.jpg"] == "zero-byte file"
    assert all(r.label == plan.classes.index("triangle") for r in plan.rejected)
    thin = plan.key.index("square/thin.png")  # 500 x 10 px: 1:50
    assert plan.grid_h[thin] == 1 and plan.grid_w[thin] >= 1

    rep = plan_report(plan, cfg, skipped=scan.listing.skipped)
    assert rep["images_in"] == rep["images_planned"] + rep["images_rejected"] == scan.images_in
    assert rep["sequences"] == plan.num_sequences
    assert rep["real_tokens"] == int(plan.n_kept.sum())
    assert rep["padding_tokens"] == rep["sequences"] * 64 - rep["real_tokens"]
    assert rep["lower_bound_sequences"] == -(-rep["real_tokens"] // 64) <= rep["sequences"]
    assert sum(rep["rejected_by_reason"].values()) == 4 and rep["files_skipped"] == 2
    assert (
        rep["images_per_seq"]["max"] <= 5 and rep["seed"] == 0 and rep["config"]["packing"]["seq_len"] == 64
    )
    json.dumps(rep)
    text = render_text(rep)
    assert "4 rejected" in text and "lower bound" in text
    assert render_table([rep, rep]).count("\n") == 2


def test_plans_are_identical_across_runs_and_depend_on_seed_and_epoch(messy) -> None:
    root, _ = messy
    cfg = _cfg(token_drop={"kind": "beta", "mean": 0.3, "max": 0.6})
    a = plan_source(str(root), cfg, epoch=1)
    assert_same(a, plan_source(str(root), cfg, epoch=1))
    b = plan_source(str(root), cfg, epoch=2)
    assert not np.array_equal(a.n_kept, b.n_kept)
    c = plan_source(str(root), cfg.model_copy(update={"seed": 5}), epoch=1)
    assert not np.array_equal(a.grid_w, c.grid_w)


@pytest.mark.parametrize("packer", ["next-fit", "first-fit", "bfd", "histogram", "stream"])
def test_every_packer_gives_a_valid_plan(messy, packer: str) -> None:
    root, _ = messy
    cfg = _cfg(packing={"packer": packer, "stream_window": 8, "stream_open_bins": 2})
    scan = scan_source(str(root), cfg, use_ray=False)
    assert_valid(make_plan(scan, cfg), cfg, scan.images_in)


def test_exact_fill_closes_gaps_with_dropped_tokens(messy) -> None:
    root, _ = messy
    drop = {"kind": "constant", "rate": 0.5}
    scan = scan_source(str(root), _cfg(), use_ray=False)
    plain = make_plan(scan, _cfg(token_drop=drop))
    cfg = _cfg(token_drop=drop, packing={"exact_fill": True})
    filled = make_plan(scan, cfg)
    assert_valid(filled, cfg, scan.images_in)
    np.testing.assert_array_equal(filled.seq_members, plain.seq_members)  # same bins, more tokens
    assert (filled.n_kept >= plain.n_kept).all() and filled.n_kept.sum() > plain.n_kept.sum()
    for s in range(filled.num_sequences):
        m = filled.sequence(s)
        # Each sequence is full, or it has no dropped token left to give back.
        assert filled.n_kept[m].sum() == 64 or (filled.n_kept[m] == filled.n_full[m]).all()


def test_partitioned_packing_is_the_concatenation_of_partitions() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, 1000)
    cfg = _cfg(packing={"partition_size": 300})
    off, mem = pack_partitioned(lengths, cfg)
    offs, mems, base = [0], [], 0
    for s in range(0, 1000, 300):
        o, m = binpack.pack(lengths[s : s + 300], 64, 5, "bfd")
        offs += (o[1:] + base).tolist()
        mems += (m + s).tolist()
        base += len(m)
    np.testing.assert_array_equal(off, offs)
    np.testing.assert_array_equal(mem, mems)


def test_manifest_plan_rejects_duplicates(messy, tmp_path: Path) -> None:
    root, files = messy
    good = files["good"][:6]
    man = tmp_path / "m.csv"
    man.write_text("path,label\n" + "".join(f"{root / g},{g.split('/')[0]}\n" for g in good + good[:2]))
    cfg = _cfg()
    scan = scan_source(str(man), cfg, use_ray=False)
    plan = make_plan(scan, cfg)
    assert_valid(plan, cfg, 8)
    assert [r.reason for r in plan.rejected] == ["duplicate path in manifest"] * 2


@pytest.mark.slow
def test_plan_identical_for_local_and_ray_with_1_and_2_workers(messy, ray_session) -> None:
    root, _ = messy
    cfg = _cfg(
        token_drop={"kind": "beta", "mean": 0.3, "max": 0.6},
        packing={"partition_size": 7, "exact_fill": True},
    )
    local = make_plan(scan_source(str(root), cfg, use_ray=False), cfg, epoch=0)
    assert_valid(local, cfg, len(local.image_id) + len(local.rejected))
    for workers in (1, 2):
        assert_same(
            make_plan(scan_source(str(root), cfg, use_ray=True, workers=workers), cfg, epoch=0), local
        )


def test_cli_plan_json_and_text(messy) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    root, files = messy
    runner = CliRunner()
    res = runner.invoke(
        app, ["plan", str(root), "--seq-len", "64,128", "--resolution", "uniform:32:128", "--json"]
    )
    assert res.exit_code == 0, res.output
    reps = json.loads(res.stdout)
    assert [r["seq_len"] for r in reps] == [64, 128]
    for r in reps:
        assert (
            r["images_in"]
            == len(files["good"]) + len(files["bad"])
            == r["images_planned"] + r["images_rejected"]
        )
        assert r["config"]["resolution"]["kind"] == "uniform"
    assert reps[1]["sequences"] < reps[0]["sequences"]
    res = runner.invoke(
        app, ["plan", str(root), "--seq-len", "64", "--token-drop", "beta:0.25:0.5", "--exact-fill"]
    )
    assert res.exit_code == 0 and "exact-fill" in res.stdout and "lower bound" in res.stdout
    res = runner.invoke(app, ["plan", str(root / "missing")])
    assert isinstance(res.exception, NavitError) and "source not found" in str(res.exception)
    res = runner.invoke(app, ["plan", str(root), "--seq-len", "0"])
    assert isinstance(res.exception, NavitError)


def test_rows_mix_classes_of_a_class_sorted_folder(tmp_path: Path) -> None:
    """image_ids follow the sorted keys, so an ImageFolder lists its images class by class; packing
    in that order (ties broken by input order) gave rows of one class each. Images go to the packer
    in a seeded random order instead: rows mix classes, and the order differs per epoch."""
    from PIL import Image

    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        for i in range(24):  # all 32x32: every image has the same token count, so ties everywhere
            Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / c / f"{i:02d}.png")
    cfg = PackConfig.model_validate(
        {
            "resolution": {"kind": "native"},
            "packing": {"seq_len": 24, "patch_size": 16, "max_images_per_seq": 6},
        }
    )
    scan = scan_source(str(tmp_path), cfg, use_ray=False)
    plan = make_plan(scan, cfg, epoch=0)
    assert_valid(plan, cfg, 72)
    classes_per_row = [len(set(plan.label[plan.sequence(s)])) for s in range(plan.num_sequences)]
    assert plan.num_sequences == 12  # 6 images of 4 tokens per row
    assert sum(k > 1 for k in classes_per_row) >= 9, classes_per_row
    assert_same(plan, make_plan(scan, cfg, epoch=0))
    assert not np.array_equal(plan.seq_members, make_plan(scan, cfg, epoch=1).seq_members)
