"""Training stages on one engine: meta-train (learn the weighting net) and apply (use it frozen).

``config`` (one torch-free dataclass per stage and the layering of its settings), ``data`` (what the stages train
on), ``engine`` (the epoch loop every stage shares: resume, checkpoints, metrics, DDP, signals; the registry and
``run_stage``), ``meta`` (the meta-gradient algorithms), and the stages in wings: ``apply`` (erm, oltr),
``metatrain`` (metatrain, advisor), ``curvenet`` (probe, curvenet). Every stage is run as ``Engine(stage).run()``
by :func:`~cmw_transfer.trainer.engine.launch.run_stage`. See docs/architecture.md.
"""
