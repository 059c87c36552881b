"""`StackPlan`: which stacked tensor is made of which per-layer tensors, by kind.

One value answers, for a checkpoint's names (with their shapes and dtypes) and a layer
pattern, what stacking means: the layers divided into kinds (layers holding the same
keys), each kind's stacked tensors in order, and for each stacked tensor its name and
the per-layer tensor of each index of its layer axis. `convert_stack` writes what the
plan says, `load_sharded` reads what it says, `inspect` prints it, and a stacked file
is read back into one (`_stacked.stored_plan`), its tensors stored already stacked.

A plan of one kind has the label None: its stacked names carry `{i}`. A plan of
several kinds labels them `A`, `B`, ... in the order of their first layers, and their
stacked names carry `{i:A}`, `{i:B}`, ...
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .._check import fail
from ._layer_pattern import LayerPattern, kind_label
from ._text import plural, ranges

Specs = Mapping[str, tuple[tuple[int, ...], Hashable]]
"""Every tensor name -> its `(shape, dtype)`."""


@dataclass(frozen=True)
class StackEntry:
    """One stacked tensor of a plan.

    Attributes:
        key: its per-layer key (`mlp.up_proj.weight`).
        name: its stacked name (`model.layers.{i}.mlp.up_proj.weight`).
        sources: the per-layer tensor of each index of the layer axis, by name; empty
            when the checkpoint stores the tensor stacked, under `name`. (A second,
            expert, index would make each source a tuple of names.)
    """

    key: str
    name: str
    sources: tuple[str, ...] = ()

    @property
    def first(self) -> str:
        """The checkpoint tensor whose place the stacked tensor takes."""
        return self.sources[0] if self.sources else self.name


@dataclass(frozen=True)
class LayerKind:
    """The layers of one kind (those holding the same keys) and their stacked tensors.

    Attributes:
        label: the kind's label; None when the layers are of one kind.
        layers: the layer of each index of the layer axis.
        entries: its stacked tensors, in the order of its first layer's keys (or of
            the file, for a stacked file).
    """

    label: str | None
    layers: Sequence[int]
    entries: tuple[StackEntry, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        """Its per-layer keys, in order."""
        return tuple(e.key for e in self.entries)

    @property
    def names(self) -> dict[str, str]:
        """Each per-layer key -> its stacked tensor's name."""
        return {e.key: e.name for e in self.entries}


@dataclass(frozen=True)
class StackPlan:
    """How a checkpoint's tensors divide into stacked tensors, by kind, and the rest.

    Attributes:
        pattern: the layer pattern.
        num_layers: N, the layers of all kinds.
        kinds: the kinds, in the order of their first layers (recorded order, for a
            stacked file); one, labelled None, when the layers are of one kind.
        rest: the names of the other tensors, in checkpoint order.
    """

    pattern: str
    num_layers: int
    kinds: tuple[LayerKind, ...]
    rest: tuple[str, ...]

    @property
    def layers(self) -> dict[str, list[int]] | None:
        """Each kind's label -> its layers; None when the layers are of one kind."""
        if len(self.kinds) == 1 and self.kinds[0].label is None:
            return None
        return {str(k.label): list(k.layers) for k in self.kinds}

    def entries(self) -> Iterable[tuple[LayerKind, StackEntry]]:
        """Every stacked tensor with its kind, kind by kind."""
        return ((kind, e) for kind in self.kinds for e in kind.entries)

    def arranged(
        self, names: Iterable[str]
    ) -> list[tuple[LayerKind, StackEntry] | str]:
        """The plan's outputs in the order of `names` (the checkpoint's): each
        stacked tensor where its first layer's tensor (or itself, stored) was, each
        name of `rest` where it was."""
        first = {e.first: (kind, e) for kind, e in self.entries()}
        rest = set(self.rest)
        out: list[tuple[LayerKind, StackEntry] | str] = []
        for name in names:
            if name in first:
                out.append(first[name])
            elif name in rest:
                out.append(name)
        return out


# ------------------------------------------------------------------- planning


def _fmt_spec(spec: tuple[tuple[int, ...], Hashable]) -> str:
    shape, dtype = spec
    return f"shape {tuple(shape)} dtype {dtype}"


def split_layers(
    names: Iterable[object], lp: LayerPattern, pattern: str
) -> dict[int, dict[str, str]]:
    """Layer `i` -> its key -> its name; refuses a pattern that matches no name."""
    found: dict[int, dict[str, str]] = {}
    listed: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}.")
        if len(listed) < 3:
            listed.append(name)
        m = lp.match(name)
        if m is not None:
            found.setdefault(m[0], {})[m[1]] = name
    if not found:
        sample = ", ".join(f"`{n}`" for n in listed) or "no names at all"
        raise ValueError(
            f"pattern {pattern!r} matches no tensor name; the names look like "
            f"{sample}. Check the pattern (the layer index goes where `{{i}}` is)."
        )
    return found


def all_layers(found: Mapping[int, object], pattern: str) -> int:
    """N, when the layers found are exactly 0..N-1."""
    n = max(found) + 1
    missing = sorted(set(range(n)) - set(found))
    if missing:
        raise ValueError(
            f"pattern {pattern!r}: missing layers {ranges(missing)}; found layers "
            f"{ranges(found)}, but the layers must be exactly 0..N-1."
        )
    return n


def kinds_of(found: Mapping[int, dict[str, str]], n: int) -> dict[str, list[int]]:
    """Layers `0..n-1` by their set of keys, labelled in order of first layers."""
    by_keys: dict[frozenset[str], list[int]] = {}
    for i in range(n):
        by_keys.setdefault(frozenset(found[i]), []).append(i)
    return {kind_label(j): order for j, order in enumerate(by_keys.values())}


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
    specs: Specs,
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


def _kind(
    lp: LayerPattern,
    label: str | None,
    found: Mapping[int, dict[str, str]],
    order: Sequence[int],
    keys: Sequence[str],
) -> LayerKind:
    entries = tuple(
        StackEntry(
            key, lp.stacked_name(key, label), tuple(found[i][key] for i in order)
        )
        for key in keys
    )
    return LayerKind(label, tuple(order), entries)


def plan_one_kind(
    specs: Specs, pattern: str, layers: Sequence[int] | None = None
) -> StackPlan:
    """The plan stacking `layers` (all of them, `0..N-1`, when None) as one kind.

    Their names must hold the same keys, each of one shape and dtype across them;
    the names of the other layers go to `rest`.

    Raises:
        ValueError: the pattern is malformed or matches nothing; layers are missing
            (or `layers` lists a layer the names lack); a layer lacks keys other
            layers have or has keys they lack; a tensor's shape or dtype differs
            from the same key's in the other layers.
    """
    lp = LayerPattern.parse(pattern)
    found = split_layers(specs, lp, pattern)
    if layers is None:
        order: Sequence[int] = range(all_layers(found, pattern))
        what = f"the {len(order)} layers"
    else:
        order = layers
        absent = [i for i in order if i not in found]
        if absent:
            raise ValueError(
                f"`layers` lists {plural('layer', absent)}, which pattern "
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
    claimed = {name for i in order for name in found[i].values()}
    rest = tuple(name for name in specs if name not in claimed)
    return StackPlan(pattern, len(order), (_kind(lp, None, found, order, keys),), rest)


def plan_by_kind(specs: Specs, pattern: str) -> StackPlan:
    """The plan stacking every layer, each kind (layers holding the same keys) on
    its own: what `stackedtree stack` writes and `load_sharded` loads.

    A checkpoint whose layers all hold the same keys is one kind, labelled None;
    several kinds are labelled `A`, `B`, ... in the order of their first layers.

    Raises:
        ValueError: the pattern is malformed or matches nothing; layers are missing;
            a tensor's shape or dtype differs from the same key's in the other
            layers of its kind.
    """
    lp = LayerPattern.parse(pattern)
    found = split_layers(specs, lp, pattern)
    n = all_layers(found, pattern)
    labelled = kinds_of(found, n)
    kinds: list[LayerKind] = []
    errors: list[str] = []
    for label, order in labelled.items():
        keys = tuple(found[order[0]])
        problems = _spec_problems(specs, found, order, keys)
        if len(labelled) > 1:
            problems = [f"kind {label} (layers {ranges(order)}): {p}" for p in problems]
        errors += problems
        kinds.append(
            _kind(lp, label if len(labelled) > 1 else None, found, order, keys)
        )
    if errors:
        fail(
            errors,
            f"pattern {pattern!r}: tensors differ in shape or dtype across layers"
            + (" of one kind" if len(kinds) > 1 else ""),
        )
    rest = tuple(name for name in specs if lp.match(name) is None)
    return StackPlan(pattern, n, tuple(kinds), rest)
