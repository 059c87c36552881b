"""Layer patterns: per-layer tensor names <-> stacked tensors, and pytrees <-> names."""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAX_LINES = 20
_DIGITS = re.compile(r"[0-9]+")
_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")


# --------------------------------------------------------------------------- patterns


def split_pattern(pattern: str) -> tuple[str, str]:
    """The parts of `pattern` before and after its one `{i}`.

    Raises:
        TypeError: `pattern` is not a string.
        ValueError: `pattern` does not hold exactly one `{i}`.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"`pattern` must be a str, got {type(pattern).__name__}")
    count = pattern.count("{i}")
    if count != 1:
        raise ValueError(
            f"`pattern` must contain exactly one `{{i}}` where the layer index goes, "
            f"got {pattern!r} with {count}; for example 'model.layers.{{i}}.'"
        )
    before, after = pattern.split("{i}")
    return before, after


def match_layer(name: str, before: str, after: str) -> tuple[int, str] | None:
    """`(i, key)` when `name == before + str(i) + after + key`, else None.

    The index is the longest run of digits after `before` and must be written in
    canonical decimal: `layers.01.` and `layers.1x.` belong to no layer, and
    `layers.10.` is layer 10, never layer 1.
    """
    if not name.startswith(before):
        return None
    digits = _DIGITS.match(name, len(before))
    if digits is None or not _CANONICAL_INT.fullmatch(digits.group()):
        return None
    tail = name[digits.end() :]
    if not tail.startswith(after):
        return None
    return int(digits.group()), tail[len(after) :]


def stacked_name(pattern: str, key: str) -> str:
    """The name of the stacked tensor `key` in a stacked checkpoint.

    It is the per-layer name with the literal `{i}` left in, so it cannot collide with
    a per-layer name: `stacked_name("model.layers.{i}.", "mlp.up_proj.weight")` is
    `"model.layers.{i}.mlp.up_proj.weight"`.
    """
    before, after = split_pattern(pattern)
    return before + "{i}" + after + key


def _ranges(indices: Iterable[int]) -> str:
    """`[0, 1, 2, 5, 7, 8]` -> `"0-2, 5, 7-8"`."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _raise_all(header: str, lines: Sequence[str]) -> None:
    shown = list(lines[:_MAX_LINES])
    if len(lines) > _MAX_LINES:
        shown.append(f"... and {len(lines) - _MAX_LINES} more")
    raise ValueError(header + "\n  " + "\n  ".join(shown))


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
    before, after = split_pattern(pattern)
    layers: dict[int, dict[str, str]] = {}
    rest: list[str] = []
    for name in specs:
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        m = match_layer(name, before, after)
        if m is None:
            rest.append(name)
        else:
            layers.setdefault(m[0], {})[m[1]] = name
    if not layers:
        sample = ", ".join(f"`{n}`" for n in list(specs)[:3]) or "no names at all"
        raise ValueError(
            f"pattern {pattern!r} matches no tensor name; the names look like "
            f"{sample}. Check the pattern (the layer index goes where `{{i}}` is)"
        )
    n = max(layers) + 1
    missing = sorted(set(range(n)) - set(layers))
    if missing:
        raise ValueError(
            f"pattern {pattern!r}: missing layers {_ranges(missing)}; found layers "
            f"{_ranges(layers)}, but the layers must be exactly 0..N-1"
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
        _raise_all(
            f"pattern {pattern!r}: the {n} layers do not hold the same keys:", errors
        )

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
        _raise_all(
            f"pattern {pattern!r}: tensors differ in shape or dtype across layers:",
            errors,
        )
    names = tuple(tuple(layers[i][k] for k in keys) for i in range(n))
    return Grouping(pattern, n, keys, names, tuple(rest))


def detect_pattern(names: Iterable[str]) -> str:
    """Finds the layer pattern of a per-layer checkpoint from its tensor names.

    Every name whose dotted components include an integer gives a candidate
    `<components before it>.{i}.` from its *first* integer component (so experts
    nested inside layers never compete with the layers). The pattern is the one
    candidate seen with at least two layer indices.

    Args:
        names: the tensor names.

    Returns:
        The pattern, such as `"model.layers.{i}."`.

    Raises:
        ValueError: no candidate, or several (listed, with their layer counts).

    Examples:
        >>> detect_pattern(["embed.weight", "h.0.attn.weight", "h.1.attn.weight"])
        'h.{i}.'
    """
    found: dict[str, set[int]] = {}
    for name in names:
        parts = name.split(".")
        for j, part in enumerate(parts[:-1]):
            if _CANONICAL_INT.fullmatch(part):
                prefix = "".join(p + "." for p in parts[:j])
                found.setdefault(prefix + "{i}.", set()).add(int(part))
                break
    candidates = {p: idx for p, idx in found.items() if len(idx) >= 2}
    if len(candidates) == 1:
        return next(iter(candidates))
    if not candidates:
        raise ValueError(
            "found no layer pattern (no name prefix is followed by two or more "
            "layer indices); give one explicitly, e.g. --pattern 'model.layers.{i}.'"
        )
    listed = "; ".join(
        f"{p!r} ({len(idx)} layers: {_ranges(idx)})" for p, idx in candidates.items()
    )
    raise ValueError(
        f"the layer pattern is ambiguous, candidates are {listed}; choose one with "
        f"--pattern (or the `pattern` argument)"
    )


# ---------------------------------------------------------------- in-memory stacking


def _jax() -> Any:
    """The jax module if it is loaded, else None.

    The `stackedtree` command converts files with numpy alone and never imports jax (it
    would dominate its start-up time); when jax is not loaded, no jax array or
    ShapeDtypeStruct can exist, so the jax cases need no import.
    """
    return sys.modules.get("jax")


def _is_sds(x: Any) -> bool:
    jax = _jax()
    return jax is not None and isinstance(x, jax.ShapeDtypeStruct)


def _is_jax_array(x: Any) -> bool:
    jax = _jax()
    return jax is not None and isinstance(x, jax.Array)


def _spec(name: str, x: Any) -> tuple[tuple[int, ...], np.dtype]:
    if isinstance(x, np.ndarray | np.generic) or _is_jax_array(x) or _is_sds(x):
        return tuple(x.shape), np.dtype(x.dtype)
    raise TypeError(
        f"tensor `{name}` must be a numpy or jax array (or a jax.ShapeDtypeStruct), "
        f"got {type(x).__name__}"
    )


def _stack(name: str, xs: Sequence[Any]) -> Any:
    if all(_is_sds(x) for x in xs):
        return _jax().ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
    if any(_is_sds(x) for x in xs):
        raise TypeError(
            f"tensor `{name}` mixes jax.ShapeDtypeStruct and arrays across layers"
        )
    if any(_is_jax_array(x) for x in xs):
        jnp = _jax().numpy
        return jnp.stack([jnp.asarray(x) for x in xs])
    return np.stack([np.asarray(x) for x in xs])


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
        raise TypeError(f"`flat` must be a mapping of names to arrays, got {flat!r}")
    specs = {name: _spec(name, x) for name, x in flat.items()}
    g = group_names(specs, pattern)
    stacked = {
        key: _stack(key, [flat[g.names[i][j]] for i in range(g.num_layers)])
        for j, key in enumerate(g.keys)
    }
    return stacked, {name: flat[name] for name in g.rest}


def num_stacked_layers(stacked: Mapping[str, Any], argname: str = "stacked") -> int:
    """The common leading length of the stacked tensors.

    Raises:
        ValueError: `stacked` is empty, holds a 0-d tensor, or the lengths disagree.
    """
    if not stacked:
        raise ValueError(f"`{argname}` holds no tensors, so it has no layers")
    lengths = {}
    for key, x in stacked.items():
        shape, _ = _spec(key, x)
        if not shape:
            raise ValueError(
                f"`{argname}[{key!r}]` is 0-d; a stacked tensor needs a layer axis"
            )
        lengths[key] = shape[0]
    n = Counter(lengths.values()).most_common(1)[0][0]
    bad = [f"{k!r} has {m}" for k, m in lengths.items() if m != n]
    if bad:
        raise ValueError(
            f"`{argname}` tensors disagree on the number of layers: most have {n}, "
            f"but {', '.join(bad)}"
        )
    return n


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
    before, after = split_pattern(pattern)
    n = num_stacked_layers(stacked)
    rest = {} if rest is None else rest
    clash = [name for name in rest if match_layer(name, before, after) is not None]
    if clash:
        raise ValueError(
            f"`rest` holds names that pattern {pattern!r} reads as layer tensors: "
            f"{', '.join(map(repr, clash[:_MAX_LINES]))}; they belong in `stacked`"
        )
    flat: dict[str, Any] = {}
    for i in range(n):
        for key, x in stacked.items():
            if _is_sds(x):
                flat[before + str(i) + after + key] = _jax().ShapeDtypeStruct(
                    x.shape[1:], x.dtype
                )
            else:
                flat[before + str(i) + after + key] = x[i, ...]
    flat.update(rest)
    return flat


# ------------------------------------------------------------------ pytrees <-> names


def _entry_str(entry: Any) -> str:
    import jax

    if isinstance(entry, jax.tree_util.GetAttrKey):
        return str(entry.name)
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def _names_and_leaves(tree: Any, sep: str) -> tuple[list[str], list[Any], Any]:
    if not isinstance(sep, str):
        raise TypeError(f"`sep` must be a str, got {type(sep).__name__}")
    import jax

    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [sep.join(_entry_str(e) for e in path) for path, _ in path_leaves]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise ValueError(
            f"several leaves share the names {', '.join(map(repr, dup))} (a key "
            f"contains {sep!r}, or keys like 1 and '1' coincide); pick another `sep`"
        )
    return names, [leaf for _, leaf in path_leaves], treedef


def _is_tensor(x: Any) -> bool:
    return isinstance(x, np.ndarray | np.generic) or _is_jax_array(x) or _is_sds(x)


def flatten_names(tree: Any, /, sep: str = ".") -> dict[str, Any]:
    """Flattens a pytree's array leaves to `{name: array}`, named by their key paths.

    Attribute names (NamedTuples, dataclasses, Equinox modules), dict keys and
    sequence indices are joined with `sep`, so a stacked `DecoderBlock` gives names
    such as `attention.q_proj` that can be saved with `save_flat`. Static (non-array)
    leaves, such as an activation name, are left out: they belong to the code, and
    `unflatten_names` takes them back from its template.

    Args:
        tree: any pytree.
        sep: the separator between path entries.

    Returns:
        The leaves by name, in `jax.tree_util` flattening order.

    Raises:
        ValueError: two leaves get the same name.

    Examples:
        >>> import numpy as np
        >>> tree = {"attention": {"q_proj": np.zeros(2), "act": "gelu"}, "norm": [np.ones(1)]}
        >>> {name: x.shape for name, x in flatten_names(tree).items()}
        {'attention.q_proj': (2,), 'norm.0': (1,)}
    """
    names, leaves, _ = _names_and_leaves(tree, sep)
    return {n: x for n, x in zip(names, leaves, strict=True) if _is_tensor(x)}


def unflatten_names(flat: Mapping[str, Any], like: Any, /, sep: str = ".") -> Any:
    """Rebuilds a pytree with the structure of `like` from `flatten_names` names.

    Args:
        flat: maps names to leaves, as returned by `flatten_names` or `load_flat`.
        like: a pytree of the wanted structure. Its array leaves (arrays or
            `jax.ShapeDtypeStruct`s) are replaced from `flat`; its static leaves are
            kept unless `flat` names them.
        sep: the separator used by `flatten_names`.

    Returns:
        A pytree of the structure of `like` whose leaves come from `flat`.

    Raises:
        ValueError: names of `like` are missing from `flat`, or `flat` holds names
            that `like` does not have (both listed).

    Examples:
        >>> import numpy as np
        >>> back = unflatten_names({"w": np.ones(2)}, {"w": np.zeros(2), "act": "gelu"})
        >>> back["w"].tolist(), back["act"]
        ([1.0, 1.0], 'gelu')
    """
    names, template, treedef = _names_and_leaves(like, sep)
    missing = [
        n
        for n, x in zip(names, template, strict=True)
        if n not in flat and _is_tensor(x)
    ]
    wanted = set(names)
    extra = [n for n in flat if n not in wanted]
    if missing or extra:
        lines = []
        if missing:
            lines.append(f"missing from `flat`: {', '.join(map(repr, missing))}")
        if extra:
            lines.append(f"not in `like`: {', '.join(map(repr, extra))}")
        raise ValueError(
            "the names of `flat` do not match the leaves of `like`; " + "; ".join(lines)
        )
    return treedef.unflatten(
        [flat.get(n, x) for n, x in zip(names, template, strict=True)]
    )
