"""Flat checkpoints of one or several files: reading their headers, loading and saving.

A checkpoint is `.safetensors` files (one, several shards, or those an index names)
or an `.npz` archive: `read_checkpoint` reads every file's header into one
`Checkpoint` (names, dtypes, shapes, byte offsets, metadata), `load_flat` loads its
tensors, and `save_flat` writes one file atomically. The safetensors format itself
(dtype codes, header read and written) is `_safetensors.py`; npz archives are read by
`_npz.py`; files are opened by `_files.py` (regular files only). Every file read here
may be hostile (see `_limits.py`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

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
    read_into,
)
from ._limits import MAX_HEADER, load_json, strings
from ._npz import load_npz, npz_header, save_npz
from ._safetensors import (
    TensorInfo,
    dtype_code,
    little,
    read_safetensors_header,
    safetensors_header,
)
from ._text import brief, quote

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
                name: TensorInfo(file, str(a.dtype), a.shape, -1, a.nbytes)
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
                    arr = np.empty(info.shape, little(info.dtype))
                    read_into(f, info.offset, arr)
                    out[name] = arr
        else:
            specs = {n: (ckpt.tensors[n].dtype, ckpt.tensors[n].shape) for n in names}
            out.update(load_npz(file, specs))
    return {name: out[name] for name in ckpt.tensors}


# --------------------------------------------------------------------------- writing


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
    arr = np.ascontiguousarray(arr.astype(little(arr.dtype), copy=False))
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
