"""The NaViT trainer: packed rows in, a trained classifier out. Never imports Ray at import time.

Modules (import what you need; this package imports none of them eagerly, so that e.g.
``trainer.flight_client`` stays free of torch):

- ``trainer.config``       TrainConfig (pydantic) + YAML/override loading, resume compatibility
- ``trainer.data``         ``open_source(--data)``: the batch source; ``iter_batches`` for your own loop
- ``trainer.batch``        batch format (``collate_rows``), ``DataPosition``, the ``BatchSource`` protocol
- ``trainer.shards``       a pack on disk: shard set, data order (ranks, shuffle buffer), DataLoader stream
- ``trainer.streams``      record-batch sources: flight:// and live mode (the packing pipeline on Ray)
- ``trainer.loop``         ``train(cfg, source, out, resume=...)``: the training loop
- ``trainer.checkpoint``   atomic safetensors + weights_only checkpoints, sha256 digests verified on load
- ``trainer.resume``       which checkpoint --resume / --resume-from continues from (verified)
- ``trainer.rundir``       the run folder without torch: --out checks, the lock, temp clean-up
- ``trainer.runguard``     around a run: lock, stale temps, full disk → one line, signals
- ``trainer.signals``      SIGTERM/SIGINT: checkpoint the current step, exit 128+signum
- ``trainer.diskfull``     ENOSPC/EDQUOT found in whatever a library raised
- ``trainer.live_rejects`` RUN/rejected.jsonl of live mode
- ``trainer.pending``      per-step sums kept on the device between host syncs
- ``trainer.metrics``      console lines (rich bar on a terminal), metrics.jsonl
- ``trainer.loggers``      optional sinks: TensorBoard, W&B (``--log``)
- ``trainer.ema``          EMA of the weights (``ema_decay``)
- ``trainer.evaluate``     accuracy at several resolutions (``navit eval``)
- ``trainer.validate``     ``--val`` during training and ``checkpoints/best``
- ``trainer.memory``       a step's memory floor vs what is available
- ``trainer.embed``        embeddings + top-k of any image source to Parquet (``navit embed``)
- ``trainer.init_from``    ``--init-from`` (navit export/checkpoint, timm ViT), ``--reset-head``, freezing
- ``trainer.distributed``  DDP set-up under torchrun
- ``trainer.flight_client`` client of ``navit serve``
"""
