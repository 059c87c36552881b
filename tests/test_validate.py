"""assert_stacked."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stackedtree import assert_stacked, stack


class Attention(NamedTuple):
    q_proj: Any
    k_proj: Any


def good(n: int = 4, lib: Any = np) -> dict[str, Any]:
    return {
        "attention": Attention(
            lib.zeros((n, 8, 2), np.float32), lib.zeros((n, 8), np.float32)
        ),
        "norm": lib.ones((n, 8), np.float32),
        "act": "gelu",
    }


LIKE = {
    "attention": Attention(
        jax.ShapeDtypeStruct((8, 2), jnp.float32),
        jax.ShapeDtypeStruct((8,), jnp.float32),
    ),
    "norm": np.zeros((8,), np.float32),
    "act": "gelu",
}


def test_passes_on_a_good_stack() -> None:
    assert_stacked(good())
    assert_stacked(good(), 4)
    assert_stacked(good(), 4, like=LIKE)
    assert_stacked(stack([LIKE] * 3), 3, like=LIKE)


def test_wrong_num_layers() -> None:
    with pytest.raises(
        AssertionError, match=r"`tree` at \['norm'\]: leading length 4 != 5"
    ):
        assert_stacked(good(), 5)


def test_lists_every_offending_leaf() -> None:
    tree = good()
    tree["norm"] = np.ones((3, 8), np.float32)
    tree["attention"] = Attention(np.zeros((4, 8, 2), np.float32), np.float32(0))
    with pytest.raises(AssertionError) as info:
        assert_stacked(tree)
    msg = str(info.value)
    assert msg.startswith("`tree` is not a well-formed stack:")
    assert "`tree` at ['attention'].k_proj is a 0-d array" in msg
    # Disagreements are reported against the most common length.
    assert "`tree` at ['norm']: leading length 3 != 4" in msg


def test_like_lists_shape_and_dtype_differences() -> None:
    tree = good()
    tree["attention"] = Attention(
        np.zeros((4, 8, 3), np.float32), np.zeros((4, 8), np.float16)
    )
    with pytest.raises(AssertionError) as info:
        assert_stacked(tree, 4, like=LIKE)
    msg = str(info.value)
    assert (
        "`tree` at ['attention'].q_proj: per-layer shape (8, 3) != (8, 2) from `like`"
        in msg
    )
    assert "`tree` at ['attention'].k_proj: dtype float16 != float32 from `like`" in msg


def test_like_structure_difference() -> None:
    with pytest.raises(
        AssertionError,
        match=r"`tree` has a different structure from `like` at the root: missing 'extra'",
    ):
        assert_stacked(good(), like={**LIKE, "extra": np.zeros(1)})


def test_no_array_leaves() -> None:
    with pytest.raises(AssertionError, match=r"`tree` has no array leaves"):
        assert_stacked({"act": "gelu"})


def test_works_inside_jit() -> None:
    @jax.jit
    def f(tree: Any) -> Any:
        assert_stacked(tree, 4, like={k: v for k, v in LIKE.items() if k != "act"})
        return tree["norm"].sum()

    tree = {k: v for k, v in good(lib=jnp).items() if k != "act"}
    assert f(tree) == 32
    bad = {**tree, "norm": jnp.ones((5, 8), jnp.float32)}
    with pytest.raises(
        AssertionError, match=r"`tree` at \['norm'\]: leading length 5 != 4"
    ):
        f(bad)


def test_still_raises_under_python_O() -> None:
    # A bare `assert` would vanish under `python -O`; assert_stacked must not.
    code = (
        "import numpy as np\n"
        "from stackedtree import assert_stacked\n"
        "try:\n"
        "    assert_stacked({'w': np.zeros((3, 2))}, 4)\n"
        "except AssertionError as e:\n"
        "    print('raised', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True
    )
    assert "raised `tree` is not a stack of 4 layers" in out.stdout


def test_like_checks_static_leaves_too() -> None:
    like = {"w": jax.ShapeDtypeStruct((3,), jnp.float32), "act": "relu"}
    assert_stacked({"w": jnp.zeros((4, 3)), "act": "relu"}, 4, like=like)
    with pytest.raises(
        AssertionError, match=r"\['act'\]: static leaf 'gelu' != 'relu'"
    ):
        assert_stacked({"w": jnp.zeros((4, 3)), "act": "gelu"}, 4, like=like)
    with pytest.raises(
        AssertionError,
        match=r"\['act'\]: an array where `like` has the static leaf 'relu'",
    ):
        assert_stacked({"w": jnp.zeros((4, 3)), "act": jnp.zeros(4)}, 4, like=like)
