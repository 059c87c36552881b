"""An mkdocs hook: the first mention of a public name on a page links to its API entry.

Guides and recipes write `` `scan_layers` `` as plain inline code; this turns the first
such mention on each page into `` [`scan_layers`][stackedtree.scan_layers] ``, which
mkdocs-autorefs resolves to the entry that mkdocstrings renders. Code blocks, headings
and text already inside a link are left alone.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

_FENCE = re.compile(r"^\s*(```|~~~)")


def _public_names() -> dict[str, str]:
    names = {}
    for module in ("stackedtree.checkpoint", "stackedtree"):
        mod = importlib.import_module(module)
        for name in mod.__all__:
            names[name] = f"{module}.{name}"
    return names


def link_first_mentions(markdown: str, names: dict[str, str]) -> str:
    """The page with the first plain mention of each name in `names` linked."""
    pattern = re.compile(
        r"(?<![\[\w])`(" + "|".join(map(re.escape, names)) + r")(\(\))?`(?![\]\(])"
    )
    seen: set[str] = set()

    def link(m: re.Match[str]) -> str:
        name = m[1]
        if name in seen:
            return m[0]
        seen.add(name)
        return f"[{m[0]}][{names[name]}]"

    out, in_code = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line):
            in_code = not in_code
        elif not in_code and not line.lstrip().startswith(("#", ":::")):
            line = pattern.sub(link, line)
        out.append(line)
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri.startswith("api/"):
        return markdown  # the reference pages are the link targets
    return link_first_mentions(markdown, _public_names())
