"""How every command that takes config resolves it (issues 20 and 21): config file < --set < an
explicit flag, unset flags never override, and every mistake — an unknown key or section, an invalid
value, a file that is not text — is one line on stderr with exit code 2.

The commands run in-process (run_cli). Where the command would go on to start Ray or train, the
function it hands the resolved config to is replaced by one that raises ``Resolved(config)``, so the
test sees exactly the config the command would have run with, in milliseconds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from train_fixtures import make_images, run_cli, write_pack


class Resolved(Exception):
    """Raised by the stand-ins below with the config a command resolved."""

    def __init__(self, cfg, train_cfg=None) -> None:
        super().__init__("resolved")
        self.cfg = cfg
        self.train_cfg = train_cfg


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    images, labels = make_images(16, seed=1)
    return write_pack(tmp_path_factory.mktemp("cfgcli") / "pack", images, labels)


@pytest.fixture()
def images_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    return d


@pytest.fixture()
def stand_ins(monkeypatch):
    """Replace what each command hands its resolved config to."""

    def fake_scan(source, cfg, **kw):
        raise Resolved(cfg)

    def fake_pack(source, out, cfg, **kw):
        raise Resolved(cfg)

    def fake_live_source(source, cfg, **kw):
        raise Resolved(cfg)

    def fake_train(cfg, source_factory, out, **kw):
        if source_factory.__name__ == "make_live":  # the live pack config, with the train config
            try:
                source_factory(SimpleNamespace(rank=0, world_size=1, local_rank=0))
            except Resolved as r:
                raise Resolved(r.cfg, cfg) from None
        raise Resolved(None, cfg)

    monkeypatch.setattr("packer.plan.planner.scan_source", fake_scan)
    monkeypatch.setattr("packer.build.pipeline.pack", fake_pack)
    monkeypatch.setattr("packer.serve.epochs.LiveSource", fake_live_source)
    monkeypatch.setattr("trainer.streams.live_source", fake_live_source)
    monkeypatch.setattr("trainer.loop.train", fake_train)


def _argv(command: str, src: str, tmp_path) -> list[str]:
    """The command line up to the config options, for each command that takes pack config."""
    return {
        "plan": ["plan", src],
        "pack": ["pack", src, "--out", str(tmp_path / "out")],
        "serve": ["serve", src, "--port", "0", "-q"],
        "train-live": ["train", "--images", src, "--out", str(tmp_path / "run"), "--device", "cpu"],
    }[command]


def _resolve(argv, capsys):
    """Run the command; return (pack config, train config) it resolved, or fail with its output."""
    try:
        code, cap = run_cli(argv, capsys)
    except Resolved as r:
        return r.cfg, r.train_cfg
    pytest.fail(f"exit {code} before the config was used: {cap.err.strip()}")


# (dotted field, YAML value in the file, --set value, flag argv, value after the flag, accessor)
PACK_FIELDS = {
    "seed": ("3", "4", ["--seed", "5"], 5, lambda c: c.seed),
    "packing.seq_len": ("512", "128", ["--seq-len", "256"], 256, lambda c: c.packing.seq_len),
    "packing.patch_size": ("8", "4", ["--patch-size", "32"], 32, lambda c: c.packing.patch_size),
    "packing.max_images_per_seq": (
        "10",
        "20",
        ["--max-images-per-seq", "30"],
        30,
        lambda c: c.packing.max_images_per_seq,
    ),
    "packing.max_tokens_per_image": (
        "50",
        "60",
        ["--max-tokens-per-image", "70"],
        70,
        lambda c: c.packing.max_tokens_per_image,
    ),
    "packing.packer": (
        "next-fit",
        "first-fit",
        ["--packer", "histogram"],
        "histogram",
        lambda c: c.packing.packer,
    ),
    "packing.exact_fill": ("false", "true", ["--no-exact-fill"], False, lambda c: c.packing.exact_fill),
    "augment.hflip": ("0.1", "0.2", ["--hflip", "0.3"], 0.3, lambda c: c.augment.hflip),
    "augment.crop_scale": (
        "[0.5, 1.0]",
        "[0.6, 1.0]",
        ["--crop", "0.7:1"],
        (0.7, 1.0),
        lambda c: c.augment.crop_scale,
    ),
    "resolution.lo": ("40", "48", ["--resolution", "uniform:16:96"], 16, lambda c: c.resolution.lo),
    "token_drop.rate": ("0.1", "0.2", ["--token-drop", "constant:0.3"], 0.3, lambda c: c.token_drop.rate),
    "output.shard_rows": ("5", "6", ["--shard-rows", "7"], 7, lambda c: c.output.shard_rows),
    "output.epochs": ("2", "3", ["--epochs", "4"], 4, lambda c: c.output.epochs),
}
# The flag-backed fields of each command (serve has no --crop/--hflip; live train takes the
# geometry flags, and its seed is the train config's).
COMMAND_FIELDS = {
    "plan": [f for f in PACK_FIELDS if not f.startswith("output.")],
    "pack": list(PACK_FIELDS),
    "serve": [f for f in PACK_FIELDS if not f.startswith(("output.", "augment."))],
    "train-live": ["packing.seq_len", "packing.patch_size", "resolution.lo", "token_drop.rate"],
}


def _config_file(tmp_path, fields: dict, table: dict, section: str | None) -> str:
    """A config file setting each of ``fields`` to its file value (under ``section:`` if given)."""
    import yaml

    tree: dict = {"token_drop": {"kind": "constant"}, "resolution": {"kind": "uniform", "hi": 96}}
    for dotted in fields:
        *parents, leaf = dotted.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(table[dotted][0])
    tree = {k: v for k, v in tree.items() if any(f.split(".")[0] == k for f in fields)}
    if section == "pack":  # a live train's file: a train: section beside the pack: one
        tree = {"pack": tree, "train": {"seed": 0}}
    elif section:
        tree = {section: tree}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _check_precedence(base: list[str], fields: list[str], table: dict, which: int, capsys) -> None:
    """Run ``base`` with the file alone, + --set of every field, + every field's flag."""
    import yaml

    def norm(v):
        return tuple(v) if isinstance(v, list) else v

    sets = [x for f in fields for x in ("--set", f"{f}={table[f][1]}")]
    flags = [x for f in fields for x in table[f][2]]
    stages = [
        ("file", base, {f: norm(yaml.safe_load(table[f][0])) for f in fields}),
        ("file + --set", [*base, *sets], {f: norm(yaml.safe_load(table[f][1])) for f in fields}),
        ("file + --set + flags", [*base, *sets, *flags], {f: table[f][3] for f in fields}),
    ]
    for stage, argv, want in stages:
        cfg = _resolve(argv, capsys)[which]
        got = {f: table[f][4](cfg) for f in fields}
        wrong = {f: (got[f], want[f]) for f in fields if got[f] != want[f]}
        assert not wrong, f"{stage}: (got, expected) {wrong}"


@pytest.mark.parametrize("command", list(COMMAND_FIELDS))
def test_file_then_set_then_flag(command, tmp_path, images_dir, stand_ins, capsys):
    """Issue 21: `--set` was dropped for every field that also has a flag (the unset flag's None
    overwrote it). Precedence: file < --set < explicit flag; a flag not given changes nothing.
    Every flag-backed field of the command at once: file alone, then --set, then the flags."""
    fields = COMMAND_FIELDS[command]
    cfg_file = _config_file(tmp_path, fields, PACK_FIELDS, "pack" if command == "train-live" else None)
    base = _argv(command, str(images_dir), tmp_path) + ["--config", cfg_file]
    _check_precedence(base, fields, PACK_FIELDS, 0, capsys)


def test_the_issues_repro_on_pack(tmp_path, images_dir, stand_ins, capsys):
    cfg, _ = _resolve(
        _argv("pack", str(images_dir), tmp_path)
        + ["--set", "packing.seq_len=128", "--set", "packing.patch_size=8"],
        capsys,
    )
    assert (cfg.packing.seq_len, cfg.packing.patch_size) == (128, 8)


def test_set_null_resets_a_file_value(tmp_path, images_dir, stand_ins, capsys):
    """--set KEY=null is a value like any other (back to 'unset'), not an absent flag."""
    f = tmp_path / "c.yaml"
    f.write_text("packing: {max_tokens_per_image: 50}\n")
    argv = _argv("plan", str(images_dir), tmp_path) + [
        "--config",
        str(f),
        "--set",
        "packing.max_tokens_per_image=null",
    ]
    assert _resolve(argv, capsys)[0].packing.max_tokens_per_image is None


# The train config's own flags: (dotted, file value, --set value, flag argv, value after the flag, accessor)
TRAIN_FIELDS = {
    "seed": ("3", "4", ["--seed", "5"], 5, lambda c: c.seed),
    "model.preset": ("small", "base", ["--preset", "tiny"], "tiny", lambda c: c.model.preset),
    "model.attention": ("dense", "segment", ["--attention", "dense"], "dense", lambda c: c.model.attention),
    "schedule.steps": ("50", "60", ["--steps", "70"], 70, lambda c: c.schedule.steps),
    "schedule.warmup_steps": ("5", "6", ["--warmup", "7"], 7, lambda c: c.schedule.warmup_steps),
    "data.batch_size": ("2", "3", ["--batch-size", "1"], 1, lambda c: c.data.batch_size),
    "data.grad_accum": ("2", "3", ["--grad-accum", "4"], 4, lambda c: c.data.grad_accum),
    "data.workers": ("1", "2", ["--workers", "0"], 0, lambda c: c.data.workers),
    "optim.lr": ("0.1", "0.2", ["--lr", "0.3"], 0.3, lambda c: c.optim.lr),
    "device": ("auto", "cpu", ["--device", "auto"], "auto", lambda c: c.device),
    "checkpoint.every": ("5", "6", ["--checkpoint-every", "7"], 7, lambda c: c.checkpoint.every),
    "compile": ("true", "false", ["--compile"], True, lambda c: c.compile),
}


def test_train_file_then_set_then_flag(tiny_pack, tmp_path, stand_ins, capsys):
    fields = list(TRAIN_FIELDS)
    cfg_file = _config_file(tmp_path, fields, TRAIN_FIELDS, "train")
    base = ["train", "--data", str(tiny_pack), "--out", str(tmp_path / "run"), "--config", cfg_file]
    _check_precedence(base, fields, TRAIN_FIELDS, 1, capsys)


def test_live_train_set_reaches_the_pack_config(tmp_path, images_dir, stand_ins, capsys):
    """The issue's live-train case: pack fields given with --set (no flag) reach the live packer."""
    argv = _argv("train-live", str(images_dir), tmp_path)
    argv += [
        "--set",
        "packing.seq_len=128",
        "--set",
        "packing.max_images_per_seq=9",
        "--set",
        "augment.hflip=0.5",
    ]
    argv += ["--set", "optim.lr=0.01"]
    pack_cfg, train_cfg = _resolve(argv, capsys)
    assert (pack_cfg.packing.seq_len, pack_cfg.packing.max_images_per_seq, pack_cfg.augment.hflip) == (
        128,
        9,
        0.5,
    )
    assert train_cfg.optim.lr == 0.01


# ----------------------------------------------------------------------------------------------------
# Refusals: one line naming the key, exit code 2, for every command that takes config
# ----------------------------------------------------------------------------------------------------

ALL_COMMANDS = ["plan", "pack", "serve", "train-live", "train-data"]


def _command(cmd, tmp_path, images_dir, tiny_pack) -> list[str]:
    if cmd == "train-data":
        return ["train", "--data", str(tiny_pack), "--out", str(tmp_path / "run"), "--device", "cpu"]
    return _argv(cmd, str(images_dir), tmp_path)


def _refused(argv, capsys, *words) -> str:
    try:
        code, cap = run_cli(argv, capsys)
    except Resolved:
        pytest.fail(f"{argv} ran with the config instead of refusing it")
    err = cap.err.strip()
    assert code == 2, (code, err)
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_unknown_set_keys_are_refused(cmd, tmp_path, images_dir, tiny_pack, stand_ins, capsys):
    """Issue 20: `train --set optimm.lr=5` / `--set nope=1` trained with defaults, exit 0."""
    base = _command(cmd, tmp_path, images_dir, tiny_pack)
    _refused([*base, "--set", "nope=1"], capsys, "nope")
    _refused([*base, "--set", "optimm.lr=5"], capsys, "optimm")
    _refused([*base, "--set", "=5"], capsys, "--set")
    _refused([*base, "--set", "packing..seq_len=5"], capsys, "--set")


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_unknown_top_level_key_beside_a_section_is_refused(
    cmd, tmp_path, images_dir, tiny_pack, stand_ins, capsys
):
    """Issue 20: a YAML `bogus_top: 1` beside `train:` (or `pack:`) was ignored."""
    base = _command(cmd, tmp_path, images_dir, tiny_pack)
    f = tmp_path / "c.yaml"
    f.write_text("pack:\n  seed: 1\ntrain:\n  seed: 1\nbogus_top: 1\n")
    _refused([*base, "--config", str(f)], capsys, "bogus_top")


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_invalid_set_values_are_refused(cmd, tmp_path, images_dir, tiny_pack, stand_ins, capsys):
    """Issue 21: `--set packing.seq_len=-1` was dropped (exit 0) like any --set of a flagged field."""
    base = _command(cmd, tmp_path, images_dir, tiny_pack)
    if cmd == "train-data":
        _refused([*base, "--set", "optim.lr=-1"], capsys, "optim.lr")
        _refused([*base, "--set", "data.batch_size="], capsys, "data.batch_size")
    else:
        _refused([*base, "--set", "packing.seq_len=-1"], capsys, "packing.seq_len", ">= 1")
        _refused([*base, "--set", "packing.seq_len="], capsys, "packing.seq_len")


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_unreadable_config_files_are_refused(cmd, tmp_path, images_dir, tiny_pack, stand_ins, capsys):
    """Issue 21: a binary file (UnicodeDecodeError) or YAML nested 10k deep (RecursionError)."""
    base = _command(cmd, tmp_path, images_dir, tiny_pack)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    _refused([*base, "--config", str(binary)], capsys, "bin.yaml")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 10_000 + "]" * 10_000 + "\n")
    _refused([*base, "--config", str(deep)], capsys, "deep.yaml")
    _refused([*base, "--set", "seed=" + "[" * 10_000 + "]" * 10_000], capsys, "seed")


def test_pack_settings_without_live_packing_are_refused(tiny_pack, tmp_path, stand_ins, capsys):
    """With --data (or serving a pack) the packing is fixed: a packing --set or flag would be ignored."""
    train = ["train", "--data", str(tiny_pack), "--out", str(tmp_path / "run")]
    _refused([*train, "--set", "packing.seq_len=128"], capsys, "packing.seq_len", "--images")
    _refused([*train, "--seq-len", "128"], capsys, "--seq-len", "--images")
    serve = ["serve", str(tiny_pack), "--port", "0", "-q"]
    _refused([*serve, "--set", "packing.seq_len=128"], capsys, "--set", "pack")
    _refused([*serve, "--seq-len", "128"], capsys, "--seq-len", "pack")


# ----------------------------------------------------------------------------------------------------
# Model values that crashed training (issues 20, 21)
# ----------------------------------------------------------------------------------------------------

BAD_MODEL = [
    ("{dim: nan}", ["dim", "nan"]),  # was: "model: not all arguments converted during string formatting"
    ("{dim: 0}", ["dim"]),  # ZeroDivisionError
    ("{heads: 0}", ["heads"]),  # ZeroDivisionError
    ("{dropout: nan}", ["dropout"]),  # a Python type error as the message
    ("{dropout: .nan}", ["dropout"]),
    ("{norm_eps: .inf}", ["norm_eps"]),
    ("{depth: 0}", ["depth"]),  # accepted: a model with no blocks
    ("{depth: 100000}", ["depth"]),  # over a minute in the memory check
    ("{qk_norm: 3}", ["qk_norm"]),
    ("{bogus: 1}", ["bogus"]),
    ("{1: 2}", ["1"]),
]


@pytest.mark.parametrize(("value", "words"), BAD_MODEL, ids=[v for v, _ in BAD_MODEL])
def test_bad_model_overrides_are_one_line(value, words, tiny_pack, tmp_path, capsys):
    argv = [
        "train",
        "--data",
        str(tiny_pack),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--steps",
        "1",
    ]
    argv += ["--batch-size", "1"]
    err = _refused([*argv, "--set", f"model.overrides={value}"], capsys, "model.overrides", *words)
    assert "string formatting" not in err and "not supported between" not in err


@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_cpu_training_with_a_gpu_only_attention_backend_is_refused(backend, tiny_pack, tmp_path, capsys):
    """FlexAttention has no backward on CPU and varlen needs CUDA: say so and name the CPU choice."""
    argv = [
        "train",
        "--data",
        str(tiny_pack),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--steps",
        "1",
    ]
    argv += ["--batch-size", "1", "--warmup", "0", "--set", "model.overrides={depth: 1, dim: 32, heads: 2}"]
    _refused([*argv, "--attention", backend], capsys, backend, "segment", "CPU")
    _refused([*argv, "--set", f"model.attention={backend}"], capsys, backend, "segment")
    _refused([*argv, "--set", "model.attention=magic"], capsys, "model.attention")
