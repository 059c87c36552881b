"""load_sharded: values, placement, the byte ranges read, errors, and two processes."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
from ckptgen import deepseek, same, save_shards
from jax.sharding import AxisType, Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P
from processes import free_port, reports, run_processes

from stackedtree import layer_shardings
from stackedtree.checkpoint import (
    _sharded,
    convert_stack,
    load_flat,
    load_sharded,
    load_stacked,
    save_flat,
    save_stacked,
    stack_by_name,
)
from stackedtree.checkpoint._io import read_checkpoint
from stackedtree.checkpoint._layer_pattern import LayerPattern
from stackedtree.checkpoint._sharded import ReadOptions, load_with
from stackedtree.cli import main

PATTERN = "model.layers.{i}."
N = 8


def per_layer(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """A small HF-Llama-like per-layer checkpoint in three dtypes."""
    rng = np.random.default_rng(seed)
    flat = {"model.embed_tokens.weight": rng.normal(size=(16, 8)).astype(np.float32)}
    for i in range(n):
        p = PATTERN.format(i=i)
        flat[p + "input_layernorm.weight"] = rng.normal(size=8).astype(np.float32)
        flat[p + "self_attn.q_proj.weight"] = rng.normal(size=(8, 8)).astype(
            ml_dtypes.bfloat16
        )
        flat[p + "mlp.up_proj.weight"] = rng.normal(size=(24, 8)).astype(
            ml_dtypes.bfloat16
        )
        flat[p + "mlp.down_proj.weight"] = rng.integers(-9, 9, (8, 24), np.int8)
    flat["model.norm.weight"] = rng.normal(size=8).astype(np.float32)
    return flat


def expected(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    stacked, rest = stack_by_name(flat, PATTERN)
    return {PATTERN + k: v for k, v in stacked.items()} | rest


def mesh(*shape: int, names: tuple[str, ...] = ("data", "fsdp")) -> Any:
    return jax.make_mesh(
        shape, names[: len(shape)], axis_types=(AxisType.Auto,) * len(shape)
    )


def check_loaded(
    got: dict[str, jax.Array], want: dict[str, np.ndarray], how: Any
) -> None:
    """Every array equals `want` bit for bit, with `how(name, shape, dtype)`'s sharding,
    and every device's shard holds its block."""
    assert sorted(got) == sorted(want)
    for name, x in got.items():
        assert x.shape == want[name].shape and x.dtype == want[name].dtype, name
        assert x.sharding == how(name, want[name].shape, want[name].dtype), name
        for shard in x.addressable_shards:
            block = np.asarray(want[name][shard.index])
            assert same(np.asarray(shard.data), block), name


def fsdp(m: Any) -> Any:
    """The layer axis whole, the last dimension split over `fsdp` where it divides."""

    def how(name: str, shape: tuple[int, ...], dtype: Any) -> Sharding:
        if shape and shape[-1] % m.shape["fsdp"] == 0:
            return NamedSharding(m, P(*[None] * (len(shape) - 1), "fsdp"))
        return NamedSharding(m, P())

    return how


def rows_fsdp(m: Any) -> Any:
    def how(name: str, shape: tuple[int, ...], dtype: Any) -> Sharding:
        lead = 1 if "{i}" in name else 0
        if len(shape) > lead and shape[lead] % m.shape["fsdp"] == 0:
            return NamedSharding(m, P(*[None] * lead, "fsdp"))
        return NamedSharding(m, P())

    return how


def layer_axis(m: Any, axes: Any = ("data", "fsdp")) -> Any:
    def how(name: str, shape: tuple[int, ...], dtype: Any) -> Sharding:
        return NamedSharding(m, P(axes) if "{i}" in name else P())

    return how


def replicated(m: Any) -> Any:
    return lambda name, shape, dtype: NamedSharding(m, P())


LAYOUTS = {
    "layer axis over 8": lambda: layer_axis(mesh(8, names=("fsdp",)), "fsdp"),
    "layer axis over 2x4": lambda: layer_axis(mesh(2, 4)),
    "columns, 2 replicas": lambda: fsdp(mesh(2, 4)),
    "rows, 2 replicas": lambda: rows_fsdp(mesh(2, 4)),
    "layers and columns": lambda: _layers_and_columns(mesh(2, 4)),
    "replicated": lambda: replicated(mesh(8, names=("fsdp",))),
}


def _layers_and_columns(m: Any) -> Any:
    def how(name: str, shape: tuple[int, ...], dtype: Any) -> Sharding:
        if "{i}" in name:
            return NamedSharding(m, P("data", *[None] * (len(shape) - 2), "fsdp"))
        return NamedSharding(m, P())

    return how


# --------------------------------------------------------------------- values


@pytest.fixture(scope="module")
def ckpt(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("ckpt")
    flat = per_layer()
    save_flat(folder / "model.safetensors", flat)
    return folder / "model.safetensors", flat


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    ("strided_min_run", "rows_on_device"),
    [(0, None), (1 << 62, False), (1 << 62, True)],
)
def test_loads_stacked_arrays_with_their_shardings(
    ckpt: Any,
    layout: str,
    strided_min_run: int,
    rows_on_device: bool | None,
) -> None:
    # Both ways of reading split rows: strided, and rows handed out by columns (joined
    # on the host, or on the devices as on an accelerator).
    options = ReadOptions(
        strided_min_run=strided_min_run, rows_on_device=rows_on_device
    )
    path, flat = ckpt
    how = LAYOUTS[layout]()
    check_loaded(load_with(path, how, options, pattern=PATTERN), expected(flat), how)


def test_shards_index_and_npz(tmp_path: Path) -> None:
    flat = per_layer(4)
    names = list(flat)
    save_flat(tmp_path / "a.safetensors", {k: flat[k] for k in names[::2]})
    save_flat(tmp_path / "b.safetensors", {k: flat[k] for k in names[1::2]})
    index = {
        "weight_map": {k: "ab"[j % 2] + ".safetensors" for j, k in enumerate(names)}
    }
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    save_flat(tmp_path / "m.npz", flat)
    np.savez_compressed(
        tmp_path / "z.npz",
        **{k: v for k, v in flat.items() if v.dtype != ml_dtypes.bfloat16},
    )
    how = fsdp(mesh(2, 4))
    want = expected(flat)
    for paths in (
        [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
        tmp_path / "m.safetensors.index.json",
        tmp_path / "m.npz",
    ):
        check_loaded(load_sharded(paths, how, pattern=PATTERN), want, how)
    plain = {k: v for k, v in flat.items() if v.dtype != ml_dtypes.bfloat16}
    got = load_sharded(tmp_path / "z.npz", how, pattern=PATTERN)
    check_loaded(got, expected(plain), how)


def test_without_a_pattern_tensors_keep_their_names(ckpt: Any) -> None:
    path, flat = ckpt
    how = replicated(mesh(8, names=("fsdp",)))
    got = load_sharded(path, how)
    check_loaded(got, flat, how)
    assert list(got) == list(flat)


def test_stacked_arrays_come_where_layer_0_was(ckpt: Any) -> None:
    path, _ = ckpt
    got = load_sharded(path, replicated(mesh(8, names=("fsdp",))), pattern=PATTERN)
    assert list(got) == [
        "model.embed_tokens.weight",
        PATTERN + "input_layernorm.weight",
        PATTERN + "self_attn.q_proj.weight",
        PATTERN + "mlp.up_proj.weight",
        PATTERN + "mlp.down_proj.weight",
        "model.norm.weight",
    ]


def test_stacked_checkpoint_loads_as_stored(tmp_path: Path) -> None:
    flat = per_layer()
    stacked, rest = stack_by_name(flat, PATTERN)
    save_stacked(tmp_path / "s.safetensors", stacked, PATTERN, rest)
    how = _layers_and_columns(mesh(2, 4))
    want = expected(flat)
    check_loaded(load_sharded(tmp_path / "s.safetensors", how), want, how)
    got = load_sharded(tmp_path / "s.safetensors", how, pattern=PATTERN)
    check_loaded(got, want, how)
    with pytest.raises(
        ValueError, match=re.escape("stacked with pattern 'model.layers.{i}.'")
    ):
        load_sharded(tmp_path / "s.safetensors", how, pattern="layers.{i}.")
    three = Mesh(np.asarray(jax.devices()[:3]), ("x",), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError) as e:
        load_sharded(tmp_path / "s.safetensors", NamedSharding(three, P("x")))
    assert (
        "`model.layers.{i}.mlp.up_proj.weight` has shape (8, 24, 8): dimension 0 "
        "(the layer axis) of size 8"
    ) in str(e.value)
    assert "`model.norm.weight` has shape (8,): dimension 0 of size 8" in str(e.value)


def test_one_sharding_a_mapping_and_layer_shardings(ckpt: Any) -> None:
    path, flat = ckpt
    m = mesh(8, names=("fsdp",))
    one = NamedSharding(m, P())
    check_loaded(
        load_sharded(path, one, pattern=PATTERN), expected(flat), lambda *_: one
    )

    specs = {
        "input_layernorm.weight": P("fsdp"),
        "self_attn.q_proj.weight": P(None, "fsdp"),
        "mlp.up_proj.weight": P("fsdp"),
        "mlp.down_proj.weight": P(None, "fsdp"),
    }
    mapping = {PATTERN + k: s for k, s in layer_shardings(m, specs).items()}
    mapping |= {n: one for n in ("model.embed_tokens.weight", "model.norm.weight")}
    got = load_sharded(path, mapping, pattern=PATTERN)
    check_loaded(got, expected(flat), lambda name, *_: mapping[name])
    assert got[PATTERN + "mlp.up_proj.weight"].addressable_shards[0].data.shape == (
        8,
        3,
        8,
    )


def test_callable_sees_stacked_names_shapes_and_dtypes(ckpt: Any) -> None:
    path, _ = ckpt
    seen = {}
    one = NamedSharding(mesh(8, names=("fsdp",)), P())

    def how(name: str, shape: tuple[int, ...], dtype: np.dtype) -> Sharding:
        seen[name] = (shape, dtype)
        return one

    load_sharded(path, how, pattern=PATTERN)
    assert seen[PATTERN + "mlp.up_proj.weight"] == (
        (N, 24, 8),
        np.dtype(ml_dtypes.bfloat16),
    )
    assert seen["model.norm.weight"] == ((8,), np.dtype(np.float32))


@pytest.mark.parametrize("rows_on_device", [False, True])
def test_every_dtype_empty_and_0d_tensors(tmp_path: Path, rows_on_device: bool) -> None:
    dtypes = [
        np.bool_,
        np.uint8,
        np.int16,
        np.float16,
        ml_dtypes.bfloat16,
        np.float32,
        np.complex64,
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
    ]
    rng = np.random.default_rng(1)
    flat = {}
    for j, dtype in enumerate(map(np.dtype, dtypes)):
        raw = rng.integers(0, 256, 2 * 4 * 8 * dtype.itemsize, np.uint8)
        arr = raw.view(dtype) if dtype != np.bool_ else raw > 128
        for i in range(2):
            flat[f"h.{i}.t{j}"] = arr[i * 32 : (i + 1) * 32].reshape(4, 8)
    flat["h.0.empty"] = flat["h.1.empty"] = np.zeros((0, 8), np.float32)
    flat["scalar"] = np.asarray(3, np.int32)
    save_flat(tmp_path / "d.safetensors", flat)
    how = fsdp(mesh(2, 4))
    options = ReadOptions(rows_on_device=rows_on_device)
    got = load_with(tmp_path / "d.safetensors", how, options, pattern="h.{i}.")
    stacked, rest = stack_by_name(flat, "h.{i}.")
    check_loaded(got, {"h.{i}." + k: v for k, v in stacked.items()} | rest, how)


# --------------------------------------------------------------------- what is read


def spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records `(offset, nbytes)` of every positioned read of `load_sharded`."""
    reads: list[tuple[int, int]] = []
    real = _sharded.read_into

    def read_into(f: Any, offset: int, out: np.ndarray) -> None:
        reads.append((offset, out.nbytes))
        real(f, offset, out)

    monkeypatch.setattr(_sharded, "read_into", read_into)
    return reads


def ranges_of(path: Path, names: Any) -> list[tuple[int, int]]:
    tensors = read_checkpoint(path).tensors
    return sorted((tensors[n].offset, tensors[n].nbytes) for n in names)


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent ranges joined; overlapping ones are an error."""
    out: list[list[int]] = []
    for start, n in sorted(ranges):
        if n == 0:
            continue
        assert not out or start >= out[-1][1], "a byte was read twice"
        if out and start == out[-1][1]:
            out[-1][1] = start + n
        else:
            out.append([start, start + n])
    return [(a, b) for a, b in out]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    ("strided_min_run", "workers", "rows_on_device"),
    [(0, 1, None), (1 << 62, 3, False), (1 << 62, 3, True)],
)
def test_each_byte_is_read_once(
    ckpt: Any,
    layout: str,
    strided_min_run: int,
    workers: int,
    rows_on_device: bool | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = ReadOptions(
        strided_min_run=strided_min_run,
        rows_on_device=rows_on_device,
        workers=workers,
        chunk_bytes=256,  # many chunks and pieces
    )
    path, flat = ckpt
    reads = spy_reads(monkeypatch)
    load_with(path, LAYOUTS[layout](), options, pattern=PATTERN)
    assert merged(reads) == merged(ranges_of(path, flat))


def test_rows_joined_on_devices_are_read_a_block_at_a_time(
    ckpt: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on an accelerator: host memory for rows read whole stays about one block.
    options = ReadOptions(strided_min_run=1 << 62, rows_on_device=True)
    real = _sharded._read_by_rows
    calls: list[tuple[Any, int]] = []

    def spy(reader: Any, src: Any, boxes: Any) -> Any:
        size = sum(int(np.prod([b - a for a, b in box])) for box in boxes)
        calls.append((src, size))
        return real(reader, src, boxes)

    monkeypatch.setattr(_sharded, "_read_by_rows", spy)
    path, flat = ckpt
    how = fsdp(mesh(2, 4))  # last dimensions split 4 ways: 4 distinct blocks each
    got = load_with(path, how, options, pattern=PATTERN)
    check_loaded(got, expected(flat), how)
    assert calls
    read: dict[Any, int] = {}
    for src, size in calls:
        first, rest = src.shape[0], int(np.prod(src.shape[1:]))
        assert size <= -(-first // 4) * rest, (src.shape, size)  # one block's rows
        read[src.shape] = read.get(src.shape, 0) + size
    assert all(total == int(np.prod(shape)) for shape, total in read.items())


def test_a_failed_read_is_raised(ckpt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = ckpt
    options = ReadOptions(workers=3, chunk_bytes=256)
    real = _sharded.read_into

    def read_into(f: Any, offset: int, out: np.ndarray) -> None:
        if offset > path.stat().st_size // 2:
            raise OSError("disk gone")
        real(f, offset, out)

    monkeypatch.setattr(_sharded, "read_into", read_into)
    for how in (replicated(mesh(8, names=("fsdp",))), fsdp(mesh(2, 4))):
        with pytest.raises(OSError, match="disk gone"):
            load_with(path, how, options, pattern=PATTERN)


def test_a_block_reads_exactly_its_layers(
    ckpt: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One device's block: layers 4-7 of up_proj (a 2-device layer split).
    path, _ = ckpt
    reads = spy_reads(monkeypatch)
    src = _sharded.plan_sources(read_checkpoint(path), PATTERN)[
        PATTERN + "mlp.up_proj.weight"
    ]
    box = ((4, 8), (0, 24), (0, 8))
    out = np.empty((4, 24, 8), ml_dtypes.bfloat16)
    with _sharded.Reader() as reader:
        _sharded.read_block(reader, src, box, out)
    layers = [PATTERN.format(i=i) + "mlp.up_proj.weight" for i in range(4, 8)]
    assert sorted(reads) == ranges_of(path, layers)


def test_reads_go_through_positioned_reads_into_aligned_buffers(
    ckpt: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = ckpt
    pointers = []
    real = _sharded.read_into

    def read_into(f: Any, offset: int, out: np.ndarray) -> None:
        assert isinstance(f, io.FileIO)  # unbuffered: positioned reads, no read-ahead
        pointers.append(out.ctypes.data)
        real(f, offset, out)

    monkeypatch.setattr(_sharded, "read_into", read_into)
    got = load_sharded(
        path, layer_axis(mesh(8, names=("fsdp",)), "fsdp"), pattern=PATTERN
    )
    # A layer-axis block's first read lands at the start of its 64-byte aligned buffer,
    # which the CPU client then uses as the device buffer without copying.
    shard = got[PATTERN + "mlp.up_proj.weight"].addressable_shards[3]
    assert shard.data.unsafe_buffer_pointer() in pointers
    assert shard.data.unsafe_buffer_pointer() % 64 == 0


# --------------------------------------------------------------------- errors


def test_bad_shardings_are_one_error(ckpt: Any) -> None:
    path, _ = ckpt
    m = mesh(8, names=("fsdp",))
    three = Mesh(np.asarray(jax.devices()[:3]), ("x",), axis_types=(AxisType.Auto,))
    ok = NamedSharding(m, P())
    mapping = {
        "model.embed_tokens.weight": NamedSharding(m, P(None, "fsdp")),
        "model.norm.weight": ok,
        PATTERN + "input_layernorm.weight": ok,
        PATTERN + "self_attn.q_proj.weight": NamedSharding(m, P(None, None, "fsdp")),
        PATTERN + "mlp.up_proj.weight": NamedSharding(three, P(None, None, "x")),
        "mlp.down_proj.weight": ok,
        "lm_head.weight": ok,
    }
    with pytest.raises(ValueError) as e:
        load_sharded(path, mapping, pattern=PATTERN)
    assert str(e.value) == (
        "`shardings` does not fit the checkpoint:\n"
        "  `mlp.down_proj.weight` is in `shardings` but not in the checkpoint (did "
        "you mean `model.layers.{i}.mlp.down_proj.weight`?)\n"
        "  `lm_head.weight` is in `shardings` but not in the checkpoint\n"
        "  `model.layers.{i}.mlp.up_proj.weight` has shape (8, 24, 8): dimension 2 "
        "of size 8 is split over mesh axes 'x' of size 3 (3 parts), which does not "
        "divide it\n"
        "  checkpoint tensor `model.layers.{i}.mlp.down_proj.weight` int8[8, 8, 24] "
        "has no sharding in `shardings`"
    )

    two_d = NamedSharding(mesh(2, 4), P("data", "fsdp"))
    with pytest.raises(ValueError) as e:
        load_sharded(
            path, lambda name, *_: two_d if "norm" in name else ok, pattern=PATTERN
        )
    assert str(e.value) == (
        "`shardings` does not fit the checkpoint: `model.norm.weight` has shape (8,), "
        "fewer dimensions than the 2 entries of its spec P('data', 'fsdp')."
    )
    with pytest.raises(ValueError, match=r"dimension 0 \(the layer axis\) of size 8"):
        load_sharded(path, NamedSharding(three, P("x")), pattern=PATTERN)


def test_missing_names_hint_at_the_pattern(ckpt: Any) -> None:
    path, flat = ckpt
    one = NamedSharding(mesh(8, names=("fsdp",)), P())
    mapping = dict.fromkeys(expected(flat), one)
    with pytest.raises(
        ValueError, match="pass `pattern` to stack the per-layer tensors"
    ):
        load_sharded(path, mapping)


def test_64_bit_tensors_need_x64(tmp_path: Path) -> None:
    save_flat(
        tmp_path / "w.safetensors", {"w": np.zeros(8), "i": np.zeros(8, np.int64)}
    )
    one = NamedSharding(mesh(8, names=("fsdp",)), P())
    with pytest.raises(
        ValueError, match=r"(?s)`w` has dtype float64.*`i` has dtype int64"
    ):
        load_sharded(tmp_path / "w.safetensors", one)


def test_type_errors(ckpt: Any) -> None:
    path, _ = ckpt
    with pytest.raises(
        TypeError, match=r"`shardings` must be a jax\.sharding\.Sharding"
    ):
        load_sharded(path, P())  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"gives `model.norm.weight` P\(\), not a .*Sharding: wrap it",
    ):
        load_sharded(path, lambda *_: P(), pattern=PATTERN)  # type: ignore[arg-type,return-value]


def test_bad_checkpoints_as_for_load_flat(ckpt: Any, tmp_path: Path) -> None:
    path, flat = ckpt
    one = NamedSharding(mesh(8, names=("fsdp",)), P())
    with pytest.raises(FileNotFoundError):
        load_sharded(tmp_path / "missing.safetensors", one)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_sharded(truncated, one)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_sharded(tmp_path / "x.bin", one)
    with pytest.raises(ValueError, match="matches no tensor name"):
        load_sharded(path, one, pattern="blocks.{i}.")
    # As in `stack_by_name`: stacking one kind of layers, layer 3 lacking a key is
    # refused. `load_sharded` stacks as `stackedtree stack` does, so layer 3 is a
    # kind of its own there (tested with the kinds below); missing layers and a
    # tensor whose shape differs within its kind are refused.
    del flat[PATTERN.format(i=3) + "mlp.up_proj.weight"]
    with pytest.raises(
        ValueError, match=r"layer 3 is missing keys 'mlp\.up_proj\.weight'"
    ):
        stack_by_name(flat, PATTERN)
    for key in [k for k in flat if k.startswith(PATTERN.format(i=3))]:
        del flat[key]
    save_flat(tmp_path / "gap.safetensors", flat)
    with pytest.raises(ValueError, match=r"missing layers 3; found layers 0-2, 4-7"):
        load_sharded(tmp_path / "gap.safetensors", one, pattern=PATTERN)
    flat = per_layer()
    flat[PATTERN.format(i=5) + "input_layernorm.weight"] = np.zeros(9, np.float32)
    save_flat(tmp_path / "odd.safetensors", flat)
    with pytest.raises(ValueError, match=r"input_layernorm.weight` has shape \(9,\)"):
        load_sharded(tmp_path / "odd.safetensors", one, pattern=PATTERN)


def test_a_stacked_file_of_several_kinds_loads_per_kind(tmp_path: Path) -> None:
    # Dense layers 0-1, then "MoE" layers 2-4 holding other keys: `stackedtree stack`
    # stacks each kind under its own names, and load_sharded loads them as stored.
    rng = np.random.default_rng(0)
    flat = {"embed": rng.normal(size=(6, 8)).astype(np.float32)}
    for i in range(5):
        keys = ("norm", "mlp") if i < 2 else ("norm", "experts")
        for key in keys:
            flat[f"h.{i}.{key}"] = rng.normal(size=(8, 4)).astype(np.float32)
    save_flat(tmp_path / "per_layer.safetensors", flat)
    convert_stack(tmp_path / "per_layer.safetensors", tmp_path / "stacked.safetensors")
    stacked, rest, pattern, layers = load_stacked(tmp_path / "stacked.safetensors")
    assert layers == {"A": [0, 1], "B": [2, 3, 4]}
    want = {
        LayerPattern.parse(pattern).stacked_name(key, label): x
        for label, kind in stacked.items()
        for key, x in kind.items()
    }
    want.update(rest)

    def how(name: str, shape: tuple[int, ...], dtype: Any) -> Sharding:
        return NamedSharding(
            mesh(2, names=("x",)), P(None, "x") if len(shape) == 3 else P()
        )

    got = load_sharded(tmp_path / "stacked.safetensors", how)
    assert "h.{i:B}.experts" in got and got["h.{i:B}.experts"].shape == (3, 8, 4)
    check_loaded(got, want, how)


@pytest.mark.parametrize("files", [1, 3])
def test_a_per_layer_folder_of_two_kinds_loads_as_the_command_stacks_it(
    tmp_path: Path, files: int
) -> None:
    # DeepSeek-V3/Llama 4-like: dense layers, then MoE layers holding other keys.
    # `load_sharded(pattern=...)` stacks it on the fly exactly as `stackedtree stack`
    # writes it: the same names (`{i:A}`, `{i:B}`), order, shapes, dtypes and bits.
    folder = tmp_path / "model"
    folder.mkdir()
    flat = deepseek(dense=2, moe=3)
    if files == 1:
        save_flat(folder / "model.safetensors", flat)
    else:
        save_shards(folder, flat, files)
    stacked = tmp_path / "stacked.safetensors"
    assert main(["stack", str(folder), "-o", str(stacked), "--quiet"]) == 0
    want = load_flat(stacked)
    assert "model.layers.{i:B}.mlp.gate.weight" in want

    def how(name: str, shape: tuple[int, ...], dtype: Any) -> Sharding:
        spec = P("x") if "{i" in name and shape[0] % 2 == 0 else P(None, "x")
        return NamedSharding(mesh(2, names=("x",)), spec if shape[1:] else P())

    got = load_sharded(folder, how, pattern=PATTERN)
    assert list(got) == list(want)
    check_loaded(got, want, how)
    from_stacked = load_sharded(stacked, how)
    assert list(from_stacked) == list(want)
    check_loaded(from_stacked, want, how)


# --------------------------------------------------------------------- two processes

CHILD = textwrap.dedent(
    """
    import json, os, sys
    import jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from stackedtree.checkpoint import load_flat, load_sharded, stack_by_name

    port, pid, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
        initialization_timeout=60,
    )
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = jax.make_mesh((8,), ("layers",), axis_types=(AxisType.Auto,))

    def rchar():
        with open("/proc/self/io") as f:
            return int(f.read().split("rchar:")[1].split()[0])

    def load():
        return load_sharded(
            path,
            lambda name, shape, dtype: NamedSharding(
                mesh, P("layers") if "{i}" in name else P()
            ),
            pattern="model.layers.{i}.",
        )

    load()  # so that what jax imports on first use is not counted
    before = rchar()
    got = load()
    read = rchar() - before
    flat = load_flat(path)
    stacked, rest = stack_by_name(flat, "model.layers.{i}.")
    want = {"model.layers.{i}." + k: v for k, v in stacked.items()} | rest
    wrong, share = [], 0
    for name, x in got.items():
        assert x.shape == want[name].shape and x.is_fully_addressable is False
        seen = set()
        for s in x.addressable_shards:
            if not np.array_equal(np.asarray(s.data), want[name][s.index]):
                wrong.append(name)
            key = str(s.index)
            if key not in seen:
                seen.add(key)
                share += s.data.nbytes
    print(json.dumps({"read": read, "share": share, "wrong": wrong}))
    jax.distributed.shutdown()
    """
)


def test_two_processes_each_read_their_half(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    flat = {"model.embed_tokens.weight": rng.normal(size=(64, 64)).astype(np.float32)}
    for i in range(8):
        p = PATTERN.format(i=i)
        flat[p + "self_attn.q_proj.weight"] = rng.normal(size=(64, 64)).astype(
            np.float32
        )
        flat[p + "mlp.up_proj.weight"] = rng.normal(size=(256, 64)).astype(np.float32)
    path = tmp_path / "model.safetensors"
    save_flat(path, flat)
    layer_bytes = sum(v.nbytes for k, v in flat.items() if "layers" in k)
    embed = flat["model.embed_tokens.weight"].nbytes

    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    outs = run_processes(
        [[sys.executable, "-c", CHILD, str(port), str(i), str(path)] for i in range(2)],
        env,
        tmp_path,
    )
    results = reports(outs)
    header = path.stat().st_size - layer_bytes - embed
    for r in results:
        assert r["wrong"] == []
        # Half the layers, and the replicated embedding in full.
        assert r["share"] == layer_bytes // 2 + embed
        assert r["share"] <= r["read"] <= 1.05 * r["share"] + header + 8192
        assert r["read"] < 0.6 * path.stat().st_size


# --------------------------------------------------------------------- the example


def test_sharded_llama_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import sharded_llama

    sharded_llama.main()
    out = capsys.readouterr().out
    assert "model.layers.{i}.mlp.up_proj.weight" in out
    assert "on each of 8" in out
    assert "after one jitted SGD step" in out
