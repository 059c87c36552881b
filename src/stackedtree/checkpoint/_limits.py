"""What a checkpoint file may ask of the reader: limits, bounded JSON, quoted names.

Every checkpoint file may be hostile. Its JSON (a safetensors header, an index, the
metadata of an npz archive) is parsed here only after a count of its commas,
arrays and objects, which bounds the values the parser creates and so its time and
memory; a name read from it is quoted in a message cut to a readable length.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterator
from typing import Any

MAX_HEADER = 100_000_000
"""The safetensors format's limit on a header, and ours on any JSON a file holds."""

MAX_TENSORS = 250_000
"""Tensors per file: a header of this many is checked in about a second. The largest
published checkpoints hold under 100,000 in all their files together."""

MAX_JSON_ITEMS = 16 * MAX_TENSORS
"""Commas, arrays and objects in one JSON text (those inside strings too), which bound
the values it parses into: a header has 11 per tensor of 4 dimensions."""

MAX_DIMS = 64
"""Dimensions per tensor: numpy's limit."""

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


def load_json(raw: bytes) -> Any:
    """Parses untrusted JSON with bounded time and memory.

    Returns:
        The value, with every JSON object as a tuple of `(key, value)` pairs (so
        that a repeated key can be seen and refused) and every array as a list.

    Raises:
        ValueError: not UTF-8, not JSON, nested too deeply, or too many values.
    """
    items = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if items > MAX_JSON_ITEMS:
        raise ValueError(
            f"it holds about {items} JSON values, more than the {MAX_JSON_ITEMS} "
            f"this reader parses"
        )
    text = raw.decode("utf-8")
    with no_gc():
        try:
            return json.loads(text, object_pairs_hook=tuple)
        except RecursionError:
            raise ValueError("it is nested too deeply") from None
        except ValueError as e:  # malformed JSON; an integer of over 4300 digits
            raise ValueError(str(e)) from None


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pauses the cycle collector while a header's millions of objects are made.

    Parsed JSON and the records made from it hold no reference cycles: collecting
    meanwhile would only cost time, many times over, as each collection walks all
    the objects made so far.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def text_problem(text: str) -> str | None:
    """Why a string read from JSON is not valid Unicode text, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"a lone surrogate (U+{ord(text[e.start]):04X}), which is not valid UTF-8"
        )
    return None


def strings(value: Any, what: str, *, check_text: bool = True) -> dict[str, str] | str:
    """A parsed JSON object of strings as a dict; or, as a str, why it is not one."""
    if not isinstance(value, tuple) or not all(
        type(k) is str and type(v) is str for k, v in value
    ):
        return f"{what} must map strings to strings, got {brief(value)}"
    out = dict(value)
    if len(out) != len(value):
        seen: set[str] = set()
        for key, _ in value:
            if key in seen:
                return f"{what} repeats the key {quote(key)}"
            seen.add(key)
    if check_text:
        for key, v in value:
            problem = text_problem(key) or text_problem(v)
            if problem:
                return f"{what} holds {problem}"
    return out
