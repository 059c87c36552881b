"""Pytrees: path formatting, structure differences, array/static splitting, indices.

What an *array leaf* is lives in `_leaf.py` (which imports no jax); how two trees or a
stack are checked lives in `_check.py`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import jax
import numpy as np

from ._leaf import dtype_of, fmt_shape, is_array, shape_of, static_equal

PyTree: TypeAlias = Any
"""Any JAX pytree: a NamedTuple, dataclass, dict, list, Equinox module, ..."""

KeyPath: TypeAlias = tuple[Any, ...]


def path_str(path: KeyPath) -> str:
    """A key path as users write it: `attention.q_proj`, `['params']['w']`, `[3]`.

    `jax.tree_util.keystr` without the leading dot of an attribute; `<root>` for the
    empty path. The one path formatter of the package.
    """
    return jax.tree_util.keystr(tuple(path)).removeprefix(".") or "<root>"


def at(path: KeyPath) -> str:
    """`` at attention.q_proj ``, or nothing for the root.

    How every message locates a leaf: a root leaf is named by its argument alone.
    """
    return f" at {path_str(path)}" if path else ""


def where(arg: str, path: KeyPath) -> str:
    """`` `layers` at attention.q_proj ``, or just `` `layers` `` for the root."""
    return f"`{arg}`{at(path)}"


def flatten(tree: PyTree) -> tuple[list[tuple[KeyPath, Any]], Any]:
    """`jax.tree_util.tree_flatten_with_path`, with `None` kept as an empty node."""
    return jax.tree_util.tree_flatten_with_path(tree)


def _children(x: Any) -> tuple[list[tuple[KeyPath, Any]], Any]:
    """One level of flattening: the immediate children of `x` and its node definition."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        x, is_leaf=lambda y: y is not x
    )
    return leaves, treedef


def _static_fields(x: Any) -> list[str]:
    """The attribute names of a dataclass (Equinox modules included) or a Flax NNX
    module, children and static fields alike; NNX's own bookkeeping left out."""
    from ._nnx import INTERNAL_PREFIX, is_module

    if dataclasses.is_dataclass(x):
        return [f.name for f in dataclasses.fields(x)]
    if is_module(x):
        return [k for k in sorted(vars(x)) if not k.startswith(INTERNAL_PREFIX)]
    return []


def _static_field_difference(
    x: Any, y: Any, keys: list[Any], path: KeyPath
) -> str | None:
    """Where two nodes of one type differ in a static field (not a child), or None."""
    children = {k.name for k in keys if isinstance(k, jax.tree_util.GetAttrKey)}
    for name in _static_fields(x):
        if name in children:
            continue
        vx, vy = getattr(x, name, None), getattr(y, name, None)
        if not static_equal(vx, vy):
            field = path_str((*path, jax.tree_util.GetAttrKey(name)))
            return (
                f" at {field}: static field {vy!r} != {vx!r} (static fields "
                "are part of the tree structure and must be equal)"
            )
    return None


def structure_difference(a: PyTree, b: PyTree) -> str:
    """Describes where the pytree structures of `a` and `b` first differ.

    Returns a phrase like `` at attention: node type Attention != dict`` or
    `` at ['mlp']: missing 'bias'`` (``: expected a leaf, got a dict node`` at the
    root, see `at`), to follow a noun directly, with `a` taken as expected and `b` as
    actual. Assumes the structures do differ.
    """

    def walk(x: Any, y: Any, path: KeyPath) -> str | None:
        x_is_leaf = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))
        y_is_leaf = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(y))
        loc = at(path)
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
            missing = ", ".join(path_str((k,)) for k in kx if k not in ky)
            extra = ", ".join(path_str((k,)) for k in ky if k not in kx)
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
            found = _static_field_difference(x, y, kx, path)
            if found is not None:
                return found
            _, ax = dx.node_data()
            _, ay = dy.node_data()
            return f"{loc}: static node data {ay!r} != {ax!r}"
        for (px, vx), (_, vy) in zip(cx, cy, strict=True):
            found = walk(vx, vy, path + px)
            if found is not None:
                return found
        return None

    found = walk(a, b, ())
    return found if found is not None else " in a way that could not be located"


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


def abstract_layer(stacked: PyTree) -> PyTree:
    """One layer of `stacked` as `jax.ShapeDtypeStruct`s, for comparing layers with it.

    Array leaves lose their leading axis; static leaves are kept.
    """
    return map_arrays(
        lambda x: jax.ShapeDtypeStruct(shape_of(x)[1:], dtype_of(x)), stacked
    )


def arrays_only(f: Callable[..., PyTree]) -> tuple[Callable[..., PyTree], list[PyTree]]:
    """Wraps `f` to return only the array leaves of its result, for a traced function.

    `jax.vmap` and `jax.lax.scan` can only return arrays, so the static leaves of what
    `f` returns (a layer's activation name, say) are put aside in the returned list,
    once per trace, to be merged back with `merge_static(arrays, box[0])`.
    """
    box: list[PyTree] = []

    def wrapped(*args: Any, **kwargs: Any) -> PyTree:
        arrays, static = split_static(f(*args, **kwargs))
        box.append(static)
        return arrays

    return wrapped, box


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


# ------------------------------------------------------------ pytrees <-> flat names


def _name_paths(tree: Any) -> list[tuple[KeyPath, Any]]:
    """The key path that names each leaf: a Flax NNX variable's value is named by the
    variable's own path (`blocks.up.kernel`, as `nnx.to_flat_state` names it) rather
    than with a trailing `.value`."""
    from ._nnx import is_variable

    out = []
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[
        0
    ]:
        inner = (
            jax.tree_util.tree_flatten_with_path(node)[0] if is_variable(node) else []
        )
        if len(inner) == 1:
            out.append((path, inner[0][1]))
        elif is_variable(node):
            out.extend((path + sub, leaf) for sub, leaf in inner)
        else:
            out.append((path, node))
    return out


def _names_and_leaves(tree: Any, sep: str) -> tuple[list[str], list[Any], Any]:
    if not isinstance(sep, str):
        raise TypeError(f"`sep` must be a str, got {type(sep).__name__}.")
    path_leaves, treedef = flatten(tree)
    names = [
        jax.tree_util.keystr(path, simple=True, separator=sep)
        for path, _ in _name_paths(tree)
    ]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise ValueError(
            f"several leaves share the names {', '.join(map(repr, dup))} (a key "
            f"contains {sep!r}, or keys like 1 and '1' coincide); pick another `sep`."
        )
    return names, [leaf for _, leaf in path_leaves], treedef


def flatten_names(tree: Any, /, sep: str = ".") -> dict[str, Any]:
    """Flattens a pytree's array leaves to `{name: array}`, named by their key paths.

    Attribute names (NamedTuples, dataclasses, Equinox modules), dict keys and
    sequence indices are joined with `sep`, so a stacked `DecoderBlock` gives names
    such as `attention.q_proj` that can be saved with `save_flat`. Static (non-array)
    leaves, such as an activation name, are left out: they belong to the code, and
    `unflatten_names` takes them back from its template.

    Args:
        tree: any pytree.
        sep: the separator between path entries.

    Returns:
        The leaves by name, in `jax.tree_util` flattening order.

    Raises:
        ValueError: two leaves get the same name.

    Examples:
        >>> import numpy as np
        >>> tree = {"attention": {"q_proj": np.zeros(2), "act": "gelu"}, "norm": [np.ones(1)]}
        >>> {name: x.shape for name, x in flatten_names(tree).items()}
        {'attention.q_proj': (2,), 'norm.0': (1,)}
    """
    names, leaves, _ = _names_and_leaves(tree, sep)
    return {n: x for n, x in zip(names, leaves, strict=True) if is_array(x)}


def unflatten_names(flat: Mapping[str, Any], like: Any, /, sep: str = ".") -> Any:
    """Rebuilds a pytree with the structure of `like` from `flatten_names` names.

    Args:
        flat: maps names to leaves, as returned by `flatten_names` or `load_flat`.
        like: a pytree of the wanted structure. Its array leaves (arrays or
            `jax.ShapeDtypeStruct`s) are replaced from `flat`; its static leaves are
            kept unless `flat` names them.
        sep: the separator used by `flatten_names`.

    Returns:
        A pytree of the structure of `like` whose leaves come from `flat`.

    Raises:
        ValueError: names of `like` are missing from `flat`, or `flat` holds names
            that `like` does not have (both listed).

    Examples:
        >>> import numpy as np
        >>> back = unflatten_names({"w": np.ones(2)}, {"w": np.zeros(2), "act": "gelu"})
        >>> back["w"].tolist(), back["act"]
        ([1.0, 1.0], 'gelu')
    """
    names, template, treedef = _names_and_leaves(like, sep)
    missing = [
        n for n, x in zip(names, template, strict=True) if n not in flat and is_array(x)
    ]
    wanted = set(names)
    extra = [n for n in flat if n not in wanted]
    if missing or extra:
        lines = []
        if missing:
            lines.append(f"missing from `flat`: {', '.join(map(repr, missing))}")
        if extra:
            lines.append(f"not in `like`: {', '.join(map(repr, extra))}")
        raise ValueError(
            "the names of `flat` do not match the leaves of `like`; "
            + "; ".join(lines)
            + "."
        )
    return treedef.unflatten(
        [flat.get(n, x) for n, x in zip(names, template, strict=True)]
    )
