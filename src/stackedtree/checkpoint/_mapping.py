"""A declarative name mapping: checkpoint tensors <-> the leaves of a user's pytree.

A *rule* pairs one checkpoint name with one tree leaf, with an optional layout change
on the way. A name holding `{i}` is a layer tensor, written as its *stacked name* (the
per-layer name with the literal `{i}` kept, as `stackedtree stack` stores it): the rule
reads the per-layer tensors of every layer, stacked along a leading layer axis, or the
stacked tensor itself when the checkpoint is already stacked. Leaves are named as
`flatten_names` names them (`layers.attention.q_proj`).

Kinds and experts are written as `stackedtree stack` writes them: `{i:B}` in place of
`{i}` reads the layers of kind `B` only (kinds labelled as `detect_kinds` labels them),
and `{e}` inside the per-layer key (`model.layers.{i:B}.mlp.experts.{e}.up_proj.weight`)
stacks that tensor's experts `0..E-1` on a second axis, `(N_B, E, ...)`. One rule table
then reads a per-layer DeepSeek- or Qwen3-MoE-style checkpoint and its stacked file
alike.

The same rules run both ways: `unflatten_by_rules` builds the tree from a checkpoint,
`flatten_by_rules` gives the checkpoint back from the tree, so an export is never
written twice. Both are strict: every tensor is read by exactly one rule and every leaf
filled exactly once, or one `ValueError` lists the unused tensors and unfilled leaves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import numpy as np

from .._check import count_layers, fail, leaf_problems
from .._leaf import dtype_of, fmt_shape, is_array, leaf_kind, shape_of
from .._tree import PyTree, flatten_names, unflatten_names
from ._experts import ExpertPattern
from ._layer_pattern import LayerPattern
from ._names import stack_by_name, unstack_by_name
from ._plan import plan_by_kind
from ._text import ranges

# ------------------------------------------------------------------------ transforms


class Transform(NamedTuple):
    """A change of one tensor's layout, from the checkpoint's to the tree's, and back.

    Transforms see tensors as stored: a layer rule's tensor carries its leading layer
    axis, so write them on the trailing (per-layer) axes, as `np.swapaxes(x, -1, -2)`
    does. The built-in `transpose` and `split_axis` are exact by construction; a
    transform given as a pair of functions is checked on the tensors it converts:
    `inverse(forward(x))` must give `x` back bit for bit (numpy tensors; for jax
    arrays and `jax.ShapeDtypeStruct`s, the shape and dtype). Given
    `jax.ShapeDtypeStruct`s, the functions are traced with `jax.eval_shape`.

    Attributes:
        forward: checkpoint layout -> tree layout.
        inverse: tree layout -> checkpoint layout.

    Examples:
        >>> import numpy as np
        >>> negate = Transform(np.negative, np.negative)
        >>> negate.forward(np.ones(2)).tolist()
        [-1.0, -1.0]
    """

    forward: Callable[[Any], Any]
    inverse: Callable[[Any], Any]

    def __repr__(self) -> str:
        if isinstance(self.forward, _Layout):
            return repr(self.forward)
        return f"Transform(forward={self.forward!r}, inverse={self.inverse!r})"


@dataclass(frozen=True)
class _Layout:
    """A built-in layout change: exact by construction, known by its text."""

    text: str
    fn: Callable[[Any], Any] = field(compare=False)

    def __call__(self, x: Any) -> Any:
        return self.fn(x)

    def __repr__(self) -> str:
        return self.text


def _resolve(sizes: tuple[int, ...], total: int) -> tuple[int, ...] | None:
    """`sizes` with its `-1` worked out so that their product is `total`, or None."""
    known = math.prod(s for s in sizes if s != -1)
    if -1 not in sizes:
        return sizes if known == total else None
    if known == 0 or total % known:
        return None
    return tuple(total // known if s == -1 else s for s in sizes)


def transpose(*axes: int) -> Transform:
    """Permutes the per-layer axes of a tensor, as `np.transpose(x, axes)` would.

    The permutation applies to the last `len(axes)` axes, so a layer tensor's leading
    layer axis stays in front. The inverse is the inverse permutation.

    Args:
        axes: a permutation of `0..len(axes)-1`.

    Returns:
        The transform.

    Raises:
        ValueError: `axes` is not a permutation.

    Examples:
        >>> import numpy as np
        >>> t = transpose(1, 0)  # torch's nn.Linear (out, in) -> (in, out)
        >>> t.forward(np.zeros((4, 3, 2))).shape  # 4 layers of (3, 2)
        (4, 2, 3)
        >>> t
        transpose(1, 0)
    """
    if (
        not axes
        or not all(isinstance(a, int) for a in axes)
        or sorted(axes) != list(range(len(axes)))
    ):
        raise ValueError(
            f"`axes` must be a permutation of 0..n-1 for some n >= 1, got {axes}."
        )
    text = f"transpose({', '.join(map(str, axes))})"

    def permute(perm: tuple[int, ...]) -> Callable[[Any], Any]:
        def fn(x: Any) -> Any:
            lead = x.ndim - len(perm)
            if lead < 0:
                raise ValueError(f"{text} got shape {fmt_shape(x.shape)}")
            return x.transpose((*range(lead), *(lead + a for a in perm)))

        return fn

    inverse = tuple(int(a) for a in np.argsort(axes))
    return Transform(_Layout(text, permute(axes)), _Layout(text, permute(inverse)))


def split_axis(axis: int, sizes: Sequence[int], /) -> Transform:
    """Splits one axis into several, as a reshape does: `(heads * head_dim, d)` ->
    `(heads, head_dim, d)`.

    The inverse merges them back. `axis` counts from the end, so the transform is the
    same for one layer's tensor and for a stack of them.

    Args:
        axis: the axis to split, a negative number (`-1` is the last axis).
        sizes: the sizes of the new axes, in row-major order; one may be `-1`, worked
            out from the others as in `np.reshape`.

    Returns:
        The transform.

    Raises:
        ValueError: `axis` is not negative, or `sizes` is empty or has several `-1`.

    Examples:
        >>> import numpy as np
        >>> t = split_axis(-2, (2, 4))  # 8 output features -> 2 heads of 4
        >>> t.forward(np.zeros((3, 8, 5))).shape
        (3, 2, 4, 5)
        >>> t.inverse(np.zeros((3, 2, 4, 5))).shape
        (3, 8, 5)
    """
    sizes = tuple(sizes)
    if not isinstance(axis, int) or axis >= 0:
        raise ValueError(
            f"`axis` must be negative (counted from the end, so that the leading "
            f"layer axis does not move it), got {axis!r}."
        )
    if not sizes or sizes.count(-1) > 1 or any(s < -1 for s in sizes):
        raise ValueError(
            f"`sizes` must be one or more sizes with at most one -1, got {sizes}."
        )
    text = f"split_axis({axis}, {fmt_shape(sizes)})"

    def split(x: Any) -> Any:
        at = x.ndim + axis
        new = _resolve(sizes, x.shape[at]) if at >= 0 else None
        if new is None:
            why = ""
            if at >= 0:
                why = f": {x.shape[at]} is not {' * '.join(map(str, sizes))}"
            raise ValueError(
                f"{text} cannot split axis {axis} of shape {fmt_shape(x.shape)}{why}"
            )
        return x.reshape((*x.shape[:at], *new, *x.shape[at + 1 :]))

    def merge(x: Any) -> Any:
        end = x.ndim + axis + 1
        start = end - len(sizes)
        group = tuple(x.shape[max(start, 0) : end])
        if start < 0 or any(
            s not in (-1, g) for s, g in zip(sizes, group, strict=True)
        ):
            raise ValueError(
                f"the inverse of {text} needs axes of sizes {fmt_shape(sizes)} "
                f"ending at axis {axis}, got shape {fmt_shape(x.shape)}"
            )
        return x.reshape((*x.shape[:start], math.prod(group), *x.shape[end:]))

    return Transform(_Layout(text, split), _Layout(text, merge))


def _exact(transforms: tuple[Transform, ...]) -> bool:
    return all(
        isinstance(t.forward, _Layout) and isinstance(t.inverse, _Layout)
        for t in transforms
    )


def _run(x: Any, transforms: tuple[Transform, ...], *, inverse: bool) -> Any:
    steps = reversed(transforms) if inverse else transforms
    for t in steps:
        fn = t.inverse if inverse else t.forward
        x = jax.eval_shape(fn, x) if leaf_kind(x) == "abstract" else fn(x)
    return x


def _checked_run(
    r: _Parsed, x: Any, *, inverse: bool, problems: list[str]
) -> tuple[bool, Any]:
    """`(True, x transformed)` one way by rule `r`, or `(False, None)` when that
    fails; either way what is wrong (also a result the other way does not turn
    back into `x` bit for bit) is added to `problems`."""
    src, dst = (r.path, repr(r.name)) if inverse else (repr(r.name), r.path)
    try:
        y = _run(x, r.transforms, inverse=inverse)
    except (ValueError, TypeError) as e:
        problems.append(f"{r.label} ({src} -> {dst}): {e}")
        return False, None
    if not _exact(r.transforms) and not _same(
        _run(y, r.transforms, inverse=not inverse), x
    ):
        both = (
            "the inverse of the transform and the transform"
            if inverse
            else "the transform and its inverse"
        )
        problems.append(f"{r.label}: {both} do not give back {src} bit for bit")
    return True, y


def _same(a: Any, b: Any) -> bool:
    """Bit-exact for numpy tensors; shape and dtype for the others."""
    if shape_of(a) != shape_of(b) or dtype_of(a) != dtype_of(b):
        return False
    if leaf_kind(a) != "numpy" or leaf_kind(b) != "numpy":
        return True
    a, b = np.asarray(a), np.asarray(b)
    size = a.dtype.itemsize
    if size in (1, 2, 4, 8):
        bits = np.dtype(f"u{size}")
        return bool(np.array_equal(a.view(bits), b.view(bits)))
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


# ----------------------------------------------------------------------------- rules


class Rule(NamedTuple):
    """One checkpoint tensor <-> one tree leaf.

    Attributes:
        name: the checkpoint name. A name with `{i}` is a layer tensor, written as its
            stacked name (`"model.layers.{i}.mlp.up_proj.weight"`): the tensors of
            layers `0..N-1`, stacked along a new leading axis. `{i:B}` in place of
            `{i}` reads the layers of kind `B` only (layers holding the same keys,
            labelled `A`, `B`, ... as `detect_kinds` labels them and as
            `stackedtree stack` names them); `{e}` after it, inside the per-layer
            key, reads experts `0..E-1` on a second axis
            (`"model.layers.{i:B}.mlp.experts.{e}.up_proj.weight"`, `(N_B, E, ...)`).
        path: the tree leaf, as `flatten_names` names it (`"layers.up_proj"`).
        transform: a `Transform`, or a sequence of them applied in order (their
            inverses in reverse order), from the checkpoint's layout to the tree's.
            Empty by default: the tensor is the leaf.

    Examples:
        >>> Rule("model.layers.{i}.mlp.up_proj.weight", "up_proj", transpose(1, 0))
        Rule(name='model.layers.{i}.mlp.up_proj.weight', path='up_proj', transform=transpose(1, 0))
    """

    name: str
    path: str
    transform: Transform | Sequence[Transform] = ()


@dataclass(frozen=True)
class _Parsed:
    index: int
    name: str
    path: str
    transforms: tuple[Transform, ...]
    pattern: LayerPattern | None  # for a layer rule: name == pattern + key
    key: str
    kind: str | None = None  # its kind's label, for `{i:B}`
    experts: ExpertPattern | None = None  # for a key with `{e}`

    @property
    def label(self) -> str:
        return f"`rules[{self.index}]`"


_SEPARATORS = re.compile(r"[^0-9A-Za-z{]*")
_INDEX = re.compile(r"\{i(?::([A-Za-z0-9_]+))?\}")


def _parse(k: int, rule: Any) -> _Parsed:
    label = f"`rules[{k}]`"
    if not isinstance(rule, tuple) or not 2 <= len(rule) <= 3:
        raise TypeError(
            f"{label} must be a Rule or a (name, path[, transform]) tuple, got "
            f"{type(rule).__name__} {rule!r}."
        )
    name, path, transform = Rule(*rule)
    if not isinstance(name, str) or not isinstance(path, str):
        raise TypeError(
            f"{label}: the name and the path must be str, got "
            f"{type(name).__name__} and {type(path).__name__}."
        )
    if isinstance(transform, Transform):
        transforms: tuple[Any, ...] = (transform,)
    elif isinstance(transform, Sequence):
        transforms = tuple(transform)
    else:
        transforms = (transform,)
    bad = [t for t in transforms if not isinstance(t, Transform)]
    if bad:
        raise TypeError(
            f"{label}: a transform must be a Transform (such as `transpose(1, 0)`), "
            f"got {type(bad[0]).__name__}."
        )
    found = list(_INDEX.finditer(name))
    if len(found) > 1:
        raise ValueError(
            f"{label}: the name {name!r} holds `{{i}}` {len(found)} times; a rule "
            "reads one tensor per layer, so it holds at most one."
        )
    if not found:
        if "{e}" in name:
            raise ValueError(
                f"{label}: the name {name!r} holds `{{e}}` but no `{{i}}`; experts "
                "are stacked within layers, `model.layers.{i}.mlp.experts.{e}.w`."
            )
        return _Parsed(k, name, path, transforms, None, "")
    m = found[0]
    before, tail = name[: m.start()], name[m.end() :]
    sep = _SEPARATORS.match(tail)
    after = sep.group() if sep else ""
    key = tail[len(after) :]
    experts = None
    if key.count("{e}") > 1:
        raise ValueError(
            f"{label}: the name {name!r} holds `{{e}}` {key.count('{e}')} times; "
            "it holds at most one, where the expert index goes."
        )
    if "{e}" in key:
        ebefore, etail = key.split("{e}")
        esep = _SEPARATORS.match(etail)
        experts = ExpertPattern(ebefore, esep.group() if esep else "")
    return _Parsed(
        k, name, path, transforms, LayerPattern(before, after), key, m[1], experts
    )


def _table(rules: Any) -> list[_Parsed]:
    """Parses `rules` and checks that no tensor and no leaf has two rules."""
    if isinstance(rules, str | Mapping) or not isinstance(rules, Sequence):
        raise TypeError(
            "`rules` must be a sequence of Rule (or (name, path[, transform]) "
            f"tuples), got {type(rules).__name__}."
        )
    table = [_parse(k, rule) for k, rule in enumerate(rules)]
    problems = []
    for what, attr in (("read", "name"), ("fill", "path")):
        first: dict[str, _Parsed] = {}
        for r in table:
            value = getattr(r, attr)
            if value in first:
                shown = repr(value) if attr == "name" else value
                problems.append(
                    f"{first[value].label} and {r.label} both {what} {shown}"
                )
            else:
                first[value] = r
    layered = [(r, r.pattern) for r in table if r.pattern is not None]
    for r in table:
        for owner, pattern in layered:
            m = pattern.match(r.name) if r.pattern is None else None
            if m is not None and m[1] == owner.key:
                problems.append(
                    f"{r.label} reads {r.name!r}, which {owner.label} "
                    f"({owner.name!r}) reads as layer {m[0]}"
                )
    if problems:
        fail(problems, "`rules` are not one to one")
    return table


# ------------------------------------------------------------------- the two ways


class _Stacking(NamedTuple):
    """How the per-layer tensors of one layer pattern are stacked: each kind on
    its own (`layers`, None for all layers as one) and experts by `experts`."""

    layers: dict[str, list[int]] | None
    experts: str | None


def _offered(
    lp: LayerPattern,
    rules: Sequence[_Parsed],
    flat: Mapping[str, Any],
    names: Sequence[str],
    problems: list[str],
) -> tuple[dict[str, tuple[list[str], str]], _Stacking | None]:
    """The stacked tensors that the per-layer tensors `names` of pattern `lp` make:
    stacked name -> (its per-layer tensors, their layers as text); with how they
    are stacked when the rules name kinds or experts (None: key by key over all
    layers)."""
    if not any(r.kind is not None or r.experts is not None for r in rules):
        found: dict[str, dict[int, str]] = {}
        for name in names:
            m = lp.match(name)
            if m is not None:
                found.setdefault(m[1], {})[m[0]] = name
        return {
            lp.stacked_name(key): ([layers[i] for i in sorted(layers)], ranges(layers))
            for key, layers in found.items()
        }, None
    patterns = sorted({str(r.experts) for r in rules if r.experts is not None})
    if len(patterns) > 1:
        problems.append(
            f"the rules of layer pattern {str(lp)!r} name several expert patterns "
            f"({', '.join(map(repr, patterns))}); a checkpoint has one"
        )
    experts = patterns[0] if patterns else None
    specs = {n: (shape_of(flat[n]), dtype_of(flat[n])) for n in names}
    plan = plan_by_kind(specs, str(lp), experts)
    offered = {
        e.name: (list(e.sources), ranges(kind.layers)) for kind, e in plan.entries()
    }
    return offered, _Stacking(plan.layers, plan.experts)


def _sources(
    flat: Mapping[str, Any], table: list[_Parsed]
) -> tuple[dict[str, list[str] | None], dict[str, _Stacking | None], list[str]]:
    """Which checkpoint tensors `flat` offers, under their stacked names.

    Returns `(sources, stackings, problems)`: `sources` maps each tensor to the
    per-layer names to stack (None when `flat` holds it under that name already);
    `stackings` maps each layer pattern with per-layer tensors to how they are
    stacked; `problems` lists the unused tensors and the tensors given twice.
    """
    plain = {r.name for r in table if r.pattern is None}
    groups: dict[LayerPattern, list[_Parsed]] = {}
    for r in table:
        if r.pattern is not None:
            groups.setdefault(r.pattern, []).append(r)
    for name, x in flat.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}.")
        if not is_array(x):
            raise TypeError(
                f"tensor `{name}` must be a numpy or jax array (or a "
                f"jax.ShapeDtypeStruct), got {type(x).__name__}."
            )
    sources: dict[str, list[str] | None] = {}
    owners: dict[str, str] = {}
    stackings: dict[str, _Stacking | None] = {}
    problems: list[str] = []
    for lp, rules in groups.items():
        mine: list[str] = []
        for name in flat:
            if name in plain or lp.match(name) is None:
                continue
            if name in owners:
                problems.append(
                    f"tensor {name!r} is a layer tensor of both {owners[name]!r} "
                    f"and {str(lp)!r}"
                )
                continue
            owners[name] = str(lp)
            mine.append(name)
        if not mine:
            continue
        offered, stackings[str(lp)] = _offered(lp, rules, flat, mine, problems)
        wanted = {r.name for r in rules}
        for stacked, (names, layers) in offered.items():
            if stacked in wanted:
                sources[stacked] = names
            else:
                problems.append(
                    f"unused tensor {stacked!r} (layers {layers}): no rule reads it"
                )
    used = {r.name for r in table}
    for name in flat:
        if name in owners:
            continue
        if name in sources:
            problems.append(f"tensor {name!r} is given both stacked and per layer")
        elif name in used:
            sources[name] = None
        else:
            problems.append(f"unused tensor {name!r}: no rule reads it")
    return sources, stackings, problems


def _stack_layers(
    tensors: Mapping[str, Any],
    table: list[_Parsed],
    sources: Mapping[str, list[str] | None],
    stackings: Mapping[str, _Stacking | None],
) -> dict[str, Any]:
    """The layer tensors the rules read, stacked under their stacked names."""
    stacked: dict[str, Any] = {}
    for pattern, how in stackings.items():
        lp = LayerPattern.parse(pattern)
        names = {
            n
            for r in table
            if r.pattern is not None and str(r.pattern) == pattern
            for n in sources.get(r.name) or ()
        }
        subset = {n: tensors[n] for n in names}
        if how is None:
            part, _ = stack_by_name(subset, pattern)
            stacked.update({pattern + key: x for key, x in part.items()})
            continue
        got, _ = stack_by_name(subset, pattern, layers=how.layers, experts=how.experts)
        per_kind = {None: got} if how.layers is None else got
        stacked.update(
            {
                lp.stacked_name(key, label): x
                for label, part in per_kind.items()
                for key, x in part.items()
            }
        )
    return stacked


def unflatten_by_rules(
    flat: Mapping[str, Any],
    rules: Sequence[Rule | tuple[Any, ...]],
    like: PyTree,
    /,
    *,
    sep: str = ".",
) -> PyTree:
    """Builds a pytree from checkpoint tensors by name rules.

    Each rule reads one tensor of `flat` (a layer rule: the per-layer tensors of
    layers `0..N-1`, stacked as `stack_by_name` stacks them, or the stacked tensor
    itself when `flat` holds it under the stacked name), applies its transforms and
    fills one leaf of `like`. Names that no rule mentions and that no layer rule's
    pattern matches are unused. Numpy tensors give numpy leaves (host memory;
    `transpose` gives views), jax tensors give jax leaves, `jax.ShapeDtypeStruct`s
    give `jax.ShapeDtypeStruct`s.

    Args:
        flat: maps checkpoint names to arrays, as `load_flat` or `load_sharded` give
            them.
        rules: the `Rule`s, or `(name, path[, transform])` tuples.
        like: a pytree of the wanted structure, whose array leaves (arrays or
            `jax.ShapeDtypeStruct`s) give each leaf's shape and dtype; static
            leaves are kept.
        sep: the separator of the leaf paths, as in `flatten_names`.

    Returns:
        A pytree of the structure of `like`.

    Raises:
        TypeError: `rules` is malformed.
        ValueError: two rules read one tensor or fill one leaf; a tensor is unused,
            a leaf unfilled, or a rule's leaf is not in `like` (all listed at once,
            before any tensor is stacked); the layers of a layer tensor are not
            `0..N-1` or disagree in shape or dtype; a transform fails, gives a
            shape or dtype other than `like`'s, or does not round-trip.

    Examples:
        >>> import numpy as np
        >>> flat = {"h.0.w": np.zeros((3, 2)), "h.1.w": np.ones((3, 2))}
        >>> like = {"w": np.zeros((2, 2, 3))}
        >>> tree = unflatten_by_rules(flat, [Rule("h.{i}.w", "w", transpose(1, 0))], like)
        >>> tree["w"].shape
        (2, 2, 3)
    """
    if not isinstance(flat, Mapping):
        raise TypeError(
            f"`flat` must be a mapping of names to arrays, got {type(flat).__name__}."
        )
    table = _table(rules)
    leaves = flatten_names(like, sep=sep)
    sources, stackings, problems = _sources(flat, table)
    filled = {r.path for r in table}
    for r in table:
        if r.path not in leaves:
            problems.append(
                f"{r.label} fills {r.path}, which is no array leaf of `like`"
            )
        elif r.name not in sources:
            problems.append(
                f"unfilled leaf {r.path}: `flat` has no {r.name!r} for {r.label}"
            )
    problems += [
        f"unfilled leaf {p}: no rule fills it" for p in leaves if p not in filled
    ]
    if problems:
        fail(problems, "`flat` and `like` do not match one to one under `rules`")

    def stack_layers(tensors: Mapping[str, Any]) -> dict[str, Any]:
        return _stack_layers(tensors, table, sources, stackings)

    # Shapes first, on abstract tensors: a rule that cannot fill its leaf (a missing
    # transpose, say) is found before any tensor is stacked. Dtypes are checked on
    # the data below: jax narrows 64-bit abstract values without x64.
    abstract = {
        n: jax.ShapeDtypeStruct(shape_of(x), dtype_of(x)) for n, x in flat.items()
    }
    planned = stack_layers(abstract)
    for r in table:
        x = planned[r.name] if sources[r.name] is not None else abstract[r.name]
        try:
            got = shape_of(_run(x, r.transforms, inverse=False))
        except Exception:  # a transform only numpy can run: checked below, on data
            continue
        want = shape_of(leaves[r.path])
        if got != want:
            problems.append(
                f"{r.path} from {r.name!r}: shape {fmt_shape(got)} != {fmt_shape(want)}"
            )
    if problems:
        fail(problems, "`flat` does not fit `like` under `rules`")

    stacked = stack_layers(flat)
    out = {}
    for r in table:
        x = stacked[r.name] if sources[r.name] is not None else flat[r.name]
        ok, y = _checked_run(r, x, inverse=False, problems=problems)
        if not ok:
            continue
        for phrase, _ in leaf_problems(leaves[r.path], y):
            problems.append(f"{r.path} from {r.name!r}: {phrase}")
        out[r.path] = y
    if problems:
        fail(problems, "`flat` does not fit `like` under `rules`")
    return unflatten_names(out, like, sep=sep)


def flatten_by_rules(
    tree: PyTree,
    rules: Sequence[Rule | tuple[Any, ...]],
    /,
    *,
    sep: str = ".",
    layers: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """The inverse of `unflatten_by_rules`: a pytree back to checkpoint tensors.

    Each rule takes one leaf of `tree`, applies the inverses of its transforms in
    reverse order and gives the tensor its checkpoint name; a layer rule's tensor is
    unstacked as `unstack_by_name` does it, into the per-layer names of layers
    `0..N-1` (numpy views, no copy). Tensors come out in the order of the rules, the
    per-layer tensors of a layer pattern layer by layer where its first rule stands.
    A rule with `{e}` writes expert `e` of its tensor's second axis under the name
    with `e` in place of `{e}`, expert by expert within each layer.

    Args:
        tree: the pytree, such as one `unflatten_by_rules` built.
        rules: the rules it was built with.
        sep: the separator of the leaf paths, as in `flatten_names`.
        layers: each kind's label -> its layers, as `detect_kinds` gives them:
            needed by rules that read one kind (`{i:B}`), since which layers a
            kind holds is not in the tree.

    Returns:
        The checkpoint: names to arrays, ready for `save_flat`.

    Raises:
        TypeError: `rules` is malformed.
        ValueError: two rules read one tensor or fill one leaf; an array leaf of
            `tree` is read by no rule, or a rule's leaf is not in `tree` (all listed
            at once); an inverse fails or does not round-trip; the leaves of one
            layer pattern (and kind) disagree in their layer count, or their
            expert tensors in their expert count; rules name kinds and `layers`
            does not give their layers.

    Examples:
        >>> import numpy as np
        >>> tree = {"w": np.zeros((2, 2, 3))}
        >>> flat = flatten_by_rules(tree, [Rule("h.{i}.w", "w", transpose(1, 0))])
        >>> {name: x.shape for name, x in flat.items()}
        {'h.0.w': (3, 2), 'h.1.w': (3, 2)}
    """
    table = _table(rules)
    leaves = flatten_names(tree, sep=sep)
    read = {r.path for r in table}
    problems = [f"unused leaf {p}: no rule reads it" for p in leaves if p not in read]
    problems += [
        f"{r.label} reads {r.path}, which is no array leaf of `tree`"
        for r in table
        if r.path not in leaves
    ]
    if problems:
        fail(problems, "`tree` and `rules` do not match one to one")

    tensors: dict[str, Any] = {}
    for r in table:
        y = leaves[r.path]
        ok, x = _checked_run(r, y, inverse=True, problems=problems)
        if ok:
            tensors[r.name] = x
    patterns: dict[str, list[_Parsed]] = {}
    for r in table:
        if r.pattern is not None and r.name in tensors:
            patterns.setdefault(str(r.pattern), []).append(r)
    for pattern, group in patterns.items():
        problems += _group_problems(pattern, group, tensors, layers)
    if problems:
        fail(problems, "`tree` does not fit `rules`")

    out: dict[str, Any] = {}
    for r in table:
        if r.pattern is None:
            part = {r.name: tensors[r.name]}
        elif str(r.pattern) in patterns:
            part = _unstack_group(
                str(r.pattern), patterns.pop(str(r.pattern)), tensors, layers
            )
        else:
            continue
        clash = [n for n in part if n in out]
        if clash:
            fail([repr(n) for n in clash], "`rules` give several tensors one name")
        out.update(part)
    return out


def _group_problems(
    pattern: str,
    group: Sequence[_Parsed],
    tensors: Mapping[str, Any],
    layers: Mapping[str, Sequence[int]] | None,
) -> list[str]:
    """Why the tensors of one layer pattern's rules cannot be unstacked: layer
    counts that differ within a kind, kinds mixed with `{i}`, kinds without
    `layers`, several expert patterns."""
    problems: list[str] = []
    kinds = list(dict.fromkeys(r.kind for r in group))
    for kind in kinds:
        shapes = [
            (f"`tree` at {r.path}", shape_of(tensors[r.name]))
            for r in group
            if r.kind == kind
        ]
        problems += count_layers(shapes, hint="")[1]
    labelled = [k for k in kinds if k is not None]
    if labelled and None in kinds:
        problems.append(
            f"the rules of layer pattern {pattern!r} read both all layers (`{{i}}`) "
            f"and kinds ({', '.join(labelled)}); a checkpoint is one or the other"
        )
    elif labelled and (layers is None or any(k not in layers for k in labelled)):
        problems.append(
            f"the rules read kinds {', '.join(labelled)} of layer pattern "
            f"{pattern!r}: `layers` must give each kind's layers (as `detect_kinds` "
            f"gives them), got {None if layers is None else dict(layers)}"
        )
    experts = {str(r.experts) for r in group if r.experts is not None}
    if len(experts) > 1:
        problems.append(
            f"the rules of layer pattern {pattern!r} name several expert patterns "
            f"({', '.join(sorted(map(repr, experts)))}); a checkpoint has one"
        )
    return problems


def _unstack_group(
    pattern: str,
    group: Sequence[_Parsed],
    tensors: Mapping[str, Any],
    layers: Mapping[str, Sequence[int]] | None,
) -> dict[str, Any]:
    """The per-layer tensors of one layer pattern's rules, layer by layer."""
    experts = next((str(r.experts) for r in group if r.experts is not None), None)
    if all(r.kind is None for r in group):
        return unstack_by_name(
            {g.key: tensors[g.name] for g in group}, pattern, experts=experts
        )
    assert layers is not None  # checked by _group_problems
    stacked: dict[str, dict[str, Any]] = {}
    for g in group:
        stacked.setdefault(str(g.kind), {})[g.key] = tensors[g.name]
    return unstack_by_name(
        stacked,
        pattern,
        layers={label: layers[label] for label in stacked},
        experts=experts,
    )
