"""Progress output, in one place: bars and the lines printed between them go to stderr.

A bar is drawn only when stderr is a terminal (tqdm's ``disable=None``): a log file or a pipe never fills with
``\\r`` frames. Lines (:func:`progress_write`) are printed either way, above a live bar when there is one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; off when ``enabled`` is False or stderr is not a terminal."""
    return tqdm(iterable, disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True, **kwargs)


def progress_write(line: str) -> None:
    """One line on stderr that does not break a live bar."""
    tqdm.write(line, file=sys.stderr)
