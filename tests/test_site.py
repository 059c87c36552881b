"""The built documentation site reads well: checked on the HTML that mkdocs writes.

- No API signature is wider than its box: mkdocstrings formats long signatures (with
  ruff) onto lines of at most `line_length` characters.
- No "Returns" section lists more items than a function returns (every public function
  returns one value; a tuple is one value, described in one item).
- No code line in the docs' sources is wider than the column shows (80 characters).
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
WIDTH = 80  # characters of code the content column shows


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={"NO_MKDOCS_2_WARNING": "1", **__import__("os").environ},
    )
    return out


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def api_pages(site: Path) -> list[Path]:
    pages = sorted((site / "api").glob("*/index.html"))
    assert pages, "no API pages were built"
    return pages


def test_api_signatures_fit_their_box(site: Path) -> None:
    signatures = 0
    for page in api_pages(site):
        for block in re.findall(
            r'<div class="doc-signature highlight"><pre>(.*?)</pre>',
            page.read_text(),
            re.S,
        ):
            signatures += 1
            for line in _text(block).splitlines():
                assert len(line) <= WIDTH, f"{page.parent.name}: {line!r} is too wide"
    assert signatures >= 20


def test_returns_sections_list_one_value(site: Path) -> None:
    sections = 0
    for page in api_pages(site):
        text = page.read_text()
        for m in re.finditer(
            r"doc-section-title\">Returns:</span></p>\s*<ul>(.*?)</ul>", text, re.S
        ):
            sections += 1
            items = m[1].count("<li")
            assert items == 1, (
                f"{page.parent.name}: a Returns section lists {items} items"
            )
    assert sections >= 15


def test_code_lines_fit_the_column() -> None:
    too_wide = []
    for page in sorted(DOCS.rglob("*.md")):
        in_code, lang = False, ""
        for n, line in enumerate(page.read_text().splitlines(), start=1):
            fence = re.match(r"\s*(```|~~~)(\S*)", line)
            if fence:
                in_code, lang = not in_code, fence[2]
                continue
            if in_code and lang in ("python", "console") and len(line) > WIDTH:
                too_wide.append(f"{page.relative_to(ROOT)}:{n}")
    assert not too_wide, f"code lines over {WIDTH} characters: {too_wide}"
