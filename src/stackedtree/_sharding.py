"""Layer shardings: one layer's `PartitionSpec`s -> the specs of the stacked tree.

A stacked leaf is one layer's leaf with a leading layer axis, so its spec is the layer's
spec with one entry in front: `P(axis, *spec)`. `axis=None` keeps the layer axis whole on
every device, which is what a plain `scan_layers` wants: XLA cannot slice one layer out
of a stack split along the layer axis without gathering the whole stack first (with
Explicit mesh axes, `jax.lax.scan` refuses it outright). Splitting the layer axis is for
pipelining, where each stage only ever touches its own layers.

`sharding_problems` is the one divisibility check, shared with `load_sharded`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from ._check import fail, num_layers_of
from ._leaf import fmt_shape, is_array, leaf_kind, shape_of
from ._tree import PyTree, flatten, where

AxisName: TypeAlias = str | tuple[str, ...] | None
"""Where a dimension goes on a mesh: one mesh axis name, a tuple of names (the
dimension split over their product), or None (kept whole), as in a `PartitionSpec`."""


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def entry_names(entry: Any) -> tuple[str, ...]:
    """The mesh axis names of one `PartitionSpec` entry."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _check_axis(axis: Any) -> None:
    ok = axis is None or isinstance(axis, str)
    if isinstance(axis, tuple):
        ok = bool(axis) and all(isinstance(a, str) for a in axis)
    if not ok:
        raise TypeError(
            f"`axis` must be None, a mesh axis name or a tuple of names, got {axis!r}."
        )


def layer_specs(specs: PyTree, /, *, axis: AxisName = None) -> PyTree:
    """The `PartitionSpec`s of a stacked tree, from one layer's.

    Each leaf `spec` of `specs` becomes `P(axis, *spec)`: the layer's dimensions keep
    their spec and the new leading layer axis is split over mesh axis `axis`. A `None`
    leaf means replicated, `P(axis)`.

    `axis=None`, the default, keeps the whole layer axis on every device, which is
    what `scan_layers` wants: to take one layer out of a stack split along the layer
    axis, XLA first gathers the whole stack on every device (in the
    [many-devices guide](../guide/many-devices.md)'s example, 8 layers on 8 devices,
    a forward scan needs 75 times the temporary memory of the same stack split along
    a weight dimension instead). Split the layer axis
    (`axis="stage"`) for pipelining, where each device only runs its own layers.

    Args:
        specs: a tree of one layer's `jax.sharding.PartitionSpec`s (or `None`), the
            structure of one layer or a prefix of it (one spec for a whole subtree).
        axis: the mesh axis (or tuple of axes) to split the layer axis over, or None.

    Returns:
        A tree of the same structure with `P(axis, *spec)` at every leaf.

    Raises:
        TypeError: a leaf of `specs` is not a `PartitionSpec` or None; `axis` is not
            a name, a tuple of names or None.
        ValueError: a spec already uses a mesh axis of `axis` (a mesh axis can split
            only one dimension).

    Examples:
        >>> from jax.sharding import PartitionSpec as P
        >>> layer_specs({"w": P(None, "fsdp"), "b": None})
        {'b': P(None,), 'w': P(None, None, 'fsdp')}
        >>> layer_specs(P("tp"), axis="stage")
        P('stage', 'tp')
    """
    _check_axis(axis)
    taken = set(entry_names(axis))
    problems: list[str] = []

    def one(path: Any, spec: Any) -> PartitionSpec:
        if not _is_spec(spec):
            raise TypeError(
                f"{where('specs', path)} must be a jax.sharding.PartitionSpec or "
                f"None (replicated), got {type(spec).__name__} {spec!r}."
            )
        spec = PartitionSpec() if spec is None else spec
        clash = [n for entry in spec for n in entry_names(entry) if n in taken]
        if clash:
            problems.append(
                f"{where('specs', path)} is {spec} and already uses mesh axis "
                f"{', '.join(map(repr, clash))}, which `axis` puts on the layer axis"
            )
        return PartitionSpec(axis, *spec)

    out = jax.tree_util.tree_map_with_path(one, specs, is_leaf=_is_spec)
    if problems:
        fail(problems, title="a mesh axis can split only one dimension")
    return out


def layer_shardings(mesh: Mesh, specs: PyTree, /, *, axis: AxisName = None) -> PyTree:
    """The `NamedSharding`s of a stacked tree on `mesh`, from one layer's specs.

    `NamedSharding(mesh, spec)` for every spec of `layer_specs(specs, axis=axis)`.

    Args:
        mesh: a `jax.sharding.Mesh`.
        specs: as in `layer_specs`.
        axis: as in `layer_specs`.

    Returns:
        A tree of the structure of `specs` with a `NamedSharding` at every leaf.

    Raises:
        TypeError: as in `layer_specs`; `mesh` is not a `Mesh`.
        ValueError: as in `layer_specs`; a spec (or `axis`) names an axis that
            `mesh` lacks.

    Examples:
        >>> import jax
        >>> from jax.sharding import AxisType, PartitionSpec as P
        >>> mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
        >>> layer_shardings(mesh, {"w": P(None, "fsdp")})["w"].spec
        P(None, None, 'fsdp')
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}."
        )
    stacked = layer_specs(specs, axis=axis)
    names = tuple(mesh.axis_names)
    problems = []
    for path, spec in flatten_specs(stacked):
        unknown = [n for e in spec for n in entry_names(e) if n not in names]
        if unknown:
            problems.append(
                f"{where('specs', path)} ({spec}) names mesh axis "
                f"{', '.join(map(repr, unknown))}, but the mesh has axes {names}"
            )
    if problems:
        fail(problems, title="the specs do not fit `mesh`")
    return jax.tree.map(lambda s: NamedSharding(mesh, s), stacked, is_leaf=_is_spec)


def flatten_specs(specs: PyTree) -> list[tuple[Any, PartitionSpec]]:
    """`(path, spec)` of every spec leaf of a tree of `PartitionSpec`s."""
    return jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]


def sharding_problems(
    label: str,
    shape: Sequence[int],
    sharding: Sharding,
    *,
    layer_axis: bool = False,
    expert_axis: bool = False,
) -> list[str]:
    """Why `sharding` cannot place an array of `shape`: one line per problem.

    The spec has more entries than the array has dimensions, or a dimension is split
    over mesh axes whose sizes do not divide it.

    Args:
        label: names the array, e.g. `` `layers` at attention.q_proj ``.
        shape: the array's (global) shape.
        sharding: the sharding to check.
        layer_axis: dimension 0 is the layer axis (said in the message).
        expert_axis: dimension 1 is the expert axis (said in the message).
    """
    shape = tuple(shape)
    if not isinstance(sharding, NamedSharding):
        try:
            sharding.shard_shape(shape)
        except ValueError as e:
            return [f"{label} of shape {fmt_shape(shape)}: {e}"]
        return []
    spec = sharding.spec
    if len(spec) > len(shape):
        return [
            f"{label} has shape {fmt_shape(shape)}, fewer dimensions than the "
            f"{len(spec)} entries of its spec {spec}"
        ]
    sizes = dict(sharding.mesh.shape)
    problems = []
    for dim, entry in enumerate(spec):
        names = entry_names(entry)
        split = math.prod(sizes[n] for n in names)
        if shape[dim] % split:
            what = f"dimension {dim}"
            if layer_axis and dim == 0:
                what += " (the layer axis)"
            elif expert_axis and dim == 1:
                what += " (the expert axis)"
            axes = ", ".join(f"{n!r} of size {sizes[n]}" for n in names)
            problems.append(
                f"{label} has shape {fmt_shape(shape)}: {what} of size {shape[dim]} "
                f"is split over mesh axes {axes} ({split} parts), which does not "
                f"divide it"
            )
    return problems


def _broadcast(specs: PyTree, layers: PyTree, arg: str) -> list[Any]:
    """One sharding per leaf of `layers`, from a tree that is a prefix of it."""
    try:
        full = jax.tree.map(
            lambda s, sub: jax.tree.map(lambda _: s, sub), specs, layers
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{arg}` must have the structure of one layer of `layers` (or a prefix "
            f"of it, one spec for a whole subtree): {e}"
        ) from None
    return jax.tree.leaves(full)


def shard_layers(
    layers: PyTree, mesh: Mesh, specs: PyTree, /, *, axis: AxisName = None
) -> PyTree:
    """Places a stacked tree on `mesh`: `jax.device_put` with `layer_shardings`.

    Numpy and jax leaves become `jax.Array`s placed with their sharding;
    `jax.ShapeDtypeStruct` leaves become `ShapeDtypeStruct`s carrying it (to plan a
    model with `jax.eval_shape` without allocating); static leaves are kept.

    Args:
        layers: a stacked tree (array leaves `(N, ...)`).
        mesh: a `jax.sharding.Mesh`.
        specs: one layer's `PartitionSpec`s, as in `layer_specs`.
        axis: the mesh axis for the layer axis, as in `layer_specs`; None (the
            default) for `scan_layers`.

    Returns:
        `layers` with every array leaf placed.

    Raises:
        TypeError, ValueError: as in `layer_shardings`.
        ValueError: `layers` is not a stack (a 0-d leaf, disagreeing leading
            lengths); `specs` does not match its structure; a spec has more entries
            than a leaf has dimensions; a dimension is not divisible by the sizes of
            the mesh axes it is split over (every such leaf listed, by path).

    Examples:
        >>> import jax, numpy as np
        >>> from jax.sharding import AxisType, PartitionSpec as P
        >>> mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
        >>> layers = {"w": np.zeros((4, 16, 8), np.float32)}
        >>> placed = shard_layers(layers, mesh, {"w": P("fsdp")})
        >>> placed["w"].sharding.spec, placed["w"].addressable_shards[0].data.shape
        (P(None, 'fsdp'), (4, 2, 8))
    """
    num_layers_of(layers, "layers")
    shardings = layer_shardings(mesh, specs, axis=axis)
    path_leaves = flatten(layers)[0]
    placing = _broadcast(shardings, layers, "specs")
    problems = []
    for (path, x), s in zip(path_leaves, placing, strict=True):
        if is_array(x):
            problems += sharding_problems(
                where("layers", path), shape_of(x), s, layer_axis=True
            )
    if problems:
        fail(problems, title="the specs do not fit the leaves of `layers`")

    put = [
        i
        for i, (_, x) in enumerate(path_leaves)
        if is_array(x) and leaf_kind(x) != "abstract"
    ]
    placed = jax.device_put([path_leaves[i][1] for i in put], [placing[i] for i in put])
    leaves = [x for _, x in path_leaves]
    for i, y in zip(put, placed, strict=True):
        leaves[i] = y
    for i, (_, x) in enumerate(path_leaves):
        if leaf_kind(x) == "abstract":
            leaves[i] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placing[i])
    return jax.tree.unflatten(jax.tree.structure(layers), leaves)
