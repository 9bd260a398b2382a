"""`navit train`: train NaViT on packed shards (--data), a `navit serve` Flight server
(--data flight://HOST:PORT) or the live packing pipeline (--images SOURCE).

Flags override the config file (``--config``, its top level or ``train:`` section), ``--set`` overrides
any field by its dotted name. torch (and Ray, in live mode) are imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import (
    ConfigOpt,
    PatchOpt,
    RayAddressOpt,
    ResolutionOpt,
    SeqLenOpt,
    SetOpt,
    TokenDropOpt,
)


def train_config_from_flags(
    config: Path | None,
    sets: list[str] | None,
    named: dict[str, Any],
    resume_from: Path | None = None,
) -> Any:
    """Config file, then --set, then the named flags (None = not given): the named flags win.

    Warmup nobody set (not --warmup, --set or the file) defaults to 100 steps; for a shorter run it
    becomes 10% of the steps, with a one-line note; on ``--resume`` (``resume_from`` = the run) it is
    the run's own warmup, so a resumed short run keeps the schedule it started with. A ``--warmup``
    longer than the run is refused naming the flag."""
    from cli.common import _parse_set
    from packer.errors import ConfigError
    from trainer.config import ScheduleSection, load_train_config

    set_values = _parse_set(sets)
    overrides = {k: v for k, v in named.items() if v is not None}
    key = "schedule.warmup_steps"
    flag = overrides.get(key)
    if flag is None and (key in set_values or _file_sets_warmup(config)):
        return load_train_config(config, overrides, sets=set_values)  # set there: its error names it
    # The run length, validated with a warmup that always fits.
    steps = load_train_config(config, {**overrides, key: 0}, sets=set_values).schedule.steps
    if flag is not None:
        if flag > steps:
            raise ConfigError(f"--warmup {flag} is longer than the run (--steps {steps})")
        return load_train_config(config, overrides, sets=set_values)
    saved = _run_warmup(resume_from) if resume_from is not None else None
    default = ScheduleSection.model_fields["warmup_steps"].default
    if saved is not None:
        overrides[key] = saved
    elif default > steps:
        overrides[key] = steps // 10
        typer.echo(
            f"note: the run has {steps} steps, fewer than the default warmup ({default}): warmup is "
            f"{steps // 10} steps (10%); set --warmup to choose",
            err=True,
        )
    return load_train_config(config, overrides, sets=set_values)


def _file_sets_warmup(config: Path | None) -> bool:
    """Whether the config file (its top level, or its ``train`` section) sets the warmup."""
    if config is None:
        return False
    from packer.config import file_section

    schedule = file_section(config, "train").get("schedule")
    return isinstance(schedule, dict) and "warmup_steps" in schedule


def split_sets(sets: list[str] | None, live: bool) -> tuple[list[str], list[str]]:
    """``--set`` items → (train config's, live pack config's), by the key's first part. A key of
    neither config, or a packing key without live packing (where it would be ignored), is refused."""
    from cli.common import _parse_set
    from packer.config import PackConfig
    from packer.errors import ConfigError
    from trainer.config import TrainConfig

    train_sets, pack_sets = [], []
    for item in sets or []:
        (key,) = _parse_set([item])
        first = key.split(".")[0]
        if first in TrainConfig.model_fields:
            train_sets.append(item)
        elif first in PackConfig.model_fields:
            if not live:
                raise ConfigError(
                    f"--set {key}: a packing setting, used only by live training (--images); the "
                    "packing of --data was fixed when it was packed"
                )
            pack_sets.append(item)
        else:
            sections = ", ".join(TrainConfig.model_fields)
            raise ConfigError(
                f"--set {key}: unknown key {first!r} (the train config has {sections}"
                + ("; live packing also takes the pack config's)" if live else ")")
            )
    return train_sets, pack_sets


def _run_warmup(run: Path) -> int | None:
    """The warmup recorded in a run's newest checkpoint, or None (no readable checkpoint: the
    trainer reports that itself)."""
    import json

    from trainer.checkpoint import list_checkpoints

    found = list_checkpoints(run)
    try:
        meta = json.loads((found[-1] / "meta.json").read_text()) if found else None
        return int(meta["config"]["schedule"]["warmup_steps"]) if meta else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        ctx: typer.Context,
        out: Annotated[Path, typer.Option("--out", "-o", help="run directory (checkpoints, metrics)")],
        data: Annotated[
            str | None,
            typer.Option(
                "--data", help="pack directory (or s3://...), or flight://HOST:PORT", show_default=False
            ),
        ] = None,
        images: Annotated[
            str | None,
            typer.Option("--images", help="live mode: pack this image source on Ray while training"),
        ] = None,
        config: ConfigOpt = None,
        preset: Annotated[
            str | None, typer.Option("--preset", help="tiny | small | base | large", show_default=False)
        ] = None,
        steps: Annotated[
            int | None, typer.Option("--steps", help="optimizer steps", show_default=False)
        ] = None,
        batch_size: Annotated[
            int | None,
            typer.Option("--batch-size", help="packed rows per micro-batch per process", show_default=False),
        ] = None,
        grad_accum: Annotated[
            int | None, typer.Option("--grad-accum", help="micro-batches per step", show_default=False)
        ] = None,
        lr: Annotated[
            float | None, typer.Option("--lr", help="peak learning rate", show_default=False)
        ] = None,
        warmup: Annotated[
            int | None, typer.Option("--warmup", help="warmup steps", show_default=False)
        ] = None,
        device: Annotated[
            str | None, typer.Option("--device", help="auto | cpu | cuda", show_default=False)
        ] = None,
        attention: Annotated[
            str | None,
            typer.Option("--attention", help="auto | dense | segment | flex | varlen", show_default=False),
        ] = None,
        seed: Annotated[int | None, typer.Option("--seed", help="global seed", show_default=False)] = None,
        workers: Annotated[
            int | None, typer.Option("--workers", help="DataLoader worker processes", show_default=False)
        ] = None,
        checkpoint_every: Annotated[
            int | None,
            typer.Option("--checkpoint-every", help="steps between checkpoints", show_default=False),
        ] = None,
        compile_: Annotated[
            bool | None,
            typer.Option("--compile/--no-compile", help="torch.compile the model", show_default=False),
        ] = None,
        sets: SetOpt = None,
        val: Annotated[
            str | None,
            typer.Option(
                "--val",
                help="held-out pack or labelled image folder: top-1/loss every eval_every steps and at "
                "the end; the best top-1 is kept as RUN/checkpoints/best",
                show_default=False,
            ),
        ] = None,
        eval_every: Annotated[
            int | None,
            typer.Option(
                "--eval-every", help="steps between --val evaluations (0 = at the end)", show_default=False
            ),
        ] = None,
        log: Annotated[
            list[str] | None,
            typer.Option(
                "--log", help="extra metric sink: tensorboard | wandb (repeatable)", show_default=False
            ),
        ] = None,
        resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out exactly")] = False,
        resume_from: Annotated[
            str | None,
            typer.Option(
                "--resume-from",
                help="resume from this checkpoint instead of the newest: step-N, N, or previous "
                "(newer ones are set aside as checkpoints/discarded-step-N); implies --resume",
                show_default=False,
            ),
        ] = None,
        token_file: Annotated[
            Path | None, typer.Option("--token-file", help="flight:// auth token file", show_default=False)
        ] = None,
        seq_len: SeqLenOpt = None,
        patch_size: PatchOpt = None,
        resolution: ResolutionOpt = None,
        token_drop: TokenDropOpt = None,
        ray_address: RayAddressOpt = None,
        init_from: Annotated[
            str | None,
            typer.Option(
                "--init-from",
                help="start from weights: a navit export, checkpoint or run folder, or a timm ViT state "
                "dict (.safetensors/.pth, or a timm model folder)",
                show_default=False,
            ),
        ] = None,
        reset_head: Annotated[
            bool, typer.Option("--reset-head", help="with --init-from: a new classifier head for this data")
        ] = False,
    ) -> None:
        """Train NaViT (AdamW, warmup + cosine, per-image loss, checkpoints, exact --resume, DDP)."""
        from packer.errors import ConfigError
        from trainer.config import TrainConfig

        if (data is None) == (images is None):
            raise ConfigError("give exactly one of --data DIR|flight://HOST:PORT or --images SOURCE")
        resume = resume or resume_from is not None
        if reset_head and init_from is None:
            raise ConfigError("--reset-head needs --init-from (a new run's head is always fresh)")
        if data is not None:  # the packing of --data is fixed: a packing flag would be ignored
            for flag, value in (
                ("--seq-len", seq_len),
                ("--patch-size", patch_size),
                ("--resolution", resolution),
                ("--token-drop", token_drop),
            ):
                if value is not None:
                    raise ConfigError(
                        f"{flag}: used only by live training (--images); the packing of --data was "
                        "fixed when it was packed"
                    )
        # `train.` names the config file's train section: --set train.freeze=trunk = --set freeze=trunk.
        sets = [x[len("train.") :] if x.startswith("train.") else x for x in sets or []]
        train_sets, pack_sets = split_sets(sets, live=images is not None)
        cfg: TrainConfig = train_config_from_flags(
            config,
            train_sets,
            {
                "model.preset": preset,
                "model.attention": attention,
                "schedule.steps": steps,
                "schedule.warmup_steps": warmup,
                "data.batch_size": batch_size,
                "data.grad_accum": grad_accum,
                "data.workers": workers,
                "optim.lr": lr,
                "device": device,
                "seed": seed,
                "checkpoint.every": checkpoint_every,
                "compile": compile_,
                "eval_every": eval_every,
                "loggers": [x.strip() for v in log for x in v.split(",") if x.strip()] if log else None,
            },
            resume_from=out if resume else None,
        )
        from trainer.rundir import check_run_dir, run_lock  # no torch yet: a busy --out is refused at once

        check_run_dir(out, resume)  # before the data is verified (which may take long)
        # A second run on this --out is refused now, not after the data check; released on return.
        ctx.with_resource(run_lock(out))
        from trainer.loggers import check_available

        check_available(cfg.loggers)
        if val is not None:
            from trainer.validate import check_val_spec

            check_val_spec(val)
        if init_from is not None and not Path(init_from).exists():
            raise ConfigError(f"--init-from {init_from}: not found")
        token = None
        if token_file is not None:
            from trainer.flight_client import read_token_file

            token = read_token_file(token_file)
        rejected = _live_rejected_log(out, resume) if images is not None else None
        source_factory = _source_factory(
            cfg,
            data,
            images,
            token,
            config,
            seq_len,
            patch_size,
            resolution,
            token_drop,
            pack_sets,
            ray_address,
            rejected,
        )

        from trainer.loop import train as run_train

        run_train(
            cfg,
            source_factory,
            out,
            resume=resume,
            resume_from=resume_from,
            val=val,
            init_from=init_from,
            reset_head=reset_head,
        )
        if rejected is not None and rejected.count:
            typer.echo(f"live mode: {rejected.count} inputs not packed, listed in {rejected.path}", err=True)


def _live_rejected_log(out: Path, resume: bool) -> Any:
    """RUN/rejected.jsonl of live mode; a fresh start drops the list of an unfinished earlier run."""
    from trainer.live_rejects import FILE, RejectedLog

    if not resume:
        (out / FILE).unlink(missing_ok=True)
    return RejectedLog(out / FILE)


def _source_factory(
    cfg: Any,
    data: str | None,
    images: str | None,
    token: str | None,
    config: Path | None,
    seq_len: int | None,
    patch_size: int | None,
    resolution: str | None,
    token_drop: str | None,
    sets: list[str] | None,
    ray_address: str | None,
    rejected: Any = None,
) -> Any:
    """A callable (DistInfo) -> BatchSource; called once the process group is up (rank known).
    ``rejected``: live mode's RejectedLog (RUN/rejected.jsonl)."""
    import torch

    from trainer.loop import resolve_device

    pin = resolve_device(cfg.device).type == "cuda" and torch.cuda.is_available()
    if data is not None:
        from trainer.data import open_source

        # Validate the data before any process group or model exists (one clear error).
        if "://" not in data or data.startswith(("s3://", "gs://", "file://")):
            from trainer.shards import open_shard_set

            open_shard_set(data, verify=cfg.data.verify)

        def make(info: Any) -> Any:
            return open_source(
                data,
                batch_size=cfg.data.batch_size,
                seed=cfg.seed,
                rank=info.rank,
                world_size=info.world_size,
                workers=cfg.data.workers,
                shuffle_buffer=cfg.data.shuffle_buffer,
                prefetch=cfg.data.prefetch,
                pin_memory=pin,
                verify=False,  # verified above, once
                token=token,
            )

        return make

    from cli.common import pack_config_from_flags
    from packer.config import read_yaml

    # The live pipeline's config is the file's `pack:` section (a train-only file has none: defaults).
    pack_file = config if config is not None and "pack" in read_yaml(config) else None
    pack_cfg = pack_config_from_flags(
        pack_file,
        seq_len=seq_len,
        patch_size=patch_size,
        seed=cfg.seed,
        resolution=resolution,
        token_drop=token_drop,
        sets=sets,
    )

    def make_live(info: Any) -> Any:
        from trainer.streams import live_source

        return live_source(
            images,
            pack_cfg,
            batch_size=cfg.data.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            pin_memory=pin,
            ray_address=ray_address,
            rejected=rejected,
        )

    return make_live
