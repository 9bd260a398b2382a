"""Augmentation: pack-time crop + flip (packer.augment, decode, images.parquet, inspect) and
train-time mixup / cutmix (trainer.mixup).

Pack-time draws must respect their configured ranges, be pure functions of (seed, epoch, key), give
byte-identical packs for any worker count, and be recorded well enough that anyone can rebuild an
image's pixels from the source file (checked exactly on PNG fixtures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures_images import EXIF_ORIENTATION, exif_rotated_jpeg, smooth_rgb
from PIL import Image, ImageOps

from packer import decode, schema
from packer.augment import sample_crops
from packer.config import DecodeConfig, PackConfig, parse_crop
from packer.errors import ConfigError

AUG = {"crop_scale": (0.3, 0.9), "crop_ratio": (0.6, 1.5), "hflip": 0.5}


def _cfg(augment: dict | None = None, **packing) -> PackConfig:
    return PackConfig.model_validate(
        {
            "seed": 3,
            "resolution": {"kind": "uniform", "lo": 32, "hi": 80},
            "token_drop": {"kind": "beta", "mean": 0.2, "max": 0.4},
            "packing": {"seq_len": 64, "patch_size": 8, "max_images_per_seq": 8, **packing},
            "augment": augment or {},
            "output": {"shard_rows": 3, "epochs": 2},
        }
    )


def _keys(n: int) -> list[str]:
    return [f"class{i % 3}/img_{i:05d}.png" for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# Draws (pure numpy)
# ----------------------------------------------------------------------------------------------------


def test_crop_draws_respect_scale_and_ratio_ranges_and_fit():
    rng = np.random.default_rng(0)
    n = 4000
    oh = rng.integers(200, 2000, n)
    ow = rng.integers(200, 2000, n)
    c = sample_crops(oh, ow, _keys(n), _cfg(AUG), epoch=0)
    assert (c.x0 >= 0).all() and (c.y0 >= 0).all() and (c.x1 <= ow).all() and (c.y1 <= oh).all()
    assert (c.width >= 1).all() and (c.height >= 1).all()
    area = c.width * c.height / (oh * ow)
    rel_ratio = (c.width / c.height) / (ow / oh)
    # Whole pixels: each side is off by at most half a pixel of the real-valued draw (sides >= ~100 px).
    tol = 1.5 / np.minimum(c.width, c.height)
    assert (area >= 0.3 * (1 - 2 * tol)).all() and (area <= 0.9 * (1 + 2 * tol)).all()
    assert (rel_ratio >= 0.6 * (1 - 2 * tol)).all() and (rel_ratio <= 1.5 * (1 + 2 * tol)).all()
    # The ranges are used, not just respected: both ends are reached and the log-ratio spreads out.
    assert area.min() < 0.33 and area.max() > 0.85
    assert rel_ratio.min() < 0.65 and rel_ratio.max() > 1.4
    # Positions cover the image: crops touch every border somewhere.
    assert (c.x0 == 0).any() and (c.y0 == 0).any() and (c.x1 == ow).any() and (c.y1 == oh).any()
    # Flip probability 0.5 (a fixed draw: deterministic, not flaky).
    assert 0.45 < c.hflip.mean() < 0.55


def test_crop_draws_are_pure_functions_of_seed_epoch_key():
    rng = np.random.default_rng(1)
    n = 300
    oh, ow, keys = rng.integers(50, 500, n), rng.integers(50, 500, n), _keys(n)
    a = sample_crops(oh, ow, keys, _cfg(AUG), epoch=1)
    perm = rng.permutation(n)
    b = sample_crops(oh[perm], ow[perm], [keys[i] for i in perm], _cfg(AUG), epoch=1)
    for name in ("x0", "y0", "x1", "y1", "hflip"):
        assert np.array_equal(getattr(a, name)[perm], getattr(b, name))  # order never matters
    c = sample_crops(oh, ow, keys, _cfg(AUG), epoch=2)
    assert not np.array_equal(a.x0, c.x0)  # a fresh crop every epoch


def test_infeasible_area_is_never_drawn():
    """Area 0.9 of the image only fits for ratio multiples in [0.9, 1/0.9]: the draw is conditioned on
    fitting (no clipping to the image, no fallback crop outside the ranges)."""
    aug = {"crop_scale": (0.9, 1.0), "crop_ratio": (0.5, 2.0)}
    n = 2000
    oh, ow = np.full(n, 1000), np.full(n, 1000)
    c = sample_crops(oh, ow, _keys(n), _cfg(aug), epoch=0)
    area = c.width * c.height / 1e6
    ratio = c.width / c.height
    assert area.min() >= 0.9 - 3e-3
    assert ratio.min() >= 0.9 - 3e-3 and ratio.max() <= 1 / 0.9 + 3e-3


def test_augment_off_is_the_identity_and_keeps_old_fingerprints():
    cfg = _cfg()
    assert not cfg.augment.active
    n = 50
    oh, ow = np.arange(n) + 10, np.arange(n) + 20
    c = sample_crops(oh, ow, _keys(n), cfg, 0)
    assert (c.x0 == 0).all() and (c.y0 == 0).all() and np.array_equal(c.x1, ow) and np.array_equal(c.y1, oh)
    assert not c.hflip.any()
    # Off: the config hashes as it did before the section existed (old packs still --resume).
    import hashlib
    import json

    dump = cfg.model_dump(mode="json")
    del dump["augment"]
    old = hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.fingerprint() == old
    assert _cfg(AUG).fingerprint() != old


def test_config_validation_and_crop_spec():
    with pytest.raises(ValueError, match="crop_scale"):
        _cfg({"crop_scale": (0.5, 1.2)})
    with pytest.raises(ValueError, match="no crop fits"):
        _cfg({"crop_scale": (0.5, 1.0), "crop_ratio": (3.0, 4.0)})
    with pytest.raises(ValueError, match="hflip"):
        _cfg({"hflip": 1.5})
    assert parse_crop("0.35:1") == {"crop_scale": (0.35, 1.0), "crop_ratio": (0.75, 4 / 3)}
    assert parse_crop("0.2:0.8:0.5:2") == {"crop_scale": (0.2, 0.8), "crop_ratio": (0.5, 2.0)}
    assert parse_crop("off") == {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}
    with pytest.raises(ConfigError, match="--crop"):
        parse_crop("0.5")


def test_plan_sizes_the_crop_not_the_image(tmp_path):
    """The planned grid follows the crop's aspect ratio (the planner draws the crop first)."""
    from packer.plan import make_plan, scan_source

    root = tmp_path / "src" / "a"
    root.mkdir(parents=True)
    for i in range(40):
        Image.fromarray(smooth_rgb(120, 60, seed=i)).save(root / f"{i:02d}.png")
    cfg = _cfg({"crop_scale": (0.2, 1.0), "crop_ratio": (0.5, 2.0)}, seq_len=256)
    cfg = cfg.model_copy(update={"resolution": cfg.resolution.model_copy(update={"lo": 64, "hi": 64})})
    plan = make_plan(scan_source(str(tmp_path / "src"), cfg, use_ray=False), cfg, epoch=0)
    assert plan.crop is not None and plan.hflip is not None
    cw = plan.crop[:, 2] - plan.crop[:, 0]
    ch = plan.crop[:, 3] - plan.crop[:, 1]
    crop_aspect = cw / ch
    grid_aspect = plan.grid_w / plan.grid_h
    # Longer side 64 px = 8 patches: the grid's aspect is the crop's up to rounding a side to patches.
    assert np.all(np.abs(np.log(grid_aspect / crop_aspect)) < np.log(8.5 / 7.5) + np.log(1 + 1 / 1.5))
    assert np.corrcoef(np.log(crop_aspect), np.log(grid_aspect))[0, 1] > 0.9
    assert len(set(np.round(crop_aspect, 2))) > 10  # the crops really vary


# ----------------------------------------------------------------------------------------------------
# Decoding a crop
# ----------------------------------------------------------------------------------------------------


def rebuild(
    path: str | Path, crop: tuple[int, int, int, int], hflip: bool, gh: int, gw: int, p: int
) -> np.ndarray:
    """The documented recipe (docs/pack.md), with plain Pillow: orient, crop, resize, flip, patchify.
    Returns (gh·gw, p·p·3) uint8 tokens in row-major grid order."""
    with Image.open(path) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    img = img.crop(crop).resize((gw * p, gh * p), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img)
    return arr.reshape(gh, p, gw, p, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, p * p * 3)


def test_decode_crop_equals_pillow_recipe_with_exif_orientation(tmp_path):
    up = smooth_rgb(90, 60, seed=4)  # upright 90 wide, 60 high
    stored = Image.fromarray(up).transpose(Image.Transpose.ROTATE_90)  # what orientation 6 undoes
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = tmp_path / "o6.png"
    stored.save(path, exif=exif.tobytes())
    crop = (10, 5, 70, 50)  # upright pixels
    got = decode.load_resized(str(path), 3, 4, 8, DecodeConfig(), crop=crop, hflip=True)
    want = rebuild(path, crop, True, 3, 4, 8)
    assert np.array_equal(decode.patchify(got, 8), want)
    # Cropping really is a crop: the same crop of the upright array, resized, is what we got.
    ref = Image.fromarray(up[5:50, 10:70]).resize((32, 24), Image.Resampling.BICUBIC, reducing_gap=3.0)
    assert np.array_equal(got, np.asarray(ref)[:, ::-1])


@pytest.mark.parametrize("orientation", [1, 6, 3])
def test_jpeg_draft_crop_maps_to_the_same_region(orientation):
    """A JPEG decoded at a reduced DCT scale must cut the same region as a full decode."""
    up = smooth_rgb(800, 600, seed=orientation)
    data = exif_rotated_jpeg(up, orientation, quality=95)
    crop = (200, 100, 600, 400)  # upright
    on = decode.load_resized(data, 6, 8, 8, DecodeConfig(jpeg_draft=True), crop=crop)
    off = decode.load_resized(data, 6, 8, 8, DecodeConfig(jpeg_draft=False), crop=crop)
    diff = np.abs(on.astype(int) - off.astype(int))
    assert diff.mean() < 3.0 and np.percentile(diff, 99) < 20
    # And the region is the crop, not the whole image (which differs by far more).
    whole = decode.load_resized(data, 6, 8, 8, DecodeConfig(jpeg_draft=False))
    assert np.abs(whole.astype(int) - off.astype(int)).mean() > 10


def test_decode_rejects_a_crop_outside_the_image(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(smooth_rgb(40, 30)).save(path)
    with pytest.raises(decode.DecodeError, match="outside the 40x30 image"):
        decode.load_resized(str(path), 2, 2, 8, DecodeConfig(), crop=(0, 0, 41, 30))


# ----------------------------------------------------------------------------------------------------
# A real pack (Ray): determinism across workers, rebuild from the record, inspect
# ----------------------------------------------------------------------------------------------------


def _png_folder(root: Path) -> Path:
    """24 PNGs of varied sizes in 3 classes, two with EXIF orientations (upright coords differ)."""
    rng = np.random.default_rng(7)
    for i in range(24):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        img = Image.fromarray(smooth_rgb(w, h, seed=i))
        if i in (4, 9):
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = 6 if i == 4 else 8
            img.transpose(Image.Transpose.ROTATE_90).save(d / f"{i:02d}.png", exif=exif.tobytes())
        else:
            img.save(d / f"{i:02d}.png")
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def aug_packs(tmp_path_factory, ray_session):
    from packer.pipeline import pack

    src = _png_folder(tmp_path_factory.mktemp("augsrc"))
    cfg = _cfg(AUG)
    outs = []
    for workers in (1, 2):
        out = tmp_path_factory.mktemp(f"aug{workers}") / "out"
        pack(str(src), str(out), cfg, workers=workers)
        outs.append(out)
    return src, cfg, outs


@pytest.mark.ray
@pytest.mark.slow
def test_augmented_pack_is_byte_identical_across_worker_counts(aug_packs):
    _, _, (one, two) = aug_packs
    a, b = _tree(one), _tree(two)
    a.pop(".navit-pack/state.json", None)
    b.pop(".navit-pack/state.json", None)
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith(".parquet") or name == "index.json":
            assert a[name] == b[name], name
    images = pq.read_table(one / schema.IMAGES_FILE)
    assert images.num_rows == 48 and images.column("hflip").to_numpy().any()


@pytest.mark.ray
@pytest.mark.slow
def test_rebuild_from_record_equals_shard_patches(aug_packs):
    """Every packed image: orient, crop, resize, flip per images.parquet → exactly its shard tokens."""
    _, cfg, (out, _) = aug_packs
    p = cfg.packing.patch_size
    index = schema.read_index(str(out))
    images = schema.read_images(str(out)).to_pylist()
    checked = cropped = 0
    for row in images:
        if row["rejected_reason"] is not None:
            continue
        table = pq.read_table(out / index["shards"][row["shard"]]["file"])
        arr = schema.table_to_arrays(table.slice(row["row"], 1))
        sel = arr["segment_ids"][0] == row["segment"]
        crop = (row["crop_x0"], row["crop_y0"], row["crop_x1"], row["crop_y1"])
        want = rebuild(row["path"], crop, row["hflip"], row["grid_h"], row["grid_w"], p)
        cells = arr["pos_h"][0][sel].astype(int) * row["grid_w"] + arr["pos_w"][0][sel].astype(int)
        assert np.array_equal(arr["patches"][0][sel], want[cells]), row["path"]
        assert sel.sum() == row["n_tokens"]
        checked += 1
        cropped += crop != (0, 0, row["orig_w"], row["orig_h"])
    assert checked == 48 and cropped >= 40


@pytest.mark.ray
@pytest.mark.slow
def test_inspect_shows_crop_and_flip(aug_packs):
    from packer.row_view import read_row, summarize_row

    _, _, (out, _) = aug_packs
    view = read_row(str(out), 0)
    text = summarize_row(view)
    images = {(r["epoch"], r["image_id"]): r for r in schema.read_images(str(out)).to_pylist()}
    for s in view.segments:
        r = images[(view.epoch, s.image_id)]
        assert f"crop {r['crop_x0']},{r['crop_y0']}-{r['crop_x1']},{r['crop_y1']}" in text
    assert "flip" in text.splitlines()[1]


def test_read_images_fills_columns_of_packs_older_than_augmentation(tmp_path):
    """An images.parquet without the augmentation columns reads as whole images, unflipped."""
    import pyarrow as pa

    base = [f for f in schema.IMAGES_SCHEMA if f.name not in schema.AUGMENT_COLUMNS]
    rows = [
        {"epoch": 0, "image_id": 0, "path": "a.png", "label": 0, "orig_h": 30, "orig_w": 40, "grid_h": 2,
         "grid_w": 3, "n_tokens_full": 6, "n_tokens": 6, "shard": 0, "row": 0, "segment": 1,
         "rejected_reason": None},
        {"epoch": 0, "image_id": 1, "path": "b.png", "label": 0, "orig_h": -1, "orig_w": -1, "grid_h": -1,
         "grid_w": -1, "n_tokens_full": -1, "n_tokens": -1, "shard": -1, "row": -1, "segment": -1,
         "rejected_reason": "not an image"},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(base)), tmp_path / schema.IMAGES_FILE)
    t = schema.read_images(str(tmp_path)).to_pylist()
    assert [(r["crop_x0"], r["crop_y0"], r["crop_x1"], r["crop_y1"], r["hflip"]) for r in t] == [
        (0, 0, 40, 30, False),
        (-1, -1, -1, -1, False),
    ]
    assert schema.read_images(str(tmp_path), columns=["image_id", "hflip"]).column_names == [
        "image_id",
        "hflip",
    ]
