"""The training loop: AdamW, warmup + cosine, clipping, accumulation, autocast, DDP, checkpoints.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` packed rows per rank. The loss is
cross-entropy averaged per *image* over the whole step (all micro-batches, all ranks), not per token
and not per row: a row of many small images weighs more than a row holding one big image.

Everything that decides the numbers (init, data order, optimizer and scheduler state, RNG) is either
seeded or checkpointed, so on CPU a resumed run reproduces the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from packer.errors import ConfigError, NavitError
from trainer import checkpoint as ckpt
from trainer.batch import BatchSource, DataPosition, HostBatch
from trainer.config import TrainConfig, incompatible_fields
from trainer.distributed import all_gather_json, all_reduce_tensor, barrier, init_distributed
from trainer.ema import ModelEMA
from trainer.init_from import apply_freeze, prepare_init
from trainer.loggers import open_sinks
from trainer.memory import check_memory
from trainer.metrics import MetricsLogger
from trainer.mixup import MixParams, mix_batch, mix_rng, soft_cross_entropy_sum
from trainer.model_checks import check_attention_device
from trainer.optim import build_optimizer, grad_norm
from trainer.pending import PendingSteps
from trainer.resume import load_for_resume, set_aside_newer
from trainer.rundir import atomic_write_text, check_run_dir
from trainer.runguard import current as current_stop
from trainer.runguard import guarded
from trainer.signals import StopNow, stopped
from trainer.validate import Validation

_COUNTS = ("images", "real_tokens", "tokens")  # HostBatch counts summed per step


@dataclass
class TrainResult:
    """What a run did (also written to RUN/summary.json)."""

    steps: int
    images: int
    real_tokens: int
    tokens: int
    wall_s: float
    final_loss: float
    final_acc: float
    losses: list[float] = field(default_factory=list)  # per step of this invocation, in order
    start_step: int = 0
    checkpoint: str | None = None
    best_val_top1: float | None = None  # with --val: the best held-out top-1 and its step
    best_step: int | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(name)


def build_model(
    cfg: TrainConfig, num_classes: int, patch_size: int, stored: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, Any]:
    """NaViT from the preset + overrides; the patch size comes from the data. ``stored``: the
    ``model_config`` of the checkpoint being resumed, which wins over today's defaults (a run started
    before a default changed goes on with the model it started with); only the attention backend, a
    runtime choice, and activation checkpointing, a memory knob, come from ``cfg``."""
    import dataclasses

    from model import NaViT, NaViTConfig

    overrides = dict(cfg.model.overrides)
    if "patch_size" in overrides and int(overrides["patch_size"]) != patch_size:
        raise ConfigError(
            f"model.overrides.patch_size={overrides['patch_size']} but the data has patch_size {patch_size}"
        )
    overrides["patch_size"] = patch_size
    if cfg.model.attention != "auto":
        overrides["attention"] = cfg.model.attention
    overrides["grad_checkpoint"] = cfg.model.grad_checkpoint or bool(overrides.get("grad_checkpoint"))
    try:
        mcfg = NaViTConfig.preset(cfg.model.preset, num_classes=num_classes, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {str(e).splitlines()[0]}") from None
    if stored is not None:
        runtime = {"attention": mcfg.attention, "grad_checkpoint": mcfg.grad_checkpoint}
        mcfg = dataclasses.replace(NaViTConfig.from_dict(stored), **runtime)
    return NaViT(mcfg), mcfg


def _data_fingerprint(source: BatchSource) -> str:
    ident = getattr(source, "fingerprint", None) or source.description
    return f"{ident} seq_len={source.seq_len} patch={source.patch_size}"


@guarded(check_run_dir)  # --out lock, stale temp files, full disk, SIGTERM/SIGINT (trainer/runguard.py)
def train(
    cfg: TrainConfig,
    source: BatchSource | Any,
    out: str | Path,
    *,
    resume: bool = False,
    resume_from: str | None = None,
    stop_after: int | None = None,
    verbose: bool = True,
    class_names: list[str] | None = None,
    val: str | None = None,
    init_from: str | Path | None = None,
    reset_head: bool = False,
) -> TrainResult:
    """Run (or resume) training into ``out``. ``source`` is a BatchSource for *this* rank, or a
    callable ``(DistInfo) -> BatchSource`` (built after the process group is up).

    ``stop_after``: stop after this global step as if interrupted (for tests and time-boxed jobs);
    the schedule still targets ``cfg.schedule.steps``. ``val``: a held-out pack or image folder,
    evaluated every ``cfg.eval_every`` steps and at the end (trainer/validate.py).
    ``init_from``/``reset_head``: start a new run from existing weights (trainer/init_from.py;
    ignored on resume, the run has its own). ``resume_from``: the checkpoint to resume from (step-N,
    N or previous; trainer/resume.py), default the newest."""
    run = Path(out)
    device = resolve_device(cfg.device)
    check_attention_device(cfg.model.attention, cfg.model.overrides.get("attention"), device.type)
    info = init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if callable(source) and not hasattr(source, "batches"):
        source = source(info)
    stop = current_stop()
    stop.install()  # again: a library started by the source (Ray, in live mode) may have taken SIGTERM
    existing = ckpt.list_checkpoints(run)
    if existing and not resume:
        raise NavitError(f"{run} already holds checkpoints: pass --resume to continue, or another --out")
    if resume and not existing:
        raise NavitError(f"--resume: {run} has no checkpoint to resume from")

    # The classifier width: the config's, else 1 + the largest label in the data.
    num_classes = cfg.model.num_classes or max(1, source.num_classes)
    if cfg.model.num_classes and source.num_classes > cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the data has labels up to "
            f"{source.num_classes - 1}"
        )

    state: ckpt.Checkpoint | None = None
    if resume:
        state = load_for_resume(run, resume_from)  # verified; a damaged one names the previous one
        diff = incompatible_fields(state.meta["config"], cfg.model_dump(mode="json"))
        if diff:
            raise NavitError(
                f"--resume: {run} was made with a different config ({', '.join(diff[:4])}"
                f"{', ...' if len(diff) > 4 else ''}); use another --out or the same settings"
            )
        if state.meta.get("world_size", 1) != info.world_size:
            raise NavitError(
                f"--resume: {run} was trained on {state.meta.get('world_size', 1)} processes, "
                f"this launch has {info.world_size} (the data order depends on it)"
            )
        if state.meta.get("data") != _data_fingerprint(source):
            raise NavitError(f"--resume: {run} was trained on {state.meta.get('data')!r}, not on this data")
        num_classes = int(state.meta["model_config"].get("num_classes", num_classes))
        aside = set_aside_newer(run, state.path) if info.is_main else []

    init = prepare_init(init_from, cfg, source, reset_head) if init_from and state is None else None
    num_classes = init.num_classes if init else num_classes
    stored = state.meta["model_config"] if state is not None else (init.model_config if init else None)
    check_memory(cfg, num_classes, source, device, info, build_model, stored)
    torch.manual_seed(cfg.seed)
    model, mcfg = build_model(cfg, num_classes, source.patch_size, stored)
    if state is not None:
        model.load_state_dict(state.weights)
    elif init is not None:
        init.apply(model)
    trainable = apply_freeze(model, cfg.freeze)
    model.to(device)
    opt, sched = build_optimizer(model, cfg)
    step = 0
    counters = {"images": 0, "real_tokens": 0, "tokens": 0}
    position = DataPosition()
    if state is not None:
        ts = state.train_state()
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        ckpt.set_rng_state(ts["rng"])
        step = state.step
        counters = dict(state.meta["counters"])
        position = DataPosition.from_dict(state.meta["data_positions"][info.rank])

    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and state is not None:
        ema_weights = state.extra_weights("ema")
        if ema_weights is None:
            raise NavitError(f"--resume: {state.path} holds no EMA weights (ema.safetensors)")
        ema.load_state_dict(ema_weights)
    net: torch.nn.Module = model
    if cfg.compile:
        net = torch.compile(net)
    if info.enabled:
        ids = [info.local_rank] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)

    # Records of steps after the checkpoint we start from (logged before an interruption; a fresh
    # start in the folder of a run killed before its first checkpoint: all of them) are dropped.
    rewind = step
    sinks = open_sinks(cfg.loggers, run, rewind, cfg.model_dump(mode="json")) if info.is_main else []
    log = MetricsLogger(
        run,
        cfg.schedule.steps,
        cfg.log_every,
        enabled=info.is_main,
        resume_step=rewind,
        console=verbose,
        sinks=sinks,
    )
    n_params = sum(p.numel() for p in model.parameters())
    for note in init.notes if init else []:
        log.message(f"note: --init-from: {note}")
    frozen = f", {trainable:,} trainable" if trainable < n_params else ""
    log.message(
        f"navit train: {cfg.model.preset} ({n_params / 1e6:.2f}M params{frozen}, {num_classes} classes) on "
        f"{device}{f' x{info.world_size}' if info.enabled else ''}, {source.description}, "
        f"{'resuming at step ' + str(step) if state else f'from {init_from}' if init else 'from scratch'}"
        f"{'' if state is None or state.verified else ' (its checkpoint predates digests: not verified)'}"
        f"{'; set aside the newer checkpoints as ' + ', '.join(aside) if state and aside else ''}"
    )
    log.event({"event": "resume" if state else "start", "step": step, "config": cfg.model_dump(mode="json")})

    meta_static = {
        "config": cfg.model_dump(mode="json"),
        "model_config": mcfg.to_dict(),
        "world_size": info.world_size,
        "data": _data_fingerprint(source),
        "seq_len": source.seq_len,
        "patch_size": source.patch_size,
        "class_names": class_names or getattr(source, "class_names", None),
        "init_from": init.record() if init else (state.meta.get("init_from") if state else None),
    }
    validation = None
    if val is not None:
        names = meta_static["class_names"]
        validation = Validation(
            val, cfg=cfg, source=source, num_classes=num_classes, class_names=names, run=run, resume=resume
        )
        log.message(validation.describe())

    def save(at: int, name: str | None = None, extra_meta: dict[str, Any] | None = None) -> Path | None:
        positions = all_gather_json(position.to_dict(), info)
        path = None
        if info.is_main:
            train_state = {
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": ckpt.rng_state(),
            }
            meta = {**meta_static, "data_positions": positions, "counters": counters, "metrics": log.last}
            extra = {"ema": ema.module} if ema is not None else None
            meta.update(extra_meta or {})
            keep = cfg.checkpoint.keep
            path = ckpt.save_checkpoint(run, at, model, train_state, meta, keep=keep, extra=extra, name=name)
            log.event({"event": "checkpoint", "step": at, "path": str(path)})
        barrier(info)
        return path

    def sync() -> None:
        """Read back the pending steps (one device→host copy): metrics, counters, non-finite stop."""
        for r in pending.flush():
            if not math.isfinite(r.loss) or not math.isfinite(r.grad_norm):
                where = f"; last good checkpoint: {last_ckpt}" if last_ckpt else "; no checkpoint was saved"
                raise NavitError(f"loss is {r.loss} at step {r.step} (non-finite): stopping{where}")
            counters["images"] += int(r.images)
            counters["real_tokens"] += int(r.real_tokens)
            counters["tokens"] += int(r.tokens)
            losses.append(r.loss)
            log.step(
                r.step, r.loss, int(r.correct), int(r.labeled), int(r.images), int(r.real_tokens),
                int(r.tokens), r.data_wait_s, r.lr, r.grad_norm,
            )  # fmt: skip

    use_bf16 = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    host_layout = not cfg.compile  # the layout from the batch's host copy: no device→host read
    accum = cfg.data.grad_accum
    batches: Iterator[HostBatch] = iter(source.batches(position))
    t_start = time.perf_counter()
    start_step = step
    losses: list[float] = []
    pending = PendingSteps()
    last_ckpt: Path | None = state.path if state is not None else None
    saved_at = step  # the step of the newest checkpoint (on every rank: they must agree to save)
    end = cfg.schedule.steps if stop_after is None else min(stop_after, cfg.schedule.steps)
    mix = MixParams(**cfg.mix.model_dump())
    net.train()
    try:
        # Under DDP the ranks agree on a stop at the steps that sync anyway (every log_every steps).
        while step < end and not stop.requested(info, device, collective=step % cfg.log_every == 0):
            # ---- data (timed: the data-wait fraction is this over the step's wall time) ----
            t0 = time.perf_counter()
            try:
                with stop.waiting():  # a signal here stops at once: this batch is in no step yet
                    micro = [next(batches) for _ in range(accum)]
            except StopNow:
                break
            on_dev = [hb.to(device, host_layout=host_layout) for hb in micro]
            wait = time.perf_counter() - t0
            # Counts from the host copies: known without reading anything back from the device.
            labeled_local = sum(int(np.count_nonzero(hb.tensors["labels"].numpy() >= 0)) for hb in micro)
            counts = [labeled_local, *(sum(getattr(hb, k) for hb in micro) for k in _COUNTS)]
            if info.enabled:  # global counts stay on the device (no host sync); scale = world / labeled
                counts_dev = all_reduce_tensor(torch.tensor(counts, dtype=torch.float64).to(device), info)
                scale: Any = (info.world_size / counts_dev[0].clamp(min=1.0)).float()
            else:
                scale = 1.0 / max(labeled_local, 1.0)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            for i, batch in enumerate(on_dev):
                labels = batch.pop("labels")  # (N,) one per image in output order
                targets = None  # soft (N, C) targets when this micro-batch is mixed (trainer/mixup.py)
                if mix.enabled:
                    mixed = mix_batch(batch, labels, num_classes, mix, mix_rng(cfg.seed, step, i, info.rank))
                    if mixed is not None:
                        batch["patches"], targets = mixed.patches, mixed.targets
                no_sync = contextlib.nullcontext()
                if info.enabled and i < accum - 1:
                    no_sync = net.no_sync()  # all-reduce gradients once, on the last micro-batch
                with no_sync:
                    with autocast:
                        logits = net(batch).logits  # (N, C)
                    logits = logits.float()
                    ce = soft_cross_entropy_sum(logits, labels, targets, cfg.optim.label_smoothing)
                    (ce * scale).backward()
                loss_sum += ce.detach().double()
                correct += ((logits.argmax(-1) == labels) & (labels >= 0)).sum()
            gnorm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                if cfg.optim.grad_clip > 0
                else grad_norm(model)
            )
            sums = torch.stack([loss_sum, correct.double()])
            sums = torch.cat([all_reduce_tensor(sums, info), gnorm.detach().double().reshape(1)])
            if info.enabled:
                sums = torch.cat([sums, counts_dev])
            # A non-finite loss is applied here and caught at the next sync, which precedes every
            # checkpoint and evaluation, so no weights that saw it are ever saved or scored.
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(model, step)
            position = micro[-1].position
            pending.add(step, sums, None if info.enabled else counts, wait, sched.get_last_lr()[0])
            ckpt_due = cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < end
            eval_due = validation is not None and validation.due(step, end)
            if ckpt_due or eval_due or step % cfg.log_every == 0 or step == end:
                sync()
            if eval_due:
                ema_module = ema.module if ema is not None else None
                validation.run(step, model, ema_module, device, log, lambda at, m: save(at, ckpt.BEST, m))
            if ckpt_due:
                last_ckpt, saved_at = save(step) or last_ckpt, step
        sync()
        if step > saved_at:  # the end, a stop_after, or SIGTERM/SIGINT
            last_ckpt, saved_at = save(step) or last_ckpt, step
    finally:
        with contextlib.suppress(Exception):
            batches.close()  # type: ignore[attr-defined]
    if stop.signum is not None:  # SIGTERM/SIGINT: the checkpoint of this step is saved; say so
        log.close()
        saved = run / ckpt.CKPT_DIR / f"step-{step:08d}" if step > start_step else None
        raise stopped(stop.signum, step, saved, last_ckpt)

    wall = time.perf_counter() - t_start
    final = log.last or {}
    best = validation.best if validation is not None and validation.best.step is not None else None
    result = TrainResult(
        steps=step,
        images=counters["images"],
        real_tokens=counters["real_tokens"],
        tokens=counters["tokens"],
        wall_s=wall,
        final_loss=float(final.get("loss", losses[-1] if losses else math.nan)),
        final_acc=float(final.get("acc", math.nan)),
        losses=losses,
        start_step=start_step,
        checkpoint=str(last_ckpt) if last_ckpt else None,
        best_val_top1=best.top1 if best is not None else None,
        best_step=best.step if best is not None else None,
    )
    if info.is_main:
        summary = {k: v for k, v in asdict(result).items() if k != "losses"}
        if best is not None:
            summary["best_checkpoint"] = str(run / ckpt.CKPT_DIR / ckpt.BEST)
        atomic_write_text(run / "summary.json", json.dumps(summary, indent=2) + "\n")
        log.event({"event": "summary", **summary})
        pad = 1 - result.real_tokens / result.tokens if result.tokens else 0.0
        log.message(
            f"done: {result.steps} steps, {result.images} images, {result.real_tokens} tokens "
            f"({pad:.1%} padding), {wall:.1f} s; final loss {result.final_loss:.4f}, "
            f"train accuracy {result.final_acc:.3f}; checkpoint {result.checkpoint}"
        )
        if best is not None:
            log.message(
                f"best held-out top-1 {best.top1:.4f} at step {best.step}: {summary['best_checkpoint']}"
            )
    log.close()
    return result
