""".npz archives: headers checked before any data is read, never a pickle run.

An `.npz` is a zip of `.npy` arrays. Each member is checked from the zip's directory
(not encrypted, stored or deflated, no more bytes claimed than its compressed size
can produce) and from its own `.npy` header (at most numpy's 10,000 bytes, parsed as
a literal; a shape whose bytes match what the member holds), so headers alone are
read to list an archive and no allocation ever exceeds what the file can hold.
ml_dtypes types (bfloat16, float8), which `.npy` would store as opaque void bytes,
are saved as unsigned ints of the same width, their names kept in the archive's
`__stackedtree__` entry.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from ._files import open_regular, pread
from ._limits import MAX_DIMS, MAX_HEADER, MAX_TENSORS, load_json, strings
from ._safetensors import native
from ._text import brief, quote

META = "__stackedtree__"
_MAX_NPY_HEADER = 10_000  # numpy's own limit
_DEFLATE_RATIO = 1032  # the largest expansion deflate can produce


@functools.cache
def ml_dtypes_by_name() -> dict[str, np.dtype]:
    """ml_dtypes' dtypes by name, imported when an archive first needs them (the
    import takes most of a second)."""
    import ml_dtypes

    return {
        np.dtype(t).name: np.dtype(t)
        for t in (getattr(ml_dtypes, n, None) for n in dir(ml_dtypes))
        if isinstance(t, type) and issubclass(t, np.generic)
    }


class Array(NamedTuple):
    """An array of an archive, from its headers."""

    info: zipfile.ZipInfo
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int


# What zipfile and numpy raise on a corrupt archive. A ValueError that starts with the
# file's name is ours, and passes through as it is.
_CORRUPT = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    zlib.error,
    NotImplementedError,
    struct.error,
    OverflowError,
    ValueError,
)


def _error(path: Path, why: str) -> ValueError:
    return ValueError(f"`{path}` is not a valid .npz archive: {why}")


def _ours(e: Exception, path: Path) -> bool:
    return isinstance(e, ValueError) and str(e).startswith(f"`{path}`")


def object_error(path: Path, name: str) -> ValueError:
    return ValueError(
        f"`{path}`: array {quote(name)} holds Python objects, which can only be "
        f"loaded by unpickling; stackedtree never unpickles. Re-save it with a "
        f"numeric dtype."
    )


def _npy_dict(f: BinaryIO) -> dict:
    """The parsed header dictionary of a `.npy` stream, which is left at its data."""
    head = f.read(8)
    if len(head) < 8 or head[:6] != b"\x93NUMPY":
        raise ValueError("it is not a .npy array")
    version = (head[6], head[7])
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f".npy format version {version[0]}.{version[1]} is unknown")
    fmt = "<H" if version == (1, 0) else "<I"
    size = struct.calcsize(fmt)
    raw = f.read(size)
    (length,) = struct.unpack(fmt, raw) if len(raw) == size else (-1,)
    if length > _MAX_NPY_HEADER:
        raise ValueError(
            f"its .npy header of {length} bytes is over numpy's limit of "
            f"{_MAX_NPY_HEADER}"
        )
    raw = f.read(max(length, 0))
    if length < 0 or len(raw) < length:
        raise ValueError("its .npy header is truncated")
    try:
        d = ast.literal_eval(raw.decode("utf8" if version == (3, 0) else "latin1"))
        if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
            raise TypeError
        d["descr"] = np.lib.format.descr_to_dtype(d["descr"])
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError("its .npy header is malformed") from None
    shape = d["shape"]
    if (
        not isinstance(shape, tuple)
        or len(shape) > MAX_DIMS
        or not all(type(x) is int and x >= 0 for x in shape)
        or type(d["fortran_order"]) is not bool
    ):
        raise ValueError(f"its .npy header is malformed (shape {shape!r:.80})")
    if d["descr"].shape:
        raise ValueError(f"its .npy header has the subarray dtype {d['descr']}")
    d["size"] = 8 + size + length
    return d


def npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """`(shape, dtype, header size)` of a `.npy` stream, reading its header alone.

    Raises:
        ValueError: not a `.npy` header, or an unsafe or malformed one.
    """
    d = _npy_dict(f)
    return d["shape"], d["descr"], d["size"]


def _member_problem(info: zipfile.ZipInfo, zf: zipfile.ZipFile) -> str | None:
    """Why a zip member cannot be read safely, from the zip's directory alone."""
    size = os.fstat(zf.fp.fileno()).st_size if zf.fp is not None else 0
    if not 0 <= info.header_offset < size:
        return f"starts at byte {info.header_offset}, outside the file"
    if info.flag_bits & 0x1:
        return "is encrypted"
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            return "is stored uncompressed but its two sizes differ"
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > _DEFLATE_RATIO * info.compress_size + 1024:
            return (
                f"claims {info.file_size} bytes from {info.compress_size} compressed "
                f"ones, more than deflate can produce"
            )
    else:
        return (
            f"uses compression method {info.compress_type}; numpy archives are "
            f"stored or deflated"
        )
    return None


def read_member(
    path: Path, zf: zipfile.ZipFile, member: str | zipfile.ZipInfo, name: str
) -> np.ndarray:
    """Reads one array of an archive, refusing a pickle from the member's own header."""
    info = member if isinstance(member, zipfile.ZipInfo) else zf.getinfo(member)
    problem = _member_problem(info, zf)
    if problem:
        raise _error(path, f"member {quote(info.filename)} {problem}")
    try:
        with zf.open(info) as f:
            # Whatever checks ran before: an object array loads only by unpickling.
            if npy_header(f)[1].hasobject:  # type: ignore[arg-type]
                raise object_error(path, name)
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
    except _CORRUPT as e:
        if _ours(e, path):
            raise
        raise ValueError(f"`{path}`: array {quote(name)} is corrupt: {e}") from None


def _zip(path: Path, f: BinaryIO) -> zipfile.ZipFile:
    """Opens an archive, once its directory is known to list few enough members.

    `zipfile` makes an object per member as it opens the archive: the count is read
    first from the end-of-directory record (or its zip64 twin).
    """
    size = os.fstat(f.fileno()).st_size
    tail = pread(f, min(size, 22 + 0xFFFF), max(0, size - 22 - 0xFFFF))
    at = tail.rfind(b"PK\x05\x06")
    if at >= 0 and len(tail) >= at + 22:
        (count,) = struct.unpack_from("<H", tail, at + 10)
        if count == 0xFFFF and at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":
            (where,) = struct.unpack_from("<Q", tail, at - 12)
            record = pread(f, 40, where) if where < size else b""
            if len(record) == 40 and record[:4] == b"PK\x06\x06":
                (count,) = struct.unpack_from("<Q", record, 32)
        if count > MAX_TENSORS + 1:
            raise _error(
                path,
                f"it lists {count} members, more than the {MAX_TENSORS} a file may "
                f"hold here",
            )
    return zipfile.ZipFile(f)


def _arrays(path: Path, zf: zipfile.ZipFile) -> dict[str, Array]:
    """Each array's zip entry and header, checked against the bytes it holds."""
    infos = zf.infolist()
    if len(infos) > MAX_TENSORS + 1:
        raise _error(
            path,
            f"it holds {len(infos)} members, more than the {MAX_TENSORS} a file may "
            f"hold here",
        )
    out: dict[str, Array] = {}
    for info in infos:
        name = info.filename.removesuffix(".npy")
        if name in out:
            raise _error(path, f"it holds array {quote(name)} twice")
        problem = _member_problem(info, zf)
        if problem:
            raise _error(path, f"member {quote(info.filename)} {problem}")
        try:
            with zf.open(info) as f:
                shape, dtype, skip = npy_header(f)  # type: ignore[arg-type]
        except _CORRUPT as e:
            raise _error(path, f"member {quote(info.filename)}: {e}") from None
        if dtype.hasobject:
            raise object_error(path, name)
        nbytes = math.prod(shape) * dtype.itemsize
        if info.file_size - skip != nbytes:
            raise _error(
                path,
                f"array {quote(name)} ({dtype}{list(shape)}) needs {nbytes} bytes "
                f"but its member holds {info.file_size - skip}",
            )
        out[name] = Array(info, dtype, shape, nbytes)
    return out


def _extra(
    path: Path, zf: zipfile.ZipFile, arrays: dict[str, Array]
) -> tuple[dict[str, str], dict[str, str]]:
    """`(dtypes, metadata)` from the `__stackedtree__` entry, which it removes."""
    entry = arrays.pop(META, None)
    if entry is None:
        return {}, {}
    if entry.dtype.kind != "U" or entry.shape != () or entry.nbytes > MAX_HEADER:
        raise _error(path, f"`{META}` must be one string of JSON")
    text = str(read_member(path, zf, entry.info, META).item())
    try:
        extra = load_json(text.encode("utf-8", "surrogatepass"))
    except ValueError as e:
        raise _error(path, f"`{META}` is not valid JSON ({e})") from None
    if not isinstance(extra, tuple):
        raise _error(path, f"`{META}` must be a JSON object, got {brief(extra)}")
    found: dict[str, dict[str, str]] = {"dtypes": {}, "metadata": {}}
    for key, value in extra:
        if key in found:
            checked = strings(value, f"`{META}` `{key}`")
            if isinstance(checked, str):
                raise _error(path, checked)
            found[key] = checked
    for name, dtype_name in found["dtypes"].items():
        if name not in arrays:
            continue
        want = ml_dtypes_by_name().get(dtype_name)
        stored = arrays[name].dtype
        if want is None or stored.kind != "u" or stored.itemsize != want.itemsize:
            raise _error(
                path,
                f"`{META}` says array {quote(name)} is {brief(dtype_name)}, but it is "
                f"stored as {stored}",
            )
    return found["dtypes"], found["metadata"]


def data_offsets(path: Path) -> dict[str, int]:
    """Where each array's raw data starts in the archive, for arrays that can be read
    in place: stored uncompressed, in C order, little-endian or byte-sized.

    Other arrays (deflated, Fortran-ordered, big-endian) are absent: read them whole
    with `read_member`. The headers are checked as `npz_header` checks them.

    Raises:
        ValueError: a malformed or hostile archive.
        OSError: the file cannot be read.
    """
    found: dict[str, int] = {}
    try:
        with open_regular(path) as raw, _zip(path, raw) as zf:
            for name, array in _arrays(path, zf).items():
                info = array.info
                if info.compress_type != zipfile.ZIP_STORED:
                    continue
                local = pread(raw, 30, info.header_offset)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise _error(path, f"member {quote(info.filename)} has no header")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                with zf.open(info) as f:
                    d = _npy_dict(f)  # type: ignore[arg-type]
                    skip = f.tell()
                dtype = array.dtype
                if not d["fortran_order"] and dtype.byteorder != ">":
                    found[name] = start + skip
    except _CORRUPT as e:
        if _ours(e, path):
            raise
        raise _error(path, str(e)) from None
    found.pop(META, None)
    return found


def npz_header(path: Path) -> tuple[dict[str, Array], dict[str, str]]:
    """The arrays of an archive (their dtypes as saved) and its metadata.

    Raises:
        ValueError: a malformed or hostile archive, or an array of Python objects.
        OSError: the file cannot be read.
    """
    try:
        with open_regular(path) as raw, _zip(path, raw) as zf:
            arrays = _arrays(path, zf)
            dtypes, metadata = _extra(path, zf, arrays)
    except _CORRUPT as e:
        if _ours(e, path):
            raise
        raise _error(path, str(e)) from None
    for name, dtype_name in dtypes.items():
        if name in arrays:
            arrays[name] = arrays[name]._replace(dtype=ml_dtypes_by_name()[dtype_name])
    return arrays, metadata


def load_npz(
    path: Path, specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]]
) -> dict[str, np.ndarray]:
    """Reads the arrays `specs` names (with their dtypes and shapes) from an archive."""
    out = {}
    try:
        with open_regular(path) as raw, _zip(path, raw) as zf:
            members = {m.filename.removesuffix(".npy"): m for m in zf.infolist()}
            for name, (dtype, shape) in specs.items():
                arr = read_member(path, zf, members[name], name)
                if arr.dtype != dtype:
                    # An ml_dtypes array is stored as unsigned ints, in either byte
                    # order: make it native before viewing its bits as `dtype`.
                    arr = arr.astype(native(arr.dtype), copy=False).view(dtype)
                if arr.shape != shape:
                    raise _error(path, "it changed while it was being read")
                out[name] = arr
    except (*_CORRUPT, KeyError) as e:
        if _ours(e, path):
            raise
        raise _error(path, f"it changed while it was being read ({e})") from None
    return out


def save_npz(
    f: BinaryIO, flat: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None
) -> None:
    """Writes the arrays as an uncompressed archive, refusing any that would pickle."""
    if META in flat:
        raise ValueError(f"tensor name `{META}` is reserved in .npz archives")
    dtypes: dict[str, str] = {}
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in flat.items():
            if arr.dtype.name in ml_dtypes_by_name():
                dtypes[name] = arr.dtype.name
                arr = arr.view(f"u{arr.dtype.itemsize}")
            with zf.open(name + ".npy", "w", force_zip64=True) as m:
                try:
                    np.lib.format.write_array(m, arr, allow_pickle=False)
                except ValueError:
                    raise ValueError(
                        f"tensor `{name}` has dtype {arr.dtype}, which cannot be saved "
                        f"without pickling"
                    ) from None
        if dtypes or metadata:
            extra = json.dumps({"dtypes": dtypes, "metadata": dict(metadata or {})})
            with zf.open(META + ".npy", "w") as m:
                np.lib.format.write_array(m, np.asarray(extra), allow_pickle=False)
