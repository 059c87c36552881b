"""Leaf classification, path formatting and structure checks shared by the package."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import jax
import numpy as np

PyTree: TypeAlias = Any
"""Any JAX pytree: a NamedTuple, dataclass, dict, list, Equinox module, ..."""

KeyPath: TypeAlias = tuple[Any, ...]


def is_array(x: Any) -> bool:
    """Whether `x` is an *array leaf*: stacked, sliced and scanned.

    Array leaves are `jax.Array` (tracers included), `numpy.ndarray`, numpy scalars and
    `jax.ShapeDtypeStruct`. Every other leaf is *static*.
    """
    return isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)


def leaf_kind(x: Any) -> str:
    """`"numpy"`, `"jax"`, `"abstract"` for array leaves, `"static"` otherwise."""
    if isinstance(x, np.ndarray | np.generic):
        return "numpy"
    if isinstance(x, jax.ShapeDtypeStruct):
        return "abstract"
    if isinstance(x, jax.Array):
        return "jax"
    return "static"


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape of an array leaf as a tuple of ints."""
    return tuple(int(d) for d in x.shape)


def dtype_of(x: Any) -> Any:
    """The dtype of an array leaf, comparable with `==`.

    A numpy dtype, or a jax extended dtype (e.g. a typed PRNG key's `key<fry>`), which
    numpy cannot represent.
    """
    dtype = x.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return dtype
    return np.dtype(dtype)


def path_str(path: KeyPath) -> str:
    """Formats a key path the way users write it: `attention.q_proj`, `['params']['w']`."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(f".{k.name}")
        elif isinstance(k, jax.tree_util.DictKey):
            parts.append(f"[{k.key!r}]")
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(f"[{k.idx}]")
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(f"[{k.key}]")
        else:
            parts.append(f"[{k!r}]")
    s = "".join(parts)
    return s[1:] if s.startswith(".") else (s or "<root>")


def where(arg: str, path: KeyPath) -> str:
    """`` `layers` at attention.q_proj ``, or just `` `layers` `` for the root."""
    return f"`{arg}` at {path_str(path)}" if path else f"`{arg}`"


def fmt_shape(shape: Sequence[int]) -> str:
    """A shape as Python prints a tuple: `(8, 2)`, `(9,)`, `()`."""
    return repr(tuple(int(d) for d in shape))


def _key_label(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return repr(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    return path_str((k,))


def flatten(tree: PyTree) -> tuple[list[tuple[KeyPath, Any]], Any]:
    """`jax.tree_util.tree_flatten_with_path`, with `None` kept as an empty node."""
    return jax.tree_util.tree_flatten_with_path(tree)


def _children(x: Any) -> tuple[list[tuple[KeyPath, Any]], Any]:
    """One level of flattening: the immediate children of `x` and its node definition."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        x, is_leaf=lambda y: y is not x
    )
    return leaves, treedef


def structure_difference(a: PyTree, b: PyTree) -> str:
    """Describes where the pytree structures of `a` and `b` first differ.

    Returns a phrase like ``at attention: node type Attention != dict`` or
    ``at ['mlp']: missing 'bias'``, with `a` taken as expected and `b` as actual.
    Assumes the structures do differ.
    """

    def walk(x: Any, y: Any, path: KeyPath) -> str | None:
        x_is_leaf = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))
        y_is_leaf = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(y))
        loc = f"at {path_str(path)}" if path else "at the root"
        if (x is None) != (y is None):
            # None is an empty node, not a leaf: an optional field (`bias=None`) set in
            # one tree and not in the other.
            want, got = (
                "None"
                if v is None
                else "an array"
                if is_array(v)
                else f"a {type(v).__name__}"
                for v in (x, y)
            )
            return f"{loc}: expected {want}, got {got}"
        if x_is_leaf and y_is_leaf:
            return None
        if x_is_leaf != y_is_leaf:
            want = "a leaf" if x_is_leaf else f"a {type(x).__name__} node"
            got = "a leaf" if y_is_leaf else f"a {type(y).__name__} node"
            return f"{loc}: expected {want}, got {got}"
        cx, dx = _children(x)
        cy, dy = _children(y)
        if type(x) is not type(y):
            return f"{loc}: node type {type(x).__name__} != {type(y).__name__}"
        kx = [p[-1] for p, _ in cx]
        ky = [p[-1] for p, _ in cy]
        if kx != ky and all(
            isinstance(k, jax.tree_util.SequenceKey) for k in [*kx, *ky]
        ):
            return f"{loc}: length {len(ky)} != {len(kx)}"
        if kx != ky:
            missing = ", ".join(_key_label(k) for k in kx if k not in ky)
            extra = ", ".join(_key_label(k) for k in ky if k not in kx)
            bits = []
            if missing:
                bits.append(f"missing {missing}")
            if extra:
                bits.append(f"unexpected {extra}")
            if not bits:
                bits.append(f"children {len(kx)} != {len(ky)}")
            return f"{loc}: " + ", ".join(bits)
        if dx.node_data() != dy.node_data():
            # Same type and keys: the difference is in static metadata (e.g. an Equinox
            # static field), which lives in the node definition rather than in a leaf.
            if dataclasses.is_dataclass(x):
                children = {
                    k.name for k in kx if isinstance(k, jax.tree_util.GetAttrKey)
                }
                for f in dataclasses.fields(x):
                    if f.name in children:
                        continue
                    vx, vy = getattr(x, f.name, None), getattr(y, f.name, None)
                    if not static_equal(vx, vy):
                        field = path_str((*path, jax.tree_util.GetAttrKey(f.name)))
                        return (
                            f"at {field}: static field {vy!r} != {vx!r} (static fields "
                            "are part of the tree structure and must be equal)"
                        )
            _, ax = dx.node_data()
            _, ay = dy.node_data()
            return f"{loc}: static node data {ay!r} != {ax!r}"
        for (px, vx), (_, vy) in zip(cx, cy, strict=True):
            found = walk(vx, vy, path + px)
            if found is not None:
                return found
        return None

    found = walk(a, b, ())
    return found if found is not None else "in a way that could not be located"


def zip_matching(
    expected: PyTree, actual: PyTree, error: type[Exception], what: str
) -> list[tuple[KeyPath, Any, Any]]:
    """Pairs the leaves of two trees of the same structure as `(path, expected, actual)`.

    Raises `error("{what} {where they differ}.")` when the structures differ.
    """
    flat_e, treedef_e = flatten(expected)
    flat_a, treedef_a = flatten(actual)
    if treedef_e != treedef_a:
        raise error(f"{what} {structure_difference(expected, actual)}.")
    return [(path, e, a) for (path, e), (_, a) in zip(flat_e, flat_a, strict=True)]


def static_equal(a: Any, b: Any) -> bool:
    """Static leaves agree when `a == b` is a true boolean (or they are the same object)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def static_repr(x: Any) -> str:
    """`repr` of a static leaf, with functions named rather than shown by address."""
    text = repr(x)
    name = getattr(x, "__qualname__", None) or getattr(x, "__name__", None)
    if callable(x) and isinstance(name, str) and " at 0x" in text:
        return f"<{type(x).__name__} {name}>"
    return text


def split_static(tree: PyTree) -> tuple[PyTree, PyTree]:
    """Splits `tree` into (arrays, static), each with `None` where the other has a leaf."""
    arrays = jax.tree.map(lambda x: x if is_array(x) else None, tree)
    static = jax.tree.map(lambda x: None if is_array(x) else x, tree)
    return arrays, static


def merge_static(arrays: PyTree, static: PyTree) -> PyTree:
    """Inverse of `split_static`."""
    return jax.tree.map(
        lambda a, s: s if a is None else a, arrays, static, is_leaf=lambda x: x is None
    )


def map_arrays(f: Callable[[Any], Any], tree: PyTree) -> PyTree:
    """Applies `f` to every array leaf, leaving static leaves untouched."""
    return jax.tree.map(lambda x: f(x) if is_array(x) else x, tree)


def check_index(index: Any, n: int, arg: str = "index") -> int | jax.Array:
    """Normalises a layer index: Python/numpy ints are range-checked, tracers pass."""
    if isinstance(index, bool):
        raise TypeError(f"`{arg}` must be an integer, got bool {index!r}.")
    if isinstance(index, jax.Array | np.ndarray | np.generic):
        if np.ndim(index) != 0 or not np.issubdtype(index.dtype, np.integer):
            raise TypeError(
                f"`{arg}` must be a scalar integer, got shape {fmt_shape(np.shape(index))} "
                f"dtype {index.dtype}."
            )
        if isinstance(index, jax.core.Tracer):
            return index
        index = int(index)
    if not isinstance(index, int):
        hint = " Use `slice_layers` for slices." if isinstance(index, slice) else ""
        raise TypeError(
            f"`{arg}` must be an integer, got {type(index).__name__}.{hint}"
        )
    if not -n <= index < n:
        raise IndexError(f"`{arg}` {index} is out of range for {n} layers.")
    return index % n
