"""Every name a module of the package promises in ``__all__`` imports, in a fresh interpreter.

``python scripts/check_exports.py`` prints one line per broken name and exits 1 if there is any (CI runs it;
tests/test_exports.py too). A README snippet like ``from cmw_transfer import CMWLoss`` depends on exactly this.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys


def broken_exports(package: str = "cmw_transfer") -> list[str]:
    root = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")
                         if not m.name.endswith("__main__")]
    problems = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            problems.append(f"{name}: import fails: {exc.__class__.__name__}: {exc}")
            continue
        for attr in getattr(module, "__all__", ()):
            try:
                getattr(module, attr)
            except Exception as exc:
                problems.append(f"{name}.{attr}: listed in __all__ but {exc.__class__.__name__}: {exc}")
    return problems


if __name__ == "__main__":
    found = broken_exports()
    for line in found:
        print(line, file=sys.stderr)
    print(f"exports: {'FAILED, ' + str(len(found)) + ' broken' if found else 'ok'}")
    sys.exit(1 if found else 0)
