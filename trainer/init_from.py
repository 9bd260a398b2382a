"""Starting a run from existing weights (``navit train --init-from``), ``--reset-head``, and freezing
the trunk for a linear probe (``train.freeze=trunk``); also what ``navit export`` reads.

An init source is one of:

- a ``navit export`` folder (``config.json`` format ``navit-export`` + ``model.safetensors``);
- a navit checkpoint folder, or a run folder (its newest checkpoint);
- a timm ViT state dict: a ``.safetensors`` file, a ``.pth``/``.pt``/``.bin`` file (loaded with
  ``torch.load(weights_only=True)``: tensors only, nothing unpickled), or a Hugging Face timm folder
  (timm's ``config.json`` + ``model.safetensors``/``pytorch_model.bin``; its ``pretrained_cfg`` mean
  and std become the model's pixel normalisation). Converted by :mod:`model.timm_convert`.

The architecture comes from the source; ``model.preset`` is ignored. Runtime fields may still be
overridden (:data:`RUNTIME_FIELDS`; for timm also the fields it cannot read from weights,
:data:`TIMM_GUESSED_FIELDS`). The head is kept when the data's labels fit it; ``--reset-head``
replaces it with a fresh one of the data's width (new classes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from packer.errors import ConfigError, NavitError

RUNTIME_FIELDS = {"attention", "segment_buckets", "dropout", "drop_path"}
TIMM_GUESSED_FIELDS = {"heads", "pixel_mean", "pixel_std", "norm_eps"}
FREEZE_CHOICES = ("none", "trunk")
_TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass
class InitSource:
    kind: str  # export | checkpoint | timm
    path: str
    model_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    class_names: list[str] | None = None
    seq_len: int | None = None
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """What a run's meta.json / an export's config.json says about where the weights came from."""
        return {"kind": self.kind, "path": self.path}


def read_init_source(
    path: str | Path, overrides: dict[str, Any] | None = None, what: str = "--init-from"
) -> InitSource:
    """Load any init source (see the module docstring); NavitError (one line, starting with
    ``what``) if it is none."""
    from model.pretrained import PretrainedError, is_export, read_export
    from trainer.checkpoint import load_checkpoint, resolve_checkpoint

    p = Path(path)
    if not p.exists():
        raise NavitError(f"{what} {path}: not found")
    if p.is_dir():
        if is_export(p):
            try:
                meta, weights = read_export(p)
            except PretrainedError as e:
                raise NavitError(str(e)) from None
            return InitSource(
                "export", str(p), meta["model_config"], weights, meta.get("class_names"), meta.get("seq_len")
            )
        timm_file = next((p / f for f in _TIMM_WEIGHTS if (p / f).is_file()), None)
        if timm_file is not None and (p / "config.json").is_file():
            cfg = _read_json(p / "config.json")
            pre = cfg.get("pretrained_cfg") or {}
            hints = {"pixel_mean": pre.get("mean"), "pixel_std": pre.get("std")}
            return _from_timm(p, _read_state(timm_file, what), {**hints, **(overrides or {})}, what)
        try:
            resolve_checkpoint(p)
        except NavitError:
            raise NavitError(
                f"{what} {path}: not a navit export, checkpoint or run folder, nor a timm model folder"
            ) from None
        ck = load_checkpoint(p)
        meta = ck.meta
        return InitSource(
            "checkpoint",
            str(ck.path),
            meta["model_config"],
            ck.weights,
            meta.get("class_names"),
            meta.get("seq_len"),
        )
    return _from_timm(p, _read_state(p, what), overrides or {}, what)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NavitError(f"{path}: cannot read ({e})") from None
    return data if isinstance(data, dict) else {}


def _read_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict file: safetensors, or a torch file of tensors only (weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/pickle errors have many types; all mean "not readable"
        raise NavitError(f"{what} {path}: cannot read weights ({str(e).splitlines()[0][:200]})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "module"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NavitError(f"{what} {path}: not a state dict of tensors")
    return state


def _from_timm(path: Path, state: dict[str, torch.Tensor], hints: dict[str, Any], what: str) -> InitSource:
    from model.timm_convert import TimmConvertError, convert_timm_vit, looks_like_timm_vit

    if not looks_like_timm_vit(state):
        raise NavitError(
            f"{what} {path}: not a timm ViT state dict (no patch_embed.proj.weight), nor a navit "
            "export, checkpoint or run folder"
        )

    def tup(v: Any) -> tuple[float, ...] | None:
        return tuple(float(x) for x in v) if v else None

    try:
        conv = convert_timm_vit(
            state,
            heads=hints.get("heads"),
            pixel_mean=tup(hints.get("pixel_mean")),
            pixel_std=tup(hints.get("pixel_std")),
            norm_eps=float(hints.get("norm_eps", 1e-6)),
        )
    except TimmConvertError as e:
        raise NavitError(f"{what} {path}: {e}") from None
    return InitSource("timm", str(path), conv.model_config, conv.weights, notes=conv.notes)


@dataclass
class PreparedInit:
    """An init source checked against a run: the model config to build and how to load it."""

    source: InitSource
    model_config: dict[str, Any]
    num_classes: int
    reset_head: bool
    notes: list[str]

    def apply(self, model: torch.nn.Module) -> None:
        weights = {
            k: v for k, v in self.source.weights.items() if not (self.reset_head and k.startswith("head."))
        }
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not (self.reset_head and k.startswith("head."))]
        if missing or unexpected:
            raise NavitError(
                f"--init-from {self.source.path}: weights do not fit the model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )

    def record(self) -> dict[str, Any]:
        return {**self.source.record(), "reset_head": self.reset_head}


def prepare_init(path: str | Path, cfg: Any, source: Any, reset_head: bool) -> PreparedInit:
    """Read ``path`` and decide the model config for a run of TrainConfig ``cfg`` on ``source``: the
    patch size must match the data's; the head is kept (its width) when the labels fit, else
    ``--reset-head`` is required. ConfigError on a mismatch."""
    overrides = dict(cfg.model.overrides)
    data_patch_size, data_classes, wanted_classes = (
        source.patch_size,
        source.num_classes,
        cfg.model.num_classes,
    )
    src = read_init_source(path, {k: v for k, v in overrides.items() if k in TIMM_GUESSED_FIELDS})
    allowed = RUNTIME_FIELDS | (TIMM_GUESSED_FIELDS if src.kind == "timm" else set())
    # Fields the source fixes may be repeated with the source's value (a run's own config file).
    same = {k for k, v in overrides.items() if _plain(src.model_config.get(k)) == _plain(v)}
    refused = sorted(set(overrides) - allowed - same - {"num_classes"})
    if refused:
        raise ConfigError(
            f"model.overrides {refused} differ from {path}'s model and do not apply with --init-from "
            f"(the architecture comes from it); allowed: {sorted(allowed)}"
        )
    mc = {**src.model_config, **{k: v for k, v in overrides.items() if k in allowed}}
    patch = int(mc["patch_size"])
    if patch != data_patch_size:
        raise ConfigError(
            f"--init-from {path} has patch size {patch}, the data was packed with patch size "
            f"{data_patch_size} (repack with --patch-size {patch})"
        )
    head = int(mc.get("num_classes", 0))
    notes = list(src.notes)
    need = wanted_classes or max(1, data_classes)
    if not reset_head and head == 0:
        reset_head = True
        notes.append(f"{path} has no classifier head: a new one with {need} classes is trained")
    if reset_head:
        mc["num_classes"] = need
    else:
        if data_classes > head or (wanted_classes and wanted_classes != head):
            raise ConfigError(
                f"--init-from {path} has a {head}-class head but the run needs {need} classes: pass "
                "--reset-head for a new head"
            )
        need = head
    return PreparedInit(src, mc, need, reset_head, notes)


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def apply_freeze(model: torch.nn.Module, freeze: str) -> int:
    """``trunk``: only the classifier head trains (a linear probe on the frozen embeddings); returns
    the number of trainable parameters."""
    if freeze not in FREEZE_CHOICES:
        raise ConfigError(f"train.freeze must be one of {FREEZE_CHOICES}, got {freeze!r}")
    if freeze == "trunk":
        if getattr(model, "head", None) is None:
            raise ConfigError("train.freeze=trunk needs a classifier head (num_classes > 0)")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
