import pytest

from cli.common import pack_config_from_flags
from packer.config import PackConfig, load_pack_config, parse_resolution, parse_token_drop
from packer.errors import ConfigError


def test_defaults_are_the_papers_best():
    cfg = PackConfig()
    assert cfg.resolution.kind == "truncnormal"
    assert (cfg.resolution.lo, cfg.resolution.hi) == (64, 384)
    assert cfg.packing.packer == "bfd"
    assert cfg.packing.token_cap == cfg.packing.seq_len


def test_invalid_value_is_one_line_naming_field_and_range():
    with pytest.raises(ConfigError) as e:
        load_pack_config(None, {"packing.seq_len": 0})
    msg = str(e.value)
    assert "\n" not in msg
    assert "packing.seq_len" in msg and ">= 1" in msg


def test_unknown_field_and_bad_literal():
    with pytest.raises(ConfigError, match="packing.bogus: unknown field"):
        load_pack_config(None, {"packing.bogus": 3})
    with pytest.raises(ConfigError, match="packing.packer: must be one of"):
        load_pack_config(None, {"packing.packer": "magic"})


def test_yaml_file_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 7\npacking:\n  seq_len: 512\n  patch_size: 8\n")
    cfg = pack_config_from_flags(f, seq_len=256, resolution="uniform:32:128", token_drop="beta:0.25:0.5")
    assert (cfg.seed, cfg.packing.seq_len, cfg.packing.patch_size) == (7, 256, 8)
    assert (cfg.resolution.kind, cfg.resolution.lo, cfg.resolution.hi) == ("uniform", 32, 128)
    assert (cfg.token_drop.kind, cfg.token_drop.mean, cfg.token_drop.max) == ("beta", 0.25, 0.5)


def test_spec_strings():
    assert parse_resolution("truncnormal:-0.5:1:64:384") == {
        "kind": "truncnormal",
        "mean": -0.5,
        "std": 1.0,
        "lo": 64,
        "hi": 384,
    }
    assert parse_resolution("native") == {"kind": "native"}
    assert parse_token_drop("constant:0.3") == {"kind": "constant", "rate": 0.3}
    with pytest.raises(ConfigError):
        parse_resolution("gaussian:1")
    with pytest.raises(ConfigError):
        parse_token_drop("beta:x:0.5")


def test_fingerprint_is_stable_and_sensitive():
    a, b = PackConfig(), PackConfig()
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != load_pack_config(None, {"seed": 1}).fingerprint()
