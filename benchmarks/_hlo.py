"""What XLA made of a program: its optimised HLO without names, its scratch memory."""

from __future__ import annotations

import re
from typing import Any


def strip_hlo(text: str) -> str:
    """Optimised HLO without metadata and names, to compare two programs' structure."""
    text = re.sub(r",?\s*metadata=\{[^}]*\}", "", text)
    # Debug tables (file names, source locations) differ with the Python call stack.
    text = re.sub(
        r"^(FileNames|FunctionNames|FileLocations|StackFrames)$", "", text, flags=re.M
    )
    text = re.sub(r"^\s*\d+ [{\"].*$", "", text, flags=re.M)
    text = re.sub(r"%[\w.\-]+", "%v", text)
    text = re.sub(r"^HloModule \S+", "HloModule", text, flags=re.M)
    return "\n".join(line for line in text.splitlines() if line.strip())


def temp_bytes(compiled: Any) -> int | None:
    """XLA's temporary buffer size for a compiled computation (None if not reported)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes)
