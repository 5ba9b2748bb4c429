"""Training stages: meta-train (learn the weighting net) and apply (use it frozen)."""
