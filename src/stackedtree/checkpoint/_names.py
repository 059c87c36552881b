"""Name-level stacking: the per-layer tensors of a flat checkpoint <-> stacked tensors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .._check import fail, num_layers_of
from .._leaf import is_array, leaf_kind, stack_leaves
from ._experts import expert_order, parse_experts
from ._layer_pattern import LayerPattern, check_label
from ._plan import (
    LayerKind,
    Layers,
    StackEntry,
    StackPlan,
    all_layers,
    kinds_of,
    plan_one_kind,
    subset_kinds,
)
from ._text import plural

# ------------------------------------------------------------------- `layers` checks


def check_layers(layers: Any, arg: str = "layers") -> tuple[int, ...]:
    """`layers` as a tuple of distinct layer indices (ints, 0 or more).

    Raises:
        TypeError: `layers` is not a sequence of ints.
        ValueError: it is empty, holds a negative index or repeats one.
    """
    if isinstance(layers, str | bytes | Mapping) or not isinstance(
        layers, Sequence | np.ndarray
    ):
        raise TypeError(
            f"`{arg}` must be a sequence of layer indices, got {type(layers).__name__}."
        )
    found: list[int] = []
    for j, i in enumerate(layers):
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise TypeError(
                f"`{arg}` must hold int layer indices, but `{arg}[{j}]` is "
                f"{type(i).__name__} {i!r}."
            )
        if i < 0:
            raise ValueError(
                f"`{arg}[{j}]` is {i}, but layer indices are 0 or more (they name "
                "layers, and do not count from the end)."
            )
        found.append(int(i))
    if not found:
        raise ValueError(f"`{arg}` is empty; list the layers to stack.")
    repeated = sorted(i for i, c in Counter(found).items() if c > 1)
    if repeated:
        raise ValueError(
            f"`{arg}` repeats {plural('layer', repeated)}; list each layer once."
        )
    return tuple(found)


def check_kinds(
    layers: Mapping[Any, Any], arg: str = "layers"
) -> dict[str, tuple[int, ...]]:
    """A mapping of kind labels to their layers, no layer in two kinds.

    Raises:
        TypeError: a label is not a str, or a value not a sequence of ints.
        ValueError: the mapping is empty; a label is not a word; a value is as
            `check_layers` refuses; a layer is in two kinds.
    """
    if not layers:
        raise ValueError(f"`{arg}` is an empty mapping; give each kind its layers.")
    kinds: dict[str, tuple[int, ...]] = {}
    owner: dict[int, str] = {}
    problems: list[str] = []
    for label, value in layers.items():
        check_label(label, f"`{arg}`")
        kinds[label] = check_layers(value, f"{arg}[{label!r}]")
        for i in kinds[label]:
            if i in owner:
                problems.append(f"layer {i} is in kinds {owner[i]!r} and {label!r}")
            else:
                owner[i] = label
    if problems:
        fail(problems, f"`{arg}` gives a layer to two kinds")
    return kinds


def detect_kinds(
    names: Iterable[str], pattern: str, /, *, experts: str | None = None
) -> dict[str, list[int]]:
    """The kinds of layers of a per-layer checkpoint: layers holding the same keys.

    The kinds are labelled `A`, `B`, ... in the order of their first layers, so the
    labels depend only on which layers hold which keys. A checkpoint whose layers all
    hold the same keys is one kind, `A`.

    Args:
        names: the tensor names (a flat checkpoint's keys will do).
        pattern: the layer pattern, with one `{i}`.
        experts: an expert pattern (`"mlp.experts.{e}."`, as `detect_experts`
            finds it): kinds are then formed over keys with the expert index
            replaced by `{e}`, so a layer that lacks one expert is of its kind (and
            an error when stacked), not a kind of its own. None or `"none"`:
            every key as it is.

    Returns:
        Each kind's label -> its layers, in increasing order: the `layers` that
        `stack_by_name` and `unstack_by_name` take.

    Raises:
        ValueError: the pattern is malformed or matches nothing; the layers found
            are not exactly 0..N-1; the expert pattern is malformed or matches
            nothing.

    A kind whose keys are a strict subset of another's may be a damaged layer
    rather than a kind: `missing_keys` says which keys it lacks.

    Examples:
        >>> names = ["h.0.mlp.w", "h.1.mlp.w", "h.2.moe.w", "h.3.moe.w", "emb"]
        >>> detect_kinds(names, "h.{i}.")
        {'A': [0, 1], 'B': [2, 3]}
    """
    lp = LayerPattern.parse(pattern)
    found = Layers(names, lp, pattern, parse_experts(experts)).found
    return kinds_of(found, all_layers(found, pattern))


def missing_keys(
    names: Iterable[str], pattern: str, /, *, experts: str | None = None
) -> dict[str, list[str]]:
    """The kinds that look like damaged layers: those whose keys are a strict
    subset of another kind's, with the keys they lack.

    Kinds are right for DeepSeek's dense and MoE layers, Llama 4's interleaved ones
    or a multi-token-prediction layer, but a layer that lost a tensor forms a kind
    too; `stackedtree stack` and `stackedtree inspect` warn about such kinds with
    these keys (and `stackedtree stack --kinds 1` refuses them).

    Args:
        names: the tensor names.
        pattern: the layer pattern, with one `{i}`.
        experts: as in `detect_kinds`.

    Returns:
        Each such kind's label (as `detect_kinds` labels it) -> the per-layer
        keys it lacks, those of the kind it lacks fewest keys of; empty when no
        kind's keys are a strict subset of another's.

    Raises:
        ValueError: as in `detect_kinds`.

    Examples:
        >>> names = ["h.0.a", "h.0.b", "h.1.a", "h.2.a", "h.2.b"]
        >>> detect_kinds(names, "h.{i}.")
        {'A': [0, 2], 'B': [1]}
        >>> missing_keys(names, "h.{i}.")
        {'B': ['b']}
    """
    lp = LayerPattern.parse(pattern)
    found = Layers(names, lp, pattern, parse_experts(experts)).found
    labelled = kinds_of(found, all_layers(found, pattern))
    plan = StackPlan(
        pattern,
        len(found),
        tuple(
            LayerKind(label, order, tuple(StackEntry(k, k) for k in found[order[0]]))
            for label, order in labelled.items()
        ),
        (),
    )
    return {label: lacking for label, (_, lacking) in subset_kinds(plan).items()}


def _spec(name: str, x: Any) -> tuple[tuple[int, ...], np.dtype]:
    if is_array(x):
        return tuple(x.shape), np.dtype(x.dtype)
    raise TypeError(
        f"tensor `{name}` must be a numpy or jax array (or a jax.ShapeDtypeStruct), "
        f"got {type(x).__name__}."
    )


def layer_of(x: Any, i: int) -> Any:
    """Layer `i` of a stacked tensor: a numpy view, a jax slice or a ShapeDtypeStruct."""
    if leaf_kind(x) == "abstract":
        return type(x)(x.shape[1:], x.dtype)
    return x[i, ...]


def check_rest(
    pattern: LayerPattern,
    rest: Mapping[str, Any] | Sequence[str],
    layers: Iterable[int] | None = None,
) -> None:
    """No name of `rest` is one that `pattern` reads as a tensor of `layers` (of any
    layer when None)."""
    chosen = None if layers is None else set(layers)
    clash = [
        name
        for name in rest
        if (m := pattern.match(name)) is not None and (chosen is None or m[0] in chosen)
    ]
    if clash:
        fail(
            [repr(name) for name in clash],
            f"`rest` holds names that belong in `stacked`: pattern {str(pattern)!r} "
            "reads as layer tensors",
        )


def num_stacked_layers(stacked: Mapping[str, Any], arg: str = "stacked") -> int:
    """The common leading length of stacked tensors (the layer-count rule of `_check`).

    Raises:
        ValueError: `stacked` is empty, holds a 0-d tensor, or the lengths disagree.
    """
    if not stacked:
        raise ValueError(f"`{arg}` holds no tensors, so it has no layers.")
    per_kind = [key for key, x in stacked.items() if isinstance(x, Mapping)]
    if per_kind:
        raise TypeError(
            f"`{arg}[{per_kind[0]!r}]` is a mapping: stacked tensors per kind need "
            "`layers`, the layers of each kind."
        )
    shapes = [(f"`{arg}[{key!r}]`", _spec(key, x)[0]) for key, x in stacked.items()]
    return num_layers_of(stacked, arg, leaves=shapes, hint="")


def _stack(flat: Mapping[str, Any], plan: StackPlan) -> dict[str, Any]:
    out = {}
    for _, e in plan.entries():
        where = f"`flat` at `{e.key}`"
        if not e.experts:
            out[e.key] = stack_leaves([flat[name] for name in e.sources], where)
            continue
        n = len(e.sources) // e.experts
        per_layer = [
            stack_leaves([flat[e.source(j, x)] for x in range(e.experts)], where)
            for j in range(n)
        ]
        out[e.key] = stack_leaves(per_layer, where)
    return out


def stack_by_name(
    flat: Mapping[str, Any],
    pattern: str,
    /,
    *,
    layers: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    experts: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stacks the per-layer tensors of a flat checkpoint by name.

    Name `n` belongs to layer `i` when `n == before + str(i) + after + key`, where
    `before` and `after` are the parts of `pattern` around `{i}` and `i` is written in
    canonical decimal (`layers.01.` is no layer; `layers.10.` is layer 10).

    Numpy tensors give numpy results (host memory, no device copy); jax tensors give
    jax results; `jax.ShapeDtypeStruct`s give `jax.ShapeDtypeStruct`s.

    Args:
        flat: maps tensor names to arrays.
        pattern: a string with one `{i}`, e.g. `"model.layers.{i}."`.
        layers: which layers to stack. None: all of them, which must be exactly
            `0..N-1`. A sequence of layer indices: only those, in that order
            (`stacked[key][j]` is layer `layers[j]`'s), the other layers' tensors
            staying in `rest`; this is how one kind of layers is stacked, such as
            DeepSeek's dense layers. A mapping of kind labels to such sequences
            (`detect_kinds` gives one): each kind stacked on its own, so that
            `stacked[label][key]` holds that kind's layers.
        experts: an expert pattern, relative to the per-layer key, such as
            `"mlp.experts.{e}."` (`detect_experts` finds it): the experts
            `0..E-1` of each expert tensor are stacked along a second axis, under
            the key with `{e}` kept (`mlp.experts.{e}.gate_proj.weight`, shape
            `(N, E, *shape)`). Keys without the expert index (routers, shared
            experts, fused `(E, ...)` tensors) stack over layers only. None or
            `"none"`: experts stay apart, each key stacked over layers only.

    Returns:
        `(stacked, rest)`: `stacked[key]` has shape `(N, *shape)` (per kind,
        `stacked[label][key]` has shape `(len(layers[label]), *shape)`), an
        expert tensor `(N, E, *shape)`; `rest` holds every other name, untouched.

    Raises:
        TypeError: a value is not an array; `layers` is not a sequence of ints (or
            a mapping of str labels to such).
        ValueError: `pattern` has no or several `{i}`, or matches no name; the
            matched layers are not exactly 0..N-1 (without `layers`); `layers` is
            empty, repeats a layer, holds a negative index or a layer with no
            tensor, or gives a layer to two kinds; the stacked layers hold
            different keys; a tensor's shape or dtype differs from the other
            layers'.

    Examples:
        >>> import numpy as np
        >>> flat = {"emb": np.zeros(3), "h.0.w": np.zeros(2), "h.1.w": np.ones(2)}
        >>> stacked, rest = stack_by_name(flat, "h.{i}.")
        >>> stacked["w"].shape, list(rest)
        ((2, 2), ['emb'])
        >>> stacked, rest = stack_by_name(flat, "h.{i}.", layers=[1])
        >>> stacked["w"].shape, list(rest)
        ((1, 2), ['emb', 'h.0.w'])
    """
    if not isinstance(flat, Mapping):
        raise TypeError(
            f"`flat` must be a mapping of names to arrays, got {type(flat).__name__}."
        )
    specs = {name: _spec(name, x) for name, x in flat.items()}
    LayerPattern.parse(pattern)  # a bad pattern is named before bad `layers`
    ep = parse_experts(experts)
    if not isinstance(layers, Mapping):
        chosen = None if layers is None else check_layers(layers)
        plan = plan_one_kind(specs, pattern, chosen, ep)
        return _stack(flat, plan), {name: flat[name] for name in plan.rest}
    kinds = check_kinds(layers)
    stacked: dict[str, Any] = {}
    claimed: set[str] = set()
    for label, order in kinds.items():
        plan = plan_one_kind(specs, pattern, order, ep)
        stacked[label] = _stack(flat, plan)
        claimed.update(name for _, e in plan.entries() for name in e.sources)
    return stacked, {name: x for name, x in flat.items() if name not in claimed}


def layer_owners(
    stacked: Mapping[str, Any], kinds: Mapping[str, tuple[int, ...]]
) -> dict[int, tuple[Mapping[str, Any], int]]:
    """Layer `i` -> (its kind's stacked tensors, its index along their layer axis)."""
    if not isinstance(stacked, Mapping):
        raise TypeError(
            f"`stacked` must be a mapping of kind labels to stacked tensors, got "
            f"{type(stacked).__name__}."
        )
    missing = [label for label in kinds if label not in stacked]
    extra = [label for label in stacked if label not in kinds]
    if missing or extra:
        raise ValueError(
            f"`stacked` and `layers` must have the same kind labels: `stacked` has "
            f"{list(stacked)}, `layers` {list(kinds)}."
        )
    owner: dict[int, tuple[Mapping[str, Any], int]] = {}
    for label, order in kinds.items():
        part = stacked[label]
        arg = f"stacked[{label!r}]"
        if not isinstance(part, Mapping):
            raise TypeError(
                f"`{arg}` must be a mapping of keys to stacked tensors, got "
                f"{type(part).__name__}."
            )
        n = num_stacked_layers(part, arg)
        if n != len(order):
            raise ValueError(
                f"`{arg}` holds {n} layers, but `layers[{label!r}]` lists {len(order)}."
            )
        owner.update((i, (part, j)) for j, i in enumerate(order))
    return owner


def unstack_by_name(
    stacked: Mapping[str, Any],
    pattern: str,
    /,
    rest: Mapping[str, Any] | None = None,
    *,
    layers: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    experts: str | None = None,
) -> dict[str, Any]:
    """The inverse of `stack_by_name`: stacked tensors back to per-layer names.

    Numpy tensors come back as views (no copy).

    Args:
        stacked: maps per-layer keys to arrays of shape `(N, *shape)`; with
            `layers` a mapping, maps each kind's label to such a mapping.
        pattern: the pattern given to `stack_by_name`.
        rest: tensors to add unchanged, such as the `rest` from `stack_by_name`.
        layers: the `layers` given to `stack_by_name`: the layer each index of the
            layer axis is written back to (`range(N)` when None), or one such
            sequence per kind.
        experts: the `experts` given to `stack_by_name`: keys holding its `{e}`
            expand over their second axis, expert `e` under the key with `e` in
            place of `{e}`.

    Returns:
        The flat checkpoint: `before + str(i) + after + key` maps to layer `i`'s
        tensor, layer by layer in increasing order, followed by the tensors of
        `rest`. Within a layer the experts' tensors come expert by expert
        (expert 0's, in key order, then expert 1's, ...) where its first expert
        key was.

    Raises:
        TypeError: a value is not an array; `layers` is not a sequence of ints (or
            a mapping of str labels to such).
        ValueError: the pattern is malformed; `stacked` is empty, holds a 0-d
            tensor or tensors of different leading lengths; `layers` is bad (as in
            `stack_by_name`), does not list one layer per index of the layer axis,
            or has other kinds than `stacked`; a name of `rest` would be read as a
            tensor of a layer written here.

    Examples:
        >>> import numpy as np
        >>> flat = unstack_by_name({"w": np.zeros((2, 3))}, "h.{i}.", {"emb": 1.0})
        >>> list(flat)
        ['h.0.w', 'h.1.w', 'emb']
        >>> list(unstack_by_name({"w": np.zeros((2, 3))}, "h.{i}.", layers=[5, 2]))
        ['h.2.w', 'h.5.w']
    """
    lp = LayerPattern.parse(pattern)
    if isinstance(layers, Mapping):
        owner = layer_owners(stacked, check_kinds(layers))
    else:
        n = num_stacked_layers(stacked)
        order: Sequence[int] = range(n) if layers is None else check_layers(layers)
        if len(order) != n:
            raise ValueError(
                f"`layers` lists {len(order)} layers, but the tensors of `stacked` "
                f"hold {n}."
            )
        owner = {i: (stacked, j) for j, i in enumerate(order)}
    rest = {} if rest is None else rest
    check_rest(lp, rest, None if layers is None else owner)
    ep = parse_experts(experts)
    orders = {id(part): _expert_layout(part, ep) for part, _ in owner.values()}
    if ep is not None and not any(orders[id(p)][1] for p, _ in owner.values()):
        raise ValueError(
            f"`experts` {str(ep)!r} matches no key of `stacked`; expert tensors "
            f"are stacked under keys such as {ep.expert_key('w')!r}."
        )
    flat: dict[str, Any] = {}
    for i in sorted(owner):
        part, j = owner[i]
        for key, e in orders[id(part)][0]:
            x = layer_of(part[key], j)
            if e is None or ep is None:
                flat[lp.layer_name(i, key)] = x
            else:
                sub = key[len(str(ep)) :]
                flat[lp.layer_name(i, ep.key(e, sub))] = layer_of(x, e)
    flat.update(rest)
    return flat


def _expert_layout(
    part: Mapping[str, Any], ep: Any
) -> tuple[list[tuple[str, int | None]], int]:
    """One layer's keys in writing order (`expert_order`), and E; every expert
    tensor must have a second axis of the same length."""
    flags = {k: ep is not None and ep.stacked_sub(k) is not None for k in part}
    lengths = {k: _spec(k, part[k])[0][1:2] for k in part if flags[k]}
    if not lengths:
        return [(k, None) for k in part], 0
    common = Counter(lengths.values()).most_common(1)[0][0]
    bad = [
        f"`{k}` has shape {_spec(k, part[k])[0]}"
        for k, n in lengths.items()
        if n != common or not n
    ]
    if bad or not common:
        fail(
            bad,
            f"the expert tensors of `stacked` must share a second axis of E "
            f"experts, (N, E, ...), most have E = {common[0] if common else None}",
        )
    return expert_order(list(part), flags, common[0]), common[0]
