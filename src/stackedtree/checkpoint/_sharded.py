"""`load_sharded`: a checkpoint straight into sharded jax arrays, stacked on the fly.

Every output array is built by `jax.make_array_from_callback` from the blocks its
sharding gives this process's devices (`addressable_devices_indices_map`), so with
`jax.distributed` each process touches only its own part of the global arrays. A block
of a stacked tensor `(N, ...)` is assembled from the per-layer tensors of its layers:
each layer's part of the block is read with positioned reads (`os.preadv`, through
`_files.read_into`) straight into the block's buffer, so the process's read counters show
exactly the bytes its devices hold.

Two ways to read a block whose rows are split across devices (a weight split along a
non-leading dimension, where each row of the file holds a piece for every device):

- *strided*: each block on its own, one read per contiguous run of the file. No
  memory beyond the block, but one system call per run, so short runs are slow.
- *rows*: when the process's blocks tile one box, the box is read in chunks of whole
  (process-local) rows, each a few large reads, and each chunk's columns are copied
  into the blocks. Each byte is still read once; the chunk costs at most
  `chunk_bytes` (or one row) of memory.

Runs of `strided_min_run` bytes or more are read strided, shorter ones by rows
(`benchmarks/bench_load.py` measures both). A block that several devices replicate is
read once. Pieces of a block (or chunks of rows) are read on `workers` threads. These
tuning values are a `ReadOptions`, which the reader is given.
Buffers are 64-byte aligned, which lets the XLA CPU client adopt them without a copy.
On an accelerator each block's host buffer is freed once it is transferred, and blocks
read by rows are read a block's worth of rows at a time and joined on their devices
(`rows_on_device`), so host memory beyond the arrays stays about one block.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec, Sharding

from .._check import fail
from .._leaf import on_bits
from .._sharding import sharding_problems
from ._experts import detect_experts, parse_experts
from ._files import open_regular, read_into
from ._io import Checkpoint, Paths, TensorInfo, read_checkpoint
from ._layer_pattern import LayerPattern
from ._npz import data_offsets, read_member
from ._plan import StackPlan, plan_by_kind
from ._safetensors import native
from ._stacked import META_PATTERN, stored_plan

Shardings: TypeAlias = (
    Sharding
    | Mapping[str, Sharding]
    | Callable[[str, tuple[int, ...], np.dtype], Sharding]
)
"""Where `load_sharded` puts each output array: one `Sharding` for all of them, a
mapping from each output name to its `Sharding`, or a function of
`(name, shape, dtype)` that returns it."""
Box: TypeAlias = tuple[tuple[int, int], ...]
"""A block of an array: `(start, stop)` per dimension."""

STRIDED_MIN_RUN = 1 << 16
"""Default `ReadOptions.strided_min_run`."""

CHUNK_BYTES = 4 << 20
"""Default `ReadOptions.chunk_bytes`."""

WORKERS = min(8, os.cpu_count() or 1)
"""Default `ReadOptions.workers`."""

ROWS_ON_DEVICE: bool | None = None
"""Default `ReadOptions.rows_on_device`."""


@dataclass(frozen=True)
class ReadOptions:
    """How `load_sharded` reads: its tuning values (`benchmarks/bench_load.py`
    measures them).

    Attributes:
        strided_min_run: contiguous runs at least this long (bytes) are read
            strided, shorter ones by rows.
        chunk_bytes: the scratch memory for reading by rows, shared by the reading
            threads (a chunk holds at least one row); also the smallest piece of a
            block a thread reads.
        workers: how many threads read at once.
        rows_on_device: whether blocks read by rows are assembled on their devices
            from chunks of rows of about one block each (host memory: about one
            block), or whole on the host (host memory: all of the process's blocks
            of the tensor, which the CPU client adopts without a copy). None: on
            the devices when they are not CPUs.
    """

    strided_min_run: int = STRIDED_MIN_RUN
    chunk_bytes: int = CHUNK_BYTES
    workers: int = WORKERS
    rows_on_device: bool | None = ROWS_ON_DEVICE


_ALIGN = 64  # XLA's CPU client adopts host buffers aligned so, without a copy


@dataclass(frozen=True)
class Source:
    """Where one output array's data lives.

    Attributes:
        shape: the output shape; `(N, *per_layer_shape)` when `layered`, or
            `(N, E, *per_expert_shape)` with experts.
        dtype: the output dtype.
        parts: `(name, info)` of the checkpoint tensors: one per layer when
            `layered` (with experts, one per layer and expert, layer by layer),
            else the one tensor holding the whole array.
        layered: the array is stacked on the fly from per-layer tensors.
        stacked: its first dimension is the layer axis (stacked on the fly, or
            stored stacked).
        experts: E, when its second dimension is an expert axis; else 0.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    parts: tuple[tuple[str, TensorInfo], ...]
    layered: bool
    stacked: bool
    experts: int = 0

    @property
    def lead(self) -> int:
        """The leading dimensions assembled from parts: 0 (one tensor), 1
        (layers) or 2 (layers and experts)."""
        return (2 if self.experts else 1) if self.layered else 0

    def part(self, head: Sequence[int]) -> tuple[str, TensorInfo]:
        """The part at index `head` of the leading dimensions."""
        if not self.layered:
            return self.parts[0]
        if self.experts:
            return self.parts[head[0] * self.experts + head[1]]
        return self.parts[head[0]]


# --------------------------------------------------------------------- the plan


def plan_sources(
    ckpt: Checkpoint, pattern: str | None, experts: str | None = None
) -> dict[str, Source]:
    """The output arrays of a checkpoint, by name, in checkpoint order.

    A stacked checkpoint's tensors are loaded as stored, those of a file with layers
    of several kinds under their per-kind names (`model.layers.{i:B}.mlp.gate.weight`).
    With a `pattern`, the layer tensors of a per-layer checkpoint are stacked as
    `stackedtree stack` stacks them (`plan_by_kind`): one array per key of each kind
    of layers, named by its stacked name and placed where its first layer's tensor
    was; experts (detected unless `experts` names them, or is `"none"`) on a second
    axis.
    """
    tensors = ckpt.tensors

    def whole(name: str, stacked: bool = False, num: int = 0) -> Source:
        info = tensors[name]
        return Source(
            info.shape, native(info.dtype), ((name, info),), False, stacked, num
        )

    if META_PATTERN in ckpt.metadata:
        stored = stored_plan(ckpt)
        _same_as_stored(stored, pattern, experts)
        stacked_names = {e.name: e.experts for _, e in stored.entries()}
        return {
            name: whole(name, name in stacked_names, stacked_names.get(name, 0))
            for name in tensors
        }
    if pattern is None:
        if experts is not None:
            raise ValueError(
                f"`experts` {experts!r} needs `pattern`, the layer pattern: experts "
                "are stacked within the layers it stacks."
            )
        return {name: whole(name) for name in tensors}

    lp = LayerPattern.parse(pattern)
    parse_experts(experts)
    if experts is None:
        experts = detect_experts(tensors, str(lp))
    specs = {n: (t.shape, t.dtype) for n, t in tensors.items()}
    plan = plan_by_kind(specs, str(lp), parse_experts(experts))
    stacked = {e.name for _, e in plan.entries()}
    clash = [name for name in plan.rest if name in stacked]
    if clash:
        fail(
            [repr(name) for name in clash],
            "the checkpoint holds both per-layer tensors and stacked tensors of the "
            "same names",
        )
    out: dict[str, Source] = {}
    for item in plan.arranged(tensors):
        if isinstance(item, str):
            out[item] = whole(item)
            continue
        e = item[1]
        first = tensors[e.sources[0]]
        lead = (
            (len(e.sources) // e.experts, e.experts) if e.experts else (len(e.sources),)
        )
        out[e.name] = Source(
            (*lead, *first.shape),
            native(first.dtype),
            tuple((n, tensors[n]) for n in e.sources),
            True,
            True,
            e.experts,
        )
    return out


def _same_as_stored(
    stored: StackPlan, pattern: str | None, experts: str | None
) -> None:
    """A stacked file's layers and experts are stacked already: `pattern` and
    `experts` may only repeat what it records."""
    if pattern is not None and str(LayerPattern.parse(pattern)) != stored.pattern:
        raise ValueError(
            f"the checkpoint is stacked with pattern {stored.pattern!r} (its layer "
            f"tensors are already stacked); `pattern` {pattern!r} differs: leave "
            f"it out."
        )
    if experts is None:
        return
    given = parse_experts(experts)
    if (None if given is None else str(given)) != stored.experts:
        recorded = (
            "no experts" if stored.experts is None else f"experts {stored.experts!r}"
        )
        raise ValueError(
            f"the checkpoint is stacked with {recorded}; `experts` {experts!r} "
            f"differs: leave it out."
        )


def resolve_shardings(
    sources: Mapping[str, Source], shardings: Shardings, stacked: bool
) -> dict[str, Sharding]:
    """One sharding per output array, or one `ValueError` listing every problem."""
    if isinstance(shardings, Sharding):
        given: dict[str, Any] = dict.fromkeys(sources, shardings)
        extra: list[str] = []
    elif isinstance(shardings, Mapping):
        given = {n: shardings[n] for n in sources if n in shardings}
        extra = [n for n in shardings if n not in sources]
    elif callable(shardings):
        given = {n: shardings(n, s.shape, s.dtype) for n, s in sources.items()}
        given = {n: s for n, s in given.items() if s is not None}
        extra = []
    else:
        raise TypeError(
            "`shardings` must be a jax.sharding.Sharding, a mapping of names to "
            "shardings or a callable (name, shape, dtype) -> Sharding, got "
            f"{type(shardings).__name__}."
        )
    wrong = [
        f"`shardings` gives `{n}` {_what(s)}, not a jax.sharding.Sharding"
        + (
            ": wrap it, NamedSharding(mesh, spec)"
            if isinstance(s, PartitionSpec)
            else ""
        )
        for n, s in given.items()
        if not isinstance(s, Sharding)
    ]
    if wrong:
        fail(
            wrong,
            title="`shardings` must give jax.sharding.Sharding values",
            error=TypeError,
        )

    problems = [_extra_line(n, sources, stacked) for n in extra]
    for name, src in sources.items():
        if name not in given:
            problems.append(
                f"checkpoint tensor `{name}` {src.dtype}{list(src.shape)} has no "
                f"sharding in `shardings`"
            )
            continue
        problems += sharding_problems(
            f"`{name}`",
            src.shape,
            given[name],
            layer_axis=src.stacked,
            expert_axis=bool(src.experts),
        )
        if jax.dtypes.canonicalize_dtype(src.dtype) != src.dtype:
            problems.append(
                f"`{name}` has dtype {src.dtype}, which jax holds only with "
                "`jax.config.update('jax_enable_x64', True)`"
            )
    if problems:
        fail(problems, "`shardings` does not fit the checkpoint")
    return given


def _what(x: Any) -> str:
    return repr(x) if isinstance(x, PartitionSpec) else f"a {type(x).__name__}"


def _extra_line(name: Any, sources: Mapping[str, Source], stacked: bool) -> str:
    line = f"`{name}` is in `shardings` but not in the checkpoint"
    if not isinstance(name, str):
        return line
    like = [n for n in sources if n.endswith("." + name) or name.endswith("." + n)]
    if like:
        return line + f" (did you mean `{like[0]}`?)"
    if "{i}" in name and not stacked and not any(s.layered for s in sources.values()):
        return line + " (pass `pattern` to stack the per-layer tensors)"
    return line


# --------------------------------------------------------------------- reading


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class Reader:
    """Open files, npz data offsets, scratch buffers and reading threads, for one load.

    Reads run on up to `options.workers` threads: positioned reads of one file
    descriptor from several threads are safe, and the kernel's copies (and page
    faults) into the buffers, as numpy's, run outside the GIL.
    """

    def __init__(self, options: ReadOptions = ReadOptions()) -> None:
        self.options = options
        self._files: dict[Path, BinaryIO] = {}
        self._npz: dict[Path, dict[str, int]] = {}
        self._member: tuple[str, Path, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        workers = options.workers
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def file(self, path: Path) -> BinaryIO:
        with self._lock:
            if path not in self._files:
                self._files[path] = open_regular(path)
            return self._files[path]

    def offset(self, name: str, info: TensorInfo) -> int | None:
        """Where `info`'s data starts, or None for a compressed npz member."""
        if info.offset >= 0:
            return info.offset
        with self._lock:
            if info.file not in self._npz:
                self._npz[info.file] = data_offsets(info.file)
            return self._npz[info.file].get(name)

    def member(self, name: str, info: TensorInfo) -> np.ndarray:
        """A compressed npz member, whole (the last one read is kept)."""
        with self._lock:
            if self._member is None or self._member[:2] != (name, info.file):
                self._member = None
                with open_regular(info.file) as raw, zipfile.ZipFile(raw) as zf:
                    arr = read_member(info.file, zf, name + ".npy", name)
                arr = arr.astype(native(arr.dtype), copy=False)
                self._member = (name, info.file, arr.view(native(info.dtype)))
            return self._member[2]

    def scratch(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """This thread's scratch buffer, viewed as `shape` and `dtype`."""
        nbytes = math.prod(shape) * dtype.itemsize
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            self._local.buf = None  # free the old one first
            buf = self._local.buf = np.empty(nbytes, np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)

    def run(self, tasks: Sequence[Callable[[], None]]) -> None:
        """Runs `tasks` on the reading threads; the first failure is raised."""
        if self._pool is None or len(tasks) < 2:
            for task in tasks:
                task()
            return
        futures = [self._pool.submit(task) for task in tasks]
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_dim(shape: tuple[int, ...], box: Box) -> int:
    """The last dimension that `box` does not span whole (-1 when it spans all)."""
    k = len(shape) - 1
    while k >= 0 and box[k] == (0, shape[k]):
        k -= 1
    return k


def run_bytes(shape: tuple[int, ...], box: Box, itemsize: int) -> float:
    """The length of the contiguous runs that `box` of a C-ordered array is made of
    (infinite when it is a single run)."""
    k = _split_dim(shape, box)
    if k < 0 or all(b - a == 1 for a, b in box[:k]):
        return math.inf
    return (box[k][1] - box[k][0]) * math.prod(shape[k + 1 :]) * itemsize


def read_box(
    reader: Reader, name: str, info: TensorInfo, box: Box, out: np.ndarray
) -> None:
    """Reads block `box` of checkpoint tensor `info` into `out` (C-contiguous)."""
    if out.size == 0:
        return
    shape = info.shape
    base = reader.offset(name, info)
    if base is None:
        out[...] = reader.member(name, info)[tuple(slice(a, b) for a, b in box)]
        return
    f = reader.file(info.file)
    k = _split_dim(shape, box)
    if k < 0:
        read_into(f, base, out)
        return
    itemsize = out.dtype.itemsize
    inner = math.prod(shape[k + 1 :])
    strides = [math.prod(shape[j + 1 :]) for j in range(k)]
    # The element offset of every run: the outer dimensions' index grid, in C order.
    starts = np.asarray(box[k][0] * inner, np.int64)
    for j in range(k):
        starts = np.add.outer(starts, np.arange(*box[j], dtype=np.int64) * strides[j])
    offsets = base + starts.reshape(-1) * itemsize
    runs = out.reshape(len(offsets), -1)
    for row, offset in zip(runs, offsets.tolist(), strict=True):
        read_into(f, offset, row)


def read_block(reader: Reader, src: Source, box: Box, out: np.ndarray) -> None:
    """Reads block `box` of output array `src` into `out`: of each part (layer, or
    layer and expert) it holds, only its part of the block."""
    lead = src.lead
    starts = [a for a, _ in box[:lead]]
    for head in itertools.product(*(range(a, b) for a, b in box[:lead])):
        name, info = src.part(head)
        at = tuple(h - a for h, a in zip(head, starts, strict=True))
        read_box(reader, name, info, box[lead:], out[at] if at else out)


def _shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def _within(lo: Sequence[int], hi: Sequence[int], box: Box) -> tuple[slice, ...]:
    """The slices of block `[lo, hi)` inside an array holding block `box`."""
    return tuple(slice(a - b[0], z - b[0]) for a, z, b in zip(lo, hi, box, strict=True))


def _slabs(box: Box, itemsize: int, budget: int) -> Iterator[Box]:
    """`box` cut along its first dimension into slabs of at most `budget` bytes
    (at least one index of that dimension each)."""
    if not box:
        yield box
        return
    row = math.prod(_shape(box[1:])) * itemsize
    step = max(1, budget // max(row, 1))
    (a, b), rest = box[0], box[1:]
    for start in range(a, b, step):
        yield ((start, min(start + step, b)), *rest)


def _read_by_rows(
    reader: Reader, src: Source, boxes: Sequence[Box]
) -> dict[Box, np.ndarray]:
    """Reads blocks that tile one box (see `_by_rows`), chunk by chunk of whole rows
    of that box (each chunk into a thread's scratch buffer, then its columns copied
    to the blocks)."""
    bbox = _bounding_box(boxes)
    out = {b: _aligned_empty(_shape(b), src.dtype) for b in boxes}
    itemsize = src.dtype.itemsize
    budget = reader.options.chunk_bytes // reader.options.workers
    chunks: list[Box]
    lead = src.lead
    chunks = [
        (*((h, h + 1) for h in head), *c)
        for head in itertools.product(*(range(a, b) for a, b in bbox[:lead]))
        for c in _slabs(bbox[lead:], itemsize, budget)
    ]

    def one(chunk: Box) -> None:
        buf = reader.scratch(_shape(chunk), src.dtype)
        read_block(reader, src, chunk, buf)
        for b, dest in out.items():
            lo = [max(x[0], c[0]) for x, c in zip(b, chunk, strict=True)]
            hi = [min(x[1], c[1]) for x, c in zip(b, chunk, strict=True)]
            if all(low < h for low, h in zip(lo, hi, strict=True)):
                dest[_within(lo, hi, b)] = buf[_within(lo, hi, chunk)]

    reader.run([functools.partial(one, c) for c in chunks])
    return out


def _read_in_place(reader: Reader, src: Source, box: Box) -> np.ndarray:
    """Reads one block straight into its buffer, slabs of it on the reading threads."""
    out = _aligned_empty(_shape(box), src.dtype)
    if out.size == 0:
        return out
    options = reader.options
    budget = max(options.chunk_bytes, out.nbytes // (4 * options.workers))
    start = box[0][0] if box else 0

    def one(slab: Box) -> None:
        view = out[slab[0][0] - start : slab[0][1] - start] if slab else out
        read_block(reader, src, slab, view)

    reader.run(
        [
            functools.partial(one, slab)
            for slab in _slabs(box, src.dtype.itemsize, budget)
        ]
    )
    return out


def _bounding_box(boxes: Sequence[Box]) -> Box:
    return tuple(
        (min(b[d][0] for b in boxes), max(b[d][1] for b in boxes))
        for d in range(len(boxes[0]))
    )


def read_blocks(
    reader: Reader, src: Source, boxes: Sequence[Box]
) -> Iterator[tuple[Box, np.ndarray]]:
    """Each of `boxes` (distinct blocks of `src`) with its data, read as the module
    docstring says: in place one by one, or together by rows."""
    if _by_rows(src, boxes, reader.options.strided_min_run):
        yield from _read_by_rows(reader, src, boxes).items()
        return
    for box in boxes:
        yield box, _read_in_place(reader, src, box)


def _by_rows(src: Source, boxes: Sequence[Box], strided_min_run: int) -> bool:
    """Whether `boxes` are read together by rows: they tile one box, their runs are
    short (under `strided_min_run`), and reading rows of that box makes them
    longer."""
    lead = src.lead
    per_part = src.shape[lead:]
    itemsize = src.dtype.itemsize
    runs = [run_bytes(per_part, b[lead:], itemsize) for b in boxes]
    if len(boxes) < 2 or min(runs) >= strided_min_run:
        return False
    bbox = _bounding_box(boxes)
    if sum(math.prod(_shape(b)) for b in boxes) != math.prod(_shape(bbox)):
        return False
    return run_bytes(per_part, bbox[lead:], itemsize) > min(runs)


def _place_by_row_chunks(
    reader: Reader, src: Source, devices: Mapping[Box, Sequence[Any]]
) -> dict[Box, list[jax.Array]]:
    """Blocks that tile one box, read by rows a block's worth of rows at a time: each
    chunk's pieces are put on their devices, and each block joined there."""
    boxes = list(devices)
    a, b = _bounding_box(boxes)[0]
    step = -(-(b - a) // len(boxes))  # rows of about one block per chunk
    pieces: dict[Box, list[list[jax.Array]]] = {
        box: [[] for _ in devices[box]] for box in boxes
    }
    for lo in range(a, b, step):
        hi = min(lo + step, b)
        subs = {
            box: ((max(lo, box[0][0]), min(hi, box[0][1])), *box[1:])
            for box in boxes
            if max(lo, box[0][0]) < min(hi, box[0][1])
        }
        host = _read_by_rows(reader, src, list(subs.values()))
        put = [
            (box, i, jax.device_put(host[sub], d))
            for box, sub in subs.items()
            for i, d in enumerate(devices[box])
        ]
        jax.block_until_ready([x for _, _, x in put])  # the host chunk can go
        for box, i, x in put:
            pieces[box][i].append(x)
        del host, put
    return {
        box: [x[0] if len(x) == 1 else on_bits(jnp.concatenate, x) for x in per_device]
        for box, per_device in pieces.items()
    }


def _box(index: Any, shape: tuple[int, ...]) -> Box:
    return tuple(
        (s.indices(d)[0], s.indices(d)[1]) for s, d in zip(index, shape, strict=True)
    )


def _place(
    reader: Reader, src: Source, devices: Mapping[Box, Sequence[Any]]
) -> dict[Box, list[jax.Array]]:
    """Each block read and put on its devices; each host buffer dropped once put (on
    an accelerator, the host copy goes once transferred)."""
    boxes = list(devices)
    on_device = reader.options.rows_on_device
    if on_device is None:
        on_device = any(d.platform != "cpu" for ds in devices.values() for d in ds)
    rows = _by_rows(src, boxes, reader.options.strided_min_run)
    if on_device and math.prod(src.shape) > 0 and rows:
        return _place_by_row_chunks(reader, src, devices)
    placed = {}
    for box, host in read_blocks(reader, src, boxes):
        placed[box] = [jax.device_put(host, d) for d in devices[box]]
        if on_device:  # the transfer done, the host buffer goes before the next read
            jax.block_until_ready(placed[box])
    return placed


def load_array(reader: Reader, src: Source, sharding: Sharding) -> jax.Array:
    """One output array, its blocks read and placed on this process's devices."""
    if sharding.is_fully_replicated:
        if not sharding.addressable_devices:
            # No device of this process holds it: nothing to read (the callback's
            # value is asked for once, and dropped).
            return jax.make_array_from_callback(
                src.shape, sharding, lambda _: np.zeros((), src.dtype), dtype=src.dtype
            )
        host = _read_in_place(reader, src, tuple((0, d) for d in src.shape))
        # One host buffer for all devices: JAX transfers it to each.
        return jax.make_array_from_callback(
            src.shape, sharding, lambda _: host, dtype=src.dtype
        )
    devices: dict[Box, list[Any]] = {}
    for device, index in sharding.addressable_devices_indices_map(src.shape).items():
        devices.setdefault(_box(index, src.shape), []).append(device)
    placed = _place(reader, src, devices)
    # make_array_from_callback asks for the blocks in the order of
    # addressable_devices_indices_map, the order `placed` lists each block's devices.
    return jax.make_array_from_callback(
        src.shape,
        sharding,
        lambda index: placed[_box(index, src.shape)].pop(0),
        dtype=src.dtype,
    )


def load_sharded(
    paths: Paths,
    shardings: Shardings,
    /,
    *,
    pattern: str | None = None,
    experts: str | None = None,
) -> dict[str, jax.Array]:
    """Loads a checkpoint straight into sharded jax arrays, stacking layers on the fly.

    Each array is created with `jax.make_array_from_callback` from the blocks that
    its sharding gives this process's devices, and each block is read from disk with
    positioned reads (no mmap) of exactly its byte ranges: a device holding layers
    4-7 of `mlp.up_proj` reads those four layers' ranges of the per-layer tensors,
    and a block that several devices replicate is read once. When a weight's
    columns are split too (each row of the file then holds pieces for several
    devices), the process still reads each byte once: long runs in place, short
    ones as whole rows whose columns are handed to each device. Host memory beyond
    the arrays themselves stays about one block: blocks are read into the buffers
    that become the device arrays (on CPU without a copy; on an accelerator each is
    freed once transferred), and rows read whole pass through a few MiB (on an
    accelerator, a block's worth of rows at a time, joined on the devices).

    With `jax.distributed.initialize(...)` done, every process calls `load_sharded`
    with the same arguments and reads only what its own devices hold; the results
    are the same global arrays in every process.

    Args:
        paths: a checkpoint, as in `load_flat`: a `.safetensors` file, several
            shards, a `*.safetensors.index.json`, or an `.npz` archive (read with
            positioned reads when stored uncompressed, as `save_flat` writes it).
            Per-layer or stacked (as `save_stacked` or `stackedtree stack` write it).
        shardings: where each array goes: one `jax.sharding.Sharding` for all, a
            mapping name -> `Sharding`, or a callable `(name, shape, dtype) ->
            Sharding`. Layer tensors are named by their stacked name
            (`model.layers.{i}.mlp.up_proj.weight`) with their stacked shape
            `(N, ...)`; `layer_shardings` builds their shardings from one layer's
            specs.
        pattern: the layer pattern of a per-layer checkpoint, e.g.
            `"model.layers.{i}."`: its layer tensors come back stacked, one array
            `(N, ...)` per per-layer key, exactly as `stackedtree stack` stacks
            them. Layers of several kinds (holding different keys, as dense and
            MoE layers) are stacked each kind on its own, under the kind's names
            (`model.layers.{i:B}.mlp.gate.weight`, `(layers of B, ...)`), as for
            the stacked file. Without a pattern, a per-layer checkpoint's tensors
            come back under their own names. A stacked checkpoint needs none (its
            layer tensors come back stacked, as stored).
        experts: with `pattern`, the expert pattern (`"mlp.experts.{e}."`,
            relative to the per-layer key): each expert tensor's experts come back
            on a second axis, `(N_kind, E, ...)`, under its key with `{e}` kept
            (`model.layers.{i:B}.mlp.experts.{e}.up_proj.weight`), as `stackedtree
            stack` writes them. None detects it as `stackedtree stack` does
            (`detect_experts`); `"none"` keeps experts apart, each stacked over
            layers only. A sharding that splits the expert axis over a mesh axis
            (expert parallelism) makes each process read only its own experts'
            bytes. For a stacked file, None or what the file records.

    Returns:
        The arrays by name, in checkpoint order (a stacked array where its
        kind's first layer's tensor was), each a global `jax.Array` with its
        sharding: the names, order and values of loading the file that
        `stackedtree stack` writes.

    Raises:
        OSError: a file is missing or unreadable.
        ValueError: as in `load_flat` (unknown format, a truncated or corrupt
            file, a tensor name in two files) and `convert_stack` (the pattern
            matches nothing, missing layers, a tensor whose shape or dtype differs
            within its kind of layers, a layer lacking an expert or an expert
            tensor, experts differing in shape or dtype); `experts` without
            `pattern`, or other than a stacked file records; and, in one
            error listing them all: a name in `shardings` that the checkpoint
            lacks, a checkpoint tensor with no sharding, a dimension that the
            mesh axes of its sharding do not divide, a 64-bit tensor while
            `jax_enable_x64` is off.
        TypeError: `shardings` is not a sharding, mapping or callable, or gives
            something other than a `Sharding`.

    Examples:
        >>> import os, tempfile, jax, numpy as np
        >>> from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        >>> from stackedtree.checkpoint import save_flat
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> save_flat(path, {f"h.{i}.w": np.full((8, 4), i, np.float32)
        ...                  for i in range(4)})
        >>> mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
        >>> params = load_sharded(path, NamedSharding(mesh, P(None, "fsdp")),
        ...                       pattern="h.{i}.")
        >>> w = params["h.{i}.w"]
        >>> w.shape, w.addressable_shards[0].data.shape, float(w[3, 0, 0])
        ((4, 8, 4), (4, 1, 4), 3.0)
    """
    return load_with(paths, shardings, ReadOptions(), pattern=pattern, experts=experts)


def load_with(
    paths: Paths,
    shardings: Shardings,
    options: ReadOptions,
    *,
    pattern: str | None = None,
    experts: str | None = None,
) -> dict[str, jax.Array]:
    """`load_sharded`, reading with `options`."""
    ckpt = read_checkpoint(paths)
    sources = plan_sources(ckpt, pattern, experts)
    placing = resolve_shardings(sources, shardings, META_PATTERN in ckpt.metadata)
    with Reader(options) as reader:
        return {
            name: load_array(reader, src, placing[name])
            for name, src in sources.items()
        }
