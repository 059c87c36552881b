"""Name-level stacking: the per-layer tensors of a flat checkpoint <-> stacked tensors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._check import count_layers, fail
from .._leaf import is_array, leaf_kind, stack_leaves
from ._pattern import LayerPattern, ranges


def _fmt_spec(spec: tuple[tuple[int, ...], Hashable]) -> str:
    shape, dtype = spec
    return f"shape {tuple(shape)} dtype {dtype}"


@dataclass(frozen=True)
class Grouping:
    """How the names of a flat checkpoint split into layers and the rest.

    Attributes:
        pattern: the layer pattern.
        num_layers: N, the number of layers.
        keys: the per-layer keys, in the order of layer 0.
        names: `names[i][j]` is the full name of layer `i`'s tensor `keys[j]`.
        rest: the names the pattern does not match, in their original order.
    """

    pattern: str
    num_layers: int
    keys: tuple[str, ...]
    names: tuple[tuple[str, ...], ...]
    rest: tuple[str, ...]


def group_names(
    specs: Mapping[str, tuple[tuple[int, ...], Hashable]], pattern: str
) -> Grouping:
    """Splits names into layers by `pattern` and checks the layers agree.

    Args:
        specs: maps every name to its `(shape, dtype)`.
        pattern: the layer pattern.

    Returns:
        The grouping of the names.

    Raises:
        ValueError: the pattern is malformed or matches nothing; layers are missing;
            a layer lacks keys other layers have or has keys they lack; a tensor's
            shape or dtype differs from the same key's in the other layers.
    """
    lp = LayerPattern.parse(pattern)
    layers: dict[int, dict[str, str]] = {}
    rest: list[str] = []
    for name in specs:
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}.")
        m = lp.match(name)
        if m is None:
            rest.append(name)
        else:
            layers.setdefault(m[0], {})[m[1]] = name
    if not layers:
        sample = ", ".join(f"`{n}`" for n in list(specs)[:3]) or "no names at all"
        raise ValueError(
            f"pattern {pattern!r} matches no tensor name; the names look like "
            f"{sample}. Check the pattern (the layer index goes where `{{i}}` is)."
        )
    n = max(layers) + 1
    missing = sorted(set(range(n)) - set(layers))
    if missing:
        raise ValueError(
            f"pattern {pattern!r}: missing layers {ranges(missing)}; found layers "
            f"{ranges(layers)}, but the layers must be exactly 0..N-1."
        )

    # A key is expected when most layers have it, so one odd layer is the one blamed.
    counts = Counter(k for i in range(n) for k in layers[i])
    order = list(dict.fromkeys(k for i in range(n) for k in layers[i]))
    expected = [k for k in order if 2 * counts[k] > n] or order
    errors: list[str] = []
    for i in range(n):
        lacking = [k for k in expected if k not in layers[i]]
        extra = [k for k in layers[i] if k not in expected]
        if lacking:
            errors.append(f"layer {i} is missing keys {', '.join(map(repr, lacking))}")
        if extra:
            errors.append(f"layer {i} has extra keys {', '.join(map(repr, extra))}")
    if errors:
        fail(errors, f"pattern {pattern!r}: the {n} layers do not hold the same keys")

    keys = tuple(k for k in layers[0] if k in expected)
    for key in keys:
        per_layer = [specs[layers[i][key]] for i in range(n)]
        common = Counter(per_layer).most_common(1)[0][0]
        ref = per_layer.index(common)
        for i, spec in enumerate(per_layer):
            if spec != common:
                errors.append(
                    f"`{layers[i][key]}` has {_fmt_spec(spec)}, expected "
                    f"{_fmt_spec(common)} like `{layers[ref][key]}`"
                )
    if errors:
        fail(
            errors,
            f"pattern {pattern!r}: tensors differ in shape or dtype across layers",
        )
    names = tuple(tuple(layers[i][k] for k in keys) for i in range(n))
    return Grouping(pattern, n, keys, names, tuple(rest))


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


def check_rest(pattern: LayerPattern, rest: Mapping[str, Any] | Sequence[str]) -> None:
    """No name of `rest` is one that `pattern` reads as a layer's tensor."""
    clash = pattern.claimed(rest)
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
    shapes = [(f"`{arg}[{key!r}]`", _spec(key, x)[0]) for key, x in stacked.items()]
    reference, problems = count_layers(shapes, hint="")
    if problems:
        fail(problems, title=f"`{arg}` is not a stack of layers")
    assert reference is not None  # every tensor has a leading axis, so one was found
    return reference[0]


def stack_by_name(
    flat: Mapping[str, Any], pattern: str, /
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

    Returns:
        `(stacked, rest)`: `stacked[key]` has shape `(N, *shape)`, with layer `i` at
        index `i`; `rest` holds every name the pattern does not match, untouched.

    Raises:
        TypeError: a value is not an array.
        ValueError: `pattern` has no or several `{i}`, or matches no name; the
            matched layers are not exactly 0..N-1; layers hold different keys; a
            tensor's shape or dtype differs from the other layers'.

    Examples:
        >>> import numpy as np
        >>> flat = {"emb": np.zeros(3), "h.0.w": np.zeros(2), "h.1.w": np.ones(2)}
        >>> stacked, rest = stack_by_name(flat, "h.{i}.")
        >>> stacked["w"].shape, list(rest)
        ((2, 2), ['emb'])
    """
    if not isinstance(flat, Mapping):
        raise TypeError(
            f"`flat` must be a mapping of names to arrays, got {type(flat).__name__}."
        )
    specs = {name: _spec(name, x) for name, x in flat.items()}
    g = group_names(specs, pattern)
    stacked = {
        key: stack_leaves(
            [flat[g.names[i][j]] for i in range(g.num_layers)], "flat", f"`{key}`"
        )
        for j, key in enumerate(g.keys)
    }
    return stacked, {name: flat[name] for name in g.rest}


def unstack_by_name(
    stacked: Mapping[str, Any], pattern: str, /, rest: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The inverse of `stack_by_name`: stacked tensors back to per-layer names.

    Numpy tensors come back as views (no copy).

    Args:
        stacked: maps per-layer keys to arrays of shape `(N, *shape)`.
        pattern: the pattern given to `stack_by_name`.
        rest: tensors to add unchanged, such as the `rest` from `stack_by_name`.

    Returns:
        The flat checkpoint: `before + str(i) + after + key` maps to
        `stacked[key][i]`, followed by the tensors of `rest`.

    Raises:
        TypeError: a value is not an array.
        ValueError: the pattern is malformed; `stacked` is empty, holds a 0-d tensor
            or tensors of different leading lengths; a name of `rest` would be read
            as a layer's tensor by `pattern`, or collides with a layer's name.

    Examples:
        >>> import numpy as np
        >>> flat = unstack_by_name({"w": np.zeros((2, 3))}, "h.{i}.", {"emb": 1.0})
        >>> list(flat)
        ['h.0.w', 'h.1.w', 'emb']
    """
    lp = LayerPattern.parse(pattern)
    n = num_stacked_layers(stacked)
    rest = {} if rest is None else rest
    check_rest(lp, rest)
    flat: dict[str, Any] = {}
    for i in range(n):
        for key, x in stacked.items():
            flat[lp.layer_name(i, key)] = layer_of(x, i)
    flat.update(rest)
    return flat
