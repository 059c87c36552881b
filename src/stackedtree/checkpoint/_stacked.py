"""The stacked-checkpoint format, and reading and writing it whole.

A *stacked checkpoint* is a flat checkpoint whose layer tensors are stored once each,
with a leading layer axis, under their stacked name (`LayerPattern.stacked_name`:
`model.layers.{i}.mlp.up_proj.weight`, shape `(N, ...)`); every other tensor keeps its
name. Its metadata records the pattern and N (`stackedtree.pattern`,
`stackedtree.num_layers`), so unstacking needs no pattern.

A checkpoint whose layers are of several *kinds* (layers holding different keys)
stacks each kind on its own, under the kind's stacked names
(`model.layers.{i:B}.mlp.up_proj.weight`, shape `(len(layers of B), ...)`), and
records the kinds in `stackedtree.kinds`: a JSON object mapping each label to its
layers, in the order of the layer axis (`{"A":[0,1,2],"B":[3,4,5]}`). Every layer
`0..N-1` is in exactly one kind. A file of one kind has no `stackedtree.kinds`.

A mixture-of-experts checkpoint stacks each expert tensor's experts on a second axis,
`(N, E, ...)`, under its key with the expert index kept as `{e}`
(`model.layers.{i}.mlp.experts.{e}.up_proj.weight`), and records the expert pattern
in `stackedtree.experts` (`"mlp.experts.{e}."`). A file without expert axes has no
`stackedtree.experts`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .._check import fail
from ._experts import ExpertPattern
from ._io import Checkpoint, PathLike, Paths, load_flat, read_checkpoint, save_flat
from ._layer_pattern import LayerPattern, check_label
from ._limits import load_json
from ._names import check_kinds, check_rest, layer_owners, num_stacked_layers
from ._plan import LayerKind, StackEntry, StackPlan
from ._text import brief, count, files_text, quote, ranges

META_PATTERN = "stackedtree.pattern"
META_NUM_LAYERS = "stackedtree.num_layers"
META_KINDS = "stackedtree.kinds"
META_EXPERTS = "stackedtree.experts"
META_KEYS = (META_PATTERN, META_NUM_LAYERS, META_KINDS, META_EXPERTS)


def stacked_metadata(
    pattern: str,
    n: int,
    metadata: Mapping[str, str] | None,
    kinds: Mapping[str, Sequence[int]] | None = None,
    experts: str | None = None,
) -> dict[str, str]:
    """The metadata of a stacked file: `metadata`, the pattern, N, the kinds and
    the expert pattern (the last two only when there are several kinds, experts)."""
    out = {
        k: v for k, v in (metadata or {}).items() if k not in (META_KINDS, META_EXPERTS)
    }
    out.update({META_PATTERN: pattern, META_NUM_LAYERS: str(n)})
    if kinds is not None:
        out[META_KINDS] = json.dumps(
            {label: list(layers) for label, layers in kinds.items()},
            separators=(",", ":"),
        )
    if experts is not None:
        out[META_EXPERTS] = experts
    return out


def looks_stacked(lp: LayerPattern, names: Sequence[str] | Mapping[str, Any]) -> None:
    """No name of `names` would be read back as a stacked tensor."""
    clash = [name for name in names if lp.stacked_match(name) is not None]
    if clash:
        fail(
            [repr(name) for name in clash],
            f"names that are not layer tensors would be read back as stacked "
            f"tensors of pattern {str(lp)!r}",
        )


def save_stacked(
    path: PathLike,
    stacked: Mapping[str, Any],
    pattern: str,
    /,
    rest: Mapping[str, Any] | None = None,
    *,
    layers: Mapping[str, Sequence[int]] | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Saves `stack_by_name`'s result as a stacked checkpoint, atomically.

    The file is what `stackedtree stack` writes: `stacked[key]` is stored under
    `pattern` with the literal `{i}` kept (`model.layers.{i}.mlp.up_proj.weight`),
    `rest` under its own names, and the pattern and N in the metadata. With
    `layers`, the layers of several kinds: `stacked[label][key]` is stored under
    `model.layers.{i:label}.mlp.up_proj.weight`, and the kinds in the metadata.

    Args:
        path: a `.safetensors` or `.npz` path.
        stacked: maps per-layer keys to arrays of shape `(N, ...)`; with `layers`,
            maps each kind's label to such a mapping.
        pattern: the layer pattern, with one `{i}`.
        rest: the other tensors.
        layers: each kind's label -> its layers, in the order of its layer axis,
            as given to `stack_by_name`; together they must be `0..N-1`, each
            once.
        overwrite: replace an existing file.
        metadata: extra strings to record.

    Raises:
        TypeError: `layers` is not a mapping of str labels to sequences of ints.
        ValueError: as in `save_flat`; `stacked` is empty or its tensors disagree on
            N (or with `layers`); the kinds of `layers` are not those of `stacked`,
            or do not hold every layer `0..N-1` once; a name of `rest` matches
            `pattern`, or would be read back as a stacked name.
        FileExistsError: `path` exists and `overwrite` is False.
        OSError: the file cannot be written.
    """
    lp = LayerPattern.parse(pattern)
    rest = {} if rest is None else rest
    kinds = None
    if layers is None:
        n = num_stacked_layers(stacked)
        flat = {lp.stacked_name(key): x for key, x in stacked.items()}
    else:
        if not isinstance(layers, Mapping):
            raise TypeError(
                "`layers` must map kind labels to their layers (a file holds every "
                f"layer), got {type(layers).__name__}."
            )
        kinds = check_kinds(layers)
        owners = layer_owners(stacked, kinds)
        n = len(owners)
        if max(owners) != n - 1:
            raise ValueError(
                f"`layers` must hold the layers 0..N-1 of a checkpoint, each once, "
                f"but holds layers {ranges(owners)}."
            )
        flat = {
            lp.stacked_name(key, label): x
            for label in kinds
            for key, x in stacked[label].items()
        }
    check_rest(lp, rest)
    looks_stacked(lp, rest)
    flat.update(rest)
    save_flat(
        path,
        flat,
        overwrite=overwrite,
        metadata=stacked_metadata(str(lp), n, metadata, kinds),
    )


# --------------------------------------------------------------------------- reading


def _decode_kinds(where: str, text: str, n: int) -> dict[str, list[int]]:
    """The recorded kinds, checked: labels, and layers `0..n-1` each in one kind."""

    def bad(why: str) -> ValueError:
        return ValueError(f"{where}: metadata `{META_KINDS}` {why}.")

    try:
        value = load_json(text.encode("utf-8"))
    except (ValueError, UnicodeEncodeError) as e:
        raise bad(f"is not JSON ({e})") from None
    if not isinstance(value, tuple) or not value:
        raise bad(f"must map kind labels to lists of layers, got {brief(value)}")
    kinds: dict[str, list[int]] = {}
    for label, layers in value:
        try:
            check_label(label, f"metadata `{META_KINDS}`")
        except ValueError:
            raise bad(f"has kind label {quote(label)}, which is not a word") from None
        if label in kinds:
            raise bad(f"repeats kind {label}")
        if not isinstance(layers, list) or not layers:
            raise bad(f"gives kind {label} {brief(layers)}, not a list of layers")
        kinds[label] = layers
    total = sum(map(len, kinds.values()))
    if total != n:
        raise bad(
            f"gives {total} layers to its kinds, but `{META_NUM_LAYERS}` says {n}"
        )
    # n layers in all, each in 0..n-1 and none twice: every layer in one kind.
    seen = bytearray(n)
    for label, layers in kinds.items():
        for i in layers:
            if type(i) is not int or not 0 <= i < n:
                raise bad(
                    f"gives kind {label} layer {brief(i)}, but the layers are "
                    f"0..{n - 1}"
                )
            if seen[i]:
                other = next(k for k, found in kinds.items() if i in found)
                raise bad(f"gives layer {i} to kinds {other} and {label}")
            seen[i] = 1
    return kinds


def _recorded(
    ckpt: Checkpoint, where: str
) -> tuple[LayerPattern, int, dict[str | None, Sequence[int]]]:
    """The pattern, N and kinds a stacked checkpoint's metadata records, checked;
    the kinds `{None: range(N)}` when it records none."""
    pattern = ckpt.metadata.get(META_PATTERN)
    if pattern is None:
        raise ValueError(
            f"{where} is not a stacked checkpoint (its metadata has no "
            f"`{META_PATTERN}`); per-layer checkpoints are stacked with "
            f"`stackedtree stack`."
        )
    try:
        lp = LayerPattern.parse(pattern, META_PATTERN)
    except ValueError as e:
        raise ValueError(f"{where}: metadata {e}") from None
    raw = ckpt.metadata.get(META_NUM_LAYERS)
    try:
        n = int(raw or "")
    except ValueError:
        n = -1
    if not 1 <= n < 2**63:  # an index numpy and `range` can hold
        raise ValueError(
            f"{where}: metadata `{META_NUM_LAYERS}` must be a positive integer below "
            f"2**63, got {'nothing' if raw is None else quote(raw)}."
        )
    text = ckpt.metadata.get(META_KINDS)
    if text is None:
        return lp, n, {None: range(n)}
    return lp, n, dict(_decode_kinds(where, text, n).items())


def stored_plan(ckpt: Checkpoint) -> StackPlan:
    """The plan of a stacked checkpoint, from its metadata and names: its stacked
    tensors stored as planned, none with sources.

    Raises:
        ValueError: the checkpoint records no pattern (it is not stacked), or a
            malformed one, N or kinds; a stacked tensor's leading length is not
            the number of its kind's layers; a stacked name of no recorded kind;
            a kind with no tensor; a name the pattern reads as a layer's tensor.
    """
    where = files_text(ckpt.files)
    lp, n, kinds = _recorded(ckpt, where)
    ep = _recorded_experts(ckpt, where)
    uniform = None in kinds
    names: dict[str | None, dict[str, str]] = {label: {} for label in kinds}
    rest: list[str] = []
    for name, info in ckpt.tensors.items():
        m: tuple[str | None, str] | None
        if uniform:
            key = lp.stacked_key(name)
            m = None if key is None else (None, key)
        else:
            m = lp.stacked_match(name)
        if m is None:
            rest.append(name)
            continue
        label, key = m
        if label not in kinds:
            raise ValueError(
                f"{where}: tensor {quote(name)} is stacked by its name, but "
                f"metadata `{META_KINDS}` records no such kind (it records "
                f"{', '.join(map(str, kinds))})."
            )
        held = len(kinds[label])
        if info.shape[:1] != (held,):
            says = (
                f"the metadata says {n} layers"
                if label is None
                else f"kind {label} holds {count(held, 'layer')}"
            )
            raise ValueError(
                f"{where}: stacked tensor {quote(name)} has shape {info.shape}, but "
                f"{says}."
            )
        names[label][key] = name
    if not uniform:
        empty = [str(label) for label, found in names.items() if not found]
        if empty:
            raise ValueError(
                f"{where}: metadata `{META_KINDS}` records kinds "
                f"{', '.join(empty)}, of which the file holds no tensor."
            )
    check_rest(lp, rest)
    planned = tuple(
        LayerKind(label, kinds[label], _stored_entries(ckpt, where, names[label], ep))
        for label in kinds
    )
    return StackPlan(str(lp), n, planned, tuple(rest), None if ep is None else str(ep))


def _recorded_experts(ckpt: Checkpoint, where: str) -> ExpertPattern | None:
    text = ckpt.metadata.get(META_EXPERTS)
    if text is None:
        return None
    try:
        return ExpertPattern.parse(text, META_EXPERTS)
    except ValueError as e:
        raise ValueError(f"{where}: metadata {e}") from None


def _stored_entries(
    ckpt: Checkpoint,
    where: str,
    names: Mapping[str, str],
    ep: ExpertPattern | None,
) -> tuple[StackEntry, ...]:
    """One kind's stored tensors; those whose key holds the recorded `{e}` with
    their expert axis, which must be of one length E."""
    entries: list[StackEntry] = []
    for key, name in names.items():
        if ep is None or ep.stacked_sub(key) is None:
            entries.append(StackEntry(key, name))
            continue
        shape = ckpt.tensors[name].shape
        if len(shape) < 2 or shape[1] == 0:
            raise ValueError(
                f"{where}: stacked expert tensor {quote(name)} has shape {shape}, "
                f"but an expert tensor is (layers, experts, ...) with experts >= 1."
            )
        entries.append(StackEntry(key, name, (), shape[1]))
    lengths = {e.experts for e in entries if e.experts}
    if len(lengths) > 1:
        listed = ", ".join(f"{quote(e.name)} {e.experts}" for e in entries if e.experts)
        raise ValueError(
            f"{where}: the expert tensors of one kind must hold the same experts, "
            f"but their expert axes differ: {listed}."
        )
    return tuple(entries)


class StackedCheckpoint(NamedTuple):
    """A stacked checkpoint loaded whole, as `load_stacked` returns it.

    Always four fields, whatever the file holds, so that
    `stacked, rest, pattern, kinds = load_stacked(path)` reads any stacked file.

    Attributes:
        stacked: the stacked tensors: per-layer key -> array `(N, ...)` for a file
            of one kind of layers; for one of several kinds, each kind's label ->
            such a mapping (`(len(kinds[label]), ...)`).
        rest: the other tensors, by name.
        pattern: the layer pattern recorded in the file.
        kinds: each kind's label -> its layers, for a file of several kinds; None
            for a file of one kind.
    """

    stacked: dict[str, Any]
    rest: dict[str, np.ndarray]
    pattern: str
    kinds: dict[str, list[int]] | None


def load_stacked(path_or_paths: Paths, /) -> StackedCheckpoint:
    """Loads a stacked checkpoint, as written by `save_stacked` or `stackedtree stack`.

    Args:
        path_or_paths: as in `load_flat`.

    Returns:
        `(stacked, rest, pattern, kinds)`, a `StackedCheckpoint`. For a checkpoint
        of one kind of layers `kinds` is None and `(stacked, rest)` is exactly
        `stack_by_name(flat, pattern)` of the per-layer checkpoint `flat`, so that
        `unstack_by_name(stacked, pattern, rest)` gives `flat` back.

        For one of several kinds, `kinds` maps each kind's label to its layers,
        and `(stacked, rest)` is exactly `stack_by_name(flat, pattern,
        layers=kinds)`, with `stacked[label]` the stacked tensors of kind `label`;
        so `unstack_by_name(stacked, pattern, rest, layers=kinds)` gives `flat`
        back, and `save_stacked(path, stacked, pattern, rest, layers=kinds)`
        writes the same tensors and kinds. (`layers=None` is the uniform case, so
        both calls work for either kind of file.)

    Raises:
        ValueError: the checkpoint is not stacked (no recorded pattern), or its
            stacked tensors disagree with the recorded number of layers or kinds;
            as in `load_flat`.
        OSError: a file is missing or unreadable.

    Examples:
        >>> import os, tempfile, numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "s.safetensors")
        >>> save_stacked(path, {"w": np.zeros((4, 2))}, "h.{i}.", {"emb": np.ones(3)})
        >>> stacked, rest, pattern, kinds = load_stacked(path)
        >>> stacked["w"].shape, list(rest), pattern, kinds
        ((4, 2), ['emb'], 'h.{i}.', None)
    """
    plan = stored_plan(read_checkpoint(path_or_paths))
    flat = load_flat(path_or_paths)
    rest = {name: flat[name] for name in plan.rest}
    per_kind = {
        kind.label: {e.key: flat[e.name] for e in kind.entries} for kind in plan.kinds
    }
    kinds = plan.layers
    if kinds is None:
        return StackedCheckpoint(per_kind[None], rest, plan.pattern, None)
    stacked = {str(label): part for label, part in per_kind.items()}
    return StackedCheckpoint(stacked, rest, plan.pattern, kinds)
