"""assert_stacked: a chex assertion for users' own tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex

# chex's own wrapper for static (shape-only) assertions: it gives `assert_stacked` the
# `[Chex]` message prefix and makes `chex.disable_asserts()` turn it off, as it turns
# off chex's assertions. chex builds all of its own assertions with it.
from chex._src.asserts_internal import chex_assertion

from ._check import count_layers, leading_shapes, message, tree_problems
from ._tree import PyTree, abstract_layer, at, split_static


def _chex_fails(check: Callable[..., None], *args: Any) -> str | None:
    """chex's verdict: the message of its failed assertion, or None when it passes."""
    try:
        check(*args)
    except AssertionError as e:
        return str(e)
    return None


def _check_stacked(tree: PyTree, num_layers: int | None, like: PyTree | None) -> None:
    problems = []
    leaves = leading_shapes(tree, "tree")
    reference, lines = count_layers(leaves, expected=num_layers)
    if reference is not None:
        # chex decides; the layer-count rule names the leaves and what they hold.
        verdict = _chex_fails(
            chex.assert_tree_shape_prefix, split_static(tree)[0], reference
        )
        if verdict is not None or lines:
            problems += lines or [str(verdict)]
    else:
        problems += lines  # 0-d leaves only: there is no length to compare with
    if not leaves and not problems:
        problems.append("`tree` has no array leaves")
    if like is not None:
        if _chex_fails(chex.assert_trees_all_equal_structs, tree, like):
            for _, phrase, _ in tree_problems(like, tree):
                problems.append(f"`tree` has a different structure from `like`{phrase}")
        else:
            located = [
                f"`tree` differs from `like`{at(path)}: {phrase}"
                for path, phrase, _ in tree_problems(like, tree, lead=1)
            ]
            verdict = _chex_fails(
                chex.assert_trees_all_equal_shapes_and_dtypes,
                abstract_layer(split_static(tree)[0]),
                split_static(like)[0],
            )
            # Static leaves are beyond chex: those differences are ours alone.
            if verdict is not None or located:
                problems += located or [str(verdict)]
    if problems:
        what = (
            f"a stack of {num_layers} layers"
            if num_layers is not None
            else "a well-formed stack"
        )
        raise AssertionError(message(problems, title=f"`tree` is not {what}"))


_checked = chex_assertion(_check_stacked, None, name="assert_stacked")


def assert_stacked(
    tree: PyTree, num_layers: int | None = None, *, like: PyTree | None = None
) -> None:
    """Asserts that `tree` is a well-formed stack, listing every offending leaf.

    A chex assertion: `chex.disable_asserts()` turns it off and `chex.enable_asserts()` on
    again, as they do chex's own, and its message starts with chex's `[Chex]` prefix.

    Checks that every array leaf has a leading layer axis (no 0-d leaves), that the
    leading lengths agree (and equal `num_layers` when given; chex's
    `assert_tree_shape_prefix`), and, with `like`, that the structure matches
    (`assert_trees_all_equal_structs`) and each leaf's per-layer shape and dtype and each
    static leaf equal `like`'s. Only shapes and dtypes are inspected, so it works on
    tracers inside `jit`.

    Args:
        tree: The stacked tree to check.
        num_layers: The expected N, or None to only require agreement (disagreeing
            leaves are then reported against the most common length).
        like: A per-layer template (arrays or `jax.ShapeDtypeStruct`s) with the structure
            of one layer.

    Raises:
        AssertionError: listing each offending leaf by path with expected against actual
            (the first 20, then how many more).

    Examples:
        >>> import numpy as np
        >>> from stackedtree import assert_stacked
        >>> assert_stacked({"w": np.zeros((4, 3)), "b": np.zeros((4,))}, 4)
        >>> try:
        ...     assert_stacked({"w": np.zeros((4, 3)), "b": np.zeros((5,))}, 4)
        ... except AssertionError as e:
        ...     print(e)
        [Chex] Assertion assert_stacked failed: `tree` at ['b'] has leading length 5, expected 4.
    """
    _checked(tree, num_layers, like)
