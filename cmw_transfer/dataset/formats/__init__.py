"""One module per on-disk format; each exposes ``load(root, split, **options) -> LabeledDataset``."""
