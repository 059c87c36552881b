"""The stacked-checkpoint format, and reading and writing it whole.

A *stacked checkpoint* is a flat checkpoint whose layer tensors are stored once each,
with a leading layer axis, under their stacked name (`LayerPattern.stacked_name`:
`model.layers.{i}.mlp.up_proj.weight`, shape `(N, ...)`); every other tensor keeps its
name. Its metadata records the pattern and N (`stackedtree.pattern`,
`stackedtree.num_layers`), so unstacking needs no pattern.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._check import fail
from ._io import Checkpoint, PathLike, Paths, load_flat, read_checkpoint, save_flat
from ._names import check_rest, num_stacked_layers
from ._pattern import LayerPattern

META_PATTERN = "stackedtree.pattern"
META_NUM_LAYERS = "stackedtree.num_layers"


def stacked_metadata(
    pattern: str, n: int, metadata: Mapping[str, str] | None
) -> dict[str, str]:
    return {**(metadata or {}), META_PATTERN: pattern, META_NUM_LAYERS: str(n)}


def save_stacked(
    path: PathLike,
    stacked: Mapping[str, Any],
    pattern: str,
    /,
    rest: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Saves `stack_by_name`'s result as a stacked checkpoint, atomically.

    The file is what `stackedtree stack` writes: `stacked[key]` is stored under
    `pattern` with the literal `{i}` kept (`model.layers.{i}.mlp.up_proj.weight`),
    `rest` under its own names, and the pattern and N in the metadata.

    Args:
        path: a `.safetensors` or `.npz` path.
        stacked: maps per-layer keys to arrays of shape `(N, ...)`.
        pattern: the layer pattern, with one `{i}`.
        rest: the other tensors.
        overwrite: replace an existing file.
        metadata: extra strings to record.

    Raises:
        ValueError: as in `save_flat`; `stacked` is empty or its tensors disagree on N;
            a name of `rest` matches `pattern`.
        FileExistsError: `path` exists and `overwrite` is False.
        OSError: the file cannot be written.
    """
    lp = LayerPattern.parse(pattern)
    n = num_stacked_layers(stacked)
    rest = {} if rest is None else rest
    check_rest(lp, rest)
    flat = {lp.stacked_name(key): x for key, x in stacked.items()}
    clash = [name for name in rest if name in flat]
    if clash:
        fail([repr(name) for name in clash], "`rest` repeats stacked names")
    flat.update(rest)
    save_flat(
        path,
        flat,
        overwrite=overwrite,
        metadata=stacked_metadata(str(lp), n, metadata),
    )


def split_stacked(ckpt: Checkpoint) -> tuple[str, int, dict[str, str], list[str]]:
    """`(pattern, N, {key: stacked name}, rest names)` of a stacked checkpoint."""
    where = ", ".join(f"`{f}`" for f in ckpt.files)
    pattern = ckpt.metadata.get(META_PATTERN)
    if pattern is None:
        raise ValueError(
            f"{where} is not a stacked checkpoint (its metadata has no "
            f"`{META_PATTERN}`); per-layer checkpoints are stacked with "
            f"`stackedtree stack`."
        )
    lp = LayerPattern.parse(pattern, META_PATTERN)
    try:
        n = int(ckpt.metadata.get(META_NUM_LAYERS, ""))
    except ValueError:
        n = -1
    if n < 1:
        raise ValueError(
            f"{where}: metadata `{META_NUM_LAYERS}` must be a positive integer, got "
            f"{ckpt.metadata.get(META_NUM_LAYERS)!r}."
        )
    keys: dict[str, str] = {}
    rest: list[str] = []
    for name, info in ckpt.tensors.items():
        key = lp.stacked_key(name)
        if key is None:
            rest.append(name)
        elif info.shape[:1] != (n,):
            raise ValueError(
                f"{where}: stacked tensor `{name}` has shape {info.shape}, but the "
                f"metadata says {n} layers."
            )
        else:
            keys[key] = name
    check_rest(lp, rest)
    return pattern, n, keys, rest


def load_stacked(
    path_or_paths: Paths, /
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """Loads a stacked checkpoint, as written by `save_stacked` or `stackedtree stack`.

    Args:
        path_or_paths: as in `load_flat`.

    Returns:
        `(stacked, rest, pattern)`, exactly `stack_by_name(flat, pattern)` of the
        per-layer checkpoint `flat` plus its pattern, so that
        `unstack_by_name(stacked, pattern, rest)` gives `flat` back.

    Raises:
        ValueError: the checkpoint is not stacked (no recorded pattern), or its
            stacked tensors disagree with the recorded number of layers; as in
            `load_flat`.
        OSError: a file is missing or unreadable.
    """
    ckpt = read_checkpoint(path_or_paths)
    pattern, _, keys, rest_names = split_stacked(ckpt)
    flat = load_flat(path_or_paths)
    return (
        {key: flat[name] for key, name in keys.items()},
        {name: flat[name] for name in rest_names},
        pattern,
    )
