"""scan_layers: jax.lax.scan over a stack of layers, with keys and rematerialisation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._stack import _check_key, checked_num_layers, layer_keys
from ._tree import (
    PyTree,
    dtype_of,
    flatten,
    fmt_shape,
    is_array,
    merge_static,
    path_str,
    split_static,
    zip_matching,
)

# Policies in `jax.checkpoint_policies` that are policies themselves (the others there are
# factories taking names, which users pass as callables).
_POLICY_NAMES = (
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)

Remat = bool | str | Callable[..., bool]


def _valid_policy_names() -> list[str]:
    return [n for n in _POLICY_NAMES if hasattr(jax.checkpoint_policies, n)]


def _resolve_remat(remat: Any) -> tuple[bool, Callable[..., bool] | None]:
    """`remat` -> (whether to checkpoint, the policy or None for 'save nothing')."""
    if isinstance(remat, bool | np.bool_):
        return bool(remat), None
    if isinstance(remat, str):
        names = _valid_policy_names()
        if remat not in names:
            raise ValueError(
                f"`remat` {remat!r} is not a known checkpoint policy; valid names are "
                f"{', '.join(repr(n) for n in names)} (or pass True, False or a policy "
                "callable from `jax.checkpoint_policies`)."
            )
        return True, getattr(jax.checkpoint_policies, remat)
    if callable(remat):
        return True, remat
    raise TypeError(
        "`remat` must be a bool, the name of a `jax.checkpoint_policies` policy or a "
        f"policy callable, got {type(remat).__name__}."
    )


def sqrt_group_size(n: int) -> int:
    """The group size `remat_group="sqrt"` picks for N layers.

    The divisor of N nearest sqrt(N) when one lies within a factor of 2 of it (so no
    remainder group is needed: slicing one off costs a parameter-sized gradient buffer),
    else round(sqrt(N)).
    """
    root = math.sqrt(n)
    best = min(
        (d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - root), d)
    )
    return best if root / 2 <= best <= 2 * root else max(1, round(root))


def _resolve_group(remat_group: Any, n: int) -> int | None:
    if remat_group is None:
        return None
    if isinstance(remat_group, str):
        if remat_group != "sqrt":
            raise ValueError(
                f"`remat_group` must be None, a positive int or 'sqrt', got {remat_group!r}."
            )
        return sqrt_group_size(n) if n else None
    if isinstance(remat_group, bool) or not isinstance(remat_group, int | np.integer):
        raise TypeError(
            "`remat_group` must be None, a positive int or 'sqrt', got "
            f"{type(remat_group).__name__}."
        )
    if not 1 <= remat_group <= n:
        raise ValueError(
            f"`remat_group` must be between 1 and the {n} layers, got {remat_group}."
        )
    return int(remat_group)


def _check_xs(xs: PyTree, n: int) -> None:
    errors = []
    for path, x in flatten(xs)[0]:
        if not is_array(x):
            continue
        shape = tuple(np.shape(x))
        if not shape or shape[0] != n:
            got = "a 0-d array" if not shape else f"leading length {shape[0]}"
            errors.append(
                f"`xs` at {path_str(path)} has {got}, but `layers` has {n} layers"
            )
    if errors:
        raise ValueError("\n".join(errors))


def _aval(x: Any) -> tuple[tuple[int, ...], Any, bool]:
    """Shape, dtype as `lax.scan` sees it (float64 -> float32 without x64), weak type."""
    if isinstance(x, bool | int | float | complex):
        return (), jnp.result_type(x), True
    weak = bool(getattr(getattr(x, "aval", None), "weak_type", False))
    dtype = dtype_of(x)
    if isinstance(dtype, np.dtype):
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    return tuple(np.shape(x)), dtype, weak


def _check_carry(init: PyTree, carry: PyTree) -> None:
    pairs = zip_matching(
        init,
        carry,
        TypeError,
        "`fn` returned a carry with a different structure from `init`",
    )
    errors = []
    for path, a, b in pairs:
        if not (is_array(a) or isinstance(a, bool | int | float | complex)):
            continue
        if not (is_array(b) or isinstance(b, bool | int | float | complex)):
            errors.append(f"at {path_str(path)}: {type(b).__name__} is not an array")
            continue
        (sa, da, weak), (sb, db, _) = _aval(a), _aval(b)
        if sa != sb:
            errors.append(
                f"at {path_str(path)}: shape {fmt_shape(sb)} != {fmt_shape(sa)}"
            )
        if da != db and not weak:
            errors.append(f"at {path_str(path)}: dtype {db} != {da}")
    if errors:
        raise TypeError(
            "`fn` must return a carry with the shapes and dtypes of `init` (it is fed "
            "back to the next layer); it differs " + "; ".join(errors) + "."
        )


def _group(tree: PyTree, g: int) -> PyTree:
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // g, g, *x.shape[1:])), tree)


def scan_layers(
    fn: Callable[..., tuple[PyTree, PyTree]],
    init: PyTree,
    layers: PyTree,
    /,
    *,
    xs: PyTree = None,
    key: jax.Array | None = None,
    remat: Remat = False,
    remat_group: int | str | None = None,
    unroll: int | bool = 1,
    reverse: bool = False,
) -> tuple[PyTree, PyTree]:
    """Runs `fn` over a stack of layers with `jax.lax.scan`, compiling the layer once.

    Equivalent to this Python loop (`get_layer`, `stack` and `layer_keys` from this
    package), but traced and compiled once rather than N times:

    ```python
    keys = layer_keys(key, N)
    for i in (reversed(range(N)) if reverse else range(N)):
        args = (carry, get_layer(layers, i)) + ((get_layer(xs, i),) if xs is not None else ())
        kwargs = {"key": keys[i]} if key is not None else {}
        carry, y_i = fn(*args, **kwargs)
    return carry, stack([y_0, ..., y_{N-1}])  # ys[i] is layer i's output, also when reverse
    ```

    Args:
        fn: The layer function, `fn(carry, layer[, x], *, key=...) -> (carry, y)`. It gets
            one layer's tree with the leading axis removed, static leaves unchanged. `y`
            may be None. The returned carry must match `init` in structure, shapes and
            dtypes.
        init: The initial carry (e.g. the hidden state).
        layers: The stacked layer tree; its array leaves have a common leading length N.
        xs: Optional per-layer inputs (e.g. KV caches) with leading length N; layer `i`
            gets `xs` at index `i` as a third positional argument.
        key: Optional PRNG key (typed or raw). Layer `i` gets
            `jax.random.fold_in(key, i)` as the keyword argument `key=`; without a key,
            `fn` is called without `key=`.
        remat: Rematerialise each layer in the backward pass: False; True (save nothing
            inside a layer); the name of a `jax.checkpoint_policies` policy such as
            `"dots_saveable"`; or a policy callable.
        remat_group: None, an int `g`, or `"sqrt"` (g near sqrt(N), preferring a divisor
            of N). Scans over groups of `g` consecutive layers, each group
            rematerialised as a whole, so the backward pass stores about N/g + g carries
            instead of N. Layers inside a group are rematerialised as well, with the
            `remat` policy when one is given (else saving nothing). N need not be
            divisible by `g`: the remaining layers run as a shorter group, at the cost
            of one extra parameter-sized gradient buffer. Parameters keep their flat
            `(N, ...)` layout.
        unroll: As in `jax.lax.scan` (applies to the per-layer scan).
        reverse: As in `jax.lax.scan`: run from the last layer to the first. `ys[i]` is
            still layer `i`'s output and layer `i` still gets key `i`.

    Returns:
        `(carry, ys)`: the final carry and the per-layer outputs stacked along a leading
        axis of length N.

    Raises:
        TypeError: if `fn` is not callable or does not return `(carry, y)` with a carry
            matching `init`, if `key` is not a PRNG key, or `remat`/`remat_group` has the
            wrong type.
        ValueError: if `layers` is not a valid stack, `xs` has a leading length other than
            N, `remat` names an unknown policy, or `remat_group` is out of range.

    Examples:
        >>> import jax.numpy as jnp
        >>> from stackedtree import scan_layers
        >>> layers = {"w": jnp.array([1.0, 2.0, 3.0])}
        >>> carry, ys = scan_layers(lambda c, p: (c * p["w"], c), jnp.array(1.0), layers)
        >>> float(carry), ys.tolist()
        (6.0, [1.0, 1.0, 2.0])
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
    n = checked_num_layers(layers, "layers")
    checkpoint, policy = _resolve_remat(remat)
    g = _resolve_group(remat_group, n)
    if xs is not None:
        _check_xs(xs, n)
    if key is not None:
        _check_key(key)
        keys = layer_keys(key, n)
    else:
        keys = None

    layer_arrays, layer_static = split_static(layers)
    xs_arrays, xs_static = split_static(xs)
    y_static_box: list[PyTree] = []

    def body(
        carry: PyTree, sliced: tuple[PyTree, PyTree, Any]
    ) -> tuple[PyTree, PyTree]:
        arrays, x, k = sliced
        args: tuple[PyTree, ...] = (carry, merge_static(arrays, layer_static))
        if xs is not None:
            args += (merge_static(x, xs_static),)
        out = fn(*args) if k is None else fn(*args, key=k)
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise TypeError(
                "`fn` must return a pair `(carry, y)` like a `jax.lax.scan` body "
                f"(use `(carry, None)` for no output), got {_short_type(out)}."
            )
        new_carry, y = out
        _check_carry(init, new_carry)
        # As in the reference loop's `stack`, static leaves of `y` are kept once.
        y_arrays, y_static = split_static(y)
        y_static_box.append(y_static)
        return new_carry, y_arrays

    # With groups, layers inside a group are checkpointed too: recomputing a group then
    # keeps g carries rather than every intermediate of g layers.
    if checkpoint or g is not None:
        layer_body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    else:
        layer_body = body
    scanned = (layer_arrays, xs_arrays, keys)

    def flat_scan(carry: PyTree, seq: PyTree) -> tuple[PyTree, PyTree]:
        return jax.lax.scan(layer_body, carry, seq, unroll=unroll, reverse=reverse)

    if g is None:
        carry, ys = flat_scan(init, scanned)
        return carry, merge_static(ys, y_static_box[0])

    # Two-level scan: an outer scan over groups of g layers, each group a checkpointed
    # inner scan, so the backward pass keeps one carry per group plus one group's worth.
    grouped_scan = jax.checkpoint(flat_scan, prevent_cse=False)
    main = (n // g) * g
    head = jax.tree.map(lambda x: x[:main], scanned)
    tail = jax.tree.map(lambda x: x[main:], scanned)

    def run_groups(carry: PyTree) -> tuple[PyTree, PyTree]:
        carry, ys = jax.lax.scan(grouped_scan, carry, _group(head, g), reverse=reverse)
        return carry, jax.tree.map(lambda y: y.reshape((main, *y.shape[2:])), ys)

    def run_tail(carry: PyTree) -> tuple[PyTree, PyTree]:
        return grouped_scan(carry, tail)

    if main == n:
        carry, ys = run_groups(init)
    elif reverse:
        carry, ys_tail = run_tail(init)
        carry, ys_head = run_groups(carry)
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys_head, ys_tail)
    else:
        carry, ys_head = run_groups(init)
        carry, ys_tail = run_tail(carry)
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys_head, ys_tail)
    return carry, merge_static(ys, y_static_box[0])


def _short_type(x: Any) -> str:
    if isinstance(x, tuple | list):
        return f"a {type(x).__name__} of length {len(x)}"
    if is_array(x):
        return f"an array of shape {fmt_shape(np.shape(x))}"
    return type(x).__name__
