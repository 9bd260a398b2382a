"""Configuration of a training run: :class:`TrainConfig` (model preset + overrides, optimiser,
schedule, data, checkpointing, runtime).

Loaded from a YAML file (its top level, or its ``train`` section) plus dotted overrides
(``optim.lr=1e-3``), validated by pydantic with one-line errors. A run records
``TrainConfig.model_dump()`` in every checkpoint so that ``--resume`` can refuse an incompatible one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from packer.config import build_config


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """Which NaViT to build: a preset plus any NaViTConfig field overridden."""

    preset: Literal["tiny", "small", "base", "large"] = Field("tiny", description="ViT-Ti/S/B/L widths")
    num_classes: int | None = Field(
        None, ge=1, description="classifier width (default: 1 + the largest label in the data)"
    )
    attention: Literal["auto", "dense", "segment", "flex", "varlen"] = Field(
        "auto",
        description="attention backend (auto: flex on CUDA, segment elsewhere; flex and varlen train "
        "only on CUDA)",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="any NaViTConfig field, e.g. {depth: 2, dim: 64}"
    )
    grad_checkpoint: bool = Field(
        False, description="recompute each block in the backward (activation checkpointing): less memory"
    )

    @field_validator("overrides")
    @classmethod
    def _overrides_build(cls, overrides: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if overrides and "preset" in info.data:  # (an invalid preset is reported on its own)
            from trainer.model_checks import check_overrides

            check_overrides(info.data["preset"], overrides)
        return overrides


class OptimSection(_Section):
    """AdamW with decoupled weight decay, gradient clipping and label smoothing."""

    lr: float = Field(1e-3, gt=0, le=10, description="peak learning rate")
    weight_decay: float = Field(0.05, ge=0, le=10, description="AdamW weight decay")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm (0 = no clipping)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")


class ScheduleSection(_Section):
    """Linear warmup then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""

    steps: int = Field(1000, ge=1, description="optimizer steps in the run")
    warmup_steps: int = Field(100, ge=0, description="linear warmup length")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of the peak")


class DataSection(_Section):
    """Where batches come from and how they are cut."""

    batch_size: int = Field(8, ge=1, description="packed rows per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    workers: int = Field(0, ge=0, le=256, description="DataLoader worker processes (0 = in-process)")
    shuffle_buffer: int = Field(256, ge=1, description="rows in the bounded shuffle buffer")
    prefetch: int = Field(2, ge=1, description="batches prefetched per worker")
    verify: bool = Field(True, description="check every shard's sha256 before training")


class MixSection(_Section):
    """Train-time mixup / cutmix across the images of each micro-batch (off by default; trainer/mixup.py).

    Token-level, for packed variable-size images: paired images of similar shape are mixed over their
    central overlap and trained on soft labels weighted by how much of each image the model saw.
    Evaluation never mixes."""

    mixup_alpha: float = Field(0.0, ge=0, le=100, description="mixup λ ~ Beta(α, α); 0 = no mixup")
    cutmix_alpha: float = Field(0.0, ge=0, le=100, description="cutmix λ ~ Beta(α, α); 0 = no cutmix")
    prob: float = Field(1.0, ge=0, le=1, description="probability that a micro-batch is mixed")
    switch_prob: float = Field(0.5, ge=0, le=1, description="with both alphas > 0: probability of cutmix")
    pair_window: int = Field(
        4, ge=1, le=1024, description="images sorted by aspect ratio are shuffled in windows of this size"
    )

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


class CheckpointSection(_Section):
    every: int = Field(500, ge=0, description="save every N steps (0 = only at the end)")
    keep: int = Field(3, ge=1, description="keep the last K checkpoints")


class TrainConfig(_Section):
    """Everything that determines a training run. Data location, output dir and --resume are runtime
    arguments, not config: they must not make two runs incompatible."""

    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of init, shuffling and dropout")
    model: ModelSection = ModelSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    data: DataSection = DataSection()
    mix: MixSection = MixSection()
    checkpoint: CheckpointSection = CheckpointSection()
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    compile: bool = Field(False, description="torch.compile the model")
    freeze: Literal["none", "trunk"] = Field(
        "none", description="trunk = train only the classifier head (a linear probe on frozen embeddings)"
    )
    log_every: int = Field(10, ge=1, description="steps between metric lines (and host syncs)")
    loggers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="extra metric sinks besides console + metrics.jsonl (--log)"
    )
    eval_every: int = Field(
        0, ge=0, description="steps between held-out evaluations with --val (0 = at the end only)"
    )
    eval_resolution: str = Field(
        "native", description="--val image folder: longer side in px, 'native' or sqN (as navit eval)"
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="EMA of the weights, evaluated and saved alongside (0 = off)"
    )

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.schedule.warmup_steps > self.schedule.steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be <= steps "
                f"({self.schedule.steps})"
            )
        if not re.fullmatch(r"native|[1-9]\d*|sq[1-9]\d*", self.eval_resolution):
            raise ValueError(
                f"eval_resolution {self.eval_resolution!r}: give a positive integer, 'native' or sqN"
            )
        return self


# Fields that may differ between a run and its --resume: they change neither the model, the
# optimisation trajectory nor the data order (runtime knobs and the run length).
RESUME_MUTABLE = {
    "schedule.steps",
    "data.workers",
    "data.prefetch",
    "data.verify",
    "checkpoint.every",
    "checkpoint.keep",
    "device",
    "compile",
    "log_every",
    "model.attention",
    "model.grad_checkpoint",
    "loggers",
    "eval_every",
    "eval_resolution",
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "overrides":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def incompatible_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of fields that differ between two dumped configs and matter for a resume.

    A field missing from one side (a run saved before the field existed) counts as its default."""
    defaults = _flatten(TrainConfig().model_dump(mode="json"))
    a, b = {**defaults, **_flatten(old)}, {**defaults, **_flatten(new)}
    return sorted(k for k in set(a) | set(b) if k not in RESUME_MUTABLE and a.get(k) != b.get(k))


def load_train_config(
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: dict[str, Any] | None = None,
) -> TrainConfig:
    """TrainConfig from a YAML file (top level, or its ``train:`` section), then ``sets`` (--set),
    then dotted ``overrides`` (flags; None = not given).

    Raises ConfigError (one line) on any invalid value."""
    return build_config(TrainConfig, file, overrides, section="train", sets=sets)
