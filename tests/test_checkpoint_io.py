"""load_flat / save_flat: formats, shards, bit-exact round trips, atomic writes, bad files."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from ckptgen import DTYPES, assert_same_flat, cases, same, unwritable_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from stackedtree.checkpoint import _npz, load_flat, save_flat
from stackedtree.checkpoint._io import read_checkpoint

FLAT = {
    "embed": np.arange(12, dtype=np.float32).reshape(3, 4),
    "layers.0.w": np.asarray([1.5, np.nan, -0.0], ml_dtypes.bfloat16),
    "layers.1.w": np.asarray([2, 3, 4], ml_dtypes.bfloat16),
    "scalar": np.asarray(7, np.int64),
    "empty": np.zeros((0, 3), np.uint8),
}


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_keeps_bits_order_and_dtype(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ckpt{suffix}"
    save_flat(path, FLAT, metadata={"format": "np"})
    back = load_flat(path)
    assert list(back) == list(FLAT)
    assert_same_flat(back, FLAT)
    assert read_checkpoint(path).metadata == {"format": "np"}
    assert files_in(tmp_path) == [path.name]


@settings(max_examples=25, deadline=None)
@given(case=cases(max_layers=2), suffix=st.sampled_from([".safetensors", ".npz"]))
def test_save_load_round_trip_is_bit_exact(case: Any, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"c{suffix}"
        save_flat(path, case.flat)
        assert_same_flat(load_flat(path), case.flat)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips(tmp_path: Path, dtype: np.dtype) -> None:
    raw = np.random.default_rng(0).integers(0, 256, 6 * dtype.itemsize, np.uint8)
    arr = (
        raw.view(dtype).reshape(2, 3)
        if dtype != np.bool_
        else raw[:6].reshape(2, 3) > 9
    )
    for suffix in (".safetensors", ".npz"):
        save_flat(tmp_path / f"x{suffix}", {"x": arr})
        assert same(load_flat(tmp_path / f"x{suffix}")["x"], arr)


def test_jax_arrays_and_non_contiguous_arrays_are_saved(tmp_path: Path) -> None:
    flat = {"j": jnp.arange(4, dtype=jnp.bfloat16), "t": np.arange(6.0).reshape(2, 3).T}
    save_flat(tmp_path / "a.safetensors", flat)
    back = load_flat(tmp_path / "a.safetensors")
    assert same(back["j"], np.asarray(flat["j"])) and same(
        back["t"], np.ascontiguousarray(flat["t"])
    )


def test_interoperates_with_the_safetensors_package(tmp_path: Path) -> None:
    theirs = {
        "a": np.arange(6, dtype=np.float16).reshape(2, 3),
        "b": np.ones(2, np.int32),
    }
    safetensors.numpy.save_file(theirs, tmp_path / "theirs.safetensors", {"k": "v"})
    assert_same_flat(load_flat(tmp_path / "theirs.safetensors"), theirs)
    save_flat(tmp_path / "ours.safetensors", theirs, metadata={"k": "v"})
    assert_same_flat(safetensors.numpy.load_file(tmp_path / "ours.safetensors"), theirs)


def test_shards_and_index(tmp_path: Path) -> None:
    save_flat(tmp_path / "m-1.safetensors", {"a": FLAT["embed"], "b": FLAT["scalar"]})
    save_flat(tmp_path / "m-2.safetensors", {"c": FLAT["layers.0.w"]})
    want = {"a": FLAT["embed"], "b": FLAT["scalar"], "c": FLAT["layers.0.w"]}
    assert_same_flat(
        load_flat([tmp_path / "m-1.safetensors", tmp_path / "m-2.safetensors"]), want
    )
    index = tmp_path / "m.safetensors.index.json"
    weight_map = {
        "a": "m-1.safetensors",
        "b": "m-1.safetensors",
        "c": "m-2.safetensors",
    }
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_flat(load_flat(index), want)
    assert_same_flat(load_flat(str(index)), want)


# -------------------------------------------------------------------------- bad files


def test_duplicate_names_across_shards(tmp_path: Path) -> None:
    save_flat(tmp_path / "1.safetensors", {"a": FLAT["embed"]})
    save_flat(tmp_path / "2.npz", {"a": FLAT["embed"]})
    with pytest.raises(
        ValueError, match=r"tensor `a` is in both `.*1\.safetensors` and `.*2\.npz`"
    ):
        load_flat([tmp_path / "1.safetensors", tmp_path / "2.npz"])


def test_index_naming_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    save_flat(tmp_path / "1.safetensors", {"a": FLAT["embed"]})
    index = tmp_path / "x.safetensors.index.json"
    index.write_text(
        json.dumps({"weight_map": {"a": "1.safetensors", "z": "1.safetensors"}})
    )
    with pytest.raises(
        ValueError, match=r"lists tensor `z` in `.*1\.safetensors`, which lacks it"
    ):
        load_flat(index)
    index.write_text(json.dumps({"weights": {}}))
    with pytest.raises(ValueError, match="is not a valid safetensors index"):
        load_flat(index)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_flat(tmp_path / "nope.safetensors")
    with pytest.raises(
        ValueError, match=r"unknown checkpoint format; expected a \.safetensors"
    ):
        load_flat(tmp_path / "model.bin")
    with pytest.raises(ValueError, match="no checkpoint files given"):
        load_flat([])


def _valid(tmp_path: Path) -> bytes:
    save_flat(tmp_path / "good.safetensors", {"a": np.arange(8, dtype=np.float32)})
    return (tmp_path / "good.safetensors").read_bytes()


def _header(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _with_header(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (
            lambda d: d[:-5],
            r"the header describes 32 bytes of tensor data but the file holds 27 \(truncated\)",
        ),
        (lambda d: d + b"x", r"trailing bytes"),
        (lambda d: d[:5], "fewer than the 8-byte header size"),
        (lambda d: d[:40], "exceeds the file's"),
        (lambda d: struct.pack("<Q", 4) + b"{{{{", "unreadable JSON header"),
        (lambda d: struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (
            lambda d: _with_header(
                {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"x"
            ),
            'tensor `a` has dtype "F4", which stackedtree does not read',
        ),
        (
            lambda d: _with_header(
                {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)
            ),
            r"tensor `a` \(float32\[3\]\) needs 12 bytes but its data_offsets \[0, 8\] span 8",
        ),
        (
            lambda d: _with_header(
                {
                    "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                    "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
                },
                bytes(6),
            ),
            "tensor `b` overlaps",
        ),
        (
            lambda d: _with_header(
                {"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b""
            ),
            "tensor `a` has a malformed entry",
        ),
        (
            lambda d: _with_header({"__metadata__": {"a": 1}}, b""),
            "`__metadata__` must map strings to strings",
        ),
    ],
)
def test_corrupt_safetensors_is_a_clear_value_error(
    tmp_path: Path, corrupt: Any, match: str
) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(corrupt(_valid(tmp_path)))
    with pytest.raises(
        ValueError,
        match=r"`.*bad\.safetensors` is not a valid safetensors file: .*" + match,
    ):
        load_flat(bad)


def test_corrupt_npz_is_a_clear_value_error(tmp_path: Path) -> None:
    save_flat(tmp_path / "good.npz", FLAT)
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"`.*bad\.npz` is not a valid \.npz archive"):
        load_flat(tmp_path / "bad.npz")


class _Boom:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    arr = np.empty(1, dtype=object)
    arr[0] = _Boom(str(marker))
    np.savez(tmp_path / "evil.npz", good=np.ones(2), evil=arr)
    with pytest.raises(
        ValueError, match=r"array `evil` holds Python objects.*never unpickles"
    ):
        load_flat(tmp_path / "evil.npz")
    assert not marker.exists()


def test_pickled_metadata_entry_is_refused_without_unpickling(tmp_path: Path) -> None:
    # The archive's own metadata member is read by the npz reader before any tensor
    # check: the reader itself must refuse the pickle.
    marker = tmp_path / "unpickled"
    meta = np.empty(1, dtype=object)
    meta[0] = _Boom(str(marker))
    np.savez(tmp_path / "evil.npz", w=np.ones(2), __stackedtree__=meta)
    for read in (load_flat, read_checkpoint):
        with pytest.raises(ValueError, match=r"`__stackedtree__` holds Python objects"):
            read(tmp_path / "evil.npz")
    assert not marker.exists()


def test_npz_member_reader_refuses_pickles_itself(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    arr = np.empty(1, dtype=object)
    arr[0] = _Boom(str(marker))
    np.savez(tmp_path / "evil.npz", evil=arr)
    with (
        zipfile.ZipFile(tmp_path / "evil.npz") as zf,
        pytest.raises(ValueError, match="never unpickles"),
    ):
        _npz.read_member(tmp_path / "evil.npz", zf, "evil.npy", "evil")
    assert not marker.exists()


def test_numpy_is_told_never_to_unpickle(tmp_path: Path, monkeypatch: Any) -> None:
    # With the header check fooled, numpy's `allow_pickle=False` is the last guard.
    marker = tmp_path / "unpickled"
    arr = np.empty(1, dtype=object)
    arr[0] = _Boom(str(marker))
    np.savez(tmp_path / "evil.npz", evil=arr)
    real = _npz.npy_header

    def fooled(f: Any) -> tuple[Any, np.dtype, int]:
        shape, _, size = real(f)
        return shape, np.dtype(np.uint8), size

    monkeypatch.setattr(_npz, "npy_header", fooled)
    with (
        zipfile.ZipFile(tmp_path / "evil.npz") as zf,
        pytest.raises(ValueError, match="allow_pickle=False"),
    ):
        _npz.read_member(tmp_path / "evil.npz", zf, "evil.npy", "evil")
    assert not marker.exists()


def test_npz_that_is_a_plain_npy_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones(2))
    os.rename(tmp_path / "a.npy", tmp_path / "a.npz")
    with pytest.raises(ValueError, match=r"is not a valid \.npz archive"):
        load_flat(tmp_path / "a.npz")


# ---------------------------------------------------------------------------- writing


def test_existing_path_is_refused_unless_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_flat(path, {"a": np.zeros(1)})
    with pytest.raises(
        FileExistsError, match=r"already exists; pass overwrite=True \(--force\)"
    ):
        save_flat(path, {"b": np.zeros(1)})
    assert list(load_flat(path)) == ["a"]
    save_flat(path, {"b": np.zeros(1)}, overwrite=True)
    assert list(load_flat(path)) == ["b"]
    assert files_in(tmp_path) == ["a.safetensors"]


def test_unwritable_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"folder `.*nope` does not exist"):
        save_flat(tmp_path / "nope" / "a.safetensors", {"a": np.zeros(1)})
    folder = unwritable_dir(tmp_path)
    with pytest.raises(PermissionError, match=r"permission denied in folder"):
        save_flat(Path(folder) / "a.safetensors", {"a": np.zeros(1)})
    assert not (Path(folder) / "a.safetensors").exists()
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_flat(tmp_path / "dir.safetensors", {"a": np.zeros(1)})


class _FailsMidway:
    """Looks like an array but fails when its data is read: a failure while writing."""

    shape = (2,)
    dtype = np.dtype(np.float32)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise RuntimeError("device lost")


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_failure_while_writing_leaves_no_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"a{suffix}"
    with pytest.raises(RuntimeError, match="device lost"):
        save_flat(path, {"a": np.ones(1000), "b": _FailsMidway()})
    assert files_in(tmp_path) == []
    save_flat(path, {"a": np.ones(1)})
    with pytest.raises(RuntimeError, match="device lost"):
        save_flat(path, {"b": _FailsMidway()}, overwrite=True)
    assert list(load_flat(path)) == ["a"] and files_in(tmp_path) == [path.name]


def test_bad_values_names_and_dtypes(tmp_path: Path) -> None:
    with pytest.raises(
        TypeError, match=r"tensor `a` must be a numpy or jax array, got list"
    ):
        save_flat(tmp_path / "a.safetensors", {"a": [1, 2]})
    with pytest.raises(
        ValueError, match=r"`b` has dtype complex128, which safetensors cannot store"
    ):
        save_flat(tmp_path / "a.safetensors", {"b": np.zeros(2, np.complex128)})
    with pytest.raises(ValueError, match=r"`__metadata__` is reserved"):
        save_flat(tmp_path / "a.safetensors", {"__metadata__": np.zeros(2)})
    with pytest.raises(TypeError, match="`metadata` must map str to str"):
        save_flat(tmp_path / "a.safetensors", {"a": np.zeros(2)}, metadata={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(
        ValueError,
        match=r"`c` has dtype object, which cannot be saved without pickling",
    ):
        save_flat(tmp_path / "a.npz", {"c": np.asarray([None])})
    with pytest.raises(
        ValueError, match=r"unknown output format; name a \.safetensors"
    ):
        save_flat(tmp_path / "a.pt", {"a": np.zeros(2)})
    assert files_in(tmp_path) == []
    save_flat(tmp_path / "a.npz", {"b": np.zeros(2, np.complex128)})  # npz stores it


def test_npz_bfloat16_stored_big_endian_loads_its_values(tmp_path: Path) -> None:
    # An ml_dtypes array is stored as unsigned ints; another writer may have stored
    # them big-endian, and the bits must be read in that order.
    values = np.array([1, 2, -3.5], ml_dtypes.bfloat16)
    meta = json.dumps({"dtypes": {"w": "bfloat16"}, "metadata": {}})
    with zipfile.ZipFile(tmp_path / "be.npz", "w") as zf:
        with zf.open("w.npy", "w") as m:
            np.lib.format.write_array(m, values.view(np.uint16).astype(">u2"))
        with zf.open("__stackedtree__.npy", "w") as m:
            np.lib.format.write_array(m, np.asarray(meta))
    got = load_flat(tmp_path / "be.npz")["w"]
    assert got.dtype == values.dtype
    np.testing.assert_array_equal(got.astype(np.float32), values.astype(np.float32))


def test_safetensors_entry_must_be_an_object_not_a_list_of_pairs(
    tmp_path: Path,
) -> None:
    entry = [["dtype", "F32"], ["shape", [2]], ["data_offsets", [0, 8]]]
    header = json.dumps({"w": entry}).encode()
    header += b" " * (-len(header) % 8)
    data = np.array([1, 2], np.float32).tobytes()
    path = tmp_path / "pairs.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    with pytest.raises(ValueError, match=r"tensor `w` has a malformed entry: expected"):
        load_flat(path)
