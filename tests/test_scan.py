"""scan_layers against the written-out Python loop, forward and grad, and its errors."""

from __future__ import annotations

import contextlib
import functools
import io
from typing import Any

import jax
import jax.ad_checkpoint
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import Layer, assert_close, layer_block, with_static

from stackedtree import get_layer, layer_keys, scan_layers, stack

N = 10  # not divisible by 3 nor by the sqrt group size
D = 4


def make_layers(n: int = N, seed: int = 0, width: int = D) -> Layer:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return Layer(
        w=jax.random.normal(k1, (n, width, width)) / jnp.sqrt(width),
        b=jax.random.normal(k2, (n, width)),
        scale=0.5,
    )


block = layer_block


def reference_loop(fn, init, layers, xs=None, key=None, reverse=False):
    """The loop from scan_layers' docstring, written out."""
    n = layers.w.shape[0]
    keys = layer_keys(key, n) if key is not None else None
    carry, ys = init, [None] * n
    for i in reversed(range(n)) if reverse else range(n):
        args = (carry, get_layer(layers, i))
        if xs is not None:
            args += (get_layer(xs, i),)
        kwargs = {"key": keys[i]} if key is not None else {}
        carry, ys[i] = fn(*args, **kwargs)
    return carry, stack(ys)


def loss_from(scan):
    def loss(params, init):
        carry, ys = scan(params, init)
        return jnp.sum(carry**2) + jnp.sum(jnp.sin(ys))

    return loss


INIT = jnp.linspace(-1.0, 1.0, 2 * D).reshape(2, D)
XS = jnp.linspace(-0.5, 0.5, N * 2 * D).reshape(N, 2, D)


def _policy(prim, *_, **__):  # a policy callable: save matmul outputs only
    return prim is jax.lax.dot_general_p


@functools.cache
def reference(reverse: bool, key_seed: int | None, with_xs: bool):
    """The written-out loop's output and gradient, computed once per configuration."""
    params = make_layers()[:2]
    key = jax.random.key(key_seed) if key_seed is not None else None
    xs = XS if with_xs else None

    def loop(params, init):
        return reference_loop(
            block, init, with_static(params), xs=xs, key=key, reverse=reverse
        )

    grads = jax.grad(loss_from(loop), argnums=(0, 1))(params, INIT)
    return loop(params, INIT), grads


def check_against_loop(reverse, key_seed, with_xs, **options):
    params = make_layers()[:2]
    key = jax.random.key(key_seed) if key_seed is not None else None
    xs = XS if with_xs else None

    def ours(params, init):
        return scan_layers(
            block, init, with_static(params), xs=xs, key=key, reverse=reverse, **options
        )

    want_out, want_grads = reference(reverse, key_seed, with_xs)
    assert_close(jax.jit(ours)(params, INIT), want_out)
    assert_close(
        jax.jit(jax.grad(loss_from(ours), argnums=(0, 1)))(params, INIT), want_grads
    )


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("remat", [False, True, "dots_saveable", _policy])
@pytest.mark.parametrize("remat_group", [None, 3, "sqrt"])
def test_equals_loop_remat(reverse, remat, remat_group):
    check_against_loop(reverse, 7, True, remat=remat, remat_group=remat_group)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("unroll", [1, 2, True])
@pytest.mark.parametrize("with_key", [False, True])
@pytest.mark.parametrize("with_xs", [False, True])
def test_equals_loop_unroll_keys_xs(reverse, unroll, with_key, with_xs):
    check_against_loop(reverse, 3 if with_key else None, with_xs, unroll=unroll)


@pytest.mark.parametrize("remat_group", [3, "sqrt"])
@pytest.mark.parametrize(
    ("with_key", "with_xs"), [(False, False), (True, False), (True, True)]
)
def test_equals_loop_groups_keys_xs(remat_group, with_key, with_xs):
    check_against_loop(
        True, 3 if with_key else None, with_xs, remat_group=remat_group, remat=True
    )


def test_raw_uint32_key_equals_typed_key_semantics():
    layers = make_layers()
    raw = jax.random.PRNGKey(5)
    carry, ys = scan_layers(block, INIT, layers, key=raw)
    ref = reference_loop(block, INIT, layers, key=raw)
    assert_close((carry, ys), ref)

    # Each layer really sees key fold_in(key, i): layer i's noise depends on i.
    def record(c, layer, *, key):
        return c, jax.random.key_data(key) if key.dtype != jnp.uint32 else key

    _, got = scan_layers(record, INIT, layers, key=raw)
    want = np.stack([np.asarray(jax.random.fold_in(raw, i)) for i in range(N)])
    np.testing.assert_array_equal(got, want)


def test_reverse_keeps_keys_and_outputs_aligned():
    layers = make_layers()
    key = jax.random.key(11)

    def fn(c, layer, *, key):
        return c, jax.random.key_data(key)

    _, fwd = scan_layers(fn, INIT, layers, key=key)
    _, bwd = scan_layers(fn, INIT, layers, key=key, reverse=True)
    np.testing.assert_array_equal(fwd, bwd)
    np.testing.assert_array_equal(
        fwd[4], jax.random.key_data(jax.random.fold_in(key, 4))
    )


def test_key_is_only_passed_when_given():
    def strict(c, layer):  # accepts no key at all
        return c, None

    carry, ys = scan_layers(strict, INIT, make_layers())
    assert ys is None
    np.testing.assert_array_equal(carry, INIT)


def test_order_of_layers():
    layers = {"v": jnp.arange(N, dtype=jnp.float32)}
    carry, ys = scan_layers(lambda c, p: (c * 2 + p["v"], c), jnp.float32(0), layers)
    want, c = [], 0.0
    for i in range(N):
        want.append(c)
        c = c * 2 + i
    assert float(carry) == c
    np.testing.assert_array_equal(ys, want)
    carry_r, ys_r = scan_layers(
        lambda c, p: (c * 2 + p["v"], c), jnp.float32(0), layers, reverse=True
    )
    c = 0.0
    want_r = [0.0] * N
    for i in reversed(range(N)):
        want_r[i] = c
        c = c * 2 + i
    assert float(carry_r) == c
    np.testing.assert_array_equal(ys_r, want_r)


def test_numpy_layers_and_pytree_outputs():
    layers = with_static(jax.tree.map(np.asarray, make_layers()[:2]))
    assert isinstance(layers.w, np.ndarray)

    def fn(c, layer):
        h, y = block(c, layer)
        return h, {"sum": y, "none": None, "both": (h, y)}

    carry, ys = jax.jit(lambda p: scan_layers(fn, INIT, with_static(p)))(layers[:2])
    ref_carry, ref_ys = reference_loop(fn, INIT, layers)
    assert_close((carry, ys), (ref_carry, ref_ys))
    assert ys["none"] is None
    assert ys["both"][0].shape == (N, 2, D)


def test_remat_group_remainder_and_sizes():
    layers = make_layers()
    ref = reference_loop(block, INIT, layers, xs=XS)
    for g in [1, 2, 3, 4, 7, 9, 10]:
        got = scan_layers(block, INIT, layers, xs=XS, remat_group=g, remat=True)
        assert_close(got, ref)


def test_remat_inserts_checkpoint():
    params = make_layers()[:2]

    def jaxpr_text(**kw):
        f = jax.grad(
            loss_from(lambda p, i: scan_layers(block, i, with_static(p), **kw))
        )
        return str(jax.make_jaxpr(f)(params, INIT))

    assert "checkpoint" not in jaxpr_text() and "remat" not in jaxpr_text()
    text = jaxpr_text(remat=True)
    assert "checkpoint" in text or "remat" in text
    grouped = jaxpr_text(remat_group=3)
    assert grouped.count("scan[") > jaxpr_text().count("scan[")


def test_vmap_over_batch_of_carries():
    layers = make_layers()
    inits = jnp.stack([INIT, INIT * 2, -INIT])
    got = jax.vmap(lambda i: scan_layers(block, i, layers, xs=XS, remat_group="sqrt"))(
        inits
    )
    for b in range(3):
        assert_close(
            jax.tree.map(lambda x, b=b: x[b], got),
            reference_loop(block, inits[b], layers, xs=XS),
        )


def test_vmap_over_stacks_of_params():
    stacks = jax.tree.map(
        lambda *x: jnp.stack(x), make_layers(seed=1)[:2], make_layers(seed=2)[:2]
    )
    got = jax.vmap(lambda p: scan_layers(block, INIT, with_static(p)))(stacks)
    assert got[0].shape == (2, 2, D)
    assert_close(
        jax.tree.map(lambda x: x[1], got),
        reference_loop(block, INIT, make_layers(seed=2)),
    )


def test_eval_shape_allocates_nothing():
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_layers()[:2]
    )
    out = jax.eval_shape(
        lambda p: scan_layers(
            block, INIT, with_static(p), key=jax.random.key(0), remat_group=3
        ),
        params,
    )
    assert out[0].shape == (2, D)
    assert out[1].shape == (N, 2)


# --- which values rematerialisation saves ---------------------------------------------


def saved_residuals(remat, remat_group=None) -> list[str]:
    """What the backward pass of a 4-layer scan stores, as jax prints it."""
    w = jnp.ones((4, D, D))

    def loss(w, x):
        def layer(c, w):
            return jnp.tanh(c @ w), None

        return scan_layers(layer, x, w, remat=remat, remat_group=remat_group)[0].sum()

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(loss, w, INIT)
    return out.getvalue().splitlines()


def checkpoint_policies(remat, remat_group=None) -> list[Any]:
    """The `policy` of every `jax.checkpoint` in the traced scan, outermost first."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if "policy" in eqn.params:
                found.append(eqn.params["policy"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else [value]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    def run(params):
        layers = with_static(params)
        return scan_layers(block, INIT, layers, remat=remat, remat_group=remat_group)

    walk(jax.make_jaxpr(run)(make_layers()[:2]).jaxpr)
    return found


def test_remat_saves_what_its_policy_says():
    everything, nothing = saved_residuals(False), saved_residuals(True)
    dots = saved_residuals("dots_saveable")
    # dots_saveable keeps the matmul outputs that True recomputes, and no more.
    assert len(nothing) < len(dots) < len(everything)
    assert saved_residuals(_policy) == dots
    assert saved_residuals("nothing_saveable") == nothing


@pytest.mark.parametrize("remat_group", [None, 2])
def test_remat_policy_reaches_jax_checkpoint(remat_group):
    assert checkpoint_policies("dots_saveable", remat_group)[-1] is (
        jax.checkpoint_policies.dots_saveable
    )
    assert checkpoint_policies(_policy, remat_group)[-1] is _policy
    assert checkpoint_policies(True, remat_group)[-1] is None
    assert checkpoint_policies(False) == []


def test_carry_may_be_a_python_scalar():
    carry, _ys = scan_layers(
        lambda c, p: (c + jnp.sum(p["v"]), None), 0.0, {"v": jnp.ones((N, 3))}
    )
    assert float(carry) == 3.0 * N


# --- bad input ---------------------------------------------------------------------------


def test_fn_must_return_a_pair():
    with pytest.raises(
        TypeError,
        match=r"`fn` must return a pair `\(carry, y\)`.*got an array of shape \(2, 4\)",
    ):
        scan_layers(lambda c, p: c, INIT, make_layers())
    with pytest.raises(TypeError, match=r"got a tuple of length 3"):
        scan_layers(lambda c, p: (c, c, c), INIT, make_layers())


def test_carry_shape_change_is_named():
    with pytest.raises(
        TypeError, match=r"carry.*differs at \['h'\]: shape \(2, 8\) != \(2, 4\)"
    ):
        scan_layers(
            lambda c, p: ({"h": jnp.concatenate([c["h"], c["h"]], 1)}, None),
            {"h": INIT},
            make_layers(),
        )


def test_carry_dtype_change_is_named():
    with pytest.raises(TypeError, match=r"differs at \['h'\]: dtype int32 != float32"):
        scan_layers(
            lambda c, p: ({"h": c["h"].astype(jnp.int32)}, None),
            {"h": INIT},
            make_layers(),
        )


def test_carry_structure_change_is_named():
    with pytest.raises(
        TypeError,
        match=r"different structure from `init`: "
        r"unexpected \['extra'\]",
    ):
        scan_layers(
            lambda c, p: ({"h": c["h"], "extra": c["h"]}, None),
            {"h": INIT},
            make_layers(),
        )


def test_xs_length_mismatch_names_the_path():
    with pytest.raises(
        ValueError,
        match=r"`xs` at \['cache'\]\[1\] has leading length 9, "
        r"but `layers` has 10 layers",
    ):
        scan_layers(
            lambda c, p, x: (c, None), INIT, make_layers(), xs={"cache": (XS, XS[:9])}
        )


def test_unknown_remat_policy_lists_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"'dots_savable' is not a known checkpoint policy; "
        r"valid names are .*'dots_saveable'",
    ):
        scan_layers(block, INIT, make_layers(), remat="dots_savable")
    with pytest.raises(TypeError, match=r"`remat` must be a bool"):
        scan_layers(block, INIT, make_layers(), remat=3)


@pytest.mark.parametrize(
    ("group", "exc", "match"),
    [
        (0, ValueError, r"`remat_group` must be between 1 and the 10 layers, got 0"),
        (11, ValueError, r"between 1 and the 10 layers, got 11"),
        (
            "cube",
            ValueError,
            r"`remat_group` must be None, a positive int or 'sqrt', got 'cube'",
        ),
        (
            2.0,
            TypeError,
            r"`remat_group` must be None, a positive int or 'sqrt', got float",
        ),
        (True, TypeError, r"got bool"),
    ],
)
def test_bad_remat_group(group, exc, match):
    with pytest.raises(exc, match=match):
        scan_layers(block, INIT, make_layers(), remat_group=group)


@pytest.mark.parametrize("key", [0, jnp.zeros(3), jnp.zeros((2,), jnp.float32), "key"])
def test_bad_key(key):
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key"):
        scan_layers(block, INIT, make_layers(), key=key)


def test_bad_layers():
    with pytest.raises(
        ValueError,
        match=r"`layers` at \['b'\] has leading length 3, but "
        r"\['a'\] has 10",
    ):
        scan_layers(block, INIT, {"a": jnp.zeros((N, 2)), "b": jnp.zeros((3, 2))})
    with pytest.raises(ValueError, match=r"`layers` has no array leaves"):
        scan_layers(block, INIT, {"a": 1})
    with pytest.raises(TypeError, match=r"`fn` must be callable"):
        scan_layers("block", INIT, make_layers())


def test_typed_key_in_carry_and_numpy_float64_init():
    layers = {"w": jnp.ones((4, 3))}

    def inner(state, layer):  # the scan tutorial's (key, seq) state
        key, x = state
        key, sub = jax.random.split(key)
        return (key, x * layer["w"] + 0.0 * jax.random.normal(sub, x.shape)), None

    (_, x), _ = scan_layers(inner, (jax.random.key(0), jnp.ones(3)), layers)
    np.testing.assert_array_equal(x, np.ones(3))
    carry, _ = scan_layers(lambda c, p: (c * p["w"], None), np.ones(3), layers)
    np.testing.assert_array_equal(carry, np.ones(3))


@pytest.mark.parametrize("remat_group", [None, 3])
def test_static_leaves_of_ys_are_kept_once_like_the_loop(remat_group):
    def fn(c, layer):
        return c + layer["w"], {"h": c, "name": "blk", "scale": 2.0}

    layers = {"w": jnp.ones((N, 3))}
    _, ys = scan_layers(fn, jnp.zeros(3), layers, remat_group=remat_group)
    assert ys["name"] == "blk" and ys["scale"] == 2.0
    np.testing.assert_array_equal(ys["h"], np.arange(N)[:, None] * np.ones((1, 3)))


def test_empty_stack_with_sqrt_groups():
    carry, _ys = scan_layers(
        lambda c, p: (c + p["w"], None),
        jnp.zeros(3),
        {"w": jnp.ones((0, 3))},
        remat_group="sqrt",
    )
    np.testing.assert_array_equal(carry, np.zeros(3))


# --- rematerialisation inside groups ----------------------------------------------------


def test_layers_inside_a_group_are_checkpointed_without_remat():
    # A group recomputed in the backward pass keeps its g carries, not every value
    # inside its layers: the layer step is checkpointed (saving nothing) inside the
    # group's checkpoint even with remat=False.
    assert checkpoint_policies(False, 2) == [None, None]
    assert checkpoint_policies(False, "sqrt") == [None, None]


def grad_temp_bytes(remat, remat_group, n=16, width=32):
    """XLA temporary memory of the backward pass of an n-layer scan."""
    w = jnp.ones((n, width, width)) / width
    x = jnp.ones((8, width))

    def loss(w, x):
        def layer(c, w):
            return jnp.tanh(jnp.tanh(c @ w) @ w), None

        return scan_layers(layer, x, w, remat=remat, remat_group=remat_group)[0].sum()

    compiled = jax.jit(jax.grad(loss)).lower(w, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_groups_without_remat_need_the_memory_of_groups_with_remat():
    assert grad_temp_bytes(False, 4) <= grad_temp_bytes(True, 4)


# --- update_xs: per-layer caches updated in place -----------------------------------------


def cache_block(carry, layer, x, *, key=None):
    """A layer whose `y` matches its `x` (a cache entry it rewrites)."""
    h, _ = layer_block(carry, layer, x, key=key)
    return h, jnp.tanh(h) * 0.5 + x


def run_both(xs=XS, init=INIT, fn=cache_block, jit=True, **options):
    """`scan_layers` with the xs/ys form and with `update_xs=True`."""
    layers = make_layers()

    def run(update_xs):
        def go(init, xs):
            return scan_layers(fn, init, layers, xs=xs, update_xs=update_xs, **options)

        return (jax.jit(go) if jit else go)(init, xs)

    return run(False), run(True)


def assert_equal_bits(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        if not hasattr(e, "dtype"):
            assert a == e
            continue
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_key", [False, True])
@pytest.mark.parametrize(
    ("remat", "remat_group"), [(False, None), (True, None), ("dots_saveable", 3)]
)
def test_update_xs_equals_the_xs_ys_form_bit_for_bit(
    reverse, with_key, remat, remat_group
):
    key = jax.random.key(5) if with_key else None
    ys_form, in_place = run_both(
        key=key, reverse=reverse, remat=remat, remat_group=remat_group
    )
    assert_equal_bits(in_place, ys_form)
    assert_close(
        in_place,
        reference_loop(
            cache_block, INIT, make_layers(), xs=XS, key=key, reverse=reverse
        ),
    )


@pytest.mark.parametrize("remat_group", [None, 4, "sqrt"])
def test_update_xs_eager_and_unrolled(remat_group):
    ys_form, in_place = run_both(jit=False, remat_group=remat_group, unroll=2)
    assert_equal_bits(in_place, ys_form)


def test_update_xs_pytree_caches_with_static_leaves_keep_their_form():
    xs = {"k": XS, "v": -XS, "window": 3}

    def fn(carry, layer, x):
        assert x["window"] == 3
        h = carry + x["k"] * x["v"]
        return h, {"k": x["k"] + h, "v": x["v"] * 2.0, "window": 3}

    ys_form, (carry, cache) = run_both(xs=xs, fn=fn, jit=False)
    assert cache["window"] == 3
    assert_equal_bits((carry, cache), ys_form)


def test_update_xs_leaves_undonated_caches_alone():
    before = np.asarray(XS).copy()
    _, (_, cache) = run_both()
    np.testing.assert_array_equal(np.asarray(XS), before)
    assert not np.array_equal(np.asarray(cache), before)


def elementwise_block(carry, layer, x, *, key=None):
    h = jnp.tanh(carry * layer.w[0][None] + layer.b[None] * layer.scale + x)
    if key is not None:
        h = h + 0.1 * jax.random.normal(key, h.shape)
    return h, h * 0.5 + x


# Under `vmap`, a loop as tiny as width 4 may be compiled by XLA's CPU backend as a
# "small call" in one form and not the other, whose fused arithmetic then rounds
# differently by an ulp; from width 16 on, both forms compile alike.
@pytest.mark.parametrize("fn", [elementwise_block, cache_block])
@pytest.mark.parametrize(
    ("width", "options"),
    [(16, {}), (64, {}), (16, {"reverse": True}), (16, {"key": jax.random.key(3)})],
    ids=["16", "64", "16-reverse", "16-key"],
)
def test_update_xs_under_vmap(fn, width, options):
    rng = np.random.default_rng(width)
    inits = jnp.asarray(rng.normal(size=(3, 2, width)), jnp.float32)
    caches = jnp.asarray(rng.normal(size=(3, N, 2, width)), jnp.float32)
    layers = make_layers(width=width)

    def go(update_xs):
        def one(init, xs):
            return scan_layers(fn, init, layers, xs=xs, update_xs=update_xs, **options)

        return jax.jit(jax.vmap(one))(inits, caches)

    assert_equal_bits(go(True), go(False))


@pytest.mark.parametrize("remat_group", [None, 3])
def test_update_xs_under_grad(remat_group):
    params = make_layers()[:2]

    def loss(update_xs):
        def f(params, init, xs):
            layers = with_static(params)
            carry, cache = scan_layers(
                cache_block,
                init,
                layers,
                xs=xs,
                update_xs=update_xs,
                remat_group=remat_group,
            )
            return jnp.sum(carry**2) + jnp.sum(jnp.sin(cache))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(params, INIT, XS)

    assert_close(loss(True), loss(False))


def decode_step_memory(update_xs, n=16):
    """Temporary and aliased bytes of a jitted decode step with donated caches, and
    the caches' bytes."""
    b, t, d = 2, 64, 32
    layers = jnp.ones((n, d, d)) / d
    cache = {"k": jnp.zeros((n, b, t, d)), "v": jnp.zeros((n, b, t, d))}

    def attend(h, w, c, pos):
        q = h @ w
        k = jax.lax.dynamic_update_index_in_dim(c["k"], q, pos, 1)
        v = jax.lax.dynamic_update_index_in_dim(c["v"], -q, pos, 1)
        s = jax.nn.softmax(jnp.einsum("bd,btd->bt", q, k))
        return h + jnp.einsum("bt,btd->bd", s, v), {"k": k, "v": v}

    def step(layers, cache, h, pos):
        fn = functools.partial(lambda pos, h, w, c: attend(h, w, c, pos), pos)
        return scan_layers(fn, h, layers, xs=cache, update_xs=update_xs)

    compiled = (
        jax.jit(step, donate_argnums=1)
        .lower(layers, cache, jnp.ones((b, d)), 3)
        .compile()
    )
    memory = compiled.memory_analysis()
    size = sum(x.nbytes for x in jax.tree.leaves(cache))
    return memory.temp_size_in_bytes, memory.alias_size_in_bytes, size


def test_update_xs_with_donation_updates_the_caches_in_place():
    temp, alias, size = decode_step_memory(True)
    assert alias == size  # the updated caches are the donated buffers
    assert temp <= 0.2 * size  # no second copy of the caches
    temp_ys, _, _ = decode_step_memory(False)
    assert temp_ys >= size  # the xs/ys form holds a second copy


def test_update_xs_needs_xs():
    with pytest.raises(ValueError, match=r"`update_xs=True` needs `xs`"):
        scan_layers(cache_block, INIT, make_layers(), update_xs=True)
    with pytest.raises(TypeError, match=r"`update_xs` must be a bool, got str"):
        scan_layers(cache_block, INIT, make_layers(), xs=XS, update_xs="yes")


@pytest.mark.parametrize(
    ("y", "match"),
    [
        (
            lambda x: x[:1],
            r"`y` differs from its `x` at \['k'\]: shape \(1, 4\) != \(2, 4\)",
        ),
        (
            lambda x: x.astype(jnp.int32),
            r"`y` differs from its `x` at \['k'\]: dtype int32 != float32",
        ),
        (lambda x: (x, x), r"`y` has a different structure from its `x`"),
    ],
)
def test_update_xs_y_must_match_x(y, match):
    def fn(carry, layer, x):
        return carry, {"k": y(x["k"])}

    with pytest.raises(
        TypeError, match=r"with `update_xs=True`, `fn` must return"
    ) as e:
        jax.jit(
            lambda: scan_layers(fn, INIT, make_layers(), xs={"k": XS}, update_xs=True)
        )()
    assert e.match(match)
