"""stage_layers, unstage_layers and pipeline_layers against scan_layers and the loop.

The pipeline runs on a ('stage', 'data') mesh of 4 x 2 fake CPU devices (conftest.py),
with the batch split over 'data'; GPipe (repeats=1) and circular (repeats=2) schedules
over the same 8 layers are compared with `scan_layers` over the unstaged stack, forward
and gradient, under `jit`.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import Layer, assert_close, layer_block, with_static
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from treegen import assert_bits_equal, make_layers, templates

from stackedtree import (
    get_layer,
    pipeline_layers,
    scan_layers,
    stack,
    stage_layers,
    unstage_layers,
)

S, N, B, D = 4, 8, 16, 4  # stages, layers, batch rows, width


def make_mesh(kind: AxisType = AxisType.Auto) -> jax.sharding.Mesh:
    return jax.make_mesh((S, 2), ("stage", "data"), axis_types=(kind, kind))


MESH = make_mesh()


def make_params() -> tuple[jax.Array, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(0))
    return jax.random.normal(k1, (N, D, D)) / jnp.sqrt(D), jax.random.normal(k2, (N, D))


INIT = jnp.sin(jnp.arange(B * D, dtype=jnp.float32)).reshape(B, D)


block = layer_block


def loss(out: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sin(out) ** 2)


def staged_on(
    mesh: jax.sharding.Mesh, params: tuple[jax.Array, jax.Array], repeats: int
) -> tuple[jax.Array, jax.Array]:
    staged = stage_layers(params, S, repeats=repeats)
    return jax.device_put(staged, NamedSharding(mesh, P(None, "stage")))


def batch_on(mesh: jax.sharding.Mesh, x: jax.Array) -> jax.Array:
    return jax.device_put(x, NamedSharding(mesh, P("data")))


def pipeline_step(
    mesh: jax.sharding.Mesh, microbatches: int, key: jax.Array | None, **options: Any
):
    """jit(value_and_grad) of the loss through the pipeline; the output comes as aux."""

    def run(staged: tuple[jax.Array, jax.Array], init: jax.Array):
        out = pipeline_layers(
            block,
            init,
            with_static(staged),
            mesh=mesh,
            microbatches=microbatches,
            key=key,
            **options,
        )
        return loss(out), out

    return jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True))


@functools.cache
def scan_reference(remat: Any) -> tuple[jax.Array, Any]:
    """`scan_layers` over the flat stack: output and gradients (params, init)."""

    def run(params: tuple[jax.Array, jax.Array], init: jax.Array):
        out, _ = scan_layers(block, init, with_static(params), remat=remat)
        return loss(out), out

    (_, out), grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True))(
        make_params(), INIT
    )
    return out, grads


def microbatch_loop(
    params: tuple[jax.Array, jax.Array], init: jax.Array, microbatches: int, key: Any
) -> jax.Array:
    """The reference loop of `pipeline_layers`' docstring, written out."""
    layers = with_static(params)
    rows = B // microbatches
    outs = []
    for m in range(microbatches):
        carry = init[m * rows : (m + 1) * rows]
        for i in range(N):
            kwargs = {}
            if key is not None:
                kwargs["key"] = jax.random.fold_in(jax.random.fold_in(key, i), m)
            carry, _ = block(carry, get_layer(layers, i), **kwargs)
        outs.append(carry)
    return jnp.concatenate(outs, axis=0)


def unstaged_grads(grads: Any) -> Any:
    return unstage_layers(grads[0]), grads[1]


# --- stage_layers / unstage_layers ----------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    templates,
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(0, 2**32 - 1),
)
def test_stage_unstage_round_trip(
    template: Any, repeats: int, stages: int, per_block: int, seed: int
) -> None:
    n = repeats * stages * per_block
    stacked = stack(make_layers(template, n, seed))
    staged = stage_layers(stacked, stages, repeats=repeats)
    assert_bits_equal(unstage_layers(staged), stacked)
    # The index rule, on every array leaf that holds data.
    for got, want in zip(
        jax.tree.leaves(staged), jax.tree.leaves(stacked), strict=True
    ):
        if isinstance(want, jax.ShapeDtypeStruct):
            assert got.shape == (repeats, stages, per_block, *want.shape[1:])
            continue
        if not hasattr(want, "shape"):
            assert got == want  # static leaves kept once
            continue
        assert type(got) is type(want)  # numpy stays numpy
        for r in range(repeats):
            for s in range(stages):
                for j in range(per_block):
                    i = (r * stages + s) * per_block + j
                    assert np.asarray(got[r, s, j]).tobytes() == (
                        np.asarray(want[i]).tobytes()
                    )


def test_stage_layers_index_rule_and_kinds() -> None:
    layers = {"w": np.arange(12), "act": "gelu"}
    staged = stage_layers(layers, 2, repeats=3)
    assert isinstance(staged["w"], np.ndarray)
    assert staged["act"] == "gelu"
    assert staged["w"].tolist() == [
        [[0, 1], [2, 3]],
        [[4, 5], [6, 7]],
        [[8, 9], [10, 11]],
    ]
    abstract = stage_layers({"w": jax.ShapeDtypeStruct((8, 3), jnp.bfloat16)}, 4)
    assert abstract["w"] == jax.ShapeDtypeStruct((1, 4, 2, 3), jnp.bfloat16)
    assert unstage_layers(abstract)["w"] == jax.ShapeDtypeStruct((8, 3), jnp.bfloat16)


def test_stage_layers_keeps_explicit_stage_sharding() -> None:
    mesh = make_mesh(AxisType.Explicit)
    flat = jax.device_put(make_params()[0], NamedSharding(mesh, P("stage")))
    staged = stage_layers({"w": flat}, S)["w"]
    assert staged.sharding.spec == P(None, "stage", None, None, None)
    back = unstage_layers({"w": staged})["w"]
    assert back.sharding.spec == P("stage", None, None)
    np.testing.assert_array_equal(back, make_params()[0])


def test_stage_layers_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"`stages` 4 x `repeats` 2 = 8 blocks do not divide the 12 layers of "
        r"`layers`",
    ):
        stage_layers({"w": np.zeros((12, 2))}, 4, repeats=2)
    with pytest.raises(TypeError, match=r"`stages` must be an int, got float"):
        stage_layers({"w": np.zeros((12, 2))}, 4.0)
    with pytest.raises(ValueError, match=r"`repeats` must be >= 1, got 0"):
        stage_layers({"w": np.zeros((12, 2))}, 4, repeats=0)
    with pytest.raises(
        ValueError,
        match=r"`layers` at \['b'\] has leading length 6, but \['a'\] has 12",
    ):
        stage_layers({"a": np.zeros(12), "b": np.zeros(6)}, 2)


def test_unstage_layers_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"`staged` at \['w'\] has shape \(8, 2\): a staged leaf needs three "
        r"leading axes",
    ):
        unstage_layers({"w": np.zeros((8, 2))})
    with pytest.raises(
        ValueError,
        match=r"`staged` at \['b'\] has leading axes \(1, 4, 3\), but \['a'\] has "
        r"\(1, 4, 2\)",
    ):
        unstage_layers({"a": np.zeros((1, 4, 2)), "b": np.zeros((1, 4, 3))})


# --- pipeline_layers equals scan_layers -------------------------------------------------


@pytest.mark.parametrize(
    ("repeats", "microbatches"),
    [(1, 2), (1, 4), (1, 8), (2, 4), (2, 8)],  # GPipe (M < S too) and circular
)
def test_equals_scan_layers(repeats: int, microbatches: int) -> None:
    step = pipeline_step(MESH, microbatches, None)
    (_, out), grads = step(
        staged_on(MESH, make_params(), repeats), batch_on(MESH, INIT)
    )
    want_out, want_grads = scan_reference(False)
    assert_close(out, want_out, atol=1e-6, scaled=True)
    assert_close(unstaged_grads(grads), want_grads, atol=1e-5, scaled=True)


@pytest.mark.parametrize("remat", [True, "dots_saveable"])
def test_equals_scan_layers_with_remat(remat: Any) -> None:
    step = pipeline_step(MESH, 4, None, remat=remat)
    (_, out), grads = step(staged_on(MESH, make_params(), 2), batch_on(MESH, INIT))
    want_out, want_grads = scan_reference(remat)
    assert_close(out, want_out, atol=1e-6, scaled=True)
    assert_close(unstaged_grads(grads), want_grads, atol=1e-5, scaled=True)


def test_keys_follow_the_microbatch_loop() -> None:
    key = jax.random.key(3)
    step = pipeline_step(MESH, 4, key, remat=True)
    (_, out), grads = step(staged_on(MESH, make_params(), 2), batch_on(MESH, INIT))

    def run(params: tuple[jax.Array, jax.Array], init: jax.Array):
        out = microbatch_loop(params, init, 4, key)
        return loss(out), out

    (_, want_out), want_grads = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(
        make_params(), INIT
    )
    assert_close(out, want_out, atol=1e-6, scaled=True)
    assert_close(unstaged_grads(grads), want_grads, atol=1e-5, scaled=True)


def test_raw_keys_follow_the_microbatch_loop() -> None:
    key = jax.random.PRNGKey(4)
    out = jax.jit(
        lambda p, x: pipeline_layers(
            block, x, with_static(p), mesh=MESH, microbatches=8, key=key
        )
    )(staged_on(MESH, make_params(), 1), batch_on(MESH, INIT))
    assert_close(
        out, microbatch_loop(make_params(), INIT, 8, key), atol=1e-6, scaled=True
    )


def test_each_microbatch_and_layer_gets_its_key() -> None:
    """The key rule itself: microbatch m of layer i sees fold_in(fold_in(key, i), m)."""
    key = jax.random.key(9)
    layers = {"i": jnp.arange(N, dtype=jnp.uint32)}

    def record(carry: jax.Array, layer: dict[str, jax.Array], *, key: jax.Array):
        # Each row of the carry accumulates, per layer, the first word of its key.
        word = jax.random.key_data(key)[..., -1]
        return carry.at[:, layer["i"]].set(word), None

    init = jnp.zeros((B, N), jnp.uint32)
    got = pipeline_layers(
        record,
        init,
        stage_layers(layers, S, repeats=2),
        mesh=MESH,
        microbatches=4,
        key=key,
    )
    for m in range(4):
        for i in range(N):
            want = jax.random.key_data(
                jax.random.fold_in(jax.random.fold_in(key, i), m)
            )[-1]
            assert (got[m * 4 : (m + 1) * 4, i] == want).all(), (m, i)


def test_tree_carry_with_batch_axis() -> None:
    """A carry of several leaves, batch on axis -2 (1); `y` outputs are discarded."""
    params = make_params()
    init = {"h": jnp.stack([INIT, -INIT]), "n": jnp.ones((3, B, 1))}

    def fn(carry: dict[str, jax.Array], layer: Layer):
        h = jnp.tanh(carry["h"] @ layer.w + layer.b[None, None, :]) * layer.scale
        h = h + carry["h"]
        return {"h": h, "n": carry["n"] + jnp.sum(h**2, axis=(0, 2))[None, :, None]}, h

    out = jax.jit(
        lambda p, x: pipeline_layers(
            fn, x, with_static(p), mesh=MESH, microbatches=4, batch_axis=-2
        )
    )(staged_on(MESH, params, 2), init)
    want, _ = scan_layers(fn, init, with_static(params))
    assert_close(out, want, atol=1e-6, scaled=True)


def test_one_stage() -> None:
    """A stage axis of size 1 runs every layer on every device: no pipeline at all."""
    mesh = jax.make_mesh((1, 8), ("stage", "data"), axis_types=(AxisType.Auto,) * 2)
    out = pipeline_layers(
        block,
        INIT,
        with_static(stage_layers(make_params(), 1, repeats=2)),
        mesh=mesh,
        microbatches=2,
    )
    assert_close(out, scan_reference(False)[0], atol=1e-6, scaled=True)


def test_explicit_mesh_axes() -> None:
    mesh = make_mesh(AxisType.Explicit)
    step = pipeline_step(mesh, 4, None)
    (_, out), grads = step(staged_on(mesh, make_params(), 2), batch_on(mesh, INIT))
    want_out, want_grads = scan_reference(False)
    assert_close(out, want_out, atol=1e-6, scaled=True)
    assert_close(unstaged_grads(grads), want_grads, atol=1e-5, scaled=True)


# --- no parameter is gathered ------------------------------------------------------------


COLLECTIVE = re.compile(
    r"= \S+ (collective-permute|all-gather|all-reduce|reduce-scatter|all-to-all)"
    r"(?:-start)?\("
)


def test_each_device_holds_and_uses_only_its_stage() -> None:
    staged = staged_on(MESH, make_params(), 2)
    w = staged[0]
    assert w.shape == (2, S, 1, D, D)
    for shard in w.addressable_shards:
        assert shard.data.nbytes == w.nbytes // S
        stage = shard.index[1].start
        np.testing.assert_array_equal(shard.data, w[:, stage : stage + 1])
    step = pipeline_step(MESH, 4, None)
    init = batch_on(MESH, INIT)
    compiled = step.lower(staged, init).compile()
    ops = COLLECTIVE.findall(compiled.as_text())
    assert "collective-permute" in ops
    assert "all-gather" not in ops, ops
    _, grads = compiled(staged, init)
    for g, p in zip(grads[0], staged, strict=True):
        assert g.sharding.is_equivalent_to(p.sharding, g.ndim), g.sharding
        for shard in g.addressable_shards:
            assert shard.data.nbytes == g.nbytes // S


def layer_ref(x: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
    return jnp.tanh(x @ p["w"]) + x, None


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_gradients_keep_a_split_within_the_stage(axis_type: AxisType) -> None:
    # FSDP inside each stage: w's columns split over a second axis, gathered per layer.
    mesh = jax.make_mesh((S, 2), ("stage", "fsdp"), axis_types=(axis_type,) * 2)
    params = {"w": jnp.arange(N * D * D, dtype=jnp.float32).reshape(N, D, D) / 100}
    shardings = {"w": NamedSharding(mesh, P(None, "stage", None, None, "fsdp"))}
    staged = jax.device_put(stage_layers(params, S), shardings)

    def layer(x: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
        w = p["w"]
        if axis_type == AxisType.Explicit:
            w = jax.sharding.reshard(w, P())
        return jnp.tanh(x @ w) + x, None

    def loss(staged: Any, x: jax.Array) -> jax.Array:
        return jnp.sum(pipeline_layers(layer, x, staged, mesh=mesh, microbatches=4))

    x = jax.device_put(INIT, NamedSharding(mesh, P("fsdp")))
    # Auto axes leave the gradients' sharding to the compiler: the guide's advice.
    out = shardings if axis_type == AxisType.Auto else None
    grads = jax.jit(jax.grad(loss), out_shardings=out)(staged, x)
    g = grads["w"]
    assert g.sharding.is_equivalent_to(staged["w"].sharding, g.ndim), g.sharding
    assert {s.data.nbytes for s in g.addressable_shards} == {g.nbytes // (2 * S)}
    want = jax.grad(lambda p, x: jnp.sum(scan_layers(layer_ref, x, p)[0]))(params, INIT)
    assert_close(unstage_layers(grads)["w"], want["w"], atol=1e-5, scaled=True)


# --- bad input ----------------------------------------------------------------------------


def run_with(**changes: Any) -> Any:
    args: dict[str, Any] = {
        "fn": block,
        "init": INIT,
        "staged": with_static(stage_layers(make_params(), S, repeats=2)),
        "mesh": MESH,
        "microbatches": 4,
    }
    args.update(changes)
    fn, init, staged = args.pop("fn"), args.pop("init"), args.pop("staged")
    return pipeline_layers(fn, init, staged, **args)


def test_microbatches_must_divide_the_batch() -> None:
    with pytest.raises(
        ValueError,
        match=r"`microbatches` 3 does not divide the batch size 16 of `init` \(axis 0\)",
    ):
        run_with(microbatches=3)
    with pytest.raises(TypeError, match=r"`microbatches` must be an int, got float"):
        run_with(microbatches=4.0)


def test_circular_needs_a_microbatch_per_stage() -> None:
    with pytest.raises(
        ValueError,
        match=r"`microbatches` 2 is fewer than the 4 stages: a circular pipeline "
        r"\(`staged` has repeats=2\)",
    ):
        run_with(microbatches=2)


def test_mesh_without_the_axis() -> None:
    with pytest.raises(
        ValueError,
        match=r"`mesh` has no axis 'pipe' \(`axis`\); its axes are 'stage', "
        r"'data'",
    ):
        run_with(axis="pipe")
    with pytest.raises(TypeError, match=r"`mesh` must be a `jax.sharding.Mesh`"):
        run_with(mesh=None)


def test_staged_for_another_mesh_size() -> None:
    staged = with_static(stage_layers(make_params(), 2))
    with pytest.raises(
        ValueError,
        match=r"`staged` has 2 stages, but mesh axis 'stage' has 4 devices; restage "
        r"the layers with `stage_layers\(unstage_layers\(staged\), 4, repeats=...\)`",
    ):
        run_with(staged=staged)
    with pytest.raises(ValueError, match=r"a staged leaf needs three leading axes"):
        run_with(staged=with_static(make_params()))


def test_bad_carry() -> None:
    with pytest.raises(
        ValueError,
        match=r"`init` at \[1\] has batch size 8 \(axis 0\), but \[0\] has 16",
    ):
        run_with(init=(INIT, INIT[:8]))
    with pytest.raises(
        ValueError, match=r"`init` at \[1\] has shape \(\), which has no axis 0"
    ):
        run_with(init=(INIT, jnp.float32(1)))
    with pytest.raises(TypeError, match=r"`init` at \[1\] is a float: every leaf"):
        run_with(init=(INIT, 1.0))


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"`remat` 'dots' is not a known checkpoint"):
        run_with(remat="dots")
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key"):
        run_with(key=3)
    with pytest.raises(TypeError, match=r"`fn` must be callable"):
        run_with(fn=None)
