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
from ._experts import ExpertPattern, expert_order
from ._layer_pattern import LayerPattern, kind_label
from ._text import plural, printable, ranges

Specs = Mapping[str, tuple[tuple[int, ...], Hashable]]
"""Every tensor name -> its `(shape, dtype)`."""


@dataclass(frozen=True)
class StackEntry:
    """One stacked tensor of a plan.

    Attributes:
        key: its per-layer key (`mlp.up_proj.weight`).
        name: its stacked name (`model.layers.{i}.mlp.up_proj.weight`).
        sources: the per-layer tensor of each index of the layer axis, by name; with
            an expert axis, of each (layer, expert) pair, layer by layer
            (`source(j, e)`); empty when the checkpoint stores the tensor stacked,
            under `name`.
        experts: E, the length of the expert axis after the layer axis; 0 when the
            tensor has none (its key holds no `{e}`).
    """

    key: str
    name: str
    sources: tuple[str, ...] = ()
    experts: int = 0

    @property
    def first(self) -> str:
        """The checkpoint tensor whose place the stacked tensor takes."""
        return self.sources[0] if self.sources else self.name

    @property
    def lead(self) -> int:
        """How many leading axes the stacking adds: 1 (layers), or 2 (and experts)."""
        return 2 if self.experts else 1

    def source(self, j: int, e: int | None = None) -> str:
        """The per-layer tensor of index `j` of the layer axis (and expert `e`)."""
        if self.experts:
            return self.sources[j * self.experts + (e or 0)]
        return self.sources[j]


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

    @property
    def experts(self) -> int:
        """E, the experts of each of its layers; 0 when its tensors have none."""
        return max((e.experts for e in self.entries), default=0)

    def layer_order(self) -> list[tuple[StackEntry, int | None]]:
        """One layer's tensors in the order a layer is written back: `(entry, None)`
        for a tensor without experts, `(entry, e)` for expert `e` of an expert
        tensor (`_experts.expert_order`)."""
        flags = {e: bool(e.experts) for e in self.entries}
        return expert_order(self.entries, flags, self.experts)


@dataclass(frozen=True)
class StackPlan:
    """How a checkpoint's tensors divide into stacked tensors, by kind, and the rest.

    Attributes:
        pattern: the layer pattern.
        num_layers: N, the layers of all kinds.
        kinds: the kinds, in the order of their first layers (recorded order, for a
            stacked file); one, labelled None, when the layers are of one kind.
        rest: the names of the other tensors, in checkpoint order.
        experts: the expert pattern (`"mlp.experts.{e}."`) whose experts are
            stacked on an expert axis; None when none are.
    """

    pattern: str
    num_layers: int
    kinds: tuple[LayerKind, ...]
    rest: tuple[str, ...]
    experts: str | None = None

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


class Layers:
    """The per-layer tensors found by a layer pattern (and an expert pattern).

    Attributes:
        found: layer `i` -> its key -> its name; an expert key stands once, as
            `mlp.experts.{e}.gate_proj.weight`, with the name of its first expert.
        experts: layer `i` -> expert key -> expert `e` -> its name.
    """

    def __init__(
        self,
        names: Iterable[object],
        lp: LayerPattern,
        pattern: str,
        ep: ExpertPattern | None = None,
    ) -> None:
        raw = split_layers(names, lp, pattern)
        self.lp = lp
        self.found: dict[int, dict[str, str]] = {}
        self.experts: dict[int, dict[str, dict[int, str]]] = {}
        for i, keys in raw.items():
            here = self.found[i] = {}
            for key, name in keys.items():
                m = None if ep is None else ep.match(key)
                if m is None:
                    here[key] = name
                    continue
                ekey = ep.expert_key(m[1]) if ep is not None else key
                here.setdefault(ekey, name)
                self.experts.setdefault(i, {}).setdefault(ekey, {})[m[0]] = name
        if ep is not None and not self.experts:
            sample = ", ".join(f"`{k}`" for k in list(raw[min(raw)])[:3])
            raise ValueError(
                f"expert pattern {str(ep)!r} matches no per-layer key; layer "
                f"{min(raw)}'s keys look like {sample}. Check the pattern (relative "
                "to the per-layer key; the expert index goes where `{e}` is)."
            )

    def is_expert(self, i: int, key: str) -> bool:
        return key in self.experts.get(i, {})


def _expert_problems(
    specs: Specs,
    layers: Layers,
    order: Sequence[int],
    keys: Sequence[str],
    ep: ExpertPattern | None,
) -> tuple[int, list[str]]:
    """E for the expert keys of the layers `order`, and each missing expert tensor
    and each expert tensor whose shape or dtype differs from the most common one."""
    ekeys = [k for k in keys if layers.is_expert(order[0], k)]
    if not ekeys or ep is None:
        return 0, []
    held = [layers.experts[i].get(k, {}) for i in order for k in ekeys]
    num = max(max(found) for found in held if found) + 1
    errors: list[str] = []
    for i in order:
        for k in ekeys:
            found = layers.experts[i].get(k, {})
            sub = k[len(str(ep)) :]
            errors += [
                f"layer {i} lacks expert {e}'s `{sub}` "
                f"(`{layers.lp.layer_name(i, ep.key(e, sub))}`; the experts of "
                f"`{k}` are numbered 0..{num - 1})"
                for e in range(num)
                if e not in found
            ]
    if errors:
        return num, errors
    for k in ekeys:
        pairs = [(i, e) for i in order for e in range(num)]
        per = [specs[layers.experts[i][k][e]] for i, e in pairs]
        common = Counter(per).most_common(1)[0][0]
        i0, e0 = pairs[per.index(common)]
        errors += [
            f"layer {i} expert {e}: `{layers.experts[i][k][e]}` has "
            f"{_fmt_spec(spec)}, expected {_fmt_spec(common)} like "
            f"`{layers.experts[i0][k][e0]}`"
            for (i, e), spec in zip(pairs, per, strict=True)
            if spec != common
        ]
    return num, errors


def _kind(
    lp: LayerPattern,
    label: str | None,
    layers: Layers,
    order: Sequence[int],
    keys: Sequence[str],
    num_experts: int,
) -> LayerKind:
    entries = []
    for key in keys:
        if layers.is_expert(order[0], key):
            sources = tuple(
                layers.experts[i][key][e] for i in order for e in range(num_experts)
            )
            entries.append(
                StackEntry(key, lp.stacked_name(key, label), sources, num_experts)
            )
        else:
            sources = tuple(layers.found[i][key] for i in order)
            entries.append(StackEntry(key, lp.stacked_name(key, label), sources))
    return LayerKind(label, tuple(order), tuple(entries))


def _check_kind(
    specs: Specs,
    layers: Layers,
    order: Sequence[int],
    keys: Sequence[str],
    ep: ExpertPattern | None,
) -> tuple[int, list[str], bool]:
    """E and the problems of one kind: tensors differing in shape or dtype across
    its layers, missing or differing experts; whether any is about experts."""
    plain = [k for k in keys if not layers.is_expert(order[0], k)]
    errors = _spec_problems(specs, layers.found, order, plain)
    num, more = _expert_problems(specs, layers, order, keys, ep)
    return num, errors + more, bool(more)


def plan_one_kind(
    specs: Specs,
    pattern: str,
    layers: Sequence[int] | None = None,
    experts: str | ExpertPattern | None = None,
) -> StackPlan:
    """The plan stacking `layers` (all of them, `0..N-1`, when None) as one kind.

    Their names must hold the same keys, each of one shape and dtype across them;
    the names of the other layers go to `rest`. With an expert pattern, each expert
    key's experts `0..E-1` are stacked on an expert axis.

    Raises:
        ValueError: the pattern is malformed or matches nothing; layers are missing
            (or `layers` lists a layer the names lack); a layer lacks keys other
            layers have or has keys they lack; a tensor's shape or dtype differs
            from the same key's in the other layers; a layer lacks an expert or an
            expert tensor; the expert pattern is malformed or matches nothing.
    """
    lp = LayerPattern.parse(pattern)
    ep = None if experts is None else ExpertPattern.parse(experts)
    found = Layers(specs, lp, pattern, ep)
    if layers is None:
        order: Sequence[int] = range(all_layers(found.found, pattern))
        what = f"the {len(order)} layers"
    else:
        order = layers
        absent = [i for i in order if i not in found.found]
        if absent:
            raise ValueError(
                f"`layers` lists {plural('layer', absent)}, which pattern "
                f"{pattern!r} finds no tensor of; it finds layers "
                f"{ranges(found.found)}."
            )
        what = f"layers {ranges(order)}"
    keys = _same_keys(
        found.found, order, f"pattern {pattern!r}: {what} do not hold the same keys"
    )
    num, errors, of_experts = _check_kind(specs, found, order, keys, ep)
    if errors:
        fail(errors, _spec_header(pattern, ep if of_experts else None, False))
    claimed = {name for i in order for name in found.found[i].values()}
    claimed.update(
        n for i in order for d in found.experts.get(i, {}).values() for n in d.values()
    )
    rest = tuple(name for name in specs if name not in claimed)
    kind = _kind(lp, None, found, order, keys, num)
    return StackPlan(pattern, len(order), (kind,), rest, _recorded(ep, kind))


def _spec_header(pattern: str, ep: ExpertPattern | None, kinds: bool) -> str:
    """The header of shape, dtype and expert problems; `ep` when some are about
    experts."""
    where = " of one kind" if kinds else ""
    if ep is None:
        return f"pattern {pattern!r}: tensors differ in shape or dtype across layers{where}"
    return (
        f"pattern {pattern!r}, experts {str(ep)!r}: the layers{where} do not hold the "
        "same experts, each expert tensor of one shape and dtype"
    )


def _recorded(ep: ExpertPattern | None, *kinds: LayerKind) -> str | None:
    """The expert pattern, when some stacked tensor has an expert axis."""
    return str(ep) if ep is not None and any(k.experts for k in kinds) else None


def plan_by_kind(
    specs: Specs, pattern: str, experts: str | ExpertPattern | None = None
) -> StackPlan:
    """The plan stacking every layer, each kind (layers holding the same keys) on
    its own: what `stackedtree stack` writes and `load_sharded` loads.

    A checkpoint whose layers all hold the same keys is one kind, labelled None;
    several kinds are labelled `A`, `B`, ... in the order of their first layers.
    With an expert pattern, kinds are formed over keys with the expert index
    replaced by `{e}`, and each expert key's experts `0..E-1` are stacked on an
    expert axis.

    Raises:
        ValueError: the pattern is malformed or matches nothing; layers are missing;
            a tensor's shape or dtype differs from the same key's in the other
            layers of its kind; a layer lacks an expert or an expert tensor; the
            expert pattern is malformed or matches nothing.
    """
    lp = LayerPattern.parse(pattern)
    ep = None if experts is None else ExpertPattern.parse(experts)
    found = Layers(specs, lp, pattern, ep)
    n = all_layers(found.found, pattern)
    labelled = kinds_of(found.found, n)
    kinds: list[LayerKind] = []
    errors: list[str] = []
    of_experts = False
    for label, order in labelled.items():
        keys = tuple(found.found[order[0]])
        num, problems, about = _check_kind(specs, found, order, keys, ep)
        of_experts |= about
        if len(labelled) > 1:
            problems = [f"kind {label} (layers {ranges(order)}): {p}" for p in problems]
        errors += problems
        if not errors:
            kinds.append(
                _kind(lp, label if len(labelled) > 1 else None, found, order, keys, num)
            )
    if errors:
        header = _spec_header(pattern, ep if of_experts else None, len(labelled) > 1)
        fail(errors, header)
    rest = tuple(name for name in specs if lp.match(name) is None)
    return StackPlan(pattern, n, tuple(kinds), rest, _recorded(ep, *kinds))


def subset_kinds(plan: StackPlan) -> dict[str, tuple[str, list[str]]]:
    """Each kind whose keys are a strict subset of another kind's -> that other
    kind (the one it lacks fewest keys of) and the keys it lacks, in that kind's
    order. A layer that lost a tensor forms such a kind."""
    out: dict[str, tuple[str, list[str]]] = {}
    for kind in plan.kinds:
        mine = set(kind.keys)
        best: tuple[str, list[str]] | None = None
        for other in plan.kinds:
            if other is kind or not mine < set(other.keys):
                continue
            lacking = [k for k in other.keys if k not in mine]
            if best is None or len(lacking) < len(best[1]):
                best = (str(other.label), lacking)
        if best is not None:
            out[str(kind.label)] = best
    return out


def kind_gaps(plan: StackPlan) -> list[str]:
    """A line for each kind whose keys are a strict subset of another's
    (`subset_kinds`): its layers, the keys it lacks, and the other kind."""
    by_label = {str(k.label): k for k in plan.kinds}
    lines = []
    for label, (other, lacking) in subset_kinds(plan).items():
        shown = ", ".join(f"`{printable(k)}`" for k in lacking[:5])
        if len(lacking) > 5:
            shown += f" and {len(lacking) - 5} more"
        lines.append(
            f"kind {label} ({plural('layer', by_label[label].layers)}) lacks "
            f"{shown}, which kind {other} ({plural('layer', by_label[other].layers)})"
            f" holds: a damaged file looks like this"
        )
    return lines
