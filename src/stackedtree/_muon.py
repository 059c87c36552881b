"""muon_dims: Optax's Muon dimension numbers for a stacked tree.

Muon orthogonalises each weight matrix. On its own, `optax.contrib.muon` takes every
2-d leaf for a matrix and sends every other leaf to Adam, which on a stacked tree is
backwards: a stacked `(N, d, f)` weight goes to Adam and a stacked `(N, d)` norm scale
is orthogonalised as if it were a matrix. `muon_dims` names the layer axis (and any
other axis a layer's own numbers leave out, such as an expert axis) as a batch axis,
so Muon updates each layer's matrices on their own.

optax is optional: it is imported when `muon_dims` is called, never by `import
stackedtree`.
"""

from __future__ import annotations

from typing import Any

import jax

from ._check import fail
from ._leaf import fmt_shape, is_array, shape_of, static_repr
from ._nnx import is_variable
from ._tree import KeyPath, PyTree, path_str, structure_difference


def _optax_dims() -> Any:
    try:
        from optax.contrib import MuonDimensionNumbers
    except ImportError as e:  # pragma: no cover - optax is in the test extras
        raise ImportError(
            "`muon_dims` needs optax (`pip install optax`, or the `peers` extra)."
        ) from e
    return MuonDimensionNumbers


def _axes(value: Any) -> tuple[Any, ...] | None:
    """An axis field as a tuple, or None when it is not an int or a sequence of ints."""
    items = (value,) if isinstance(value, int) else value
    try:
        items = tuple(items)
    except TypeError:
        return None
    if any(isinstance(a, bool) or not isinstance(a, int) for a in items):
        return None
    return items


def _stacked_dims(
    dims: Any, shape: tuple[int, ...], path: KeyPath, problems: list[str]
) -> Any:
    """One layer's numbers `dims` for a leaf of per-layer `shape`, shifted past the
    layer axis; None (and a line in `problems`) when they do not fit the leaf."""
    rank = len(shape)
    where = f"`per_layer` at {path_str(path)}"
    fields = {"reduction_axis": dims.reduction_axis, "output_axis": dims.output_axis}
    out = {}
    for name, value in fields.items():
        axes = _axes(value)
        if axes is None or not axes:
            problems.append(
                f"{where}: {name} must be an int or a non-empty sequence of ints, "
                f"got {value!r}"
            )
            return None
        outside = [a for a in axes if not -rank <= a < rank]
        if outside:
            problems.append(
                f"{where}: {name} {value!r} is outside one layer's shape "
                f"{fmt_shape(shape)} (valid axes: {-rank} to {rank - 1})"
            )
            return None
        out[name] = tuple(a % rank + 1 for a in axes)
    red, outp = out["reduction_axis"], out["output_axis"]
    if len(set(red + outp)) != len(red) + len(outp):
        problems.append(
            f"{where}: reduction_axis {dims.reduction_axis!r} and output_axis "
            f"{dims.output_axis!r} overlap (or repeat an axis) in a layer of rank {rank}"
        )
        return None
    one = lambda axes, given: axes[0] if isinstance(given, int) else axes  # noqa: E731
    return type(dims)(one(red, dims.reduction_axis), one(outp, dims.output_axis))


def _is_leaf(x: Any) -> bool:
    """None, and a Flax NNX variable: its dimension numbers stand in its place, as
    optax sees it (`nnx.Optimizer` hands optax the variables' values)."""
    return x is None or is_variable(x)


def _value(x: Any) -> Any:
    """An NNX variable's value, or `x` itself."""
    if not is_variable(x):
        return x
    values = jax.tree_util.tree_leaves(x)
    return values[0] if len(values) == 1 else x


def muon_dims(stacked: PyTree, /, per_layer: PyTree = None) -> PyTree:
    """The `optax.contrib.MuonDimensionNumbers` tree that makes Muon work per layer.

    Pass it as `optax.contrib.muon(..., muon_weight_dimension_numbers=muon_dims(params))`:
    the layer axis (and every axis a layer's own numbers leave out, such as the expert
    axis of a stacked `(N, E, d, f)` weight) is a batch axis, so Muon orthogonalises each
    layer's matrices on their own and updates a stacked tree exactly as it updates each
    layer alone. Leaves that are not matrices per layer (norm scales, biases) get None,
    which Muon sends to Adam.

    Args:
        stacked: A stacked tree (array leaves with a leading layer axis; static leaves
            get None). A Flax NNX variable counts as its value, so
            `muon_dims(nnx.state(model, nnx.Param))` has the structure optax sees
            under `nnx.Optimizer`; or pass `muon_dims` itself, which optax calls with
            the parameters.
        per_layer: One layer's dimension numbers: a tree with one layer's structure
            holding a `MuonDimensionNumbers` (axes of one layer's leaf; negative axes
            count from its end, as optax reads them) or None (not Muon) in place of
            each leaf. An einsum-shaped `q_proj` of `(d_model, heads, head_dim)` takes
            `MuonDimensionNumbers(0, (1, 2))`; one layer's experts `(E, d, f)` take
            `MuonDimensionNumbers(1, 2)`. None (the default): the last two axes of every
            leaf of rank >= 2 per layer, and None for the rest.

    Returns:
        A tree with the structure of `stacked` holding a `MuonDimensionNumbers` (in the
        stacked leaf's axes) or None in place of each leaf.

    Raises:
        ImportError: if optax is not installed.
        ValueError: if `per_layer` does not have one layer's structure, or its numbers
            point past a leaf's per-layer rank or overlap; every such leaf is named by
            its path.

    Examples:
        >>> import numpy as np
        >>> from stackedtree import muon_dims
        >>> params = {"w": np.zeros((4, 16, 32)), "scale": np.zeros((4, 16))}
        >>> muon_dims(params)
        {'scale': None, 'w': MuonDimensionNumbers(reduction_axis=1, output_axis=2)}
    """
    dims_type = _optax_dims()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(stacked, is_leaf=_is_leaf)
    leaves = [(path, _value(leaf)) for path, leaf in leaves]
    shapes = []
    for path, leaf in leaves:
        if is_array(leaf) and not shape_of(leaf):
            raise ValueError(
                f"`stacked` at {path_str(path)} is 0-d: a stacked leaf needs a layer axis."
            )
        shapes.append(shape_of(leaf)[1:] if is_array(leaf) else None)
    if per_layer is None:
        wanted = [
            dims_type(-2, -1) if shape is not None and len(shape) >= 2 else None
            for shape in shapes
        ]
    else:
        wanted = _per_layer_dims(stacked, per_layer, dims_type)
    problems: list[str] = []
    out: list[Any] = []
    for (path, leaf), shape, dims in zip(leaves, shapes, wanted, strict=True):
        if dims is None:
            out.append(None)
        elif shape is None:
            problems.append(
                f"`per_layer` at {path_str(path)} gives dimension numbers where "
                f"`stacked` holds {static_repr(leaf)}, not an array"
            )
        else:
            out.append(_stacked_dims(dims, shape, path, problems))
    if problems:
        fail(problems, title="`per_layer` does not fit the layers of `stacked`")
    return jax.tree_util.tree_unflatten(treedef, out)


def _per_layer_dims(stacked: PyTree, per_layer: PyTree, dims_type: Any) -> list[Any]:
    """`per_layer`'s numbers (or None) in `stacked`'s leaf order, checked to have one
    layer's structure."""

    def is_dims(x: Any) -> bool:
        return x is None or isinstance(x, dims_type)

    found, got = jax.tree_util.tree_flatten_with_path(per_layer, is_leaf=is_dims)
    want: Any = jax.tree.structure(stacked, is_leaf=_is_leaf)
    if got != want:
        zero = lambda x: 0  # noqa: E731 - only the structures are compared
        where = structure_difference(
            jax.tree.map(zero, stacked, is_leaf=_is_leaf),
            jax.tree.map(zero, per_layer, is_leaf=is_dims),
        )
        raise ValueError(
            "`per_layer` must have the structure of one layer of `stacked`, with a "
            f"MuonDimensionNumbers or None in place of each leaf; it differs{where}."
        )
    bad = [
        f"`per_layer` at {path_str(path)} holds {type(x).__name__} {x!r}, not a "
        "MuonDimensionNumbers or None"
        for path, x in found
        if not is_dims(x)
    ]
    if bad:
        fail(bad, title="`per_layer` must hold one layer's dimension numbers")
    return [x for _, x in found]
