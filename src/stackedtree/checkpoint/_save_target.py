"""The output of `save_sharded` on disk: checked, created whole, renamed at the end.

Every process writes into the same temporary output beside the target (a hidden
`.NAME.DIGEST.tmp` file, or folder holding the shards and the index, named after the
digest of the call's arguments, which every process computes), which process 0
creates with every file at its full size and its header in place, and renames to the
target once every process has written and synced its part. A failure removes it, so
the target is either absent (or as it was) or complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import NamedTuple

from ._files import check_output
from ._save_layout import INDEX_NAME, Layout


class Target(NamedTuple):
    """The output: the path asked for, whether it is a folder, and the temporary
    path beside it that every process writes to."""

    path: Path
    folder: bool
    tmp: Path

    def files(self, layout: Layout) -> list[Path]:
        if self.folder:
            return [self.tmp / name for name, _, _ in layout.files]
        return [self.tmp]


def check_target(path: Path, folder: bool, overwrite: bool) -> None:
    """Refuses an existing target (without `overwrite`) or an unwritable folder."""
    if not folder:
        check_output(path, overwrite=overwrite)
        return
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(
                f"`{path}` already exists; pass overwrite=True to replace it"
            )
        if not path.is_dir():
            raise NotADirectoryError(
                f"`{path}` is a file; a path without the .safetensors suffix names "
                f"an output folder"
            )
    # The folder's parent must take a new entry, as a file's folder must.
    check_output(path.parent / (path.name + ".safetensors"), overwrite=True)


def create(target: Target, layout: Layout) -> None:
    """Creates the temporary output: each file at its size with its header, and the
    index, in place of what an interrupted run of the same call left. On failure
    nothing is left."""
    discard(target)
    try:
        if target.folder:
            os.mkdir(target.tmp)
        for path, (_, header, size) in zip(
            target.files(layout), layout.files, strict=True
        ):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                done = 0
                while done < len(header):
                    done += os.pwrite(fd, header[done:], done)
            finally:
                os.close(fd)
        if layout.index_text is not None:
            (target.tmp / INDEX_NAME).write_text(layout.index_text, encoding="utf-8")
    except BaseException:
        discard(target)
        raise


def commit(target: Target, overwrite: bool) -> None:
    """Renames the complete temporary output to the target."""
    path, tmp = target.path, target.tmp
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"`{path}` appeared while it was being written")
        if target.folder:
            old = tmp.with_name(tmp.name + ".old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    else:
        os.rename(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(target: Target) -> None:
    """Removes the temporary output, if any (every failing process tries)."""
    with contextlib.suppress(OSError):
        if target.folder:
            shutil.rmtree(target.tmp)
        else:
            os.unlink(target.tmp)
