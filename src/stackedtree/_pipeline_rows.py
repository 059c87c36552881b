"""One microbatch's rows of a batch split over the data-parallel mesh axes.

Inside the pipeline's stage `shard_map` the data-parallel axes stay automatic, so a
batch-sized array such as `init` is one global array whose rows device `d` of the D
data-parallel devices holds `[d * B / D, (d + 1) * B / D)`. `_Rows` reads microbatch
`m` (rows `[m * b, (m + 1) * b)`, `b = B / M`) out of it, laid out over the same
devices, and writes one back, each with one all-to-all of a microbatch over the data
axes in a `shard_map` of its own: nothing batch-sized is relaid out or copied.

In units of chunks of `b / D` rows, device `d` holds chunks `[d * M, (d + 1) * M)` of
the batch, and microbatch `m` laid out over the devices is chunk `m * D + d` on device
`d`: the chunk that device `(m * D + d) // M` holds at its place `(m * D + d) % M`.

`_Split` is GPipe's view instead (the batch relaid out as microbatches once), and `_Io`
a stage's view of the step's inputs through either.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ._pipeline import _Layout


class _Rows(NamedTuple):
    """Reads and writes microbatch `m` of the leaves of batch-sized trees."""

    layout: _Layout  # the data-parallel axes, which split every microbatch's rows
    mesh: Mesh
    microbatches: int  # M
    batch_axis: int

    @property
    def devices(self) -> int:
        """D, the devices along the data-parallel axes."""
        size = 1
        for name in self.layout.mesh_axes:
            size *= self.mesh.shape[name]
        return size

    def place(self, tree: Any) -> Any:
        """`tree` with its batch axis split over the data-parallel axes."""
        return jax.tree.map(lambda x: self.layout.spread(x, self._axis(x)), tree)

    def take(self, tree: Any, m: jax.Array) -> Any:
        """Microbatch m of every leaf of `tree`, its rows over the data axes."""
        return jax.tree.map(lambda x: self._map(self._take, x, m), tree)

    def finish(self, tree: Any) -> Any:
        """A tree written with `put`, as the step returns it: as it is."""
        return tree

    def put(self, tree: Any, m: jax.Array, value: Any, where: jax.Array) -> Any:
        """`tree` with microbatch m set to `value` where `where` holds."""
        return jax.tree.map(
            lambda x, v: self._map(self._put, x, m, v, where), tree, value
        )

    def zeros(self, tree: Any, count: int | None = None) -> Any:
        """Zeros shaped like one microbatch of each leaf of `tree`, laid out alike
        (or `count` of them, stacked on a new leading axis)."""

        def one(x: jax.Array) -> jax.Array:
            a = self._axis(x)
            shape = list(x.shape)
            shape[a] //= self.microbatches
            if count is None:
                return self.layout.spread(jnp.zeros(shape, x.dtype), a)
            return self.layout.spread(jnp.zeros((count, *shape), x.dtype), a + 1)

        return jax.tree.map(one, tree)

    def _axis(self, x: Any) -> int:
        return self.batch_axis % x.ndim

    def _map(self, f: Any, x: jax.Array, *args: Any) -> jax.Array:
        """`f(x_local, *args)` on each device's block of x's rows, in a `shard_map`
        over the data-parallel axes (the arguments that are arrays of x's rank are
        split like x; the others, scalars, are passed whole)."""
        a = self._axis(x)
        axes = self.layout.mesh_axes
        if not axes:
            return f(x, *args, axis=a, index=jnp.int32(0))

        def local(x: jax.Array, *args: Any) -> jax.Array:
            return f(x, *args, axis=a, index=jax.lax.axis_index(axes))

        spec = self.layout.spec(x.ndim, a)
        specs = [spec if jnp.ndim(y) == x.ndim else PartitionSpec() for y in args]
        return jax.shard_map(
            local,
            mesh=jax.sharding.get_abstract_mesh(),
            in_specs=(spec, *specs),
            out_specs=spec,
            axis_names=set(axes),
        )(x, *args)

    def _chunks(self, x: jax.Array, axis: int) -> jax.Array:
        """x's block of rows as `(..., M, b / D, ...)`: its M chunks at `axis`."""
        M = self.microbatches
        shape = x.shape
        return x.reshape((*shape[:axis], M, shape[axis] // M, *shape[axis + 1 :]))

    def _places(self, m: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
        """For each device j: which device holds chunk `m * D + j` of the batch, and
        where in its block that chunk is if that device is this one (else M)."""
        M, D = self.microbatches, self.devices
        chunk = m * D + jnp.arange(D)
        mine = chunk // M == index
        return chunk // M, jnp.where(mine, chunk % M, M)

    def _exchange(self, parts: jax.Array, axis: int) -> jax.Array:
        """Piece j of `parts` (at `axis`) to device j; piece i of the result is the one
        device i sent."""
        axes = self.layout.mesh_axes
        if not axes:
            return parts
        return jax.lax.all_to_all(parts, axes, axis, axis, tiled=True)

    def _take(
        self, x: jax.Array, m: jax.Array, *, axis: int, index: jax.Array
    ) -> jax.Array:
        owner, place = self._places(m, index)
        # Each device sends device j the chunk j needs, if it holds it (else zeros).
        parts = jnp.take(
            self._chunks(x, axis), place, axis=axis, mode="fill", fill_value=0
        )
        got = self._exchange(parts, axis)
        # Keep the piece that came from the chunk's holder.
        mine = jnp.take(owner, index)
        return jax.lax.dynamic_index_in_dim(got, mine, axis=axis, keepdims=False)

    def _put(
        self,
        x: jax.Array,
        m: jax.Array,
        value: jax.Array,
        where: jax.Array,
        *,
        axis: int,
        index: jax.Array,
    ) -> jax.Array:
        D = self.devices
        # Every device sends its chunk of microbatch m to every device...
        parts = jnp.stack([value] * D, axis=axis)
        got = self._exchange(parts, axis)
        # ... and each writes those of its own chunks that came (chunk m * D + j
        # from device j), dropping the others.
        _, place = self._places(m, index)
        place = jnp.where(where, place, self.microbatches)
        chunks = self._chunks(x, axis)
        index_at = (slice(None),) * axis + (place,)
        chunks = chunks.at[index_at].set(got, mode="drop")
        return chunks.reshape(x.shape)


class _Split(NamedTuple):
    """The microbatches relaid out as `(M, ..., B / M, ...)`, so that reading one is
    plain indexing, differentiable: GPipe's view, whose gradient pass keeps every
    microbatch anyway. (A `shard_map` nested in the stages' cannot be
    differentiated inside the step's loop.)"""

    layout: _Layout
    microbatches: int  # M
    batch_axis: int

    def place(self, tree: Any) -> Any:
        def one(x: jax.Array) -> jax.Array:
            a = self.batch_axis % x.ndim
            return self.layout.split(self.layout.spread(x, a), a, self.microbatches)

        return jax.tree.map(one, tree)

    def take(self, tree: Any, m: jax.Array) -> Any:
        return jax.tree.map(lambda x: x[m], tree)

    def zeros(self, tree: Any, count: int | None = None) -> Any:
        if count is None:
            return jax.tree.map(lambda x: jnp.zeros_like(x[0]), tree)
        return jax.tree.map(lambda x: jnp.zeros_like(x[:count]), tree)

    def finish(self, tree: Any) -> Any:
        """The inverse of `place`."""
        return jax.tree.map(
            lambda x: self.layout.merge(x, self.batch_axis % (x.ndim - 1)), tree
        )


class _Io(NamedTuple):
    """A stage's view of the step's inputs: the batch-sized `init` and `targets`,
    their rows over the data-parallel mesh axes, read one microbatch at a time."""

    init: Any
    targets: Any
    head: Any
    init_rows: _Rows | _Split
    target_rows: _Rows | _Split

    def take(self, m: jax.Array) -> Any:
        """Microbatch m of `init`."""
        return self.init_rows.take(self.init, m)

    def take_targets(self, m: jax.Array) -> Any:
        """Microbatch m of `targets`."""
        return self.target_rows.take(self.targets, m)

    def one(self, count: int | None = None) -> Any:
        """Zeros shaped like one microbatch of the carry (or `count` of them)."""
        return self.init_rows.zeros(self.init, count)
