"""scan_pattern: a scan over a stack whose layers repeat a pattern of kinds.

The pattern is split once into a prefix, a period repeated k times and a remainder
(`split_pattern`). The period runs as one `jax.lax.scan` over k whose body applies the
period's layers in order (the super-block scan MaxText writes by hand); the prefix and
the remainder run as one short scan per run of layers of one kind, a run of one or two
layers being applied directly. Each kind's function is therefore traced a number of
times set by the shape of the pattern, not by N. The per-layer step is
`_scan.layer_step`, as in `scan_layers`. With `update_xs` and one stack of caches per
kind, a kind's layers in the period (or in a region outside it) read their entries
before any is written back (`_PatternScan.deferred`), so XLA copies no stack whole.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._check import count_layers, fail, leading_shapes, tree_problems
from ._leaf import dtype_of, is_array, shape_of
from ._nnx import forbid_layer_state
from ._scan import (
    Remat,
    check_update_xs,
    in_place,
    layer_step,
    read_entry,
    resolve_remat,
    write_entries,
)
from ._stack import check_key, layer_keys
from ._tree import PyTree, at, map_arrays, merge_static, split_static

KindLabel = Hashable
UNROLL = 2  # runs of up to this many layers outside the period are not scanned
LayerFn = Callable[..., tuple[PyTree, PyTree]]


# ------------------------------------------------------------------ splitting a pattern


class Split(NamedTuple):
    """How a pattern of N layers runs.

    Layers `[0, start)` run first, then `period` layers repeated `repeats` times (one
    `jax.lax.scan` over `repeats`), then layers `[start + period * repeats, N)`. The
    layers outside the period run in runs of one kind (`run_cost`). `period == 0` (and
    `repeats == 0`) when no repeated period pays: every layer then runs in runs.
    """

    start: int
    period: int
    repeats: int

    @property
    def stop(self) -> int:
        """The first layer after the repeated period."""
        return self.start + self.period * self.repeats


def kind_runs(
    kinds: Sequence[KindLabel], start: int, stop: int
) -> list[tuple[KindLabel, int, int]]:
    """The maximal runs of one kind in `kinds[start:stop]`: `(kind, first, stop)`."""
    runs: list[tuple[KindLabel, int, int]] = []
    for i in range(start, stop):
        if runs and runs[-1][0] == kinds[i]:
            runs[-1] = (kinds[i], runs[-1][1], i + 1)
        else:
            runs.append((kinds[i], i, i + 1))
    return runs


def run_cost(length: int) -> int:
    """Traced calls of a run of `length` layers of one kind outside the period: one
    scan, except that a run of one or two layers is applied directly (XLA would unroll
    so short a loop anyway, after compiling it as one)."""
    return length if length <= UNROLL else 1


def traced_calls(kinds: Sequence[KindLabel], split: Split) -> int:
    """How many layer calls a split traces: the period's length, plus its runs'."""
    outside = kind_runs(kinds, 0, split.start) + kind_runs(
        kinds, split.stop, len(kinds)
    )
    return split.period + sum(run_cost(stop - start) for _, start, stop in outside)


@functools.lru_cache(maxsize=256)
def split_pattern(kinds: tuple[KindLabel, ...]) -> Split:
    """The split of a pattern that traces the fewest layer calls (`traced_calls`).

    A period of length p repeated k >= 2 times traces p calls (its body applies its
    layers in order); the runs of one kind before and after it trace `run_cost` each.
    Among the cheapest splits, the one whose period covers the most layers wins, then
    the shortest period, then the earliest start. For Gemma 3's `"LLLLLG" * 10 + "LL"`
    that is the period `"LLLLLG"` from layer 0, repeated 10 times, then `"LL"`: eight
    calls, whatever the number of repeats.
    """
    n = len(kinds)
    runs = kind_runs(kinds, 0, n)
    run_of = [r for r, (_, start, stop) in enumerate(runs) for _ in range(start, stop)]
    whole = [run_cost(stop - start) for _, start, stop in runs]
    before = [sum(whole[:r]) for r in range(len(runs) + 1)]  # cost of runs[:r]

    def cost_before(s: int) -> int:  # of kinds[:s], a run cut at s counted up to s
        if s == 0:
            return 0
        r = run_of[s - 1]
        return before[r] + run_cost(s - runs[r][1])

    def cost_from(s: int) -> int:  # of kinds[s:], a run cut at s counted from s
        if s == n:
            return 0
        r = run_of[s]
        return before[-1] - before[r + 1] + run_cost(runs[r][2] - s)

    best, best_rank = Split(0, 0, 0), (before[-1], 0, 0, 0)
    for p in range(1, n // 2 + 1):
        # agree[i]: how many consecutive layers from i equal the layer p further on, so
        # kinds[a:a + k * p] is k copies of its first p exactly when agree[a] >= (k-1)p.
        agree = [0] * (n - p + 1)
        for i in range(n - p - 1, -1, -1):
            agree[i] = agree[i + 1] + 1 if kinds[i] == kinds[i + p] else 0
        for a in range(n - 2 * p + 1):
            most = 1 + agree[a] // p
            # Fewer repeats than the most add whole periods to the remainder; one
            # fewer can pay (a remainder run of two may join the period's last run
            # into one scan), two fewer never do.
            for k in range(max(2, most - 1), most + 1):
                cost = p + cost_before(a) + cost_from(a + k * p)
                rank = (cost, -k * p, p, a)
                if rank < best_rank:
                    best, best_rank = Split(a, p, k), rank
    return best


# ------------------------------------------------------------------ checking the input


def _layer_list(indices: Sequence[int]) -> str:
    shown = ", ".join(map(str, indices[:5]))
    if len(indices) > 5:
        shown += f", ... ({len(indices)} in all)"
    return ("layer " if len(indices) == 1 else "layers ") + shown


def _check_kinds(fns: Any, pattern: Any) -> tuple[KindLabel, ...]:
    """The pattern as a tuple of kinds, every kind with a function and every function
    used; else one error listing every problem."""
    if not isinstance(fns, Mapping):
        raise TypeError(
            "`fns` must be a mapping from each kind of layer to its layer function, "
            f"got {type(fns).__name__}."
        )
    bad = [
        f"`fns[{k!r}]` is a {type(f).__name__}"
        for k, f in fns.items()
        if not callable(f)
    ]
    if bad:
        fail(bad, "every value of `fns` must be a layer function", TypeError)
    if isinstance(pattern, np.ndarray) and pattern.ndim == 1:
        pattern = pattern.tolist()  # numpy scalars -> Python labels
    if (
        isinstance(pattern, bytes | Mapping | AbstractSet)
        or is_array(pattern)
        or not isinstance(pattern, Iterable)
    ):
        raise TypeError(
            "`pattern` must be a str (one character per layer) or a list of kind "
            f"labels, one per layer, got {type(pattern).__name__}."
        )
    kinds = tuple(pattern)
    if not kinds:
        raise ValueError("`pattern` is empty: at least one layer is needed.")
    for i, kind in enumerate(kinds):
        if not isinstance(kind, Hashable):
            raise TypeError(
                f"`pattern` must hold hashable kind labels, got a "
                f"{type(kind).__name__} at layer {i}."
            )
    where: dict[KindLabel, list[int]] = {}
    for i, kind in enumerate(kinds):
        where.setdefault(kind, []).append(i)
    problems = [
        f"`pattern` has kind {kind!r} at {_layer_list(at)} but `fns` has no function "
        "for it"
        for kind, at in where.items()
        if kind not in fns
    ]
    problems += [
        f"`fns[{kind!r}]` is never used: `pattern` has no {kind!r} layer"
        for kind in fns
        if kind not in where
    ]
    if problems:
        if isinstance(pattern, str) and any(
            not isinstance(k, str) or len(k) != 1 for k in fns
        ):
            problems.append(
                "a str `pattern` is read one character per layer; pass a list for "
                "longer labels"
            )
        fail(problems, title="`fns` and `pattern` disagree")
    try:
        sorted(fns)
    except TypeError:
        raise TypeError(
            "the kinds of `fns` must be sortable, as JAX sorts the keys of a dict (the "
            "`ys` returned, a per-kind `layers`); use str or int labels, got "
            f"{', '.join(sorted({type(k).__name__ for k in fns}))}."
        ) from None
    return kinds


class _Stacks:
    """`layers` or `xs` as the scans read it: its array leaves as one stack shared by
    every kind, indexed by layer, or as one stack per kind, indexed by the layer's
    ordinal among its kind. Static leaves are put aside for `layer_step`."""

    def __init__(self, tree: PyTree, per_kind: bool, ordinal: Sequence[int]) -> None:
        self.per_kind = per_kind
        self.ordinal = ordinal
        if per_kind:
            split = {kind: split_static(sub) for kind, sub in tree.items()}
            self.arrays: Any = {kind: s[0] for kind, s in split.items()}
            self.static: Any = {kind: s[1] for kind, s in split.items()}
        else:
            self.arrays, self.static = split_static(tree)

    def static_of(self, kind: KindLabel) -> PyTree:
        return self.static[kind] if self.per_kind else self.static

    def layer(self, kind: KindLabel, i: int) -> PyTree:
        """The arrays of layer `i`, of kind `kind`."""
        if not self.per_kind:
            return _index(self.arrays, i)
        return _index(self.arrays[kind], self.ordinal[i])

    def run(self, kind: KindLabel, start: int, stop: int) -> PyTree:
        """The arrays of layers `[start, stop)`, all of kind `kind`."""
        if not self.per_kind:
            return _slice(self.arrays, start, stop)
        first = self.ordinal[start]
        return _slice(self.arrays[kind], first, first + stop - start)

    def block(self, kinds: Sequence[KindLabel], split: Split) -> PyTree:
        """The arrays of the repeated period, leading axes (repeats, per period)."""
        a, k = split.start, split.repeats
        if not self.per_kind:
            return _fold(_slice(self.arrays, a, split.stop), k)
        period = Counter(kinds[a : a + split.period])
        out = {}
        for kind, count in period.items():
            first = self.ordinal[kinds.index(kind, a)]
            out[kind] = _fold(_slice(self.arrays[kind], first, first + k * count), k)
        return out

    def pick(self, block: PyTree, kind: KindLabel, offset: tuple[int, int]) -> PyTree:
        """One layer of one repeat of `block`; `offset` is the layer's position in the
        period and its position among the period's layers of its kind."""
        if not self.per_kind:
            return _index(block, offset[0])
        return _index(block[kind], offset[1])


def _slice(tree: PyTree, start: int, stop: int) -> PyTree:
    return jax.tree.map(
        lambda x: x if (start, stop) == (0, len(x)) else x[start:stop], tree
    )


def _fold(tree: PyTree, repeats: int) -> PyTree:
    return jax.tree.map(
        lambda x: x.reshape((repeats, x.shape[0] // repeats, *x.shape[1:])), tree
    )


def _index(tree: PyTree, i: int) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


def _read_stacks(
    tree: PyTree,
    arg: str,
    fns: Mapping[KindLabel, Any],
    counts: Mapping[KindLabel, int],
) -> bool:
    """Whether `tree` is one stack per kind; checks every stack's length."""
    per_kind = isinstance(tree, Mapping) and set(tree.keys()) == set(fns)
    n = sum(counts.values())
    parts = (
        [(f"{arg}[{kind!r}]", tree[kind], counts[kind], f" {kind!r}") for kind in fns]
        if per_kind
        else [(arg, tree, n, "")]
    )
    problems = []
    for label, sub, want, what in parts:
        reference, bad = count_layers(leading_shapes(sub, label))
        problems += bad
        if bad:
            continue
        if reference is None:
            problems.append(f"`{label}` has no array leaves, so it has no layer axis")
        elif reference[0] != want:
            problems.append(
                f"`{label}` has {reference[0]} layers, but `pattern` has {want}{what} "
                f"layer{'s' * (want != 1)}"
            )
    if problems and not per_kind and isinstance(tree, Mapping) and set(tree) & set(fns):
        problems[-1] += (
            f" (`{arg}` is read as one stack per kind only when its keys are exactly "
            f"the kinds of `fns`: {', '.join(map(repr, fns))})"
        )
    if problems:
        fail(problems, title=f"`{arg}` does not match `pattern`")
    return per_kind


# ----------------------------------------------------------------- the outputs


class _Piece(NamedTuple):
    """Some outputs of one kind: of layer `first` on, `lead` leading layer axes."""

    first: int
    arrays: PyTree
    static: PyTree
    lead: int


def _join_ys(kind: KindLabel, pieces: list[_Piece]) -> PyTree:
    """A kind's outputs stacked in layer order, as the reference loop's `stack` does;
    outputs of other structures, shapes, dtypes or static leaves are a `TypeError`."""

    def one_layer(piece: _Piece) -> PyTree:
        layer = map_arrays(
            lambda x: jax.ShapeDtypeStruct(shape_of(x)[piece.lead :], dtype_of(x)),
            piece.arrays,
        )
        return merge_static(layer, piece.static)

    want = one_layer(pieces[0])
    problems = []
    for piece in pieces[1:]:
        for path, phrase, _ in tree_problems(want, one_layer(piece)):
            loc = phrase if path is None else f"{at(path)}: {phrase}"
            problems.append(
                f"layer {piece.first}'s `y` differs from layer {pieces[0].first}'s{loc}"
            )
    if problems:
        fail(
            problems,
            f"`fns[{kind!r}]` must return a `y` of the same structure, shapes and "
            "dtypes at every layer (a kind's outputs are stacked)",
            TypeError,
        )
    flat = [
        jax.tree.map(
            lambda x, p=p: x.reshape(
                (math.prod(x.shape[: p.lead]), *x.shape[p.lead :])
            ),
            p.arrays,
        )
        for p in pieces
    ]
    arrays = (
        flat[0]
        if len(flat) == 1
        else jax.tree.map(lambda *xs: jnp.concatenate(xs), *flat)
    )
    return merge_static(arrays, pieces[0].static)


# ----------------------------------------------------------------- running a pattern


class _Options(NamedTuple):
    """What every layer step of one `scan_pattern` call shares."""

    fns: Mapping[KindLabel, LayerFn]
    init: PyTree
    checkpoint: bool
    policy: Callable[..., bool] | None
    update_xs: bool


class _PatternScan:
    """One pass over a pattern's layers, in order: the runs of one kind before the
    repeated period, the period (one `jax.lax.scan` over its repeats), the runs after.

    `sources` are what each layer reads, indexed like `layers`: its parameters, its
    `x` (or, with `update_xs`, its index into the carried stacks of `xs`) and its key.
    The outputs are kept as `_Piece`s per kind and joined at the end; with
    `update_xs` there are none, the carry being `(carry, xs arrays)`.
    """

    def __init__(
        self,
        options: _Options,
        kinds: tuple[KindLabel, ...],
        sources: tuple[_Stacks, _Stacks | None, _Stacks | None],
        inputs: _Stacks | None,
    ) -> None:
        self.options = options
        self.kinds = kinds
        self.sources = sources
        self.inputs = inputs
        self.pieces: dict[KindLabel, list[_Piece]] = {k: [] for k in options.fns}
        # With one stack of `xs` per kind, writes wait for the reads (`deferred`).
        self.per_kind_update = (
            options.update_xs and inputs is not None and inputs.per_kind
        )

    def step(
        self, kind: KindLabel, *, alone: bool = True
    ) -> tuple[Callable[..., tuple[PyTree, PyTree]], list]:
        """The layer step of `kind`: with `update_xs` and `alone`, in place on the
        carried `xs` (else `deferred` reads and writes its entry)."""
        opts, inputs = self.options, self.inputs
        body, y_static = layer_step(
            opts.fns[kind],
            opts.init,
            self.sources[0].static_of(kind),
            None if inputs is None else inputs.static_of(kind),
            has_xs=inputs is not None,
            checkpoint=opts.checkpoint,
            policy=opts.policy,
            name=f"fns[{kind!r}]",
            y_like_x=opts.update_xs,
        )
        if opts.update_xs and alone:
            assert inputs is not None  # checked by `check_update_xs`
            body = in_place(body, kind if inputs.per_kind else None)
        return body, y_static

    def deferred(
        self,
        state: tuple[PyTree, PyTree],
        runs: list[tuple[KindLabel, int, int]],
        layer: Callable[[KindLabel, int], tuple],
        scan: bool,
    ) -> tuple[PyTree, PyTree]:
        """With `update_xs` and one stack of `xs` per kind, `runs` in order on the
        carried `(carry, xs)`, layer `i` of kind `kind` reading `layer(kind, i)`.

        A kind none of whose runs is scanned (`scan` scans those over `UNROLL`) has
        its entries written back once, after all its layers ran (`write_entries`):
        its layers here hold consecutive entries of its stack, each reads its own
        entry of the stack as it was before, and no layer reads a stack that another
        wrote, which XLA would copy whole.
        """
        carry, xs = state
        scanned = {kind for kind, a, b in runs if scan and b - a > UNROLL}
        pending: dict[KindLabel, tuple[Any, list[PyTree]]] = {}
        for kind, start, stop in runs:
            if kind in scanned:
                carry, xs = self.run((carry, xs), kind, start, stop)
                continue
            step = self.step(kind, alone=False)[0]
            for i in range(start, stop):
                arrays, index, k = layer(kind, i)
                carry, y = step(carry, (arrays, read_entry(xs[kind], index), k))
                pending.setdefault(kind, (index, []))[1].append(y)
        for kind, (index, ys) in pending.items():
            xs = {**xs, kind: write_entries(xs[kind], index, ys)}
        return carry, xs

    def keep(self, kind: KindLabel, piece: _Piece) -> None:
        if not self.options.update_xs:
            self.pieces[kind].append(piece)

    def run(self, carry: PyTree, kind: KindLabel, start: int, stop: int) -> PyTree:
        """Layers `[start, stop)`, all of `kind`: one scan, or applied one by one."""
        if stop - start > UNROLL:
            body, y_static = self.step(kind)
            seq = tuple(
                None if s is None else s.run(kind, start, stop) for s in self.sources
            )
            carry, ys = jax.lax.scan(body, carry, seq)
            self.keep(kind, _Piece(start, ys, y_static[0], 1))
            return carry
        for i in range(start, stop):
            body, y_static = self.step(kind)
            layer = tuple(None if s is None else s.layer(kind, i) for s in self.sources)
            carry, y = body(carry, layer)
            ys = jax.tree.map(lambda y: y[None], y)
            self.keep(kind, _Piece(i, ys, y_static[0], 1))
        return carry

    def period(self, carry: PyTree, split: Split) -> PyTree:
        """The period's layers repeated `split.repeats` times, as one scan."""
        layer_kinds = self.kinds[split.start : split.start + split.period]
        within: Counter[KindLabel] = Counter()
        offsets: list[tuple[int, int]] = []
        for kind in layer_kinds:
            offsets.append((len(offsets), within[kind]))
            within[kind] += 1
        steps = [self.step(kind) for kind in layer_kinds]

        def body(carry: PyTree, block: tuple[PyTree, ...]) -> tuple[PyTree, tuple]:
            if self.per_kind_update:

                def layer(kind: KindLabel, t: int) -> tuple:
                    return tuple(
                        None if s is None else s.pick(b, kind, offsets[t])
                        for s, b in zip(self.sources, block, strict=True)
                    )

                runs = kind_runs(layer_kinds, 0, len(layer_kinds))
                return self.deferred(carry, runs, layer, scan=False), ()
            ys = []
            for kind, offset, (layer_fn, _) in zip(
                layer_kinds, offsets, steps, strict=True
            ):
                sliced = tuple(
                    None if s is None else s.pick(b, kind, offset)
                    for s, b in zip(self.sources, block, strict=True)
                )
                carry, y = layer_fn(carry, sliced)
                ys.append(y)
            return carry, tuple(ys)

        blocks = tuple(
            None if s is None else s.block(self.kinds, split) for s in self.sources
        )
        carry, ys = jax.lax.scan(body, carry, blocks)
        if not self.options.update_xs:
            for kind in within:
                at = [t for t, k in enumerate(layer_kinds) if k == kind]
                self.keep(kind, _period_piece(kind, split.start, at, ys, steps))
        return carry

    def region(self, carry: PyTree, start: int, stop: int) -> PyTree:
        """Layers `[start, stop)` outside the period, in runs of one kind."""
        runs = kind_runs(self.kinds, start, stop)
        if self.per_kind_update:

            def layer(kind: KindLabel, i: int) -> tuple:
                return tuple(
                    None if s is None else s.layer(kind, i) for s in self.sources
                )

            return self.deferred(carry, runs, layer, scan=True)
        for run in runs:
            carry = self.run(carry, *run)
        return carry

    def __call__(self, carry: PyTree) -> tuple[PyTree, dict[KindLabel, PyTree]]:
        kinds = self.kinds
        split = split_pattern(kinds)
        carry = self.region(carry, 0, split.start)
        if split.repeats:
            carry = self.period(carry, split)
        carry = self.region(carry, split.stop, len(kinds))
        if self.options.update_xs:
            return carry, {}  # the outputs are in the carried `xs`
        return carry, {k: _join_ys(k, self.pieces[k]) for k in self.options.fns}


def _period_piece(
    kind: KindLabel, start: int, at: list[int], ys: tuple, steps: list
) -> _Piece:
    """A kind's outputs of the period scan (`ys`, one entry per position of the
    period), at positions `at` of the period starting at layer `start`."""
    sub = [_Piece(start + t, ys[t], steps[t][1][0], 1) for t in at]
    if len(at) > 1:
        _join_ys(kind, sub)  # the same output at every position, else an error
    # (repeats, positions, ...) in row-major order is the kind's layer order.
    stacked = jax.tree.map(lambda *y: jnp.stack(y, axis=1), *(p.arrays for p in sub))
    return _Piece(start + at[0], stacked, sub[0].static, 2)


def _compute(
    options: _Options,
    kinds: tuple[KindLabel, ...],
    per_kind: tuple[bool, bool],
    args: tuple[PyTree, PyTree, PyTree, jax.Array | None],
) -> tuple[PyTree, PyTree]:
    """`scan_pattern` on checked arguments `(init, layers, xs, key)`; `per_kind` says
    whether `layers` and `xs` are one stack per kind."""
    init, layers, xs, key = args
    options = options._replace(init=init)
    seen: Counter[KindLabel] = Counter()
    ordinal = []
    for kind in kinds:
        ordinal.append(seen[kind])
        seen[kind] += 1
    params = _Stacks(layers, per_kind[0], ordinal)
    inputs = None if xs is None else _Stacks(xs, per_kind[1], ordinal)
    keys = None if key is None else _Stacks(layer_keys(key, len(kinds)), False, ordinal)
    if not options.update_xs:
        carry, ys = _PatternScan(options, kinds, (params, inputs, keys), inputs)(init)
        return carry, ys
    assert inputs is not None  # checked by `check_update_xs`
    # Each layer reads the carried stacks of `xs` at its index into its kind's stack.
    index = np.arange(len(kinds)) if not inputs.per_kind else np.array(ordinal)
    at = _Stacks(jnp.asarray(index, jnp.int32), False, ordinal)
    scan = _PatternScan(options, kinds, (params, at, keys), inputs)
    (carry, arrays), _ = scan((init, inputs.arrays))
    if inputs.per_kind:
        return carry, {k: merge_static(arrays[k], inputs.static[k]) for k in arrays}
    return carry, merge_static(arrays, inputs.static)


# ----------------------------------------------------------------- scan_pattern


def scan_pattern(
    fns: Mapping[KindLabel, LayerFn],
    init: PyTree,
    layers: PyTree,
    pattern: str | Sequence[KindLabel],
    /,
    *,
    xs: PyTree = None,
    key: jax.Array | None = None,
    remat: Remat = False,
    update_xs: bool = False,
) -> tuple[PyTree, PyTree]:
    """Runs layers of several kinds in the order of `pattern`, compiled once for any N.

    Equivalent to this Python loop (`get_layer`, `stack` and `layer_keys` from this
    package), where `shared` says whether `layers` is one stack (and `xs`, which is read
    the same way on its own):

    ```python
    keys = layer_keys(key, N); seen = {kind: 0 for kind in fns}
    for i, kind in enumerate(pattern):
        j = i if shared else seen[kind]; seen[kind] += 1
        layer = get_layer(layers if shared else layers[kind], j)
        x = [get_layer(xs..., j)] if xs is given else []
        k = {"key": keys[i]} if key is not None else {}
        carry, y = fns[kind](carry, layer, *x, **k)
    return carry, {kind: stack(that kind's ys, in order)}
    ```

    The pattern is split into a prefix, a period repeated k times and a remainder: the
    period runs as one `jax.lax.scan` over k whose body applies the period's layers in
    order, and the prefix and remainder as one short scan per run of one kind (a run of
    one or two layers is applied directly). Gemma 3's `"LLLLLG" * 10 + "LL"` runs as a
    scan over 10 periods of six layers, then the last two layers; each kind's function
    is traced as many times for 26 layers as for 62.

    Args:
        fns: Maps each kind of layer to its function, called as in `scan_layers`:
            `fn(carry, layer[, x], *, key=...) -> (carry, y)`. Every kind must occur in
            `pattern`. Kinds are hashable labels that sort (str or int).
        init: The initial carry; every function must return a carry matching it in
            structure, shapes and dtypes.
        layers: One stacked tree of N layers, layer `i` being `pattern[i]`'s, when all
            kinds have the same parameter structure (Gemma 3); or a mapping from each
            kind to a stack of that kind's layers in order, when kinds differ
            (DeepSeek's dense and MoE layers). A mapping whose keys are exactly the
            kinds of `fns` is read as per-kind; anything else (a dict of parameters
            included) as one stack.
        pattern: The kind of each layer, in order: a str (one character per layer, as
            `"LLLLLG"`) or a list of labels (`["dense"] * 3 + ["moe"] * 58`).
        xs: Optional per-layer inputs (e.g. KV caches): one stack of N entries, or a
            mapping from each kind to that kind's entries, by the same rule as `layers`
            but read on its own (Gemma's local and global layers may share parameters
            and have caches of different lengths). Passed as a third positional
            argument.
        key: Optional PRNG key (typed or raw). Layer `i` gets `jax.random.fold_in(key,
            i)`, `i` counting all layers, as the keyword argument `key=`, so a model's
            keys do not change when it is written as a pattern; without a key, the
            functions are called without `key=`.
        remat: Rematerialise each layer in the backward pass, as in `scan_layers`:
            False; True; the name of a `jax.checkpoint_policies` policy; or a policy.
        update_xs: With True (which needs `xs`), as in `scan_layers`: each layer's `y`
            must match its `x` and is written back into `xs` in place, one stack per
            kind when `xs` is per kind (Gemma 3's local layers holding a sliding
            window, its global layers the whole context). Donate `xs` under `jit` and
            the step holds no second copy of them.

    Returns:
        `(carry, ys)`: the final carry, and a dict mapping each kind to its layers'
        outputs stacked in order (leading length the kind's count; None for a kind whose
        function returns `y=None`). With `update_xs=True`, `(carry, xs_updated)`, in
        the form `xs` was given (one stack, or a dict of one stack per kind).

    Raises:
        TypeError: if `fns` is not a mapping of functions, `pattern` not a str or list
            of hashable labels, `key` not a PRNG key or `remat` (or `update_xs`) of the
            wrong type; if a function does not return `(carry, y)` with a carry
            matching `init`, returns outputs that cannot be stacked, or, with
            `update_xs=True`, a `y` that does not match its `x`.
        ValueError: if `pattern` is empty, names a kind without a function or leaves a
            function unused; if `layers` or `xs` (or a kind's stack in them) does not
            hold as many layers as `pattern` gives it; if `remat` names an unknown
            policy; if `update_xs=True` comes without `xs`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from stackedtree import scan_pattern
        >>> add = lambda c, p: (c + p["w"], None)  # kind "a": no output
        >>> mul = lambda c, p: (c * p["w"], c)  # kind "m": outputs its input
        >>> layers = {"w": jnp.arange(1.0, 6.0)}  # one stack of 5 layers
        >>> fns = {"a": add, "m": mul}
        >>> carry, ys = scan_pattern(fns, jnp.array(0.0), layers, "aamam")
        >>> float(carry), ys["a"], ys["m"].tolist()
        (65.0, None, [3.0, 13.0])
    """
    kinds = _check_kinds(fns, pattern)
    counts = Counter(kinds)
    per_kind_layers = _read_stacks(layers, "layers", fns, counts)
    per_kind_xs = xs is not None and _read_stacks(xs, "xs", fns, counts)
    update_xs = check_update_xs(update_xs, xs)
    if key is not None:
        check_key(key)
    fns = {
        kind: forbid_layer_state(f, layers, name=f"fns[{kind!r}]", where="scan_pattern")
        for kind, f in fns.items()
    }
    options = _Options(fns, init, *resolve_remat(remat), update_xs)
    compute = functools.partial(
        _compute, options, kinds, (per_kind_layers, per_kind_xs)
    )
    if not any(
        isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((init, layers, xs, key))
    ):
        # Called eagerly, the runs applied layer by layer would compute before a
        # later layer's mistake is found: trace the whole pattern first.
        arrays, static = split_static((init, layers, xs, key))
        jax.eval_shape(
            lambda a: split_static(compute(merge_static(a, static)))[0], arrays
        )
    return compute((init, layers, xs, key))
