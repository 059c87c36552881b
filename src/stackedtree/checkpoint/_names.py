"""Name-level stacking: the per-layer tensors of a flat checkpoint <-> stacked tensors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._check import count_layers, fail
from .._leaf import is_array, leaf_kind, stack_leaves
from ._pattern import LayerPattern, check_label, kind_label, ranges


def _fmt_spec(spec: tuple[tuple[int, ...], Hashable]) -> str:
    shape, dtype = spec
    return f"shape {tuple(shape)} dtype {dtype}"


@dataclass(frozen=True)
class Grouping:
    """How the names of a flat checkpoint split into layers and the rest.

    Attributes:
        pattern: the layer pattern.
        num_layers: N, the number of layers grouped.
        keys: the per-layer keys, in the order of the first layer.
        names: `names[j][k]` is the full name of layer `layers[j]`'s tensor `keys[k]`.
        rest: the names not grouped, in their original order.
        layers: the layers grouped, in order: `range(N)` unless chosen.
    """

    pattern: str
    num_layers: int
    keys: tuple[str, ...]
    names: tuple[tuple[str, ...], ...]
    rest: tuple[str, ...]
    layers: Sequence[int] = ()


@dataclass(frozen=True)
class Kind:
    """The layers of one kind: those holding the same set of keys.

    Attributes:
        label: the kind's label (`A`, `B`, ... in the order of their first layers).
        layers: its layers, in increasing order.
        keys: its per-layer keys, in the order of its first layer.
        names: `names[j][k]` is the full name of layer `layers[j]`'s tensor `keys[k]`.
    """

    label: str
    layers: tuple[int, ...]
    keys: tuple[str, ...]
    names: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Kinds:
    """How the names of a flat checkpoint split into kinds of layers and the rest.

    Attributes:
        pattern: the layer pattern.
        num_layers: N, the number of layers of all kinds.
        kinds: the kinds, in the order of their first layers.
        rest: the names the pattern does not match, in their original order.
    """

    pattern: str
    num_layers: int
    kinds: tuple[Kind, ...]
    rest: tuple[str, ...]

    @property
    def layers(self) -> dict[str, list[int]]:
        """Each kind's label -> its layers: what `stack_by_name(layers=)` takes."""
        return {kind.label: list(kind.layers) for kind in self.kinds}


# ------------------------------------------------------------------- `layers` checks


def _plural(word: str, items: Sequence[int]) -> str:
    """`layer 3`, `layers 3, 5`: the word, plural with several, and their ranges."""
    return f"{word}{'s' if len(items) != 1 else ''} {ranges(items)}"


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
            f"`{arg}` repeats {_plural('layer', repeated)}; list each layer once."
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


# ------------------------------------------------------------------------ grouping


def _split(
    specs: Mapping[str, Any], lp: LayerPattern, pattern: str
) -> dict[int, dict[str, str]]:
    """Layer `i` -> its key -> its name; refuses a pattern that matches no name."""
    found: dict[int, dict[str, str]] = {}
    for name in specs:
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}.")
        m = lp.match(name)
        if m is not None:
            found.setdefault(m[0], {})[m[1]] = name
    if not found:
        sample = ", ".join(f"`{n}`" for n in list(specs)[:3]) or "no names at all"
        raise ValueError(
            f"pattern {pattern!r} matches no tensor name; the names look like "
            f"{sample}. Check the pattern (the layer index goes where `{{i}}` is)."
        )
    return found


def _all_layers(found: Mapping[int, Any], pattern: str) -> int:
    """N, when the layers found are exactly 0..N-1."""
    n = max(found) + 1
    missing = sorted(set(range(n)) - set(found))
    if missing:
        raise ValueError(
            f"pattern {pattern!r}: missing layers {ranges(missing)}; found layers "
            f"{ranges(found)}, but the layers must be exactly 0..N-1."
        )
    return n


def _same_keys(
    found: Mapping[int, dict[str, str]], order: Sequence[int], header: str
) -> tuple[str, ...]:
    """The keys every layer of `order` holds, in the first layer's order."""
    # A key is expected when most layers have it, so one odd layer is the one blamed.
    counts = Counter(k for i in order for k in found[i])
    seen = list(dict.fromkeys(k for i in order for k in found[i]))
    expected = [k for k in seen if 2 * counts[k] > len(order)] or seen
    errors: list[str] = []
    for i in order:
        lacking = [k for k in expected if k not in found[i]]
        extra = [k for k in found[i] if k not in expected]
        if lacking:
            errors.append(f"layer {i} is missing keys {', '.join(map(repr, lacking))}")
        if extra:
            errors.append(f"layer {i} has extra keys {', '.join(map(repr, extra))}")
    if errors:
        fail(errors, header)
    return tuple(k for k in found[order[0]] if k in expected)


def _spec_problems(
    specs: Mapping[str, tuple[tuple[int, ...], Hashable]],
    found: Mapping[int, dict[str, str]],
    order: Sequence[int],
    keys: Sequence[str],
) -> list[str]:
    """Each tensor whose shape or dtype differs from its key's in most layers."""
    errors: list[str] = []
    for key in keys:
        per_layer = [specs[found[i][key]] for i in order]
        common = Counter(per_layer).most_common(1)[0][0]
        ref = order[per_layer.index(common)]
        for i, spec in zip(order, per_layer, strict=True):
            if spec != common:
                errors.append(
                    f"`{found[i][key]}` has {_fmt_spec(spec)}, expected "
                    f"{_fmt_spec(common)} like `{found[ref][key]}`"
                )
    return errors


def group_names(
    specs: Mapping[str, tuple[tuple[int, ...], Hashable]],
    pattern: str,
    *,
    layers: Sequence[int] | None = None,
) -> Grouping:
    """Splits names into layers by `pattern` and checks the layers agree.

    Args:
        specs: maps every name to its `(shape, dtype)`.
        pattern: the layer pattern.
        layers: the layers to group, in order; all of them (`0..N-1`) when None.
            The names of the other layers go to `rest`.

    Returns:
        The grouping of the names.

    Raises:
        TypeError: `layers` is not a sequence of ints.
        ValueError: the pattern is malformed or matches nothing; layers are missing
            (or `layers` is bad, or lists a layer the names lack); a layer lacks
            keys other layers have or has keys they lack; a tensor's shape or dtype
            differs from the same key's in the other layers.
    """
    lp = LayerPattern.parse(pattern)
    chosen = None if layers is None else check_layers(layers)
    found = _split(specs, lp, pattern)
    if chosen is None:
        order: Sequence[int] = range(_all_layers(found, pattern))
        what = f"the {len(order)} layers"
    else:
        order = chosen
        absent = [i for i in order if i not in found]
        if absent:
            raise ValueError(
                f"`layers` lists {_plural('layer', absent)}, which pattern "
                f"{pattern!r} finds no tensor of; it finds layers {ranges(found)}."
            )
        what = f"layers {ranges(order)}"
    keys = _same_keys(
        found, order, f"pattern {pattern!r}: {what} do not hold the same keys"
    )
    errors = _spec_problems(specs, found, order, keys)
    if errors:
        fail(
            errors,
            f"pattern {pattern!r}: tensors differ in shape or dtype across layers",
        )
    names = tuple(tuple(found[i][k] for k in keys) for i in order)
    claimed = {name for i in order for name in found[i].values()}
    rest = tuple(name for name in specs if name not in claimed)
    return Grouping(pattern, len(order), keys, names, rest, order)


def _kinds_of(found: Mapping[int, dict[str, str]], n: int) -> dict[str, list[int]]:
    """Layers `0..n-1` by their set of keys, labelled in order of first layers."""
    by_keys: dict[frozenset[str], list[int]] = {}
    for i in range(n):
        by_keys.setdefault(frozenset(found[i]), []).append(i)
    return {kind_label(j): order for j, order in enumerate(by_keys.values())}


def group_kinds(
    specs: Mapping[str, tuple[tuple[int, ...], Hashable]], pattern: str
) -> Kinds:
    """Splits names into kinds of layers by `pattern`: layers with the same keys.

    Kinds are labelled `A`, `B`, ... in the order of their first layers; a uniform
    checkpoint is one kind, `A`.

    Raises:
        ValueError: the pattern is malformed or matches nothing; layers are missing;
            a tensor's shape or dtype differs from the same key's in the other
            layers of its kind.
    """
    lp = LayerPattern.parse(pattern)
    found = _split(specs, lp, pattern)
    n = _all_layers(found, pattern)
    labelled = _kinds_of(found, n)
    kinds: list[Kind] = []
    errors: list[str] = []
    for label, order in labelled.items():
        keys = tuple(found[order[0]])
        problems = _spec_problems(specs, found, order, keys)
        if len(labelled) > 1:
            problems = [f"kind {label} (layers {ranges(order)}): {p}" for p in problems]
        errors += problems
        names = tuple(tuple(found[i][k] for k in keys) for i in order)
        kinds.append(Kind(label, tuple(order), keys, names))
    if errors:
        fail(
            errors,
            f"pattern {pattern!r}: tensors differ in shape or dtype across layers"
            + (" of one kind" if len(kinds) > 1 else ""),
        )
    rest = tuple(name for name in specs if lp.match(name) is None)
    return Kinds(pattern, n, tuple(kinds), rest)


def detect_kinds(names: Iterable[str], pattern: str, /) -> dict[str, list[int]]:
    """The kinds of layers of a per-layer checkpoint: layers holding the same keys.

    The kinds are labelled `A`, `B`, ... in the order of their first layers, so the
    labels depend only on which layers hold which keys. A checkpoint whose layers all
    hold the same keys is one kind, `A`.

    Args:
        names: the tensor names (a flat checkpoint's keys will do).
        pattern: the layer pattern, with one `{i}`.

    Returns:
        Each kind's label -> its layers, in increasing order: the `layers` that
        `stack_by_name` and `unstack_by_name` take.

    Raises:
        ValueError: the pattern is malformed or matches nothing; the layers found
            are not exactly 0..N-1.

    Examples:
        >>> names = ["h.0.mlp.w", "h.1.mlp.w", "h.2.moe.w", "h.3.moe.w", "emb"]
        >>> detect_kinds(names, "h.{i}.")
        {'A': [0, 1], 'B': [2, 3]}
    """
    lp = LayerPattern.parse(pattern)
    found = _split(dict.fromkeys(names), lp, pattern)
    return _kinds_of(found, _all_layers(found, pattern))


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
    reference, problems = count_layers(shapes, hint="")
    if problems:
        fail(problems, title=f"`{arg}` is not a stack of layers")
    assert reference is not None  # every tensor has a leading axis, so one was found
    return reference[0]


def _stack(flat: Mapping[str, Any], g: Grouping) -> dict[str, Any]:
    return {
        key: stack_leaves(
            [flat[g.names[j][k]] for j in range(g.num_layers)], f"`flat` at `{key}`"
        )
        for k, key in enumerate(g.keys)
    }


def stack_by_name(
    flat: Mapping[str, Any],
    pattern: str,
    /,
    *,
    layers: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
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

    Returns:
        `(stacked, rest)`: `stacked[key]` has shape `(N, *shape)` (per kind,
        `stacked[label][key]` has shape `(len(layers[label]), *shape)`); `rest`
        holds every other name, untouched.

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
    if not isinstance(layers, Mapping):
        g = group_names(specs, pattern, layers=layers)
        return _stack(flat, g), {name: flat[name] for name in g.rest}
    kinds = check_kinds(layers)
    stacked: dict[str, Any] = {}
    claimed: set[str] = set()
    for label, order in kinds.items():
        g = group_names(specs, pattern, layers=order)
        stacked[label] = _stack(flat, g)
        claimed.update(name for names in g.names for name in names)
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

    Returns:
        The flat checkpoint: `before + str(i) + after + key` maps to layer `i`'s
        tensor, layer by layer in increasing order, followed by the tensors of
        `rest`.

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
    flat: dict[str, Any] = {}
    for i in sorted(owner):
        part, j = owner[i]
        for key, x in part.items():
            flat[lp.layer_name(i, key)] = layer_of(x, j)
    flat.update(rest)
    return flat
