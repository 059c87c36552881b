"""The safetensors format: dtype codes, byte order, and a file's header read and written.

A safetensors file is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {}}`) and the tensors' raw
little-endian bytes. Reading the header ourselves, rather than through the
`safetensors` package, gives what conversion and sharded loading need and that
package's API does not: each tensor's byte range in the file, so that `_convert.py`
copies ranges without ever holding a tensor, and reads land in preallocated buffers
with positioned reads. Files stay compatible both ways with the `safetensors` package
(tested).

Every file read here may be hostile: the header reader accepts exactly what the format
allows and refuses the rest with a `ValueError` naming the file, within bounded time
and memory (`_limits.py`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ._files import PathLike, open_regular, pread
from ._limits import (
    MAX_DIMS,
    MAX_HEADER,
    MAX_TENSORS,
    load_json,
    no_gc,
    strings,
    text_problem,
)
from ._text import brief, quote

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


def dtype_code(dtype: np.dtype, name: str = "") -> str:
    """The safetensors dtype code of a numpy dtype (`"BF16"`, `"F32"`, ...).

    Raises:
        ValueError: safetensors has no such dtype.
    """
    dtype = np.dtype(dtype)
    code = _DTYPE_TO_CODE.get(native(dtype))
    if code is None:
        raise ValueError(
            f"tensor `{name}` has dtype {dtype}, which safetensors cannot store "
            f"(it stores {', '.join(str(d) for d in _CODES.values())}); save it "
            f"as .npz instead"
        )
    return code


def little(dtype: np.dtype) -> np.dtype:
    """`dtype` in the file's byte order, little-endian (which safetensors and npz
    as written here use)."""
    dtype = np.dtype(dtype)
    return (
        dtype.newbyteorder("<")
        if dtype.kind in "biufc" and dtype.itemsize > 1
        else dtype
    )


def native(dtype: np.dtype) -> np.dtype:
    """`dtype` in this machine's byte order: what jax holds, and what dtype codes
    are looked up by."""
    dtype = np.dtype(dtype)
    return dtype.newbyteorder("=") if dtype.byteorder in "<>" else dtype


# --------------------------------------------------------------------------- reading


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
    metadata, entries = _entries(path, header, check_text)
    del header
    return _tile(path, entries, start, size), metadata


_Entry = tuple[int, int, str, np.dtype, tuple[int, ...]]
"""`(begin, end, name, dtype, shape)` of a header entry."""


def _entries(
    path: Path, header: tuple[tuple[str, Any], ...], check_text: bool
) -> tuple[dict[str, str], list[_Entry]]:
    """The header's metadata, and its entries checked one by one."""
    metadata: dict[str, str] = {}
    seen: set[str] = set()
    entries: list[_Entry] = []
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
    return metadata, entries


def _tile(
    path: Path, entries: list[_Entry], start: int, size: int
) -> dict[str, TensorInfo]:
    """The tensors by name in data order, once their data is seen to tile the file
    from `start` to its end."""
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
    return tensors


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
