"""Text for messages: names quoted and escaped, layer ranges, plurals, byte sizes.

Names read from a checkpoint may hold anything: `quote` and `printable` escape every
character that is not printable, so a message is one line of plain text that cannot
drive a terminal, and `brief` renders any parsed JSON value in a line.
"""

from __future__ import annotations

import json
import os.path
from collections.abc import Iterable, Sequence
from typing import Any

_SHOWN = 200


def quote(name: str) -> str:
    """A name read from a file, in backticks for a message: escaped as `printable`
    does, so that a message is one line of plain text, and cut when very long."""
    if len(name) <= _SHOWN:
        return f"`{printable(name)}`"
    return f"`{printable(name[:_SHOWN])}...` ({len(name)} characters)"


def printable(text: str, *, backslash: bool = True) -> str:
    """`text` with every character that is not printable escaped, and backslashes.

    Control characters (escape, bell, carriage return, newline), format characters
    (bidirectional overrides) and lone surrogates become `\\x1b`, `\\r`, `\\u202e`,
    `\\udc80`; a backslash becomes two (unless `backslash` is False: for text whose
    names were escaped already). Printable text, accents and all, is kept.

    Examples:
        >>> print(printable("layers.0.w\\x1b[2J\\r"))
        layers.0.w\\x1b[2J\\r
    """
    if text.isprintable() and (not backslash or "\\" not in text):
        return text
    return "".join(
        c if c.isprintable() and (c != "\\" or not backslash) else _escape(c)
        for c in text
    )


_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    if c in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[c]
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def brief(value: Any, depth: int = 2) -> str:
    """A short JSON-like rendering of a parsed JSON value, however large it is."""
    if isinstance(value, str):
        text = json.dumps(value[:60], ensure_ascii=False)
        return text if len(value) <= 60 else text[:-1] + '..."'
    if isinstance(value, tuple | list):
        if depth == 0:
            return "{...}" if isinstance(value, tuple) else "[...]"
        if isinstance(value, tuple):
            parts = [f"{brief(k, 0)}: {brief(v, depth - 1)}" for k, v in value[:6]]
        else:
            parts = [brief(v, depth - 1) for v in value[:6]]
        if len(value) > 6:
            parts.append(f"... ({len(value)} in all)")
        text = ", ".join(parts)
        return f"{{{text}}}" if isinstance(value, tuple) else f"[{text}]"
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value.bit_length() > 64
    ):
        return f"an integer of {value.bit_length()} bits"
    return json.dumps(value)


def ranges(indices: Iterable[int]) -> str:
    """`[0, 1, 2, 5, 7, 8]` -> `"0-2, 5, 7-8"`."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def plural(word: str, items: Sequence[int]) -> str:
    """`layer 3`, `layers 3, 5`: the word, plural with several, and their ranges."""
    return f"{word}{'s' if len(items) != 1 else ''} {ranges(items)}"


def count(n: int, word: str) -> str:
    """`1 file`, `3 files`: `n` and the word, plural unless `n` is 1."""
    return f"{n} {word}{'s' if n != 1 else ''}"


def human_bytes(n: int) -> str:
    """`1536` -> `"1.5 KiB"`."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def listing(names: Sequence[str], limit: int = 8) -> str:
    """Up to `limit` names, quoted, and how many more."""
    shown = ", ".join(quote(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def files_text(files: Sequence[object]) -> str:
    """The files of a checkpoint for a message: the one file, or the folder that
    holds them all (`` `model/` (9 files) ``), not every shard."""
    paths = [str(f) for f in files]
    if len(paths) == 1:
        return quote(paths[0])
    folder = os.path.dirname(os.path.commonpath(paths) + os.sep + "x")
    if folder and all(os.path.dirname(p) == folder for p in paths):
        return f"{quote(folder + os.sep)} ({len(paths)} files)"
    return ", ".join(quote(p) for p in sorted(paths))
