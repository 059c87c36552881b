"""describe: a shape summary of a (stacked) tree, as printed in the scan tutorial."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

from ._leaf import dtype_of, is_array, shape_of, short_dtype
from ._nnx import INTERNAL_PREFIX, is_module, is_variable
from ._tree import PyTree


class _Node(NamedTuple):
    open: str
    items: list[tuple[str, Any]]  # (prefix, child node or atom string)
    close: str


def _array(x: Any, dtypes: bool) -> str:
    """An array leaf: `(32, 4096)`, or `f32[32,4096]` with `dtypes`."""
    shape = shape_of(x)
    if dtypes:
        return f"{short_dtype(dtype_of(x))}[{','.join(map(str, shape))}]"
    return "(" + ", ".join(map(str, shape)) + ")"


def _build(x: Any, dtypes: bool) -> _Node | str:
    if is_array(x):
        return _array(x, dtypes)
    if x is None:
        return "None"
    if is_variable(x):
        # An NNX variable reads as its kind and its value's shape: `Param(4, 8)`.
        values = jax.tree_util.tree_leaves(x)
        if len(values) == 1 and is_array(values[0]):
            atom = _array(values[0], dtypes)
            return type(x).__name__ + (f"({atom})" if dtypes else atom)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return _Node(
            f"{type(x).__name__}(",
            [(f"{f}=", _build(v, dtypes)) for f, v in zip(x._fields, x, strict=True)],
            ")",
        )
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = [f for f in dataclasses.fields(x) if hasattr(x, f.name)]
        return _Node(
            f"{type(x).__name__}(",
            [(f"{f.name}=", _build(getattr(x, f.name), dtypes)) for f in fields],
            ")",
        )
    if isinstance(x, Mapping):
        return _Node("{", [(f"{k!r}: ", _build(v, dtypes)) for k, v in x.items()], "}")
    if isinstance(x, list | tuple) and x and not any(map(is_array, jax.tree.leaves(x))):
        # A container of static values (e.g. a static `shape=(8,)` field) prints as
        # Python prints it, so it cannot be mistaken for an array's shape.
        return repr(x)
    if isinstance(x, list):
        return _Node("[", [("", _build(v, dtypes)) for v in x], "]")
    if isinstance(x, tuple):
        return _Node("(", [("", _build(v, dtypes)) for v in x], ")")
    children, treedef = jax.tree_util.tree_flatten_with_path(
        x, is_leaf=lambda y: y is not x
    )
    if jax.tree_util.treedef_is_leaf(treedef):
        return repr(x)
    # Another registered pytree node: name its children by their keys.
    items = []
    for path, child in children:
        key = jax.tree_util.keystr(path, simple=True)
        if key.startswith(INTERNAL_PREFIX) and is_module(x):
            continue  # NNX's bookkeeping (trace state), not the user's module
        items.append((f"{key}=", _build(child, dtypes)))
    return _Node(f"{type(x).__name__}(", items, ")")


def _flat(node: _Node | str) -> str:
    if isinstance(node, str):
        return node
    return node.open + ", ".join(p + _flat(c) for p, c in node.items) + node.close


def _render(
    node: _Node | str, indent: int, prefix: str, suffix: str, width: int
) -> str:
    flat = _flat(node)
    if isinstance(node, str) or indent + len(prefix) + len(flat) + len(suffix) <= width:
        return " " * indent + prefix + flat
    if not node.items:
        return " " * indent + prefix + flat
    lines = [" " * indent + prefix + node.open]
    for k, (p, c) in enumerate(node.items):
        last = k == len(node.items) - 1
        lines.append(
            _render(c, indent + 2, p, "" if last else ",", width)
            + ("" if last else ",")
        )
    lines.append(" " * indent + node.close)
    return "\n".join(lines)


def describe(tree: PyTree, /, *, dtypes: bool = False, width: int = 88) -> str:
    """A shape summary of a tree, in the form of the scan tutorial's printout.

    NamedTuples and dataclasses (Equinox modules included) print as `Name(field=...)`,
    dicts as `{'k': ...}`, lists and tuples as `[...]` and `(...)`; array leaves as their
    shape, `(32, 4096)`, or `f32[32,4096]` with `dtypes=True`; static leaves by `repr`.
    There are no trailing commas, so a 1-d shape reads `(4096)`. Flax NNX modules print
    their fields, and their variables as the variable's kind and shape,
    `Linear(bias=Param(4, 8), kernel=Param(4, 8, 8))` (hyperparameters such as
    `in_features` are left out). A node that does not fit in `width` columns puts its
    children on indented lines.

    Works on stacked trees, per-layer trees (inside a scanned function, on tracers) and
    trees of `jax.ShapeDtypeStruct`.

    Args:
        tree: Any pytree.
        dtypes: Print `dtype[shape]` instead of the shape tuple.
        width: The line width to fit nodes into.

    Returns:
        The summary as a string (print it).

    Examples:
        >>> import numpy as np
        >>> from stackedtree import describe
        >>> print(describe({"w": np.zeros((32, 4096), np.float32), "act": "relu"}))
        {'w': (32, 4096), 'act': 'relu'}
        >>> print(describe({"w": np.zeros((32, 4096), np.float32)}, dtypes=True))
        {'w': f32[32,4096]}
    """
    return _render(_build(tree, dtypes), 0, "", "", width)
