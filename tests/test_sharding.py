"""layer_specs, layer_shardings, shard_layers; scanning sharded stacks on 8 devices."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import Attention, Block, block
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from stackedtree import layer_shardings, layer_specs, scan_layers, shard_layers, stack


def mesh(*shape: int, names: str = "xy", kind: AxisType = AxisType.Auto) -> Any:
    axes = tuple(names[: len(shape)])
    return jax.make_mesh(shape, axes, axis_types=(kind,) * len(shape))


SPECS = Block(
    norm=P("x"), attention=Attention(q_proj=P(None, "x"), k_proj=None), act=P()
)


# --------------------------------------------------------------------- layer_specs


def test_layer_specs_puts_the_layer_axis_first() -> None:
    assert layer_specs(SPECS) == Block(
        norm=P(None, "x"),
        attention=Attention(q_proj=P(None, None, "x"), k_proj=P(None)),
        act=P(None),
    )
    assert layer_specs(SPECS, axis="stage").attention.q_proj == P("stage", None, "x")
    assert layer_specs(P("x"), axis=("a", "b")) == P(("a", "b"), "x")
    assert layer_specs(None) == P(None)


def test_layer_specs_errors() -> None:
    with pytest.raises(
        TypeError, match=r"`specs` at \['w'\] must be a .*PartitionSpec"
    ):
        layer_specs({"w": "x"})
    with pytest.raises(TypeError, match="`axis` must be None, a mesh axis name"):
        layer_specs(P(), axis=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"(?s)only one dimension:.*\['a'\].*\['b'\]"):
        layer_specs({"a": P("stage"), "b": P(None, ("x", "stage"))}, axis="stage")


def test_layer_shardings_are_named_shardings_on_the_mesh() -> None:
    m = mesh(2, 4)
    out = layer_shardings(m, {"w": P("y"), "b": None}, axis="x")
    assert out["w"] == NamedSharding(m, P("x", "y"))
    assert out["b"] == NamedSharding(m, P("x"))
    with pytest.raises(
        ValueError, match=r"(?s)`specs` at \['w'\].*'z'.*axes \('x', 'y'\)"
    ):
        layer_shardings(m, {"w": P("z"), "b": None})
    with pytest.raises(ValueError, match="'stage'"):
        layer_shardings(m, P(), axis="stage")
    with pytest.raises(TypeError, match=r"`mesh` must be a jax\.sharding\.Mesh"):
        layer_shardings("x", P())  # type: ignore[arg-type]


# --------------------------------------------------------------------- shard_layers


def test_shard_layers_places_every_leaf_and_keeps_values() -> None:
    m = mesh(4)
    layers = stack([block(i, n_heads=4) for i in range(8)])
    placed = shard_layers(layers, m, SPECS)
    assert placed.act is jax.nn.gelu
    q = placed.attention.q_proj
    assert q.sharding == NamedSharding(m, P(None, None, "x"))
    assert {s.data.shape for s in q.addressable_shards} == {(8, 4, 1, 3)}
    for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(layers), strict=True):
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(np.asarray(got), want)
    split = shard_layers(layers, m, P(), axis="x")
    assert {s.data.shape for s in split.norm.addressable_shards} == {(2, 4)}


def test_shard_layers_prefix_specs_and_abstract_leaves() -> None:
    m = mesh(8)
    layers = {
        "w": jax.ShapeDtypeStruct((4, 16, 8), jnp.bfloat16),
        "b": np.zeros((4, 8, 8)),
    }
    out = shard_layers(layers, m, P(None, "x"))
    assert isinstance(out["w"], jax.ShapeDtypeStruct)
    assert out["w"].sharding == NamedSharding(m, P(None, None, "x"))
    assert out["b"].sharding == NamedSharding(m, P(None, None, "x"))


def test_shard_layers_lists_every_leaf_that_does_not_divide() -> None:
    layers = stack([block(i, n_heads=3) for i in range(6)])
    with pytest.raises(ValueError) as e:
        shard_layers(layers, mesh(8), SPECS, axis=None)
    msg = str(e.value)
    assert "`layers` at norm has shape (6, 4): dimension 1 of size 4" in msg
    assert "'x' of size 8 (8 parts)" in msg
    assert "`layers` at attention.q_proj has shape (6, 4, 3, 3): dimension 2 of" in msg
    with pytest.raises(ValueError, match=r"dimension 0 \(the layer axis\) of size 6"):
        shard_layers(layers, mesh(4), P(), axis="x")
    with pytest.raises(
        ValueError, match=r"\(2, 4, 5\): dimension 1 of size 4 is split"
    ):
        shard_layers({"w": np.zeros((2, 4, 5))}, mesh(2, 4), P(("x", "y")))


def test_shard_layers_bad_trees() -> None:
    with pytest.raises(ValueError, match="fewer dimensions than the 3 entries"):
        shard_layers({"w": np.zeros((2, 4))}, mesh(8), P(None, "x"))
    with pytest.raises(
        ValueError, match="`specs` must have the structure of one layer"
    ):
        shard_layers({"w": np.zeros((2, 4))}, mesh(8), {"v": P()})
    with pytest.raises(ValueError, match=r"`layers` at \['w'\] is a 0-d array"):
        shard_layers({"w": np.zeros(())}, mesh(8), P())


# --------------------------------------------------------------------- scanning


def _loss(layers: Any, x: jax.Array) -> jax.Array:
    y, _ = scan_layers(lambda c, w: (jnp.tanh(c @ w), None), x, layers)
    return jnp.sum(y)


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit])
def test_scan_over_fsdp_sharded_layers_equals_unsharded(kind: AxisType) -> None:
    m = mesh(8, kind=kind)
    w = np.random.default_rng(0).normal(size=(4, 16, 16)).astype(np.float32) / 4
    x = jnp.ones((2, 16))
    sharded = shard_layers(w, m, P("x"))
    loss, grad = jax.jit(jax.value_and_grad(_loss))(sharded, x)
    want_loss, want_grad = jax.value_and_grad(_loss)(jnp.asarray(w), x)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    assert grad.sharding.is_equivalent_to(NamedSharding(m, P(None, "x")), 3)


def _temp_bytes(layers: jax.Array, x: jax.Array) -> int:
    compiled = jax.jit(_loss).lower(layers, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_splitting_the_layer_axis_makes_the_scan_gather_the_stack() -> None:
    # Why `axis=None` is the default: the same stack, one eighth per device either way.
    m = mesh(8)
    n, d = 8, 256
    w = np.ones((n, d, d), np.float32)
    x = jax.device_put(np.ones((8, d), np.float32), NamedSharding(m, P()))
    layer_split = shard_layers(w, m, P(), axis="x")
    weight_split = shard_layers(w, m, P("x"))
    gathered = _temp_bytes(layer_split, x)
    per_layer = _temp_bytes(weight_split, x)
    assert gathered >= w.nbytes  # the whole stack, on every device
    assert per_layer < w.nbytes / n  # less than one layer, gathered a layer at a time
    assert gathered > 10 * per_layer


def test_explicit_axes_refuse_scanning_a_split_layer_axis() -> None:
    m = mesh(8, kind=AxisType.Explicit)
    w = shard_layers(np.ones((8, 16, 16), np.float32), m, P(), axis="x")
    with pytest.raises(
        ValueError, match="0th dimension of all xs should be replicated"
    ):
        jax.jit(_loss).lower(w, jnp.ones((2, 16)))
