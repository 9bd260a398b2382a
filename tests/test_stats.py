"""`navit stats`: numbers equal hand computation from the fixture's inputs, JSON keys, index/shard
disagreements detected, pixel bytes never read, comparison and plot."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from packfixture import FixImage, random_image, write_pack
from typer.testing import CliRunner

from cli.main import app
from packer import schema
from packer.analysis.load import load_pack
from packer.analysis.stats import build_report, compute_stats

SEQ_LEN, P = 16, 2
CLASSES = ["circle", "square", "stripes"]
# (grid_h, grid_w, label, kept token indices or None, native (h, w))
SPEC = [
    (2, 3, 0, None, (40, 60)),
    (3, 3, 1, [0, 2, 4, 8], (30, 31)),
    (1, 4, 1, None, (8, 33)),
    (4, 2, 2, [1, 2, 3, 5, 7], (100, 50)),
    (2, 2, -1, None, None),
    (4, 4, 0, None, (64, 64)),
]
EPOCHS = [[[0, 1], [2, 3], [4], [5]], [[3, 0, 4], [1, 2], [5]]]
REJECTED = [
    ("a.jpg", "cannot decode: truncated file"),
    ("b.png", "cannot decode: not an image"),
    ("c", "empty"),
]


def kept_len(i: int) -> int:
    gh, gw, _, keep, _ = SPEC[i]
    return gh * gw if keep is None else len(keep)


def make(out: Path, shard_rows: int = 2) -> Path:
    rng = np.random.default_rng(7)
    images: list[FixImage] = [
        random_image(rng, gh, gw, P, label=lab, keep=None if k is None else np.array(k), orig_hw=o)
        for gh, gw, lab, k, o in SPEC
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_pack(out, images, EPOCHS, SEQ_LEN, P, shard_rows=shard_rows, rejected=REJECTED, classes=CLASSES)
    return out


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("stats") / "pack")


@pytest.fixture
def fresh(tmp_path, pack) -> Path:
    """A private copy to tamper with."""
    return Path(shutil.copytree(pack, tmp_path / "copy"))


def run(*args: str):
    return CliRunner().invoke(app, ["stats", *args])


def test_report_equals_hand_computation(pack):
    rep = compute_stats(str(pack))
    rows = [r for e in EPOCHS for r in e]
    real = [sum(kept_len(i) for i in r) for r in rows]
    n_packed = sum(len(r) for r in rows)
    assert rep["sequences"] == len(rows) == 7
    assert rep["real_tokens"] == sum(real)
    assert rep["padding_tokens"] == len(rows) * SEQ_LEN - sum(real)
    assert rep["padding_fraction"] == pytest.approx(1 - sum(real) / (len(rows) * SEQ_LEN))
    lb = sum(math.ceil(sum(kept_len(i) for r in e for i in r) / SEQ_LEN) for e in EPOCHS)
    assert rep["lower_bound_sequences"] == lb
    assert rep["excess_over_lower_bound"] == pytest.approx((len(rows) - lb) / lb)
    assert rep["images_packed"] == rep["images_planned"] == n_packed
    assert rep["images_rejected"] == len(REJECTED) * len(EPOCHS)
    assert rep["images_in"] == n_packed + len(REJECTED) * len(EPOCHS)
    assert rep["rejected_by_reason"] == {"cannot decode": 4, "empty": 2}
    ips = [len(r) for r in rows]
    assert rep["images_per_seq"]["mean"] == pytest.approx(np.mean(ips))
    assert (rep["images_per_seq"]["min"], rep["images_per_seq"]["max"]) == (1, 3)
    assert rep["images_per_seq"]["histogram"] == {"values": [1, 2, 3], "counts": [3, 3, 1]}
    kept = [kept_len(i) for r in rows for i in r]
    assert rep["tokens_per_image"]["mean"] == pytest.approx(np.mean(kept))
    assert sum(rep["tokens_per_image"]["histogram"]["counts"]) == n_packed
    drops = [1 - kept_len(i) / (SPEC[i][0] * SPEC[i][1]) for r in rows for i in r]
    assert rep["drop_rate"]["mean"] == pytest.approx(np.mean(drops))
    assert rep["drop_rate"]["max"] == pytest.approx(1 - 4 / 9)
    assert rep["dropped_tokens"] == sum(SPEC[i][0] * SPEC[i][1] - kept_len(i) for r in rows for i in r)
    # Labels by class name, counted over every packed (image, epoch).
    expect: dict[str, int] = {}
    for r in rows:
        for i in r:
            name = "unlabeled" if SPEC[i][2] < 0 else CLASSES[SPEC[i][2]]
            expect[name] = expect.get(name, 0) + 1
    assert rep["labels"] == expect
    # Sampled = grid · patch; native from images.parquet (the fixture defaults to the planned size).
    sampled = [math.sqrt(SPEC[i][0] * P * SPEC[i][1] * P) for r in rows for i in r]
    native = [math.sqrt(math.prod(SPEC[i][4] or (SPEC[i][0] * P, SPEC[i][1] * P))) for r in rows for i in r]
    assert rep["resolution"]["sampled_side_px"]["mean"] == pytest.approx(np.mean(sampled))
    assert rep["resolution"]["native_side_px"]["mean"] == pytest.approx(np.mean(native))
    assert rep["aspect_ratio"]["sampled"]["max"] == pytest.approx(4.0)  # the 1x4 grid
    assert rep["aspect_ratio"]["native"]["min"] == pytest.approx(0.5)  # 100 x 50
    # Per epoch.
    assert [e["epoch"] for e in rep["per_epoch"]] == [0, 1]
    for e, rows_e in zip(rep["per_epoch"], EPOCHS, strict=True):
        tok = sum(kept_len(i) for r in rows_e for i in r)
        assert e["sequences"] == len(rows_e)
        assert e["real_tokens"] == tok
        assert e["lower_bound_sequences"] == math.ceil(tok / SEQ_LEN)
        assert e["shards"] == math.ceil(len(rows_e) / 2)
    assert rep["consistency"] == {"ok": True, "problems": []}


def test_cli_text_and_json_keys(pack):
    res = run(str(pack))
    assert res.exit_code == 0, res.output
    assert "consistency: OK" in res.output and "padding" in res.output
    res = run(str(pack), "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    plan_keys = {
        "seq_len",
        "images_in",
        "images_planned",
        "images_rejected",
        "rejected_by_reason",
        "sequences",
        "real_tokens",
        "padding_tokens",
        "padding_fraction",
        "lower_bound_sequences",
        "excess_over_lower_bound",
        "images_per_seq",
        "tokens_per_image",
    }
    stats_keys = {"drop_rate", "resolution", "aspect_ratio", "labels", "per_epoch", "consistency", "dir"}
    assert plan_keys | stats_keys <= rep.keys()
    assert {"mean", "min", "max"} <= rep["images_per_seq"].keys()


def test_several_dirs_compare_side_by_side(tmp_path, pack):
    other = make(tmp_path / "other", shard_rows=3)
    res = run(str(pack), str(other))
    assert res.exit_code == 0, res.output
    assert "[1]" in res.output and "[2]" in res.output and str(other) in res.output
    row = next(line for line in res.output.splitlines() if line.startswith("sequences"))
    assert row.split()[1:] == ["7", "7"]
    res = run(str(pack), str(other), "--json")
    obj = json.loads(res.output)
    assert set(obj) == {str(pack), str(other)}
    assert obj[str(other)]["shards"] == 3  # 4 rows → 2 shards, 3 rows → 1 shard


def test_tampered_index_totals_are_reported(fresh):
    index = json.loads((fresh / "index.json").read_text())
    index["totals"]["sequences"] += 1
    index["shards"][1]["real_tokens"] += 3
    index["per_epoch"][1]["images_packed"] -= 1
    (fresh / "index.json").write_bytes(schema.dumps_index(index))
    res = run(str(fresh))
    assert res.exit_code == 1
    assert "WARNING" in res.output
    problems = compute_stats(str(fresh))["consistency"]["problems"]
    assert any("totals.sequences" in p for p in problems)
    assert any("shard-000001" in p and "real_tokens" in p for p in problems)
    assert any("per_epoch[1].images_packed" in p for p in problems)


def test_deleted_row_is_reported(fresh):
    # Rewrite shard 0 without its last row (index.json and images.parquet still claim it).
    f = fresh / schema.shard_file_name(0)
    table = pq.read_table(f)
    f.write_bytes(schema.table_to_parquet_bytes(table.slice(0, table.num_rows - 1)))
    problems = compute_stats(str(fresh))["consistency"]["problems"]
    assert any("shard-000000" in p and "rows=2" in p for p in problems)
    assert any("totals.sequences" in p for p in problems)
    assert any("images.parquet places" in p for p in problems)
    assert run(str(fresh)).exit_code == 1


def test_images_parquet_misplacement_is_reported(fresh):
    t = pq.read_table(fresh / schema.IMAGES_FILE)
    ids = t.column("image_id").to_numpy().copy()
    packed = np.flatnonzero(t.column("shard").to_numpy() >= 0)
    ids[packed[0]], ids[packed[1]] = ids[packed[1]], ids[packed[0]]
    t = t.set_column(t.schema.get_field_index("image_id"), "image_id", pa.array(ids, pa.int64()))
    pq.write_table(t, fresh / schema.IMAGES_FILE)
    problems = compute_stats(str(fresh))["consistency"]["problems"]
    assert any("placements that disagree" in p and ": 2 (" in p for p in problems)


def test_missing_shard_and_rejected_mismatch(fresh):
    (fresh / schema.shard_file_name(3)).unlink()
    with (fresh / schema.REJECTED_FILE).open("a") as f:
        f.write(json.dumps({"path": "extra", "reason": "x", "epoch": 0}) + "\n")
    problems = compute_stats(str(fresh))["consistency"]["problems"]
    assert any("shard-000003" in p and "cannot be read" in p for p in problems)
    assert any("rejected.jsonl has 7" in p for p in problems)


def test_stats_never_reads_pixel_bytes(fresh, monkeypatch):
    # Overwrite every page of every shard's `patches` column with garbage: a reader touching pixel
    # bytes fails (checked below), stats must not.
    for entry in json.loads((fresh / "index.json").read_text())["shards"]:
        f = fresh / entry["file"]
        md = pq.ParquetFile(f).metadata
        buf = bytearray(f.read_bytes())
        for g in range(md.num_row_groups):
            c = md.row_group(g).column(0)
            assert c.path_in_schema == "patches"
            buf[c.data_page_offset : c.data_page_offset + c.total_compressed_size] = b"\xff" * (
                c.total_compressed_size
            )
        f.write_bytes(bytes(buf))
    with pytest.raises(OSError):
        pq.read_table(fresh / schema.shard_file_name(0), columns=["patches"])
    # And no Parquet read of any shard asks for all columns or for `patches`.
    seen: list = []
    orig = pq.ParquetFile.read

    def spy(self, columns=None, **kw):
        seen.append(columns)
        return orig(self, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read", spy)
    rep = compute_stats(str(fresh), verify=False)
    assert rep["consistency"]["ok"], rep["consistency"]
    assert rep["sequences"] == 7
    assert seen and all(c is not None and "patches" not in c for c in seen)
    # By default stats also hashes every shard (a byte stream, not a Parquet read): the damage shows.
    problems = compute_stats(str(fresh))["consistency"]["problems"]
    assert problems and all("checksum mismatch" in p for p in problems), problems


def test_not_a_pack_is_one_line_error(tmp_path):
    from packer.errors import DataError

    with pytest.raises(DataError, match="no index.json"):
        load_pack(str(tmp_path))


def test_plot_png(tmp_path, pack):
    out = tmp_path / "stats.png"
    res = run(str(pack), "--plot", str(out))
    assert res.exit_code == 0, res.output
    from PIL import Image

    from packer.analysis.plots import DPI, FIGSIZE

    with Image.open(out) as im:
        assert im.size == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
        # Not a blank canvas: panels draw in several colours.
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 10


def test_report_of_empty_pack(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    write_pack(out, [], [[]], SEQ_LEN, P, rejected=[("x.jpg", "cannot decode: bad")])
    rep = build_report(load_pack(str(out)))
    assert rep["sequences"] == 0 and rep["images_rejected"] == 1 and rep["consistency"]["ok"]
