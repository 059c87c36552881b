"""Reading and writing flat checkpoints: safetensors (files, shards, index) and npz.

The safetensors format is simple enough to read and write here: an 8-byte little-endian
header length, a JSON header (`{name: {"dtype", "shape", "data_offsets"}, "__metadata__":
{}}`) and the tensors' raw little-endian bytes. Doing it ourselves, rather than through
the `safetensors` package, gives what conversion and sharded loading need and that
package's API does not: each tensor's byte range in the file, so that
`_convert.py` copies ranges without ever holding a tensor, and reads land in
preallocated buffers with positioned reads. Files stay compatible both ways with the
`safetensors` package (tested).

Every file read here may be hostile: the header reader accepts exactly what the format
allows and refuses the rest with a `ValueError` naming the file, within bounded time
and memory (`_limits.py`); files are opened by `_files.py` (regular files only) and
npz archives read by `_npz.py`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from ._files import (
    PathLike,
    Paths,
    as_paths,
    atomic_write,
    checkpoint_kind,
    open_regular,
    output_kind,
    pread,
)
from ._limits import (
    MAX_DIMS,
    MAX_HEADER,
    MAX_TENSORS,
    brief,
    load_json,
    no_gc,
    quote,
    strings,
    text_problem,
)
from ._npz import load_npz, npz_header, save_npz

__all__ = [
    "Checkpoint",
    "PathLike",
    "Paths",
    "TensorInfo",
    "atomic_write",
    "dtype_code",
    "load_flat",
    "read_checkpoint",
    "read_into",
    "read_safetensors_header",
    "safetensors_header",
    "save_flat",
]

_CODES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _CODES["F8_E8M0"] = np.dtype(ml_dtypes.float8_e8m0fnu)
_DTYPE_TO_CODE = {dtype: code for code, dtype in _CODES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives, read from the file's header.

    Attributes:
        file: the file holding it.
        dtype: its numpy dtype.
        shape: its shape.
        offset: the absolute byte offset of its data in a safetensors file; -1 in an
            npz archive.
        nbytes: the size of its data.
    """

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Checkpoint:
    """The headers of a checkpoint made of one or several files.

    Attributes:
        files: the files, index files expanded to their shards.
        tensors: every tensor by name, in file order then data order.
        metadata: the files' string metadata merged (the first file wins a clash).
    """

    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def streamable(self) -> bool:
        """Whether every tensor sits at a byte offset of a safetensors file."""
        return all(t.offset >= 0 for t in self.tensors.values())


def dtype_code(dtype: np.dtype, name: str = "") -> str:
    """The safetensors dtype code of a numpy dtype (`"BF16"`, `"F32"`, ...).

    Raises:
        ValueError: safetensors has no such dtype.
    """
    dtype = np.dtype(dtype)
    native = dtype.newbyteorder("=") if dtype.byteorder in "<>" else dtype
    code = _DTYPE_TO_CODE.get(native)
    if code is None:
        raise ValueError(
            f"tensor `{name}` has dtype {dtype}, which safetensors cannot store "
            f"(it stores {', '.join(str(d) for d in _CODES.values())}); save it "
            f"as .npz instead"
        )
    return code


def _little(dtype: np.dtype) -> np.dtype:
    return (
        dtype.newbyteorder("<")
        if dtype.kind in "biufc" and dtype.itemsize > 1
        else dtype
    )


# --------------------------------------------------------------------- safetensors


def _index_error(path: Path, why: str) -> ValueError:
    return ValueError(f"`{path}` is not a valid safetensors index: {why}")


def _shard(index: Path, shard: str) -> Path:
    """The file an index names, which must lie inside the index's folder.

    The test is on the name, not on the resolved file: symlinks inside the folder
    (the Hugging Face cache links every file into a blobs folder) are followed.
    """
    parts = PurePosixPath(shard).parts
    if not parts or "\0" in shard or shard.startswith("/") or ".." in parts:
        raise _index_error(
            index,
            f"it names shard {brief(shard)}, outside the index's folder; an index "
            f"may only name files beside it",
        )
    return index.parent / shard


def _read_index(path: Path) -> dict[str, Path]:
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_HEADER:
            raise _index_error(
                path, f"it holds {size} bytes, more than the {MAX_HEADER} allowed"
            )
        raw = pread(f, size, 0)
    try:
        index = load_json(raw)
    except ValueError as e:
        raise _index_error(path, f"unreadable JSON ({e})") from None
    if not isinstance(index, tuple):
        raise _index_error(path, f"expected a JSON object, got {brief(index)}")
    maps = [v for k, v in index if k == "weight_map"]
    if len(maps) != 1:
        raise _index_error(
            path,
            "it has no `weight_map`" if not maps else "it repeats `weight_map`",
        )
    weight_map = strings(maps[0], "`weight_map`")
    if isinstance(weight_map, str):
        raise _index_error(path, weight_map + " (tensor names to shard files)")
    return {name: _shard(path, shard) for name, shard in weight_map.items()}


def _bad(path: Path, why: str) -> ValueError:
    return ValueError(f"`{path}` is not a valid safetensors file: {why}")


_UNSET: Any = object()


def _malformed(path: Path, name: str, why: str) -> ValueError:
    return _bad(path, f"tensor {quote(name)} has a malformed entry: {why}")


def _fields(path: Path, name: str, entry: Any) -> tuple[Any, Any, Any]:
    """`(dtype, shape, data_offsets)` of a header entry in any order, or a refusal."""
    if type(entry) is not tuple:
        raise _malformed(path, name, f"expected a JSON object, got {brief(entry)}")
    found = {"dtype": _UNSET, "shape": _UNSET, "data_offsets": _UNSET}
    for key, value in entry:
        if key in found:  # other keys are allowed, and ignored
            if found[key] is not _UNSET:
                raise _malformed(path, name, f"it repeats `{key}`")
            found[key] = value
    missing = [f"`{key}`" for key, value in found.items() if value is _UNSET]
    if missing:
        raise _malformed(path, name, f"it lacks {' and '.join(missing)}")
    return found["dtype"], found["shape"], found["data_offsets"]


def _entry_error(
    path: Path, name: str, code: Any, shape: Any, offsets: Any
) -> ValueError:
    """Why the entry `(code, shape, offsets)` is refused."""
    if type(code) is not str or code not in _CODES:
        return _bad(
            path,
            f"tensor {quote(name)} has dtype {brief(code)}, which stackedtree does "
            f"not read (it reads {', '.join(_CODES)})",
        )
    if (
        type(shape) is not list
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        return _malformed(
            path,
            name,
            f"`shape` must be a list of at most {MAX_DIMS} non-negative integers, "
            f"got {brief(shape)}",
        )
    return _malformed(
        path,
        name,
        f"`data_offsets` must be two integers 0 <= begin <= end, got {brief(offsets)}",
    )


def read_safetensors_header(
    path: PathLike,
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Reads and checks a safetensors file's header, without its tensor data.

    Accepts exactly what the format allows: a UTF-8 JSON object of at most 100 MB,
    unique names, known dtypes, sizes computed in unbounded integers that match
    each tensor's `data_offsets`, and offsets that tile the data from its first byte
    to the end of the file.

    Args:
        path: a `.safetensors` file.

    Returns:
        `(tensors, metadata)`: the tensors by name in data order, and the
        `__metadata__` strings.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not a regular file, is truncated, or its header is
            malformed.
    """
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = pread(f, 8, 0)
        if len(head) < 8:
            raise _bad(
                path, f"it holds {size} bytes, fewer than the 8-byte header size"
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise _bad(
                path,
                f"its header size {n} is over the format's limit of {MAX_HEADER} "
                f"bytes (corrupt or not safetensors)",
            )
        if n > size - 8:
            raise _bad(
                path,
                f"header size {n} exceeds the file's {size - 8} remaining bytes "
                f"(truncated or not safetensors)",
            )
        raw = pread(f, n, 8)
    if len(raw) < n:
        raise _bad(path, "it shrank while its header was being read")
    with no_gc():
        return _parse_header(path, raw, 8 + n, size)


def _parse_header(
    path: Path, raw: bytes, start: int, size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        header = load_json(raw)
    except ValueError as e:
        raise _bad(path, f"unreadable JSON header ({e})") from None
    if not isinstance(header, tuple):
        raise _bad(path, "unreadable JSON header (the header is not a JSON object)")
    if len(header) > MAX_TENSORS + 1:
        raise _bad(
            path,
            f"its header declares {len(header)} tensors, more than the "
            f"{MAX_TENSORS} a file may hold here",
        )
    # Only a `\u` escape can make a lone surrogate, which is not valid UTF-8.
    check_text = b"\\u" in raw
    del raw
    metadata: dict[str, str] = {}
    seen: set[str] = set()
    entries: list[tuple[int, int, str, np.dtype, tuple[int, ...]]] = []
    for name, entry in header:
        if name in seen:
            raise _bad(path, f"the header names {quote(name)} twice")
        seen.add(name)
        if check_text and (problem := text_problem(name)):
            raise _bad(path, f"the tensor name {quote(name)} holds {problem}")
        if name == "__metadata__":
            if entry is not None:
                found = strings(entry, "`__metadata__`", check_text=check_text)
                if isinstance(found, str):
                    raise _bad(path, found)
                metadata = found
            continue
        # The checks are inline, as this loop may run a million times.
        try:
            # The parser gives a JSON object as a tuple of pairs; a JSON array of
            # pairs is a list, which the format does not allow.
            if type(entry) is not tuple:
                raise TypeError
            (k1, code), (k2, shape), (k3, offsets) = entry
            if k1 != "dtype" or k2 != "shape" or k3 != "data_offsets":
                raise ValueError
        except (TypeError, ValueError):
            code, shape, offsets = _fields(path, name, entry)
        dtype = _CODES.get(code) if type(code) is str else None
        ok = (
            dtype is not None
            and type(shape) is list
            and len(shape) <= MAX_DIMS
            and type(offsets) is list
            and len(offsets) == 2
        )
        if ok:
            for d in shape:
                if type(d) is not int or d < 0:
                    ok = False
            begin, end = offsets
            ok = ok and type(begin) is int and type(end) is int and 0 <= begin <= end
        if not ok or dtype is None:
            raise _entry_error(path, name, code, shape, offsets)
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise _bad(
                path,
                f"tensor {quote(name)} ({dtype}{list(shape)}) needs {nbytes} bytes but "
                f"its data_offsets {[begin, end]} span {end - begin}",
            )
        if nbytes == 0 and math.prod(d for d in shape if d) * dtype.itemsize >> 63:
            raise _bad(
                path,
                f"tensor {quote(name)} has shape {list(shape)}, more elements than "
                f"numpy can index",
            )
        entries.append((begin, end, name, dtype, tuple(shape)))
    del header
    entries.sort()  # by offsets: names are unique, so no further
    tensors: dict[str, TensorInfo] = {}
    at = 0
    for begin, end, name, dtype, shape in entries:
        if begin < at:
            raise _bad(path, f"tensor {quote(name)} overlaps the tensor before it")
        if begin > at:
            raise _bad(
                path,
                f"the {begin - at} bytes before tensor {quote(name)} (data_offsets "
                f"{[begin, end]}) belong to no tensor",
            )
        at = end
        tensors[name] = TensorInfo(path, dtype, shape, start + begin, end - begin)
    if at != size - start:
        raise _bad(
            path,
            f"the header describes {at} bytes of tensor data but the file holds "
            f"{size - start} ({'truncated' if size - start < at else 'trailing bytes'})",
        )
    return tensors, metadata


# --------------------------------------------------------------------------- reading


def read_checkpoint(paths: Paths) -> Checkpoint:
    """Reads the headers of a checkpoint: names, dtypes, shapes, offsets, metadata.

    Args:
        paths: as in `load_flat`.

    Returns:
        The checkpoint's headers; no tensor data is read.

    Raises:
        OSError: a file cannot be read.
        ValueError: a file is malformed, not a regular file or of unknown format; a
            model folder holds no checkpoint or several; an index names a file
            outside its folder; a tensor name is in two files; an index names a
            tensor that its shard lacks.
    """
    files: list[Path] = []
    expected: dict[str, Path] = {}
    for p in as_paths(paths):
        if checkpoint_kind(p) == "index":
            weight_map = _read_index(p)
            expected.update(weight_map)
            files.extend(dict.fromkeys(weight_map.values()))
        else:
            files.append(p)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for file in files:
        kind = checkpoint_kind(file)
        if kind == "index":
            raise ValueError(f"`{file}`: an index cannot name another index")
        if kind == "safetensors":
            found, meta = read_safetensors_header(file)
        else:
            arrays, meta = npz_header(file)
            found = {
                name: TensorInfo(file, a.dtype, a.shape, -1, a.nbytes)
                for name, a in arrays.items()
            }
        for name, info in found.items():
            if name in tensors:
                raise ValueError(
                    f"tensor {quote(name)} is in both `{tensors[name].file}` and `{file}`"
                )
            tensors[name] = info
        for key, value in meta.items():
            metadata.setdefault(key, value)
    for name, shard in expected.items():
        if name not in tensors or tensors[name].file != shard:
            raise ValueError(
                f"the index lists tensor {quote(name)} in `{shard}`, which lacks it"
            )
    return Checkpoint(tuple(files), tensors, metadata)


def read_into(f: BinaryIO, offset: int, out: np.ndarray) -> None:
    """Reads `out.nbytes` bytes at `offset` of the raw file `f` into `out`."""
    view = out.reshape(-1).view(np.uint8).data
    done = 0
    while done < len(view):
        got = os.preadv(f.fileno(), [view[done:]], offset + done)
        if got == 0:
            raise ValueError(f"`{f.name}` is truncated")
        done += got


def load_flat(path_or_paths: Paths, /) -> dict[str, np.ndarray]:
    """Loads a flat checkpoint into numpy arrays.

    Never unpickles. bfloat16, float8 and every other dtype come back bit-exactly.

    Args:
        path_or_paths: a `.safetensors` file, several (shards of one checkpoint), a
            `*.safetensors.index.json` whose `weight_map` names the shards relative
            to its folder, an `.npz` archive, or a model folder (its
            `*.safetensors.index.json`, else its one `.safetensors` file); or a
            list mixing these.

    Returns:
        The tensors by name, in file order.

    Raises:
        OSError: a file is missing or unreadable.
        ValueError: unknown format; a truncated, corrupt or hostile file (see the
            guarantees in the checkpoint guide); an npz array of Python objects; a
            tensor name in two files.

    Examples:
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> save_flat(path, {"w": np.arange(3, dtype=np.float32)})
        >>> load_flat(path)
        {'w': array([0., 1., 2.], dtype=float32)}
    """
    ckpt = read_checkpoint(path_or_paths)
    out: dict[str, np.ndarray] = {}
    by_file: dict[Path, list[str]] = {}
    for name, info in ckpt.tensors.items():
        by_file.setdefault(info.file, []).append(name)
    for file, names in by_file.items():
        if ckpt.tensors[names[0]].offset >= 0:
            with open_regular(file) as f:
                for name in names:
                    info = ckpt.tensors[name]
                    arr = np.empty(info.shape, _little(info.dtype))
                    read_into(f, info.offset, arr)
                    out[name] = arr
        else:
            specs = {n: (ckpt.tensors[n].dtype, ckpt.tensors[n].shape) for n in names}
            out.update(load_npz(file, specs))
    return {name: out[name] for name in ckpt.tensors}


# --------------------------------------------------------------------------- writing


def safetensors_header(
    entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """The header bytes of a safetensors file whose tensors follow in `entries` order.

    Args:
        entries: `(name, dtype, shape)` of each tensor, in data order.
        metadata: strings for `__metadata__`.

    Returns:
        The 8-byte length and the JSON header, padded so the data starts 8-aligned.

    Raises:
        ValueError: a dtype safetensors cannot store; a reserved or repeated name;
            more tensors or a larger header than a file may hold.
        TypeError: metadata that is not strings to strings.
    """
    if len(entries) > MAX_TENSORS:
        raise ValueError(
            f"{len(entries)} tensors are more than the {MAX_TENSORS} a file may "
            f"hold here"
        )
    header: dict[str, Any] = {}
    if metadata:
        if not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise TypeError(f"`metadata` must map str to str, got {dict(metadata)!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if name == "__metadata__" or name in header:
            raise ValueError(f"tensor name {quote(name)} is reserved or repeated")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": dtype_code(dtype, name),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise ValueError(
            f"a name or metadata string holds {text_problem(e.object)}"
        ) from None
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER:
        raise ValueError(
            f"the header would take {len(raw)} bytes, over the format's limit of "
            f"{MAX_HEADER}"
        )
    return struct.pack("<Q", len(raw)) + raw


def _check_array(name: str, x: Any) -> None:
    if not (
        isinstance(x, np.ndarray | np.generic)
        or (hasattr(x, "__array__") and hasattr(x, "shape") and hasattr(x, "dtype"))
    ):
        raise TypeError(
            f"tensor `{name}` must be a numpy or jax array, got {type(x).__name__}"
        )


def _as_numpy(name: str, x: Any) -> np.ndarray:
    _check_array(name, x)
    return np.asarray(x)


def _write_bytes(f: BinaryIO, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr.astype(_little(arr.dtype), copy=False))
    f.write(arr.reshape(-1).view(np.uint8).data)


def save_flat(
    path: PathLike,
    flat: Mapping[str, Any],
    /,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Saves a flat checkpoint atomically, as safetensors or npz by `path`'s suffix.

    The file is written beside `path` under a temporary name and renamed when
    complete; on any failure the temporary file is removed, so no partial file is
    ever left under `path`.

    Args:
        path: a `.safetensors` or `.npz` path.
        flat: maps tensor names to numpy or jax arrays (jax arrays are copied to host
            one at a time).
        overwrite: replace an existing file.
        metadata: strings to record (safetensors `__metadata__`; an extra entry in
            npz); read back by `stackedtree inspect`.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        OSError: the folder is missing or not writable, or the disk is full.
        ValueError: unknown suffix; a dtype the format cannot store (safetensors has
            no float64 complex, npz no Python objects); a reserved name.
        TypeError: a value is not an array; metadata is not strings.
    """
    path = Path(path)
    kind = output_kind(path)
    if not isinstance(flat, Mapping):
        raise TypeError(f"`flat` must be a mapping of names to arrays, got {flat!r}")
    for name in flat:
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
    if kind == "safetensors":
        for name, x in flat.items():
            _check_array(name, x)
        specs = [(name, np.dtype(x.dtype), tuple(x.shape)) for name, x in flat.items()]
        header = safetensors_header(specs, metadata)
        with atomic_write(path, overwrite=overwrite) as f:
            f.write(header)
            for name, x in flat.items():
                _write_bytes(f, _as_numpy(name, x))
    else:
        arrays = {name: _as_numpy(name, x) for name, x in flat.items()}
        with atomic_write(path, overwrite=overwrite) as f:
            save_npz(f, arrays, metadata)
