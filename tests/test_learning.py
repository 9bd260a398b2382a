"""NaViT learns: held-out accuracy well above chance on a small task, and not behind a plain PyTorch
ViT of the same size trained on the same data with the same recipe (benchmarks/reference_vit.py,
the yardstick of benchmarks/bench_learning.py). No timing thresholds: only held-out accuracy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_learning import Recipe, Task, train_eval  # noqa: E402
from glyphs import glyph_digits  # noqa: E402

CHANCE = 0.1  # 10 balanced classes


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Small models gain nothing from intra-op threads on a shared 2-core box (see test_train.py).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits() -> Task:
    return Task(*glyph_digits(2000, 500, seed=0, difficulty=0.4))


# The benchmark's recipe (AdamW 1e-3, wd 0.05, clip 1, warmup + cosine, 20 images a step, patch 4
# on 28x28 = 49 tokens) on a smaller model and fewer steps.
SMALL = Recipe(steps=150, batch=20, dim=64, depth=2, heads=2)


def test_navit_learns_well_above_chance():
    # Mildly distorted digits, 2 blocks of width 32, 150 steps: measured 0.373 held-out with
    # today's defaults; the pre-issue-11 defaults stay at chance (0.100) on this budget.
    easy = Task(*glyph_digits(1000, 300, seed=0, difficulty=0.2))
    res = train_eval(
        "default", easy, Recipe(steps=150, batch=20, dim=32, depth=2, heads=2), 0, eval_train=False
    )
    assert res["heldout"] >= 2.5 * CHANCE, res


@pytest.mark.slow
def test_navit_keeps_up_with_a_plain_vit_of_the_same_size(digits):
    # Same data, same images in the same order, same optimiser and schedule, same seeds; two seeds
    # each, because one run of 150 steps moves by several points with the seed. Measured: ours
    # 0.566/0.462, reference 0.272/0.366; the pre-issue-11 defaults 0.170/0.128 (this test fails).
    ours = [train_eval("default", digits, SMALL, s, eval_train=False)["heldout"] for s in (0, 1)]
    ref = [train_eval("ref", digits, SMALL, s, eval_train=False)["heldout"] for s in (0, 1)]
    assert min(ours) > 3 * CHANCE, (ours, ref)
    assert sum(ours) / 2 >= sum(ref) / 2 - 0.03, (ours, ref)
