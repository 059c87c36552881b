"""Flax NNX modules: how `describe` names their parts, and their state in a scan.

Since Flax 0.12 an `nnx.Module` is a pytree, so stacking, indexing and scanning work on
it as on any tree. Two things need NNX's own rules, and they live here:

- `describe` shows a module's fields and its variables (`Param(4, 8)`), not the
  framework's bookkeeping (`_pytree__state`, trace state).
- A layer can change its own state while it runs: `nnx.Dropout` with `rngs=` advances
  its RNG stream's counter, `nnx.BatchNorm` updates its statistics. `scan_layers` hands
  the layer function a fresh per-layer module each step, so those writes would be lost
  and the next call would draw the same dropout masks again. `track_layer_state` wraps
  the layer function to return what it wrote, and writes it back into the stacked
  module's variables after the scan, as `nnx.scan` does.

Nothing here imports flax: a module can only exist once flax is imported, so when
`flax.nnx` is not in `sys.modules` every check is simply false and nothing is wrapped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax

from ._leaf import dtype_of, fmt_shape, is_array, shape_of
from ._tree import KeyPath, PyTree, path_str

INTERNAL_PREFIX = "_pytree__"
"""NNX's own fields on every module (`_pytree__state`): never shown by `describe`."""


def _nnx() -> Any:
    return sys.modules.get("flax.nnx")


def is_variable(x: Any) -> bool:
    """Whether `x` is an `nnx.Variable` (`nnx.Param`, `nnx.BatchStat`, RNG state ...)."""
    nnx = _nnx()
    return nnx is not None and isinstance(x, nnx.Variable)


def is_module(x: Any) -> bool:
    """Whether `x` is an NNX pytree object (`nnx.Module`, `nnx.Rngs`, ...)."""
    nnx = _nnx()
    base = getattr(nnx, "Pytree", None) or getattr(nnx, "Object", None)
    return base is not None and isinstance(x, base)


def _variables_by_leaf(tree: PyTree) -> dict[int, Any]:
    """The `nnx.Variable` holding each leaf of `tree`, by the leaf's flat index.

    Only variables that hold exactly one leaf (their value) are listed: those are the
    ones a layer function can write with `variable[...] = new`.
    """
    out: dict[int, Any] = {}
    index = 0
    for node in jax.tree_util.tree_leaves(tree, is_leaf=is_variable):
        count = len(jax.tree_util.tree_leaves(node)) if is_variable(node) else 1
        if count == 1 and is_variable(node):
            out[index] = node
        index += count
    return out


def _written(
    before: list[Any], after: list[Any], paths: list[KeyPath], fn: str
) -> dict[int, Any]:
    """The leaves the layer function replaced, by flat index, checked to fit back."""
    if len(before) != len(after):
        raise TypeError(
            f"`{fn}` changed the structure of its layer (from {len(before)} to "
            f"{len(after)} leaves); a layer function may update an NNX variable's "
            "value but not add or remove fields."
        )
    out = {}
    for j, (old, new) in enumerate(zip(before, after, strict=True)):
        if old is new:
            continue
        if not (is_array(old) and is_array(new)):
            raise TypeError(
                f"`{fn}` replaced the leaf at {path_str(paths[j])} of its layer with a "
                f"{type(new).__name__}; only array values of NNX variables can be "
                "written back into the stacked module."
            )
        if (shape_of(new), dtype_of(new)) != (shape_of(old), dtype_of(old)):
            raise TypeError(
                f"`{fn}` wrote a value of shape {fmt_shape(shape_of(new))} and dtype "
                f"{dtype_of(new)} to its layer at {path_str(paths[j])}, which holds "
                f"shape {fmt_shape(shape_of(old))} and dtype {dtype_of(old)}; a "
                "written-back value must keep its shape and dtype."
            )
        out[j] = new
    return out


def track_layer_state(
    fn: Callable[..., Any], layers: PyTree, *, name: str = "fn"
) -> tuple[Callable[..., Any], Callable[[PyTree], PyTree] | None]:
    """Wraps a layer function so that the NNX state it writes reaches `layers`.

    Returns `(wrapped, finish)`. `wrapped` calls `fn` and returns
    `(carry, (y, written))`, where `written` maps the flat index of every leaf of the
    layer that `fn` replaced (an RNG counter, a batch statistic) to its new value; the
    scan stacks those per layer. `finish(ys)` writes each stacked new value into the
    matching variable of `layers` (in place, as `nnx.scan` does) and returns the `y`s.
    When `layers` holds no NNX variable, `fn` is returned unwrapped and `finish` is
    None, so other trees pay nothing.
    """
    targets = _variables_by_leaf(layers) if _nnx() is not None else {}
    if not targets:
        return fn, None
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(layers)[0]]

    def wrapped(carry: PyTree, layer: PyTree, *rest: Any, **kwargs: Any) -> Any:
        before = jax.tree_util.tree_leaves(layer)
        out = fn(carry, layer, *rest, **kwargs)
        if not isinstance(out, tuple | list) or len(out) != 2:
            return out  # the scan reports the malformed return
        written = _written(before, jax.tree_util.tree_leaves(layer), paths, name)
        missing = [path_str(paths[j]) for j in written if j not in targets]
        if missing:
            raise TypeError(
                f"`{name}` replaced the leaves at {', '.join(missing)} of its layer, "
                "which are not NNX variables, so they cannot be written back into the "
                "stacked module; keep state that changes in an `nnx.Variable`."
            )
        return out[0], (out[1], written)

    def finish(ys: PyTree) -> PyTree:
        y, written = ys
        for j, value in written.items():
            targets[j].set_value(value)
        return y

    return wrapped, finish


def forbid_layer_state(
    fn: Callable[..., Any], layers: PyTree, *, name: str, where: str
) -> Callable[..., Any]:
    """Wraps a layer function run by `where` (`scan_pattern`, a pipeline), which
    cannot write a layer's NNX state back, so that writing it is an error.

    A layer that advances its own RNG stream (`nnx.Dropout` with `rngs=`) there would
    draw the same masks on every call; the user is told to pass `key=` instead. Trees
    without NNX variables get `fn` back unwrapped.
    """
    if _nnx() is None or not _variables_by_leaf(layers):
        return fn

    def wrapped(carry: PyTree, layer: PyTree, *rest: Any, **kwargs: Any) -> Any:
        before = jax.tree_util.tree_leaves_with_path(layer)
        out = fn(carry, layer, *rest, **kwargs)
        after = jax.tree_util.tree_leaves(layer)
        changed = [
            path_str(p)
            for (p, old), new in zip(before, after, strict=False)
            if old is not new
        ]
        if changed or len(before) != len(after):
            what = ", ".join(changed) or "its structure"
            raise TypeError(
                f"`{name}` wrote NNX state of its layer ({what}), such as a dropout "
                f"RNG counter, which `{where}` cannot "
                "write back into the stack, so every call would repeat it. Pass "
                f"`key=` to `{where}` and draw randomness from the `key` each layer "
                "gets (for dropout: `rngs=nnx.Rngs(key)` in the call), or run it with "
                "`scan_layers`, which writes NNX state back."
            )
        return out

    return wrapped
