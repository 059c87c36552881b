"""pipeline_value_and_grad against `jax.value_and_grad` of the mean microbatch loss.

A ('stage', 'data') mesh of 4 x 2 fake CPU devices (conftest.py); the reference runs
`scan_layers` over the unstaged stack for each microbatch (a vmap over microbatches,
each with its own keys), so loss and gradients are compared with plain JAX. The
memory facts (temporary bytes of the compiled step against the microbatch count, no
all-gather) are read from XLA's compiled step, not timed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import pytest
from fixtures import assert_close, layer_block, with_static
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from stackedtree import (
    pipeline_value_and_grad,
    scan_layers,
    stage_layers,
    unstage_layers,
)

S, N, D = 4, 8, 4  # stages, layers, width
ROWS = 2  # rows per microbatch
MESH = jax.make_mesh((S, 2), ("stage", "data"), axis_types=(AxisType.Auto,) * 2)


def params() -> tuple[jax.Array, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(0))
    return jax.random.normal(k1, (N, D, D)) / jnp.sqrt(D), jax.random.normal(k2, (N, D))


def tree_fn(carry: dict[str, jax.Array], layer: Any, *, key: Any = None) -> Any:
    """A pytree carry: `h` runs the layer, `z` keeps a decaying sum of it."""
    h, _ = layer_block(carry["h"], layer, key=key)
    return {"h": h, "z": 0.9 * carry["z"] + h}, None


def tree_loss(out: Any, targets: Any, head: dict[str, jax.Array]) -> jax.Array:
    pred = out["h"] * head["scale"][None, :] + head["bias"]
    return jnp.mean((pred - targets["y"]) ** 2) + 0.1 * jnp.mean(jnp.sin(out["z"]))


def array_loss(out: jax.Array, targets: jax.Array, head: None) -> jax.Array:
    """Weighs the rows by their place and squares the mean: the loss tells which rows
    make a microbatch, and in which order."""
    assert head is None
    place = jnp.arange(1, out.shape[0] + 1, dtype=out.dtype)[:, None]
    return jnp.mean(place * (out - targets) ** 2) + jnp.mean(out) ** 2


def batch(m: int, tree: bool) -> tuple[Any, Any, Any]:
    rows = m * ROWS
    x = jnp.sin(jnp.arange(rows * D, dtype=jnp.float32)).reshape(rows, D)
    y = jnp.cos(jnp.arange(rows * D, dtype=jnp.float32)).reshape(rows, D)
    x, y = jax.device_put((x, y), NamedSharding(MESH, P("data")))
    if not tree:
        return x, y, None
    head = {"scale": jnp.linspace(0.5, 1.5, D), "bias": jnp.float32(0.25)}
    return {"h": x, "z": -x}, {"y": y}, head


def reference(fn: Any, loss_fn: Any, m: int, key: Any) -> Any:
    """jax.value_and_grad of the mean over microbatches of loss_fn over scan_layers."""

    def total(staged: Any, init: Any, head: Any, targets: Any) -> jax.Array:
        layers = unstage_layers(with_static(staged))

        def split(t: Any) -> Any:
            return jax.tree.map(lambda x: x.reshape(m, -1, *x.shape[1:]), t)

        def one(init_m: Any, targets_m: Any, i: jax.Array) -> jax.Array:
            def layer(c: Any, p: Any, j: jax.Array) -> Any:
                if key is None:
                    return fn(c, p)
                return fn(c, p, key=jax.random.fold_in(jax.random.fold_in(key, j), i))

            out = scan_layers(layer, init_m, layers, xs=jnp.arange(N))[0]
            return loss_fn(out, targets_m, head)

        return jnp.mean(jax.vmap(one)(split(init), split(targets), jnp.arange(m)))

    return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))


def step(fn: Any, loss_fn: Any, m: int, key: Any, **options: Any) -> Any:
    def run(staged: Any, init: Any, head: Any, targets: Any) -> Any:
        return pipeline_value_and_grad(
            fn,
            loss_fn,
            init,
            with_static(staged),
            targets,
            head=head,
            mesh=MESH,
            microbatches=m,
            key=key,
            **options,
        )

    return jax.jit(run)


@pytest.mark.parametrize(
    ("schedule", "repeats", "m", "keyed", "tree"),
    [
        ("1f1b", 1, 4, False, True),
        ("1f1b", 1, 8, True, False),
        ("1f1b", 1, 16, False, False),
        ("1f1b", 2, 4, True, True),
        ("1f1b", 2, 8, False, False),
        ("1f1b", 2, 16, True, False),
        ("gpipe", 1, 8, True, True),
        ("gpipe", 2, 4, False, False),
    ],
)
def test_equals_value_and_grad_of_the_scan(
    schedule: str, repeats: int, m: int, keyed: bool, tree: bool
) -> None:
    key = jax.random.key(7) if keyed else None
    fn, loss_fn = (tree_fn, tree_loss) if tree else (layer_block, array_loss)
    init, targets, head = batch(m, tree)
    staged = jax.device_put(
        stage_layers(params(), S, repeats=repeats),
        NamedSharding(MESH, P(None, "stage")),
    )
    loss, grads = step(fn, loss_fn, m, key, schedule=schedule)(
        staged, init, head, targets
    )
    want_loss, want = reference(fn, loss_fn, m, key)(staged, init, head, targets)
    assert_close(loss, want_loss, rtol=0, atol=1e-5)
    assert_close(grads[0], with_static(want[0]), rtol=0, atol=1e-5)
    assert_close(grads[1:], want[1:], rtol=0, atol=1e-5)
    # Each device holds 1/S of the stack's gradient, split like the stack.
    g = grads[0].w
    assert g.sharding.is_equivalent_to(staged[0].sharding, g.ndim), g.sharding
    assert {s.data.nbytes for s in g.addressable_shards} == {g.nbytes // S}


@pytest.mark.parametrize("m", [2, 6])
def test_microbatches_across_the_data_devices(m: int) -> None:
    """Two data-parallel axes (4 devices) with Explicit types: with M = 2 each
    microbatch's rows lie on two devices' blocks, with M = 6 some straddle two."""
    mesh = jax.make_mesh(
        (2, 2, 2), ("stage", "a", "b"), axis_types=(AxisType.Explicit,) * 3
    )
    rows = m * 4
    x = jnp.sin(jnp.arange(rows * D, dtype=jnp.float32)).reshape(rows, D)
    y = jnp.cos(jnp.arange(rows * D, dtype=jnp.float32)).reshape(rows, D)
    init, targets = jax.device_put((x, y), NamedSharding(mesh, P(("a", "b"))))
    staged = jax.device_put(
        stage_layers(params(), 2), NamedSharding(mesh, P(None, "stage"))
    )

    def run(staged: Any, init: Any, targets: Any) -> Any:
        return pipeline_value_and_grad(
            layer_block, array_loss, init, with_static(staged), targets,
            mesh=mesh, microbatches=m,
        )  # fmt: skip

    loss, grads = jax.jit(run)(staged, init, targets)
    # The reference on unsharded copies (Explicit axes would shard its matmuls).
    plain = [jax.device_get(a) for a in (staged, x, y)]
    want_loss, want = reference(layer_block, array_loss, m, None)(
        plain[0], plain[1], None, plain[2]
    )
    assert_close(loss, want_loss, rtol=0, atol=1e-5)
    assert_close(grads[0], with_static(want[0]), rtol=0, atol=1e-5)
    assert_close(grads[1], want[1], rtol=0, atol=1e-5)


# --- memory: read from the compiled step -----------------------------------------------


WIDE, WIDE_ROWS = 32, 16  # activations large enough to dominate the parameters


def compiled(schedule: str, m: int) -> Any:
    """The compiled step for m microbatches of WIDE_ROWS rows (the batch grows with m)."""
    x = jnp.ones((m * WIDE_ROWS, WIDE))
    x = jax.device_put(x, NamedSharding(MESH, P("data")))
    layers = (jnp.ones((N, WIDE, WIDE)) / WIDE, jnp.ones((N, WIDE)))
    staged = jax.device_put(
        stage_layers(layers, S), NamedSharding(MESH, P(None, "stage"))
    )
    run = step(layer_block, array_loss, m, None, schedule=schedule)
    return run.lower(staged, x, None, x).compile()


def test_1f1b_memory_does_not_grow_with_the_microbatches() -> None:
    temp = {
        (s, m): compiled(s, m).memory_analysis().temp_size_in_bytes
        for s, m in [
            ("1f1b", 8),
            ("1f1b", 16),
            ("1f1b", 32),
            ("gpipe", 8),
            ("gpipe", 16),
        ]
    }
    # 1F1B reads and writes the batch one microbatch at a time, in place, and keeps
    # the inputs of the microbatches in flight: nothing it holds grows with M.
    growth = temp["1f1b", 32] - temp["1f1b", 8]
    assert abs(growth) <= 0.1 * temp["1f1b", 8], temp
    # GPipe keeps every microbatch's activations: it grows about linearly.
    gpipe_growth = temp["gpipe", 16] - temp["gpipe", 8]
    assert gpipe_growth >= 0.5 * temp["gpipe", 8], temp
    assert gpipe_growth >= 10 * abs(growth), temp
    assert temp["1f1b", 16] <= 0.4 * temp["gpipe", 16], temp


def test_no_parameter_is_gathered() -> None:
    hlo = compiled("1f1b", 4).as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo


# --- bad input ----------------------------------------------------------------------------


def run_with(**changes: Any) -> Any:
    init, targets, _ = batch(4, tree=False)
    args: dict[str, Any] = {
        "fn": layer_block,
        "loss_fn": array_loss,
        "init": init,
        "staged": with_static(stage_layers(params(), S, repeats=2)),
        "targets": targets,
        "mesh": MESH,
        "microbatches": 4,
    }
    args.update(changes)
    positional = [args.pop(k) for k in ("fn", "loss_fn", "init", "staged", "targets")]
    return pipeline_value_and_grad(*positional, **args)


def test_loss_must_be_a_scalar() -> None:
    with pytest.raises(
        TypeError, match=r"`loss_fn` must return a float scalar .*got shape \(2,\)"
    ):
        run_with(loss_fn=lambda out, t, h: jnp.mean(out, axis=1))
    with pytest.raises(TypeError, match=r"`loss_fn` must return a float scalar"):
        run_with(loss_fn=lambda out, t, h: jnp.int32(1))
    with pytest.raises(TypeError, match=r"`loss_fn` must be callable"):
        run_with(loss_fn=None)


def test_microbatches_must_divide_init_and_targets() -> None:
    with pytest.raises(
        ValueError,
        match=r"`microbatches` 3 does not divide the batch size 8 of `init` \(axis 0\)",
    ):
        run_with(microbatches=3, staged=with_static(stage_layers(params(), S)))
    with pytest.raises(
        ValueError,
        match=r"`microbatches` 4 does not divide the batch size 6 of `targets`",
    ):
        run_with(targets=jnp.zeros((6, D)))
    # A targets leaf without the batch axis, or with another batch size, is named.
    with pytest.raises(
        ValueError,
        match=r"`targets` cannot be split into microbatches:\n"
        r"  `targets` at \['t'\] has shape \(\), which has no axis 0 \(`batch_axis`\)\n"
        r"  `targets` at \['v'\] has batch size 8 \(axis 0\), but \['u'\] has 4",
    ):
        run_with(
            targets={"t": jnp.zeros(()), "u": jnp.zeros((4, D)), "v": jnp.zeros((8,))}
        )


def test_unknown_schedule() -> None:
    with pytest.raises(
        ValueError,
        match=r"`schedule` 'zb' is not known; the schedules are '1f1b', 'gpipe'",
    ):
        run_with(schedule="zb")


def test_stage_count_must_match_the_mesh() -> None:
    with pytest.raises(
        ValueError, match=r"`staged` has 2 stages, but mesh axis 'stage' has 4 devices"
    ):
        run_with(staged=with_static(stage_layers(params(), 2)))


def test_circular_order_needs_a_multiple_of_the_stages() -> None:
    init, targets, _ = batch(6, tree=False)
    with pytest.raises(
        ValueError,
        match=r"`microbatches` 6 is not a multiple of the 4 stages: with `staged` of "
        r"repeats=2 .* so `microbatches` must be a multiple of 4",
    ):
        run_with(init=init, targets=targets, microbatches=6)
