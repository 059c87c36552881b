"""`LayerPattern`: where the layer index sits in a per-layer tensor name.

A pattern is a string with one `{i}`, such as `"model.layers.{i}."`. Name `n` belongs to
layer `i` when `n == before + str(i) + after + key`, with `before`/`after` the parts
around `{i}` and `key` the per-layer name (`self_attn.q_proj.weight`). In a stacked
checkpoint the tensor `key` is stored once under the *stacked name*, the per-layer name
with the literal `{i}` kept (`model.layers.{i}.self_attn.q_proj.weight`), which no
per-layer name can equal.

When the layers are of several *kinds* (layers holding different keys, as DeepSeek's
dense and MoE layers), each kind is stacked on its own and its stacked names carry its
label: `model.layers.{i:B}.input_layernorm.weight` is `input_layernorm.weight` of the
layers of kind `B`. The label sits where the index goes, so such a name can equal
neither a per-layer name (digits there), nor a uniform stacked name (`{i}`), nor
another kind's. Labels are words (`[A-Za-z0-9_]+`); detected kinds are labelled `A`,
`B`, ... in the order their first layers come (`kind_label`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ._text import ranges

_DIGITS = re.compile(r"[0-9]+")
_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")
_LABEL = re.compile(r"[A-Za-z0-9_]+")


def kind_label(j: int) -> str:
    """The label of the `j`-th kind found: `A`, ..., `Z`, then `AA`, `AB`, ...

    Examples:
        >>> [kind_label(j) for j in (0, 1, 25, 26, 27)]
        ['A', 'B', 'Z', 'AA', 'AB']
    """
    label = ""
    j += 1
    while j:
        j, r = divmod(j - 1, 26)
        label = chr(ord("A") + r) + label
    return label


def check_label(label: object, arg: str) -> str:
    """`label` if it is a kind label, a non-empty word of `[A-Za-z0-9_]`.

    Raises:
        TypeError: `label` is not a str.
        ValueError: it is empty or holds another character.
    """
    if not isinstance(label, str):
        raise TypeError(
            f"{arg} must have str kind labels, got {type(label).__name__} {label!r}."
        )
    if not _LABEL.fullmatch(label):
        raise ValueError(
            f"{arg} has kind label {label!r}; a label is a non-empty word of letters, "
            f"digits and `_`, such as 'dense' or 'A'."
        )
    return label


@dataclass(frozen=True)
class LayerPattern:
    """A parsed layer pattern.

    Attributes:
        before: the part of the pattern before `{i}`.
        after: the part after it.
    """

    before: str
    after: str

    @classmethod
    def parse(cls, pattern: str | LayerPattern, arg: str = "pattern") -> LayerPattern:
        """Parses `pattern`, which must hold exactly one `{i}`.

        Raises:
            TypeError: `pattern` is not a string.
            ValueError: `pattern` does not hold exactly one `{i}`.
        """
        if isinstance(pattern, LayerPattern):
            return pattern
        if not isinstance(pattern, str):
            raise TypeError(f"`{arg}` must be a str, got {type(pattern).__name__}.")
        count = pattern.count("{i}")
        if count != 1:
            raise ValueError(
                f"`{arg}` must contain exactly one `{{i}}` where the layer index goes, "
                f"got {pattern!r} with {count}; for example 'model.layers.{{i}}.'."
            )
        before, after = pattern.split("{i}")
        return cls(before, after)

    def __str__(self) -> str:
        return self.before + "{i}" + self.after

    def match(self, name: str) -> tuple[int, str] | None:
        """`(i, key)` when `name` is layer `i`'s tensor `key`, else None.

        The index is the longest run of digits after `before` and must be written in
        canonical decimal: `layers.01.` and `layers.1x.` belong to no layer, and
        `layers.10.` is layer 10, never layer 1.
        """
        if not name.startswith(self.before):
            return None
        digits = _DIGITS.match(name, len(self.before))
        if digits is None or not _CANONICAL_INT.fullmatch(digits.group()):
            return None
        tail = name[digits.end() :]
        if not tail.startswith(self.after):
            return None
        return int(digits.group()), tail[len(self.after) :]

    def layer_name(self, i: int, key: str) -> str:
        """Layer `i`'s name for `key`: `model.layers.3.mlp.up_proj.weight`."""
        return f"{self.before}{i}{self.after}{key}"

    def stacked_name(self, key: str, kind: str | None = None) -> str:
        """The stacked tensor's name for `key`, of the layers of kind `kind`.

        `model.layers.{i}.mlp.up_proj.weight` when all layers are of one kind
        (`kind` None); `model.layers.{i:B}.mlp.up_proj.weight` for kind `B`.
        """
        index = "{i}" if kind is None else "{i:" + kind + "}"
        return self.before + index + self.after + key

    def stacked_key(self, name: str) -> str | None:
        """The per-layer key of uniform stacked name `name` (with `{i}`), or None."""
        prefix = str(self)
        return name[len(prefix) :] if name.startswith(prefix) else None

    def stacked_match(self, name: str) -> tuple[str | None, str] | None:
        """`(kind, key)` when `name` is a stacked name, else None.

        `kind` is None for a uniform stacked name (`model.layers.{i}.w`) and the
        label for a kind's (`model.layers.{i:B}.w` gives `("B", "w")`).
        """
        start = len(self.before) + 2
        if not name.startswith(self.before + "{i"):
            return None
        kind: str | None = None
        if name.startswith("}", start):
            end = start + 1
        else:
            label = _LABEL.match(name, start + 1)
            if not name.startswith(":", start) or label is None:
                return None
            if not name.startswith("}", label.end()):
                return None
            kind, end = label.group(), label.end() + 1
        if not name.startswith(self.after, end):
            return None
        return kind, name[end + len(self.after) :]

    @classmethod
    def detect(cls, names: Iterable[str]) -> LayerPattern:
        """The layer pattern of a per-layer checkpoint, found from its tensor names.

        Every name whose dotted components include an integer gives a candidate
        `<components before it>.{i}.` from its *first* integer component (so experts
        nested inside layers never compete with the layers). The pattern is the one
        candidate seen with at least two layer indices.

        Raises:
            ValueError: no candidate, or several (listed, with their layer counts).
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
            return cls.parse(next(iter(candidates)))
        if not candidates:
            raise ValueError(
                "found no layer pattern (no name prefix is followed by two or more "
                "layer indices); give one explicitly, e.g. --pattern "
                "'model.layers.{i}.'."
            )
        listed = "; ".join(
            f"{p!r} ({len(idx)} layers: {ranges(idx)})" for p, idx in candidates.items()
        )
        raise ValueError(
            f"the layer pattern is ambiguous, candidates are {listed}; choose one with "
            "--pattern (or the `pattern` argument)."
        )


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
    return str(LayerPattern.detect(names))
