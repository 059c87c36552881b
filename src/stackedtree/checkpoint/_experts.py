"""`ExpertPattern`: where the expert index sits inside a per-layer key.

A mixture-of-experts layer holds E experts, each under a second index inside the
per-layer key: `mlp.experts.3.gate_proj.weight` is expert 3's `gate_proj.weight`. An
*expert pattern* is a string with one `{e}`, relative to the per-layer key:
`"mlp.experts.{e}."`. Stacked, the experts of a key become one tensor with an expert
axis after the layer axis, `(N, E, ...)`, named by the key with the literal `{e}`
kept: `model.layers.{i}.mlp.experts.{e}.gate_proj.weight`.

Keys without the expert index (routers, shared experts, DeepSeek's
`e_score_correction_bias`, and the fused `(E, ...)` tensors of Llama 4 and gpt-oss)
are per-layer keys like any other and stack over layers only.

Within one layer the experts' tensors are laid out expert by expert
(`expert_order`): expert 0's tensors, in key order, then expert 1's, ... at the place
of the layer's first expert tensor. This is the order in which `unstack_by_name` and
`stackedtree unstack` write a layer back, and the order a model's `state_dict` has.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ._layer_pattern import LayerPattern

_DIGITS = re.compile(r"[0-9]+")
_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")

NO_EXPERTS = "none"
"""The `experts` value that keeps experts apart (each stacked over layers only)."""

T = TypeVar("T")


@dataclass(frozen=True)
class ExpertPattern:
    """A parsed expert pattern.

    Attributes:
        before: the part of the pattern before `{e}`.
        after: the part after it.
    """

    before: str
    after: str

    @classmethod
    def parse(cls, pattern: str | ExpertPattern, arg: str = "experts") -> ExpertPattern:
        """Parses `pattern`, which must hold exactly one `{e}` and no `{i}`.

        Raises:
            TypeError: `pattern` is not a string.
            ValueError: `pattern` does not hold exactly one `{e}`, or holds `{i}`.
        """
        if isinstance(pattern, ExpertPattern):
            return pattern
        if not isinstance(pattern, str):
            raise TypeError(f"`{arg}` must be a str, got {type(pattern).__name__}.")
        n = pattern.count("{e}")
        if n != 1 or "{i" in pattern:
            raise ValueError(
                f"`{arg}` must contain exactly one `{{e}}` where the expert index "
                f"goes, relative to the per-layer key, got {pattern!r}; for example "
                f"'mlp.experts.{{e}}.'."
            )
        before, after = pattern.split("{e}")
        return cls(before, after)

    def __str__(self) -> str:
        return self.before + "{e}" + self.after

    def match(self, key: str) -> tuple[int, str] | None:
        """`(e, sub)` when per-layer key `key` is expert `e`'s tensor `sub`."""
        if not key.startswith(self.before):
            return None
        digits = _DIGITS.match(key, len(self.before))
        if digits is None or not _CANONICAL_INT.fullmatch(digits.group()):
            return None
        tail = key[digits.end() :]
        if not tail.startswith(self.after):
            return None
        return int(digits.group()), tail[len(self.after) :]

    def expert_key(self, sub: str) -> str:
        """The stacked key of expert tensor `sub`: `mlp.experts.{e}.gate_proj.weight`."""
        return str(self) + sub

    def key(self, e: int, sub: str) -> str:
        """Expert `e`'s per-layer key for `sub`: `mlp.experts.3.gate_proj.weight`."""
        return f"{self.before}{e}{self.after}{sub}"

    def stacked_sub(self, key: str) -> str | None:
        """`sub` when `key` is a stacked expert key (with `{e}`), else None."""
        prefix = str(self)
        return key[len(prefix) :] if key.startswith(prefix) else None


def parse_experts(experts: str | None, arg: str = "experts") -> ExpertPattern | None:
    """`experts` parsed; None for None and for `"none"` (experts kept apart)."""
    if experts is None or experts == NO_EXPERTS:
        return None
    return ExpertPattern.parse(experts, arg)


def expert_order(
    keys: Sequence[T], sub_of: dict[T, bool], num_experts: int
) -> list[tuple[T, int | None]]:
    """One layer's tensors in order: `(key, None)` for a key without experts,
    `(key, e)` for expert `e` of an expert key; all experts' tensors, expert by
    expert, at the place of the first expert key."""
    out: list[tuple[T, int | None]] = []
    experts = [k for k in keys if sub_of[k]]
    for k in keys:
        if not sub_of[k]:
            out.append((k, None))
        elif k == experts[0]:
            out += [(x, e) for e in range(num_experts) for x in experts]
    return out


def detect_experts(names: Iterable[str], pattern: str, /) -> str | None:
    """Finds the expert pattern of a per-layer mixture-of-experts checkpoint.

    Inside each per-layer key (the part of a name after the layer pattern), the
    first dotted component that is an integer gives a candidate
    `<components before it>.{e}.`; the expert pattern is the first candidate, in
    name order, that takes two or more values across the checkpoint. Experts stored
    fused, one `(E, ...)` tensor per weight (Llama 4, gpt-oss), have no index and
    need no pattern.

    Args:
        names: the tensor names (a flat checkpoint's keys will do).
        pattern: the layer pattern, with one `{i}`.

    Returns:
        The expert pattern, such as `"mlp.experts.{e}."`, relative to the per-layer
        key; None when the layers hold no numbered sub-modules.

    Raises:
        ValueError: `pattern` does not hold exactly one `{i}`.

    Examples:
        >>> names = ["h.0.moe.0.w", "h.0.moe.1.w", "h.1.moe.0.w", "h.1.moe.1.w"]
        >>> detect_experts(names, "h.{i}.")
        'moe.{e}.'
        >>> print(detect_experts(["h.0.w", "h.1.w"], "h.{i}."))
        None
    """
    lp = LayerPattern.parse(pattern)
    found: dict[str, set[int]] = {}
    for name in names:
        m = lp.match(name)
        if m is None:
            continue
        parts = m[1].split(".")
        for j, part in enumerate(parts[:-1]):
            if _CANONICAL_INT.fullmatch(part):
                prefix = "".join(p + "." for p in parts[:j])
                found.setdefault(prefix + "{e}.", set()).add(int(part))
                break
    return next((p for p, idx in found.items() if len(idx) >= 2), None)
