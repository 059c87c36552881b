"""stack, unstack, num_layers, layer_keys and init_stacked."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._check import check_count, fail, num_layers_of, tree_problems
from ._leaf import fmt_shape, is_array, shape_of, stack_leaves
from ._tree import (
    KeyPath,
    PyTree,
    abstract_layer,
    arrays_only,
    at,
    flatten,
    merge_static,
    where,
)


def check_sequence(layers: Any, arg: str) -> list[Any]:
    """`layers` as a non-empty list, or a `TypeError`/`ValueError` naming `arg`."""
    if (
        isinstance(layers, dict | str | bytes)
        or not isinstance(layers, Sequence)
        or is_array(layers)
    ):
        raise TypeError(
            f"`{arg}` must be a list or tuple of per-layer trees, got "
            f"{type(layers).__name__}."
        )
    if len(layers) == 0:
        raise ValueError(f"`{arg}` is empty: at least one layer is needed.")
    return list(layers)


def check_same_layers(
    layers: Sequence[PyTree], arg: str, *, lead: int = 0
) -> tuple[list[list[tuple[KeyPath, Any]]], Any]:
    """Checks that `layers` agree in structure, array shapes/dtypes and static leaves.

    With `lead=1` the trees are stacks and their leading axes may differ. Returns the
    flattened leaves of every tree and the common treedef. Raises one `ValueError`
    (a `TypeError` when a leaf is an array in one tree and static in another) listing
    every difference from `layers[0]`.
    """
    want = abstract_layer(layers[0]) if lead else layers[0]
    problems, type_error = [], False
    for i, layer in enumerate(layers[1:], start=1):
        for path, phrase, is_type in tree_problems(want, layer, lead=lead):
            if path is None:
                problems.append(
                    f"`{arg}[{i}]` has a different tree structure from `{arg}[0]`"
                    + phrase
                )
            else:
                problems.append(
                    f"`{arg}[{i}]` differs from `{arg}[0]`{at(path)}: {phrase}"
                )
            type_error |= is_type
    if problems:
        what = "concatenated" if lead else "stacked"
        error = TypeError if type_error else ValueError
        fail(problems, error=error, title=f"`{arg}` cannot be {what}")
    flats = [flatten(layer)[0] for layer in layers]
    return flats, flatten(layers[0])[1]


def stack(layers: Sequence[PyTree], /) -> PyTree:
    """Stacks N per-layer trees into one tree whose array leaves have shape `(N, *shape)`.

    Numpy leaves stay numpy (one host copy, no device transfer), jax leaves become jax
    arrays (a mixture becomes jax), and `jax.ShapeDtypeStruct` leaves become
    `ShapeDtypeStruct((N, *shape), dtype)` so whole-model shapes can be planned without
    allocating. Static (non-array) leaves must be equal across layers and are kept once.

    Args:
        layers: A list or tuple of N >= 1 trees with the same structure, the same array
            shapes and dtypes, and equal static leaves.

    Returns:
        One tree with the structure of a layer, array leaves carrying a leading layer axis.

    Raises:
        TypeError: if `layers` is not a list or tuple, or a leaf is an array in one layer
            and static in another.
        ValueError: if `layers` is empty, or layers differ in structure, shape, dtype or a
            static leaf. The message names the layer, the leaf path, expected and actual.

    Examples:
        >>> import numpy as np
        >>> from stackedtree import stack
        >>> s = stack([{"w": np.zeros((2, 3)), "act": "relu"}] * 4)
        >>> s["w"].shape, s["act"]
        ((4, 2, 3), 'relu')
    """
    layers = check_sequence(layers, "layers")
    flats, treedef = check_same_layers(layers, "layers")
    out = []
    for j, (path, leaf0) in enumerate(flats[0]):
        if is_array(leaf0):
            leaves = [flat[j][1] for flat in flats]
            out.append(stack_leaves(leaves, where("layers", path)))
        else:
            out.append(leaf0)
    return jax.tree_util.tree_unflatten(treedef, out)


def num_layers(stacked: PyTree, /) -> int:
    """The common leading length N of the array leaves of a stacked tree.

    Args:
        stacked: A tree whose array leaves all have the same leading length.

    Returns:
        N, the number of layers.

    Raises:
        ValueError: if there are no array leaves, an array leaf is 0-d, or leading lengths
            disagree (every disagreeing leaf is listed, against the most common length).

    Examples:
        >>> import numpy as np
        >>> from stackedtree import num_layers
        >>> num_layers({"w": np.zeros((6, 2)), "b": np.zeros((6,))})
        6
    """
    return num_layers_of(stacked, "stacked")


def _in_host_memory(x: jax.Array) -> bool:
    """A concrete array on one CPU device, whose numpy view shares its bytes.

    Typed PRNG keys (no numpy dtype) and weakly typed arrays (a transfer would make
    them strongly typed) are left to jax.
    """
    if isinstance(x, jax.core.Tracer) or x.is_deleted():
        return False
    if x.sharding.num_devices != 1 or getattr(x, "weak_type", False):
        return False
    if jnp.issubdtype(x.dtype, jax.dtypes.extended):
        return False
    return next(iter(x.devices())).platform == "cpu"


def _unstack_leaf(x: Any, n: int) -> list[Any]:
    if isinstance(x, jax.ShapeDtypeStruct):
        return [jax.ShapeDtypeStruct(shape_of(x)[1:], x.dtype)] * n
    if isinstance(x, jax.Array):
        if _in_host_memory(x):
            # The array's bytes already are host memory: numpy views of them, put back
            # as jax arrays by one transfer call, need no compiled program. Splitting
            # on the device compiles one program per leaf shape, which made the first
            # `unstack` of a model several times slower than slicing it.
            host = np.asarray(x)
            device = next(iter(x.devices())) if x.committed else None
            return list(jax.device_put([host[i, ...] for i in range(n)], device))
        # Iterating a concrete jax array splits it with one compiled unstack (cached per
        # shape); iterating a tracer slices it while tracing, which costs nothing at run
        # time.
        return list(x)
    if x.ndim == 1:
        # Iterating a 1-d numpy array yields numpy scalars (copies); `x[i, ...]` keeps
        # each layer a 0-d view.
        return [x[i, ...] for i in range(n)]
    # Iterating a numpy array yields views along axis 0 in a single C loop.
    return list(x)


def unstack(stacked: PyTree, /) -> list[PyTree]:
    """The inverse of `stack`: a list of N per-layer trees.

    One operation per leaf rather than N x leaves slices: numpy leaves come back as views
    of the stacked array; a concrete jax leaf on the CPU is split as numpy views of its
    bytes and put back as jax arrays by one transfer, so nothing is compiled (on the
    same device, committed as it was); elsewhere by one compiled call. Static leaves are
    shared by every returned layer.

    Args:
        stacked: A stacked tree (array leaves with a common leading length N).

    Returns:
        A list of N trees with the leading axis removed.

    Raises:
        ValueError: as `num_layers`.

    Examples:
        >>> import numpy as np
        >>> from stackedtree import stack, unstack
        >>> layers = unstack({"w": np.arange(6).reshape(3, 2)})
        >>> [layer["w"].tolist() for layer in layers]
        [[0, 1], [2, 3], [4, 5]]
    """
    n = num_layers(stacked)
    flat, treedef = jax.tree_util.tree_flatten(stacked)
    per_leaf = [_unstack_leaf(x, n) if is_array(x) else [x] * n for x in flat]
    return [
        jax.tree_util.tree_unflatten(treedef, [parts[i] for parts in per_leaf])
        for i in range(n)
    ]


def check_key(key: Any, arg: str = "key") -> None:
    """A single typed or raw PRNG key, or a `TypeError` naming `arg`."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.ndim != 0:
            raise TypeError(
                f"`{arg}` must be a single key, got a key array of shape "
                f"{fmt_shape(key.shape)}."
            )
        return
    if (
        isinstance(key, jax.Array | np.ndarray)
        and key.dtype == np.uint32
        and key.ndim == 1
    ):
        return
    desc = (
        f"{type(key).__name__} of shape {fmt_shape(key.shape)} and dtype {key.dtype}"
        if is_array(key)
        else type(key).__name__
    )
    raise TypeError(
        f"`{arg}` must be a PRNG key from `jax.random.key` or `jax.random.PRNGKey`, "
        f"got {desc}."
    )


def layer_keys(key: jax.Array, n: int, /) -> jax.Array:
    """The per-layer PRNG keys: element `i` equals `jax.random.fold_in(key, i)`.

    Folding in the layer index (rather than splitting) makes layer `i`'s key independent
    of N and of the scan direction.

    Args:
        key: A typed key (`jax.random.key`) or a raw uint32 key (`jax.random.PRNGKey`).
        n: The number of layers, >= 0.

    Returns:
        A key array of N keys, of the same kind as `key` (typed keys of shape `(n,)`, raw
        keys of shape `(n, 2)`).

    Raises:
        TypeError: if `key` is not a key or `n` is not an int.
        ValueError: if `n` is negative.

    Examples:
        >>> import jax
        >>> from stackedtree import layer_keys
        >>> keys = layer_keys(jax.random.key(0), 4)
        >>> bool((jax.random.key_data(keys[2]) ==
        ...       jax.random.key_data(jax.random.fold_in(jax.random.key(0), 2))).all())
        True
    """
    check_key(key)
    n = check_count(n, "n", minimum=0)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(n, dtype=jnp.uint32)
    )


def init_stacked(
    init_fn: Callable[[jax.Array], PyTree], key: jax.Array, n: int, /
) -> PyTree:
    """Builds stacked params directly: `stack([init_fn(k) for k in layer_keys(key, n)])`.

    The per-layer initialiser runs once under `jax.vmap`, so no list of N layers is ever
    materialised. Static leaves returned by `init_fn` are kept as they are.

    Args:
        init_fn: Maps one PRNG key to one layer's tree.
        key: A typed or raw PRNG key.
        n: The number of layers, >= 1.

    Returns:
        The stacked tree, array leaves of shape `(n, *shape)`.

    Raises:
        TypeError: if `key` is not a PRNG key, `init_fn` is not callable or `n` is
            not an int.
        ValueError: if `n` < 1.

    Examples:
        >>> import jax
        >>> from stackedtree import init_stacked
        >>> params = init_stacked(lambda k: {"w": jax.random.normal(k, (3,)), "act": "gelu"},
        ...                       jax.random.key(0), 5)
        >>> params["w"].shape, params["act"]
        ((5, 3), 'gelu')
    """
    if not callable(init_fn):
        raise TypeError(f"`init_fn` must be callable, got {type(init_fn).__name__}.")
    n = check_count(n, "n")
    init_arrays, static = arrays_only(init_fn)
    arrays = jax.vmap(init_arrays)(layer_keys(key, n))
    return merge_static(arrays, static[0])
