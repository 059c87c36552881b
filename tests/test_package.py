"""The package's own shape: what `__init__` exports, and what it depends on."""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "stackedtree"


def type_checking_imports(init: Path) -> dict[str, str]:
    """`name -> module` of the `from M import name as name` lines under TYPE_CHECKING."""
    tree = ast.parse(init.read_text())
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom), ast.unparse(stmt)
                for alias in stmt.names:
                    assert alias.asname == alias.name, "re-export as `x as x`"
                    found[alias.name] = "." * stmt.level + (stmt.module or "")
    return found


@pytest.mark.parametrize("package", ["stackedtree", "stackedtree.checkpoint"])
def test_lazy_sources_match_the_type_checking_imports(package: str) -> None:
    module = importlib.import_module(package)
    init = Path(module.__file__)  # type: ignore[arg-type]
    assert type_checking_imports(init) == module._SOURCES
    assert module.__all__ == sorted(module._SOURCES)
    for name in module.__all__:
        assert getattr(module, name) is not None


def _imported_top_level_modules() -> set[str]:
    names = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_runtime_dependency_is_imported_by_the_library() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {
        re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower().replace("-", "_")
        for d in project["dependencies"]
    }
    imported = {m.lower() for m in _imported_top_level_modules()}
    assert deps <= imported, f"declared but never imported: {sorted(deps - imported)}"
