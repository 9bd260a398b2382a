"""Augmentation: pack-time crop + flip (packer.plan.augment, decode, images.parquet, inspect) and
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

from packer import schema
from packer.build import decode
from packer.config import DecodeConfig, PackConfig, parse_crop
from packer.errors import ConfigError
from packer.plan.augment import sample_crops

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
    from packer.plan.planner import make_plan, scan_source

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


def test_cli_crop_and_hflip_flags_reach_the_config(tmp_path):
    import json

    from typer.testing import CliRunner

    from cli.main import app

    root = tmp_path / "src" / "a"
    root.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(smooth_rgb(64, 48, seed=i)).save(root / f"{i}.png")
    runner = CliRunner()
    argv = ["plan", str(tmp_path / "src"), "--seq-len", "64", "--patch-size", "8", "--json"]
    res = runner.invoke(app, [*argv, "--crop", "0.3:0.9:0.5:2", "--hflip", "0.25"])
    assert res.exit_code == 0, res.output
    aug = json.loads(res.stdout)["config"]["augment"]
    assert aug == {"crop_scale": [0.3, 0.9], "crop_ratio": [0.5, 2.0], "hflip": 0.25}
    res = runner.invoke(app, [*argv, "--crop", "0.5"])
    assert isinstance(res.exception, ConfigError) and "--crop '0.5'" in str(res.exception)
    res = runner.invoke(app, [*argv, "--hflip", "1.5"])
    assert isinstance(res.exception, ConfigError) and "augment.hflip" in str(res.exception)


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
    from packer.build.pipeline import pack

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
    from packer.analysis.row_view import read_row, summarize_row

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


# ----------------------------------------------------------------------------------------------------
# Train-time mixup / cutmix (trainer/mixup.py)
# ----------------------------------------------------------------------------------------------------

P_MIX = 2  # patch side of the synthetic batches (tokens of 2·2·3 = 12 values)


def _packed_batch(seed: int, n_rows: int = 3, seq_len: int = 40, drop: bool = True):
    """A packed batch of images with random grids and dropped tokens. Token values encode their
    provenance: value 0 = image index, value 1 = cell index (row-major in its grid), the rest noise.
    Returns (batch dict of tensors, labels (N,), per-image grids [(gh, gw)])."""
    import torch

    rng = np.random.default_rng(seed)
    p = P_MIX * P_MIX * 3
    patches = np.zeros((n_rows, seq_len, p), np.uint8)
    seg = np.zeros((n_rows, seq_len), np.int32)
    pos = np.zeros((n_rows, seq_len, 2), np.int32)
    grid = np.zeros((n_rows, seq_len, 2), np.int32)
    grids, n_img = [], 0
    for r in range(n_rows):
        cur, k = 0, 0
        while True:
            gh, gw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
            full = gh * gw
            keep = np.sort(rng.choice(full, size=max(1, int(full * rng.uniform(0.6, 1.0))), replace=False))
            if not drop:
                keep = np.arange(full)
            if cur + len(keep) > seq_len:
                break
            k += 1
            sl = slice(cur, cur + len(keep))
            seg[r, sl] = k
            pos[r, sl, 0], pos[r, sl, 1] = keep // gw, keep % gw
            grid[r, sl] = (gh, gw)
            patches[r, sl] = rng.integers(0, 256, (len(keep), p))
            patches[r, sl, 0] = n_img
            patches[r, sl, 1] = keep
            grids.append((gh, gw))
            n_img += 1
            cur += len(keep)
    labels = torch.as_tensor(rng.integers(0, 5, n_img))
    labels[rng.random(n_img) < 0.15] = -1  # a few unlabelled images
    batch = {
        "patches": torch.as_tensor(patches),
        "segment_ids": torch.as_tensor(seg),
        "pos_hw": torch.as_tensor(pos),
        "grid_hw": torch.as_tensor(grid),
    }
    return batch, labels, grids


def _facing(i: int, j: int, r: int, c: int, grids) -> tuple[int, int] | None:
    """Cell of image j facing cell (r, c) of image i when their grids are centred on each other."""
    (hi, wi), (hj, wj) = grids[i], grids[j]
    oh, ow = min(hi, hj), min(wi, wj)
    rr, cc = r - (hi - oh) // 2, c - (wi - ow) // 2
    if not (0 <= rr < oh and 0 <= cc < ow):
        return None
    return rr + (hj - oh) // 2, cc + (wj - ow) // 2


def _tokens_by_image(batch):
    """{image: {(r, c): token value vector}} from a packed batch (uses the provenance codes)."""
    seg = batch["segment_ids"].numpy()
    out: dict[int, dict[tuple[int, int], np.ndarray]] = {}
    pat = batch["patches"].numpy()
    pos = batch["pos_hw"].numpy()
    for b, l in zip(*np.nonzero(seg > 0), strict=True):
        out.setdefault(int(pat[b, l, 0]), {})[(int(pos[b, l, 0]), int(pos[b, l, 1]))] = pat[b, l]
    return out


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mix_soft_labels_sum_to_one_and_match_token_provenance(mode):
    import torch

    from trainer.mixup import MixParams, mix_batch, mix_rng

    params = MixParams(
        mixup_alpha=1.0 if mode == "mixup" else 0.0, cutmix_alpha=1.0 if mode == "cutmix" else 0.0
    )
    seen_mixed = 0
    for seed in range(6):
        batch, labels, grids = _packed_batch(seed)
        n = len(grids)
        res = mix_batch(batch, labels, 5, params, mix_rng(0, seed, 0, 0))
        assert res is not None and res.mode == mode
        partner = res.partner.numpy()
        lab = labels.numpy()
        # Pairing: mutual, labelled with labelled, unlabelled images untouched.
        assert np.array_equal(partner[partner], np.arange(n))
        assert (partner[lab < 0] == np.flatnonzero(lab < 0)).all()
        assert ((lab[partner] >= 0) | (partner == np.arange(n))).all()
        # Soft targets: each labelled row sums to 1, weights λ_i on own label, 1-λ_i on the partner's.
        t = res.targets.numpy().astype(np.float64)
        assert np.allclose(t[lab >= 0].sum(1), 1.0, atol=1e-6) and not t[lab < 0].any()
        lam_i = res.lam.numpy()
        assert ((lam_i >= 0) & (lam_i <= 1)).all()
        for i in np.flatnonzero(lab >= 0):
            want = np.zeros(5)
            want[lab[i]] += lam_i[i]
            want[lab[partner[i]]] += 1 - lam_i[i]
            assert np.allclose(t[i], want, atol=1e-6)
        # Provenance: token by token, mixed only with the partner's kept token facing it.
        before = _tokens_by_image(batch)
        seg = batch["segment_ids"].numpy()
        after_pat = res.patches.numpy().astype(np.float64)
        pos = batch["pos_hw"].numpy()
        changed = np.zeros(n)
        for b, l in zip(*np.nonzero(seg > 0), strict=True):
            i = int(batch["patches"][b, l, 0])
            cell = (int(pos[b, l, 0]), int(pos[b, l, 1]))
            own = before[i][cell].astype(np.float64)
            got = after_pat[b, l]
            if np.array_equal(got, own):
                continue
            j = int(partner[i])
            face = _facing(i, j, *cell, grids)
            assert j != i and face is not None and face in before[j], "mixed with a token not facing it"
            src = before[j][face].astype(np.float64)
            if mode == "cutmix":
                assert np.array_equal(got, src)
            else:
                lam = 1 - (1 - lam_i[i]) * len(before[i]) / max(1, _count_facing(i, j, before, grids))
                # Blend with one λ for the whole micro-batch: got = λ·own + (1-λ)·src.
                k = np.argmax(np.abs(own - src))
                lam_hat = (got[k] - src[k]) / (own[k] - src[k])
                assert np.allclose(got, lam_hat * own + (1 - lam_hat) * src, atol=1e-3)
                assert abs(lam_hat - lam) < 1e-3
            changed[i] += 1
        kept = np.array([len(before[i]) for i in range(n)])
        if mode == "cutmix":
            assert res.patches.dtype == torch.uint8
            assert np.allclose(1 - lam_i, changed / kept, atol=1e-6)
        else:
            assert res.patches.dtype == torch.float32
        seen_mixed += int(changed.sum())
        # Padding stays padding.
        assert not res.patches.numpy()[seg == 0].any()
    assert seen_mixed > 20


def _count_facing(i, j, before, grids) -> int:
    """Tokens of image i whose facing cell in j was kept (all of them are blended by mixup)."""
    return sum(1 for cell in before[i] if (f := _facing(i, j, *cell, grids)) is not None and f in before[j])


def test_mix_draws_are_seeded_and_off_means_untouched():
    import torch

    from trainer.mixup import MixParams, mix_batch, mix_rng

    batch, labels, _ = _packed_batch(3)
    params = MixParams(mixup_alpha=0.8, cutmix_alpha=1.0)
    a = mix_batch(batch, labels, 5, params, mix_rng(1, 7, 0, 0))
    b = mix_batch(batch, labels, 5, params, mix_rng(1, 7, 0, 0))
    assert torch.equal(a.patches, b.patches) and torch.equal(a.targets, b.targets)
    modes = {mix_batch(batch, labels, 5, params, mix_rng(1, s, 0, 0)).mode for s in range(20)}
    assert modes == {"mixup", "cutmix"}
    assert mix_batch(batch, labels, 5, MixParams(), mix_rng(1, 7, 0, 0)) is None
    assert mix_batch(batch, labels, 5, MixParams(mixup_alpha=1.0, prob=0.0), mix_rng(1, 7, 0, 0)) is None


def test_soft_cross_entropy_with_one_hot_targets_is_the_hard_loss():
    import torch
    import torch.nn.functional as F

    from trainer.mixup import soft_cross_entropy_sum

    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, -1, 2, 1, 1])
    hard = soft_cross_entropy_sum(logits, labels, None, 0.1)
    onehot = F.one_hot(labels.clamp(min=0), 4).float()
    soft = soft_cross_entropy_sum(logits, labels, onehot, 0.1)
    assert torch.allclose(hard, soft, atol=1e-5)


@pytest.mark.slow
def test_training_mixes_and_resumes_exactly_and_eval_never_mixes(tmp_path, monkeypatch):
    import torch
    from train_fixtures import make_images, tiny_train_config, write_image_folder, write_pack

    import trainer.loop as loop
    import trainer.mixup as mixup
    from trainer.data import open_source
    from trainer.evaluate import evaluate_folder, evaluate_shards, load_model

    torch.set_num_threads(1)
    images, labels = make_images(48, seed=3)
    pack = write_pack(tmp_path / "pack", images, labels, seq_len=64, shard_rows=6)
    cfg = tiny_train_config(**{"schedule.steps": 6, "mix.mixup_alpha": 0.8, "mix.cutmix_alpha": 1.0})
    calls = []
    real = mixup.mix_batch

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(loop, "mix_batch", spy)
    src = lambda info: open_source(str(pack), batch_size=4, seed=0)  # noqa: E731
    full = loop.train(cfg, src, tmp_path / "a", verbose=False)
    assert len(calls) == 6 and sum(calls) >= 5  # every step's micro-batch went through the mixer
    part = loop.train(cfg, src, tmp_path / "b", stop_after=3, verbose=False)
    rest = loop.train(cfg, src, tmp_path / "b", resume=True, verbose=False)
    assert part.losses + rest.losses == full.losses  # mixing draws are seeded by step: exact resume

    def never(*a, **k):
        raise AssertionError("evaluation must not mix")

    monkeypatch.setattr(loop, "mix_batch", never)
    monkeypatch.setattr(mixup, "mix_batch", never)
    net, _ = load_model(tmp_path / "a", torch.device("cpu"))
    folder = write_image_folder(tmp_path / "val", images[:12], labels[:12])
    r = evaluate_folder(net, folder, [None], patch=8, seq_len=64, device=torch.device("cpu"))
    s = evaluate_shards(net, str(pack), device=torch.device("cpu"))
    assert r[0].images == 12 and s[0].images == 48


def test_runs_saved_before_the_mix_section_still_resume():
    from trainer.config import TrainConfig, incompatible_fields

    old = TrainConfig().model_dump(mode="json")
    del old["mix"]  # a checkpoint written before mixup existed
    assert incompatible_fields(old, TrainConfig().model_dump(mode="json")) == []
    on = TrainConfig.model_validate({"mix": {"mixup_alpha": 0.2}}).model_dump(mode="json")
    assert incompatible_fields(old, on) == ["mix.mixup_alpha"]
