"""Strict parsing of the numbers and lists a user types: one grammar for every option, config file and spec.

Python's ``int()`` and ``float()`` accept far more than a number as written on a command line: any Unicode digit
(``int("٣") == 3``, ``float("٠.٤") == 0.4``), underscores (``1_000``), surrounding Unicode spaces. A value that
looks like nothing the user meant would then be taken silently. Everything here accepts ASCII digits only, a
list only without empty or (where meaningless) repeated items, and in increasing order where order matters:
an unsorted list is refused, never silently sorted. Errors are :class:`~cmw_transfer.errors.UserError` lines that
name the option. Torch-free: the CLI's option types use it while parsing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from cmw_transfer.errors import UserError

FLOAT32_TINY = 1.1754943508222875e-38  # smallest normal float32: below it a value is a subnormal or flushes to 0
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_SPACE = " \t"  # ASCII blanks around a value or a list item are fine; Unicode spaces are not
MAX_DIGITS = 40  # longer integers are no option value (and int() of 4,300+ digits is an error of its own)


def _shown(text: str) -> str:
    """The user's text as typed, quoted; repr() escapes control and bidi characters, a long text is cut."""
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _strip(text: str) -> str:
    return text.strip(_SPACE)


def ascii_int(text: Any, what: str, *, low: int | None = None, high: int | None = None) -> int:
    """An integer written with ASCII digits (optional sign), inside ``[low, high]``; an int passes as is."""
    if isinstance(text, bool):
        raise UserError(f"{what} must be an integer, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        raw = _strip(str(text))
        if not _INT.fullmatch(raw) or len(raw) > MAX_DIGITS:
            raise UserError(f"{what} must be an integer written with the digits 0-9, got {_shown(str(text))}")
        value = int(raw)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        raise UserError(f"{what} must be in {span}, got {value}")
    return value


def ascii_float(text: Any, what: str, *, finite: bool = True) -> float:
    """A decimal number written with ASCII digits (``0.4``, ``.5``, ``1e-3``); ``nan`` / ``inf`` only when
    ``finite`` is False. A number whose magnitude is not 0 but below float32's smallest normal (``1e-320``) is
    refused: training computes in float32, where it is not representable."""
    if isinstance(text, bool):
        raise UserError(f"{what} must be a number, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        raw = _strip(str(text))
        if _NON_FINITE.fullmatch(raw):
            value = float(raw)
        elif _FLOAT.fullmatch(raw) and len(raw) <= 4 * MAX_DIGITS:
            value = float(raw)
        else:
            raise UserError(f"{what} must be a number written with the digits 0-9 (e.g. 0.4 or 1e-3), got "
                            f"{_shown(str(text))}")
    if finite and not math.isfinite(value):
        raise UserError(f"{what} must be a finite number, got {text}")
    if value != 0.0 and abs(value) < FLOAT32_TINY:
        raise UserError(f"{what} {text} is too small: not 0 but below {FLOAT32_TINY:.3g}, the smallest normal "
                        "float32 (use 0 or a larger value)")
    return value


def split_items(text: str, what: str, example: str) -> list[str]:
    """Comma-separated items, each stripped of ASCII blanks; an empty list or an empty item is an error."""
    items = [_strip(part) for part in str(text).split(",")]
    if not any(items):
        raise UserError(f"{what} {_shown(str(text))} names nothing; expected e.g. {example} (leave the option out "
                        "for none)")
    empty = [k + 1 for k, item in enumerate(items) if not item]
    if empty:
        raise UserError(f"{what} {_shown(str(text))}: item {empty[0]} is empty; expected e.g. {example}")
    return items


def check_sequence(values: Sequence[Any], what: str, *, unique: bool = True, ascending: bool = False) -> None:
    """No repeated item (``unique``) and, with ``ascending``, strictly increasing: refused, never re-ordered."""
    if unique:
        seen: set[Any] = set()
        for value in values:
            if value in seen:
                raise UserError(f"{what} names {value} twice; give each once")
            seen.add(value)
    if ascending:
        for a, b in zip(values, values[1:]):
            if not a < b:
                listed = ",".join(str(v) for v in values)
                raise UserError(f"{what} must be in increasing order, got {listed} ({a} before {b}); write them "
                                "sorted")


def parse_int_list(text: str | Iterable[Any], what: str, *, example: str, noun: str = "integers",
                   low: int | None = None, high: int | None = None, unique: bool = True,
                   ascending: bool = False) -> tuple[int, ...]:
    """``"7,8,9"`` (or a sequence, e.g. from a config file) -> ``(7, 8, 9)`` under the rules of the module."""
    if isinstance(text, str):
        items: list[Any] = split_items(text, what, example)
    else:
        items = list(text)
        if not items:
            raise UserError(f"{what} names nothing; expected e.g. {example}")
    values = []
    for k, item in enumerate(items):
        try:
            values.append(ascii_int(item, "", low=low, high=high))
        except UserError as exc:
            detail = str(exc).strip()
            if "digits" in detail:
                detail = "is not an integer written with the digits 0-9"
            raise UserError(f"{what}: item {k + 1} ({_shown(str(item))}) {detail}; expected {noun} like "
                            f"{example}") from None
    check_sequence(values, what, unique=unique, ascending=ascending)
    return tuple(values)


def check_int_sequence(values: Any, what: str, *, low: int | None = None, high: int | None = None,
                       ascending: bool = False, high_note: str = "") -> tuple[int, ...]:
    """A list of ints already parsed (a config's tuple): integers (not bools, not floats) in range, no repeats,
    increasing where ``ascending``; the empty list passes (the option's default)."""
    if not isinstance(values, (list, tuple)):
        raise UserError(f"{what} must be a list of integers, got {values!r}")
    for k, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{what} item {k + 1} must be an integer, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            bound = f"at most {high}" + (f" ({high_note})" if high_note else "") if high is not None and value > high \
                else f"at least {low}"
            raise UserError(f"{what} item {k + 1} is {value}; it must be {bound}")
    check_sequence(list(values), what, ascending=ascending)
    return tuple(values)


def parse_name_list(text: str | Iterable[Any], what: str, *, choices: Sequence[str]) -> tuple[str, ...]:
    """``"csv,tensorboard"`` -> ``("csv", "tensorboard")`` (sorted: a set of names): every name known, each once."""
    example = ",".join(choices)
    if isinstance(text, str):
        items = [item.lower() for item in split_items(text, what, example)]
    else:
        items = [str(item).strip().lower() for item in text]
        if any(not item for item in items):
            raise UserError(f"{what}: an empty name in {list(text)!r}; expected e.g. {example}")
    unknown = sorted(set(items) - set(choices))
    if unknown:
        raise UserError(f"{what}: unknown name(s) {', '.join(_shown(u) for u in unknown)}; choose from "
                        f"{', '.join(choices)} (comma-separated)")
    check_sequence(items, what)
    return tuple(sorted(items))


def parse_named_specs(items: Iterable[Any], what: str, example: str) -> tuple[str, ...]:
    """Repeatable ``NAME=SPEC`` items: NAME an ASCII identifier, SPEC non-empty, each NAME once."""
    out: list[str] = []
    names: list[str] = []
    for item in items:
        name, sep, spec = str(item).partition("=")
        if not sep or not _strip(spec) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(f"{what} {_shown(str(item))}: expected NAME=SPEC with NAME letters, digits and _ (e.g. "
                            f"{example})")
        names.append(name)
        out.append(str(item))
    check_sequence(names, what)
    return tuple(out)
