"""Packaging glue that pyproject.toml cannot express: ship the top-level ``pretrained/`` folder in the wheel.

Installed, it is the importable data package ``cmw_transfer_pretrained``, which ``pretrained:NAME`` specs read.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["cmw_transfer", "cmw_transfer.*"]), "cmw_transfer_pretrained"],
    package_dir={"cmw_transfer_pretrained": "pretrained"},
)
