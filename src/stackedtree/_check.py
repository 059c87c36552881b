"""The validation layer: one leaf comparator, one layer-count rule, one error format.

Like chex's `asserts_internal`, every check in the package is a few lines over these:
`stack`, `concat_layers`, `set_layer`, `assert_stacked`, the carry check of
`scan_layers` and the checkpoint code all compare leaves with `leaf_problems`
(walked over two trees by `tree_problems`), count layers with `count_layers`, and
raise with `fail`.

Nothing here imports jax at module level: the `stackedtree` command uses the counting
and error rules with numpy alone. `tree_problems` needs pytrees, so it loads `_tree`
(and with it jax) when called.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NoReturn

import numpy as np

from ._leaf import (
    dtype_of,
    fmt_shape,
    is_array,
    shape_of,
    static_equal,
    static_repr,
)

MAX_LINES = 20
"""An error lists at most this many problems, then says how many more there are."""

ZERO_D_HINT = (
    "a Python number kept as a static leaf becomes a 0-d array when the tree is an "
    "argument of `jax.jit`; close over it instead, or use `equinox.filter_jit`"
)


def message(
    lines: Sequence[str], header: str | None = None, *, title: str | None = None
) -> str:
    """The one error format.

    One problem is one sentence, after the `header` when there is one:
    `header: problem.` Several are listed under the header (or, without one, the
    `title`), one indented line each, at most `MAX_LINES` of them and then a count of
    the rest. A `title` only introduces a list: use it where each problem names its
    argument and reads alone, and a `header` where problems need its context.
    """
    if len(lines) == 1:
        return (f"{header}: " if header else "") + lines[0].rstrip(".") + "."
    shown = list(lines[:MAX_LINES])
    if len(lines) > MAX_LINES:
        shown.append(f"... and {len(lines) - MAX_LINES} more")
    head = header or title or f"{len(lines)} problems"
    return head + ":\n" + "\n".join("  " + line for line in shown)


def fail(
    lines: Sequence[str],
    header: str | None = None,
    error: type[Exception] = ValueError,
    *,
    title: str | None = None,
) -> NoReturn:
    """Raises `error` with `message(lines, header, title=title)`."""
    raise error(message(lines, header, title=title))


def check_count(value: Any, arg: str, minimum: int = 1) -> int:
    """`value` as an int of at least `minimum` (a count: layers, stages, a size)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{arg}` must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{arg}` must be >= {minimum}, got {value}.")
    return int(value)


# ----------------------------------------------------------------- the leaf comparator


def leaf_problems(
    want: Any, got: Any, *, lead: int = 0, weak_dtypes: bool = False
) -> list[tuple[str, bool]]:
    """How leaf `got` differs from leaf `want`: `(phrase, is_type_error)` pairs.

    Array leaves are compared by shape and dtype, static leaves with `==`, and an
    array where the other has a static leaf (or the reverse) is a type difference.

    Args:
        want: The expected leaf.
        got: The actual leaf.
        lead: Leading axes of `got` that `want` lacks (1 when `got` is stacked and
            `want` is one layer); the shapes compared are `got`'s without them.
        weak_dtypes: A weakly typed `want` (a Python scalar, or an array made from
            one) accepts any dtype, as `jax.lax.scan` accepts it in a carry.
    """
    if is_array(want) != is_array(got):
        if is_array(want):
            return [(f"static {type(got).__name__} where an array is expected", True)]
        return [(f"array where the static leaf {static_repr(want)} is expected", True)]
    if not is_array(want):
        if static_equal(want, got):
            return []
        return [
            (
                f"static leaf {static_repr(got)} != {static_repr(want)} (static leaves "
                "are shared by all layers and must be equal)",
                False,
            )
        ]
    out = []
    got_shape = shape_of(got)[lead:]
    if got_shape != shape_of(want):
        what = "per-layer shape" if lead else "shape"
        out.append(
            (f"{what} {fmt_shape(got_shape)} != {fmt_shape(shape_of(want))}", False)
        )
    weak = weak_dtypes and bool(getattr(want, "weak_type", False))
    if not weak and dtype_of(got) != dtype_of(want):
        out.append((f"dtype {dtype_of(got)} != {dtype_of(want)}", False))
    return out


def tree_problems(
    want: Any,
    got: Any,
    *,
    lead: int = 0,
    weak_dtypes: bool = False,
) -> Iterator[tuple[Any, str, bool]]:
    """Every leaf where tree `got` differs from tree `want`: `(path, phrase, is_type)`.

    A structure difference is one problem, with path None, located by
    `_tree.structure_difference` where the structures first part; its phrase follows
    a noun directly (`` at ['mlp']: missing 'bias'``, ``: expected ...`` at the root). Leaves are compared with
    `leaf_problems`.
    """
    from . import _tree  # imports jax; see the module docstring

    flat_w, treedef_w = _tree.flatten(want)
    flat_g, treedef_g = _tree.flatten(got)
    if treedef_w != treedef_g:
        yield None, _tree.structure_difference(want, got), False
        return
    for (path, w), (_, g) in zip(flat_w, flat_g, strict=True):
        for phrase, is_type in leaf_problems(w, g, lead=lead, weak_dtypes=weak_dtypes):
            yield path, phrase, is_type


# ----------------------------------------------------------------- the layer count


def count_layers(
    leaves: Iterable[tuple[str, tuple[int, ...]]],
    *,
    expected: int | None = None,
    because: str = "",
    axes: int = 1,
    kind: str | None = None,
    hint: str | None = None,
) -> tuple[tuple[int, ...] | None, list[str]]:
    """The one layer-count rule: the common leading length(s) of array leaves.

    Args:
        leaves: `(label, shape)` of every array leaf, the label already naming the
            argument and path (`` `xs` at cache.k ``).
        expected: The leading length every leaf must have, when another argument
            fixes it; else the reference is the most common leading length (the
            first leaf's among equally common ones), so one odd leaf is the one
            blamed.
        because: Says where `expected` comes from, replacing `"expected 4"` in the
            message (`"but `layers` has 4 layers"`).
        axes: How many leading axes are compared: 1 for a stack, 2 for a grouped
            stack, 3 for a staged one.
        kind: What such a leaf is called in messages: "stacked" for one axis,
            "grouped" for more, unless given.
        hint: Said after the line of a leaf with too few axes; by default, for a 0-d
            leaf of a stack, how a pytree's number leaf becomes one under `jax.jit`.

    Returns:
        `(leading, problems)`: the reference leading shape (None when there are no
        leaves with enough axes) and one line per offending leaf: too few axes (a 0-d
        leaf), or a leading length other than the reference.
    """
    kind = kind or ("stacked" if axes == 1 else "grouped")
    hint = (ZERO_D_HINT if axes == 1 else "") if hint is None else hint
    problems = []
    found: list[tuple[str, tuple[int, ...]]] = []
    for label, shape in leaves:
        if len(shape) >= axes:
            found.append((label, tuple(shape[:axes])))
            continue
        if axes == 1:
            line = f"{label} is a 0-d array: a {kind} leaf needs a leading layer axis"
        else:
            line = (
                f"{label} has shape {fmt_shape(shape)}: a {kind} leaf needs "
                f"{_NUMBERS.get(axes, axes)} leading axes"
            )
        problems.append(line + (f" ({hint})" if hint else ""))
    if expected is not None:
        reference: tuple[int, ...] | None = (expected,)
        ref_text = because or f"expected {expected}"
    elif found:
        counts = Counter(lead for _, lead in found)
        best = max(counts.values())
        ref_label, reference = next((lb, ld) for lb, ld in found if counts[ld] == best)
        ref_text = f"but {_strip_arg(ref_label)} has {_lead_str(reference)}"
    else:
        return None, problems
    what = "leading length" if axes == 1 else "leading axes"
    for label, lead in found:
        if lead != reference:
            problems.append(f"{label} has {what} {_lead_str(lead)}, {ref_text}")
    return reference, problems


_NUMBERS = {2: "two", 3: "three"}


def _lead_str(lead: tuple[int, ...]) -> str:
    return str(lead[0]) if len(lead) == 1 else fmt_shape(lead)


def _strip_arg(label: str) -> str:
    """`` `xs` at cache.k `` -> `cache.k`: the reference leaf named by its path alone."""
    head, sep, tail = label.partition(" at ")
    return tail if sep and head.startswith("`") else label


def leading_shapes(tree: Any, arg: str) -> list[tuple[str, tuple[int, ...]]]:
    """`(label, shape)` of every array leaf of a pytree, for `count_layers`."""
    from . import _tree  # imports jax; see the module docstring

    return [
        (_tree.where(arg, path), shape_of(x))
        for path, x in _tree.flatten(tree)[0]
        if is_array(x)
    ]


def num_layers_of(
    tree: Any,
    arg: str,
    *,
    leaves: Iterable[tuple[str, tuple[int, ...]]] | None = None,
    hint: str | None = None,
) -> int:
    """N of a stacked pytree, or a `ValueError` naming `arg`, every bad leaf and path.

    `leaves`, when given, are the `(label, shape)` of the tree's leaves, labelled by
    the caller (a checkpoint names its tensors `stacked['w']`); `hint` is as in
    `count_layers`.
    """
    if leaves is None:
        leaves = leading_shapes(tree, arg)
    reference, problems = count_layers(leaves, hint=hint)
    if problems:
        fail(problems, title=f"`{arg}` is not a stack of layers")
    if reference is None:
        raise ValueError(f"`{arg}` has no array leaves, so it has no layer axis.")
    return reference[0]
