"""assert_stacked: a validator for users' own tests, in the style of chex's asserts."""

from __future__ import annotations

from collections import Counter

from ._stack import leading_lengths
from ._tree import (
    PyTree,
    dtype_of,
    flatten,
    fmt_shape,
    is_array,
    path_str,
    shape_of,
    static_equal,
    structure_difference,
)


def assert_stacked(
    tree: PyTree, num_layers: int | None = None, *, like: PyTree | None = None
) -> None:
    """Asserts that `tree` is a well-formed stack, listing *every* offending leaf.

    Checks that every array leaf has a leading layer axis (no 0-d leaves), that the
    leading lengths agree (and equal `num_layers` when given), and, with `like`, that the
    structure matches and each leaf's per-layer shape and dtype equal `like`'s. Only
    shapes and dtypes are inspected, so it works on tracers inside `jit`.

    Args:
        tree: The stacked tree to check.
        num_layers: The expected N, or None to only require agreement.
        like: A per-layer template (arrays or `jax.ShapeDtypeStruct`s) with the structure
            of one layer.

    Raises:
        AssertionError: listing each offending leaf by path with expected against actual.

    Examples:
        >>> import numpy as np
        >>> from stackedtree import assert_stacked
        >>> assert_stacked({"w": np.zeros((4, 3)), "b": np.zeros((4,))}, 4)
        >>> try:
        ...     assert_stacked({"w": np.zeros((4, 3)), "b": np.zeros((5,))}, 4)
        ... except AssertionError as e:
        ...     print(e)
        `tree` is not a stack of 4 layers:
          `tree` at ['b']: leading length 5 != 4
    """
    lengths, errors = leading_lengths(tree, "tree")
    expected: int | None = num_layers
    if num_layers is None and lengths:
        # Disagreements are reported against the most common length.
        expected = Counter(n for _, n in lengths).most_common(1)[0][0]
    for path, n in lengths:
        if n != expected:
            errors.append(
                f"`tree` at {path_str(path)}: leading length {n} != {expected}"
            )
    if not lengths and not errors:
        errors.append("`tree` has no array leaves")
    if like is not None:
        flat_t, treedef_t = flatten(tree)
        flat_l, treedef_l = flatten(like)
        if treedef_t != treedef_l:
            errors.append(
                f"`tree` has a different structure from `like` "
                f"{structure_difference(like, tree)}"
            )
        else:
            for (path, t), (_, ref) in zip(flat_t, flat_l, strict=True):
                if not is_array(ref):
                    if is_array(t):
                        errors.append(
                            f"`tree` at {path_str(path)}: an array where `like` has "
                            f"the static leaf {ref!r}"
                        )
                    elif not static_equal(t, ref):
                        errors.append(
                            f"`tree` at {path_str(path)}: static leaf {t!r} != {ref!r} "
                            "from `like`"
                        )
                    continue
                if not is_array(t):
                    errors.append(
                        f"`tree` at {path_str(path)}: expected an array, got "
                        f"{type(t).__name__}"
                    )
                    continue
                got, want = shape_of(t)[1:], shape_of(ref)
                if shape_of(t) and got != want:
                    errors.append(
                        f"`tree` at {path_str(path)}: per-layer shape "
                        f"{fmt_shape(got)} != {fmt_shape(want)} from `like`"
                    )
                if dtype_of(t) != dtype_of(ref):
                    errors.append(
                        f"`tree` at {path_str(path)}: dtype {dtype_of(t)} != "
                        f"{dtype_of(ref)} from `like`"
                    )
    if errors:
        head = (
            f"`tree` is not a stack of {num_layers} layers:"
            if num_layers is not None
            else "`tree` is not a well-formed stack:"
        )
        raise AssertionError("\n".join([head, *("  " + e for e in errors)]))
