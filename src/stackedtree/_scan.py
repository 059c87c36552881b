"""scan_layers: jax.lax.scan over a stack of layers, with keys and rematerialisation.

`scan_layers` is a dispatcher: it resolves its options, builds the layer step
(`layer_step`, shared with `scan_pattern`), then runs a flat or a grouped scan.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from ._check import count_layers, fail, leading_shapes, num_layers_of, tree_problems
from ._leaf import dtype_of, fmt_shape, is_array
from ._nnx import track_layer_state
from ._stack import check_key, layer_keys
from ._tree import PyTree, arrays_only, at, merge_static, split_static

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

Remat: TypeAlias = bool | str | Callable[..., bool]
"""What to rematerialise in a layer's backward pass: `False` (nothing), `True`
(everything), the name of a `jax.checkpoint_policies` policy such as
`"dots_saveable"`, or a policy callable."""


def _valid_policy_names() -> list[str]:
    return [n for n in _POLICY_NAMES if hasattr(jax.checkpoint_policies, n)]


def resolve_remat(remat: Any) -> tuple[bool, Callable[..., bool] | None]:
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


def check_xs(xs: PyTree, n: int, arg: str = "xs") -> None:
    """Every array leaf of `xs` has leading length `n`, else a `ValueError`."""
    _, problems = count_layers(
        leading_shapes(xs, arg), expected=n, because=f"but `layers` has {n} layers"
    )
    if problems:
        fail(problems, title=f"`{arg}` must hold one entry per layer")


def _aval(x: Any) -> Any:
    """A carry leaf as `lax.scan` sees it: canonical dtype (float64 -> float32 without
    x64), Python scalars weakly typed. Other leaves are returned as they are."""
    if isinstance(x, bool | int | float | complex):
        return jax.ShapeDtypeStruct((), jnp.result_type(x), weak_type=True)
    if not is_array(x):
        return x
    weak = bool(getattr(getattr(x, "aval", None), "weak_type", False))
    dtype = dtype_of(x)
    if isinstance(dtype, np.dtype):
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    return jax.ShapeDtypeStruct(tuple(np.shape(x)), dtype, weak_type=weak)


def check_carry(init: PyTree, carry: PyTree, fn: str = "fn") -> None:
    """The carry `fn` returned matches `init` in structure, shapes and dtypes."""
    problems = []
    for path, phrase, _ in tree_problems(
        jax.tree.map(_aval, init), jax.tree.map(_aval, carry), weak_dtypes=True
    ):
        if path is None:
            raise TypeError(
                f"`{fn}` returned a carry with a different structure from `init`"
                f"{phrase}."
            )
        problems.append(f"the carry differs{at(path)}: {phrase}")
    if problems:
        fail(
            problems,
            f"`{fn}` must return a carry with the shapes and dtypes of `init` (it is fed "
            "back to the next layer)",
            TypeError,
        )


def _short_type(x: Any) -> str:
    if isinstance(x, tuple | list):
        return f"a {type(x).__name__} of length {len(x)}"
    if is_array(x):
        return f"an array of shape {fmt_shape(np.shape(x))}"
    return type(x).__name__


def check_y_like_x(x: PyTree, y: PyTree, fn: str = "fn") -> None:
    """With `update_xs=True`, the `y` `fn` returned matches its `x` in structure,
    shapes and dtypes (it is written back into `xs`)."""
    problems = []
    for path, phrase, _ in tree_problems(x, y):
        if path is None:
            problems.append(f"`y` has a different structure from its `x`{phrase}")
        else:
            problems.append(f"`y` differs from its `x`{at(path)}: {phrase}")
    if problems:
        fail(
            problems,
            f"with `update_xs=True`, `{fn}` must return a `y` with the structure, "
            "shapes and dtypes of its `x` (actual != expected), as `y` is written back "
            "into `xs` in place",
            TypeError,
        )


def layer_step(
    fn: Callable[..., tuple[PyTree, PyTree]],
    init: PyTree,
    layer_static: PyTree,
    xs_static: PyTree,
    *,
    has_xs: bool,
    checkpoint: bool,
    policy: Callable[..., bool] | None,
    name: str = "fn",
    y_like_x: bool = False,
    aux: bool = False,
) -> tuple[Callable[[PyTree, tuple[PyTree, PyTree, Any]], tuple[PyTree, PyTree]], list]:
    """The body of a scan over layers, and the box of `y`'s static leaves.

    The body takes `(carry, (layer_arrays, x_arrays, key))`, merges the static leaves
    back, calls `fn` as the reference loop does (`key=` only with a key), checks the
    pair it returns and its carry (and, with `y_like_x`, that `y` matches `x`), and
    returns the array leaves of `y`; the static leaves of `y` are kept once (as the
    reference loop's `stack` keeps them).
    `name` is how errors refer to `fn` (`` fns['L'] `` in `scan_pattern`). With `aux`,
    `fn`'s `y` is a pair `(y, aux)` whose first part is the one matched against `x`
    (the NNX state a layer wrote travels as `aux`).
    """

    y_arrays, y_static = arrays_only(lambda y: y)

    def call(
        carry: PyTree, sliced: tuple[PyTree, PyTree, Any]
    ) -> tuple[PyTree, PyTree]:
        arrays, x, k = sliced
        args: tuple[PyTree, ...] = (carry, merge_static(arrays, layer_static))
        if has_xs:
            args += (merge_static(x, xs_static),)
        out = fn(*args) if k is None else fn(*args, key=k)
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise TypeError(
                f"`{name}` must return a pair `(carry, y)` like a `jax.lax.scan` body "
                f"(use `(carry, None)` for no output), got {_short_type(out)}."
            )
        check_carry(init, out[0], name)
        if y_like_x:
            check_y_like_x(args[2], out[1][0] if aux else out[1], name)
        return out[0], out[1]

    def body(
        carry: PyTree, sliced: tuple[PyTree, PyTree, Any]
    ) -> tuple[PyTree, PyTree]:
        new_carry, y = call(carry, sliced)
        return new_carry, y_arrays(y)

    if checkpoint:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    return body, y_static


def in_place(
    step: Callable[[PyTree, tuple[PyTree, PyTree, Any]], tuple[PyTree, PyTree]],
    part: Any = None,
    *,
    aux: bool = False,
) -> Callable[[tuple[PyTree, PyTree], tuple[PyTree, Any, Any]], tuple[Any, Any]]:
    """A layer step that reads its `x` from, and writes its `y` back into, the stacked
    `xs` it carries: `((carry, xs), (layer_arrays, index, key)) -> ((carry, xs), None)`.

    `xs` (array leaves only) is read with `dynamic_index_in_dim` and written with
    `dynamic_update_index_in_dim` at `index`, so under `jit` XLA updates the carried
    buffer in place. `part`, when given, picks the stack of one kind out of a mapping
    of stacks (`scan_pattern`). Only `step` is checkpointed (it was built so), so a
    rematerialised layer saves its slice of `xs`, not the whole stack. With `aux`, the
    step's `y` is `(y, aux)` (see `layer_step`) and `aux` is the scan's output.
    """

    def body(
        state: tuple[PyTree, PyTree], sliced: tuple[PyTree, Any, Any]
    ) -> tuple[tuple[PyTree, PyTree], Any]:
        carry, xs = state
        arrays, i, k = sliced
        stack = xs if part is None else xs[part]
        x = jax.tree.map(
            lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stack
        )
        carry, y = step(carry, (arrays, x, k))
        y, out = y if aux else (y, None)
        stack = jax.tree.map(
            lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, i, 0), stack, y
        )
        return (carry, stack if part is None else {**xs, part: stack}), out

    return body


def read_entry(stack: PyTree, i: Any) -> PyTree:
    """Entry `i` of the stacked arrays `stack`."""
    return jax.tree.map(
        lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stack
    )


def write_entries(stack: PyTree, i: Any, ys: list[PyTree]) -> PyTree:
    """`stack` with entries `i, i + 1, ...` replaced by `ys`, stacked: one write, so a
    layer that reads an entry before it sees none of the others written (XLA fuses
    a read of a stack just written with the write and reads the older stack, which
    then has to be copied whole)."""
    return jax.tree.map(
        lambda a, *u: jax.lax.dynamic_update_slice_in_dim(a, jnp.stack(u), i, 0),
        stack,
        *ys,
    )


def _grouped_scan(
    step: Callable[..., tuple[PyTree, PyTree]],
    init: PyTree,
    seq: PyTree,
    n: int,
    g: int,
    *,
    unroll: int | bool,
    reverse: bool,
) -> tuple[PyTree, PyTree]:
    """A two-level scan: groups of `g` layers, each rematerialised as a whole.

    The backward pass keeps one carry per group plus one group's worth. The layers
    past the last whole group run as one shorter group, before the others when
    `reverse`.
    """

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def group(carry: PyTree, part: PyTree) -> tuple[PyTree, PyTree]:
        return jax.lax.scan(step, carry, part, unroll=unroll, reverse=reverse)

    def groups(carry: PyTree, part: PyTree) -> tuple[PyTree, PyTree]:
        grouped = jax.tree.map(lambda x: x.reshape((-1, g, *x.shape[1:])), part)
        carry, ys = jax.lax.scan(group, carry, grouped, reverse=reverse)
        return carry, jax.tree.map(lambda y: y.reshape((-1, *y.shape[2:])), ys)

    main = n // g * g
    runs = [(groups, 0, main), (group, main, n)] if main < n else [(groups, 0, n)]
    carry, outs = init, {}
    for run, start, stop in reversed(runs) if reverse else runs:
        part = jax.tree.map(lambda x, sl=slice(start, stop): x[sl], seq)
        carry, outs[start] = run(carry, part)
    if len(outs) == 1:
        return carry, outs[0]
    return carry, jax.tree.map(
        lambda a, b: jnp.concatenate([a, b]), outs[0], outs[main]
    )


def check_update_xs(update_xs: Any, xs: PyTree) -> bool:
    """`update_xs` as a bool; True needs `xs`."""
    if not isinstance(update_xs, bool | np.bool_):
        raise TypeError(f"`update_xs` must be a bool, got {type(update_xs).__name__}.")
    if update_xs and xs is None:
        raise ValueError(
            "`update_xs=True` needs `xs`: each layer's `y` is written back into its "
            "entry of `xs` (pass the stacked caches as `xs=`, or drop `update_xs`)."
        )
    return bool(update_xs)


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
    update_xs: bool = False,
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
        update_xs: With True (which needs `xs`), each layer's `y` must match its `x`
            in structure, shapes and dtypes, and is written back into `xs` in place
            (the decode step of a KV cache): the result equals `update_xs=False`'s,
            but the stacked `xs` travel in the scan's carry and each layer reads and
            writes its own slice, so under `jit` with `xs` donated the step holds no
            second copy of `xs` and its output reuses their buffers. Without donation
            the result is the same, in one fresh copy. Under `grad` the results are
            equal too, and the backward pass keeps what `update_xs=False` keeps, plus,
            with `remat_group`, one copy of `xs` per group (a group saves its carry).

    Returns:
        `(carry, ys)`: the final carry and the per-layer outputs stacked along a leading
        axis of length N; with `update_xs=True`, `(carry, xs_updated)`, in the form
        `xs` was given.

    Raises:
        TypeError: if `fn` is not callable or does not return `(carry, y)` with a carry
            matching `init` (and, with `update_xs=True`, a `y` matching its `x`), if
            `key` is not a PRNG key, or `remat`/`remat_group`/`update_xs` has the wrong
            type.
        ValueError: if `layers` is not a valid stack, `xs` has a leading length other than
            N, `remat` names an unknown policy, `remat_group` is out of range, or
            `update_xs=True` comes without `xs`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from stackedtree import scan_layers
        >>> layers = {"w": jnp.array([1.0, 2.0, 3.0])}
        >>> carry, ys = scan_layers(lambda c, p: (c * p["w"], c), jnp.array(1.0), layers)
        >>> float(carry), ys.tolist()
        (6.0, [1.0, 1.0, 2.0])

        A cache per layer, updated in place (donate it under `jit`):

        >>> cache = jnp.zeros((3, 2))
        >>> write = lambda c, p, x: (c * p["w"], x.at[0].set(c))
        >>> carry, cache = scan_layers(
        ...     write, jnp.array(1.0), layers, xs=cache, update_xs=True
        ... )
        >>> cache[:, 0].tolist()
        [1.0, 1.0, 2.0]
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
    n = num_layers_of(layers, "layers")
    checkpoint, policy = resolve_remat(remat)
    g = _resolve_group(remat_group, n)
    update_xs = check_update_xs(update_xs, xs)
    if xs is not None:
        check_xs(xs, n)
    if key is not None:
        check_key(key)
    fn, write_back = track_layer_state(fn, layers)  # NNX state: see _nnx.py
    aux = update_xs and write_back is not None
    layer_arrays, layer_static = split_static(layers)
    xs_arrays, xs_static = split_static(xs)
    keys = None if key is None else layer_keys(key, n)
    # With groups, layers inside a group are checkpointed too: recomputing a group then
    # keeps g carries rather than every intermediate of g layers.
    step, y_static = layer_step(
        fn,
        init,
        layer_static,
        xs_static,
        has_xs=xs is not None,
        checkpoint=checkpoint or g is not None,
        policy=policy,
        y_like_x=update_xs,
        aux=aux,
    )
    if update_xs:
        # The stacked xs travel in the carry, each layer reading and writing its slice.
        step, init = in_place(step, aux=aux), (init, xs_arrays)
        seq = (layer_arrays, jnp.arange(n), keys)
    else:
        seq = (layer_arrays, xs_arrays, keys)
    if g is None:
        carry, ys = jax.lax.scan(step, init, seq, unroll=unroll, reverse=reverse)
    else:
        carry, ys = _grouped_scan(step, init, seq, n, g, unroll=unroll, reverse=reverse)
    if update_xs:
        (carry, xs_new), written = carry, ys
        ys = merge_static(xs_new, xs_static)
        return carry, ys if write_back is None else write_back((ys, written))
    ys = merge_static(ys, y_static[0])
    return carry, ys if write_back is None else write_back(ys)
