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
