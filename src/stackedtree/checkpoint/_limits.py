"""What a checkpoint file may ask of the reader: limits, and bounded JSON.

Every checkpoint file may be hostile. Its JSON (a safetensors header, an index, the
metadata of an npz archive) is parsed here only after a count of its commas,
arrays and objects, which bounds the values the parser creates and so its time and
memory (names read from it are quoted in messages by `_text.quote`).
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterator
from typing import Any

from ._text import brief, quote

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
