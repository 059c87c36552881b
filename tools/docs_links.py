"""An mkdocs hook that links public names to their API entries.

- Guides and recipes write `` `scan_layers` `` as plain inline code; the first such
  mention on each page becomes `` [`scan_layers`][stackedtree.scan_layers] ``, which
  mkdocs-autorefs resolves to the entry mkdocstrings renders. Code blocks, headings and
  text already inside a link are left alone.
- In the API pages, a docstring's mention of another public name ("as in `load_flat`")
  becomes a link to that name's entry.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from mkdocs.utils import get_relative_url

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


def _entries(docs_dir: str) -> dict[str, str]:
    """`name -> url#anchor` of every `::: stackedtree...` entry in the API pages."""
    found = {}
    for page in sorted(Path(docs_dir, "api").glob("*.md")):
        url = f"api/{page.stem}/"
        for ident in re.findall(r"^:::\s*(stackedtree[\w.]*)", page.read_text(), re.M):
            found.setdefault(ident.rsplit(".", 1)[-1], f"{url}#{ident}")
    return found


def on_page_content(html: str, page: Any, config: Any, **kwargs: Any) -> str:
    if not page.file.src_uri.startswith("api/"):
        return html
    entries = _entries(config["docs_dir"])
    pattern = re.compile(
        r"(<a [^>]*>[^<]*)?<code>(" + "|".join(map(re.escape, entries)) + r")</code>"
    )

    def link(m: re.Match[str]) -> str:
        if m[1] is not None:  # already inside a link
            return m[0]
        href = get_relative_url(entries[m[2]], page.url)
        return f'<a href="{href}"><code>{m[2]}</code></a>'

    return pattern.sub(link, html)
