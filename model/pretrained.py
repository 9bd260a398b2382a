"""A trained model as a folder other tools can load: ``model.safetensors`` + ``config.json``.

Written by ``navit export RUN --out DIR`` (:func:`save_pretrained`), read by
``NaViT.from_pretrained(DIR)`` (:func:`load_pretrained`) with plain torch + safetensors — no Ray, no
pydantic, nothing of the trainer. ``config.json``::

    {"format": "navit-export", "version": 1,
     "model_config": {...every NaViTConfig field...},
     "class_names": ["cat", "dog"] | null,      # index = the head's output
     "patch_size": 16, "seq_len": 256 | null,    # seq_len: the rows it was trained on
     "source": {...where it came from: checkpoint, step...}}

The folder appears whole or not at all (written as a temp folder, then renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

EXPORT_FORMAT = "navit-export"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class PretrainedError(ValueError):
    """A folder or file that is not a loadable model; the message is one line."""


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a navit export folder (its config.json says so)."""
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file() or not (Path(path) / WEIGHTS_FILE).is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_export(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json as a dict, weights) of an export folder. PretrainedError if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_dir():
        raise PretrainedError(f"{path}: not found (expected a navit export folder)")
    try:
        meta = json.loads((p / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise PretrainedError(f"{path}: no {CONFIG_FILE} (not a navit export folder)") from None
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path}/{CONFIG_FILE}: cannot read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise PretrainedError(f"{path}: not a navit export (config.json format {fmt!r})")
    if meta.get("version") != EXPORT_VERSION:
        raise PretrainedError(f"{path}: export version {meta.get('version')!r} (reads {EXPORT_VERSION})")
    try:
        weights = load_file(str(p / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise PretrainedError(f"{path}/{WEIGHTS_FILE}: cannot load ({e})") from None
    return meta, weights


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """The NaViT of an export folder, in eval mode on ``device``; ``net.class_names`` is set."""
    from model.navit import NaViT, NaViTConfig

    meta, weights = read_export(path)
    try:
        cfg = NaViTConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{path}: bad model_config in {CONFIG_FILE} ({e})") from None
    net = NaViT(cfg)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise PretrainedError(
            f"{path}: weights do not match the config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    net.class_names = meta.get("class_names")
    return net.to(device).eval()


def save_pretrained(
    out: str | Path,
    weights: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    *,
    class_names: list[str] | None = None,
    seq_len: int | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write an export folder atomically. An existing export at ``out`` is replaced; any other
    non-empty folder is refused (PretrainedError): its files are not ours to overwrite."""
    from safetensors.torch import save_file

    dest = Path(out)
    if dest.exists() and not dest.is_dir():
        raise PretrainedError(f"--out {out}: is a file, not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not is_export(dest):
        raise PretrainedError(f"--out {out}: a non-empty folder that is not a navit export")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # clone(): safetensors refuses tensors that share storage.
        tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in weights.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "model_config": model_config,
            "class_names": class_names,
            "patch_size": int(model_config["patch_size"]),
            "seq_len": seq_len,
            "source": source or {},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if dest.exists():  # an earlier export (or an empty folder): moved aside, then removed
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
