"""Streaming conversion between per-layer and stacked checkpoints.

Between safetensors files the conversion is a rearrangement of byte ranges: layer `i`
of a stacked tensor is the `i`-th slice of its data, laid out exactly as the per-layer
tensor. So it streams: the output header is written first (all shapes are known from
the source headers), then each range is copied from source to output with
`os.copy_file_range` (inside the kernel) or in bounded chunks, and peak memory stays
that of the interpreter whatever the checkpoint's size.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from ._experts import NO_EXPERTS, ExpertPattern, detect_experts
from ._files import atomic_write, check_output, open_regular, output_kind, read_at
from ._io import (
    Checkpoint,
    PathLike,
    Paths,
    TensorInfo,
    dtype_code,
    load_flat,
    read_checkpoint,
    safetensors_header,
    save_flat,
)
from ._layer_pattern import LayerPattern
from ._limits import MAX_TENSORS
from ._names import stack_by_name, unstack_by_name
from ._plan import StackPlan, kind_gaps, plan_by_kind
from ._safetensors import numpy_dtype
from ._stacked import (
    META_KEYS,
    META_PATTERN,
    load_stacked,
    looks_stacked,
    stacked_metadata,
    stored_plan,
)
from ._text import count, files_text, ranges

_CHUNK = 16 << 20
_FALLBACK_ERRNOS = {
    errno.EXDEV,
    errno.ENOSYS,
    errno.EINVAL,
    errno.EOPNOTSUPP,
    errno.EPERM,
}


class Conversion(NamedTuple):
    """What a conversion did.

    Attributes:
        pattern: the layer pattern.
        num_layers: N.
        num_tensors: the number of tensors written.
        nbytes: the number of tensor bytes written.
        streamed: whether it streamed byte ranges (safetensors to safetensors)
            rather than loading the checkpoint into memory (npz).
        kinds: each kind's label -> its layers, when the layers are of several
            kinds; None when they are of one.
        experts: the expert pattern whose experts are stacked on an expert axis;
            None when none are.
        gaps: for each kind whose keys are a strict subset of another kind's (a
            damaged layer looks like that), a line saying which keys it lacks
            (`missing_keys` gives the keys).
    """

    pattern: str
    num_layers: int
    num_tensors: int
    nbytes: int
    streamed: bool
    kinds: dict[str, list[int]] | None = None
    experts: str | None = None
    gaps: tuple[str, ...] = ()


# --------------------------------------------------------------------------- streaming


class _Piece(NamedTuple):
    file: Path
    offset: int
    nbytes: int


class _Item(NamedTuple):
    name: str
    dtype: str  # as `str(dtype)` prints it: a name that needs no ml_dtypes
    shape: tuple[int, ...]
    pieces: list[_Piece]


def _whole(t: TensorInfo) -> _Piece:
    return _Piece(t.file, t.offset, t.nbytes)


_WRITEBACK_EVERY = 64 << 20


def _writeback_starter() -> Callable[[int, int, int], Any] | None:
    """Linux's `sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`, which
    starts writing a range's dirty pages to disk and returns without waiting; None
    where there is no such call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return lambda fd, offset, nbytes: call(fd, offset, nbytes, 2)


class _Copier:
    """Copies byte ranges to the end of `dst` (at `start`): in the kernel when it
    can, else in chunks.

    Every `every` bytes it starts the write-back of what it copied
    (where the system has a call for that), so that the disk writes while the next
    ranges are copied rather than all at the end: a copy whose ranges land at other
    offsets within a page than they had in their source is slower than `cp`'s,
    and this overlap wins that back (see `benchmarks/bench_convert.py`).
    """

    def __init__(self, dst: int, start: int, every: int = _WRITEBACK_EVERY) -> None:
        self.dst, self.every = dst, every
        self.fast = hasattr(os, "copy_file_range")
        self.buf: np.ndarray | None = None
        self.at = self.flushed = start
        self.writeback = _writeback_starter()

    def copy(self, src: int, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, self.every)
            self._copy(src, offset, n)
            offset, length, self.at = offset + n, length - n, self.at + n
            if self.writeback and self.at - self.flushed >= self.every:
                self.writeback(self.dst, self.flushed, self.at - self.flushed)
                self.flushed = self.at

    def _copy(self, src: int, offset: int, length: int) -> None:
        while length > 0:
            if self.fast:
                try:
                    done = os.copy_file_range(
                        src, self.dst, min(length, 1 << 30), offset
                    )
                except OSError as e:
                    if e.errno not in _FALLBACK_ERRNOS:
                        raise
                    self.fast = False
                    continue
            else:
                if self.buf is None:
                    self.buf = np.empty(_CHUNK, np.uint8)
                view = self.buf.data[: min(length, _CHUNK)]
                done = read_at(src, offset, view)
                written = 0
                while written < done:
                    written += os.write(self.dst, view[written:done])
            if done == 0:
                raise ValueError("a source file shrank while it was being converted")
            offset += done
            length -= done


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def _bar(total: int, desc: str, progress: bool) -> Iterator[Any]:
    """A progress bar of `total` bytes on stderr when it is a terminal; with
    `progress` False none, and tqdm is not even imported (its import takes about
    50 ms, which `stackedtree stack -q` need not spend)."""
    if not progress:
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        disable=None,
    ) as bar:
        yield bar


def _stream(
    items: Sequence[_Item],
    out: PathLike,
    metadata: Mapping[str, str],
    *,
    overwrite: bool,
    progress: bool,
    desc: str,
) -> int:
    header = safetensors_header(
        [(it.name, it.dtype, it.shape) for it in items], metadata
    )
    total = sum(p.nbytes for it in items for p in it.pieces)
    sources: dict[Path, BinaryIO] = {}
    try:
        with (
            atomic_write(out, overwrite=overwrite) as f,
            _bar(total, desc, progress) as bar,
        ):
            f.write(header)
            f.flush()
            copier = _Copier(f.fileno(), len(header))
            for it in items:
                for piece in it.pieces:
                    if piece.file not in sources:
                        sources[piece.file] = open_regular(piece.file)
                    src = sources[piece.file].fileno()
                    copier.copy(src, piece.offset, piece.nbytes)
                    bar.update(piece.nbytes)
    finally:
        for source in sources.values():
            source.close()
    return total


def convert_stack(
    src: Paths,
    out: PathLike,
    /,
    *,
    pattern: str | None = None,
    experts: str | None = None,
    kinds: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Conversion:
    """Converts a per-layer checkpoint into a stacked one, streaming tensor by tensor.

    The layers are divided into kinds, layers holding the same set of keys
    (`detect_kinds`), and each kind is stacked on its own. When every layer holds
    the same keys (one kind), the result loads with `load_stacked` as exactly
    `stack_by_name(load_flat(src), pattern)`; with several kinds, as
    `stack_by_name(load_flat(src), pattern, layers=kinds)`, its tensors named
    `model.layers.{i:A}.key`, `model.layers.{i:B}.key`, ... and the kinds recorded
    in its metadata. Between safetensors files nothing is held in memory but a copy
    buffer; from or to `.npz` the checkpoint is loaded.

    Args:
        src: the per-layer checkpoint, as in `load_flat`.
        out: the stacked checkpoint to write (`.safetensors` or `.npz`).
        pattern: the layer pattern; detected with `detect_pattern` when None.
        experts: the expert pattern (`"mlp.experts.{e}."`): each expert tensor's
            experts are stacked on a second axis, `(N_kind, E, ...)`, under its key
            with `{e}` kept, and the pattern is recorded in the metadata. Detected
            with `detect_experts` when None; `"none"` keeps experts apart (each
            stacked over layers only). A checkpoint without experts is written as
            without this option, byte for byte.
        kinds: how many kinds the layers must form (`1`: refuse a checkpoint whose
            layers do not all hold the same keys, such as one that lost a tensor);
            None accepts any number.
        overwrite: replace an existing `out`.
        progress: show a progress bar on stderr (when it is a terminal).

    Returns:
        The pattern, N, kinds and amounts written.

    Raises:
        ValueError: the source is already stacked, or holds a name that would read
            back as a stacked tensor; the pattern is missing and cannot be
            detected, or does not fit (as in `stack_by_name`); layers with the
            same keys differ in a tensor's shape or dtype; a layer lacks an expert
            or an expert tensor, or experts differ in shape or dtype; the layers
            form another number of kinds than `kinds`; `out` is not a
            `.safetensors` or `.npz` name; as in `load_flat`.
        FileExistsError: `out` exists and `overwrite` is False; `out` is checked,
            as its folder is, before any tensor is read.
        OSError: a file cannot be read or written. No partial `out` is left.
    """
    streams = output_kind(Path(out)) == "safetensors"
    check_output(out, overwrite=overwrite)
    ckpt = read_checkpoint(src)
    if META_PATTERN in ckpt.metadata:
        raise ValueError(
            f"the checkpoint is already stacked (pattern "
            f"{ckpt.metadata[META_PATTERN]!r}); use `stackedtree unstack` to undo it"
        )
    plan = stack_plan(ckpt, pattern, experts, kinds)
    pattern, layers = plan.pattern, plan.layers
    metadata = stacked_metadata(
        pattern, plan.num_layers, ckpt.metadata, layers, plan.experts
    )
    items = _stacked_items(ckpt, plan)
    gaps = tuple(kind_gaps(plan))
    if ckpt.streamable and streams:
        nbytes = _stream(
            items, out, metadata, overwrite=overwrite, progress=progress, desc="stack"
        )
        done = (len(items), nbytes, True)
    else:
        # From or to npz the tensors are loaded, and written in the order streaming
        # gives.
        _check_storable(items, streams)
        stacked, rest = stack_by_name(
            load_flat(src), pattern, layers=layers, experts=plan.experts
        )
        arrays = dict(rest)
        for kind, e in plan.entries():
            part = stacked if kind.label is None else stacked[kind.label]
            arrays[e.name] = part[e.key]
        nbytes = _save_items(items, arrays, out, metadata, overwrite=overwrite)
        done = (len(items), nbytes, False)
    return Conversion(pattern, plan.num_layers, *done, layers, plan.experts, gaps)


def stack_plan(
    ckpt: Checkpoint,
    pattern: str | None,
    experts: str | None,
    kinds: int | None = None,
) -> StackPlan:
    """How `stackedtree stack` stacks a per-layer checkpoint: the pattern and the
    expert pattern detected unless given, every kind of layers on its own."""
    if pattern is None:
        pattern = str(LayerPattern.detect(ckpt.tensors))
    lp = LayerPattern.parse(pattern)
    if experts is None:
        experts = detect_experts(ckpt.tensors, pattern)
    elif experts == NO_EXPERTS:
        experts = None
    specs = {name: (t.shape, t.dtype_name) for name, t in ckpt.tensors.items()}
    plan = plan_by_kind(specs, pattern, experts)
    looks_stacked(lp, plan.rest)
    if kinds is not None and len(plan.kinds) != kinds:
        found = ", ".join(f"{k.label} (layers {ranges(k.layers)})" for k in plan.kinds)
        gaps = "".join(f"; {line}" for line in kind_gaps(plan))
        raise ValueError(
            f"the layers form {count(len(plan.kinds), 'kind')}, {found}, but "
            f"{count(kinds, 'kind')} {'was' if kinds == 1 else 'were'} asked for"
            f"{gaps}"
        )
    return plan


def _stacked_items(ckpt: Checkpoint, plan: StackPlan) -> list[_Item]:
    """The stacked file's tensors: each kind's stacked tensors where its first
    layer's tensors were, the others as they are."""
    items: list[_Item] = []
    for out_item in plan.arranged(ckpt.tensors):
        if isinstance(out_item, str):
            t = ckpt.tensors[out_item]
            items.append(_Item(out_item, t.dtype_name, t.shape, [_whole(t)]))
            continue
        e = out_item[1]
        parts = [ckpt.tensors[name] for name in e.sources]
        first = parts[0]
        lead = (len(parts) // e.experts, e.experts) if e.experts else (len(parts),)
        items.append(
            _Item(
                e.name,
                first.dtype_name,
                (*lead, *first.shape),
                [_whole(p) for p in parts],
            )
        )
    return items


def convert_unstack(
    src: Paths, out: PathLike, /, *, overwrite: bool = False, progress: bool = False
) -> Conversion:
    """Converts a stacked checkpoint back to per-layer tensors, streaming.

    The inverse of `convert_stack`: the pattern, N and kinds come from the
    source's metadata, and the result equals the original per-layer checkpoint bit
    for bit (layer-major order: all of layer 0's tensors, then layer 1's, ...).

    Args:
        src: the stacked checkpoint, as in `load_flat`.
        out: the per-layer checkpoint to write (`.safetensors` or `.npz`).
        overwrite: replace an existing `out`.
        progress: show a progress bar on stderr (when it is a terminal).

    Returns:
        The pattern, N, kinds and amounts written.

    Raises:
        ValueError: the source is not a stacked checkpoint, or disagrees with its
            recorded metadata; its layers would make more tensors than a file may
            hold; `out` is not a `.safetensors` or `.npz` name; as in `load_flat`.
        FileExistsError: `out` exists and `overwrite` is False; `out` is checked,
            as its folder is, before any tensor is read.
        OSError: a file cannot be read or written. No partial `out` is left.
    """
    streams = output_kind(Path(out)) == "safetensors"
    check_output(out, overwrite=overwrite)
    ckpt = read_checkpoint(src)
    plan = stored_plan(ckpt)
    pattern, n, rest = plan.pattern, plan.num_layers, plan.rest
    # N is only bounded by the bytes of the stacked tensors, and empty ones have none.
    stacked_count = sum(len(k.layers) * len(k.entries) for k in plan.kinds)
    count = stacked_count + len(rest)
    if count > MAX_TENSORS:
        where = files_text(ckpt.files)
        keys = sum(len(k.entries) for k in plan.kinds)
        raise ValueError(
            f"{where}: its metadata says {n} layers, which would unstack its "
            f"{keys} stacked tensors into {count} tensors, more than the "
            f"{MAX_TENSORS} a file may hold"
        )
    metadata = {k: v for k, v in ckpt.metadata.items() if k not in META_KEYS}
    kinds = plan.layers
    lp = LayerPattern.parse(pattern)
    # The layers go where the first stacked tensor was, layer by layer.
    stacked_names = {e.name for _, e in plan.entries()}
    items: list[_Item] = []
    emitted = False
    for name, t in ckpt.tensors.items():
        if name not in stacked_names:
            items.append(_Item(name, t.dtype_name, t.shape, [_whole(t)]))
        elif not emitted:
            emitted = True
            items += _layer_items(ckpt, plan, lp)
    if ckpt.streamable and streams:
        nbytes = _stream(
            items, out, metadata, overwrite=overwrite, progress=progress, desc="unstack"
        )
        return Conversion(pattern, n, len(items), nbytes, True, kinds, plan.experts)

    # From or to npz the tensors are loaded, and written in the order streaming gives.
    _check_storable(items, streams)
    loaded = load_stacked(src)
    arrays = unstack_by_name(
        loaded.stacked, pattern, loaded.rest, layers=kinds, experts=plan.experts
    )
    nbytes = _save_items(items, arrays, out, metadata, overwrite=overwrite)
    return Conversion(pattern, n, len(items), nbytes, False, kinds, plan.experts)


def _check_storable(items: Sequence[_Item], safetensors: bool) -> None:
    """Refuses, before anything is loaded, a dtype a safetensors output cannot hold."""
    if safetensors:
        for it in items:
            dtype_code(numpy_dtype(it.dtype), it.name)


def _save_items(
    items: Sequence[_Item],
    arrays: Mapping[str, np.ndarray],
    out: PathLike,
    metadata: Mapping[str, str],
    *,
    overwrite: bool,
) -> int:
    """Saves `arrays` under the names of `items`, in their order; the bytes written."""
    flat = {it.name: arrays[it.name] for it in items}
    save_flat(out, flat, overwrite=overwrite, metadata=metadata)
    return sum(x.nbytes for x in flat.values())


def _layer_items(ckpt: Checkpoint, plan: StackPlan, lp: LayerPattern) -> list[_Item]:
    """Every layer's tensors, layer by layer, as slices of the stacked tensors."""
    owner = {i: (kind, j) for kind in plan.kinds for j, i in enumerate(kind.layers)}
    orders = {kind.label: kind.layer_order() for kind in plan.kinds}
    ep = None if plan.experts is None else ExpertPattern.parse(plan.experts)
    items: list[_Item] = []
    for i in range(plan.num_layers):
        kind, j = owner[i]
        for e, x in orders[kind.label]:
            s = ckpt.tensors[e.name]
            if x is None or ep is None:
                size = s.nbytes // len(kind.layers)
                piece = _Piece(s.file, s.offset + j * size, size)
                name, shape = lp.layer_name(i, e.key), s.shape[1:]
            else:
                size = s.nbytes // (len(kind.layers) * e.experts)
                piece = _Piece(s.file, s.offset + (j * e.experts + x) * size, size)
                sub = e.key[len(str(ep)) :]
                name, shape = lp.layer_name(i, ep.key(x, sub)), s.shape[2:]
            items.append(_Item(name, s.dtype_name, shape, [piece]))
    return items
