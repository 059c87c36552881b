"""The core operations on the pytrees of peer libraries and common Python containers."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from treegen import assert_bits_equal

from stackedtree import (
    describe,
    get_layer,
    group_layers,
    init_stacked,
    layer_keys,
    num_layers,
    set_layer,
    stack,
    ungroup_layers,
    unstack,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import llama_model

N = 3
KEY = jax.random.key(0)


def check_round_trips(layers: list[Any]) -> Any:
    """The operations every peer's trees must support; returns the stack."""
    stacked = stack(layers)
    assert num_layers(stacked) == len(layers)
    assert_bits_equal(unstack(stacked), layers, stacked_kinds=True)
    for i in range(len(layers)):
        assert_bits_equal(get_layer(stacked, i), layers[i], stacked_kinds=True)
    assert_bits_equal(
        get_layer(set_layer(stacked, 1, layers[0]), 1), layers[0], stacked_kinds=True
    )
    assert_bits_equal(ungroup_layers(group_layers(stacked, len(layers))), stacked)
    return stacked


# --- NamedTuples, dataclasses, plain containers -----------------------------------------


def test_llama_decoder_block_namedtuples() -> None:
    cfg = llama_model.Config(
        d_model=8, kv_heads=2, q_per_kv=2, head_dim=4, d_ff=16, num_layers=N
    )
    layers = [llama_model.init_block(k, cfg) for k in jax.random.split(KEY, N)]
    stacked = check_round_trips(layers)
    assert isinstance(stacked, llama_model.DecoderBlock)
    assert isinstance(stacked.attention, llama_model.Attention)
    assert stacked.attention.q_proj.shape == (N, 8, 2, 2, 4)
    assert describe(stacked, width=1000).startswith(
        "DecoderBlock(input_norm=(3, 8), attention=Attention("
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    weight: Any
    bias: Any
    activation: str = dataclasses.field(metadata={"static": True}, default="gelu")


def test_register_dataclass_with_static_field() -> None:
    layers = [
        Linear(np.full((4, 2), i, np.float32), np.zeros(2, np.float32))
        for i in range(N)
    ]
    stacked = check_round_trips(layers)
    assert stacked.activation == "gelu"
    assert (
        describe(stacked) == "Linear(weight=(3, 4, 2), bias=(3, 2), activation='gelu')"
    )
    with pytest.raises(
        ValueError,
        match=r"`layers\[1\]` has a different tree structure from `layers\[0\]` at activation: "
        r"static field 'relu' != 'gelu'",
    ):
        stack([layers[0], Linear(layers[1].weight, layers[1].bias, "relu")])


@chex.dataclass
class ChexBlock:
    w: Any
    b: Any
    scale: Any


def test_chex_dataclass() -> None:
    layers = [
        ChexBlock(w=jnp.full((2, 3), i), b=np.ones(3, np.float32), scale=2.0)
        for i in range(N)
    ]
    stacked = check_round_trips(layers)
    assert isinstance(stacked, ChexBlock)
    assert stacked.scale == 2.0
    assert describe(stacked) == "ChexBlock(w=(3, 2, 3), b=(3, 3), scale=2.0)"


def test_plain_dicts_and_lists() -> None:
    layers = [
        {"mlp": [np.full((2,), i, np.int8), {"b": jnp.zeros((1, 2))}], "name": "block"}
        for i in range(N)
    ]
    stacked = check_round_trips(layers)
    assert describe(stacked) == "{'mlp': [(3, 2), {'b': (3, 1, 2)}], 'name': 'block'}"


# --- Equinox --------------------------------------------------------------------------


def test_equinox_module_with_static_and_callable_fields() -> None:
    eqx = pytest.importorskip("equinox")

    class Block(eqx.Module):
        linear: Any
        activation: Any  # a function: a static leaf, not an array
        width: int = eqx.field(static=True)

        def __init__(self, key: jax.Array) -> None:
            self.linear = eqx.nn.Linear(4, 4, key=key)
            self.activation = jax.nn.gelu
            self.width = 4

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.activation(self.linear(x))

    layers = [Block(k) for k in jax.random.split(KEY, N)]
    stacked = check_round_trips(layers)
    assert stacked.activation is jax.nn.gelu
    assert stacked.width == 4
    assert stacked.linear.weight.shape == (N, 4, 4)
    assert describe(stacked, width=1000).startswith(
        "Block(linear=Linear(weight=(3, 4, 4), bias=(3, 4)"
    )
    # The layer with its axis removed is a working module.
    x = jnp.ones(4)
    np.testing.assert_allclose(get_layer(stacked, 2)(x), layers[2](x), rtol=1e-6)

    built = init_stacked(Block, KEY, N)
    want = stack([Block(k) for k in layer_keys(KEY, N)])
    assert built.activation is jax.nn.gelu
    jax.tree.map(
        np.testing.assert_array_equal,
        eqx.filter(built, eqx.is_array),
        eqx.filter(want, eqx.is_array),
    )


def test_equinox_static_field_mismatch_names_the_field() -> None:
    eqx = pytest.importorskip("equinox")

    class Scaled(eqx.Module):
        w: jax.Array
        n: int = eqx.field(static=True)

    with pytest.raises(
        ValueError,
        match=r"`layers\[1\]` has a different tree structure from `layers\[0\]` at \['m'\]\.n: "
        r"static field 2 != 1",
    ):
        stack([{"m": Scaled(jnp.ones(2), 1)}, {"m": Scaled(jnp.ones(2), 2)}])


def test_equinox_scan_over_layers_with_lax_scan() -> None:
    eqx = pytest.importorskip("equinox")
    mlp_layers = [eqx.nn.Linear(3, 3, key=k) for k in jax.random.split(KEY, N)]
    stacked = stack(mlp_layers)
    params, static = eqx.partition(stacked, eqx.is_array)

    def body(x: jax.Array, p: Any) -> tuple[jax.Array, None]:
        return eqx.combine(p, static)(x), None

    out, _ = jax.lax.scan(body, jnp.ones(3), params)
    want = jnp.ones(3)
    for layer in mlp_layers:
        want = layer(want)
    np.testing.assert_allclose(out, want, rtol=1e-5)


# --- Flax linen --------------------------------------------------------------------------


def test_flax_linen_params() -> None:
    nn = pytest.importorskip("flax.linen")
    model = nn.Dense(5)
    x = jnp.ones((1, 3))
    layers = [model.init(k, x) for k in jax.random.split(KEY, N)]
    stacked = check_round_trips(layers)
    assert stacked["params"]["kernel"].shape == (N, 3, 5)
    assert describe(stacked) == "{'params': {'bias': (3, 5), 'kernel': (3, 3, 5)}}"
    built = init_stacked(lambda k: model.init(k, x), KEY, N)
    want = stack([model.init(k, x) for k in layer_keys(KEY, N)])
    assert_bits_equal(built, want)
    y = model.apply(get_layer(stacked, 1), x)
    np.testing.assert_allclose(y, model.apply(layers[1], x), rtol=1e-6)


# --- Haiku --------------------------------------------------------------------------------


def test_haiku_params() -> None:
    hk = pytest.importorskip("haiku")
    f = hk.transform(lambda x: hk.nets.MLP([4, 2])(x))
    x = jnp.ones((1, 3))
    layers = [f.init(k, x) for k in jax.random.split(KEY, N)]
    stacked = check_round_trips(layers)
    assert stacked["mlp/~/linear_0"]["w"].shape == (N, 3, 4)
    assert "'mlp/~/linear_1': {'b': (3, 2), 'w': (3, 4, 2)}" in describe(
        stacked, width=200
    )
    built = init_stacked(lambda k: f.init(k, x), KEY, N)
    want = stack([f.init(k, x) for k in layer_keys(KEY, N)])
    assert_bits_equal(built, want)
    y = f.apply(get_layer(stacked, 0), None, x)
    np.testing.assert_allclose(y, f.apply(layers[0], None, x), rtol=1e-6)
