"""get_layer, set_layer, slice_layers, concat_layers, group_layers, ungroup_layers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import Attention, Block, stacked_block
from hypothesis import given, settings
from hypothesis import strategies as st
from treegen import assert_bits_equal, make_layer, make_layers, templates

from stackedtree import (
    concat_layers,
    get_layer,
    group_layers,
    num_layers,
    set_layer,
    slice_layers,
    stack,
    ungroup_layers,
    unstack,
)

PROPERTY = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**32 - 1)


# --- properties -----------------------------------------------------------------------


@PROPERTY
@given(templates, st.integers(1, 5), seeds, st.data())
def test_get_layer_equals_unstack(
    template: Any, n: int, seed: int, data: st.DataObject
) -> None:
    layers = make_layers(template, n, seed)
    stacked = stack(layers)
    unstacked = unstack(stacked)
    i = data.draw(st.integers(-n, n - 1))
    assert_bits_equal(get_layer(stacked, i), unstacked[i])
    assert_bits_equal(get_layer(stacked, i), layers[i], stacked_kinds=True)


@PROPERTY
@given(templates, st.integers(1, 5), seeds, st.data())
def test_set_layer_then_get_layer(
    template: Any, n: int, seed: int, data: st.DataObject
) -> None:
    layers = make_layers(template, n, seed)
    stacked = stack(layers)
    i = data.draw(st.integers(-n, n - 1))
    new = make_layer(template, np.random.default_rng(seed + 1), 0)
    updated = set_layer(stacked, i, new)
    assert_bits_equal(get_layer(updated, i), new, stacked_kinds=True)
    for j in range(n):
        if j != i % n:
            assert_bits_equal(get_layer(updated, j), get_layer(stacked, j))
    # The input is not modified.
    assert_bits_equal(unstack(stacked), layers, stacked_kinds=True)


@PROPERTY
@given(templates, st.integers(1, 6), seeds, st.data())
def test_group_ungroup_round_trip(
    template: Any, n: int, seed: int, data: st.DataObject
) -> None:
    layers = make_layers(template, n, seed)
    stacked = stack(layers)
    size = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    grouped = group_layers(stacked, size)
    assert_bits_equal(ungroup_layers(grouped), stacked)
    g = data.draw(st.integers(0, n // size - 1))
    j = data.draw(st.integers(0, size - 1))
    assert_bits_equal(
        get_layer(get_layer(grouped, g), j), get_layer(stacked, g * size + j)
    )


@PROPERTY
@given(templates, st.integers(1, 6), seeds, st.data())
def test_slice_then_concat_round_trip(
    template: Any, n: int, seed: int, data: st.DataObject
) -> None:
    layers = make_layers(template, n, seed)
    stacked = stack(layers)
    k = data.draw(st.integers(1, n))
    parts = [slice_layers(stacked, None, k), slice_layers(stacked, k)]
    parts = [p for p in parts if num_layers(p) > 0]
    assert_bits_equal(concat_layers(parts), stacked)


@PROPERTY
@given(
    templates,
    st.integers(1, 6),
    seeds,
    st.none() | st.integers(-8, 8),
    st.none() | st.integers(-8, 8),
    st.none() | st.integers(-3, 3).filter(bool),
)
def test_slice_layers_is_python_slicing(
    template: Any, n: int, seed: int, start: Any, stop: Any, step: Any
) -> None:
    layers = make_layers(template, n, seed)
    stacked = stack(layers)
    sliced = slice_layers(stacked, start, stop, step)
    want = layers[start:stop:step]
    if want:
        assert_bits_equal(sliced, stack(want), stacked_kinds=True)
    else:
        assert num_layers(sliced) == 0


# --- get_layer --------------------------------------------------------------------------


def test_get_layer_negative_and_static() -> None:
    s = stacked_block()
    layer = get_layer(s, -1)
    np.testing.assert_array_equal(layer.norm, [9, 10, 11])
    assert layer.act == "gelu"
    assert type(layer.attention.k_proj) is np.ndarray  # a 0-d view, not np.float16
    assert np.shares_memory(layer.attention.k_proj, s.attention.k_proj)


@pytest.mark.parametrize("index", [np.int64(2), np.array(2, np.uint8), jnp.int32(2)])
def test_get_layer_array_index(index: Any) -> None:
    np.testing.assert_array_equal(get_layer(stacked_block(), index).norm, [6, 7, 8])


@pytest.mark.parametrize("lib", [np, jnp])
@pytest.mark.parametrize("index", [0, 2, -1, -4])
def test_get_layer_traced_index_under_jit(lib: Any, index: int) -> None:
    s = stacked_block(lib=lib)
    f = jax.jit(get_layer)
    got = f(s.attention, jnp.int32(index))
    assert_bits_equal(got, jax.tree.map(jnp.asarray, get_layer(s, index).attention))


def test_get_layer_traced_index_in_fori_loop() -> None:
    s = stacked_block(lib=jnp).attention

    def body(i: jax.Array, acc: jax.Array) -> jax.Array:
        return acc + get_layer(s, i).q_proj

    total = jax.lax.fori_loop(0, 4, body, jnp.zeros((2, 3), jnp.int32))
    np.testing.assert_array_equal(total, np.asarray(s.q_proj).sum(0))


def test_get_layer_abstract() -> None:
    s = {"w": jax.ShapeDtypeStruct((4, 3, 2), jnp.bfloat16)}
    assert get_layer(s, 1) == {"w": jax.ShapeDtypeStruct((3, 2), jnp.bfloat16)}


@pytest.mark.parametrize("index", [4, -5, 100])
def test_get_layer_out_of_range(index: int) -> None:
    with pytest.raises(
        IndexError, match=rf"`index` {index} is out of range for 4 layers"
    ):
        get_layer(stacked_block(), index)


@pytest.mark.parametrize(
    ("index", "match"),
    [
        (1.0, r"`index` must be an integer, got float"),
        (True, r"`index` must be an integer, got bool"),
        (slice(0, 2), r"`index` must be an integer, got slice. Use `slice_layers`"),
        (np.array([1, 2]), r"`index` must be a scalar integer, got shape \(2,\)"),
        (
            jnp.float32(1),
            r"`index` must be a scalar integer, got shape \(\) dtype float32",
        ),
    ],
)
def test_get_layer_bad_index_type(index: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        get_layer(stacked_block(), index)


def test_get_layer_bad_stack() -> None:
    with pytest.raises(
        ValueError,
        match=r"`stacked` at \['b'\] has leading length 3, but \['a'\] has 4",
    ):
        get_layer({"a": np.zeros((4, 2)), "b": np.zeros((3, 2))}, 0)


# --- set_layer --------------------------------------------------------------------------


def test_set_layer_numpy_copies() -> None:
    s = stacked_block()
    new = get_layer(stacked_block(), 0)._replace(norm=np.full(3, -1, np.float32))
    out = set_layer(s, 2, new)
    assert type(out.norm) is np.ndarray
    np.testing.assert_array_equal(out.norm[2], [-1, -1, -1])
    np.testing.assert_array_equal(s.norm[2], [6, 7, 8])  # input untouched
    assert not np.shares_memory(out.norm, s.norm)


def test_set_layer_jax() -> None:
    s = stacked_block(lib=jnp)
    layer = get_layer(stacked_block(), 0)
    new = layer._replace(
        norm=jnp.asarray(layer.norm),
        attention=jax.tree.map(jnp.asarray, layer.attention),
    )
    out = set_layer(s, -1, new)
    assert isinstance(out.norm, jax.Array)
    np.testing.assert_array_equal(out.norm[3], [0, 1, 2])


def test_set_layer_traced_index_under_jit() -> None:
    s = stacked_block(lib=jnp).attention
    new = Attention(jnp.full((2, 3), 7, jnp.int32), jnp.float16(-2))
    out = jax.jit(set_layer)(s, jnp.int32(1), new)
    np.testing.assert_array_equal(out.q_proj[1], np.full((2, 3), 7))
    assert out.k_proj[1] == -2


def test_set_layer_abstract() -> None:
    s = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)}
    assert set_layer(s, 0, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}) == s


def test_set_layer_lists_every_mismatch() -> None:
    s = stacked_block()
    bad = Block(
        norm=np.zeros(4, np.float32),
        attention=Attention(np.zeros((2, 3), np.float32), np.float16(0)),
        act="relu",
    )
    with pytest.raises(ValueError) as info:
        set_layer(s, 1, bad)
    msg = str(info.value)
    assert (
        "`layer` differs from layer 1 of `stacked` at norm: shape (4,) != (3,)" in msg
    )
    assert "at attention.q_proj: dtype float32 != int32" in msg
    assert "at act: static leaf 'relu' != 'gelu'" in msg


def test_set_layer_structure_mismatch() -> None:
    with pytest.raises(
        ValueError,
        match=r"`layer` has a different tree structure from layer 0 of `stacked` "
        r"at \['b'\]: expected a leaf, got a dict node",
    ):
        set_layer(
            {"a": np.zeros((2, 1)), "b": np.zeros((2, 1))}, 0, {"a": 1, "b": {"c": 1}}
        )


def test_set_layer_out_of_range() -> None:
    with pytest.raises(IndexError, match=r"`index` 4 is out of range for 4 layers"):
        set_layer(stacked_block(), 4, get_layer(stacked_block(), 0))


# --- slice_layers -------------------------------------------------------------------------


def test_slice_layers_numpy_views_and_jax() -> None:
    s = stacked_block()
    out = slice_layers(s, 1, None, 2)
    np.testing.assert_array_equal(out.norm[:, 0], [3, 9])
    assert np.shares_memory(out.norm, s.norm)
    assert out.act == "gelu"
    out = slice_layers(stacked_block(lib=jnp), -2)
    assert isinstance(out.norm, jax.Array)
    assert num_layers(out) == 2


def test_slice_layers_abstract() -> None:
    s = {"w": jax.ShapeDtypeStruct((10, 3), jnp.float32)}
    assert slice_layers(s, 1, 9, 3)["w"].shape == (3, 3)
    assert slice_layers(s, None, None, -1)["w"].shape == (10, 3)


def test_slice_layers_step_zero() -> None:
    with pytest.raises(ValueError, match=r"`step` must not be 0"):
        slice_layers(stacked_block(), 0, 2, 0)


# --- concat_layers ------------------------------------------------------------------------


def test_concat_layers_kinds() -> None:
    a, b = stacked_block(2), stacked_block(3)
    out = concat_layers([a, b])
    assert type(out.norm) is np.ndarray
    assert num_layers(out) == 5
    out = concat_layers([a, stacked_block(3, jnp)])
    assert isinstance(out.norm, jax.Array)
    sds = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}
    assert concat_layers([sds, sds, sds])["w"].shape == (6, 3)


def test_concat_layers_mismatch() -> None:
    a = {"w": np.zeros((2, 3), np.float32), "b": np.zeros((2,), np.float32)}
    b = {"w": np.zeros((5, 4), np.float32), "b": np.zeros((5,), np.int8)}
    with pytest.raises(ValueError) as info:
        concat_layers([a, b])
    msg = str(info.value)
    assert (
        "`stacks[1]` differs from `stacks[0]` at ['w']: per-layer shape (4,) != (3,)"
        in msg
    )
    assert "`stacks[1]` differs from `stacks[0]` at ['b']: dtype int8 != float32" in msg


def test_concat_layers_bad_stack() -> None:
    bad = {"w": np.zeros((2, 3)), "b": np.zeros((3,))}
    with pytest.raises(
        ValueError,
        match=r"`stacks\[1\]` at \['w'\] has leading length 2, but \['b'\] has 3",
    ):
        concat_layers([{"w": np.zeros((1, 3)), "b": np.zeros((1,))}, bad])


def test_concat_layers_empty_and_mixed_abstract() -> None:
    with pytest.raises(ValueError, match=r"`stacks` is empty"):
        concat_layers([])
    with pytest.raises(
        TypeError, match=r"`stacks` at \['w'\] mixes jax.ShapeDtypeStruct"
    ):
        concat_layers(
            [{"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}, {"w": jnp.zeros((2, 3))}]
        )


# --- group_layers / ungroup_layers ---------------------------------------------------------


def test_group_layers_numpy_view_and_abstract() -> None:
    s = stacked_block(6)
    g = group_layers(s, 3)
    assert g.attention.q_proj.shape == (2, 3, 2, 3)
    assert np.shares_memory(g.norm, s.norm)
    sds = {"w": jax.ShapeDtypeStruct((6, 5), jnp.float32)}
    assert group_layers(sds, 2)["w"].shape == (3, 2, 5)
    assert ungroup_layers(group_layers(sds, 2)) == sds


def test_group_layers_not_divisible() -> None:
    with pytest.raises(
        ValueError,
        match=r"`size` 4 does not divide the 6 layers of `stacked`.*remaining 2",
    ):
        group_layers(stacked_block(6), 4)


@pytest.mark.parametrize(
    ("size", "exc", "match"),
    [
        (0, ValueError, r"`size` must be >= 1, got 0"),
        (2.0, TypeError, r"`size` must be an int"),
    ],
)
def test_group_layers_bad_size(size: Any, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        group_layers(stacked_block(6), size)


def test_ungroup_layers_errors() -> None:
    bad = {"a": np.zeros((2, 3, 4)), "b": np.zeros((2, 2)), "c": np.zeros((5,))}
    with pytest.raises(ValueError) as info:
        ungroup_layers(bad)
    msg = str(info.value)
    assert "`grouped` at ['b'] has leading axes (2, 2), but ['a'] has (2, 3)" in msg
    assert (
        "`grouped` at ['c'] has shape (5,): a grouped leaf needs two leading axes"
        in msg
    )


def test_set_layer_numpy_stack_with_a_jax_layer_traced_or_not() -> None:
    ints = {"w": np.zeros((3, 2), np.int32)}
    got = set_layer(ints, 1, {"w": jnp.ones(2, jnp.int32)})
    np.testing.assert_array_equal(got["w"], [[0, 0], [1, 1], [0, 0]])
    floats = {"w": np.zeros((3, 2), np.float32)}

    def update(v: jax.Array) -> jax.Array:
        return set_layer(floats, 1, {"w": v})["w"]

    np.testing.assert_array_equal(
        jax.jit(update)(jnp.ones(2)), [[0, 0], [1, 1], [0, 0]]
    )
    np.testing.assert_array_equal(
        jax.grad(lambda v: update(v).sum())(jnp.ones(2)), [1.0, 1.0]
    )
