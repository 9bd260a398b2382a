"""trainer.checkpoint: atomic save, keep-last-K, safe loading, resolution of run directories."""

from __future__ import annotations

import json

import pytest
import torch

from packer.errors import NavitError
from trainer import checkpoint as ck


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _state(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"optimizer": opt.state_dict(), "rng": ck.rng_state()}


def test_roundtrip_and_keep_last(tmp_path):
    m = _model()
    for step in (10, 20, 30, 40):
        ck.save_checkpoint(tmp_path, step, m, _state(m), {"note": step}, keep=2)
    found = ck.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-00000030", "step-00000040"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    loaded = ck.load_checkpoint(tmp_path)  # a run dir resolves to its newest checkpoint
    assert loaded.step == 40 and loaded.meta["note"] == 40
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.weights[k], v)
    ts = loaded.train_state()
    assert ts["optimizer"]["state"][0]["step"] == 1
    assert torch.equal(ts["rng"]["torch"], torch.get_rng_state())


def test_half_written_checkpoint_is_ignored(tmp_path):
    m = _model()
    ck.save_checkpoint(tmp_path, 5, m, _state(m), {})
    # A crash mid-save leaves only a temp dir, or a final dir without meta.json: neither counts.
    (tmp_path / "checkpoints" / ".tmp-step-00000006-deadbeef").mkdir()
    (tmp_path / "checkpoints" / "step-00000007").mkdir()
    assert ck.load_checkpoint(tmp_path).step == 5


def test_state_file_refuses_arbitrary_objects(tmp_path):
    m = _model()
    path = ck.save_checkpoint(tmp_path, 1, m, _state(m), {})

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"optimizer": Evil()}, path / "state.pt")
    # The digest in meta.json no longer matches: refused before anything is unpickled.
    with pytest.raises(ck.CheckpointDamaged, match=r"state\.pt: .* bytes, expected"):
        ck.load_checkpoint(path).train_state()
    # Whoever can write the file can rewrite the digest too: weights_only still refuses the object.
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["state.pt"] = ck.file_digest(path / "state.pt")
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ck.load_checkpoint(path).train_state()


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(NavitError, match="not a checkpoint directory"):
        ck.load_checkpoint(tmp_path / "nothing")
    m = _model()
    path = ck.save_checkpoint(tmp_path, 1, m, _state(m), {})
    meta = json.loads((path / "meta.json").read_text())
    meta["version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(NavitError, match="version 99 is not supported"):
        ck.load_checkpoint(path)


# ------------------------------------------------------------ NaViT configs across versions


def _navit_checkpoint(tmp_path, model_config: dict, seed: int = 0):
    """A checkpoint of a small NaViT built from ``model_config`` as ``from_dict`` reads it."""
    from model import NaViT, NaViTConfig

    torch.manual_seed(seed)
    net = NaViT(NaViTConfig.from_dict(model_config)).eval()
    path = ck.save_checkpoint(tmp_path, 1, net, {}, {"model_config": model_config})
    return net, path


def _patch_batch(channels: int = 3):
    import numpy as np

    from model import pack_images

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, channels), dtype=np.uint8) for h, w in ((8, 12), (16, 8), (4, 4))]
    return pack_images(imgs, patch_size=4, seq_len=32, channels=channels)


_SMALL = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "num_classes": 5}


def test_old_model_config_without_new_fields_loads_with_legacy_behaviour(tmp_path):
    from model import LEGACY_DEFAULTS, NaViTConfig
    from trainer.evaluate import load_model

    # What a checkpoint written before issue 11 stores: every field of that time, none added since.
    old = NaViTConfig.preset("tiny", **_SMALL, **LEGACY_DEFAULTS).to_dict()
    for new_field in ("patch_norm", "init"):
        del old[new_field]
    net, path = _navit_checkpoint(tmp_path, old)
    loaded, meta = load_model(path, torch.device("cpu"))
    assert "patch_norm" not in meta["model_config"]
    cfg = loaded.cfg
    assert (cfg.patch_norm, cfg.init, cfg.pool) == (False, "trunc_normal", "attn")
    assert loaded.patch_norm is None and not any(k.startswith("patch_norm") for k in loaded.state_dict())
    batch = _patch_batch()
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, net(batch).logits)
    # Today's defaults differ from the legacy ones (init, pool, posemb_std), and are not used for it.
    today = NaViTConfig.preset("tiny", **_SMALL)
    assert [k for k in LEGACY_DEFAULTS if getattr(today, k) != LEGACY_DEFAULTS[k]]
    assert all(getattr(cfg, k) == v for k, v in LEGACY_DEFAULTS.items())


@pytest.mark.parametrize("patch_norm", [True, False])
def test_navit_checkpoint_round_trips_with_and_without_patch_norm(tmp_path, patch_norm):
    from model import NaViTConfig
    from trainer.evaluate import load_model

    cfg = NaViTConfig.preset("tiny", **_SMALL, patch_norm=patch_norm)
    stored = json.loads(json.dumps(cfg.to_dict()))
    assert stored["patch_norm"] is patch_norm
    net, path = _navit_checkpoint(tmp_path, stored)
    if patch_norm:  # make the LayerNorm's affine non-trivial, so that loading it is what is tested
        with torch.no_grad():
            net.patch_norm.weight.uniform_(0.5, 1.5)
            net.patch_norm.bias.uniform_(-0.5, 0.5)
        path = ck.save_checkpoint(tmp_path, 2, net, {}, {"model_config": stored})
    loaded, _ = load_model(path, torch.device("cpu"))
    assert loaded.cfg == cfg
    assert (loaded.patch_norm is not None) is patch_norm
    batch = _patch_batch()
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, net(batch).logits)


def test_resume_of_a_run_started_before_new_defaults_goes_on_with_its_model(tmp_path, monkeypatch):
    """A run written by the code of before issue 11 (no patch_norm/init fields, legacy defaults)
    resumes under today's defaults with the model it started with, bit for bit."""
    from train_fixtures import make_images, tiny_train_config, write_pack

    from model import LEGACY_DEFAULTS, NaViTConfig
    from trainer.data import open_source
    from trainer.loop import train

    images, labels = make_images(48, seed=5)
    pack = write_pack(tmp_path / "pack", images, labels, seq_len=64, shard_rows=6)

    def src(info):
        return open_source(str(pack), batch_size=4, seed=0)

    cfg = tiny_train_config(**{"schedule.steps": 6})
    torch.set_num_threads(1)
    with monkeypatch.context() as old_code:
        # The old code: presets built with the legacy values, configs stored without the new fields.
        preset, to_dict = NaViTConfig.preset.__func__, NaViTConfig.to_dict
        old_code.setattr(
            NaViTConfig, "preset", classmethod(lambda c, n, **kw: preset(c, n, **{**LEGACY_DEFAULTS, **kw}))
        )
        old_code.setattr(
            NaViTConfig,
            "to_dict",
            lambda self: {k: v for k, v in to_dict(self).items() if k not in ("patch_norm", "init")},
        )
        full = train(cfg, src, tmp_path / "full", verbose=False)
        train(cfg, src, tmp_path / "part", stop_after=3, verbose=False)
    stored = ck.load_checkpoint(tmp_path / "part").meta["model_config"]
    assert "patch_norm" not in stored and stored["pool"] == "attn"
    rest = train(cfg, src, tmp_path / "part", resume=True, verbose=False)
    assert rest.start_step == 3 and rest.losses == full.losses[3:]
    resumed = ck.load_checkpoint(tmp_path / "part")
    assert NaViTConfig.from_dict(resumed.meta["model_config"]) == NaViTConfig.from_dict(stored)
    assert any(k.startswith("pool.") for k in resumed.weights)


# ------------------------------------------------------------ integrity: digests in meta.json (issue 21)


def _damage(path, how: str) -> str:
    """Damage a checkpoint file as a failing disk or an interrupted copy would; returns its name."""
    if how == "truncated_state":
        f = path / "state.pt"
        f.write_bytes(f.read_bytes()[:1000])
        return "state.pt"
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight: still a valid safetensors file
    f.write_bytes(bytes(data))
    return "model.safetensors"


def test_checkpoint_meta_records_digests_that_loading_verifies(tmp_path):
    m = _model()
    path = ck.save_checkpoint(tmp_path, 1, m, _state(m), {})
    files = json.loads((path / "meta.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "state.pt"}
    assert files["state.pt"] == ck.file_digest(path / "state.pt")
    loaded = ck.load_checkpoint(path)
    assert loaded.verified and loaded.train_state()["optimizer"]["state"][0]["step"] == 1
    for how in ("flipped_weight", "truncated_state"):
        p = ck.save_checkpoint(tmp_path / how, 1, m, _state(m), {})
        name = _damage(p, how)
        with pytest.raises(ck.CheckpointDamaged, match=name) as e:
            ck.load_checkpoint(p).train_state()
        assert "\n" not in str(e.value)
    # Weights saved beside the model (the EMA) are digested and verified too.
    p = ck.save_checkpoint(tmp_path / "ema", 1, m, _state(m), {}, extra={"ema": _model()})
    assert set(json.loads((p / "meta.json").read_text())["files"]) == {
        "model.safetensors",
        "ema.safetensors",
        "state.pt",
    }
    (p / "ema.safetensors").write_bytes((p / "ema.safetensors").read_bytes()[:-3] + b"\0\0\0")
    with pytest.raises(ck.CheckpointDamaged, match="ema.safetensors: sha256 mismatch"):
        ck.load_checkpoint(p).extra_weights("ema")
    with pytest.raises(ck.CheckpointDamaged, match="ema.safetensors"):
        ck.verify_checkpoint(p)


def test_checkpoint_without_digests_still_loads_unverified(tmp_path):
    m = _model()
    path = ck.save_checkpoint(tmp_path, 1, m, _state(m), {})
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]  # as written before digests existed
    (path / "meta.json").write_text(json.dumps(meta))
    loaded = ck.load_checkpoint(path)
    assert not loaded.verified
    assert loaded.train_state()["optimizer"]["state"][0]["step"] == 1
    # Without digests a truncated state.pt is still one line, not a traceback.
    (path / "state.pt").write_bytes((path / "state.pt").read_bytes()[:500])
    with pytest.raises(ck.CheckpointDamaged, match="state.pt: cannot load") as e:
        ck.load_checkpoint(path).train_state()
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A CLI run of 6 steps with checkpoints at 3 and 6, and the pack it trained on."""
    from train_fixtures import make_images, run_cli_plain, write_pack

    base = tmp_path_factory.mktemp("ir")
    images, labels = make_images(48, seed=5)
    pack = write_pack(base / "pack", images, labels, seq_len=64, shard_rows=6)
    code, err = run_cli_plain(
        ["train", "--data", str(pack), "--out", str(base / "run"), *_TINY_CLI, "--steps", "6"]
    )
    assert code == 0, err
    return pack, base / "run"


_TINY_CLI = [
    "--set",
    "model.overrides={depth: 1, dim: 32, heads: 2}",
    "--device",
    "cpu",
    "--batch-size",
    "2",
    "--warmup",
    "1",
    "--checkpoint-every",
    "3",
]


@pytest.mark.parametrize("how", ["flipped_weight", "truncated_state"])
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_resumes(
    tmp_path, interrupted_run, capsys, how
):
    import shutil

    from train_fixtures import run_cli

    pack, done = interrupted_run
    run = tmp_path / "run"
    shutil.copytree(done, run)
    name = _damage(run / "checkpoints" / "step-00000006", how)
    argv = ["train", "--data", str(pack), "--out", str(run), *_TINY_CLI, "--steps", "8"]
    code, cap = run_cli([*argv, "--resume"], capsys)
    assert code == 2, cap.err
    line = cap.err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "step-00000006 is damaged" in line and name in line and "--resume-from step-00000003" in line, line
    # navit eval (any loader of the checkpoint) refuses the damaged weights too; state.pt is not its business.
    code, cap = run_cli(
        ["eval", str(pack), "--checkpoint", str(run / "checkpoints" / "step-00000006")], capsys
    )
    assert (code == 2) == (how == "flipped_weight"), cap.err
    code, cap = run_cli([*argv, "--resume-from", "previous"], capsys)
    assert code == 0, cap.err
    assert "resuming at step 3" in cap.err and "discarded-step-00000006" in cap.err
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["discarded-step-00000006", "step-00000003", "step-00000006", "step-00000008"]
    assert ck.load_checkpoint(run).step == 8


def test_resume_of_a_checkpoint_without_digests_says_so(tmp_path, interrupted_run, capsys):
    import shutil

    from train_fixtures import run_cli

    pack, done = interrupted_run
    run = tmp_path / "run"
    shutil.copytree(done, run)
    meta_file = run / "checkpoints" / "step-00000006" / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]
    meta_file.write_text(json.dumps(meta))
    code, cap = run_cli(["eval", str(pack), "--checkpoint", str(run)], capsys)
    assert code == 0 and "predates checkpoint digests: loaded unverified" in cap.err, cap.err
    argv = ["train", "--data", str(pack), "--out", str(run), *_TINY_CLI, "--steps", "7", "--resume"]
    code, cap = run_cli(argv, capsys)
    assert code == 0, cap.err
    assert "resuming at step 6 (its checkpoint predates digests: not verified)" in cap.err
    assert ck.load_checkpoint(run).verified  # the new checkpoint has digests
