"""The layout of a per-layer checkpoint written from stacked arrays.

Which tensors `save_sharded` writes, in which order, and where: a stacked array
(`model.layers.{i}.mlp.up_proj.weight`, or `model.layers.{i:B}...` for the layers of
kind `B`) becomes one tensor per layer, an expert array
(`model.layers.{i}.mlp.experts.{e}.up_proj.weight`, `(N, E, ...)`) one per layer and
expert; and the tensors go in the order `stackedtree unstack` writes them for a
stacked file holding the arrays in their order (every layer's tensors where the first
stacked array was, layer by layer, each layer's in its kind's order, its experts'
expert by expert where its first expert array was: `_experts.expert_order`). A
folder's tensors are cut into shards as Hugging Face cuts them, each file's header
comes from `safetensors_header`, and so every tensor's byte offset is known from
names, dtypes and shapes alone: every process computes the same layout.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from .._check import fail
from ._experts import ExpertPattern, expert_order
from ._layer_pattern import LayerPattern
from ._names import check_kinds
from ._safetensors import dtype_code, safetensors_header
from ._text import ranges

HF_MAX_SHARD_SIZE = 5 * 10**9
"""The shard size when `max_shard_size` is None: Hugging Face's default, 5 GB."""

INDEX_NAME = "model.safetensors.index.json"

_STACKED = re.compile(r"\{i(?::([A-Za-z0-9_]+))?\}")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class _Out(NamedTuple):
    """One tensor of the output: its name, dtype and shape, and where it comes from:
    array `source`, whole (`layer` None) or index `layer` of its leading axis, and
    of an expert array `(N, E, ...)` index `expert` of its second."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    source: str
    layer: int | None
    expert: int | None


Key = tuple[str, int | None, int | None]
"""An output tensor by where it comes from: `(source, layer, expert)`."""


class _Placed(NamedTuple):
    file: int
    offset: int
    shape: tuple[int, ...]


class Layout(NamedTuple):
    """The output files, the same in every process.

    Attributes:
        files: each file's name (relative to the output folder), header and size.
        where: `(source, layer, expert)` -> the file, byte offset and shape of
            that tensor (`layer`, `expert` None where the array has no such axis).
        lead: each array's leading axes that index tensors: 0 (the array is one
            tensor), 1 (layers) or 2 (layers, experts).
        index_text: the index file's text, for a folder.
    """

    files: list[tuple[str, bytes, int]]
    where: dict[Key, _Placed]
    lead: dict[str, int]
    index_text: str | None


# --------------------------------------------------------------------- the plan


def plan_specs(arrays: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    if not isinstance(arrays, Mapping):
        raise TypeError(
            f"`arrays` must map names to arrays, got {type(arrays).__name__}."
        )
    specs = {}
    for name, x in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"`arrays` must have str names, got {name!r}.")
        if not isinstance(x, jax.Array | np.ndarray | np.generic):
            raise TypeError(
                f"`arrays[{name!r}]` must be a jax or numpy array, got "
                f"{type(x).__name__}."
            )
        if isinstance(x, jax.core.Tracer):
            raise TypeError(f"`arrays[{name!r}]` is a tracer: save outside `jit`.")
        specs[name] = (tuple(int(d) for d in x.shape), np.dtype(x.dtype))
        dtype_code(specs[name][1], name)
    return specs


def _layers(
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    stacked: Mapping[str, str | None],
    kinds: Any,
) -> dict[int, tuple[str | None, int]]:
    """Layer `i` -> (its kind's label, its index along that kind's layer axis);
    `stacked` gives each stacked name's label."""
    labels = set(stacked.values())
    if None in labels and len(labels) > 1:
        fail(
            [repr(n) for n, label in stacked.items() if label is not None][:1]
            + [repr(n) for n, label in stacked.items() if label is None][:1],
            "`arrays` mixes uniform stacked names (`{i}`) with kind-labelled ones "
            "(`{i:B}`), which no stacked checkpoint holds",
        )
    leading = {n: specs[n][0][:1] for n in stacked}
    if labels <= {None}:
        counts = Counter(leading.values())
        lead = max(counts, key=lambda s: counts[s]) if counts else ()
        n = lead[0] if lead else 0
        if kinds is not None:
            found = check_kinds(kinds, "kinds")
            if list(found.values()) != [tuple(range(n))]:
                raise ValueError(
                    "`kinds` gives several kinds (or layers out of order), but no "
                    "name of `arrays` carries a kind label (`model.layers.{i:B}...`)."
                )
        given: dict[str | None, tuple[int, ...]] = {None: tuple(range(n))}
    elif kinds is None:
        raise ValueError(
            f"`arrays` holds kind-labelled stacked names (kinds {sorted(map(str, labels))}"
            "); pass `kinds`, each kind's layers ({label: [layer indices]}, as "
            "`detect_kinds` gives them)."
        )
    else:
        given = dict(check_kinds(kinds, "kinds").items())
        missing = sorted(str(k) for k in labels - set(given))
        unused = sorted(str(k) for k in set(given) - labels)
        if missing or unused:
            raise ValueError(
                f"`kinds` must give the kinds of `arrays`' names: `arrays` has "
                f"{sorted(map(str, labels))}, `kinds` {sorted(map(str, given))}."
            )
        layers = sorted(i for order in given.values() for i in order)
        if layers != list(range(len(layers))):
            raise ValueError(
                f"`kinds` must hold the layers 0..N-1, each once, but holds layers "
                f"{ranges(layers)}."
            )
    problems = [
        f"`{n}` has shape {specs[n][0]}, but "
        + (
            f"the other stacked arrays hold {len(given[None])} layers"
            if label is None
            else f"kind {label} holds {len(given[label])} layers"
        )
        for n, label in stacked.items()
        if leading[n] != (len(given[label]),)
    ]
    if problems:
        fail(problems, "`arrays` has stacked arrays of the wrong number of layers")
    return {
        i: (label, j) for label, order in given.items() for j, i in enumerate(order)
    }


class _Stacked(NamedTuple):
    """A stacked name, `before{i}key` or `before{i:label}key`; `experts` is the
    expert pattern of `key` (up to its `{e}`) for an expert array `(N, E, ...)`."""

    before: str
    label: str | None
    key: str
    experts: ExpertPattern | None


def _parse_stacked(names: Iterable[str]) -> dict[str, _Stacked]:
    """The stacked names among `names`, parsed; the expert names are checked to be
    as a stacked file holds them: `{e}` once, in the per-layer key, one pattern."""
    stacked: dict[str, _Stacked] = {}
    bad: list[str] = []
    for name in names:
        m = _STACKED.search(name)
        if m is None:
            if "{e}" in name:
                bad.append(f"`{name}` has `{{e}}` but no `{{i}}`")
            continue
        before, key = name[: m.start()], name[m.end() :]
        ep = None
        if "{e}" in before or key.count("{e}") > 1:
            bad.append(f"`{name}` has `{{e}}` other than once after `{{i}}`")
        elif "{e}" in key:
            ep = ExpertPattern.parse(key[: key.index("{e}") + 3])
        stacked[name] = _Stacked(before, m.group(1), key, ep)
    if bad:
        fail(bad, "`arrays` has expert names (`{e}`) that are not stacked names")
    for what, values in (
        ("layer", {s.before + "{i}" for s in stacked.values()}),
        (
            "expert",
            {f"{s.before}{{i}}{s.experts}" for s in stacked.values() if s.experts},
        ),
    ):
        if len(values) > 1:
            fail(
                [repr(v) for v in sorted(values)],
                f"`arrays` has stacked names of several {what} patterns; a "
                f"checkpoint has one",
            )
    return stacked


def _num_experts(
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    stacked: Mapping[str, _Stacked],
) -> dict[str | None, int]:
    """Each kind's E, the second axis that its expert arrays share (0: none)."""
    lengths: dict[str | None, dict[str, int]] = {}
    short = []
    for name, s in stacked.items():
        if s.experts is not None:
            shape = specs[name][0]
            if len(shape) < 2 or shape[1] == 0:
                short.append(f"`{name}` has shape {shape}")
            else:
                lengths.setdefault(s.label, {})[name] = shape[1]
    if short:
        fail(
            short, "an expert array (`{e}`) is (layers, experts, ...) with experts >= 1"
        )
    for label, found in lengths.items():
        if len(set(found.values())) > 1:
            fail(
                [f"`{n}` holds {e}" for n, e in found.items()],
                "the expert arrays "
                + ("" if label is None else f"of kind {label} ")
                + "must hold the same number of experts",
            )
    return {label: next(iter(found.values())) for label, found in lengths.items()}


def plan_tensors(
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], kinds: Any
) -> list[_Out]:
    """The output tensors, in the order `stackedtree unstack` writes them for a
    stacked file holding `specs` in their order: every layer's tensors where the
    first stacked array was, layer by layer, each layer's in its kind's order, its
    experts' expert by expert where its first expert array was."""
    stacked = _parse_stacked(specs)
    owners = _layers(specs, {n: s.label for n, s in stacked.items()}, kinds)
    experts = _num_experts(specs, stacked)
    out: list[_Out] = []
    for name, (shape, dtype) in specs.items():
        if name not in stacked:
            out.append(_Out(name, dtype, shape, name, None, None))
        elif name == next(iter(stacked)):
            for i in range(len(owners)):
                label, j = owners[i]
                own = [s for s, st in stacked.items() if st.label == label]
                flags = {s: stacked[s].experts is not None for s in own}
                for s, e in expert_order(own, flags, experts.get(label, 0)):
                    out.append(_layer_tensor(s, stacked[s], specs[s], i, j, e))
    counts = Counter(t.name for t in out)
    twice = [
        f"`{t.name}` comes from `{t.source}`"
        + "".join(f"[{k}]" for k in (t.layer, t.expert) if k is not None)
        for t in out
        if counts[t.name] > 1
    ]
    if twice:
        fail(twice, "`arrays` has names that unstack to the same per-layer name")
    return out


def _layer_tensor(
    source: str,
    s: _Stacked,
    spec: tuple[tuple[int, ...], np.dtype],
    i: int,
    j: int,
    e: int | None,
) -> _Out:
    """Layer `i`'s tensor (index `j` of its kind), expert `e`'s when not None."""
    lp = LayerPattern(s.before, "")
    shape, dtype = spec
    if e is None or s.experts is None:
        return _Out(lp.layer_name(i, s.key), dtype, shape[1:], source, j, None)
    key = s.experts.key(e, s.key[len(str(s.experts)) :])
    return _Out(lp.layer_name(i, key), dtype, shape[2:], source, j, e)


def shard_size(max_shard_size: Any) -> int:
    """`max_shard_size` in bytes: an int, or a string such as `"5GB"` or `"2GiB"`."""
    if isinstance(max_shard_size, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", max_shard_size)
        if m is None or m.group(2).upper() not in _UNITS:
            raise ValueError(
                f"`max_shard_size` must be a number of bytes or a size such as '5GB' "
                f"or '2GiB', got {max_shard_size!r}."
            )
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    elif isinstance(max_shard_size, int | np.integer) and not isinstance(
        max_shard_size, bool
    ):
        size = int(max_shard_size)
    else:
        raise TypeError(
            f"`max_shard_size` must be an int or a str, got "
            f"{type(max_shard_size).__name__}."
        )
    if size < 1:
        raise ValueError(f"`max_shard_size` must be at least 1 byte, got {size}.")
    return size


def _nbytes(t: _Out) -> int:
    return math.prod(t.shape) * t.dtype.itemsize


def _shards(tensors: list[_Out], limit: int) -> list[list[_Out]]:
    """Consecutive tensors into shards of at most `limit` bytes, as Hugging Face cuts
    them: a new shard when the next tensor would overflow the current one."""
    large = [
        f"`{t.name}` {t.dtype}{list(t.shape)} holds {_nbytes(t)} bytes"
        for t in tensors
        if _nbytes(t) > limit
    ]
    if large:
        fail(large, f"`max_shard_size` ({limit} bytes) is smaller than a tensor")
    shards: list[list[_Out]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + _nbytes(t) > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += _nbytes(t)
    return shards


def plan_layout(
    tensors: list[_Out],
    folder: bool,
    name: str,
    max_shard_size: int,
    metadata: Mapping[str, str] | None,
) -> Layout:
    """Every output file's name, header and size, and where each tensor goes."""
    groups = _shards(tensors, max_shard_size) if folder else [tensors]
    n = len(groups)
    files: list[tuple[str, bytes, int]] = []
    where: dict[Key, _Placed] = {}
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors" if folder else name
        header = safetensors_header(
            [(t.name, t.dtype, t.shape) for t in group], metadata
        )
        offset = len(header)
        for t in group:
            where[(t.source, t.layer, t.expert)] = _Placed(k, offset, t.shape)
            weight_map[t.name] = fname
            offset += _nbytes(t)
        files.append((fname, header, offset))
    index = None
    if folder:
        total = sum(_nbytes(t) for t in tensors)
        body = {"metadata": {"total_size": total}, "weight_map": weight_map}
        index = json.dumps(body, indent=2, sort_keys=True) + "\n"
    lead = {t.source: (t.layer is not None) + (t.expert is not None) for t in tensors}
    return Layout(files, where, lead, index)
