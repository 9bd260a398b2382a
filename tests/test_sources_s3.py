"""WebDataset and Parquet sources read from object storage (the moto S3 server of tests/test_s3.py):
the listing, the headers and the built shards equal those of the same files on local disk."""

from __future__ import annotations

import pytest
from test_s3 import _bucket_fs, s3  # noqa: F401  (s3: the module's moto server fixture)

from packer.build.layout import build_shard_bytes, shard_tasks
from packer.config import PackConfig
from packer.plan.planner import make_plan, scan_source
from packer.synth import generate
from packer.synth_formats import generate_as

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("s3src")
    generate(tmp / "folder", n=12, seed=4, threads=1)
    generate_as(tmp / "wds", "wds", n=12, seed=4, shard_size=5, threads=1)
    generate_as(tmp / "parquet", "parquet", n=12, seed=4, shard_size=5, threads=1)
    fs = _bucket_fs(s3)
    fs.create_dir("navit-cont")
    for kind in ("wds", "parquet"):
        for f in sorted((tmp / kind).iterdir()):
            with fs.open_output_stream(f"navit-cont/{kind}/{f.name}") as out:
                out.write(f.read_bytes())
    return tmp


def _cfg() -> PackConfig:
    return PackConfig.model_validate(
        {"packing": {"seq_len": 64, "patch_size": 16}, "resolution": {"kind": "uniform", "lo": 48, "hi": 96}}
    )


def _shards(source: str, cfg: PackConfig) -> list[bytes]:
    """Every shard of epoch 0 built in this process (no Ray: its workers would not see the test's
    endpoint), through the same code as `navit pack`."""
    scan = scan_source(source, cfg, use_ray=False)
    plan = make_plan(scan, cfg, epoch=0)
    return [build_shard_bytes(t, cfg)[0].to_pybytes() for t in shard_tasks(plan, cfg.seed, 2)]


@pytest.mark.parametrize(
    "source",
    [
        "s3://navit-cont/wds",
        "s3://navit-cont/wds/shard-{000000..000002}.tar",
        "s3://navit-cont/parquet/*.parquet",
    ],
)
def test_s3_container_sources_equal_local_folder(uploaded, s3, monkeypatch, source):  # noqa: F811
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    cfg = _cfg()
    local = scan_source(str(uploaded / "folder"), cfg, use_ray=False)
    remote = scan_source(source, cfg, use_ray=False)
    assert remote.listing.keys == local.listing.keys
    assert remote.listing.labels.tolist() == local.listing.labels.tolist()
    assert all("s3://navit-cont/" in p for p in remote.listing.paths)
    assert remote.headers.width.tolist() == local.headers.width.tolist()
    assert remote.headers.reason == local.headers.reason == [""] * 12
    assert _shards(source, cfg) == _shards(str(uploaded / "folder"), cfg)
