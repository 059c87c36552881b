"""stage_layers, unstage_layers and pipeline_layers: a pipeline over the layer axis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, Mesh, PartitionSpec

from ._check import check_count, count_layers, fail, leading_shapes, num_layers_of
from ._leaf import fmt_shape, is_array, shape_of
from ._nnx import forbid_layer_state
from ._scan import Remat, resolve_remat, scan_layers
from ._sharding import entry_names
from ._stack import check_key
from ._tree import (
    PyTree,
    flatten,
    map_arrays,
    merge_static,
    path_str,
    split_static,
    where,
)


def _reshaped(x: Any, shape: tuple[int, ...], lead: int) -> Any:
    """`x` reshaped to `shape`, which regroups the first `lead` axes of `x`.

    With explicit sharding (`AxisType.Explicit`), JAX wants the sharding of a reshape's
    result spelled out: the regrouped axes keep their mesh axes, on the stage axis
    when staging and on the layer axis when unstaging.
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(shape, x.dtype)
    if not isinstance(x, jax.Array):
        return x.reshape(shape)
    sharding = jax.typeof(x).sharding
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    mesh_axes = tuple(
        a for entry in spec[:lead] if entry is not None for a in entry_names(entry)
    )
    if not mesh_axes:
        return x.reshape(shape)
    new_lead = len(shape) - (x.ndim - lead)
    head: list[Any] = [None] * new_lead
    head[1 if new_lead == 3 else 0] = mesh_axes
    out = sharding.update(spec=PartitionSpec(*head, *spec[lead:]))
    return jax.lax.reshape(x, shape, out_sharding=out)


def stage_layers(layers: PyTree, stages: int, /, *, repeats: int = 1) -> PyTree:
    """Splits the layer axis `(N, ...)` into `(repeats, stages, N // (repeats * stages), ...)`.

    `staged[r, s, j]` is layer `(r * stages + s) * (N // (repeats * stages)) + j`: the
    layers are cut into `repeats * stages` blocks of consecutive layers, and pipeline
    stage `s` holds blocks `s, stages + s, 2 * stages + s, ...`. This is the layout
    `pipeline_layers` takes; with `repeats=1` stage `s` holds the `s`-th quarter (for
    four stages) of the stack. Numpy leaves stay numpy (a view), `ShapeDtypeStruct`s
    stay abstract and static leaves are kept.

    Args:
        layers: A stacked tree of N layers.
        stages: The number of pipeline stages S (the size of the mesh axis the layers
            will be split over).
        repeats: The number of times R the carry goes round the stages (1 for a GPipe
            schedule, more for a circular one).

    Returns:
        The staged tree, array leaves of shape `(R, S, N // (R * S), ...)`.

    Raises:
        TypeError: if `stages` or `repeats` is not an int.
        ValueError: if `stages * repeats` does not divide N, or `layers` is not a
            valid stack.

    Examples:
        >>> import numpy as np
        >>> from stackedtree import stage_layers
        >>> staged = stage_layers({"w": np.arange(8)}, 2, repeats=2)
        >>> staged["w"].shape
        (2, 2, 2)
        >>> staged["w"][1, 0].tolist()  # repeat 1, stage 0: the third block of two
        [4, 5]
    """
    stages = check_count(stages, "stages")
    repeats = check_count(repeats, "repeats")
    n = num_layers_of(layers, "layers")
    if n % (stages * repeats):
        raise ValueError(
            f"`stages` {stages} x `repeats` {repeats} = {stages * repeats} blocks do "
            f"not divide the {n} layers of `layers`; the number of layers must be a "
            "multiple of stages x repeats."
        )
    per_block = n // (stages * repeats)
    return map_arrays(
        lambda x: _reshaped(x, (repeats, stages, per_block, *shape_of(x)[1:]), 1),
        layers,
    )


def staged_dims(staged: PyTree, arg: str) -> tuple[int, int, int]:
    """The common leading axes `(R, S, L)` of a staged tree; errors name `arg`."""
    leading, problems = count_layers(
        leading_shapes(staged, arg),
        axes=3,
        kind="staged",
        hint="repeats, stages, layers per stage; build it with `stage_layers`",
    )
    if problems:
        fail(problems, title=f"`{arg}` is not a staged stack")
    if leading is None:
        raise ValueError(f"`{arg}` has no array leaves, so it has no layer axes.")
    r, s, per_block = leading
    return r, s, per_block


def unstage_layers(staged: PyTree, /) -> PyTree:
    """The inverse of `stage_layers`: `(R, S, L, ...)` back to the flat `(R * S * L, ...)`.

    Args:
        staged: A tree whose array leaves share their three leading lengths.

    Returns:
        The flat stacked tree, with layer `(r * S + s) * L + j` taken from
        `staged[r, s, j]`.

    Raises:
        ValueError: if an array leaf has fewer than three axes or the leading lengths
            disagree (every such leaf is listed).

    Examples:
        >>> import numpy as np
        >>> from stackedtree import stage_layers, unstage_layers
        >>> flat = {"w": np.arange(12).reshape(6, 2)}
        >>> back = unstage_layers(stage_layers(flat, 3))
        >>> back["w"].shape, bool((back["w"] == flat["w"]).all())
        ((6, 2), True)
    """
    r, s, per_block = staged_dims(staged, "staged")
    return map_arrays(
        lambda x: _reshaped(x, (r * s * per_block, *shape_of(x)[3:]), 3), staged
    )


def _batch_size(tree: PyTree, batch_axis: int, arg: str = "init") -> int:
    """The common length B of the leaves of `tree` (argument `arg`: the carry, or the
    targets) along `batch_axis`."""
    flat = flatten(tree)[0]
    if not flat:
        raise ValueError(f"`{arg}` has no array leaves: it needs a batch axis.")
    errors = []
    sizes: list[tuple[Any, int]] = []
    for path, x in flat:
        if not is_array(x):
            raise TypeError(
                f"{where(arg, path)} is a {type(x).__name__}: every leaf of "
                f"`{arg}` in a pipeline must be an array with a batch axis, since it "
                "is split into microbatches."
            )
        shape = shape_of(x)
        if not -len(shape) <= batch_axis < len(shape):
            errors.append(
                f"{where(arg, path)} has shape {fmt_shape(shape)}, which has no "
                f"axis {batch_axis} (`batch_axis`)"
            )
        else:
            sizes.append((path, shape[batch_axis]))
    for path, size in sizes[1:]:
        if size != sizes[0][1]:
            errors.append(
                f"{where(arg, path)} has batch size {size} (axis {batch_axis}), but "
                f"{path_str(sizes[0][0])} has {sizes[0][1]}"
            )
    if errors:
        fail(errors, title=f"`{arg}` cannot be split into microbatches")
    return sizes[0][1]


def check_pipeline(
    fn: Callable[..., Any],
    staged: PyTree,
    mesh: Any,
    axis: Any,
    batch_axis: Any,
    where: str,
) -> tuple[Callable[..., Any], tuple[int, int, int]]:
    """The arguments every pipeline checks alike: `fn` (wrapped so that a layer
    writing NNX state is refused), `staged`'s dimensions against `mesh` and `axis`,
    and `batch_axis`. Returns `fn` and `(repeats, stages, per_block)`."""
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
    fn = forbid_layer_state(fn, staged, name="fn", where=where)
    dims = staged_dims(staged, "staged")
    _check_mesh(mesh, axis, dims[1])
    if isinstance(batch_axis, bool) or not isinstance(batch_axis, int | np.integer):
        raise TypeError(
            f"`batch_axis` must be an int, got {type(batch_axis).__name__}."
        )
    return fn, dims


def _check_mesh(mesh: Any, axis: Any, stages: int) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`mesh` must be a `jax.sharding.Mesh`, got {type(mesh).__name__}."
        )
    if axis not in mesh.shape:
        raise ValueError(
            f"`mesh` has no axis {axis!r} (`axis`); its axes are "
            f"{', '.join(repr(a) for a in mesh.axis_names)}."
        )
    if mesh.shape[axis] != stages:
        raise ValueError(
            f"`staged` has {stages} stages, but mesh axis {axis!r} has "
            f"{mesh.shape[axis]} devices; restage the layers with "
            f"`stage_layers(unstage_layers(staged), {mesh.shape[axis]}, repeats=...)`."
        )


class _Layout(NamedTuple):
    """Where the data-parallel mesh axes go on the carry's leaves inside the pipeline."""

    mesh_axes: tuple[Any, ...]  # the axes that split a microbatch's rows
    explicit: bool  # they are `AxisType.Explicit`: sharding is part of the types

    def spec(self, ndim: int, axis: int) -> PartitionSpec:
        spec: list[Any] = [None] * ndim
        spec[axis] = self.mesh_axes
        return PartitionSpec(*spec)

    def spread(self, x: jax.Array, axis: int) -> jax.Array:
        """Shards dimension `axis` of `x` over the data-parallel axes."""
        if not self.mesh_axes:
            return x
        spec = self.spec(x.ndim, axis)
        if self.explicit:
            return jax.sharding.reshard(x, spec)
        return jax.lax.with_sharding_constraint(x, spec)

    def reshape(self, x: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
        """`x.reshape(shape)`, sharded over the data-parallel axes at `axis`."""
        if self.mesh_axes and self.explicit:
            return jax.lax.reshape(x, shape, out_sharding=self.spec(len(shape), axis))
        return self.spread(x.reshape(shape), axis)

    def split(self, x: jax.Array, axis: int, count: int) -> jax.Array:
        """`(..., B, ...)` -> `(count, ..., B / count, ...)`: m is rows [m*b, (m+1)*b)."""
        shape = x.shape
        x = self.reshape(
            x,
            (*shape[:axis], count, shape[axis] // count, *shape[axis + 1 :]),
            axis + 1,
        )
        return self.spread(jnp.moveaxis(x, axis, 0), axis + 1)

    def merge(self, x: jax.Array, axis: int) -> jax.Array:
        """The inverse of `split`."""
        x = jnp.moveaxis(x, 0, axis)
        shape = x.shape
        new = (*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2 :])
        return self.reshape(x, new, axis)


def _layout(mesh: Mesh, axis: Any, rows: int) -> _Layout:
    """The mesh axes other than `axis` that split each microbatch's `rows` (data parallel).

    In mesh order, each axis of size > 1 whose size, times the axes already taken,
    divides `rows`.
    """
    taken: list[Any] = []
    size = 1
    for name in mesh.axis_names:
        n = mesh.shape[name]
        if name != axis and n > 1 and rows % (size * n) == 0:
            taken.append(name)
            size *= n
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    return _Layout(tuple(taken), any(types[a] == AxisType.Explicit for a in taken))


_LAYER_IN = "stackedtree.pipeline.layer_in"  # the carry entering a layer


def _block_policy(
    remat: Remat, param_shapes: set[tuple[int, ...]]
) -> Callable[..., Any]:
    """The checkpoint policy of a block: `remat` per layer; parameters never saved.

    A `jax.checkpoint` inside another follows the outer one's policy, so `remat` is
    applied here rather than by `scan_layers`: with remat, the carries entering the
    layers (named `_LAYER_IN`) are saved and what `remat` saves. A layer's parameters,
    gathered from the stage's parameters (of shapes `param_shapes`) at every step, are
    gathered again in the backward pass rather than saved once per step.
    """
    checkpoint, saveable = resolve_remat(remat)

    def policy(prim: Any, *args: Any, **params: Any) -> Any:
        if getattr(prim, "name", None) == "gather" and (
            tuple(args[0].shape) in param_shapes
        ):
            return False
        name = params.get("name") if getattr(prim, "name", None) == "name" else None
        if name == _LAYER_IN or not checkpoint:
            return True
        return False if saveable is None else saveable(prim, *args, **params)

    return policy


def _turn(x: jax.Array) -> jax.Array:
    """Moves the first entry of the leading axis to the end."""
    return jnp.concatenate([x[1:], x[:1]])


def pipeline_layers(
    fn: Callable[..., tuple[PyTree, PyTree]],
    init: PyTree,
    staged: PyTree,
    /,
    *,
    mesh: Mesh,
    axis: str = "stage",
    microbatches: int,
    key: jax.Array | None = None,
    remat: Remat = False,
    batch_axis: int = 0,
) -> PyTree:
    """Runs a stack of layers as a pipeline over the devices of mesh axis `axis`.

    Stage `s` (the `s`-th device along `axis`) holds only its own layers, `staged[:, s]`;
    no parameter is gathered. The carry is split into `microbatches` along `batch_axis`
    and the microbatches move from stage to stage with collective permutes
    (`jax.lax.ppermute` inside `jax.shard_map`, manual over `axis` only: the other mesh
    axes stay automatic). Inside a stage the layers run with `scan_layers`.

    With `repeats == 1` (see `stage_layers`) this is a GPipe schedule. With
    `repeats > 1` it is circular: the carry goes round the stages `repeats` times,
    stage `s` running layer blocks `s, S + s, 2S + s, ...`, which cuts the idle
    fraction of the pipeline (its bubble) from `(S - 1) / (M + S - 1)` to
    `(S - 1) / (R * M + S - 1)` for the same number of layers per device.

    For a `fn` that treats the rows of the batch independently, the result equals
    `scan_layers(fn, init, unstage_layers(staged), remat=remat)[0]`, and in general it
    equals this loop (with `get_layer` and `unstage_layers` from this package):

    ```python
    layers = unstage_layers(staged)  # N layers
    outs = []
    for m in range(microbatches):  # microbatch m: rows [m * B / M, (m + 1) * B / M)
        carry = jax.tree.map(lambda x: rows_of_microbatch(x, m), init)
        for i in range(N):
            kwargs = {}
            if key is not None:
                kwargs["key"] = jax.random.fold_in(jax.random.fold_in(key, i), m)
            carry, _ = fn(carry, get_layer(layers, i), **kwargs)
        outs.append(carry)
    return jax.tree.map(lambda *x: jnp.concatenate(x, batch_axis), *outs)
    ```

    The rows of each microbatch are split over the mesh's other axes (data
    parallelism: for a `('stage', 'data')` mesh, over `'data'`), as far as their sizes
    divide the microbatch size; moving the carry into that layout and back costs one
    all-to-all each way. Give those axes `AxisType.Auto`: with `AxisType.Explicit`
    ones the result is the same, but JAX then gathers the carry and the activations
    saved for the backward pass over them where the pipeline starts and ends.

    Args:
        fn: The layer function, `fn(carry, layer, *, key=...) -> (carry, y)`, called as
            in `scan_layers` with one microbatch of the carry. `y` is discarded (a
            pipeline returns no per-layer outputs).
        init: The carry, a tree of arrays sharing a batch axis `batch_axis` of length B.
        staged: The layers in the layout of `stage_layers`: array leaves of shape
            `(R, S, L, ...)`, best placed with
            `NamedSharding(mesh, PartitionSpec(None, axis))` so each device already
            holds its stage.
        mesh: The device mesh; `mesh.shape[axis]` must equal S.
        axis: The mesh axis to pipeline over.
        microbatches: The number M of microbatches; must divide B, and be at least S
            when R > 1.
        key: Optional PRNG key (typed or raw); microbatch `m` of layer `i` gets
            `fold_in(fold_in(key, i), m)` as the keyword argument `key=`.
        remat: As in `scan_layers`, per layer.
        batch_axis: The axis of every carry leaf that holds the batch.

    Returns:
        The final carry, with the shapes of `init`.

    Raises:
        TypeError: if `fn` is not callable, `mesh` is not a `Mesh`, a carry leaf is
            not an array, `microbatches` is not an int, `key` is not a PRNG key or
            `remat` has the wrong type.
        ValueError: if `mesh` has no axis `axis`, the stage count of `staged` differs
            from its size, `staged` is not staged, the carry leaves disagree on the
            batch size, `microbatches` does not divide it, `repeats > 1` with fewer
            microbatches than stages, or `remat` names an unknown policy.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import AxisType
        >>> from stackedtree import pipeline_layers, scan_layers, stage_layers
        >>> mesh = jax.make_mesh((4,), ("stage",), axis_types=(AxisType.Auto,),
        ...                      devices=jax.devices()[:4])
        >>> layers = {"w": jnp.linspace(0.5, 1.5, 8)}
        >>> fn = lambda x, layer: (jnp.sin(x * layer["w"]) + x, None)
        >>> x = jnp.linspace(-1.0, 1.0, 6)
        >>> out = pipeline_layers(fn, x, stage_layers(layers, 4), mesh=mesh,
        ...                       microbatches=3)
        >>> bool(jnp.allclose(out, scan_layers(fn, x, layers)[0]))
        True
    """
    fn, (repeats, stages, per_block) = check_pipeline(
        fn, staged, mesh, axis, batch_axis, "pipeline_layers"
    )
    batch = _batch_size(init, int(batch_axis))
    microbatches = check_count(microbatches, "microbatches")
    if batch % microbatches:
        raise ValueError(
            f"`microbatches` {microbatches} does not divide the batch size {batch} of "
            f"`init` (axis {batch_axis})."
        )
    if repeats > 1 and microbatches < stages:
        raise ValueError(
            f"`microbatches` {microbatches} is fewer than the {stages} stages: a "
            f"circular pipeline (`staged` has repeats={repeats}) needs at least one "
            "microbatch per stage, so that a microbatch's next round starts after its "
            "previous round has left the last stage."
        )
    if key is not None:
        check_key(key)
    resolve_remat(remat)  # bad options fail here, before anything is traced

    flat_init, init_def = jax.tree.flatten(init)
    schedule = _Schedule(repeats, stages, per_block, microbatches)
    run = _pipeline(
        fn,
        schedule,
        staged_static=split_static(staged)[1],
        batch_axes=[int(batch_axis) % np.ndim(x) for x in flat_init],
        layout=_layout(mesh, axis, batch // microbatches),
        axis=axis,
        remat=remat,
        init_def=init_def,
    )
    args = (split_static(staged)[0], flat_init) + ((key,) if key is not None else ())
    # With one stage there is nothing to pipeline: every device runs all layers.
    staged_spec = PartitionSpec(None, axis) if stages > 1 else PartitionSpec()
    specs = (staged_spec, PartitionSpec(), PartitionSpec())
    mapped = jax.shard_map(
        run,
        mesh=mesh,
        in_specs=specs[: len(args)],
        out_specs=PartitionSpec(),
        axis_names={axis},
    )
    return jax.tree.unflatten(init_def, jax.jit(mapped)(*args))


class _Schedule(NamedTuple):
    """Which work each stage does at each step of the pipeline.

    Work item `w = r * M + m` is round `r` of microbatch `m`. Stage `s` runs item
    `t - s` at step `t` (when it is in `[0, R * M)`), applying its block of round `r`,
    so an item moves one stage per step; the last stage hands round `r` of microbatch
    `m` back to stage 0, which starts round `r + 1` of it at step `w + M`, no earlier
    than it arrives when M >= S. That makes `R * M + S - 1` steps in all.
    """

    repeats: int  # R
    stages: int  # S
    per_block: int  # L, layers per block
    microbatches: int  # M

    @property
    def steps(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1


def _block_runner(
    fn: Callable[..., tuple[PyTree, PyTree]],
    params: PyTree,
    staged_static: PyTree,
    remat: Remat,
    L: int,
    S: int,
    key: jax.Array | None,
    stage: jax.Array,
) -> Callable[[jax.Array, PyTree, jax.Array], PyTree]:
    """`run_block(r, carry, m)`: round r's block of this stage's layers on microbatch m.

    `params` are the stage's layers, round r's block in rows `[r * L, (r + 1) * L)`.
    """
    policy = _block_policy(remat, {p.shape for p in jax.tree.leaves(params)})

    def layer_fn(
        carry: PyTree, row: jax.Array, key: jax.Array | None = None
    ) -> tuple[PyTree, PyTree]:
        carry = jax.tree.map(lambda c: checkpoint_name(c, _LAYER_IN), carry)
        layer = jax.tree.map(lambda p: jnp.take(p, row, axis=0, mode="clip"), params)
        layer = merge_static(layer, staged_static)
        return fn(carry, layer) if key is None else fn(carry, layer, key=key)

    def block(r: jax.Array, carry: PyTree, m: jax.Array) -> PyTree:
        """Round r's block of this stage's layers, on microbatch m."""
        rows = r * L + jnp.arange(L)
        if key is None:
            return scan_layers(layer_fn, carry, rows)[0]
        first = (r * S + stage) * L  # the index of the block's first layer
        keys = jax.vmap(
            lambda j: jax.random.fold_in(jax.random.fold_in(key, first + j), m)
        )(jnp.arange(L))
        return scan_layers(layer_fn, carry, rows, xs=keys)[0]

    # Without this checkpoint the backward pass would keep the parameters of every
    # layer run at every step: one copy of the stage's parameters per step.
    run_block = jax.checkpoint(block, policy=policy, prevent_cse=False)
    return run_block


def _pipeline(
    fn: Callable[..., tuple[PyTree, PyTree]],
    schedule: _Schedule,
    *,
    staged_static: PyTree,
    batch_axes: list[int],
    layout: _Layout,
    axis: str,
    remat: Remat,
    init_def: Any,
) -> Callable[..., list[jax.Array]]:
    """The per-device program of the pipeline, for `jax.shard_map` over `axis`."""
    R, S, L, M = schedule  # the names of the docs
    shift = [(s, (s + 1) % S) for s in range(S)]

    def program(
        params: PyTree, init: list[jax.Array], key: jax.Array | None = None
    ) -> list[jax.Array]:
        # This stage's layers, round r's block in rows [r * L, (r + 1) * L).
        params = jax.tree.map(lambda p: p.reshape((R * L, *p.shape[3:])), params)
        stage = jax.lax.axis_index(axis) if S > 1 else jnp.int32(0)
        # Stage 0's queue of microbatches: at step t, position k holds microbatch
        # (t + k) % M (its input, or its result of the previous round), and the queue
        # turns by one each step. Fixed positions keep the reads and writes static.
        queue = [
            layout.split(layout.spread(x, a), a, M)
            for x, a in zip(init, batch_axes, strict=True)
        ]
        # Steps outside the schedule (filling and draining) compute on a real
        # microbatch and are thrown away, so no NaN from garbage reaches a gradient.
        idle = [q[0] for q in queue]
        state = idle
        if S > 1:  # what moves between stages differs from stage to stage
            state = jax.lax.pcast(state, axis, to="varying")
            queue = jax.lax.pcast(queue, axis, to="varying")
        # The item arriving from the last stage at step t is t - (S - 1): its slot.
        home = (1 - S) % M

        run_block = _block_runner(fn, params, staged_static, remat, L, S, key, stage)

        def step(
            carry: tuple[list[jax.Array], list[jax.Array]], t: jax.Array
        ) -> tuple[tuple[list[jax.Array], list[jax.Array]], None]:
            state, queue = carry
            item = t - stage
            active = (item >= 0) & (item < R * M)
            r = jnp.clip(item // M, 0, R - 1)
            x = [
                layout.spread(jnp.where(active, jnp.where(stage == 0, q[0], h), i), a)
                for q, h, i, a in zip(queue, state, idle, batch_axes, strict=True)
            ]
            y = run_block(r, jax.tree.unflatten(init_def, x), item % M)
            state = jax.tree.leaves(y)
            if S > 1:
                state = jax.lax.ppermute(state, axis, shift)
            arrived = t >= S - 1
            queue = [
                layout.spread(
                    _turn(q.at[home].set(jnp.where(arrived, h, q[home]))), a + 1
                )
                for q, h, a in zip(queue, state, batch_axes, strict=True)
            ]
            return (state, queue), None

        steps = schedule.steps
        (_, queue), _ = jax.lax.scan(step, (state, queue), jnp.arange(steps))
        # The last round's results sit in stage 0's queue; psum hands them to every
        # stage (the others add zeros).
        if S > 1:
            queue = jax.lax.psum(
                [jnp.where(stage == 0, q, jnp.zeros_like(q)) for q in queue], axis
            )
        return [
            layout.merge(jnp.roll(q, steps % M, axis=0), a)
            for q, a in zip(queue, batch_axes, strict=True)
        ]

    return program
