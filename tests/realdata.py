"""The real Fashion-MNIST files for the tests that need them: skip where they are absent, fail in CI.

``.ci/run`` installs the Debian package and sets ``CMW_REQUIRE_REAL_DATA=1``, which turns the skip into a
failure, so a CI run cannot pass while silently skipping every real-data test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cmw_transfer.dataset.formats.mnist import DEBIAN_INSTALL, find_files
from cmw_transfer.errors import UserError

INSTALL_HINT = f"the Fashion-MNIST files: apt-get update && {DEBIAN_INSTALL} (as root), or CMW_DATA_DIR=DIR"
REQUIRE = "CMW_REQUIRE_REAL_DATA"


def fashion_mnist_dir() -> Path:
    """The folder the default search finds the files in; skips (or fails under CMW_REQUIRE_REAL_DATA=1) without."""
    try:
        images, _labels = find_files("fashion-mnist", None, "train")
        find_files("fashion-mnist", None, "test")
    except UserError as exc:
        message = f"needs {INSTALL_HINT} ({exc})"
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1 but this test {message}")
        pytest.skip(message)
    return images.parent
