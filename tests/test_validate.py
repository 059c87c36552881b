"""assert_stacked."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import Attention

from stackedtree import assert_stacked, scan_layers, set_layer, stack

LAYERS = {"w": jnp.ones((3, 2))}


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


PREFIX = "[Chex] Assertion assert_stacked failed: "


def test_wrong_num_layers() -> None:
    with pytest.raises(
        AssertionError,
        match=r"`tree` at \['norm'\] has leading length 4, expected 5",
    ):
        assert_stacked(good(), 5)


def test_lists_every_offending_leaf() -> None:
    tree = good(5)
    tree["norm"] = np.ones((3, 8), np.float32)
    tree["extra"] = [np.ones((2,)), np.ones((5,)), np.ones((7, 1))]
    tree["attention"] = Attention(np.zeros((5, 8, 2), np.float32), np.float32(0))
    with pytest.raises(AssertionError) as info:
        assert_stacked(tree)
    msg = str(info.value)
    assert msg.startswith(PREFIX + "`tree` is not a well-formed stack:\n")
    lines = msg.splitlines()[1:]
    assert lines[0] == (
        "  `tree` at ['attention'].k_proj is a 0-d array: a stacked leaf needs a "
        "leading layer axis (a Python number kept as a static leaf becomes a 0-d "
        "array when the tree is an argument of `jax.jit`; close over it instead, or "
        "use `equinox.filter_jit`)"
    )
    # Disagreements are reported against the most common length, each leaf once.
    assert lines[1:] == [
        "  `tree` at ['extra'][0] has leading length 2, but ['attention'].q_proj has 5",
        "  `tree` at ['extra'][2] has leading length 7, but ['attention'].q_proj has 5",
        "  `tree` at ['norm'] has leading length 3, but ['attention'].q_proj has 5",
    ]


def test_long_lists_are_cut_with_a_count() -> None:
    tree = {f"w{k:02d}": np.zeros((3, 2)) for k in range(25)}
    with pytest.raises(AssertionError) as info:
        assert_stacked(tree, 4)
    lines = str(info.value).splitlines()
    assert len(lines) == 1 + 20 + 1
    assert lines[1] == "  `tree` at ['w00'] has leading length 3, expected 4"
    assert lines[-1] == "  ... and 5 more"


def _message(f: Any, *args: Any) -> str:
    with pytest.raises((TypeError, ValueError, AssertionError)) as info:
        f(*args)
    return str(info.value)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            lambda: stack([np.zeros(2), np.zeros(3)]),
            "`layers[1]` differs from `layers[0]`: shape (3,) != (2,).",
        ),
        (
            lambda: stack([np.zeros(2), {"a": np.zeros(3)}]),
            "`layers[1]` has a different tree structure from `layers[0]`: expected a "
            "leaf, got a dict node.",
        ),
        (
            lambda: set_layer(jnp.zeros((3, 2)), 0, jnp.zeros(3)),
            "`layer` differs from layer 0 of `stacked`: shape (3,) != (2,).",
        ),
        (
            lambda: assert_stacked(jnp.zeros((3, 2)), 3, like={"a": jnp.zeros(2)}),
            "[Chex] Assertion assert_stacked failed: `tree` has a different structure "
            "from `like`: expected a dict node, got a leaf.",
        ),
        (
            lambda: scan_layers(lambda c, p: ({"a": c}, None), jnp.zeros(2), LAYERS),
            "`fn` returned a carry with a different structure from `init`: expected a "
            "leaf, got a dict node.",
        ),
        (
            lambda: stack(
                [jax.ShapeDtypeStruct((2,), np.float32), np.zeros(2, np.float32)]
            ),
            "`layers` mixes jax.ShapeDtypeStruct and concrete arrays; stack either "
            "all-abstract or all-concrete layers.",
        ),
    ],
)
def test_a_root_leaf_is_named_by_its_argument_alone(call: Any, expected: str) -> None:
    # One wording everywhere: `arg` at path, and `arg` alone for the root.
    assert _message(call) == expected


def test_is_switched_by_chex() -> None:
    bad = {"w": np.zeros((3, 2))}
    chex.disable_asserts()
    try:
        chex.assert_shape(bad["w"], (4, 2))  # chex's own assertions are off
        assert_stacked(bad, 4)  # and so is this one
    finally:
        chex.enable_asserts()
    with pytest.raises(AssertionError, match="expected 4"):
        assert_stacked(bad, 4)


def test_static_leaves_are_compared_by_value() -> None:
    # Equal but distinct objects: a comparison by identity would reject them.
    like = {"w": np.zeros(2), "act": "".join(["re", "lu"]), "dims": [8, 2]}
    tree = {"w": np.zeros((3, 2)), "act": "".join(["r", "elu"]), "dims": [8, 2]}
    assert like["act"] is not tree["act"]
    assert_stacked(tree, 3, like=like)


def test_like_lists_shape_and_dtype_differences() -> None:
    tree = good()
    tree["attention"] = Attention(
        np.zeros((4, 8, 3), np.float32), np.zeros((4, 8), np.float16)
    )
    with pytest.raises(AssertionError) as info:
        assert_stacked(tree, 4, like=LIKE)
    msg = str(info.value)
    assert (
        "`tree` differs from `like` at ['attention'].q_proj: per-layer shape (8, 3) "
        "!= (8, 2)" in msg
    )
    assert (
        "`tree` differs from `like` at ['attention'].k_proj: dtype float16 != " in msg
    )


def test_like_structure_difference() -> None:
    with pytest.raises(
        AssertionError,
        match=r"`tree` has a different structure from `like`: "
        r"missing \['extra'\]",
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
        AssertionError, match=r"`tree` at \['norm'\] has leading length 5, expected 4"
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
    assert (
        "raised " + PREFIX + "`tree` at ['w'] has leading length 3, expected 4."
        in out.stdout
    )


def test_like_checks_static_leaves_too() -> None:
    like = {"w": jax.ShapeDtypeStruct((3,), jnp.float32), "act": "relu"}
    assert_stacked({"w": jnp.zeros((4, 3)), "act": "relu"}, 4, like=like)
    with pytest.raises(
        AssertionError, match=r"\['act'\]: static leaf 'gelu' != 'relu'"
    ):
        assert_stacked({"w": jnp.zeros((4, 3)), "act": "gelu"}, 4, like=like)
    with pytest.raises(
        AssertionError,
        match=r"\['act'\]: array where the static leaf 'relu' is expected",
    ):
        assert_stacked({"w": jnp.zeros((4, 3)), "act": jnp.zeros(4)}, 4, like=like)
