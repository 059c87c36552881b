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

import functools
import json
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

# Each dtype code and numpy's name of its dtype (`str(dtype)`).
_CODES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
_ITEMSIZE = {
    code: 1 if name == "bool" else int(re.search(r"\d+", name)[0]) // 8  # type: ignore[index]
    for code, name in _CODES.items()
}
_CODE_OF = {name: code for code, name in _CODES.items()}
# The dtypes that only ml_dtypes defines.
_EXTENDED = frozenset(("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"))


@functools.cache
def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype `np.dtype(name)` names (`"float32"`, `">f4"`, `"bfloat16"`).

    ml_dtypes is imported only for its own dtypes: importing it takes most of a
    second, and converting a checkpoint, which copies bytes, never needs it.

    Raises:
        ValueError: the installed ml_dtypes lacks that dtype.
    """
    if name not in _EXTENDED:
        return np.dtype(name)
    import ml_dtypes

    found = getattr(ml_dtypes, name, None)
    if found is None:
        raise ValueError(
            f"dtype {name} needs a newer ml_dtypes than the one installed "
            f"({ml_dtypes.__version__})"
        )
    return np.dtype(found)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives, read from the file's header.

    Attributes:
        file: the file holding it.
        dtype_name: its dtype as `str(dtype)` prints it (`"bfloat16"`, `"float32"`);
            the `dtype` property gives the numpy dtype.
        shape: its shape.
        offset: the absolute byte offset of its data in a safetensors file; -1 in an
            npz archive.
        nbytes: the size of its data.
    """

    file: Path
    dtype_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def dtype(self) -> np.dtype:
        """Its numpy dtype."""
        return numpy_dtype(self.dtype_name)


def dtype_code(dtype: np.dtype, name: str = "") -> str:
    """The safetensors dtype code of a numpy dtype (`"BF16"`, `"F32"`, ...).

    Raises:
        ValueError: safetensors has no such dtype.
    """
    dtype = native(np.dtype(dtype))
    code = _CODE_OF.get(dtype.name)
    # A name alone could be any dtype's: it must also be the dtype (free, as whoever
    # holds an ml_dtypes dtype has imported ml_dtypes).
    if code is None or numpy_dtype(dtype.name) != dtype:
        raise ValueError(
            f"tensor `{name}` has dtype {dtype}, which safetensors cannot store "
            f"(it stores {', '.join(_CODES.values())}); save it as .npz instead"
        )
    return code


def _code_and_size(dtype: np.dtype | str, name: str) -> tuple[str, int]:
    """The dtype code and item size of a dtype, or of a dtype's name (which, for a
    safetensors dtype, needs no numpy dtype and so no ml_dtypes)."""
    if isinstance(dtype, str):
        code = _CODE_OF.get(dtype)
        if code is not None:
            return code, _ITEMSIZE[code]
        dtype = numpy_dtype(dtype)
    code = dtype_code(dtype, name)
    return code, _ITEMSIZE[code]


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


_Entry = tuple[int, int, str, str, tuple[int, ...]]
"""`(begin, end, name, dtype name, shape)` of a header entry."""


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
        itemsize = _ITEMSIZE.get(code) if type(code) is str else None
        ok = (
            itemsize is not None
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
        if not ok or itemsize is None:
            raise _entry_error(path, name, code, shape, offsets)
        dtype = _CODES[code]
        nbytes = math.prod(shape) * itemsize
        if end - begin != nbytes:
            raise _bad(
                path,
                f"tensor {quote(name)} ({dtype}{list(shape)}) needs {nbytes} bytes but "
                f"its data_offsets {[begin, end]} span {end - begin}",
            )
        if nbytes == 0 and math.prod(d for d in shape if d) * itemsize >> 63:
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
    entries: Sequence[tuple[str, np.dtype | str, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """The header bytes of a safetensors file whose tensors follow in `entries` order.

    Args:
        entries: `(name, dtype, shape)` of each tensor, in data order; a dtype may
            be given by its name (`"bfloat16"`).
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
        code, itemsize = _code_and_size(dtype, name)
        nbytes = math.prod(shape) * itemsize
        header[name] = {
            "dtype": code,
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
