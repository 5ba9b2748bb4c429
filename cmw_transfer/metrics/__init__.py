"""Metrics: what a run reports per epoch and at the end."""

from cmw_transfer.metrics.accuracy import clean_noisy_auc, evaluate, shot_split_accuracy, topk_correct
from cmw_transfer.metrics.log import MetricsLog

__all__ = ["MetricsLog", "clean_noisy_auc", "evaluate", "shot_split_accuracy", "topk_correct"]
