"""stack, unstack, num_layers, layer_keys and init_stacked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from treegen import assert_bits_equal, expected_stack, make_layers, templates

import stackedtree
from stackedtree import (
    concat_layers,
    init_stacked,
    layer_keys,
    num_layers,
    set_layer,
    stack,
    unstack,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import llama_model
from fixtures import Block, block

PROPERTY = settings(max_examples=40, deadline=None)


# --- round trips -------------------------------------------------------------------


@PROPERTY
@given(templates, st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_stack_unstack_round_trip(template: Any, n: int, seed: int) -> None:
    layers = make_layers(template, n, seed)
    stacked = stack(layers)
    assert_bits_equal(stacked, expected_stack(layers))
    assert num_layers(stacked) == n
    assert_bits_equal(unstack(stacked), layers, stacked_kinds=True)


@PROPERTY
@given(templates, st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_unstack_stack_round_trip(template: Any, n: int, seed: int) -> None:
    stacked = stack(make_layers(template, n, seed))
    assert_bits_equal(stack(unstack(stacked)), stacked)


def test_stack_of_tuple_equals_stack_of_list() -> None:
    layers = [block(i) for i in range(3)]
    assert_bits_equal(stack(tuple(layers)), stack(layers))


# --- array library -----------------------------------------------------------------


def test_numpy_in_numpy_out() -> None:
    stacked = stack([block(i) for i in range(3)])
    for leaf in jax.tree.leaves(stacked):
        if leaf is not jax.nn.gelu:
            assert type(leaf) is np.ndarray
    for layer in unstack(stacked):
        assert type(layer.norm) is np.ndarray  # 1-d leaf: a 0-d array, not np.float32
        assert type(layer.attention.q_proj) is np.ndarray


def test_jax_in_jax_out() -> None:
    stacked = stack([block(i, jnp) for i in range(3)])
    assert isinstance(stacked.attention.q_proj, jax.Array)
    assert isinstance(stacked.norm, jax.Array)
    for layer in unstack(stacked):
        assert isinstance(layer.norm, jax.Array)
        assert layer.norm.shape == (4,)


def test_mixed_numpy_and_jax_gives_jax() -> None:
    stacked = stack([block(0, np), block(1, jnp)])
    assert isinstance(stacked.attention.k_proj, jax.Array)
    np.testing.assert_array_equal(
        stacked.attention.k_proj[0], block(0).attention.k_proj
    )


def test_shape_dtype_struct_stacks_abstractly() -> None:
    layer = llama_model.block_shapes(llama_model.LLAMA_7B)
    stacked = stack([layer] * 32)
    assert isinstance(stacked.attention.q_proj, jax.ShapeDtypeStruct)
    assert stacked.attention.q_proj.shape == (32, 4096, 1, 32, 128)
    assert stacked.attention.q_proj.dtype == jnp.bfloat16
    assert num_layers(stacked) == 32
    back = unstack(stacked)
    assert len(back) == 32
    assert back[5] == layer


def test_mixing_abstract_and_concrete_is_a_type_error() -> None:
    a = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    b = {"w": jnp.zeros((2,), jnp.float32)}
    with pytest.raises(
        TypeError, match=r"`layers` at \['w'\] mixes jax.ShapeDtypeStruct"
    ):
        stack([a, b])


def test_static_leaves_kept_once() -> None:
    act = object()
    layers = [{"w": np.zeros((2,)), "act": act, "n": 3}] * 4
    stacked = stack(layers)
    assert stacked["act"] is act
    assert stacked["n"] == 3
    assert all(layer["act"] is act for layer in unstack(stacked))


def test_stack_under_jit() -> None:
    @jax.jit
    def f(a: jax.Array, b: jax.Array) -> Any:
        return stack([{"w": a}, {"w": b}])

    out = f(jnp.ones(3), jnp.zeros(3))
    np.testing.assert_array_equal(out["w"], [[1, 1, 1], [0, 0, 0]])


# --- unstack ------------------------------------------------------------------------


def test_unstack_numpy_returns_views() -> None:
    stacked = stack([block(i) for i in range(3)])
    for layer in unstack(stacked):
        assert np.shares_memory(layer.norm, stacked.norm)
        assert np.shares_memory(layer.attention.q_proj, stacked.attention.q_proj)


def test_unstack_jax_does_not_slice_per_layer_and_leaf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stacked = stack([block(i, jnp) for i in range(5)])
    calls = []
    array_type = type(stacked.norm)
    getitem = array_type.__getitem__

    def counting_getitem(self: Any, index: Any) -> Any:
        calls.append(index)
        return getitem(self, index)

    monkeypatch.setattr(array_type, "__getitem__", counting_getitem)
    # The counter sees eager per-index slicing: this is what unstack must not do.
    naive = [[x[i] for x in stacked.attention] for i in range(5)]
    assert len(calls) == 5 * 2
    calls.clear()
    layers = unstack(stacked)
    assert len(calls) == 0
    monkeypatch.undo()
    assert_bits_equal([list(layer.attention) for layer in layers], naive)


def test_unstack_jax_on_the_cpu_compiles_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A shape no other test uses, so no compiled program could be cached for it.
    stacked = {
        "w": jnp.asarray(np.arange(7 * 13 * 11, dtype=np.float32).reshape(7, 13, 11))
    }
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        layers = unstack(stacked)
    assert not [r for r in caplog.records if "ompil" in r.getMessage()]
    for i, layer in enumerate(layers):
        assert isinstance(layer["w"], jax.Array)
        assert_bits_equal(layer["w"], stacked["w"][i])


def test_unstack_jax_keeps_device_commitment_and_kinds() -> None:
    device = jax.devices()[-1]
    committed = jax.device_put(jnp.arange(12.0).reshape(3, 4), device)
    free = jnp.arange(12).reshape(3, 4)
    weak = jnp.full((3, 2), 1.5)  # weakly typed: from a Python float
    keys = jax.random.split(jax.random.key(0), 3)
    layers = unstack({"c": committed, "f": free, "weak": weak, "keys": keys})
    for i, layer in enumerate(layers):
        assert layer["c"].devices() == {device} and layer["c"].committed
        assert not layer["f"].committed
        assert layer["weak"].weak_type == weak.weak_type
        assert_bits_equal(layer["c"], committed[i])
        assert_bits_equal(layer["f"], free[i])
        np.testing.assert_array_equal(
            jax.random.key_data(layer["keys"]), jax.random.key_data(keys[i])
        )


def test_unstack_jax_sharded_over_devices() -> None:
    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    spec = jax.sharding.PartitionSpec(None, "x")
    stacked = jax.device_put(
        jnp.arange(24.0).reshape(3, 8), jax.sharding.NamedSharding(mesh, spec)
    )
    for i, layer in enumerate(unstack(stacked)):
        assert_bits_equal(layer, stacked[i])


def test_unstack_under_jit() -> None:
    @jax.jit
    def f(s: Any) -> Any:
        return unstack(s)[-1]

    stacked = stack([block(i, jnp) for i in range(3)]).attention
    assert_bits_equal(f(stacked), unstack(stacked)[-1])


def test_unstack_static_only_tree_is_an_error() -> None:
    with pytest.raises(ValueError, match="`stacked` has no array leaves"):
        unstack({"act": "relu"})


# --- num_layers ---------------------------------------------------------------------


def test_num_layers() -> None:
    assert num_layers({"w": np.zeros((6, 2)), "b": np.zeros((6,)), "s": "x"}) == 6
    assert num_layers(jax.ShapeDtypeStruct((7, 1), jnp.float32)) == 7
    assert num_layers({"w": np.zeros((0, 3))}) == 0


def test_num_layers_lists_every_bad_leaf() -> None:
    tree = {
        "a": np.zeros((3, 2)),
        "b": np.zeros((4,)),
        "c": np.float32(1),
        "d": np.zeros(5),
    }
    with pytest.raises(ValueError) as info:
        num_layers(tree)
    msg = str(info.value)
    assert "`stacked` at ['c'] is a 0-d array" in msg
    assert "`stacked` at ['b'] has leading length 4, but ['a'] has 3" in msg
    assert "`stacked` at ['d'] has leading length 5, but ['a'] has 3" in msg


# --- bad input ----------------------------------------------------------------------


def test_stack_empty() -> None:
    with pytest.raises(ValueError, match=r"`layers` is empty: at least one layer"):
        stack([])


@pytest.mark.parametrize("bad", [{"w": np.zeros(2)}, np.zeros((3, 2)), "abc", None])
def test_stack_not_a_sequence(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"`layers` must be a list or tuple"):
        stack(bad)


def test_stack_structure_differs() -> None:
    a, b = block(0), block(1)
    c = Block(
        b.norm, {"q_proj": b.attention.q_proj, "k_proj": b.attention.k_proj}, b.act
    )
    with pytest.raises(
        ValueError,
        match=r"`layers\[2\]` has a different tree structure from `layers\[0\]` "
        r"at attention: node type Attention != dict",
    ):
        stack([a, b, c])


def test_stack_missing_key() -> None:
    with pytest.raises(
        ValueError,
        match=r"`layers\[1\]` has a different tree structure from `layers\[0\]` "
        r"at \['mlp'\]: missing \['bias'\]",
    ):
        stack([{"mlp": {"w": 1.0, "bias": 2.0}}, {"mlp": {"w": 1.0}}])


def test_stack_list_length_differs() -> None:
    with pytest.raises(ValueError, match=r"`layers\[1\]` .* at \['l'\]: length 3 != 2"):
        stack([{"l": [np.zeros(1), np.zeros(1)]}, {"l": [np.zeros(1)] * 3}])


def test_stack_shape_differs() -> None:
    with pytest.raises(
        ValueError,
        match=r"`layers\[2\]` differs from `layers\[0\]` at attention.q_proj: "
        r"shape \(4, 5, 3\) != \(4, 2, 3\)",
    ):
        stack([block(0), block(1), block(2, n_heads=5)])


def test_stack_dtype_differs() -> None:
    a = {"w": np.zeros(3, np.float32)}
    b = {"w": np.zeros(3, np.float16)}
    with pytest.raises(
        ValueError,
        match=r"`layers\[1\]` differs from `layers\[0\]` at \['w'\]: dtype float16 != float32",
    ):
        stack([a, b])


def test_stack_static_differs() -> None:
    a, b = block(0), block(1)._replace(act=jax.nn.relu)
    with pytest.raises(
        ValueError,
        match=r"`layers\[1\]` differs from `layers\[0\]` at act: static leaf .*relu.* != ",
    ):
        stack([a, b])


def test_stack_array_where_static_is_type_error() -> None:
    with pytest.raises(
        TypeError,
        match=r"`layers\[1\]` differs .* at \['s'\]: array where the static leaf 1 is expected",
    ):
        stack([{"s": 1}, {"s": np.zeros(2)}])


def test_stack_reports_every_difference_at_once() -> None:
    layers = [
        block(0),
        block(1, n_heads=3),
        block(2)._replace(norm=np.zeros(4, np.int32)),
    ]
    with pytest.raises(ValueError) as info:
        stack(layers)
    msg = str(info.value)
    assert (
        "`layers[1]` differs from `layers[0]` at attention.q_proj: shape (4, 3, 3)"
        in msg
    )
    assert "`layers[2]` differs from `layers[0]` at norm: dtype int32 != float32" in msg


def test_stack_fails_before_any_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("stacked before checking every layer")

    monkeypatch.setattr(np, "stack", boom)
    monkeypatch.setattr(jnp, "stack", boom)
    good = {"a": np.zeros(2), "b": jnp.zeros(2), "z": np.zeros(3)}
    bad = {"a": np.zeros(2), "b": jnp.zeros(2), "z": np.zeros(4)}
    with pytest.raises(ValueError, match=r"at \['z'\]: shape \(4,\) != \(3,\)"):
        stack([good, good, bad])


# --- layer_keys ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5])
def test_layer_keys_typed(n: int) -> None:
    key = jax.random.key(42)
    keys = layer_keys(key, n)
    assert keys.shape == (n,)
    assert jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    for i in range(n):
        want = jax.random.key_data(jax.random.fold_in(key, i))
        np.testing.assert_array_equal(jax.random.key_data(keys[i]), want)


@pytest.mark.parametrize("n", [0, 1, 5])
def test_layer_keys_raw(n: int) -> None:
    key = jax.random.PRNGKey(7)
    keys = layer_keys(key, n)
    assert keys.shape == (n, 2)
    assert keys.dtype == jnp.uint32
    for i in range(n):
        np.testing.assert_array_equal(keys[i], jax.random.fold_in(key, i))


def test_layer_keys_independent_of_n() -> None:
    key = jax.random.key(0)
    short, long = layer_keys(key, 3), layer_keys(key, 8)
    np.testing.assert_array_equal(
        jax.random.key_data(short), jax.random.key_data(long[:3])
    )


def test_layer_keys_under_jit() -> None:
    key = jax.random.key(3)
    keys = jax.jit(layer_keys, static_argnums=1)(key, 4)
    np.testing.assert_array_equal(
        jax.random.key_data(keys), jax.random.key_data(layer_keys(key, 4))
    )


def test_layer_keys_bad_input() -> None:
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key"):
        layer_keys(np.zeros(2, np.float32), 3)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"`key` must be a single key, got a key array of shape \(2,\)"
    ):
        layer_keys(jax.random.split(jax.random.key(0)), 3)
    with pytest.raises(TypeError, match=r"`n` must be an int, got float"):
        layer_keys(jax.random.key(0), 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`n` must be >= 0, got -1"):
        layer_keys(jax.random.key(0), -1)


# --- init_stacked --------------------------------------------------------------------


def _init(key: jax.Array) -> dict[str, Any]:
    k1, k2 = jax.random.split(key)
    return {
        "w": jax.random.normal(k1, (3, 2)),
        "b": jax.random.uniform(k2, (2,), dtype=jnp.bfloat16),
        "act": jax.nn.relu,
        "scale": 0.5,
    }


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_init_stacked_equals_stack_of_inits(make_key: Any) -> None:
    key = make_key(11)
    got = init_stacked(_init, key, 4)
    want = stack([_init(k) for k in layer_keys(key, 4)])
    assert_bits_equal(got, want)
    assert got["act"] is jax.nn.relu
    assert got["scale"] == 0.5


def test_init_stacked_plans_shapes_abstractly() -> None:
    cfg = llama_model.LLAMA_7B
    shapes = jax.eval_shape(
        lambda key: init_stacked(lambda k: llama_model.init_block(k, cfg), key, 32),
        jax.random.key(0),
    )
    assert shapes == stack([llama_model.block_shapes(cfg, jnp.float32)] * 32)


def test_init_stacked_bad_input() -> None:
    with pytest.raises(TypeError, match=r"`init_fn` must be callable"):
        init_stacked(3, jax.random.key(0), 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`n` must be >= 1, got 0"):
        init_stacked(_init, jax.random.key(0), 0)
    with pytest.raises(TypeError, match=r"`n` must be an int"):
        init_stacked(_init, jax.random.key(0), 2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key"):
        init_stacked(_init, 0, 2)  # type: ignore[arg-type]


def test_public_names_are_exported() -> None:
    for name in ["stack", "unstack", "num_layers", "layer_keys", "init_stacked"]:
        assert getattr(stackedtree, name).__doc__


def test_optional_field_none_in_one_layer_is_located() -> None:
    layers = [{"w": np.ones(2), "b": np.ones(2)}, {"w": np.ones(2), "b": None}]
    with pytest.raises(
        ValueError,
        match=r"`layers\[1\]` has a different tree structure from `layers\[0\]` "
        r"at \['b'\]: expected an array, got None",
    ):
        stack(layers)


def test_static_leaves_are_compared_by_value_not_identity() -> None:
    # Equal but distinct objects in every layer: an identity check would refuse them.
    def layer() -> dict[str, Any]:
        return {"w": np.zeros(2), "dims": [8, 2], "act": "".join(["ge", "lu"])}

    layers = [layer() for _ in range(3)]
    assert layers[0]["dims"] is not layers[1]["dims"]
    s = stack(layers)
    assert s["dims"] == [8, 2] and s["act"] == "gelu"
    assert concat_layers([s, stack([layer()])])["w"].shape == (4, 2)
    assert set_layer(s, 1, layer())["w"].shape == (3, 2)


def test_bfloat16_nan_payloads_survive_stacking() -> None:
    # XLA on the CPU computes bfloat16 in float32, which quiets a signalling NaN
    # (0x7fbf -> 0x7fc0) even in a copy; stack must move the bits unchanged.
    bits = np.array([[0x7FBF, 0x7F81], [0xFFBF, 0x3F80]], np.uint16)
    layers = [{"w": jnp.asarray(row.view(jnp.bfloat16))} for row in bits]
    stacked = stack(layers)
    np.testing.assert_array_equal(np.asarray(stacked["w"]).view(np.uint16), bits)
    doubled = concat_layers([stacked, stacked])
    np.testing.assert_array_equal(
        np.asarray(doubled["w"]).view(np.uint16), np.concatenate([bits, bits])
    )
    swapped = set_layer(stacked, 0, layers[1])
    np.testing.assert_array_equal(
        np.asarray(swapped["w"]).view(np.uint16), bits[[1, 1]]
    )
