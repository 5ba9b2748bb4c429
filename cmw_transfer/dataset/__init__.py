"""Datasets: a registry of real on-disk formats plus the embedded digits, all as :class:`LabeledDataset`."""

from cmw_transfer.dataset.base import FileDataset, InMemoryDataset, LabeledDataset, PathTable
from cmw_transfer.dataset.classes import describe_empty_classes, empty_classes, nonempty_classes
from cmw_transfer.dataset.images import default_transform, load_image, skip_unreadable_collate, skipped_in_collate
from cmw_transfer.dataset.registry import create_dataset, list_datasets, resolve_source
from cmw_transfer.dataset.split import split_per_class

__all__ = [
    "FileDataset",
    "InMemoryDataset",
    "LabeledDataset",
    "PathTable",
    "create_dataset",
    "default_transform",
    "describe_empty_classes",
    "empty_classes",
    "list_datasets",
    "load_image",
    "nonempty_classes",
    "resolve_source",
    "skip_unreadable_collate",
    "skipped_in_collate",
    "split_per_class",
]
