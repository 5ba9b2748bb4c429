"""The package's promised names exist: ``from cmw_transfer import X`` works for every X in an ``__all__``."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_all_name_imports_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "check_exports.py")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_the_readme_import_line():
    out = subprocess.run([sys.executable, "-c", "from cmw_transfer import CMWLoss, CMWNet; print(CMWLoss.__name__)"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "CMWLoss", out.stderr
