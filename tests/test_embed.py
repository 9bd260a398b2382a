"""`navit embed` (trainer/embed.py, cli/cmd_embed.py): every input listed once, embeddings that do not
depend on packing, the model's own forward on the same pixels, atomic output, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import CLASSES, make_images, run_cli, write_image_folder

from model import NaViT, NaViTConfig, pack_images
from model.pretrained import save_pretrained
from trainer.embed import EMBED_META_KEY, LoadedModel, _forward_chunk, embed_source

PATCH = 8


def tiny_model(seed: int = 0, **kw) -> NaViT:
    torch.manual_seed(seed)
    cfg = NaViTConfig.preset("tiny", depth=2, dim=32, heads=2, patch_size=PATCH, num_classes=4, **kw)
    return NaViT(cfg).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """12 PNG images (sides multiples of the patch: native size = pixels as stored), a corrupt file
    and a non-image file."""
    root = tmp_path_factory.mktemp("embed_src")
    images, labels = make_images(12, seed=3, patch=PATCH)
    write_image_folder(root, images, labels)
    (root / CLASSES[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root, images


@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_an_image_alone_and_packed_with_others_gets_the_same_embedding(pool):
    net = tiny_model(pool=pool)
    images, _ = make_images(20, seed=5, patch=PATCH, sides=(8, 16, 24, 40))
    with torch.inference_mode():
        packed, logits, rows = _forward_chunk(net, images, PATCH, 64, 2, torch.device("cpu"))
        alone = torch.cat([_forward_chunk(net, [im], PATCH, 64, 1, torch.device("cpu"))[0] for im in images])
    assert rows < len(images) // 2  # really packed several images per row
    assert packed.shape == (20, 32) and logits.shape == (20, 4)
    assert (packed - alone).abs().max().item() <= 1e-5


def test_embed_writes_every_input_with_the_models_own_forward(folder, tmp_path):
    root, images = folder
    net = tiny_model()
    names = list(CLASSES)
    loaded = LoadedModel(net, PATCH, 64, names, {"test": True})
    out = tmp_path / "emb.parquet"
    s = embed_source(
        loaded,
        str(root),
        out,
        resolution=None,
        seq_len=64,
        batch_tokens=128,
        device=torch.device("cpu"),
        topk=3,
        chunk_images=5,  # three chunks: the streaming path
    )
    t = pq.read_table(out)
    assert (s.images_in, s.embedded, s.rejected, s.skipped_files) == (13, 12, 1, 1)
    assert t.num_rows == 13 and t.column("image_id").to_pylist() == list(range(13))
    bad = [r for r in t.to_pylist() if not r["ok"]]
    assert len(bad) == 1 and bad[0]["key"].endswith("broken.png") and bad[0]["embedding"] is None
    assert "corrupt" in bad[0]["reason"] or "not an image" in bad[0]["reason"]
    meta = json.loads(t.schema.metadata[EMBED_META_KEY])
    assert meta["resolution"] == "native" and meta["class_names"] == names and meta["topk"] == 3
    by_key = {r["key"]: r for r in t.to_pylist() if r["ok"]}
    for i, img in enumerate(images):  # write_image_folder names files img_{i}
        row = by_key[f"{CLASSES[i % 4]}/img_{i:04d}.png"]
        assert (row["height"], row["width"]) == img.shape[:2]
        assert (row["grid_h"], row["grid_w"]) == (img.shape[0] // PATCH, img.shape[1] // PATCH)
        assert row["tokens"] == row["grid_h"] * row["grid_w"] and row["label"] == i % 4
        with torch.inference_mode():
            ref = net(pack_images([img], PATCH, 64))
        np.testing.assert_allclose(row["embedding"], ref.embeddings[0].numpy(), atol=1e-5)
        probs, ids = ref.logits[0].softmax(-1).topk(3)
        assert row["topk_ids"] == ids.tolist() and row["topk_names"] == [names[c] for c in ids.tolist()]
        np.testing.assert_allclose(row["topk_probs"], probs.numpy(), atol=1e-6)


def test_cli_embeds_an_export_at_a_resolution_in_float16(folder, tmp_path, capsys):
    root, _ = folder
    net = tiny_model()
    save_pretrained(
        tmp_path / "exp", net.state_dict(), net.cfg.to_dict(), class_names=list(CLASSES), seq_len=64
    )
    out = tmp_path / "e16.parquet"
    code, cap = run_cli(
        [
            "embed",
            str(tmp_path / "exp"),
            str(root),
            "--out",
            str(out),
            "--resolution",
            "32",
            "--dtype",
            "float16",
        ],
        capsys,
    )
    assert code == 0, cap.err
    assert "13 in = 12 embedded + 1 rejected; 1 non-image files skipped" in cap.out
    t = pq.read_table(out)
    assert str(t.schema.field("embedding").type.value_type) == "halffloat"
    ok = [r for r in t.to_pylist() if r["ok"]]
    assert all(max(r["grid_h"], r["grid_w"]) == 4 for r in ok)  # longer side 32 px = 4 patches


def test_a_failure_midway_leaves_no_output_and_no_temp_file(folder, tmp_path, monkeypatch):
    import trainer.embed as embed_mod

    root, _ = folder
    calls = {"n": 0}
    real = embed_mod._forward_chunk

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(embed_mod, "_forward_chunk", failing)
    loaded = LoadedModel(tiny_model(), PATCH, 64, None, {})
    out = tmp_path / "emb.parquet"
    with pytest.raises(RuntimeError, match="simulated"):
        embed_source(
            loaded,
            str(root),
            out,
            resolution=None,
            seq_len=64,
            batch_tokens=64,
            device=torch.device("cpu"),
            chunk_images=4,
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, words",
    [
        (["embed", "{tmp}/missing", "{src}", "--out", "{tmp}/o.parquet"], "checkpoint not found"),
        (["embed", "{exp}", "{tmp}/nosource", "--out", "{tmp}/o.parquet"], "source not found"),
        (["embed", "{exp}", "{src}", "--out", "{tmp}/o.parquet", "--resolution", "big"], "--resolution"),
        (["embed", "{exp}", "{src}", "--out", "{tmp}", "--resolution", "32"], "is a folder"),
        (["embed", "{src}", "{src}", "--out", "{tmp}/o.parquet"], "not a checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(folder, tmp_path, capsys, argv, words):
    root, _ = folder
    net = tiny_model()
    save_pretrained(tmp_path / "exp", net.state_dict(), net.cfg.to_dict())
    subs = {"{tmp}": str(tmp_path), "{src}": str(root), "{exp}": str(tmp_path / "exp")}
    args = [a for a in argv]
    for k, v in subs.items():
        args = [a.replace(k, v) for a in args]
    code, cap = run_cli(args, capsys)
    assert code == 2 and words in cap.err and cap.err.count("\n") == 1, cap.err
    assert not (tmp_path / "o.parquet").exists()


def test_embed_a_timm_state_dict_directly(folder, tmp_path, capsys):
    """A timm ViT state dict is converted on the fly: the embeddings equal those of its export."""
    from safetensors.torch import save_file
    from test_timm_convert import make_timm_state

    root, _ = folder
    save_file(make_timm_state("map"), str(tmp_path / "vit.safetensors"))
    argv = ["embed", str(tmp_path / "vit.safetensors"), str(root), "--out", str(tmp_path / "a.parquet")]
    assert run_cli(argv, capsys)[0] == 0
    assert (
        run_cli(["export", str(tmp_path / "vit.safetensors"), "--out", str(tmp_path / "exp")], capsys)[0] == 0
    )
    argv = ["embed", str(tmp_path / "exp"), str(root), "--out", str(tmp_path / "b.parquet")]
    assert run_cli(argv, capsys)[0] == 0
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.column("embedding").to_pylist() == b.column("embedding").to_pylist()
    assert sum(a.column("ok").to_pylist()) == 12
