"""get_layer, set_layer, slice_layers, concat_layers, group_layers, ungroup_layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._check import (
    check_count,
    count_layers,
    fail,
    leading_shapes,
    num_layers_of,
    tree_problems,
)
from ._leaf import leaf_kind, on_bits, shape_of
from ._stack import check_same_layers, check_sequence, num_layers
from ._tree import (
    PyTree,
    abstract_layer,
    at,
    check_index,
    flatten,
    is_array,
    map_arrays,
    where,
)


def _sds(shape: tuple[int, ...], like: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, like.dtype)


def get_layer(stacked: PyTree, index: int | jax.Array, /) -> PyTree:
    """Layer `index` of a stacked tree, with the leading axis removed.

    Args:
        stacked: A stacked tree (array leaves with a common leading length N).
        index: An int in `[-N, N)` (negative counts from the end), or a scalar integer
            array; a traced integer works under `jit` (it is not range-checked there).

    Returns:
        The per-layer tree. Static leaves are returned unchanged.

    Raises:
        IndexError: if a concrete `index` is out of range.
        TypeError: if `index` is not an integer.
        ValueError: if `stacked` is not a valid stack (see `num_layers`).

    Examples:
        >>> import numpy as np
        >>> from stackedtree import get_layer
        >>> get_layer({"w": np.arange(6).reshape(3, 2)}, -1)["w"].tolist()
        [4, 5]
    """
    n = num_layers(stacked)
    i = check_index(index, n)
    if isinstance(i, int):

        def take(x: Any) -> Any:
            if isinstance(x, jax.ShapeDtypeStruct):
                return _sds(shape_of(x)[1:], x)
            # `x[i, ...]` rather than `x[i]`: a 1-d numpy leaf stays a 0-d array view
            # instead of becoming a numpy scalar copy.
            return x[i, ...]

    else:

        def take(x: Any) -> Any:
            if isinstance(x, jax.ShapeDtypeStruct):
                return _sds(shape_of(x)[1:], x)
            return jax.lax.dynamic_index_in_dim(jnp.asarray(x), i, keepdims=False)

    return map_arrays(take, stacked)


def set_layer(stacked: PyTree, index: int | jax.Array, layer: PyTree, /) -> PyTree:
    """Returns a copy of `stacked` with layer `index` replaced by `layer`.

    Numpy leaves are copied and updated; jax leaves use `x.at[index].set(...)`, which
    XLA performs in place when the input buffer can be donated.

    Args:
        stacked: A stacked tree.
        index: As in `get_layer`.
        layer: A per-layer tree with the structure, per-layer shapes and dtypes, and
            static leaves of `stacked`.

    Returns:
        The updated stacked tree.

    Raises:
        IndexError: if a concrete `index` is out of range.
        TypeError: if a leaf of `layer` is an array where `stacked` has a static leaf, or
            the reverse.
        ValueError: if `layer` does not match a layer of `stacked`; every mismatching leaf
            is listed.

    Examples:
        >>> import numpy as np
        >>> from stackedtree import set_layer
        >>> s = set_layer({"w": np.zeros((3, 2))}, 1, {"w": np.ones(2)})
        >>> s["w"].tolist()
        [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    """
    n = num_layers(stacked)
    i = check_index(index, n)
    target = f"layer {i} of `stacked`" if isinstance(i, int) else "a layer of `stacked`"
    problems, type_error = [], False
    for path, phrase, is_type in tree_problems(abstract_layer(stacked), layer):
        if path is None:
            problems.append(
                f"`layer` has a different tree structure from {target}{phrase}"
            )
        else:
            problems.append(f"`layer` differs from {target}{at(path)}: {phrase}")
        type_error |= is_type
    if problems:
        fail(
            problems,
            error=TypeError if type_error else ValueError,
            title="`layer` cannot be set",
        )

    def put(s: Any, v: Any) -> Any:
        if isinstance(s, jax.ShapeDtypeStruct):
            return s
        if leaf_kind(s) == "numpy" and isinstance(i, int) and leaf_kind(v) == "numpy":
            out = s.copy()
            out[i] = v
            return out
        return on_bits(lambda xs, v: jnp.asarray(xs[0]).at[i].set(v), [s], v)

    flat, treedef = flatten(stacked)
    values = jax.tree.leaves(layer)
    out = [
        put(s, v) if is_array(s) else s for (_, s), v in zip(flat, values, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def slice_layers(
    stacked: PyTree,
    start: int | None = None,
    stop: int | None = None,
    step: int | None = None,
) -> PyTree:
    """Layers `start:stop:step` of a stacked tree, still stacked.

    Python slice semantics on the layer axis (negative bounds, out-of-range bounds clip,
    negative steps reverse). Numpy leaves come back as views.

    Args:
        stacked: A stacked tree.
        start: As in a Python slice.
        stop: As in a Python slice.
        step: As in a Python slice; must not be 0.

    Returns:
        A stacked tree of the selected layers.

    Raises:
        ValueError: if `step` is 0 or `stacked` is not a valid stack.

    Examples:
        >>> import numpy as np
        >>> from stackedtree import slice_layers
        >>> slice_layers({"w": np.arange(5)}, 1, None, 2)["w"].tolist()
        [1, 3]
    """
    if step == 0:
        raise ValueError("`step` must not be 0.")
    n = num_layers(stacked)
    sl = slice(start, stop, step)
    length = len(range(*sl.indices(n)))

    def take(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return _sds((length, *shape_of(x)[1:]), x)
        return x[sl]

    return map_arrays(take, stacked)


def concat_layers(stacks: Sequence[PyTree], /) -> PyTree:
    """Joins stacked trees along the layer axis.

    Args:
        stacks: A list or tuple of stacked trees with the same structure, the same
            per-layer shapes and dtypes and equal static leaves (their N may differ).

    Returns:
        One stacked tree with `sum(N_k)` layers. Numpy in, numpy out; any jax leaf makes
        the result jax.

    Raises:
        TypeError: if `stacks` is not a list or tuple, or mixes abstract and concrete
            leaves.
        ValueError: if `stacks` is empty or the stacks disagree (every leaf is listed).

    Examples:
        >>> import numpy as np
        >>> from stackedtree import concat_layers, num_layers
        >>> num_layers(concat_layers([{"w": np.zeros((2, 3))}, {"w": np.ones((5, 3))}]))
        7
    """
    stacks = check_sequence(stacks, "stacks")
    for k, s in enumerate(stacks):
        num_layers_of(s, f"stacks[{k}]")
    flats, treedef = check_same_layers(stacks, "stacks", lead=1)
    out = []
    for j, (_, leaf0) in enumerate(flats[0]):
        if not is_array(leaf0):
            out.append(leaf0)
            continue
        leaves = [flat[j][1] for flat in flats]
        kinds = {leaf_kind(x) for x in leaves}
        if kinds == {"numpy"}:
            out.append(np.concatenate(leaves))
        elif kinds == {"abstract"}:
            total = sum(shape_of(x)[0] for x in leaves)
            out.append(_sds((total, *shape_of(leaf0)[1:]), leaf0))
        elif "abstract" in kinds:
            raise TypeError(
                f"{where('stacks', flats[0][j][0])} mixes jax.ShapeDtypeStruct and "
                "concrete arrays; concatenate either all-abstract or "
                "all-concrete stacks."
            )
        else:
            out.append(on_bits(jnp.concatenate, leaves))
    return jax.tree_util.tree_unflatten(treedef, out)


def group_layers(stacked: PyTree, size: int, /) -> PyTree:
    """Reshapes the layer axis `(N, ...)` into `(N // size, size, ...)`.

    Useful for layers that alternate in kind (e.g. local then global attention): with
    `size=2`, scan over pairs and apply the two kinds inside the scanned function.

    Args:
        stacked: A stacked tree.
        size: The group size; must divide N.

    Returns:
        A tree whose array leaves have two leading axes.

    Raises:
        ValueError: if `size` does not divide N.

    Examples:
        >>> import numpy as np
        >>> from stackedtree import group_layers
        >>> group_layers({"w": np.zeros((6, 4))}, 2)["w"].shape
        (3, 2, 4)
    """
    size = check_count(size, "size")
    n = num_layers(stacked)
    if n % size:
        raise ValueError(
            f"`size` {size} does not divide the {n} layers of `stacked`; "
            f"use `slice_layers` to split off the remaining {n % size} first."
        )

    def reshape(x: Any) -> Any:
        shape = (n // size, size, *shape_of(x)[1:])
        if isinstance(x, jax.ShapeDtypeStruct):
            return _sds(shape, x)
        return x.reshape(shape)

    return map_arrays(reshape, stacked)


def ungroup_layers(grouped: PyTree, /) -> PyTree:
    """The inverse of `group_layers`: merges the two leading axes into one.

    Args:
        grouped: A tree whose array leaves share their two leading lengths.

    Returns:
        The flat stacked tree, array leaves of shape `(G * size, ...)`.

    Raises:
        ValueError: if a leaf has fewer than two axes or the leading lengths disagree.

    Examples:
        >>> import numpy as np
        >>> from stackedtree import ungroup_layers
        >>> ungroup_layers({"w": np.zeros((3, 2, 4))})["w"].shape
        (6, 4)
    """
    leading, problems = count_layers(leading_shapes(grouped, "grouped"), axes=2)
    if problems:
        fail(problems, title="`grouped` is not a grouped stack")
    if leading is None:
        raise ValueError("`grouped` has no array leaves, so it has no layer axis.")

    def reshape(x: Any) -> Any:
        g, s, *rest = shape_of(x)
        if isinstance(x, jax.ShapeDtypeStruct):
            return _sds((g * s, *rest), x)
        return x.reshape((g * s, *rest))

    return map_arrays(reshape, grouped)
