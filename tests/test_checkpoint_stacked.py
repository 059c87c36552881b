"""`checkpoint/_stacked.py`: the stacked-file format's metadata, written and read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ckptgen import assert_same_flat, deepseek

from stackedtree.checkpoint import (
    convert_stack,
    load_stacked,
    save_flat,
    save_stacked,
    stack_by_name,
)
from stackedtree.checkpoint._io import read_checkpoint

P = "model.layers.{i}."
STALE = {"stackedtree.kinds": '{"A":[0],"B":[1]}', "origin": "hub"}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_a_stale_kinds_entry_in_the_input_metadata_is_dropped(
    tmp_path: Path, suffix: str
) -> None:
    # Metadata carried over from another file may hold `stackedtree.kinds`; a file
    # of one kind must not keep it, or it could not be read back.
    flat = {f"h.{i}.w": np.full(3, i, np.float32) for i in range(4)}
    stacked, rest = stack_by_name(flat, "h.{i}.")
    path = tmp_path / f"s{suffix}"
    save_stacked(path, stacked, "h.{i}.", rest, metadata=STALE)
    assert read_checkpoint(path).metadata == {
        "origin": "hub",
        "stackedtree.pattern": "h.{i}.",
        "stackedtree.num_layers": "4",
    }
    got, _, pattern, kinds = load_stacked(path)
    assert (pattern, kinds) == ("h.{i}.", None)
    assert_same_flat(got, stacked)

    src, out = tmp_path / f"src{suffix}", tmp_path / f"out{suffix}"
    save_flat(src, flat, metadata=STALE)
    assert convert_stack(src, out).kinds is None
    assert "stackedtree.kinds" not in read_checkpoint(out).metadata
    assert_same_flat(load_stacked(out).stacked, stacked)


def test_a_stale_kinds_entry_is_replaced_by_the_true_kinds(tmp_path: Path) -> None:
    flat = deepseek(dense=2, moe=3)
    src, out = tmp_path / "src.safetensors", tmp_path / "out.safetensors"
    save_flat(src, flat, metadata=STALE)
    kinds = {"A": [0, 1], "B": [2, 3, 4]}
    assert convert_stack(src, out).kinds == kinds
    assert json.loads(read_checkpoint(out).metadata["stackedtree.kinds"]) == kinds
    assert load_stacked(out).kinds == kinds
