"""A text summary of a checkpoint, read from its headers only."""

from __future__ import annotations

from .._leaf import short_dtype
from ._io import Checkpoint, Paths, TensorInfo, read_checkpoint
from ._names import group_names
from ._pattern import detect_pattern
from ._stacked import META_PATTERN, split_stacked

_MAX_LISTED = 40


def human_bytes(n: int) -> str:
    """`1536` -> `"1.5 KiB"`."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _table(rows: list[tuple[str, TensorInfo]]) -> list[str]:
    shown = rows[:_MAX_LISTED]
    width = max((len(name) for name, _ in shown), default=0)
    lines = [
        f"  {name:<{width}}  {short_dtype(t.dtype)}[{','.join(map(str, t.shape))}]"
        for name, t in shown
    ]
    if len(rows) > _MAX_LISTED:
        lines.append(f"  ... and {len(rows) - _MAX_LISTED} more")
    return lines


def inspect_checkpoint(paths: Paths, /, *, pattern: str | None = None) -> str:
    """Summarises a checkpoint from its headers, without reading tensor data.

    Gives the number of tensors and bytes; for a per-layer checkpoint the layer
    pattern (given, or detected when unambiguous), N, and one layer's names, shapes
    and dtypes; for a stacked checkpoint its recorded pattern and N.

    Args:
        paths: as in `load_flat`.
        pattern: the layer pattern of a per-layer checkpoint; detected when None.

    Returns:
        The summary, several lines of text.

    Raises:
        ValueError: a malformed file, or a `pattern` that does not fit.
        OSError: a file cannot be read.
    """
    ckpt: Checkpoint = read_checkpoint(paths)
    total = sum(t.nbytes for t in ckpt.tensors.values())
    files = f"{len(ckpt.files)} file" + ("s" if len(ckpt.files) != 1 else "")
    lines = [
        f"{files}, {len(ckpt.tensors)} tensors, {human_bytes(total)} ({total} bytes)"
    ]
    if META_PATTERN in ckpt.metadata:
        found, n, keys, rest = split_stacked(ckpt)
        lines.append(f"stacked checkpoint: pattern {found!r}, {n} layers")
        lines.append(f"stacked tensors ({len(keys)}), leading axis = layer:")
        lines += _table([(name, ckpt.tensors[name]) for name in keys.values()])
    else:
        if pattern is None:
            try:
                pattern = detect_pattern(ckpt.tensors)
                how = "detected"
            except ValueError as e:
                lines.append(f"layer pattern: none ({str(e).rstrip('.')})")
                lines.append("tensors:")
                lines += _table(list(ckpt.tensors.items()))
                return "\n".join(lines)
        else:
            how = "given"
        specs = {name: (t.shape, t.dtype) for name, t in ckpt.tensors.items()}
        g = group_names(specs, pattern)
        rest = list(g.rest)
        per_layer = sum(ckpt.tensors[name].nbytes for name in g.names[0])
        lines.append(
            f"layer pattern: {pattern!r} ({how}), {g.num_layers} layers of "
            f"{len(g.keys)} tensors ({human_bytes(per_layer)} each)"
        )
        lines.append("layer 0:")
        lines += _table(
            [
                (key, ckpt.tensors[name])
                for key, name in zip(g.keys, g.names[0], strict=True)
            ]
        )
    lines.append(f"other tensors ({len(rest)}):")
    lines += _table([(name, ckpt.tensors[name]) for name in rest])
    other = {k: v for k, v in ckpt.metadata.items() if not k.startswith("stackedtree.")}
    if other:
        lines.append("metadata: " + ", ".join(f"{k}={v!r}" for k, v in other.items()))
    return "\n".join(lines)
