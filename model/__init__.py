"""The NaViT encoder on packed rows of native-resolution images (torch + numpy only).

```python
from model import NaViT, NaViTConfig, pack_images
cfg = NaViTConfig.preset("tiny", num_classes=10)
net = NaViT(cfg)
batch = pack_images([img_a, img_b, img_c], patch_size=16, seq_len=256)
out = net(batch)  # out.embeddings (N, dim), out.logits (N, num_classes), images in (row, segment) order
```
"""

from model.attention import BACKENDS, bucket_length
from model.navit import LEGACY_DEFAULTS, NaViT, NaViTConfig, NaViTOutput
from model.packing import image_index, num_images, pack_images, patchify
from model.posemb import POSEMB_KINDS, FactorizedPosEmb

__all__ = [
    "BACKENDS",
    "LEGACY_DEFAULTS",
    "POSEMB_KINDS",
    "FactorizedPosEmb",
    "NaViT",
    "NaViTConfig",
    "NaViTOutput",
    "bucket_length",
    "image_index",
    "num_images",
    "pack_images",
    "patchify",
]
