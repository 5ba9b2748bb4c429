"""CurveNet's two stages: ``probe`` (record every sample's loss curve) and ``curvenet`` (the allocate stage, in
``allocate``; extends the meta-train stage)."""
