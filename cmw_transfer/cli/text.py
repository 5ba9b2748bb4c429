"""Terminal-safe text: strings from artifacts, list files and hub repos are untrusted.

A provenance field or class name may hold ANSI escapes (clear the screen, recolour, move the cursor), a
newline that forges an extra output line, or bidi overrides that reorder what is shown. :func:`printable`
renders every such character as a visible escape, so what reaches the terminal is exactly what is stored.
"""

from __future__ import annotations

import unicodedata

# Unicode "format" characters that change how surrounding text is displayed (bidi embeddings/overrides/isolates)
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    return char in _BIDI or unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp")


def printable(value: object, *, escape_backslash: bool = False) -> str:
    """``str(value)`` with control characters (C0, DEL, C1), line/paragraph separators, lone surrogates and
    bidi controls written as ``\\n``, ``\\x1b``, ``\\u202e``...; ordinary text, including non-ASCII letters,
    is unchanged. ``escape_backslash=True`` also doubles backslashes, making the escaping reversible."""
    text = str(value)
    if escape_backslash:
        return "".join(_escape(c) if c == "\\" or _unsafe(c) else c for c in text)
    if text.isprintable():  # fast path: no Cc/Cf/Z* other than space
        return text
    return "".join(_escape(c) if _unsafe(c) else c for c in text)
