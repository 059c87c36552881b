"""`save_sharded`: sharded stacked arrays back to a per-layer checkpoint, in place.

The safetensors layout is a function of the tensors' names, dtypes and shapes alone, so
every process computes it alike (`_save_layout.py`): which file each per-layer tensor
goes to, at which byte offset, and so where each block of each global array lands.
Each process then writes, with positioned writes (`os.pwrite`), only the blocks its
own devices hold: a block of a stacked tensor `(N, ...)` is cut into its layers (of an
expert tensor `(N, E, ...)`, into its layers' experts), and each part is written to
its tensor, one write per contiguous run of the file. Nothing is gathered and nothing
is read back; host memory beyond the arrays is one block (none on CPU devices, whose
blocks are host memory already).

A block that several processes hold (a replicated array, or a data-parallel replica)
is cut along its first dimension into one part per holding process, so that each part
is written once and the work is shared; numpy arrays count as held by every process.

The output is written under hidden temporary names beside the target and renamed when
every process is done, through the phases of `_processes.Processes`: check (every
process's arguments, compared by digest), create (process 0 creates the files at their
full size with their headers, and the index), write (each process its own part), and
finish (process 0 renames, once every process reported success). A failure anywhere
removes the temporary output and is raised in every process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from ._files import PathLike
from ._processes import Processes
from ._safetensors import little
from ._save_layout import (
    HF_MAX_SHARD_SIZE,
    Layout,
    plan_layout,
    plan_specs,
    plan_tensors,
    shard_size,
)
from ._save_target import Target, check_target, commit, create, discard
from ._sharded import (
    CHUNK_BYTES,
    STRIDED_MIN_RUN,
    Box,
    _bounding_box,
    _box,
    _slabs,
    _split_dim,
)
from ._stacked import META_KEYS

# --------------------------------------------------------------------- ownership


class Piece(NamedTuple):
    """A part of a block of array `source` that this process writes."""

    source: str
    block: Box
    part: Box


def _part(box: Box, k: int, m: int) -> Box | None:
    """The `k`-th of `m` parts of `box` cut along its first dimension (None: empty)."""
    if not box:
        return box if k == 0 else None
    a, b = box[0]
    lo, hi = a + (b - a) * k // m, a + (b - a) * (k + 1) // m
    return ((lo, hi), *box[1:]) if lo < hi else None


def own_pieces(arrays: Mapping[str, Any], rank: int, count: int) -> list[Piece]:
    """What process `rank` writes: its share of every block its devices hold."""
    pieces = []
    for name, x in arrays.items():
        shape = tuple(int(d) for d in x.shape)
        holders: dict[Box, set[int]] = {}
        if isinstance(x, jax.Array):
            for d, index in x.sharding.devices_indices_map(shape).items():
                holders.setdefault(_box(index, shape), set()).add(d.process_index)  # type: ignore[attr-defined]
        else:
            holders[tuple((0, d) for d in shape)] = set(range(count))
        for block, processes in holders.items():
            order = sorted(processes)
            if rank in order:
                part = _part(block, order.index(rank), len(order))
                if part is not None and all(b > a for a, b in part):
                    pieces.append(Piece(name, block, part))
    return pieces


# --------------------------------------------------------------------- writing


def _pwrite(fd: int, data: np.ndarray, offset: int) -> None:
    view = data.reshape(-1).view(np.uint8).data
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def write_box(
    fd: int, base: int, shape: tuple[int, ...], box: Box, data: np.ndarray
) -> None:
    """Writes `data`, block `box` of a tensor of `shape` stored at `base`, one
    positioned write per contiguous run of the file."""
    if data.size == 0:
        return
    k = _split_dim(shape, box)
    if k < 0:
        _pwrite(fd, data, base)
        return
    inner = math.prod(shape[k + 1 :])
    starts = np.asarray(box[k][0] * inner, np.int64)
    for j in range(k):
        stride = math.prod(shape[j + 1 :])
        starts = np.add.outer(starts, np.arange(*box[j], dtype=np.int64) * stride)
    offsets = base + starts.reshape(-1) * data.dtype.itemsize
    for run, offset in zip(
        data.reshape(len(offsets), -1), offsets.tolist(), strict=True
    ):
        _pwrite(fd, run, offset)


def _within(sub: Box, box: Box) -> tuple[slice, ...]:
    """The slices of block `sub` inside an array holding block `box`."""
    return tuple(slice(s[0] - b[0], s[1] - b[0]) for s, b in zip(sub, box, strict=True))


def _intersection(a: Box, b: Box) -> Box | None:
    box = tuple((max(x[0], y[0]), min(x[1], y[1])) for x, y in zip(a, b, strict=True))
    return box if all(lo < hi for lo, hi in box) else None


def _tensors(box: Box, lead: int) -> list[tuple[int, ...]]:
    """The indices along the `lead` leading axes (layers, experts) that `box` covers:
    the output tensors it lies in (one, `()`, when `lead` is 0)."""
    return list(itertools.product(*(range(a, b) for a, b in box[:lead])))


def _chunks(bbox: Box, lead: int, itemsize: int, budget: int) -> list[Box]:
    """`bbox` cut into chunks of whole rows of about `budget` bytes (one output
    tensor at a time for a stacked array, a layer's or an expert's, so that each
    chunk lies in one tensor); `lead` as in `Layout.lead`."""
    return [
        (*((k, k + 1) for k in index), *slab)
        for index in _tensors(bbox, lead)
        for slab in _slabs(bbox[lead:], itemsize, budget)
    ]


class _Blocks:
    """The data of array `x`'s blocks held here, on the host, by sub-box: a view of a
    CPU device's buffer, only the sub-box copied from an accelerator's."""

    def __init__(self, x: Any) -> None:
        self.x = x
        self.shards: dict[Box, Any] = {}
        if isinstance(x, jax.Array):
            for s in x.addressable_shards:
                self.shards.setdefault(_box(s.index, x.shape), s)

    def get(self, block: Box, sub: Box) -> np.ndarray:
        if not isinstance(self.x, jax.Array):
            return np.asarray(self.x)[tuple(slice(a, b) for a, b in sub)]
        rel = _within(sub, block)
        shard = self.shards[block]
        if shard.device.platform == "cpu" or sub == block:
            return np.asarray(shard.data)[rel]
        return np.asarray(shard.data[rel])


class _Out:
    """The created files, opened for writing on first use, and the layout in them."""

    def __init__(self, files: list[Path], layout: Layout) -> None:
        self.files, self.layout = files, layout
        self.fds: dict[int, int] = {}

    def write(self, source: str, box: Box, data: np.ndarray) -> None:
        """Writes block `box` of array `source`: into each layer's tensor when the
        array is stacked (each layer's expert's, for an expert array), else into
        its tensor."""
        data = np.ascontiguousarray(data, dtype=little(data.dtype))
        lead = self.layout.lead[source]
        for index in _tensors(box, lead):
            layer, expert = (*index, None, None)[:2]
            at = self.layout.where[(source, layer, expert)]
            if at.file not in self.fds:
                self.fds[at.file] = os.open(
                    self.files[at.file], os.O_WRONLY | os.O_CLOEXEC
                )
            at_index = tuple(k - a for k, (a, _) in zip(index, box, strict=False))
            part = data[at_index] if lead else data
            write_box(self.fds[at.file], at.offset, at.shape, box[lead:], part)

    def close(self, sync: bool) -> None:
        try:
            for fd in self.fds.values():
                if sync:
                    os.fsync(fd)
        finally:
            for fd in self.fds.values():
                os.close(fd)


def _run_bytes(shape: tuple[int, ...], box: Box, itemsize: int) -> int:
    """The length of each contiguous run of the file that `box` of a C-ordered
    tensor of `shape` is written in."""
    k = _split_dim(shape, box)
    if k < 0:
        return math.prod(shape) * itemsize
    return (box[k][1] - box[k][0]) * math.prod(shape[k + 1 :]) * itemsize


def _by_rows(
    shape: tuple[int, ...], lead: int, itemsize: int, parts: list[Box], min_run: int
) -> bool:
    """Whether `parts` are written together by rows: they tile one box, their runs
    in the file are short, and rows of that box make them longer; `lead` as in
    `Layout.lead`."""

    def run(box: Box) -> int:
        return _run_bytes(shape[lead:], box[lead:], itemsize)

    runs = [run(p) for p in parts]
    if len(parts) < 2 or min(runs) >= min_run:
        return False
    bbox = _bounding_box(parts)
    if sum(math.prod(b - a for a, b in p) for p in parts) != math.prod(
        b - a for a, b in bbox
    ):
        return False
    return run(bbox) > min(runs)


def write_pieces(
    files: list[Path],
    layout: Layout,
    arrays: Mapping[str, Any],
    pieces: list[Piece],
    *,
    min_run: int = STRIDED_MIN_RUN,
    chunk_bytes: int = CHUNK_BYTES,
) -> None:
    """Writes this process's pieces into the created files, then syncs them.

    A piece whose runs in the file are `min_run` bytes or longer is written on its
    own, one write per run. Pieces of one array with shorter runs (a hidden
    dimension split), when they tile one box, are gathered into chunks of whole rows
    of that box of about `chunk_bytes` each, so that each write is longer.
    """
    by_source: dict[str, list[Piece]] = {}
    for piece in pieces:
        by_source.setdefault(piece.source, []).append(piece)
    out = _Out(files, layout)
    try:
        for source, own in by_source.items():
            x = arrays[source]
            blocks = _Blocks(x)
            shape, dtype = tuple(x.shape), np.dtype(x.dtype)
            lead = layout.lead[source]
            parts = [p.part for p in own]
            if not _by_rows(shape, lead, dtype.itemsize, parts, min_run):
                for p in own:
                    out.write(source, p.part, blocks.get(p.block, p.part))
                continue
            for chunk in _chunks(
                _bounding_box(parts), lead, dtype.itemsize, chunk_bytes
            ):
                buf = np.empty(tuple(b - a for a, b in chunk), dtype)
                for p in own:
                    sub = _intersection(p.part, chunk)
                    if sub is not None:
                        buf[_within(sub, chunk)] = blocks.get(p.block, sub)
                out.write(source, chunk, buf)
    except BaseException:
        out.close(sync=False)
        raise
    out.close(sync=True)


# --------------------------------------------------------------------- the call


def _digest(path: Path, specs: Mapping[str, Any], options: Any) -> str:
    text = json.dumps(
        [str(path), [[n, list(s), str(d)] for n, (s, d) in specs.items()], options],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _differ(mine: list[Any], theirs: list[Any], q: int) -> str:
    """Says how process `q`'s arrays (`theirs`) differ from these (`mine`)."""
    a = {n: (s, d) for n, s, d in mine}
    b = {n: (s, d) for n, s, d in theirs}
    lines = [f"only process {q} has `{n}`" for n in b if n not in a]
    lines += [f"process {q} lacks `{n}`" for n in a if n not in b]
    lines += [
        f"`{n}` is {a[n][1]}{a[n][0]} here but {b[n][1]}{b[n][0]} in process {q}"
        for n in a
        if n in b and a[n] != b[n]
    ]
    if not lines and list(a) != list(b):
        lines = [f"process {q} gives the same arrays in another order"]
    return "; ".join(lines[:5]) or f"process {q} gives other options"


def _prepare(
    path: PathLike,
    arrays: Any,
    kinds: Any,
    max_shard_size: Any,
    metadata: Any,
    overwrite: bool,
) -> tuple[Target, Layout, dict[str, Any]]:
    """Checks the arguments and plans the output; what this process publishes."""
    path = Path(path)
    folder = not path.name.lower().endswith(".safetensors")
    if path.name.lower().endswith(".npz"):
        raise ValueError(
            f"`{path}`: save_sharded writes safetensors; give a .safetensors file or "
            f"a folder"
        )
    if not folder and max_shard_size is not None:
        raise ValueError(
            f"`max_shard_size` cuts a folder into shards, but `{path}` names one "
            f".safetensors file; give a folder, or leave `max_shard_size` out"
        )
    limit = HF_MAX_SHARD_SIZE if max_shard_size is None else shard_size(max_shard_size)
    reserved = [k for k in (metadata or {}) if k in META_KEYS]
    if reserved:
        raise ValueError(
            f"`metadata` holds {reserved}, which would mark a per-layer file as stacked"
        )
    specs = plan_specs(arrays)
    layout = plan_layout(plan_tensors(specs, kinds), folder, path.name, limit, metadata)
    check_target(path, folder, overwrite)
    options = [folder, limit, metadata, overwrite, kinds]
    spec_list = [[n, list(s), str(d)] for n, (s, d) in specs.items()]
    digest = _digest(path, specs, options)
    published = {
        "digest": digest,
        "specs": spec_list if len(spec_list) <= 20000 else None,
    }
    # A temporary name that every process computes alike without a word from the
    # others, so that any of them can remove it whenever the call fails, and that
    # the same call made again finds (and replaces) if a killed run left it.
    target = Target(path, folder, path.with_name(f".{path.name}.{digest[:16]}.tmp"))
    return target, layout, published


def save_sharded(
    path: PathLike,
    arrays: Mapping[str, Any],
    /,
    *,
    kinds: Mapping[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    timeout: float = 1800.0,
) -> None:
    """Saves global jax arrays as a per-layer checkpoint, each process writing its own bytes.

    The way back from `load_sharded`: after training on many devices (or hosts),
    the model is written in the per-layer layout that Hugging Face publishes and
    everyone loads. Stacked arrays (`model.layers.{i}.mlp.up_proj.weight`, shape
    `(N, ...)`) are written layer by layer (`model.layers.3.mlp.up_proj.weight`),
    the layers of several kinds too (`model.layers.{i:B}...`, whose layers `kinds`
    gives), and expert arrays (`model.layers.{i}.mlp.experts.{e}.up_proj.weight`,
    shape `(N, E, ...)`) layer by layer and expert by expert
    (`model.layers.3.mlp.experts.5.up_proj.weight`); other arrays under their own
    names. The file is, byte for byte, the one
    `stackedtree unstack` writes for a stacked file holding `arrays` in their order.

    Each array's blocks are written from the devices that hold them, with
    positioned writes at offsets every process computes alike: no array is
    gathered, and host memory beyond the arrays stays about one block. With
    `jax.distributed` initialised, every process calls `save_sharded` with the
    same arguments (the output on a file system all of them share) and writes only
    its own devices' blocks (an expert axis split over a mesh axis: each process
    its own experts'); a block that several processes hold is cut into one part
    per process and each part written once. The output is written under
    hidden temporary names beside `path` and renamed once every process is done: it
    appears whole or not at all, and a failure in any process (an exception, a full
    disk, a process killed or that stops answering for `timeout` seconds) is raised
    in every process, which removes the temporary output. One case escapes that:
    when process 0, which runs jax's coordination service, dies, jax's runtime may
    terminate the other processes before they remove it; the hidden temporary
    output (`.NAME.DIGEST.tmp`, never the target) then remains, and the same call
    made again replaces it.

    Args:
        path: a `.safetensors` file; or a folder (created), which receives
            `model-00001-of-0000n.safetensors` shards and a
            `model.safetensors.index.json`, as Hugging Face writes them.
        arrays: names to global `jax.Array`s (any sharding, over one process or
            many) or numpy arrays (the same in every process). A name holding `{i}`
            (or `{i:B}`) is a stacked array whose leading axis is the layers; one
            that also holds `{e}` after it, an expert array `(N, E, ...)` whose
            second axis is the experts (as `load_sharded` loads them with
            `experts`).
        kinds: each kind's label -> its layers, in the order of its layer axis
            (`{"A": [0, 1, 2], "B": [3, 4]}`, as `detect_kinds` gives it), when
            the names carry kind labels; together the layers must be `0..N-1`.
        max_shard_size: a folder's largest shard, in tensor bytes: an int, or a
            string such as `"5GB"` (10**9) or `"2GiB"` (2**30). None: 5 GB, as
            Hugging Face. A single `.safetensors` file takes none.
        metadata: strings written as each file's `__metadata__` (None writes
            none; transformers accepts none, or `{"format": "pt"}`).
        overwrite: replace an existing `path` (a folder as a whole).
        timeout: seconds to wait for another process at any one step, after
            which every process that still runs raises.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False; nothing is written.
        ValueError: before any byte is written: a stacked array whose leading axis
            disagrees with its kind's layers; kind-labelled names without `kinds`,
            or `kinds` that does not fit them; names that unstack to the same
            per-layer name; stacked names of several layer or expert patterns; an
            `{e}` outside the per-layer key (or twice); an expert array of fewer
            than 2 dimensions or no experts, or expert arrays of one kind that
            hold different numbers of experts; a tensor larger
            than `max_shard_size`; a dtype safetensors cannot store; arrays (names,
            shapes, dtypes) or options that differ between processes.
        TypeError: a value is not a jax or numpy array; bad `kinds` or metadata.
        OSError: writing fails (a full disk); no output is left.
        TimeoutError: another process did not answer within `timeout`.
        ConnectionError: jax's coordination service (in process 0) cannot be
            reached: process 0 died.

    Examples:
        >>> import os, tempfile, jax, numpy as np
        >>> from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        >>> from stackedtree.checkpoint import load_flat
        >>> mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
        >>> w = jax.device_put(np.arange(64, dtype=np.float32).reshape(4, 2, 8),
        ...                    NamedSharding(mesh, P(None, None, "fsdp")))
        >>> folder = os.path.join(tempfile.mkdtemp(), "model")
        >>> save_sharded(folder, {"h.{i}.w": w, "emb": np.ones(3, np.float32)})
        >>> sorted(os.listdir(folder))
        ['model-00001-of-00001.safetensors', 'model.safetensors.index.json']
        >>> flat = load_flat(folder)
        >>> list(flat), flat["h.2.w"][1, :3]
        (['h.0.w', 'h.1.w', 'h.2.w', 'h.3.w', 'emb'], array([40., 41., 42.], dtype=float32))
    """
    group = Processes("save_sharded", timeout)
    planned: list[Any] = []

    def check() -> dict[str, Any]:
        planned[:] = _prepare(path, arrays, kinds, max_shard_size, metadata, overwrite)
        planned.append(own_pieces(arrays, group.rank, group.count))
        published: dict[str, Any] = planned[2]
        return published

    try:
        every = group.all_run("check", "check its arguments", check)
    except BaseException:
        if planned:  # process 0 may have created the output before it died
            discard(planned[0])
        raise
    target, layout, published, pieces = planned
    for q, theirs in enumerate(every):
        if theirs["digest"] != published["digest"]:
            detail = (
                _differ(published["specs"], theirs["specs"], q)
                if published["specs"] is not None and theirs["specs"] is not None
                else f"process {q} differs"
            )
            raise ValueError(
                f"`save_sharded` must be called with the same arguments in every "
                f"process, but its arrays or options differ: {detail}."
            )
    error: BaseException | None = None

    def finish() -> None:
        if error is not None:
            raise error
        group.collect("written", "write its part")
        commit(target, overwrite)

    # Every process knows the temporary name, so any survivor of a failure anywhere
    # (process 0 killed while it creates, or once the others wrote) removes it. A
    # failed process waits too, so that the output is removed only once every
    # process is done with it.
    try:
        group.lead_run(
            "create", "create the output files", lambda: create(target, layout)
        )
        try:
            write_pieces(target.files(layout), layout, arrays, pieces)
        except BaseException as e:
            error = e
        if group.rank != 0:
            group.report("written", error)
        group.lead_run("finish", "finish the output", finish)
    except BaseException as e:
        discard(target)
        if error is not None and e is not error:
            raise error from None
        raise
