"""Classes without samples: found, described and left out rather than crashing what follows.

A real list file can leave classes empty (a 5,000-line sample of WebVision's 1,000 classes leaves dozens).
Inspection reports them; training warns and fits the class-size families and the many/medium/few-shot
splits on the classes that have samples (:func:`nonempty_classes`); only a list that is malformed is refused.
"""

from __future__ import annotations

import warnings

import numpy as np

from cmw_transfer.errors import UserError

SHOWN_EMPTY = 10  # class ids named in a message before "..."


class EmptyClassesWarning(UserWarning):
    """A training or evaluation set leaves classes without samples; they are left out (see the module)."""


def nonempty_classes(class_counts: np.ndarray) -> np.ndarray:
    """Ids of the classes with at least one sample (ascending); index ``class_counts`` with it."""
    return np.flatnonzero(np.asarray(class_counts) > 0).astype(np.int64)


def empty_classes(class_counts: np.ndarray) -> np.ndarray:
    """Ids of the classes with no sample (ascending)."""
    return np.flatnonzero(np.asarray(class_counts) == 0).astype(np.int64)


def describe_empty_classes(class_counts: np.ndarray) -> str | None:
    """``"49 of 1000 classes have no samples (class 3, 17, ...)"``, or ``None`` when every class has one."""
    empty = empty_classes(class_counts)
    if not empty.size:
        return None
    shown = ", ".join(str(c) for c in empty[:SHOWN_EMPTY]) + (", ..." if empty.size > SHOWN_EMPTY else "")
    return f"{empty.size} of {len(class_counts)} classes have no samples (class {shown})"


def check_no_empty_classes(labels: np.ndarray, num_classes: int, where: str, *, allow: bool = False) -> None:
    """Refuse a label vector that leaves a class empty (usually a truncated or wrong list), unless ``allow``."""
    if allow:
        return
    message = describe_empty_classes(np.bincount(labels, minlength=num_classes))
    if message:
        raise UserError(f"{where}: {message}; the list is incomplete or the labels are not numbered 0..C-1 "
                        "(cmw-transfer data reports such lists)")


def warn_empty_classes(class_counts: np.ndarray, where: str, consequence: str) -> bool:
    """One :class:`EmptyClassesWarning` naming how many and which classes of ``where`` are empty; True if any."""
    message = describe_empty_classes(class_counts)
    if message is None:
        return False
    hint = " (if the labels are numbered from 1, renumber them from 0)" if np.asarray(class_counts)[0] == 0 else ""
    warnings.warn(f"{where}: {message}{hint}; {consequence}", EmptyClassesWarning, stacklevel=2)
    return True
