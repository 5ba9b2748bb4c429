"""Training stages on one engine: meta-train (learn the weighting net) and apply (use it frozen).

``engine`` runs every stage's epochs (resume, checkpoints, metrics, DDP, signals); stages are plug-ins found
through ``registry`` (``create_trainer("erm" | "oltr" | "metatrain", ...)``). See docs/architecture.md.
"""
