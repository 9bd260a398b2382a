"""Checks of a train config's model that need the model package or the device: every
``model.overrides`` value is one NaViTConfig accepts (a typo'd or mistyped field is refused when
the config is read, not as a traceback mid-run), and the attention backend can train there."""

from __future__ import annotations

from typing import Any

from packer.errors import ConfigError

# A bound on blocks, so that a typo (depth: 100000) is refused at once instead of spending minutes
# building the model's shapes for the memory check; 1024 is ~20x the deepest published ViT.
MAX_DEPTH = 1024


def check_overrides(preset: str, overrides: dict[str, Any]) -> None:
    """ValueError (one line, no field prefix: pydantic adds 'model.overrides') unless the preset
    with these overrides is a NaViTConfig that can be trained."""
    import dataclasses

    from model import NaViTConfig

    known = {f.name for f in dataclasses.fields(NaViTConfig)}
    unknown = [str(k) for k in overrides if k not in known]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (NaViTConfig fields: {', '.join(sorted(known))})")
    fields = {"num_classes": 1, **overrides}  # the classifier width comes from the data
    try:
        cfg = NaViTConfig.preset(preset, **fields)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e).splitlines()[0]) from None
    if not 1 <= cfg.depth <= MAX_DEPTH:
        raise ValueError(f"depth must be in [1, {MAX_DEPTH}] (got {cfg.depth})")


def check_attention_device(attention: str, override: str | None, device_type: str) -> None:
    """Refuse a backend that cannot train on this device (one line: why, and what to use).
    ``attention``: model.attention; ``override``: model.overrides.attention (used when the former is
    'auto', as build_model does)."""
    if attention == "auto" and override is not None:
        attention = override
    if device_type == "cuda":
        return
    if attention == "flex":
        raise ConfigError(
            f"model.attention=flex cannot train on {device_type.upper()}: FlexAttention has no backward "
            "pass there; use 'segment' (or 'auto': flex on CUDA, segment elsewhere)"
        )
    if attention == "varlen":
        raise ConfigError(
            f"model.attention=varlen needs CUDA (flash-attention varlen kernels); on {device_type.upper()} "
            "use 'segment' (or 'auto': varlen is never chosen automatically)"
        )
