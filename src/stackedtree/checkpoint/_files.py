"""Checkpoint files in and out: what to open, how to open it, how to write.

Inputs: a path is a checkpoint file, or a model folder standing for its index or its
one `.safetensors` file; only regular files (or symlinks to them) are opened, since
a named pipe would block forever and a device never end. Outputs: checked before any
work (format, an existing file, the folder), written under a hidden temporary name
and renamed when complete, so no failure or interrupt leaves a partial file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TypeAlias

import numpy as np

from ._text import listing

PathLike: TypeAlias = str | os.PathLike[str]
"""A file or folder path: a `str` or a `pathlib.Path`."""

Paths: TypeAlias = PathLike | Sequence[PathLike]
"""A checkpoint: a `.safetensors` file, several (shards of one checkpoint), a
`*.safetensors.index.json` naming its shards, a model folder (its index, else its one
`.safetensors` file), an `.npz` archive, or a list mixing these."""

# --------------------------------------------------------------------------- inputs


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "a special file"


def open_regular(path: PathLike) -> BinaryIO:
    """Opens a regular file (or a symlink to one) for raw, unbuffered reading.

    Anything else is refused before it is opened.

    Raises:
        ValueError: `path` is not a regular file.
        OSError: it cannot be opened.
    """
    path = Path(path)

    def refuse(mode: int) -> ValueError:
        return ValueError(
            f"`{path}` is {_file_kind(mode)}, not a regular file; give a checkpoint "
            f"file"
        )

    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise refuse(mode)
    # O_NONBLOCK: should `path` have become a pipe since, opening it cannot block.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise refuse(mode)
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    f.name = str(path)
    return f


def read_at(f: BinaryIO | int, offset: int, view: memoryview) -> int:
    """Reads into `view` from `offset` of the raw file `f` (or file descriptor) with
    positioned reads until it is full or the file ends; the bytes read.

    The one positioned-read loop: `pread`, `read_into` and the copy of
    `_convert` all read through it.
    """
    fd = f if isinstance(f, int) else f.fileno()
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done : done + (1 << 30)]], offset + done)
        if got == 0:
            break
        done += got
    return done


def pread(f: BinaryIO, n: int, offset: int) -> bytes:
    """`n` bytes of `f` at `offset`, or fewer at the end of the file."""
    buf = bytearray(n)
    got = read_at(f, offset, memoryview(buf))
    del buf[got:]
    return bytes(buf)


def read_into(f: BinaryIO, offset: int, out: np.ndarray) -> None:
    """Reads `out.nbytes` bytes at `offset` of the raw file `f` into `out`.

    Raises:
        ValueError: the file ends first.
    """
    view = out.reshape(-1).view(np.uint8).data
    if read_at(f, offset, view) < len(view):
        raise ValueError(f"`{f.name}` is truncated")


def model_folder(folder: Path) -> Path:
    """The checkpoint of a model folder: its index, else its one safetensors file.

    Raises:
        ValueError: the folder holds several indexes, or no index and several
            `.safetensors` files or none.
    """
    names = sorted(os.listdir(folder))
    indexes = [n for n in names if n.lower().endswith(".safetensors.index.json")]
    if len(indexes) == 1:
        return folder / indexes[0]
    if indexes:
        raise ValueError(
            f"`{folder}` holds several indexes ({listing(indexes)}); give the one "
            f"to read"
        )
    files = [n for n in names if n.lower().endswith(".safetensors")]
    if len(files) == 1:
        return folder / files[0]
    if files:
        raise ValueError(
            f"`{folder}` holds {len(files)} .safetensors files ({listing(files)}) "
            f"and no *.safetensors.index.json; give the files, or an index"
        )
    found = f"it holds {listing(names)}" if names else "it is empty"
    raise ValueError(
        f"`{folder}` holds no .safetensors file and no *.safetensors.index.json "
        f"({found})"
    )


def as_paths(paths: Paths) -> list[Path]:
    """The checkpoint files given, each model folder replaced by its checkpoint."""
    if isinstance(paths, str | os.PathLike):
        items: Sequence[object] = [paths]
    elif isinstance(paths, Sequence) and not isinstance(paths, bytes):
        items = paths
    else:
        raise TypeError(f"expected a path or a list of paths, got {paths!r}")
    out = []
    for p in items:
        if not isinstance(p, str | os.PathLike):
            raise TypeError(f"expected a path or a list of paths, got {p!r}")
        if "\0" in os.fspath(p):
            raise ValueError(f"{p!r}: a path cannot hold a NUL character")
        path = Path(p)
        out.append(model_folder(path) if path.is_dir() else path)
    if not out:
        raise ValueError("no checkpoint files given")
    return out


def checkpoint_kind(path: Path) -> str:
    """`"index"`, `"safetensors"` or `"npz"`, by the name of `path`."""
    name = path.name.lower()
    if name.endswith(".index.json"):
        return "index"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".npz"):
        return "npz"
    if not os.path.lexists(path):
        raise ValueError(
            f"`{path}`: no such file or folder, and unknown checkpoint format; "
            f"expected a .safetensors file, a *.safetensors.index.json index, an "
            f".npz archive or a model folder"
        )
    raise ValueError(
        f"`{path}`: unknown checkpoint format; expected a .safetensors file, a "
        f"*.safetensors.index.json index, an .npz archive or a model folder"
    )


# -------------------------------------------------------------------------- outputs


def output_kind(path: Path) -> str:
    """`"safetensors"` or `"npz"`, the format `path` names."""
    for suffix in ("safetensors", "npz"):
        if path.name.lower().endswith("." + suffix):
            return suffix
    raise ValueError(
        f"`{path}`: unknown output format; name a .safetensors or .npz file"
    )


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_output(path: PathLike, *, overwrite: bool = False) -> Path:
    """Checks that `path` can be written, before any work is done for it.

    Raises:
        FileExistsError: `path` exists (a dangling symlink too) and `overwrite` is
            False.
        IsADirectoryError: `path` is a folder.
        FileNotFoundError: the folder of `path` does not exist.
        PermissionError: the folder of `path` is not writable.
        OSError: the folder's file system is read-only; the name is too long.
    """
    path = Path(path)
    folder = path.parent
    if len(os.fsencode(path.name)) > _name_max(folder):
        raise OSError(
            errno.ENAMETOOLONG,
            f"cannot write `{path}`: its name is longer than the file system allows",
        )
    if path.is_dir():
        raise IsADirectoryError(f"`{path}` is a folder; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(
            f"`{path}` already exists; pass overwrite=True (--force) to replace it"
        )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"cannot write `{path}`: folder `{folder}` does not exist"
        )
    # `access` says "denied" on a read-only file system too: ask it second.
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise OSError(
            errno.EROFS, f"cannot write `{path}`: the file system is read-only"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES,
            f"cannot write `{path}`: permission denied in folder `{folder}`",
        )
    return path


def _temp_path(path: Path) -> Path:
    """A fresh hidden name beside `path`, within the file system's name limit."""
    stem = path.name
    room = _name_max(path.parent) - len("..0123456789abcdef.tmp")
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return path.parent / f".{stem}.{os.urandom(8).hex()}.tmp"


def _reworded(e: OSError, path: Path, tmp: Path | None) -> OSError | None:
    """`e`, raised while writing `path` through `tmp`, reworded to name `path`."""
    if e.errno is None or e.filename not in (None, str(tmp)):
        return None
    if e.errno == errno.EACCES:
        why = f"permission denied in folder `{path.parent}`"
    else:
        why = e.strerror or os.strerror(e.errno)
    return type(e)(e.errno, f"cannot write `{path}`: {why}")


@contextlib.contextmanager
def atomic_write(path: PathLike, *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Opens a temporary file beside `path`, renamed to `path` when the block succeeds.

    On any failure (an exception, Ctrl-C, a signal the caller turns into an
    exception) the temporary file is removed, so `path` either keeps its old content
    or is absent: never a partial file.

    Raises:
        As `check_output`; OSError: writing fails (a full disk, a file too large, a
        read-only file system), with a message that names `path`, not the
        temporary file.
    """
    path = check_output(path, overwrite=overwrite)
    # `tmp` is named before the file exists, so that an interrupt at any moment
    # after the file is created finds it and removes it.
    tmp: Path | None = None
    try:
        for _ in range(100):
            tmp = _temp_path(path)
            try:
                f = open(tmp, "xb")
                break
            except FileExistsError:
                tmp = None
        else:
            raise FileExistsError(f"cannot create a temporary file beside `{path}`")
        with f:
            yield f
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"`{path}` appeared while it was being written")
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        reworded = _reworded(e, path, tmp) if isinstance(e, OSError) else None
        if reworded is not None:
            raise reworded from None
        raise
