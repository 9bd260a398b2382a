"""Run in a subprocess by tests/test_timm_convert.py: build small timm ViTs with random weights and
save, per case, the state dict and timm's own pooled features and logits on given images.

    python tests/timm_runner.py OUT_DIR

timm imports torchvision at import time (transforms, FrozenBatchNorm2d), but a ViT's forward uses
none of it. PyPI's torchvision does not import beside a CPU-only local torch build (the CI machine's),
so when ``import torchvision`` fails, a stand-in package is installed *in this subprocess only*:
any attribute is a placeholder class, enough for timm's imports. The ViT code under test is timm's
own; the stand-in never runs in the test process.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from pathlib import Path

# (name, VisionTransformer keyword arguments): the pooling kinds navit maps exactly.
CASES = {
    "avg_fc_norm": {"class_token": False, "global_pool": "avg", "fc_norm": True},
    "avg_layerscale_noqkvbias": {
        "class_token": False,
        "global_pool": "avg",
        "fc_norm": False,
        "init_values": 0.5,
        "qkv_bias": False,
    },
    "map": {"class_token": False, "global_pool": "map"},
    "avg_qk_norm": {"class_token": False, "global_pool": "avg", "fc_norm": False, "qk_norm": True},
}
IMG, PATCH, DIM, DEPTH, HEADS, CLASSES = 48, 16, 64, 2, 4, 5
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class _Placeholder(type):
    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {"__init__": lambda self, *a, **k: None})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module) -> None:
        pass


def ensure_torchvision() -> str:
    try:
        import torchvision  # noqa: F401

        return "torchvision"
    except Exception:  # ImportError, or RuntimeError from a build that does not match torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder())
        return "stand-in"


def main(out: Path) -> None:
    tv = ensure_torchvision()
    import torch
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, IMG, IMG, 3), dtype=torch.uint8)  # (N, H, W, C) pixels
    x = (images.float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    x = x.permute(0, 3, 1, 2).contiguous()
    for name, kw in CASES.items():
        net = VisionTransformer(
            img_size=IMG,
            patch_size=PATCH,
            embed_dim=DIM,
            depth=DEPTH,
            num_heads=HEADS,
            num_classes=CLASSES,
            **kw,
        ).eval()
        with torch.no_grad():
            for p in net.parameters():  # random weights everywhere (norms and biases too)
                p.add_(torch.randn_like(p) * 0.2)
            feats = net.forward_head(net.forward_features(x), pre_logits=True)
            logits = net(x)
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(out / f"{name}.safetensors"))
        save_file(
            {"images": images, "features": feats.contiguous(), "logits": logits.contiguous()},
            str(out / f"{name}.expected.safetensors"),
        )
    print(f"timm cases written ({tv})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
