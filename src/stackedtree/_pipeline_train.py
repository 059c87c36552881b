"""pipeline_value_and_grad: a pipelined training step with the loss inside (1F1B, GPipe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ._check import check_count
from ._leaf import fmt_shape, shape_of
from ._pipeline import _batch_size, _layout, check_pipeline
from ._pipeline_rows import _Io, _Rows, _Split
from ._scan import scan_layers
from ._stack import check_key
from ._tree import PyTree, merge_static, split_static

SCHEDULES = ("1f1b", "gpipe")


class _Order(NamedTuple):
    """Which work item each stage runs at each tick, forward and backward.

    Forward item `w` is round `r` of microbatch `m`; the microbatches go round the
    stages in groups of S (all of one group's rounds before the next group), so the
    last stage hands round `r` of microbatch `m` straight to stage 0 for round `r + 1`
    at the next tick: `w = g * R * S + r * S + j` for microbatch `m = g * S + j`. With
    R = 1 that is simply `w = m`. Stage `s` runs forward item `t - s` at tick `t`.

    In 1F1B, backward items run in the mirrored order (last round first), stage `s`
    running backward item `v` at tick `R * S - 1 + v + (S - 1 - s)`: the last stage
    starts a microbatch's backward at the tick its last forward reaches the loss.
    """

    repeats: int  # R
    stages: int  # S
    per_block: int  # L, layers per block
    microbatches: int  # M

    def item(self, w: jax.Array, backward: bool = False) -> tuple[Any, Any, Any]:
        """(round, microbatch, forward item) of forward item `w` or backward item `w`."""
        R, S = self.repeats, self.stages
        group, k = w // (R * S), w % (R * S)
        r = k // S if not backward else R - 1 - k // S
        return r, group * S + k % S, group * R * S + r * S + k % S

    @property
    def forward_ticks(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def ticks(self) -> int:
        """Ticks of the 1F1B step: the last backward item leaves stage 0."""
        R, S, M = self.repeats, self.stages, self.microbatches
        return R * M + R * S + S - 2

    @property
    def in_flight(self) -> int:
        """Stage inputs a 1F1B stage keeps: the longest wait, at stage 0's round 0."""
        R, S, M = self.repeats, self.stages, self.microbatches
        return max(1, min(R * M, 2 * R * S - 2))


def _stage_block(
    fn: Callable[..., tuple[PyTree, PyTree]],
    order: _Order,
    staged_static: PyTree,
    stage: jax.Array,
    key: jax.Array | None,
) -> Callable[..., PyTree]:
    """`block(params, r, x, m)`: round r's layers of this stage on microbatch m."""
    L = order.per_block

    def block(params: PyTree, r: jax.Array, x: PyTree, m: jax.Array) -> PyTree:
        layers = jax.tree.map(
            lambda p: jax.lax.dynamic_slice_in_dim(p, r * L, L, axis=0), params
        )

        def layer_fn(c: PyTree, layer: PyTree, k: Any = None) -> tuple[PyTree, Any]:
            layer = merge_static(layer, staged_static)
            out = fn(c, layer) if k is None else fn(c, layer, key=k)
            return out[0], None

        if key is None:
            return scan_layers(layer_fn, x, layers)[0]
        first = (r * order.stages + stage) * L  # the block's first layer
        keys = jax.vmap(
            lambda j: jax.random.fold_in(jax.random.fold_in(key, first + j), m)
        )(jnp.arange(L))
        return scan_layers(layer_fn, x, layers, xs=keys)[0]

    return block


def _varying(tree: Any, axis: str, stages: int) -> Any:
    return jax.lax.pcast(tree, axis, to="varying") if stages > 1 else tree


def _gpipe(
    order: _Order, block: Callable[..., PyTree], loss_fn: Callable[..., Any], **ctx: Any
) -> Callable[..., Any]:
    """The GPipe step: `jax.value_and_grad` of a forward pipeline with the loss at
    the last stage, which keeps every tick's activations for the backward pass."""
    R, S, M = order.repeats, order.stages, order.microbatches
    axis, stage, shift = ctx["axis"], ctx["stage"], ctx["shift"]

    def forward(params: PyTree, init: Any, head: Any, io: _Io) -> jax.Array:
        # Varying from here on, so that their gradients are summed over the stages
        # once, at the end, rather than at every tick.
        init, head = _varying((init, head), axis, S)

        def tick(carry: tuple[Any, jax.Array], t: jax.Array) -> tuple[Any, None]:
            msg, total = carry
            w = t - stage
            r, m, _ = order.item(jnp.clip(w, 0, R * M - 1))
            x_in = _select((stage == 0) & (r == 0), io.init_rows.take(init, m), msg)
            y = block(params, r, x_in, m)
            at_loss = (w >= 0) & (w < R * M) & (stage == S - 1) & (r == R - 1)
            targets = io.take_targets(m)  # outside the cond: it is a collective
            loss = jax.lax.cond(
                at_loss,
                lambda: jnp.asarray(loss_fn(y, targets, head), jnp.float32),
                lambda: _varying(jnp.zeros((), jnp.float32), axis, S),
            )
            if S > 1:
                y = jax.lax.ppermute(y, axis, shift)
            return (y, total + loss), None

        msg = _varying(io.one(), axis, S)
        zero = _varying(jnp.zeros((), jnp.float32), axis, S)
        (_, total), _ = jax.lax.scan(tick, (msg, zero), jnp.arange(order.forward_ticks))
        return (jax.lax.psum(total, axis) if S > 1 else total) / M

    def step(params: PyTree, io: _Io) -> tuple[Any, tuple[Any, Any, Any]]:
        grad = jax.value_and_grad(forward, argnums=(0, 1, 2))
        return grad(params, io.init, io.head, io)

    return step


def _zeros(tree: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, tree)


def _select(pred: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _backward(
    order: _Order,
    block: Callable[..., PyTree],
    loss_fn: Callable[..., Any],
    item: tuple[PyTree, _Io, Any, Any, Any, jax.Array],
    stage: jax.Array,
    axis: str,
) -> Any:
    """Gradients of backward item v, from its saved input x and cotangent ct.

    `item` is `(params, io, targets, x, ct, v)`, `targets` those of the item's
    microbatch. Returns the gradients of the stage's
    parameters, of x and of the head, and the loss (zero but at the loss); the
    last stage's last round runs the loss under the same `jax.vjp`.
    """
    params, io, targets, x, ct, v = item
    R, S, M = order.repeats, order.stages, order.microbatches
    r, m, _ = order.item(v, backward=True)
    zero = _varying(jnp.zeros((), jnp.float32), axis, S)

    def plain() -> Any:
        _, vjp = jax.vjp(lambda p, x: block(p, r, x, m), params, x)
        gp, gx = vjp(ct)
        return gp, gx, _zeros(io.head), zero

    def with_loss() -> Any:
        def f(p: PyTree, x: Any, h: Any) -> jax.Array:
            y = block(p, r, x, m)
            return jnp.asarray(loss_fn(y, targets, h), jnp.float32)

        loss, vjp = jax.vjp(f, params, x, io.head)
        return (*vjp(jnp.ones_like(loss) / M), loss)

    def idle() -> Any:
        return _zeros(params), _zeros(ct), _zeros(io.head), zero

    on = (v >= 0) & (v < R * M)
    branch = jnp.where(on, jnp.where((stage == S - 1) & (r == R - 1), 2, 1), 0)
    return jax.lax.switch(branch, (idle, plain, with_loss))


def _grad_init(
    order: _Order,
    io: _Io,
    g_init: Any,
    gx: Any,
    t: jax.Array,
    stage: jax.Array,
    axis: str,
) -> Any:
    """`g_init` with the gradient of stage 0's backward item at tick t written in,
    if that item is a first round: its gradient of `init`'s microbatch.

    Every stage writes the same rows (stage 0's `gx`, summed over the stages with
    the others' zeros), so `g_init` stays the same on every stage and is the step's
    result as it is, with no batch-sized sum over the stages at the end.
    """
    R, S, M = order.repeats, order.stages, order.microbatches
    v = t - (R * S - 1) - (S - 1)  # stage 0's backward item
    r, m, _ = order.item(jnp.clip(v, 0, R * M - 1), backward=True)
    first = (r == 0) & (v >= 0) & (v < R * M)
    rows = io.init_rows
    assert isinstance(rows, _Rows)  # 1F1B's view of the batch

    def write(g_init: Any, gx: Any) -> Any:
        if S > 1:
            gx = jax.tree.map(lambda g: jnp.where(stage == 0, g, jnp.zeros_like(g)), gx)
            gx = jax.lax.psum(gx, axis)
        return rows.put(g_init, m, gx, first)

    # `first` is the same on every device, so all take the same branch.
    return jax.lax.cond(first, write, lambda g_init, gx: g_init, g_init, gx)


def _one_f_one_b(
    order: _Order, block: Callable[..., PyTree], loss_fn: Callable[..., Any], **ctx: Any
) -> Callable[..., Any]:
    """The 1F1B step: at each tick a stage runs one forward and one backward item.

    A stage saves the input of each forward item in a ring of `order.in_flight`
    slots and, at the item's backward, recomputes the block from it under `jax.vjp`;
    the last stage runs the loss and its backward in the tick its forward ends.
    """
    R, S, M = order.repeats, order.stages, order.microbatches
    axis, stage, shift = ctx["axis"], ctx["stage"], ctx["shift"]
    back_shift = [(b, a) for a, b in shift]
    K = order.in_flight

    def tick(carry: Any, t: jax.Array) -> tuple[Any, None]:
        msg, ct, saved, acc = carry
        params, io = ctx["params"], ctx["io"]
        # Forward: item w, from the previous stage (or the carry, at stage 0).
        w = t - stage
        f_on = (w >= 0) & (w < R * M)
        r, m, _ = order.item(jnp.clip(w, 0, R * M - 1))
        x_in = _select((stage == 0) & (r == 0), io.take(m), msg)
        # The last stage's final round is run by its backward, in this same tick.
        skip = ~f_on | ((stage == S - 1) & (r == R - 1))
        y = jax.lax.cond(skip, lambda: x_in, lambda: block(params, r, x_in, m))
        # Backward: item v, from the saved input (or this tick's, at the loss).
        v = t - (R * S - 1) - (S - 1 - stage)
        rb, mb, wb = order.item(jnp.clip(v, 0, R * M - 1), backward=True)
        at_loss = (stage == S - 1) & (rb == R - 1)
        x_b = _select(at_loss, x_in, jax.tree.map(lambda s: s[wb % K], saved))
        item = (params, io, io.take_targets(mb), x_b, ct, v)
        gp, gx, gh, loss = _backward(order, block, loss_fn, item, stage, axis)
        slot = jnp.where(f_on, w, wb) % K  # idle ticks rewrite a slot unchanged
        keep = _select(f_on, x_in, jax.tree.map(lambda s: s[slot], saved))
        saved = jax.tree.map(lambda s, x: s.at[slot].set(x), saved, keep)
        g_params, g_init, g_head, total = acc
        acc = (
            jax.tree.map(jnp.add, g_params, gp),
            _grad_init(order, io, g_init, gx, t, stage, axis),
            jax.tree.map(jnp.add, g_head, gh),
            total + loss,
        )
        if S > 1:
            y = jax.lax.ppermute(y, axis, shift)
            gx = jax.lax.ppermute(gx, axis, back_shift)
        return (y, gx, saved, acc), None

    def step(params: PyTree, io: _Io) -> tuple[Any, tuple[Any, Any, Any]]:
        # The head varies from here on, so that its gradient is summed over the
        # stages once, at the end, not inside a stage's branch.
        io = io._replace(head=_varying(io.head, axis, S))
        ctx["params"], ctx["io"] = params, io
        one = io.one()
        saved = io.one(K)
        one, saved, total = _varying((one, saved, jnp.zeros(())), axis, S)
        # grad_init is the same on every stage (see _grad_init): the step's output.
        acc = (_zeros(params), _zeros(io.init), _zeros(io.head), total)
        carry = (one, one, saved, acc)
        final, _ = jax.lax.scan(tick, carry, jnp.arange(order.ticks))
        g_params, g_init, g_head, total = final[3]
        if S > 1:
            g_head, total = jax.lax.psum((g_head, total), axis)
        return total / M, (g_params, g_init, g_head)

    return step


def _check_schedule(schedule: Any, order: _Order) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(
            f"`schedule` {schedule!r} is not known; the schedules are "
            f"{', '.join(repr(s) for s in SCHEDULES)}."
        )
    R, S, M = order.repeats, order.stages, order.microbatches
    if R > 1 and M % S:
        raise ValueError(
            f"`microbatches` {M} is not a multiple of the {S} stages: with "
            f"`staged` of repeats={R} the circular order runs the microbatches round "
            f"the stages in groups of {S}, so `microbatches` must be a multiple of {S}."
        )


def _check_batches(tree: Any, arg: str, batch_axis: int, microbatches: int) -> int:
    batch = _batch_size(tree, batch_axis, arg)
    if batch % microbatches:
        raise ValueError(
            f"`microbatches` {microbatches} does not divide the batch size {batch} of "
            f"`{arg}` (axis {batch_axis})."
        )
    return batch


def _check_loss(
    loss_fn: Any, init: Any, targets: Any, head: Any, m: int, a: int
) -> None:
    """`loss_fn` on one microbatch, traced abstractly: it must give a float scalar."""

    def one(x: Any) -> jax.ShapeDtypeStruct:
        shape = list(shape_of(x))
        shape[a] //= m
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype)

    out = jax.eval_shape(
        loss_fn, jax.tree.map(one, init), jax.tree.map(one, targets), head
    )
    if not (
        isinstance(out, jax.ShapeDtypeStruct | jax.Array)
        and out.shape == ()
        and jnp.issubdtype(out.dtype, jnp.floating)
    ):
        got = (
            f"shape {fmt_shape(out.shape)} of {out.dtype}"
            if hasattr(out, "shape")
            else type(out).__name__
        )
        raise TypeError(
            "`loss_fn` must return a float scalar (the loss of one microbatch), "
            f"got {got}."
        )


def pipeline_value_and_grad(
    fn: Callable[..., tuple[PyTree, PyTree]],
    loss_fn: Callable[..., jax.Array],
    init: PyTree,
    staged: PyTree,
    targets: PyTree,
    /,
    *,
    head: PyTree = None,
    mesh: Mesh,
    axis: str = "stage",
    microbatches: int,
    schedule: str = "1f1b",
    key: jax.Array | None = None,
    batch_axis: int = 0,
) -> tuple[jax.Array, tuple[PyTree, PyTree, PyTree]]:
    """A pipelined training step with the loss inside the pipeline: loss and gradients.

    The layers run as in `pipeline_layers` (stage `s` holds only `staged[:, s]`, no
    parameter is gathered, the microbatches move with collective permutes), and the
    last stage computes `loss_fn(out_m, targets_m, head)` for each microbatch `m`, so
    the backward pass can start before the last microbatch's forward:

    - `schedule="1f1b"`: at each tick a stage runs one microbatch forward and another
      backward; the last stage starts a microbatch's backward in the tick its forward
      ends. A stage keeps only the inputs of the microbatches in flight (at most
      `2 * R * S - 2`, whatever M) and recomputes its layers' forward from them in the
      backward pass (about one extra forward). It reads each microbatch of `init` and
      `targets` from the batch where the data-parallel devices hold it and writes
      `grad_init`'s rows in place, so no memory of the step grows with
      `microbatches`.
    - `schedule="gpipe"`: all forwards, then all backwards (`jax.value_and_grad` of
      the forward pipeline), keeping every microbatch's activations as `jax.grad` of
      `pipeline_layers` does: no recompute, memory that grows with M.

    With `repeats > 1` (see `stage_layers`) the microbatches go round the stages in
    groups of S, each group running all its rounds before the next (the interleaved
    order); `microbatches` must then be a multiple of S. Both schedules take
    `R * M + S - 1` ticks of forward work per stage pipeline; the idle fraction (the
    bubble) is `(S - 1) / (R * M + S - 1)`.

    The result equals (with `scan_layers` and `unstage_layers` from this package):

    ```python
    def total(staged, init, head):
        losses = []
        for m in range(microbatches):  # rows [m * B / M, (m + 1) * B / M)
            init_m, targets_m = rows_of_microbatch(init, m), rows_of_microbatch(targets, m)
            keys = None if key is None else [  # layer i, microbatch m
                jax.random.fold_in(jax.random.fold_in(key, i), m) for i in range(N)]
            out = scan_layers(fn_with_keys(keys), init_m, unstage_layers(staged))[0]
            losses.append(loss_fn(out, targets_m, head))
        return jnp.mean(jnp.stack(losses))

    loss, (grad_staged, grad_init, grad_head) = jax.value_and_grad(
        total, argnums=(0, 1, 2))(staged, init, head)
    ```

    Args:
        fn: The layer function, `fn(carry, layer, *, key=...) -> (carry, y)`; `y` is
            discarded.
        loss_fn: `loss_fn(out, targets, head) -> scalar`, the loss of one microbatch
            (its final carry and its rows of `targets`).
        init: The carry entering the first layer (the embedded batch), a tree of
            float arrays sharing a batch axis `batch_axis` of length B.
        staged: The layers in the layout of `stage_layers`, best placed with
            `NamedSharding(mesh, PartitionSpec(None, axis))`.
        targets: The loss's targets, a tree of arrays with the batch on `batch_axis`.
        head: The loss's own parameters (final norm, output head), or None; passed to
            `loss_fn` as given.
        mesh: The device mesh; `mesh.shape[axis]` must equal S.
        axis: The mesh axis to pipeline over.
        microbatches: The number M of microbatches; must divide B.
        schedule: `"1f1b"` or `"gpipe"`.
        key: Optional PRNG key; microbatch `m` of layer `i` gets
            `fold_in(fold_in(key, i), m)` as the keyword argument `key=`.
        batch_axis: The batch axis of every leaf of `init` and `targets`.

    Returns:
        `(loss, (grad_staged, grad_init, grad_head))`: the mean microbatch loss and
        its gradients; `grad_staged` is split like `staged` (`P(None, axis)`),
        `grad_head` is None when `head` is None.

    Raises:
        TypeError: if `fn` or `loss_fn` is not callable, `loss_fn` does not return a
            float scalar, `mesh` is not a `Mesh`, or `key` is not a PRNG key.
        ValueError: if `schedule` is unknown, the stage count of `staged` differs
            from the mesh axis, `microbatches` does not divide the batch of `init` or
            `targets`, or `repeats > 1` and `microbatches` is not a multiple of S.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import AxisType
        >>> from stackedtree import pipeline_value_and_grad, stage_layers
        >>> mesh = jax.make_mesh((4,), ("stage",), axis_types=(AxisType.Auto,),
        ...                      devices=jax.devices()[:4])
        >>> layers = {"w": jnp.linspace(0.5, 1.5, 8)}
        >>> fn = lambda x, layer: (jnp.sin(x * layer["w"]) + x, None)
        >>> loss_fn = lambda out, y, head: jnp.mean((out * head - y) ** 2)
        >>> x, y = jnp.linspace(-1.0, 1.0, 8), jnp.ones(8)
        >>> loss, (g_layers, g_x, g_head) = pipeline_value_and_grad(
        ...     fn, loss_fn, x, stage_layers(layers, 4), y, head=jnp.float32(2.0),
        ...     mesh=mesh, microbatches=4)
        >>> g_layers["w"].shape, g_x.shape, g_head.shape
        ((1, 4, 2), (8,), ())
    """
    fn, (repeats, stages, per_block) = check_pipeline(
        fn, staged, mesh, axis, batch_axis, "pipeline_value_and_grad"
    )
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    microbatches = check_count(microbatches, "microbatches")
    order = _Order(repeats, stages, per_block, microbatches)
    _check_schedule(schedule, order)
    batch = _check_batches(init, "init", int(batch_axis), microbatches)
    target_batch = _check_batches(targets, "targets", int(batch_axis), microbatches)
    if key is not None:
        check_key(key)
    _check_loss(loss_fn, init, targets, head, microbatches, int(batch_axis))
    layouts = [_layout(mesh, axis, b // microbatches) for b in (batch, target_batch)]
    rows = [
        _Rows(lay, mesh, microbatches, int(batch_axis))
        if schedule == "1f1b"
        else _Split(lay, microbatches, int(batch_axis))
        for lay in layouts
    ]
    arrays, static = split_static(staged)
    run = _program(fn, loss_fn, order, schedule, static, rows, axis)
    args = (arrays, init, targets, head) + ((key,) if key is not None else ())
    staged_spec = PartitionSpec(None, axis) if stages > 1 else PartitionSpec()
    mapped = jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(staged_spec,) + (PartitionSpec(),) * (len(args) - 1),
        out_specs=(PartitionSpec(), (staged_spec, PartitionSpec(), PartitionSpec())),
        axis_names={axis},
    )
    loss, (g_staged, g_init, g_head) = jax.jit(mapped)(*args)
    return loss, (merge_static(g_staged, static), g_init, g_head)


def _program(
    fn: Callable[..., tuple[PyTree, PyTree]],
    loss_fn: Callable[..., jax.Array],
    order: _Order,
    schedule: str,
    staged_static: PyTree,
    rows: list[_Rows | _Split],
    axis: str,
) -> Callable[..., Any]:
    """The per-device program of the step, for `jax.shard_map` over `axis`.

    `rows` reads (and writes) the microbatches of `init` and of `targets`, which
    stay whole, their rows over the data-parallel axes.
    """
    R, S, L, _ = order
    init_rows, target_rows = rows

    def program(staged: PyTree, init: Any, targets: Any, head: Any, key: Any = None):
        params = jax.tree.map(lambda p: p.reshape((R * L, *p.shape[3:])), staged)
        stage = jax.lax.axis_index(axis) if S > 1 else jnp.int32(0)
        block = _stage_block(fn, order, staged_static, stage, key)
        make = _one_f_one_b if schedule == "1f1b" else _gpipe
        shift = [(s, (s + 1) % S) for s in range(S)]
        step = make(order, block, loss_fn, axis=axis, stage=stage, shift=shift)
        init, targets = init_rows.place(init), target_rows.place(targets)
        io = _Io(init, targets, head, init_rows, target_rows)
        loss, (g_params, g_init, g_head) = step(params, io)
        g_staged = jax.tree.map(
            lambda g, p: g.reshape(p.shape).astype(p.dtype), g_params, staged
        )
        return loss, (g_staged, init_rows.finish(g_init), g_head)

    return program
