"""A text summary of a checkpoint, read from its headers only.

Names come from the file and may hold anything: they are listed in name order
(whatever the order of the shards) and printed with `printable`, so that no escape
sequence or carriage return in a name reaches the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._leaf import short_dtype
from ._convert import stack_plan
from ._io import Checkpoint, Paths, TensorInfo, read_checkpoint
from ._layer_pattern import detect_pattern
from ._plan import kind_gaps
from ._stacked import META_PATTERN, stored_plan
from ._text import count, human_bytes, printable, ranges

_MAX_LISTED = 40


def _table(rows: list[tuple[str, TensorInfo]]) -> list[str]:
    rows = sorted(rows, key=lambda row: row[0])
    shown = [(printable(name), t) for name, t in rows[:_MAX_LISTED]]
    width = max((len(name) for name, _ in shown), default=0)
    lines = [
        f"  {name:<{width}}  {short_dtype(t.dtype_name)}[{','.join(map(str, t.shape))}]"
        for name, t in shown
    ]
    if len(rows) > _MAX_LISTED:
        lines.append(f"  ... and {len(rows) - _MAX_LISTED} more")
    return lines


def inspect_checkpoint(
    paths: Paths, /, *, pattern: str | None = None, experts: str | None = None
) -> str:
    """Summarises a checkpoint from its headers, without reading tensor data.

    Gives the number of tensors and bytes; for a per-layer checkpoint the layer
    pattern (given, or detected when unambiguous), N, and one layer's names, shapes
    and dtypes; for a stacked checkpoint its recorded pattern and N. When the layers
    are of several kinds (layers holding different keys, which `stackedtree stack`
    stacks each on its own), it gives each kind's layers, as ranges (`0-2`), and
    one layer's names, shapes and dtypes (stacked, in a stacked file). Tensors are
    listed in name order, whatever the order of the files, with every character
    that is not printable escaped (`\\x1b`).

    Args:
        paths: as in `load_flat`.
        pattern: the layer pattern of a per-layer checkpoint; detected when None.
        experts: its expert pattern (`"mlp.experts.{e}."`); detected when None,
            as `stackedtree stack` does; `"none"` lists each expert's tensors.

    Returns:
        The summary, several lines of text.

    Raises:
        ValueError: a malformed file, or a `pattern` that does not fit.
        OSError: a file cannot be read.
    """
    ckpt: Checkpoint = read_checkpoint(paths)
    total = sum(t.nbytes for t in ckpt.tensors.values())
    files = count(len(ckpt.files), "file")
    lines = [
        f"{files}, {len(ckpt.tensors)} tensors, {human_bytes(total)} ({total} bytes)"
    ]
    if META_PATTERN in ckpt.metadata:
        lines += _stacked(ckpt)
    else:
        lines += _per_layer(ckpt, pattern, experts)
    other = {k: v for k, v in ckpt.metadata.items() if not k.startswith("stackedtree.")}
    if other:
        shown = ", ".join(f"{printable(k)}={v!r}" for k, v in sorted(other.items()))
        lines.append("metadata: " + shown)
    return "\n".join(lines)


def _per_layer(ckpt: Checkpoint, pattern: str | None, experts: str | None) -> list[str]:
    how = "given"
    try:
        if pattern is None:
            how = "detected"
            pattern = detect_pattern(ckpt.tensors)
        plan = stack_plan(ckpt, pattern, experts)
    except ValueError as e:
        if how == "given":
            raise
        # A detected pattern that does not fit is no pattern: list the tensors.
        why = str(e).rstrip(".").replace(":\n  ", ": ").replace("\n  ", "; ")
        return [
            f"layer pattern: none ({printable(why)})",
            "tensors:",
            *_table(list(ckpt.tensors.items())),
        ]
    lines = [f"layer pattern: {pattern!r} ({how}), {plan.num_layers} layers"]
    if plan.experts is not None:
        lines.append(
            f"expert pattern: {plan.experts!r} "
            f"({'detected' if experts is None else 'given'})"
        )
    for kind in plan.kinds:
        one = [(e.key, ckpt.tensors[e.sources[0]]) for e in kind.entries]
        size = sum(
            ckpt.tensors[e.first].nbytes * (e.experts or 1) for e in kind.entries
        )
        tensors = sum(e.experts or 1 for e in kind.entries)
        shape = f"{tensors} tensors ({human_bytes(size)} each)"
        head = f"layer {kind.layers[0]}"
        if kind.experts:
            shape += f", {kind.experts} experts"
            head += ", one expert's tensors under `{e}`"
        if len(plan.kinds) == 1:
            lines[0] += f" of {shape}"
            lines.append(head + ":")
        else:
            lines.append(
                f"kind {kind.label}: {_layers(kind.layers)} of {shape}; {head}:"
            )
        lines += _table(one)
    if len(plan.kinds) > 1:
        lines[0] += f" of {len(plan.kinds)} kinds"
    lines += [f"warning: {printable(line)}" for line in kind_gaps(plan)]
    lines.append(f"other tensors ({len(plan.rest)}):")
    lines += _table([(name, ckpt.tensors[name]) for name in plan.rest])
    return lines


def _layers(layers: Sequence[int]) -> str:
    """`[0, 1, 2]` -> `"3 layers (0-2)"`."""
    return f"{count(len(layers), 'layer')} ({ranges(layers)})"


def _stacked(ckpt: Checkpoint) -> list[str]:
    plan = stored_plan(ckpt)
    head = f"stacked checkpoint: pattern {plan.pattern!r}, {plan.num_layers} layers"
    axes = "leading axis = layer"
    if plan.experts is not None:
        axes += " (and expert, for names with `{e}`)"
    if plan.layers is None:
        entries = plan.kinds[0].entries
        lines = [head, f"stacked tensors ({len(entries)}), {axes}:"]
        if plan.experts is not None:
            lines[0] += f", {plan.kinds[0].experts} experts"
            lines.insert(1, f"expert pattern: {plan.experts!r}")
        lines += _table([(e.name, ckpt.tensors[e.name]) for e in entries])
    else:
        lines = [head + f" of {len(plan.kinds)} kinds"]
        if plan.experts is not None:
            lines.append(f"expert pattern: {plan.experts!r}")
        for kind in plan.kinds:
            experts = f", {kind.experts} experts" if kind.experts else ""
            lines.append(
                f"kind {kind.label}: {_layers(kind.layers)}{experts}, "
                f"{len(kind.entries)} stacked tensors, {axes}:"
            )
            lines += _table([(e.name, ckpt.tensors[e.name]) for e in kind.entries])
    lines.append(f"other tensors ({len(plan.rest)}):")
    lines += _table([(name, ckpt.tensors[name]) for name in plan.rest])
    return lines
