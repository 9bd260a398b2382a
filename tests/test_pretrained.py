"""`navit export` + ``NaViT.from_pretrained`` (model/pretrained.py), and starting runs from weights:
``navit train --init-from`` (export, checkpoint, timm state dict), ``--reset-head``,
``--set train.freeze=trunk`` (trainer/init_from.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_timm_convert import HEADS, make_timm_state
from train_fixtures import make_images, run_cli, write_pack

from model import NaViT, NaViTConfig, pack_images

ROOT = Path(__file__).resolve().parents[1]
PATCH = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pack (patch 8, 4 classes), a checkpoint of a random tiny model trained 0 steps, its export."""
    from trainer.checkpoint import save_checkpoint

    base = tmp_path_factory.mktemp("pretrained")
    images, labels = make_images(48, seed=2, patch=PATCH)
    pack = write_pack(base / "pack", images, labels, patch=PATCH, seq_len=64)
    torch.manual_seed(0)
    net = NaViT(NaViTConfig.preset("tiny", depth=2, dim=32, heads=2, patch_size=PATCH, num_classes=4))
    meta = {"model_config": net.cfg.to_dict(), "class_names": ["a", "b", "c", "d"], "seq_len": 64}
    save_checkpoint(base / "run", 7, net, {}, meta)
    return {"base": base, "pack": pack, "net": net.eval(), "images": images}


def _train(argv, capsys, setup, out):
    common = [
        "train",
        "--data",
        str(setup["pack"]),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "4",
    ]
    return run_cli([*common, "--warmup", "0", *argv], capsys)


def test_export_round_trip_reproduces_the_model(setup, tmp_path, capsys):
    code, cap = run_cli(["export", str(setup["base"] / "run"), "--out", str(tmp_path / "exp")], capsys)
    assert code == 0, cap.err
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert (
        cfg["format"] == "navit-export"
        and cfg["class_names"] == ["a", "b", "c", "d"]
        and cfg["seq_len"] == 64
    )
    loaded = NaViT.from_pretrained(tmp_path / "exp")
    assert loaded.class_names == ["a", "b", "c", "d"] and not loaded.training
    batch = pack_images(setup["images"][:6], PATCH, 64)
    with torch.no_grad():
        a, b = setup["net"](batch), loaded(batch)
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.logits, b.logits)
    # Exporting again replaces the export; a folder of other files is refused.
    assert run_cli(["export", str(setup["base"] / "run"), "--out", str(tmp_path / "exp")], capsys)[0] == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("x")
    code, cap = run_cli(["export", str(setup["base"] / "run"), "--out", str(tmp_path / "other")], capsys)
    assert code == 2 and "not a navit export" in cap.err and (tmp_path / "other" / "mine.txt").exists()


def test_from_pretrained_needs_only_torch_and_safetensors(setup, tmp_path):
    from model.pretrained import save_pretrained

    net = setup["net"]
    save_pretrained(tmp_path / "exp", net.state_dict(), net.cfg.to_dict())
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'pydantic', 'packer', 'trainer', 'cli', 'pyarrow'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from model import NaViT\n"
        f"net = NaViT.from_pretrained({str(tmp_path / 'exp')!r})\n"
        "print(type(net).__name__, net.cfg.dim)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == "NaViT 32"


def test_freeze_trunk_trains_only_the_head(setup, tmp_path, capsys):
    code, cap = _train(
        [
            "--init-from",
            str(setup["base"] / "run"),
            "--steps",
            "3",
            "--set",
            "train.freeze=trunk",
            "--set",
            "model.overrides.depth=2",  # the source's own value: accepted
            "--lr",
            "0.01",
        ],
        capsys,
        setup,
        tmp_path / "probe",
    )
    assert code == 0, cap.err
    before = setup["net"].state_dict()
    after = load_file(str(tmp_path / "probe" / "checkpoints" / "step-00000003" / "model.safetensors"))
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["head.bias", "head.weight"]
    meta = json.loads((tmp_path / "probe" / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["config"]["freeze"] == "trunk" and meta["init_from"]["kind"] == "checkpoint"


def test_reset_head_gives_a_new_head_for_other_classes(setup, tmp_path, capsys):
    exp = tmp_path / "exp"
    assert run_cli(["export", str(setup["base"] / "run"), "--out", str(exp)], capsys)[0] == 0
    # 6 classes wanted, the export's head has 4: refused without --reset-head ...
    code, cap = _train(
        ["--init-from", str(exp), "--steps", "1", "--set", "model.num_classes=6"],
        capsys,
        setup,
        tmp_path / "r1",
    )
    assert code == 2 and "--reset-head" in cap.err and cap.err.count("\n") == 1
    # ... and with it, the trunk starts from the export and the head is new, 6 wide.
    code, cap = _train(
        [
            "--init-from",
            str(exp),
            "--reset-head",
            "--steps",
            "1",
            "--set",
            "model.num_classes=6",
            "--lr",
            "1e-9",
        ],
        capsys,
        setup,
        tmp_path / "r2",
    )
    assert code == 0, cap.err
    w = load_file(str(tmp_path / "r2" / "checkpoints" / "step-00000001" / "model.safetensors"))
    assert w["head.weight"].shape == (6, 32)
    src = setup["net"].state_dict()
    torch.testing.assert_close(
        w["blocks.1.mlp.fc2.weight"], src["blocks.1.mlp.fc2.weight"], atol=1e-6, rtol=0
    )


def test_init_from_a_timm_state_dict_then_fine_tune(setup, tmp_path, capsys):
    sd = make_timm_state("avg")  # patch 8, 4x4 position table, 5-class head
    save_file(sd, str(tmp_path / "vit.safetensors"))
    code, cap = _train(
        [
            "--init-from",
            str(tmp_path / "vit.safetensors"),
            "--steps",
            "2",
            "--set",
            f"model.overrides.heads={HEADS}",
        ],
        capsys,
        setup,
        tmp_path / "ft",
    )
    assert code == 0, cap.err
    meta = json.loads((tmp_path / "ft" / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["model_config"]["posemb"] == "table2d" and meta["model_config"]["num_classes"] == 5
    assert meta["init_from"] == {
        "kind": "timm",
        "path": str(tmp_path / "vit.safetensors"),
        "reset_head": False,
    }


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--init-from", "{tmp}/nothing"], "--init-from {tmp}/nothing: not found"),
        (["--init-from", "{tmp}/vit16.safetensors"], "patch size 16, the data was packed with patch size 8"),
        (["--init-from", "{tmp}/junk.safetensors"], "cannot read weights"),
        (["--reset-head"], "--reset-head needs --init-from"),
        (["--init-from", "{run}", "--set", "model.overrides.depth=3"], "differ from"),
        (["--set", "train.freeze=all"], "freeze"),
    ],
)
def test_bad_init_input_is_one_line_and_exit_code_2(setup, tmp_path, capsys, argv, words):
    sd = make_timm_state("avg")
    sd["patch_embed.proj.weight"] = torch.zeros(32, 3, 16, 16)
    save_file(sd, str(tmp_path / "vit16.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    subs = {"{tmp}": str(tmp_path), "{run}": str(setup["base"] / "run")}
    args, words = list(argv), words
    for k, v in subs.items():
        args, words = [a.replace(k, v) for a in args], words.replace(k, v)
    code, cap = _train([*args, "--steps", "1"], capsys, setup, tmp_path / "out")
    assert code == 2 and words in cap.err, cap.err
    assert cap.err.strip().count("\n") <= 1  # a warmup note may precede the one error line
    assert not (tmp_path / "out" / "checkpoints").exists()
