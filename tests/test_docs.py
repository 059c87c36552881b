"""The documentation is tested like code.

- Every ```python block in `docs/**/*.md` runs. Blocks of one page run in order in one
  namespace, so a later block can use names from an earlier one. A python block followed
  directly by a ```text title="Output" block must print exactly that text.
- Every public name (`stackedtree.__all__`, `stackedtree.checkpoint.__all__`) has a
  docstring and a `::: stackedtree...` entry in `docs/api/*.md`.
- The doctests in the public modules' docstrings pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import importlib
import inspect
import io
import pkgutil
import re
import sys
import types
from pathlib import Path

import pytest

import stackedtree

DOCS = Path(__file__).resolve().parent.parent / "docs"
OPTIONAL_PEERS = ("equinox", "flax", "haiku", "orbax")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclasses.dataclass
class Block:
    lang: str
    info: str
    code: str
    line: int  # 1-based line of the opening fence


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown page, indented ones (in admonitions) too."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        body = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            line = lines[j]
            body.append(
                line[len(indent) :] if line.startswith(indent) else line.lstrip()
            )
            j += 1
        lang = info.split()[0].lstrip("{.").rstrip("}") if info else ""
        blocks.append(Block(lang, info, "\n".join(body) + "\n", i + 1))
        i = j + 1
    return blocks


def page_blocks(page: str) -> list[tuple[Block, Block | None]]:
    """Each python block of `page` with the output block that follows it, if any."""
    text = (DOCS / page).read_text()
    blocks = code_blocks(text)
    lines = text.splitlines()
    out = []
    for k, block in enumerate(blocks):
        if block.lang != "python":
            continue
        expected = None
        if k + 1 < len(blocks) and 'title="Output"' in blocks[k + 1].info:
            following = blocks[k + 1]
            end = block.line + block.code.count("\n")  # the closing fence's index
            if all(not line.strip() for line in lines[end + 1 : following.line - 1]):
                expected = following
        out.append((block, expected))
    return out


PAGES = sorted(
    p.relative_to(DOCS).as_posix()
    for p in DOCS.rglob("*.md")
    if any(b.lang == "python" for b in code_blocks(p.read_text()))
)


def test_docs_have_examples() -> None:
    assert len(PAGES) >= 10, PAGES


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str) -> None:
    blocks = page_blocks(page)
    source = "\n".join(b.code for b, _ in blocks)
    for peer in OPTIONAL_PEERS:
        if re.search(rf"^\s*(import|from) {peer}\b", source, re.MULTILINE):
            pytest.importorskip(peer)
    # A real module, so that dataclasses and Equinox/Flax modules defined on the page
    # can resolve their `__module__`.
    name = "docs_" + re.sub(r"\W", "_", page.removesuffix(".md"))
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        for block, expected in blocks:
            stdout = io.StringIO()
            # Leading newlines make tracebacks point at the page's own line numbers.
            code = compile("\n" * block.line + block.code, f"docs/{page}", "exec")
            with contextlib.redirect_stdout(stdout):
                exec(code, module.__dict__)
            if expected is not None:
                got = stdout.getvalue().rstrip()
                want = expected.code.rstrip()
                assert got == want, (
                    f"docs/{page}: the block at line {block.line} printed\n{got}\n"
                    f"but the page shows (line {expected.line})\n{want}"
                )
    finally:
        del sys.modules[name]


def _checkpoint_module() -> types.ModuleType:
    return importlib.import_module("stackedtree.checkpoint")


def public_names() -> list[tuple[str, str]]:
    """(module, name) for every public name."""
    names = [("stackedtree", n) for n in stackedtree.__all__]
    names += [
        ("stackedtree.checkpoint", n)
        for n in getattr(_checkpoint_module(), "__all__", [])
    ]
    return names


def test_checkpoint_declares_its_api() -> None:
    assert hasattr(_checkpoint_module(), "__all__")


@pytest.mark.parametrize(("module", "name"), public_names())
def test_public_name_has_docstring(module: str, name: str) -> None:
    obj = getattr(importlib.import_module(module), name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        doc = obj.__doc__
    else:
        # A type alias or constant: its docstring is the string literal after its
        # assignment, which only static analysis (as mkdocstrings does it) sees.
        griffe = pytest.importorskip("griffe")
        package = griffe.load(module, search_paths=[str(DOCS.parent / "src")])
        doc = package[name].docstring.value if package[name].docstring else None
    assert doc and doc.strip(), f"`{module}.{name}` has no docstring"
    # Dataclasses and NamedTuples without a docstring get their signature as one.
    assert not doc.startswith(f"{name}("), f"`{module}.{name}` has no docstring"


@pytest.mark.parametrize(("module", "name"), public_names())
def test_docstring_examples_render_as_code(module: str, name: str) -> None:
    # mkdocstrings (griffe's Google parser) treats only `Examples:` as the examples
    # section; under `Example:` the doctest lines are rendered as plain markdown.
    doc = inspect.getdoc(getattr(importlib.import_module(module), name)) or ""
    assert not re.search(r"^\s*Example:\s*$", doc, re.MULTILINE), (
        f"`{module}.{name}`: name the doctest section `Examples:`, not `Example:`"
    )


def _reference_entries() -> set[str]:
    entries = set()
    for page in (DOCS / "api").glob("*.md"):
        entries |= set(
            re.findall(r"^:::\s*(stackedtree[\w.]*)", page.read_text(), re.M)
        )
    return entries


@pytest.mark.parametrize(("module", "name"), public_names())
def test_public_name_in_api_reference(module: str, name: str) -> None:
    entries = _reference_entries()
    accepted = {f"{module}.{name}"}
    if module == "stackedtree":
        # A re-export of a checkpoint function may be documented where it is defined.
        accepted.add(f"stackedtree.checkpoint.{name}")
    assert entries & accepted, f"no `::: {module}.{name}` entry in docs/api/*.md"


def _doctest_modules() -> list[str]:
    names = []
    for package in (stackedtree, _checkpoint_module()):
        names.append(package.__name__)
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if not info.ispkg and not info.name.endswith("__main__"):
                names.append(info.name)
    return names


# Modules whose public functions must show at least one runnable example.
WITH_EXAMPLES = {
    "_stack",
    "_index",
    "_validate",
    "_describe",
    "_scan",
    "_tree",
    "_pipeline",
}


@pytest.mark.parametrize("module", _doctest_modules())
def test_docstring_examples(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(
        mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {module}"
    if module.removeprefix("stackedtree.") in WITH_EXAMPLES:
        assert result.attempted > 0, f"{module} has no examples"


def update_outputs(page: str) -> None:
    """Rewrites the Output blocks of `page` with what its blocks print now."""
    text = (DOCS / page).read_text()
    lines = text.splitlines()
    name = "docs_update"
    module = types.ModuleType(name)
    sys.modules[name] = module
    replacements = []
    for block, expected in page_blocks(page):
        stdout = io.StringIO()
        code = compile("\n" * block.line + block.code, f"docs/{page}", "exec")
        with contextlib.redirect_stdout(stdout):
            exec(code, module.__dict__)
        if expected is not None:
            indent = FENCE.match(lines[expected.line - 1])["indent"]  # type: ignore[index]
            printed = stdout.getvalue().rstrip().splitlines()
            got = [indent + line if line else "" for line in printed]
            end = expected.line + len(expected.code.rstrip("\n").splitlines())
            replacements.append((expected.line, end, got))
    for start, stop, got in reversed(replacements):
        lines[start:stop] = got
    (DOCS / page).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    # `python tests/test_docs.py guide/scan.md ...` rewrites those pages' Output blocks.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for arg in sys.argv[1:]:
        update_outputs(arg)
