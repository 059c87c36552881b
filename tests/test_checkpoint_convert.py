"""Stacked checkpoints on disk and streaming conversion, against the in-memory ops."""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import ckptgen
import numpy as np
import pytest
from ckptgen import assert_same_flat, cases
from hypothesis import given, settings
from hypothesis import strategies as st

from stackedtree.checkpoint import (
    _convert,
    convert_stack,
    convert_unstack,
    inspect_checkpoint,
    load_flat,
    load_stacked,
    save_flat,
    save_stacked,
    stack_by_name,
    unstack_by_name,
)
from stackedtree.checkpoint._io import read_checkpoint


def llama(n: int = 3) -> dict[str, np.ndarray]:
    keys = {
        "self_attn.q_proj.weight": ((8, 8), np.float16),
        "mlp.up_proj.weight": ((4, 8), np.int32),
    }
    return ckptgen.llama(n, keys, vocab=16, d=8, seed=0)


@settings(max_examples=20, deadline=None)
@given(case=cases(max_layers=3), suffix=st.sampled_from([".safetensors", ".npz"]))
def test_streaming_equals_in_memory_bit_exactly(case: Any, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        src, out, back = (Path(folder) / f"{n}{suffix}" for n in ("src", "out", "back"))
        save_flat(src, case.flat, metadata={"origin": "test"})
        # Random keys may hold numbered parts; experts have their own property.
        done = convert_stack(src, out, pattern=case.pattern, experts="none")
        assert done.num_layers == case.num_layers and done.streamed == (
            suffix != ".npz"
        )
        stacked, rest, pattern, kinds = load_stacked(out)
        assert kinds is None
        want_stacked, want_rest = stack_by_name(case.flat, case.pattern)
        assert pattern == case.pattern
        assert_same_flat(stacked, want_stacked)
        assert_same_flat(rest, want_rest)
        assert read_checkpoint(out).metadata["origin"] == "test"

        convert_unstack(out, back)
        assert_same_flat(load_flat(back), case.flat)
        assert_same_flat(load_flat(back), unstack_by_name(stacked, pattern, rest))
        assert read_checkpoint(back).metadata == {"origin": "test"}


def test_stacked_file_layout_and_order(tmp_path: Path) -> None:
    flat = llama(3)
    save_flat(tmp_path / "a.safetensors", flat)
    done = convert_stack(tmp_path / "a.safetensors", tmp_path / "s.safetensors")
    assert done.pattern == "model.layers.{i}." and done.num_tensors == 4
    stacked_flat = load_flat(tmp_path / "s.safetensors")
    assert list(stacked_flat) == [
        "model.embed_tokens.weight",
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.mlp.up_proj.weight",
        "model.norm.weight",
    ]
    assert read_checkpoint(tmp_path / "s.safetensors").metadata == {
        "stackedtree.pattern": "model.layers.{i}.",
        "stackedtree.num_layers": "3",
    }
    convert_unstack(tmp_path / "s.safetensors", tmp_path / "u.safetensors")
    assert list(load_flat(tmp_path / "u.safetensors")) == list(
        flat
    )  # layer-major, as HF


def test_save_stacked_matches_convert_stack(tmp_path: Path) -> None:
    flat = llama(2)
    save_flat(tmp_path / "a.safetensors", flat)
    convert_stack(tmp_path / "a.safetensors", tmp_path / "s1.safetensors")
    stacked, rest = stack_by_name(flat, "model.layers.{i}.")
    save_stacked(tmp_path / "s2.safetensors", stacked, "model.layers.{i}.", rest)
    assert_same_flat(
        load_flat(tmp_path / "s1.safetensors"), load_flat(tmp_path / "s2.safetensors")
    )


def test_shards_and_index_as_source(tmp_path: Path) -> None:
    flat = llama(4)
    names = list(flat)
    save_flat(tmp_path / "m-1.safetensors", {n: flat[n] for n in names[:5]})
    save_flat(tmp_path / "m-2.safetensors", {n: flat[n] for n in names[5:]})
    weight_map = {n: f"m-{1 + (k >= 5)}.safetensors" for k, n in enumerate(names)}
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    convert_stack(index, tmp_path / "s.safetensors")
    stacked, rest, pattern, _ = load_stacked(tmp_path / "s.safetensors")
    want = stack_by_name(flat, pattern)
    assert_same_flat(stacked, want[0])
    assert_same_flat(rest, want[1])


def test_chunked_copy_when_the_kernel_cannot(tmp_path: Path, monkeypatch: Any) -> None:
    def refuse(*args: Any) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    monkeypatch.setattr(_convert, "_CHUNK", 24)  # several chunks per tensor
    flat = llama(3)
    save_flat(tmp_path / "a.safetensors", flat)
    convert_stack(tmp_path / "a.safetensors", tmp_path / "s.safetensors")
    convert_unstack(tmp_path / "s.safetensors", tmp_path / "u.safetensors")
    assert_same_flat(load_flat(tmp_path / "u.safetensors"), flat)


@pytest.mark.parametrize("kernel", [True, False])
def test_copier_starts_the_write_back_as_it_goes(tmp_path: Path, kernel: bool) -> None:
    data = bytes(range(256)) * 4
    (tmp_path / "src").write_bytes(data)
    started = []
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        dst.write(b"header")
        dst.flush()
        copier = _convert._Copier(dst.fileno(), 6, every=100)
        copier.fast = kernel and copier.fast
        copier.writeback = lambda fd, offset, nbytes: started.append((offset, nbytes))
        # Two ranges out of order, the first longer than `every`.
        copier.copy(src.fileno(), 300, 250)
        copier.copy(src.fileno(), 7, 130)
    assert (tmp_path / "dst").read_bytes() == b"header" + data[300:550] + data[7:137]
    # From the end of the header on, once at least 100 bytes more were copied.
    assert started == [(6, 100), (106, 100), (206, 150)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux call")
def test_the_write_back_starter_is_linux_sync_file_range(tmp_path: Path) -> None:
    start = _convert._writeback_starter()
    assert start is not None
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 10_000)
        f.flush()
        assert start(f.fileno(), 0, 10_000) == 0
        assert start(-1, 0, 1) == -1  # a bad descriptor: refused, not raised


def test_conversion_errors(tmp_path: Path) -> None:
    flat = llama(2)
    save_flat(tmp_path / "a.safetensors", flat)
    with pytest.raises(
        ValueError, match=r"is not a stacked checkpoint .* `stackedtree stack`"
    ):
        convert_unstack(tmp_path / "a.safetensors", tmp_path / "u.safetensors")
    convert_stack(tmp_path / "a.safetensors", tmp_path / "s.safetensors")
    with pytest.raises(
        ValueError, match=r"already stacked \(pattern 'model\.layers\.\{i\}\.'\)"
    ):
        convert_stack(tmp_path / "s.safetensors", tmp_path / "s2.safetensors")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_stack(tmp_path / "a.safetensors", tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="matches no tensor name"):
        convert_stack(
            tmp_path / "a.safetensors", tmp_path / "x.safetensors", pattern="h.{i}."
        )
    flat["encoder.3.w"] = flat["encoder.1.w"] = flat["encoder.0.w"] = np.zeros(1)
    save_flat(tmp_path / "b.safetensors", flat)
    with pytest.raises(ValueError, match="ambiguous"):
        convert_stack(tmp_path / "b.safetensors", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"missing layers 2; found layers 0-1, 3"):
        convert_stack(
            tmp_path / "b.safetensors",
            tmp_path / "x.safetensors",
            pattern="encoder.{i}.",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.safetensors",
        "b.safetensors",
        "s.safetensors",
    ]


def test_load_stacked_checks_recorded_layers(tmp_path: Path) -> None:
    save_flat(
        tmp_path / "s.safetensors",
        {"h.{i}.w": np.zeros((3, 2))},
        metadata={"stackedtree.pattern": "h.{i}.", "stackedtree.num_layers": "4"},
    )
    with pytest.raises(
        ValueError, match=r"`h\.\{i\}\.w` has shape \(3, 2\), but the metadata says 4"
    ):
        load_stacked(tmp_path / "s.safetensors")


def test_inspect_per_layer_and_stacked(tmp_path: Path) -> None:
    save_flat(tmp_path / "a.safetensors", llama(3), metadata={"format": "pt"})
    text = inspect_checkpoint(tmp_path / "a.safetensors")
    assert text.splitlines()[:4] == [
        "1 file, 8 tensors, 1.3 KiB (1312 bytes)",
        "layer pattern: 'model.layers.{i}.' (detected), 3 layers of 2 tensors (256 B each)",
        "layer 0:",
        "  mlp.up_proj.weight       i32[4,8]",
    ]
    assert "metadata: format='pt'" in text
    convert_stack(tmp_path / "a.safetensors", tmp_path / "s.safetensors")
    text = inspect_checkpoint(tmp_path / "s.safetensors")
    assert "stacked checkpoint: pattern 'model.layers.{i}.', 3 layers" in text
    assert "  model.layers.{i}.mlp.up_proj.weight       i32[3,4,8]" in text


@pytest.mark.parametrize("via", ["npz", "safetensors"])
def test_round_trip_through_any_format_is_byte_identical(
    tmp_path: Path, via: str
) -> None:
    # Loading (npz on either side) writes tensors in the order streaming gives.
    src = tmp_path / "src.safetensors"
    save_flat(src, llama())
    convert_stack(src, tmp_path / f"stacked.{via}")
    convert_unstack(tmp_path / f"stacked.{via}", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()
    convert_stack(src, tmp_path / "stacked2.safetensors")
    convert_stack(tmp_path / "back.safetensors", tmp_path / "stacked3.npz")
    assert list(load_flat(tmp_path / "stacked3.npz")) == list(
        load_flat(tmp_path / "stacked2.safetensors")
    )


def test_a_dtype_safetensors_cannot_hold_is_refused_before_loading(
    tmp_path: Path, monkeypatch: Any
) -> None:
    flat = llama()
    flat["model.extra"] = np.zeros(2, np.complex128)
    save_flat(tmp_path / "src.npz", flat)
    loads: list[Any] = []
    monkeypatch.setattr(_convert, "load_flat", lambda *a: loads.append(a))
    with pytest.raises(ValueError, match=r"`model.extra` has dtype complex128"):
        convert_stack(tmp_path / "src.npz", tmp_path / "out.safetensors")
    assert loads == []
