"""timm ViT → NaViT conversion (model/timm_convert.py) and the resampled 2-D position table
(model/posemb_table.py).

Two references, both without network:
- timm itself (when installed; `make setup` installs it with --no-deps): tests/timm_runner.py builds
  small timm ViTs with random weights in a subprocess and saves timm's pooled features and logits;
- an independent plain-torch ViT forward written here from timm's layout (conv patch embedding on
  normalised NCHW images, pos table added, pre-norm blocks, avg/fc_norm/map pooling, head), which also
  checks non-square images against ``F.interpolate`` of the table."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from train_fixtures import run_cli

from model import NaViT, NaViTConfig, pack_images
from model.posemb_table import TablePosEmb
from model.timm_convert import TimmConvertError, convert_timm_vit

ROOT = Path(__file__).resolve().parents[1]


def _navit(conv) -> NaViT:
    net = NaViT(NaViTConfig.from_dict(conv.model_config))
    net.load_state_dict(conv.weights)
    return net.eval()


# ----------------------------------------------------------------------------------------------------
# The position table: per-token bilinear resampling equals F.interpolate of the whole table
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(4, 4), (2, 3), (7, 5), (1, 9), (12, 12), (3, 8)])
def test_table_posemb_equals_interpolating_the_table(grid):
    torch.manual_seed(0)
    size, dim = 4, 6
    pe = TablePosEmb(dim, size, init_std=1.0)
    gh, gw = grid
    rr, cc = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([rr, cc], -1).reshape(-1, 2)
    got = pe(pos, torch.tensor([gh, gw]).expand_as(pos))  # (gh*gw, D)
    table = pe.table.detach().reshape(size, size, dim).permute(2, 0, 1)[None]  # (1, D, G, G)
    want = F.interpolate(table, size=(gh, gw), mode="bilinear", align_corners=False)[0]
    want = want.permute(1, 2, 0).reshape(-1, dim)
    torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-6)
    if grid == (size, size):  # the table's own grid reads its rows exactly
        assert torch.equal(got.detach(), pe.table.detach())


# ----------------------------------------------------------------------------------------------------
# An independent reference: timm's VisionTransformer forward, in plain torch, from a state dict
# ----------------------------------------------------------------------------------------------------

DIM, HEADS, PATCH, GRID = 32, 4, 8, 4


def make_timm_state(pool: str, *, fc_norm=False, layerscale=False, qkv_bias=True, qk_norm=False, cls=False):
    """A random state dict with timm ViT key names and shapes (depth 2, 5 classes)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape, mean=0.0):
        return (torch.randn(*shape, generator=g) * 0.2 + mean).contiguous()

    sd = {
        "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH),
        "patch_embed.proj.bias": r(DIM),
        "pos_embed": r(1, GRID * GRID + int(cls), DIM),
        "head.weight": r(5, DIM),
        "head.bias": r(5),
    }
    if cls:
        sd["cls_token"] = r(1, 1, DIM)
    norm = "fc_norm" if fc_norm else "norm"
    sd[f"{norm}.weight"], sd[f"{norm}.bias"] = r(DIM, mean=1.0), r(DIM)
    for i in range(2):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[b + n + ".weight"], sd[b + n + ".bias"] = r(DIM, mean=1.0), r(DIM)
        sd[b + "attn.qkv.weight"] = r(3 * DIM, DIM)
        if qkv_bias:
            sd[b + "attn.qkv.bias"] = r(3 * DIM)
        if qk_norm:
            for n in ("q_norm", "k_norm"):
                sd[f"{b}attn.{n}.weight"], sd[f"{b}attn.{n}.bias"] = (
                    r(DIM // HEADS, mean=1.0),
                    r(DIM // HEADS),
                )
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = r(DIM, DIM), r(DIM)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = r(4 * DIM, DIM), r(4 * DIM)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = r(DIM, 4 * DIM), r(DIM)
        if layerscale:
            sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = r(DIM, mean=0.5), r(DIM, mean=0.5)
    if pool == "map":
        sd["attn_pool.latent"] = r(1, 1, DIM)
        for n, (o, i) in {
            "q": (DIM, DIM),
            "kv": (2 * DIM, DIM),
            "proj": (DIM, DIM),
            "mlp.fc1": (4 * DIM, DIM),
            "mlp.fc2": (DIM, 4 * DIM),
        }.items():
            sd[f"attn_pool.{n}.weight"], sd[f"attn_pool.{n}.bias"] = r(o, i), r(o)
        sd["attn_pool.norm.weight"], sd["attn_pool.norm.bias"] = r(DIM, mean=1.0), r(DIM)
    return sd


def _ln(x, sd, name, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def reference_forward(sd, images: torch.Tensor, pool: str, mean, std):
    """timm VisionTransformer.forward_head(pre_logits=True) and logits for (N, H, W, 3) uint8 images
    of one size; the position table is bilinearly resized to the image's grid when it differs."""
    x = ((images.float() / 255 - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2)
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)  # (N, D, h, w)
    n, d, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)  # (N, h*w, D)
    pos = sd["pos_embed"][:, -GRID * GRID :].reshape(1, GRID, GRID, d).permute(0, 3, 1, 2)
    if (h, w) != (GRID, GRID):
        pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
    x = x + pos.flatten(2).transpose(1, 2)
    hd = d // HEADS
    for i in range(2):
        b = f"blocks.{i}."
        y = _ln(x, sd, b + "norm1")
        qkv = _lin(y, sd, b + "attn.qkv").reshape(n, -1, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if b + "attn.q_norm.weight" in sd:
            q, k = _ln(q, sd, b + "attn.q_norm"), _ln(k, sd, b + "attn.k_norm")
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), -1) @ v
        y = _lin(a.transpose(1, 2).reshape(n, -1, d), sd, b + "attn.proj")
        x = x + y * sd.get(b + "ls1.gamma", 1.0)
        y = _lin(F.gelu(_lin(_ln(x, sd, b + "norm2"), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        x = x + y * sd.get(b + "ls2.gamma", 1.0)
    if "norm.weight" in sd:
        x = _ln(x, sd, "norm")
    if pool == "map":
        q = _lin(sd["attn_pool.latent"].expand(n, -1, -1), sd, "attn_pool.q").reshape(n, 1, HEADS, hd)
        k, v = _lin(x, sd, "attn_pool.kv").reshape(n, -1, 2, HEADS, hd).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q.transpose(1, 2) @ k.transpose(-2, -1) / math.sqrt(hd), -1) @ v  # (N, H, 1, hd)
        o = _lin(a.transpose(1, 2).reshape(n, 1, d), sd, "attn_pool.proj")
        o = o + _lin(
            F.gelu(_lin(_ln(o, sd, "attn_pool.norm"), sd, "attn_pool.mlp.fc1")), sd, "attn_pool.mlp.fc2"
        )
        feats = o[:, 0]
    else:
        feats = x.mean(1)
    if "fc_norm.weight" in sd:
        feats = _ln(feats, sd, "fc_norm")
    return feats, _lin(feats, sd, "head")


VARIANTS = {
    "avg+fc_norm": ("avg", {"fc_norm": True}),
    "avg+layerscale, no qkv bias": ("avg", {"layerscale": True, "qkv_bias": False}),
    "avg+qk_norm": ("avg", {"qk_norm": True}),
    "map": ("map", {}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_vit_equals_the_reference_forward(variant):
    pool, kw = VARIANTS[variant]
    sd = make_timm_state(pool, **kw)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    conv = convert_timm_vit(sd, heads=HEADS, pixel_mean=mean, pixel_std=std)
    assert conv.notes == [] and conv.model_config["posemb"] == "table2d"
    net = _navit(conv)
    rng = np.random.default_rng(0)
    for side_h, side_w in [(GRID * PATCH, GRID * PATCH), (3 * PATCH, 6 * PATCH)]:  # square, then not
        imgs = torch.from_numpy(rng.integers(0, 256, (3, side_h, side_w, 3), dtype=np.uint8))
        want_f, want_l = reference_forward(sd, imgs, pool, mean, std)
        with torch.no_grad():
            out = net(pack_images(list(imgs.numpy()), PATCH, 64))
        torch.testing.assert_close(out.embeddings, want_f, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.logits, want_l, atol=1e-4, rtol=1e-4)


def test_class_token_is_dropped_with_a_note_and_changes_the_features():
    sd = make_timm_state("avg", cls=True)
    conv = convert_timm_vit(sd, heads=HEADS)
    assert any("class token dropped" in n for n in conv.notes)
    assert conv.weights["pos_embed.table"].shape == (GRID * GRID, DIM)  # the class row removed
    assert torch.equal(conv.weights["pos_embed.table"], sd["pos_embed"][0, 1:])


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda sd: sd.update({"blocks.0.attn.rel_pos_h": torch.zeros(3)}), "unknown timm keys"),
        (lambda sd: sd.update({"norm_pre.weight": torch.ones(DIM)}), "norm_pre"),
        (lambda sd: sd.pop("blocks.1.mlp.fc1.weight"), "blocks.1.mlp.fc1.weight missing"),
        (lambda sd: sd.update({"pos_embed": torch.zeros(1, 15, DIM)}), "not a square grid"),
        (lambda sd: sd.pop("patch_embed.proj.weight"), "not a timm ViT"),
    ],
)
def test_non_standard_state_dicts_are_refused_in_one_line(change, words):
    sd = make_timm_state("avg")
    change(sd)
    with pytest.raises(TimmConvertError, match=words) as e:
        convert_timm_vit(sd, heads=HEADS)
    assert "\n" not in str(e.value)


def test_cli_refuses_unknown_timm_keys_with_exit_code_2(tmp_path, capsys):
    sd = make_timm_state("avg")
    sd["blocks.0.mlp.fc1_g.weight"] = torch.zeros(4, DIM)  # SwiGLU: not a standard ViT MLP
    save_file(sd, str(tmp_path / "vit.safetensors"))
    code, cap = run_cli(["export", str(tmp_path / "vit.safetensors"), "--out", str(tmp_path / "x")], capsys)
    assert code == 2
    assert "unknown timm keys ['blocks.0.mlp.fc1_g.weight']" in cap.err and cap.err.count("\n") == 1
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------
# timm itself
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed (pip install timm)")
def test_converted_timm_vits_match_timm_features(tmp_path):
    """navit's forward on square images equals timm's pooled features and logits within 1e-4 for
    each pooling kind navit maps (timm builds the models; random weights, no network)."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "timm_runner.py"), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    sys.path.insert(0, str(ROOT / "tests"))
    from timm_runner import CASES, HEADS, MEAN, PATCH, STD

    for name in CASES:
        conv = convert_timm_vit(
            load_file(str(tmp_path / f"{name}.safetensors")), heads=HEADS, pixel_mean=MEAN, pixel_std=STD
        )
        expected = load_file(str(tmp_path / f"{name}.expected.safetensors"))
        with torch.no_grad():
            out = _navit(conv)(pack_images(list(expected["images"].numpy()), PATCH, 64))
        torch.testing.assert_close(out.embeddings, expected["features"], atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(out.logits, expected["logits"], atol=1e-4, rtol=1e-4, msg=name)
