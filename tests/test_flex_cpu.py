"""The flex attention backend without a GPU: torch compiles flex_attention's *forward* on CPU, so its
document mask is checked here against the per-image reference, and `navit eval --set
model.attention=flex` is checked against the default backend. (Backward is CUDA-only: the GPU check,
scripts/gpu_check.sh, runs forward+backward of every backend on CUDA.)

One compile of ~15-20 s on the shared 2-core machine: both tests use the same shapes (2 rows of 64
tokens, 2 heads of 32), so the second reuses the first's kernel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_attention import per_image_reference, random_segments
from train_fixtures import make_images, run_cli, write_image_folder

from model import NaViT, NaViTConfig
from model.attention import build_layout
from trainer import checkpoint as ck

pytestmark = pytest.mark.slow

ROWS, LENGTH, HEADS, HEAD_DIM = 2, 64, 2, 32


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_flex_forward_on_cpu_matches_per_image_reference():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    seg = random_segments(rng, rows=ROWS, length=LENGTH)
    seg[1, :10] = 1  # at least one image in the second row (random_segments may leave a row empty)
    # q, k, v cut from one (B, L, 3, H, d) tensor as the model's Attention does: the same strides,
    # so the eval test below reuses this compiled kernel
    q, k, v = torch.randn(ROWS, LENGTH, 3, HEADS, HEAD_DIM).unbind(2)  # (B, L, H, d) each
    lay = build_layout(seg, "flex")
    got = lay.attend(q, k, v) * (seg > 0)[..., None, None]  # padding tokens' outputs are dropped
    assert torch.allclose(got, per_image_reference(seg, q, k, v), atol=1e-5, rtol=1e-5)


def test_navit_eval_with_flex_on_cpu_equals_segment(tmp_path, capsys):
    # 8 images of 32x32 px at patch 8 = 16 tokens each: 4 per row of 64 → 2 rows, one batch.
    images, labels = make_images(8, seed=2, sides=(32,))
    folder = write_image_folder(tmp_path / "val", images, labels)
    cfg = NaViTConfig.preset("tiny", depth=2, dim=HEADS * HEAD_DIM, heads=HEADS, patch_size=8, num_classes=4)
    torch.manual_seed(0)
    net = NaViT(cfg)
    meta = {"model_config": cfg.to_dict(), "patch_size": 8, "seq_len": LENGTH, "class_names": None}
    run = tmp_path / "run"
    ck.save_checkpoint(run, 1, net, {}, meta)

    def eval_json(*extra):
        argv = ["eval", str(folder), "--checkpoint", str(run), "--resolutions", "native", "--json"]
        code, cap = run_cli([*argv, "--device", "cpu", "--batch-rows", str(ROWS), *extra], capsys)
        assert code == 0, cap.err
        return json.loads(cap.out)["results"][0]

    flex = eval_json("--set", "model.attention=flex")
    segment = eval_json()
    assert flex["images"] == segment["images"] == 8
    assert flex["top1"] == segment["top1"] and flex["top5"] == segment["top5"]
    assert flex["loss"] == pytest.approx(segment["loss"], rel=1e-5)

    code, cap = run_cli(["eval", str(folder), "--checkpoint", str(run), "--set", "model.depth=3"], capsys)
    assert code == 2 and "only model.attention" in cap.err
