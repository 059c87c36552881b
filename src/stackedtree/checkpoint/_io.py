"""Reading and writing flat checkpoints: safetensors (files, shards, index) and npz.

The safetensors format is simple enough to read and write here: an 8-byte little-endian
header length, a JSON header (`{name: {"dtype", "shape", "data_offsets"}, "__metadata__":
{}}`) and the tensors' raw little-endian bytes. Doing it ourselves, rather than through
the `safetensors` package, gives what conversion and sharded loading need and that
package's API does not: each tensor's byte range in the file, so that
`_convert.py` copies ranges without ever holding a tensor, and reads land in
preallocated buffers with positioned reads. Files stay compatible both ways with the
`safetensors` package (tested).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import ml_dtypes
import numpy as np

PathLike: TypeAlias = str | os.PathLike[str]
Paths: TypeAlias = PathLike | Sequence[PathLike]

_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_NPZ_META = "__stackedtree__"

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

# ml_dtypes types that `.npy` would store as opaque void bytes: saved as unsigned ints
# of the same width, their names kept in the archive's `__stackedtree__` entry.
_ML_DTYPES: dict[str, np.dtype] = {
    np.dtype(t).name: np.dtype(t)
    for t in (getattr(ml_dtypes, n, None) for n in dir(ml_dtypes))
    if isinstance(t, type) and issubclass(t, np.generic)
}


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


# --------------------------------------------------------------------------- reading


def _as_paths(paths: Paths) -> list[Path]:
    if isinstance(paths, str | os.PathLike):
        return [Path(paths)]
    if not isinstance(paths, Sequence):
        raise TypeError(f"expected a path or a list of paths, got {paths!r}")
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError("no checkpoint files given")
    return out


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".index.json"):
        return "index"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".npz"):
        return "npz"
    raise ValueError(
        f"`{path}`: unknown checkpoint format; expected a .safetensors file, a "
        f"*.safetensors.index.json index or an .npz archive"
    )


def _read_index(path: Path) -> dict[str, Path]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("`weight_map` must map tensor names to file names")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"`{path}` is not a valid safetensors index (a JSON object whose "
            f"`weight_map` maps tensor names to shard files): {e}"
        ) from None
    return {name: path.parent / shard for name, shard in weight_map.items()}


def _bad(path: Path, why: str) -> ValueError:
    return ValueError(f"`{path}` is not a valid safetensors file: {why}")


def read_safetensors_header(
    path: PathLike,
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Reads and checks a safetensors file's header, without its tensor data.

    Args:
        path: a `.safetensors` file.

    Returns:
        `(tensors, metadata)`: the tensors by name in data order, and the
        `__metadata__` strings.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is truncated or its header is malformed.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise _bad(
                path, f"it holds {size} bytes, fewer than the 8-byte header size"
            )
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise _bad(
                path,
                f"header size {n} exceeds the file's {size - 8} remaining bytes "
                f"(truncated or not safetensors)",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError, TypeError) as e:
        raise _bad(path, f"unreadable JSON header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "`__metadata__` must map strings to strings")
    start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _bad(path, f"tensor `{name}` has a malformed entry {entry!r}")
        if entry.get("dtype") not in _CODES:
            raise _bad(
                path,
                f"tensor `{name}` has dtype {entry.get('dtype')!r}, which stackedtree "
                f"does not read (it reads {', '.join(_CODES)})",
            )
        dtype = _CODES[entry["dtype"]]
        try:
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise _bad(
                path, f"tensor `{name}` has a malformed entry {entry!r}"
            ) from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes:
            raise _bad(
                path,
                f"tensor `{name}` ({dtype}{list(shape)}) needs {nbytes} bytes but its "
                f"data_offsets {[begin, end]} span {end - begin}",
            )
        tensors[name] = TensorInfo(path, dtype, shape, start + begin, nbytes)
    ordered = sorted(tensors.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes))
    end_of_data = start
    for name, t in ordered:
        if t.offset < end_of_data:
            raise _bad(path, f"tensor `{name}` overlaps the tensor before it")
        end_of_data = t.offset + t.nbytes
    if end_of_data != size:
        raise _bad(
            path,
            f"the header describes {end_of_data - start} bytes of tensor data but the "
            f"file holds {size - start} "
            f"({'truncated' if size < end_of_data else 'trailing bytes'})",
        )
    return dict(ordered), metadata


def _read_npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype] | None:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    return tuple(shape), dtype


def _npz_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    tensors: dict[str, TensorInfo] = {}
    extra: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                name = member.removesuffix(".npy")
                if name == _NPZ_META:
                    extra = json.loads(_read_member(path, zf, member, name).item())
                    continue
                with zf.open(member) as f:
                    spec = _read_npy_header(f)  # type: ignore[arg-type]
                if spec is None:
                    arr = _read_member(path, zf, member, name)
                    spec = (arr.shape, arr.dtype)
                shape, dtype = spec
                if dtype.hasobject:
                    raise _object_error(path, name)
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                tensors[name] = TensorInfo(path, dtype, shape, -1, nbytes)
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith(f"`{path}`"):
            raise
        raise ValueError(f"`{path}` is not a valid .npz archive: {e}") from None
    for name, dtype_name in extra.get("dtypes", {}).items():
        if name in tensors and dtype_name in _ML_DTYPES:
            t = tensors[name]
            tensors[name] = TensorInfo(
                path, _ML_DTYPES[dtype_name], t.shape, -1, t.nbytes
            )
    return tensors, dict(extra.get("metadata", {}))


def _object_error(path: Path, name: str) -> ValueError:
    return ValueError(
        f"`{path}`: array `{name}` holds Python objects, which can only be loaded by "
        f"unpickling; stackedtree never unpickles. Re-save it with a numeric dtype"
    )


def _read_member(path: Path, zf: zipfile.ZipFile, member: str, name: str) -> np.ndarray:
    with zf.open(member) as f:
        # Refuse pickles here, from the member's own header, whatever checks ran
        # before: an object array can only be loaded by running its pickle.
        spec = _read_npy_header(f)  # type: ignore[arg-type]
        if spec is not None and spec[1].hasobject:
            raise _object_error(path, name)
        f.seek(0)
        try:
            return np.lib.format.read_array(f, allow_pickle=False)
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise _object_error(path, name) from None
            raise ValueError(f"`{path}`: array `{name}` is corrupt: {e}") from None


def read_checkpoint(paths: Paths) -> Checkpoint:
    """Reads the headers of a checkpoint: names, dtypes, shapes, offsets, metadata.

    Args:
        paths: as in `load_flat`.

    Returns:
        The checkpoint's headers; no tensor data is read.

    Raises:
        OSError: a file cannot be read.
        ValueError: a file is malformed or of unknown format; a tensor name is in
            two files; an index names a tensor that its shard lacks.
    """
    files: list[Path] = []
    expected: dict[str, Path] = {}
    for p in _as_paths(paths):
        if _kind(p) == "index":
            weight_map = _read_index(p)
            expected.update(weight_map)
            files.extend(dict.fromkeys(weight_map.values()))
        else:
            files.append(p)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for file in files:
        kind = _kind(file)
        if kind == "index":
            raise ValueError(f"`{file}`: an index cannot name another index")
        found, meta = (
            read_safetensors_header(file)
            if kind == "safetensors"
            else _npz_header(file)
        )
        for name, info in found.items():
            if name in tensors:
                raise ValueError(
                    f"tensor `{name}` is in both `{tensors[name].file}` and `{file}`"
                )
            tensors[name] = info
        for key, value in meta.items():
            metadata.setdefault(key, value)
    for name, shard in expected.items():
        if name not in tensors or tensors[name].file != shard:
            raise ValueError(
                f"the index lists tensor `{name}` in `{shard}`, which lacks it"
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
            to its folder, or an `.npz` archive (or a list mixing these).

    Returns:
        The tensors by name, in file order.

    Raises:
        OSError: a file is missing or unreadable.
        ValueError: unknown format; a truncated or corrupt file; an npz array of
            Python objects; a tensor name in two files.

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
            with open(file, "rb", buffering=0) as f:
                for name in names:
                    info = ckpt.tensors[name]
                    arr = np.empty(info.shape, _little(info.dtype))
                    read_into(f, info.offset, arr)
                    out[name] = arr
        else:
            with zipfile.ZipFile(file) as zf:
                members = {m.removesuffix(".npy"): m for m in zf.namelist()}
                for name in names:
                    arr = _read_member(file, zf, members[name], name)
                    dtype = ckpt.tensors[name].dtype
                    out[name] = arr.view(dtype) if arr.dtype != dtype else arr
    return {name: out[name] for name in ckpt.tensors}


# --------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: PathLike, *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Opens a temporary file beside `path`, renamed to `path` when the block succeeds.

    On any failure (an exception, Ctrl-C) the temporary file is removed, so `path`
    either keeps its old content or is absent: never a partial file.

    Args:
        path: the final path.
        overwrite: replace an existing `path`.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        IsADirectoryError: `path` is a folder.
        FileNotFoundError: the folder of `path` does not exist.
        PermissionError: the folder of `path` is not writable.
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"`{path}` is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"`{path}` already exists; pass overwrite=True (--force) to replace it"
        )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"cannot write `{path}`: folder `{folder}` does not exist"
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except PermissionError:
        raise PermissionError(
            f"cannot write `{path}`: permission denied in folder `{folder}`"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())
        if path.exists() and not overwrite:
            raise FileExistsError(f"`{path}` appeared while it was being written")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
        ValueError: a dtype safetensors cannot store; a reserved or repeated name.
        TypeError: metadata that is not strings to strings.
    """
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
            raise ValueError(f"tensor name `{name}` is reserved or repeated")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": dtype_code(dtype, name),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
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


def _save_npz(
    f: BinaryIO, flat: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None
) -> None:
    if _NPZ_META in flat:
        raise ValueError(f"tensor name `{_NPZ_META}` is reserved in .npz archives")
    dtypes: dict[str, str] = {}
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in flat.items():
            if arr.dtype.name in _ML_DTYPES:
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
            with zf.open(_NPZ_META + ".npy", "w") as m:
                np.lib.format.write_array(m, np.asarray(extra), allow_pickle=False)


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
    kind = _kind(path)
    if kind == "index":
        raise ValueError(f"`{path}`: save to a .safetensors or .npz file, not an index")
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
            _save_npz(f, arrays, metadata)
