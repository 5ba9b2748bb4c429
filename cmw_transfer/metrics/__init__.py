"""Metrics: what a run reports per epoch and at the end."""

from cmw_transfer.metrics.accuracy import clean_noisy_auc, evaluate, shot_split_accuracy, topk_correct
from cmw_transfer.metrics.log import MetricsLog
from cmw_transfer.metrics.openset import calibrated_threshold, open_f_measure, open_macro_f1, open_set_report

__all__ = ["MetricsLog", "calibrated_threshold", "clean_noisy_auc", "evaluate", "open_f_measure", "open_macro_f1",
           "open_set_report", "shot_split_accuracy", "topk_correct"]
