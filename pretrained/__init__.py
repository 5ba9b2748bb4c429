"""Weighting nets shipped with cmw-transfer, one folder each; load them as ``pretrained:FOLDER``."""
