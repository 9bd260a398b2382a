"""`navit pack` (packer.build.pipeline / packer.build.layout): round trip, schema, accounting,
determinism across worker counts, resume, refusal, multi-epoch layout and live mode.

Plans are built by hand here (``hand_plan``: header sizes, a fixed target side, seeded drops, next-fit)
so these tests exercise the pipeline on its own; the real planner is covered by its own tests and by
the CLI test at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_images import messy_image_folder
from PIL import Image, ImageOps

from packer import schema
from packer.build import decode
from packer.build.execute import stream_epoch
from packer.build.pipeline import pack
from packer.config import PackConfig
from packer.errors import NavitError
from packer.plan.types import Plan, Rejection

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # starts Ray and its workers (10-30 s on 2 busy cores)

SEQ_LEN, P = 64, 16


def hand_plan(root: str, cfg: PackConfig, epoch: int, side: int = 64, drop: bool = True) -> Plan:
    """A small deterministic plan: longer side drawn in [side/2, 1.25 side] px and up to half the
    tokens dropped (both seeded by seed, epoch, image), next-fit packing. Unreadable headers become
    plan-time rejections."""
    root_p = Path(root)
    files = sorted(p for p in root_p.rglob("*") if p.is_file())
    classes = sorted({p.relative_to(root_p).parts[0] for p in files})
    p, L = cfg.packing.patch_size, cfg.packing.seq_len
    ok, rejected = [], []
    for iid, f in enumerate(files):
        rel = f.relative_to(root_p).as_posix()
        label = classes.index(rel.split("/")[0])
        try:
            with Image.open(f) as im:
                w, h = im.size
                if decode.exif_orientation(im) in (5, 6, 7, 8):
                    w, h = h, w
        except Exception as e:
            rejected.append(Rejection(iid, str(f), f"unreadable header ({type(e).__name__})", label))
            continue
        rng = np.random.default_rng([cfg.seed, epoch, iid])
        s = int(rng.integers(side // 2, side + side // 4 + 1)) / max(w, h)  # a fresh size every epoch
        gh, gw = max(1, round(h * s / p)), max(1, round(w * s / p))
        nf = gh * gw
        nk = max(1, nf - int(rng.integers(0, nf // 2 + 1))) if drop else nf
        ok.append((iid, str(f), rel, label, h, w, gh, gw, nf, nk))
    seqs: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for k, r in enumerate(ok):
        if cur and (used + r[9] > L or len(cur) >= cfg.packing.max_images_per_seq):
            seqs.append(cur)
            cur, used = [], 0
        cur.append(k)
        used += r[9]
    if cur:
        seqs.append(cur)
    offsets = np.zeros(len(seqs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])

    def col(j: int, dt: type) -> np.ndarray:
        return np.array([r[j] for r in ok], dt)

    return Plan(
        epoch=epoch,
        seq_len=L,
        patch_size=p,
        image_id=col(0, np.int64),
        path=[r[1] for r in ok],
        key=[r[2] for r in ok],
        label=col(3, np.int64),
        orig_h=col(4, np.int32),
        orig_w=col(5, np.int32),
        grid_h=col(6, np.int32),
        grid_w=col(7, np.int32),
        n_full=col(8, np.int32),
        n_kept=col(9, np.int32),
        seq_offsets=offsets,
        seq_members=np.array([m for s in seqs for m in s], np.int64),
        rejected=rejected,
        classes=classes,
    )


def make_cfg(**decode_kw) -> PackConfig:
    return PackConfig.model_validate(
        {
            "packing": {"seq_len": SEQ_LEN, "patch_size": P, "max_images_per_seq": 8},
            "output": {"shard_rows": 2, "epochs": 2},
            "decode": decode_kw,
        }
    )


def planner(source: str, cfg: PackConfig, epoch: int) -> Plan:
    return hand_plan(source, cfg, epoch)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def same_schema(got: pa.Schema, expected: pa.Schema) -> bool:
    """Equal types (Parquet renames list children 'item' → 'element', which Arrow ignores) and equal
    format metadata."""
    meta = {k: v for k, v in (got.metadata or {}).items() if not k.startswith(b"ARROW:")}
    return got.remove_metadata().equals(expected.remove_metadata()) and meta == expected.metadata


def shard_rows(out: Path) -> pa.Table:
    index = schema.read_index(str(out))
    return pa.concat_tables(pq.read_table(out / e["file"]) for e in index["shards"])


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("messy")
    return root, messy_image_folder(root, n_good=30, seed=0)


@pytest.fixture(scope="module")
def packed(src, tmp_path_factory, ray_session):
    """The messy folder packed once with one worker (2 epochs, 2 rows per shard)."""
    out = tmp_path_factory.mktemp("pack1") / "out"
    result = pack(str(src[0]), str(out), make_cfg(), workers=1, planner=planner)
    return out, result


# ----------------------------------------------------------------------------------------------------


def test_accounting_every_input_packed_or_rejected_once_per_epoch(src, packed):
    root, files = src
    out, result = packed
    index = schema.read_index(str(out))
    t = index["totals"]
    assert t["images_in"] == t["images_packed"] + t["images_rejected"]
    n_inputs = len(files["good"]) + len(files["bad"])
    assert t["images_in"] == 2 * n_inputs
    images = pq.read_table(out / schema.IMAGES_FILE).to_pylist()
    assert len(images) == 2 * n_inputs
    for epoch in (0, 1):
        rows = [r for r in images if r["epoch"] == epoch]
        rel = sorted(Path(r["path"]).relative_to(root).as_posix() for r in rows)
        assert rel == sorted(files["good"] + files["bad"])  # each input exactly once
        bad = {Path(r["path"]).relative_to(root).as_posix(): r for r in rows if r["rejected_reason"]}
        assert sorted(bad) == files["bad"]  # all bad files rejected, no good file lost
        # The truncated JPEG has a valid header: it is rejected at pack time, with the decoder's reason.
        assert bad["triangle/truncated.jpg"]["rejected_reason"].startswith("corrupt or truncated image")
        assert bad["triangle/truncated.jpg"]["grid_h"] > 0
    assert t["images_rejected_at_pack"] == 2
    rejected = [json.loads(x) for x in (out / schema.REJECTED_FILE).read_text().splitlines()]
    assert len(rejected) == t["images_rejected"]
    assert all(set(r) == {"path", "reason", "epoch"} for r in rejected)
    # Packed images per shard row agree with images.parquet placements.
    table = shard_rows(out)
    assert sum(len(x) for x in table.column("image_ids").to_pylist()) == t["images_packed"]
    assert table.num_rows == t["sequences"]
    assert t["real_tokens"] + t["padding_tokens"] == t["sequences"] * SEQ_LEN


def test_shard_schema_and_layout_invariants(packed):
    out, _ = packed
    index = schema.read_index(str(out))
    assert schema.verify_shards(str(out), index) == []
    expected = schema.shard_schema(SEQ_LEN, P)
    for e in index["shards"]:
        got = pq.read_schema(out / e["file"])
        assert same_schema(got, expected)
        schema.check_schema(got, index)
        assert pq.ParquetFile(out / e["file"]).metadata.num_rows == e["rows"]
    arrays = schema.table_to_arrays(shard_rows(out))
    seg = arrays["segment_ids"]
    for r in range(seg.shape[0]):
        k = len(arrays["image_ids"][r])
        nz = seg[r][seg[r] > 0]
        # segments 1..k contiguous and in order, padding only at the tail, padding pixels zero
        assert np.array_equal(np.unique(nz), np.arange(1, k + 1))
        assert np.all(np.diff(seg[r][: len(nz)]) >= 0)
        assert np.all(seg[r][len(nz) :] == 0)
        assert not arrays["patches"][r][len(nz) :].any()
        assert not arrays["pos_h"][r][len(nz) :].any()
        for j in range(k):
            n = int((seg[r] == j + 1).sum())
            assert 1 <= n <= arrays["tokens_full"][r][j] == arrays["grid_h"][r][j] * arrays["grid_w"][r][j]


def test_round_trip_kept_patches_equal_resized_pixels(packed):
    """Every packed image: its tokens, cut back out of the shard, equal the planned-size image's
    pixels at (pos_h, pos_w) exactly, and the kept positions are the sampled ones."""
    out, _ = packed
    index = schema.read_index(str(out))
    cfg = PackConfig.model_validate(index["config"])
    images = pq.read_table(out / schema.IMAGES_FILE).to_pylist()
    by_place = {(r["shard"], r["row"], r["segment"]): r for r in images if r["rejected_reason"] is None}
    checked = 0
    for s, entry in enumerate(index["shards"]):
        a = schema.table_to_arrays(pq.read_table(out / entry["file"]))
        for r in range(a["patches"].shape[0]):
            for j in range(len(a["image_ids"][r])):
                img = by_place[(s, r, j + 1)]
                assert img["image_id"] == a["image_ids"][r][j]
                gh, gw = img["grid_h"], img["grid_w"]
                sel = a["segment_ids"][r] == j + 1
                ph, pw = a["pos_h"][r][sel].astype(int), a["pos_w"][r][sel].astype(int)
                pixels = decode.load_resized(img["path"], gh, gw, P, cfg.decode)
                # Independent re-patchify: slice each (P, P, 3) block by its position.
                expect = np.stack(
                    [
                        pixels[y * P : (y + 1) * P, x * P : (x + 1) * P].reshape(-1)
                        for y, x in zip(ph, pw, strict=True)
                    ]
                )
                assert np.array_equal(a["patches"][r][sel], expect)
                key = Path(img["path"]).relative_to(Path(img["path"]).parents[1]).as_posix()
                keep = decode.kept_indices(cfg.seed, img["epoch"], key, gh * gw, img["n_tokens"])
                assert np.array_equal(ph * gw + pw, keep)
                checked += 1
    assert checked == index["totals"]["images_packed"]


def test_round_trip_against_plain_pillow(src, tmp_path, ray_session):
    """Without JPEG draft the packed pixels equal a plain-Pillow reference (exif_transpose,
    alpha_composite on white, bicubic resize with the same reducing gap) — no navit decode code."""
    root, files = src
    good = [f for f in files["good"] if f.startswith(("circle/img", "square/img", "triangle/img"))]
    sub = tmp_path / "sub"
    for f in good:
        (sub / f).parent.mkdir(parents=True, exist_ok=True)
        (sub / f).write_bytes((root / f).read_bytes())
    cfg = PackConfig.model_validate(
        {"packing": {"seq_len": SEQ_LEN, "patch_size": P}, "decode": {"jpeg_draft": False}}
    )
    out = tmp_path / "out"
    pack(str(sub), str(out), cfg, workers=1, planner=lambda s, c, e: hand_plan(s, c, e, drop=False))
    arrays = schema.table_to_arrays(shard_rows(out))
    images = {r["image_id"]: r for r in pq.read_table(out / schema.IMAGES_FILE).to_pylist()}
    modes = set()
    for r in range(arrays["patches"].shape[0]):
        for j, iid in enumerate(arrays["image_ids"][r]):
            img = images[int(iid)]
            src_img = Image.open(img["path"])
            modes.add(src_img.mode)
            up = ImageOps.exif_transpose(src_img).convert("RGBA")
            ref = Image.alpha_composite(Image.new("RGBA", up.size, (255, 255, 255, 255)), up).convert("RGB")
            ref = ref.resize(
                (img["grid_w"] * P, img["grid_h"] * P), Image.Resampling.BICUBIC, reducing_gap=3.0
            )
            tokens = arrays["patches"][r][arrays["segment_ids"][r] == j + 1]
            g = np.asarray(ref).reshape(img["grid_h"], P, img["grid_w"], P, 3).swapaxes(1, 2)
            assert np.array_equal(tokens, g.reshape(-1, P * P * 3))
    assert {"RGB", "L"} <= modes


def test_identical_bytes_with_two_workers(src, packed, tmp_path):
    out1, _ = packed
    out2 = tmp_path / "out2"
    pack(str(src[0]), str(out2), make_cfg(), workers=2, planner=planner)
    assert tree(out1) == tree(out2)


def test_epochs_numbered_continuously_with_fresh_draws(packed):
    out, _ = packed
    index = schema.read_index(str(out))
    files = [e["file"] for e in index["shards"]]
    assert files == [schema.shard_file_name(i) for i in range(len(files))]
    epochs = [e["epoch"] for e in index["shards"]]
    assert epochs == sorted(epochs) and set(epochs) == {0, 1}
    assert [pe["epoch"] for pe in index["per_epoch"]] == [0, 1]
    images = pq.read_table(out / schema.IMAGES_FILE).to_pandas()
    ok = images[images.rejected_reason.isna()]
    for col in ("n_tokens_full", "n_tokens"):
        per_epoch = ok.pivot(index="image_id", columns="epoch", values=col)
        assert (per_epoch[0] != per_epoch[1]).any()  # epoch 1 drew other sizes / drop rates


def test_resume_rebuilds_only_missing_or_corrupt(src, packed, tmp_path):
    import shutil

    out1, _ = packed
    out = tmp_path / "resumed"
    shutil.copytree(out1, out)
    reference = tree(out1)
    n_shards = len(schema.read_index(str(out))["shards"])
    # A killed run: no index, one shard missing, one corrupt, a half-written temp file, a lost sidecar.
    (out / schema.INDEX_FILE).unlink()
    (out / schema.shard_file_name(1)).unlink()
    corrupt = out / schema.shard_file_name(2)
    data = bytearray(corrupt.read_bytes())
    data[100] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    (out / "shards" / "shard-000003.parquet.tmp-deadbeef").write_bytes(b"partial")
    (out / ".navit-pack" / "shard-000004.json").unlink()
    (out / schema.IMAGES_FILE).write_bytes(b"stale")
    result = pack(str(src[0]), str(out), make_cfg(), workers=2, resume=True, planner=planner)
    assert result.shards_built == 3 and result.shards_reused == n_shards - 3
    assert tree(out) == reference


def test_refuses_foreign_or_mismatched_directories(src, packed, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(NavitError, match="not empty and is not a navit pack"):
        pack(str(src[0]), str(foreign), make_cfg(), planner=planner)
    with pytest.raises(NavitError, match="not empty and is not a navit pack"):
        pack(str(src[0]), str(foreign), make_cfg(), resume=True, planner=planner)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # untouched
    out1, _ = packed
    other = make_cfg().model_copy(update={"seed": 7})
    with pytest.raises(NavitError, match="different config"):
        pack(str(src[0]), str(out1), other, resume=True, planner=planner)
    with pytest.raises(NavitError, match="pass --resume"):
        pack(str(src[0]), str(out1), make_cfg(), planner=planner)
    assert (out1 / schema.INDEX_FILE).exists()  # a refusal changes nothing


def test_live_stream_equals_written_shards(src, packed):
    out, _ = packed
    cfg = make_cfg()
    index = schema.read_index(str(out))
    for epoch in (0, 1):
        plan = hand_plan(str(src[0]), cfg, epoch)
        seen = []
        # Epoch 1 with another unit of work: the rows are the same, only batch boundaries move.
        rows_per_task = None if epoch == 0 else 3
        batches = list(
            stream_epoch(plan, cfg, epoch, workers=2, on_shard=seen.append, shard_rows=rows_per_task)
        )
        assert all(same_schema(b.schema, schema.shard_schema(SEQ_LEN, P)) for b in batches)
        assert all(b.num_rows <= schema.ROW_GROUP_ROWS for b in batches)
        live = pa.Table.from_batches(batches)
        files = [e["file"] for e in index["shards"] if e["epoch"] == epoch]
        written = pa.concat_tables(pq.read_table(out / f) for f in files)
        assert live.equals(written, check_metadata=True)
        assert sum(r.images for r in seen) == sum(len(x) for x in written.column("image_ids").to_pylist())


def test_cli_pack_with_the_real_planner(tmp_path, ray_session):
    """`navit pack` end to end: synth folder → pack → summary; refusal without --resume; a resume of
    a complete pack verifies every shard and rebuilds none."""
    from typer.testing import CliRunner

    from cli.main import app
    from packer.synth import generate

    generate(tmp_path / "img", n=18, seed=1, threads=1)
    (tmp_path / "img" / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    args = ["pack", str(tmp_path / "img"), "--out", str(out), "--seq-len", "64", "--patch-size", "16"]
    args += ["--resolution", "uniform:32:96", "--token-drop", "constant:0.25", "--shard-rows", "2"]
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "19 in = 18 packed + 1 rejected" in res.output
    index = schema.read_index(str(out))
    assert index["config"]["token_drop"]["kind"] == "constant"
    assert index["classes"] == ["checker", "circle", "cross", "square", "stripes", "triangle"]
    assert schema.verify_shards(str(out), index) == []
    before = tree(out)
    res = runner.invoke(app, args)
    assert isinstance(res.exception, NavitError) and "--resume" in str(res.exception)
    res = runner.invoke(app, [*args, "--resume", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert f"0 built, {len(index['shards'])} verified and kept" in res.output
    assert tree(out) == before


def test_live_row_range_and_epoch_rows(src, packed):
    """stream_epoch(start_row, stop_row) gives exactly those rows of the written epoch, building only
    the shards that overlap; epoch_rows is the epoch's row count."""
    from packer.build.execute import epoch_rows

    out, _ = packed
    cfg = make_cfg()
    index = schema.read_index(str(out))
    plan = hand_plan(str(src[0]), cfg, 1)
    written = pa.concat_tables(pq.read_table(out / e["file"]) for e in index["shards"] if e["epoch"] == 1)
    assert epoch_rows(plan, cfg, 1) == written.num_rows
    seen = []
    lo, hi = 3, written.num_rows - 2
    live = pa.Table.from_batches(
        list(stream_epoch(plan, cfg, 1, start_row=lo, stop_row=hi, on_shard=seen.append))
    )
    assert live.equals(written.slice(lo, hi - lo))
    assert len(seen) == (hi - 1) // 2 - lo // 2 + 1  # 2 rows per shard: only overlapping shards built
    assert list(stream_epoch(plan, cfg, 1, start_row=written.num_rows)) == []
