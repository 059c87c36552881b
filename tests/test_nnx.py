"""Flax NNX modules: stacked, indexed, described, scanned and trained like any pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stackedtree import (
    concat_layers,
    describe,
    get_layer,
    init_stacked,
    layer_keys,
    scan_layers,
    set_layer,
    slice_layers,
    stack,
    unstack,
)

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

D = 8
N = 4


class Block(nnx.Module):
    """A pre-norm residual block with dropout: RNG state that advances on every call."""

    def __init__(self, rngs: Any, rate: float = 0.5) -> None:
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.linear = nnx.Linear(D, D, rngs=rngs)
        self.dropout = nnx.Dropout(rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.dropout(jnp.tanh(self.linear(self.norm(x))))


def make_block(key: jax.Array) -> Block:
    return Block(nnx.Rngs(key))


def make_stack(n: int = N, seed: int = 0) -> Block:
    return init_stacked(make_block, jax.random.key(seed), n)


def leaves_equal(a: Any, b: Any) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.array_equal(np.asarray(_data(x)), np.asarray(_data(y)))
        for x, y in zip(la, lb, strict=True)
    )


def _data(x: Any) -> Any:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def x_input() -> jax.Array:
    return jax.random.normal(jax.random.key(7), (3, D))


def block_fn(x: jax.Array, layer: Block) -> tuple[jax.Array, None]:
    return layer(x), None


@nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
def nnx_forward(x: jax.Array, layer: Block) -> jax.Array:
    return layer(x)


# ------------------------------------------------------------------ tree operations


def test_init_stacked_equals_stacking_the_layers() -> None:
    stacked = make_stack()
    assert type(stacked) is Block
    assert stacked.linear.kernel.shape == (N, D, D)
    layers = [make_block(k) for k in layer_keys(jax.random.key(0), N)]
    assert leaves_equal(stacked, stack(layers))


def test_unstack_and_get_layer_give_callable_modules() -> None:
    layers = [make_block(k) for k in layer_keys(jax.random.key(1), N)]
    stacked = stack(layers)
    x = x_input()
    for i, (back, original) in enumerate(zip(unstack(stacked), layers, strict=True)):
        assert type(back) is Block
        assert leaves_equal(back, original)
        one = get_layer(stacked, i)
        assert leaves_equal(one, original)
        one.dropout.deterministic = True
        original.dropout.deterministic = True
        np.testing.assert_array_equal(one(x), original(x))


def test_set_slice_and_concat_keep_modules() -> None:
    stacked = make_stack()
    new = make_block(jax.random.key(99))
    updated = set_layer(stacked, 2, new)
    assert type(updated) is Block
    assert leaves_equal(get_layer(updated, 2), new)
    assert leaves_equal(get_layer(updated, 1), get_layer(stacked, 1))
    head, tail = slice_layers(stacked, 0, 1), slice_layers(stacked, 1)
    assert type(head) is Block and head.linear.kernel.shape == (1, D, D)
    assert leaves_equal(concat_layers([head, tail]), stacked)


def test_stacking_layers_with_different_hyperparameters_names_the_field() -> None:
    layers = [make_block(jax.random.key(0)), Block(nnx.Rngs(1), rate=0.25)]
    with pytest.raises(
        ValueError,
        match=r"`layers\[1\]` has a different tree structure from `layers\[0\]` at "
        r"dropout\.rate: static field 0\.25 != 0\.5",
    ):
        stack(layers)


def test_describe_shows_fields_and_variables_without_internals() -> None:
    text = describe(make_stack(), width=80)
    assert text == (
        "Block(\n"
        "  dropout=Dropout(rngs=RngStream(count=RngCount(4), key=RngKey(4))),\n"
        "  linear=Linear(bias=Param(4, 8), kernel=Param(4, 8, 8)),\n"
        "  norm=RMSNorm(scale=Param(4, 8))\n"
        ")"
    )
    assert "_pytree__" not in describe(make_stack(), width=10)
    assert describe(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), dtypes=True) == (
        "Linear(bias=Param(f32[8]), kernel=Param(f32[4,8]))"
    )


def test_describe_of_abstract_module() -> None:
    abstract = jax.eval_shape(lambda: make_stack(2))
    assert "kernel=Param(2, 8, 8)" in describe(abstract)


# ------------------------------------------------------------------------ scanning


def test_scan_equals_the_python_loop_calling_methods() -> None:
    stacked = make_stack()
    stacked.dropout.deterministic = True  # a static field: kept by every layer
    x = x_input()
    carry, _ = scan_layers(block_fn, x, stacked)
    want = x
    for i in range(N):
        want = get_layer(stacked, i)(want)
    np.testing.assert_allclose(carry, want, rtol=1e-6, atol=1e-6)


def test_dropout_draws_new_masks_on_every_call_as_nnx_scan_does() -> None:
    ours, theirs = make_stack(), make_stack()
    x = x_input()
    outs = [scan_layers(block_fn, x, ours)[0] for _ in range(3)]
    want = [nnx_forward(x, theirs) for _ in range(3)]
    for a, b in zip(outs, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert not np.allclose(outs[0], outs[1])
    assert not np.allclose(outs[1], outs[2])
    np.testing.assert_array_equal(ours.dropout.rngs.count[...], [3] * N)
    assert leaves_equal(ours, theirs)


@pytest.mark.parametrize(
    "options",
    [{"remat": True}, {"remat_group": 2}, {"unroll": 2}],
    ids=["remat", "remat_group", "unroll"],
)
def test_state_is_written_back_with_every_scan_option(options: dict) -> None:
    ours, plain = make_stack(), make_stack()
    x = x_input()
    for _ in range(2):
        got = scan_layers(block_fn, x, ours, **options)[0]
        want = scan_layers(block_fn, x, plain)[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert leaves_equal(ours, plain)


def test_reverse_writes_each_layer_its_own_state() -> None:
    ours, theirs = make_stack(), make_stack()
    x = x_input()
    got = scan_layers(block_fn, x, ours, reverse=True)[0]
    want = x
    for i in reversed(range(N)):
        layer = get_layer(theirs, i)
        want = layer(want)
        theirs = set_layer(theirs, i, layer)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert leaves_equal(ours, theirs)


def test_batch_norm_statistics_are_written_back_as_nnx_scan_does() -> None:
    class Normed(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.linear = nnx.Linear(D, D, rngs=rngs)
            self.bn = nnx.BatchNorm(D, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.bn(self.linear(x))

    def build() -> Normed:
        return init_stacked(lambda k: Normed(nnx.Rngs(k)), jax.random.key(3), N)

    ours, theirs = build(), build()
    x = x_input()
    got = scan_layers(lambda c, layer: (layer(c), None), x, ours)[0]
    scan = nnx.scan(
        lambda c, layer: layer(c), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry
    )
    want = scan(x, theirs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours.bn.mean[...], 0.0)
    assert leaves_equal(ours, theirs)


def test_a_write_that_changes_shape_is_an_error() -> None:
    stacked = make_stack()

    def bad(x: jax.Array, layer: Block) -> tuple[jax.Array, None]:
        layer.norm.scale = nnx.Param(jnp.ones(D + 1))
        return x, None

    with pytest.raises(TypeError, match=r"at norm\.scale.*keep its shape"):
        scan_layers(bad, x_input(), stacked)


def test_key_argument_still_works_without_touching_rng_state() -> None:
    stacked = make_stack()

    def with_key(x: jax.Array, layer: Block, *, key: jax.Array) -> Any:
        return layer.linear(x) + jax.random.normal(key, x.shape), None

    a = scan_layers(with_key, x_input(), stacked, key=jax.random.key(5))[0]
    b = scan_layers(with_key, x_input(), stacked, key=jax.random.key(5))[0]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(stacked.dropout.rngs.count[...], [0] * N)


# ------------------------------------------------------------------------ training


class Model(nnx.Module):
    """Stacked blocks and a head; `scanned_by` picks scan_layers or nnx.scan."""

    def __init__(self, key: jax.Array, scanned_by: str) -> None:
        self.blocks = init_stacked(make_block, key, N)
        self.head = nnx.Linear(D, 1, rngs=nnx.Rngs(jax.random.fold_in(key, 1000)))
        self.scanned_by = scanned_by

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.scanned_by == "stackedtree":
            x = scan_layers(block_fn, x, self.blocks)[0]
        else:
            x = nnx_forward(x, self.blocks)
        return self.head(x)


def loss_fn(model: Model, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model: Model, optimizer: Any, x: jax.Array, y: jax.Array) -> Any:
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


def test_loss_and_gradient_equal_nnx_scan() -> None:
    ours, theirs = (
        Model(jax.random.key(0), "stackedtree"),
        Model(jax.random.key(0), "nnx"),
    )
    x, y = x_input(), jnp.ones((3, 1))
    la, ga = nnx.value_and_grad(loss_fn)(ours, x, y)
    lb, gb = nnx.value_and_grad(loss_fn)(theirs, x, y)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert leaves_equal(ours.blocks, theirs.blocks)  # RNG counters advanced alike
    np.testing.assert_array_equal(ours.blocks.dropout.rngs.count[...], [1] * N)


def test_nnx_optimizer_steps_equal_nnx_scan() -> None:
    ours, theirs = (
        Model(jax.random.key(0), "stackedtree"),
        Model(jax.random.key(0), "nnx"),
    )
    opts = [nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param) for m in (ours, theirs)]
    x, y = x_input(), jnp.ones((3, 1))
    losses = [
        [float(train_step(m, o, x, y)) for _ in range(3)]
        for m, o in zip((ours, theirs), opts, strict=True)
    ]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert len(set(losses[0])) == 3  # it trains, with new masks each step
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(_data(a), _data(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours.blocks.dropout.rngs.count[...], [3] * N)


# --------------------------------------------------------- names, rules and Muon


def test_flatten_names_names_variables_by_their_path() -> None:
    from stackedtree.checkpoint import flatten_names, unflatten_names

    stacked = make_stack()
    names = flatten_names(nnx.state(stacked, nnx.Param))
    assert list(names) == [
        "linear.bias",
        "linear.kernel",
        "norm.scale",
    ]
    assert list(flatten_names(stacked)) == [
        "dropout.rngs.count",
        "dropout.rngs.key",
        "linear.bias",
        "linear.kernel",
        "norm.scale",
    ]
    back = unflatten_names(flatten_names(stacked), stacked)
    assert type(back) is Block and leaves_equal(back, stacked)


def test_rules_fill_a_stacked_module_from_per_layer_tensors() -> None:
    from stackedtree.checkpoint import (
        Rule,
        flatten_by_rules,
        transpose,
        unflatten_by_rules,
    )

    rng = np.random.default_rng(0)
    flat = {}
    for i in range(N):
        flat[f"model.layers.{i}.proj.weight"] = rng.standard_normal((D, D), np.float32)
        flat[f"model.layers.{i}.proj.bias"] = rng.standard_normal(D).astype(np.float32)
        flat[f"model.layers.{i}.norm.weight"] = rng.standard_normal(D).astype(
            np.float32
        )
    rules = [
        Rule("model.layers.{i}.proj.weight", "linear.kernel", transpose(1, 0)),
        Rule("model.layers.{i}.proj.bias", "linear.bias"),
        Rule("model.layers.{i}.norm.weight", "norm.scale"),
    ]
    stacked = make_stack()
    params = unflatten_by_rules(flat, rules, nnx.state(stacked, nnx.Param))
    nnx.update(stacked, jax.device_put(params))
    for i in range(N):
        np.testing.assert_array_equal(
            stacked.linear.kernel[i], flat[f"model.layers.{i}.proj.weight"].T
        )
    back = flatten_by_rules(nnx.state(stacked, nnx.Param), rules)
    assert set(back) == set(flat)
    for name, x in back.items():
        np.testing.assert_array_equal(np.asarray(x), flat[name])


def test_muon_dims_with_nnx_optimizer_updates_each_layer_as_alone() -> None:
    from stackedtree import muon_dims

    stacked = make_stack()
    stacked.dropout.deterministic = True
    x = x_input()

    def loss(m: Any) -> jax.Array:
        return jnp.mean(jnp.sin(scan_layers(block_fn, x, m)[0]))

    grads = nnx.grad(loss)(stacked)
    dims = muon_dims(nnx.state(stacked, nnx.Param))
    assert dims["linear"]["kernel"] == optax.contrib.MuonDimensionNumbers(1, 2)
    assert dims["norm"]["scale"] is None
    layers = [get_layer(stacked, i) for i in range(N)]
    tx = optax.contrib.muon(0.1, muon_weight_dimension_numbers=muon_dims)
    nnx.Optimizer(stacked, tx, wrt=nnx.Param).update(stacked, grads)
    for i, layer in enumerate(layers):
        one = nnx.Optimizer(layer, optax.contrib.muon(0.1), wrt=nnx.Param)
        one.update(layer, get_layer(grads, i))
        for a, b in zip(
            jax.tree.leaves(nnx.state(get_layer(stacked, i), nnx.Param)),
            jax.tree.leaves(nnx.state(layer, nnx.Param)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_module_closed_over_by_jax_jit_is_refused_by_nnx_not_reused() -> None:
    # The advanced counters cannot leave a plain `jax.jit` through a closure; NNX says
    # so (as it does for `nnx.scan`) rather than the next call drawing the same masks.
    stacked = make_stack()

    @jax.jit
    def forward(x: jax.Array) -> jax.Array:
        return scan_layers(block_fn, x, stacked)[0]

    with pytest.raises(Exception, match="different trace level"):
        forward(x_input())
    np.testing.assert_array_equal(stacked.dropout.rngs.count[...], [0] * N)


# ------------------------------------------------- caches in place, and where no write-back


def test_update_xs_writes_caches_and_state_back() -> None:
    """A decoding layer that keeps a cache per layer and draws dropout: `update_xs`
    writes the caches in place and the RNG counters back, equal to the xs/ys form."""

    def decode(x: jax.Array, layer: Block, cache: jax.Array) -> Any:
        y = layer(x)
        return y, cache + y

    caches = jnp.zeros((N, 3, D))
    ours, plain = make_stack(), make_stack()
    for _ in range(2):
        got = scan_layers(decode, x_input(), ours, xs=caches, update_xs=True)
        want = scan_layers(decode, x_input(), plain, xs=caches)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(ours.dropout.rngs.count[...], [2] * N)
    assert leaves_equal(ours, plain)


def test_update_xs_checks_the_cache_not_the_state() -> None:
    def wrong(x: jax.Array, layer: Block, cache: jax.Array) -> Any:
        return layer(x), cache[:1]

    with pytest.raises(TypeError, match=r"`y` differs from its `x`: shape \(1, 8\)"):
        scan_layers(
            wrong, x_input(), make_stack(), xs=jnp.zeros((N, 3, D)), update_xs=True
        )


def test_scan_pattern_refuses_a_layer_that_advances_its_rng_state() -> None:
    from stackedtree import scan_pattern

    fns = {"a": block_fn, "b": block_fn}
    with pytest.raises(TypeError, match=r"`fns\['a'\]` wrote NNX state.*Pass `key=`"):
        scan_pattern(fns, x_input(), make_stack(), "abab")


def test_scan_pattern_runs_nnx_layers_that_write_nothing() -> None:
    from stackedtree import scan_pattern

    stacked = make_stack()

    def fn(x: jax.Array, layer: Block) -> tuple[jax.Array, None]:
        return layer.linear(x), None

    got = scan_pattern({"a": fn, "b": fn}, x_input(), stacked, "abab")[0]
    want = scan_layers(fn, x_input(), stacked)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_pipeline_refuses_a_layer_that_advances_its_rng_state() -> None:
    from jax.sharding import AxisType

    from stackedtree import pipeline_layers, stage_layers

    mesh = jax.make_mesh((2,), ("stage",), axis_types=(AxisType.Auto,))
    staged = stage_layers(make_stack(), 2)
    with pytest.raises(TypeError, match=r"`fn` wrote NNX state.*pipeline_layers"):
        pipeline_layers(block_fn, x_input()[:2], staged, mesh=mesh, microbatches=2)
