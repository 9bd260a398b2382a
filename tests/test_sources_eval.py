"""`navit eval` on the same validation images as an ImageFolder, as a WebDataset tar shard and as a
Parquet file: identical accuracies (same decoder, same labels)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from train_fixtures import run_cli, trained_run, write_image_folder

pytestmark = [pytest.mark.slow]


def _eval(source: str, run: Path, capsys) -> list[dict]:
    code, cap = run_cli(
        ["eval", source, "--checkpoint", str(run), "--resolutions", "32,native", "--json", "--device", "cpu"],
        capsys,
    )
    assert code == 0, cap.err
    return json.loads(cap.out)["results"]


def test_eval_on_tar_and_parquet_equals_the_folder(tmp_path_factory, tmp_path, capsys):
    t = trained_run(tmp_path_factory)
    folder = write_image_folder(tmp_path / "val", t["val_images"], t["val_labels"])
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    classes = sorted({f.split("/")[0] for f in files})
    with tarfile.open(tmp_path / "val.tar", "w") as tf:
        for rel in files:
            data = (folder / rel).read_bytes()
            for name, blob in (
                (rel, data),
                (rel.rsplit(".", 1)[0] + ".cls", str(classes.index(rel.split("/")[0]))),
            ):
                blob = blob if isinstance(blob, bytes) else blob.encode()
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    rows = [{"bytes": (folder / rel).read_bytes(), "path": rel} for rel in files]
    pq.write_table(
        pa.table({"image": pa.array(rows), "label": pa.array([f.split("/")[0] for f in files])}),
        tmp_path / "val.parquet",
        row_group_size=16,
    )
    expected = _eval(str(folder), t["run"], capsys)
    assert expected[0]["images"] == len(files)
    assert _eval(str(tmp_path / "val.tar"), t["run"], capsys) == expected
    assert _eval(str(tmp_path / "val.parquet"), t["run"], capsys) == expected
