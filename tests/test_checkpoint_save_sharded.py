"""save_sharded: the bytes of `stackedtree unstack`, Hugging Face folders, round trips
with load_sharded, errors before any write, whole-or-nothing output, two processes."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
from ckptgen import cases, same
from hypothesis import given, settings
from jax.sharding import AxisType, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P
from processes import free_port, reports, run_processes, run_to_end

from stackedtree.checkpoint import _save_sharded as module
from stackedtree.checkpoint import (
    convert_stack,
    convert_unstack,
    load_flat,
    load_sharded,
    save_flat,
    save_sharded,
)
from stackedtree.checkpoint._save_layout import plan_layout, plan_specs, plan_tensors
from stackedtree.checkpoint._save_sharded import own_pieces, write_pieces
from stackedtree.checkpoint._save_target import Target, create
from stackedtree.checkpoint._stacked import stacked_metadata

PATTERN = "model.layers.{i}."
EXPERTS = "mlp.experts.{e}."
BF16 = np.dtype(ml_dtypes.bfloat16)


def mesh(*shape: int, names: tuple[str, ...] = ("data", "fsdp")) -> Any:
    return jax.make_mesh(
        shape, names[: len(shape)], axis_types=(AxisType.Auto,) * len(shape)
    )


def stacked_arrays(
    dtype: Any,
    kinds: dict[str, list[int]] | None = None,
    n: int = 8,
    seed: int = 0,
    experts: int = 0,
) -> dict[str, np.ndarray]:
    """Llama-like stacked arrays in their order: embedding, layers, final norm. With
    `kinds`, kind B's layers hold an extra `mlp.experts` tensor. With `experts`, kind
    B's layers (all layers, without `kinds`) hold that many experts, `{e}` arrays
    `(N, E, ...)`, and between them a shared expert."""
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(dtype)

    out = {"model.embed_tokens.weight": r(16, 8)}
    for label, layers in (kinds or {None: list(range(n))}).items():
        idx = "{i}" if label is None else "{i:" + label + "}"
        m = len(layers)
        out[f"model.layers.{idx}.input_layernorm.weight"] = r(m, 8)
        out[f"model.layers.{idx}.self_attn.q_proj.weight"] = r(m, 8, 8)
        out[f"model.layers.{idx}.mlp.up_proj.weight"] = r(m, 24, 8)
        if label == "B":
            out[f"model.layers.{idx}.mlp.experts.weight"] = r(m, 4, 8)
        if experts and label in ("B", None):
            p = f"model.layers.{idx}.mlp."
            out[p + "experts.{e}.gate_proj.weight"] = r(m, experts, 4, 8)
            out[p + "shared_expert.up_proj.weight"] = r(m, 4, 8)
            out[p + "experts.{e}.down_proj.weight"] = r(m, experts, 8, 4)
    out["model.norm.weight"] = r(8)
    return out


def unstacked_bytes(
    tmp: Path,
    arrays: dict[str, np.ndarray],
    kinds: dict[str, list[int]] | None = None,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """What `stackedtree unstack` writes for a stacked file holding `arrays`."""
    n = sum(map(len, kinds.values())) if kinds else len(arrays[next(_layered(arrays))])
    experts = EXPERTS if any("{e}" in name for name in arrays) else None
    save_flat(
        tmp / "stacked.safetensors",
        arrays,
        metadata=stacked_metadata(PATTERN, n, metadata, kinds, experts),
    )
    convert_unstack(tmp / "stacked.safetensors", tmp / "reference.safetensors")
    return (tmp / "reference.safetensors").read_bytes()


def _layered(arrays: dict[str, Any]) -> Any:
    return (name for name in arrays if "{i" in name)


def layer_axis(m: Any) -> Any:
    return lambda name, shape: NamedSharding(
        m, P(m.axis_names) if "{i" in name else P()
    )


def hidden(m: Any) -> Any:
    """The last dimension split over every device where it divides."""

    def how(name: str, shape: tuple[int, ...]) -> Sharding:
        if shape and shape[-1] % m.size == 0:
            return NamedSharding(m, P(*[None] * (len(shape) - 1), m.axis_names))
        return NamedSharding(m, P())

    return how


def layers_and_columns(m: Any) -> Any:
    def how(name: str, shape: tuple[int, ...]) -> Sharding:
        if "{i" in name:
            return NamedSharding(m, P("data", *[None] * (len(shape) - 2), "fsdp"))
        return NamedSharding(m, P("fsdp") if shape[0] % 4 == 0 else P())

    return how


LAYOUTS = {
    "layer axis": lambda: layer_axis(mesh(8, names=("x",))),
    "hidden": lambda: hidden(mesh(8, names=("x",))),
    "layers and columns, 2 replicas of the rest": lambda: layers_and_columns(
        mesh(2, 4)
    ),
    "replicated": lambda: lambda name, shape: NamedSharding(mesh(8, names=("x",)), P()),
}


def place(arrays: dict[str, np.ndarray], how: Any) -> dict[str, jax.Array]:
    return {n: jax.device_put(x, how(n, x.shape)) for n, x in arrays.items()}


# --------------------------------------------------------------------- the bytes


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [BF16, np.float32])
def test_a_file_is_what_unstack_writes(tmp_path: Path, layout: str, dtype: Any) -> None:
    arrays = stacked_arrays(dtype)
    placed = place(arrays, LAYOUTS[layout]())
    save_sharded(tmp_path / "out.safetensors", placed, metadata={"format": "pt"})
    want = unstacked_bytes(tmp_path, arrays, metadata={"format": "pt"})
    assert (tmp_path / "out.safetensors").read_bytes() == want
    assert sorted(os.listdir(tmp_path)) == [
        "out.safetensors",
        "reference.safetensors",
        "stacked.safetensors",
    ]


@pytest.mark.parametrize("dtype", [BF16, np.float32])
def test_layers_of_several_kinds(tmp_path: Path, dtype: Any) -> None:
    kinds = {"A": [0, 1, 5], "B": [2, 3, 4]}
    arrays = stacked_arrays(dtype, kinds)
    m = mesh(2, 4)

    def how(name: str, shape: tuple[int, ...]) -> Sharding:
        return NamedSharding(m, P(*[None] * (len(shape) - 1), "fsdp"))

    save_sharded(tmp_path / "out.safetensors", place(arrays, how), kinds=kinds)
    assert (tmp_path / "out.safetensors").read_bytes() == unstacked_bytes(
        tmp_path, arrays, kinds
    )
    # Layer 5 is of kind A, its third layer.
    flat = load_flat(tmp_path / "out.safetensors")
    assert "model.layers.5.mlp.experts.weight" not in flat
    assert same(
        flat["model.layers.5.mlp.up_proj.weight"],
        arrays["model.layers.{i:A}.mlp.up_proj.weight"][2],
    )
    assert same(
        flat["model.layers.3.mlp.experts.weight"],
        arrays["model.layers.{i:B}.mlp.experts.weight"][1],
    )


MOE_KINDS = {"uniform": None, "dense and MoE": {"A": [0, 4], "B": [1, 2, 3, 5]}}


def experts_and_layers(m: Any) -> Any:
    """Expert arrays' layers over `data` and experts over `fsdp`; the other
    stacked arrays' layers over `data`; the rest replicated."""

    def how(name: str, shape: tuple[int, ...]) -> Sharding:
        if "{e}" in name:
            return NamedSharding(m, P("data", "fsdp"))
        return NamedSharding(m, P("data") if "{i" in name else P())

    return how


MOE_LAYOUTS = {
    "experts and layers": lambda: experts_and_layers(mesh(2, 4)),
    "hidden": lambda: hidden(mesh(8, names=("x",))),
}


def moe_arrays(dtype: Any, kinds: str) -> dict[str, np.ndarray]:
    """6 layers, dense ones and ones of 4 experts (all of 4 experts when uniform)."""
    return stacked_arrays(dtype, MOE_KINDS[kinds], n=6, seed=1, experts=4)


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
@pytest.mark.parametrize("kinds", list(MOE_KINDS))
@pytest.mark.parametrize("dtype", [BF16, np.float32])
def test_experts_are_written_as_unstack_writes_them(
    tmp_path: Path, layout: str, kinds: str, dtype: Any
) -> None:
    arrays = moe_arrays(dtype, kinds)
    placed = place(arrays, MOE_LAYOUTS[layout]())
    out = tmp_path / "out.safetensors"
    save_sharded(out, placed, kinds=MOE_KINDS[kinds])
    assert out.read_bytes() == unstacked_bytes(tmp_path, arrays, MOE_KINDS[kinds])
    # Layer 3, the third of the MoE layers: its experts expert by expert where its
    # first expert array was, the shared expert after them.
    flat = load_flat(out)
    p = "model.layers.3."
    moe = [
        f"{p}mlp.experts.{e}.{w}_proj.weight"
        for e in range(4)
        for w in ("gate", "down")
    ]
    assert [n for n in flat if n.startswith(p)] == [
        p + "input_layernorm.weight",
        p + "self_attn.q_proj.weight",
        p + "mlp.up_proj.weight",
        *([p + "mlp.experts.weight"] if kinds != "uniform" else []),
        *moe,
        p + "mlp.shared_expert.up_proj.weight",
    ]
    # Layer 3 is index 3 of the uniform stack, 2 of kind B's.
    idx, j = ("{i}", 3) if kinds == "uniform" else ("{i:B}", 2)
    down = arrays[f"model.layers.{idx}.mlp.experts.{{e}}.down_proj.weight"]
    assert same(flat[p + "mlp.experts.2.down_proj.weight"], down[j, 2])
    assert len(flat) == 2 + sum(
        x.shape[0] * (x.shape[1] if "{e}" in n else 1)
        for n, x in arrays.items()
        if "{i" in n
    )


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
@pytest.mark.parametrize("kinds", list(MOE_KINDS))
def test_load_sharded_gives_experts_back(
    tmp_path: Path, layout: str, kinds: str
) -> None:
    arrays = moe_arrays(BF16, kinds)
    how = MOE_LAYOUTS[layout]()
    placed = place(arrays, how)
    save_sharded(
        tmp_path / "model", placed, kinds=MOE_KINDS[kinds], max_shard_size=2000
    )
    got = load_sharded(
        tmp_path / "model",
        lambda name, shape, dtype: how(name, shape),
        pattern=PATTERN,
        experts=EXPERTS,
    )
    assert sorted(got) == sorted(arrays)
    for name, x in got.items():
        assert x.sharding == placed[name].sharding, name
        assert same(np.asarray(x), arrays[name]), name


@settings(max_examples=25, deadline=None)
@given(case=cases(max_layers=3))
def test_any_stacked_file_unstacks_to_the_same_bytes(case: Any) -> None:
    # Random patterns, keys, shapes (empty ones too) and dtypes: the arrays of a
    # stacked file, in its order, save to the bytes `stackedtree unstack` writes.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_flat(folder / "src.safetensors", case.flat, metadata={"a": "b"})
        convert_stack(
            folder / "src.safetensors",
            folder / "stacked.safetensors",
            pattern=case.pattern,
        )
        convert_unstack(folder / "stacked.safetensors", folder / "ref.safetensors")
        arrays = load_flat(folder / "stacked.safetensors")
        save_sharded(folder / "out.safetensors", arrays, metadata={"a": "b"})
        want = (folder / "ref.safetensors").read_bytes()
        assert (folder / "out.safetensors").read_bytes() == want


def test_numpy_arrays_and_names_without_layers(tmp_path: Path) -> None:
    arrays = {"b": np.arange(6, dtype=np.int8).reshape(2, 3), "a": np.float32(2.5)}
    save_sharded(tmp_path / "out.safetensors", arrays)
    save_flat(tmp_path / "flat.safetensors", arrays)
    got = (tmp_path / "out.safetensors").read_bytes()
    assert got == (tmp_path / "flat.safetensors").read_bytes()


@pytest.mark.parametrize("experts", [0, 3])
@pytest.mark.parametrize(
    ("min_run", "chunk_bytes"), [(0, 1 << 22), (1 << 62, 1 << 22), (1 << 62, 100)]
)
def test_blocks_are_written_strided_or_by_rows_alike(
    tmp_path: Path,
    min_run: int,
    chunk_bytes: int,
    experts: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Columns split 8 ways: strided, each 4-byte run is one write; by rows, the
    # blocks are joined into rows of the whole tensor (of one expert), each chunk
    # one write.
    arrays = stacked_arrays(np.float32)
    if experts:
        w = np.arange(8 * experts * 16, dtype=np.float32).reshape(8, experts, 2, 8)
        arrays[PATTERN + EXPERTS + "w"] = w
    placed = place(arrays, LAYOUTS["hidden"]())
    specs = plan_specs(placed)
    layout = plan_layout(
        plan_tensors(specs, None), False, "out.safetensors", 1 << 40, None
    )
    target = Target(tmp_path / "out.safetensors", False, tmp_path / "out.safetensors")
    create(target, layout)
    writes = []
    real = module._pwrite

    def pwrite(fd: int, data: np.ndarray, offset: int) -> None:
        writes.append(data.nbytes)
        real(fd, data, offset)

    monkeypatch.setattr(module, "_pwrite", pwrite)
    pieces = own_pieces(placed, 0, 1)
    write_pieces(
        target.files(layout),
        layout,
        placed,
        pieces,
        min_run=min_run,
        chunk_bytes=chunk_bytes,
    )
    assert (tmp_path / "out.safetensors").read_bytes() == unstacked_bytes(
        tmp_path, arrays
    )
    data = sum(x.nbytes for x in arrays.values())
    assert sum(writes) == data
    if min_run == 0:
        # Every last dimension is 8, split 8 ways: one write per float32.
        assert writes == [4] * (data // 4)
    elif chunk_bytes > data:
        # Per layer, each tensor (each expert's) in one write; the embedding and
        # norm in one.
        assert len(writes) == (3 + experts) * 8 + 2
    else:
        assert max(writes) <= 100 and len(writes) > data // 100


# --------------------------------------------------------------------- folders


@pytest.mark.parametrize("kinds", [None, *MOE_KINDS])
def test_a_folder_is_a_hugging_face_sharded_checkpoint(
    tmp_path: Path, kinds: str | None
) -> None:
    safetensors = pytest.importorskip("safetensors")
    # Without `kinds` dense layers; else layers of experts, of one kind or two.
    arrays = (
        stacked_arrays(np.float32) if kinds is None else moe_arrays(np.float32, kinds)
    )
    layers = None if kinds is None else MOE_KINDS[kinds]
    placed = place(arrays, LAYOUTS["hidden"]())
    folder = tmp_path / "model"
    save_sharded(
        folder, placed, kinds=layers, max_shard_size=1000, metadata={"format": "pt"}
    )
    unstacked_bytes(tmp_path, arrays, layers, metadata={"format": "pt"})
    want = load_flat(tmp_path / "reference.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    n = len(files)
    assert n > 3
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert index["metadata"] == {"total_size": sum(x.nbytes for x in want.values())}
    assert index["weight_map"] == {
        name: f for f in files for name in load_flat(folder / f)
    }
    got = load_flat(folder)
    assert sorted(got) == sorted(want)
    # The shards hold the tensors in unstack's order.
    assert [name for f in files for name in load_flat(folder / f)] == list(want)
    for name, x in want.items():
        assert same(got[name], x), name
    for f in files:
        part = load_flat(folder / f)
        assert sum(x.nbytes for x in part.values()) <= 1000
        # Each shard is the file save_flat writes for its tensors.
        save_flat(tmp_path / "one.safetensors", part, metadata={"format": "pt"})
        assert (folder / f).read_bytes() == (tmp_path / "one.safetensors").read_bytes()
        (tmp_path / "one.safetensors").unlink()
        with safetensors.safe_open(folder / f, framework="numpy") as st:
            assert st.metadata() == {"format": "pt"}
            for name in st.keys():
                assert np.array_equal(st.get_tensor(name), want[name]), name
    # Hugging Face cuts a new shard when the next tensor would overflow: no two
    # consecutive shards fit in one.
    sizes = [sum(x.nbytes for x in load_flat(folder / f).values()) for f in files]
    first = [next(iter(load_flat(folder / f).values())).nbytes for f in files]
    assert all(sizes[k] + first[k + 1] > 1000 for k in range(n - 1))


def test_default_and_string_shard_sizes(tmp_path: Path) -> None:
    arrays = stacked_arrays(np.float32)
    save_sharded(tmp_path / "one", arrays)
    assert sorted(os.listdir(tmp_path / "one")) == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    save_sharded(tmp_path / "kb", arrays, max_shard_size="1KB")
    save_sharded(tmp_path / "bytes", arrays, max_shard_size=1000)
    assert sorted(os.listdir(tmp_path / "kb")) == sorted(os.listdir(tmp_path / "bytes"))


# --------------------------------------------------------------------- round trips


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [BF16, np.float32])
def test_load_sharded_gives_the_arrays_back(
    tmp_path: Path, layout: str, dtype: Any
) -> None:
    arrays = stacked_arrays(dtype)
    how = LAYOUTS[layout]()
    placed = place(arrays, how)
    save_sharded(tmp_path / "model", placed, max_shard_size=2000)
    got = load_sharded(
        tmp_path / "model",
        lambda name, shape, dtype: how(name, shape),
        pattern=PATTERN,
    )
    assert list(got) == list(arrays)
    for name, x in got.items():
        assert x.sharding == placed[name].sharding, name
        assert same(np.asarray(x), arrays[name]), name


def test_load_sharded_gives_several_kinds_back(tmp_path: Path) -> None:
    kinds = {"A": [0, 1], "B": [2, 3, 4, 5]}
    arrays = stacked_arrays(BF16, kinds)
    how = hidden(mesh(8, names=("x",)))
    placed = place(arrays, how)
    save_sharded(tmp_path / "out.safetensors", placed, kinds=kinds)
    convert_stack(tmp_path / "out.safetensors", tmp_path / "stacked.safetensors")
    got = load_sharded(
        tmp_path / "stacked.safetensors", lambda name, shape, dtype: how(name, shape)
    )
    assert sorted(got) == sorted(arrays)
    for name, x in got.items():
        assert x.sharding == placed[name].sharding, name
        assert same(np.asarray(x), arrays[name]), name


def test_saving_what_load_sharded_loaded_gives_the_folder_back(tmp_path: Path) -> None:
    # A per-layer checkpoint in Hugging Face's layer-major order, in 3 shards.
    per_layer = load_flat(
        _write(tmp_path, stacked_arrays(BF16, seed=3)) / "reference.safetensors"
    )
    names = list(per_layer)
    folder = tmp_path / "hf"
    folder.mkdir()
    weight_map = {}
    for k, part in enumerate((names[:10], names[10:20], names[20:])):
        f = f"model-{k + 1:05d}-of-00003.safetensors"
        save_flat(folder / f, {n: per_layer[n] for n in part})
        weight_map |= dict.fromkeys(part, f)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    how = layers_and_columns(mesh(2, 4))
    loaded = load_sharded(folder, lambda n, s, d: how(n, s), pattern=PATTERN)
    save_sharded(tmp_path / "again.safetensors", loaded)
    again = load_flat(tmp_path / "again.safetensors")
    assert list(again) == names
    for name in names:
        assert same(again[name], per_layer[name]), name
    assert (tmp_path / "again.safetensors").read_bytes() == (
        tmp_path / "reference.safetensors"
    ).read_bytes()


def _write(tmp: Path, arrays: dict[str, np.ndarray]) -> Path:
    unstacked_bytes(tmp, arrays)
    return tmp


# --------------------------------------------------------------------- errors


def nothing_written(folder: Path, before: list[str]) -> None:
    assert sorted(os.listdir(folder)) == sorted(before)


def test_bad_input_is_refused_before_any_write(tmp_path: Path) -> None:
    arrays = stacked_arrays(np.float32)
    out = tmp_path / "out.safetensors"
    bad = dict(arrays)
    bad["model.layers.{i}.mlp.up_proj.weight"] = np.zeros((7, 24, 8), np.float32)
    with pytest.raises(
        ValueError,
        match=r"`model\.layers\.\{i\}\.mlp\.up_proj\.weight` has shape \(7, 24, 8\), "
        r"but the other stacked arrays hold 8 layers",
    ):
        save_sharded(out, bad)
    clash = arrays | {"model.layers.3.input_layernorm.weight": np.zeros(8, np.float32)}
    with pytest.raises(
        ValueError,
        match=r"unstack to the same per-layer name:\n"
        r"  `model\.layers\.3\.input_layernorm\.weight` comes from "
        r"`model\.layers\.\{i\}\.input_layernorm\.weight`\[3\]",
    ):
        save_sharded(out, clash)
    with pytest.raises(
        ValueError,
        match=r"`max_shard_size` \(500 bytes\) is smaller than a tensor:\n"
        r"  `model\.embed_tokens\.weight` float32\[16, 8\] holds 512 bytes",
    ):
        save_sharded(tmp_path / "model", arrays, max_shard_size=500)
    with pytest.raises(ValueError, match="give a folder, or leave `max_shard_size`"):
        save_sharded(out, arrays, max_shard_size="1GB")
    with pytest.raises(ValueError, match="a size such as '5GB'"):
        save_sharded(tmp_path / "model", arrays, max_shard_size="5 parsecs")
    with pytest.raises(TypeError, match=r"`arrays\['w'\]` must be a jax or numpy"):
        save_sharded(out, {"w": [1.0]})
    with pytest.raises(ValueError, match="would mark a per-layer file as stacked"):
        save_sharded(out, arrays, metadata={"stackedtree.pattern": "h.{i}."})
    nothing_written(tmp_path, [])


def test_kinds_are_required_and_checked(tmp_path: Path) -> None:
    kinds = {"A": [0, 1], "B": [2, 3, 4, 5]}
    arrays = stacked_arrays(np.float32, kinds)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match=r"kind-labelled stacked names .*pass `kinds`"):
        save_sharded(out, arrays)
    with pytest.raises(
        ValueError,
        match=r"`model\.layers\.\{i:B\}\.mlp\.experts\.weight` has shape \(4, 4, 8\), "
        r"but kind B holds 3 layers",
    ):
        save_sharded(out, arrays, kinds={"A": [0, 1, 2], "B": [3, 4, 5]})
    with pytest.raises(ValueError, match=r"`arrays` has \['A', 'B'\], `kinds` \['A'"):
        save_sharded(out, arrays, kinds={"A": [0, 1], "C": [2, 3, 4, 5]})
    with pytest.raises(ValueError, match=r"must hold the layers 0\.\.N-1.*0-1, 3-6"):
        save_sharded(out, arrays, kinds={"A": [0, 1], "B": [3, 4, 5, 6]})
    with pytest.raises(ValueError, match=r"mixes uniform stacked names"):
        save_sharded(
            out, arrays | {"model.layers.{i}.x": np.zeros((6, 2))}, kinds=kinds
        )
    with pytest.raises(ValueError, match=r"several layer patterns"):
        save_sharded(
            tmp_path / "o.safetensors",
            {"a.{i}.w": np.zeros((2, 1)), "b.{i}.w": np.zeros((2, 1))},
        )
    nothing_written(tmp_path, [])
    # A uniform stack with `kinds` of one kind, as detect_kinds gives it, is fine.
    uniform = stacked_arrays(np.float32)
    save_sharded(out, uniform, kinds={"A": list(range(8))})
    assert out.read_bytes() == unstacked_bytes(tmp_path, uniform)


def test_bad_expert_arrays_are_refused_before_any_write(tmp_path: Path) -> None:
    kinds = MOE_KINDS["dense and MoE"]
    arrays = moe_arrays(np.float32, "dense and MoE")
    out = tmp_path / "out.safetensors"
    gate = "model.layers.{i:B}.mlp.experts.{e}.gate_proj.weight"

    def refused(changed: dict[str, np.ndarray], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            save_sharded(out, arrays | changed, kinds=kinds)

    refused(
        {gate: np.zeros(4, np.float32)},
        r"an expert array \(`\{e\}`\) is \(layers, experts, \.\.\.\) with experts >= 1: "
        r"`model\.layers\.\{i:B\}\.mlp\.experts\.\{e\}\.gate_proj\.weight` has "
        r"shape \(4,\)",
    )
    refused({gate: np.zeros((4, 0, 2), np.float32)}, r"has shape \(4, 0, 2\)")
    refused(
        {gate: np.zeros((4, 3, 4, 8), np.float32)},
        r"the expert arrays of kind B must hold the same number of experts:\n"
        r"  `model\.layers\.\{i:B\}\.mlp\.experts\.\{e\}\.gate_proj\.weight` holds 3\n"
        r"  `model\.layers\.\{i:B\}\.mlp\.experts\.\{e\}\.down_proj\.weight` holds 4",
    )
    refused(
        {"mlp.experts.{e}.w": np.zeros((4, 2), np.float32)},
        r"expert names \(`\{e\}`\) that are not stacked names: "
        r"`mlp\.experts\.\{e\}\.w` has `\{e\}` but no `\{i\}`",
    )
    for name in ("x.{e}.model.layers.{i:B}.w", "model.layers.{i:B}.{e}.w.{e}"):
        refused(
            {name: np.zeros((4, 4), np.float32)},
            rf"`{re.escape(name)}` has `\{{e\}}` other than once after `\{{i\}}`",
        )
    refused(
        {"model.layers.{i:B}.mlp.shared.{e}.w": np.zeros((4, 4), np.float32)},
        r"several expert patterns; a checkpoint has one:\n"
        r"  'model\.layers\.\{i\}\.mlp\.experts\.\{e\}'\n"
        r"  'model\.layers\.\{i\}\.mlp\.shared\.\{e\}'",
    )
    # Kind B's layer 3 is index 2 of its layer axis.
    refused(
        {"model.layers.3.mlp.experts.1.gate_proj.weight": np.zeros(1, np.float32)},
        r"unstack to the same per-layer name:\n"
        r"  `model\.layers\.3\.mlp\.experts\.1\.gate_proj\.weight` comes from "
        r"`model\.layers\.\{i:B\}\.mlp\.experts\.\{e\}\.gate_proj\.weight`"
        r"\[2\]\[1\]",
    )
    nothing_written(tmp_path, [])
    # Kinds may hold different numbers of experts, as a stacked file's may.
    other = {"model.layers.{i:A}.mlp.experts.{e}.w": np.ones((2, 3, 2), np.float32)}
    save_sharded(out, arrays | other, kinds=kinds)
    assert out.read_bytes() == unstacked_bytes(tmp_path, arrays | other, kinds)


def test_an_existing_target_is_refused_unless_overwrite(tmp_path: Path) -> None:
    arrays = stacked_arrays(np.float32)
    (tmp_path / "out.safetensors").write_bytes(b"old")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"out\.safetensors` already exists"):
        save_sharded(tmp_path / "out.safetensors", arrays)
    with pytest.raises(FileExistsError, match=r"model` already exists"):
        save_sharded(tmp_path / "model", arrays)
    assert (tmp_path / "out.safetensors").read_bytes() == b"old"
    nothing_written(tmp_path, ["out.safetensors", "model"])
    save_sharded(tmp_path / "out.safetensors", arrays, overwrite=True)
    save_sharded(tmp_path / "model", arrays, overwrite=True)
    assert sorted(os.listdir(tmp_path / "model")) == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    nothing_written(tmp_path, ["out.safetensors", "model"])
    want = load_flat(tmp_path / "out.safetensors")
    assert list(load_flat(tmp_path / "model")) == list(want)


@pytest.mark.parametrize("target", ["out.safetensors", "model"])
def test_a_failed_write_leaves_nothing(
    tmp_path: Path, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = module._pwrite

    def pwrite(fd: int, data: np.ndarray, offset: int) -> None:
        calls.append(offset)
        if len(calls) == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(module, "_pwrite", pwrite)
    placed = place(stacked_arrays(BF16), LAYOUTS["layer axis"]())
    with pytest.raises(OSError, match="No space left on device"):
        save_sharded(tmp_path / target, placed)
    assert len(calls) == 6
    nothing_written(tmp_path, [])


@pytest.mark.parametrize("target", ["out.safetensors", "model"])
def test_the_same_call_replaces_what_a_terminated_run_left(
    tmp_path: Path, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run terminated before its cleanup (as jax's runtime may do when process 0
    # dies) leaves its hidden temporary output, named after the call's arguments.
    def killed(fd: int, data: np.ndarray, offset: int) -> None:
        raise KeyboardInterrupt

    arrays = stacked_arrays(np.float32)
    monkeypatch.setattr(module, "_pwrite", killed)
    monkeypatch.setattr(module, "discard", lambda target: None)
    with pytest.raises(KeyboardInterrupt):
        save_sharded(tmp_path / target, arrays)
    (left,) = os.listdir(tmp_path)
    assert re.fullmatch(rf"\.{re.escape(target)}\.[0-9a-f]{{16}}\.tmp", left), left
    monkeypatch.undo()
    save_sharded(tmp_path / target, arrays)
    assert os.listdir(tmp_path) == [target]
    flat = load_flat(tmp_path / target)
    assert len(flat) == 2 + 3 * 8
    assert np.array_equal(
        flat["model.layers.3.mlp.up_proj.weight"],
        arrays[PATTERN + "mlp.up_proj.weight"][3],
    )


# --------------------------------------------------------------------- two processes

CHILD = textwrap.dedent(
    """
    import json, os, sys, errno
    import jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from stackedtree.checkpoint import save_sharded
    from stackedtree.checkpoint import _save_sharded as module

    port, pid, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
        initialization_timeout=60,
    )
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)
    arrays = {"model.embed_tokens.weight": rng.normal(size=(64, 64))}
    for key, shape in (("self_attn.q_proj.weight", (64, 64)),
                       ("mlp.up_proj.weight", (256, 64)),
                       ("mlp.experts.{e}.gate_proj.weight", (8, 32, 64)),
                       ("mlp.experts.{e}.down_proj.weight", (8, 64, 32))):
        arrays["model.layers.{i}." + key] = rng.normal(size=(8, *shape))
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    specs = {
        "layer": lambda n, s: P("x") if "{i}" in n else P(),
        "hidden": lambda n, s: P(*[None] * (len(s) - 1), "x"),
        "replicated": lambda n, s: P(),
        # Expert parallelism: each process holds 4 of the 8 experts.
        "experts": lambda n, s: P(None, "x") if "{e}" in n else P(),
    }

    def wchar():
        with open("/proc/self/io") as f:
            return int(f.read().split("wchar:")[1].split()[0])

    out = {}
    for layout, spec in specs.items():
        placed = {
            n: jax.make_array_from_callback(
                x.shape, NamedSharding(mesh, spec(n, x.shape)), lambda i, x=x: x[i]
            )
            for n, x in arrays.items()
        }
        before = wchar()
        save_sharded(os.path.join(folder, layout + ".safetensors"), placed, timeout=60)
        out[layout] = wchar() - before

    real = module._pwrite
    if pid == 1:
        def pwrite(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")
        module._pwrite = pwrite
    try:
        save_sharded(os.path.join(folder, "failed"), placed, timeout=60)
        out["failed"] = None
    except Exception as e:
        out["failed"] = [type(e).__name__, str(e)]
    module._pwrite = real
    differ = {"w": np.zeros(4, np.float32 if pid == 0 else np.float16)}
    try:
        save_sharded(os.path.join(folder, "differ.safetensors"), differ, timeout=60)
        out["differ"] = None
    except Exception as e:
        out["differ"] = [type(e).__name__, str(e)]
    print(json.dumps(out))
    jax.distributed.shutdown()
    """
)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("two")
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    (folder / "out").mkdir()
    outs = run_processes(
        [
            [sys.executable, "-c", CHILD, str(port), str(i), str(folder / "out")]
            for i in range(2)
        ],
        env,
        folder,
        timeout=240,
    )
    return folder, reports(outs)


def test_two_processes_each_write_their_share(two_processes: Any) -> None:
    folder, results = two_processes
    rng = np.random.default_rng(0)
    arrays = {"model.embed_tokens.weight": rng.normal(size=(64, 64))}
    for key, shape in (
        ("self_attn.q_proj.weight", (64, 64)),
        ("mlp.up_proj.weight", (256, 64)),
        ("mlp.experts.{e}.gate_proj.weight", (8, 32, 64)),
        ("mlp.experts.{e}.down_proj.weight", (8, 64, 32)),
    ):
        arrays[PATTERN + key] = rng.normal(size=(8, *shape))
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    want = unstacked_bytes(folder, arrays)
    data = sum(x.nbytes for x in arrays.values())
    header = len(want) - data
    for layout in ("layer", "hidden", "replicated", "experts"):
        assert (folder / "out" / f"{layout}.safetensors").read_bytes() == want, layout
        # Each process writes half the tensor bytes (its experts' in `experts`; the
        # replicated arrays, and in `replicated` everything, cut in two), process 0
        # the header too.
        for pid, r in enumerate(results):
            extra = header if pid == 0 else 0
            assert data // 2 + extra <= r[layout] <= data // 2 + extra + 4096, (
                layout,
                pid,
            )


def test_a_failure_in_one_process_fails_both_and_leaves_nothing(
    two_processes: Any,
) -> None:
    folder, results = two_processes
    assert results[1]["failed"] == ["OSError", "[Errno 28] No space left on device"]
    name, text = results[0]["failed"]
    assert name == "OSError" and text.startswith("process 1: ")
    assert "No space left on device" in text
    assert sorted(os.listdir(folder / "out")) == [
        "experts.safetensors",
        "hidden.safetensors",
        "layer.safetensors",
        "replicated.safetensors",
    ]


def test_arrays_that_differ_between_processes_fail_in_both(
    two_processes: Any,
) -> None:
    folder, results = two_processes
    for pid, r in enumerate(results):
        name, text = r["differ"]
        assert name == "ValueError" and "same arguments in every process" in text
        mine, theirs = (32, 16) if pid == 0 else (16, 32)
        assert f"`w` is float{mine}[4] here but float{theirs}[4] in process" in text
    assert not (folder / "out" / "differ.safetensors").exists()


KILLED_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from stackedtree.checkpoint import save_sharded
    from stackedtree.checkpoint import _save_sharded as module

    port, pid, folder, victim = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
        initialization_timeout=60,
    )
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    x = np.arange(8 * 64, dtype=np.float32).reshape(8, 64)
    placed = {
        "model.layers.{i}.w": jax.make_array_from_callback(
            x.shape, NamedSharding(mesh, P("x")), lambda i: x[i]
        )
    }
    if pid == victim:
        def pwrite(fd, data, offset):
            os._exit(9)  # killed in the middle of the write phase
        module._pwrite = pwrite
    try:
        save_sharded(os.path.join(folder, "killed"), placed, timeout=5)
        out = None
    except Exception as e:
        out = [type(e).__name__, str(e)]
    print(json.dumps(out), flush=True)
    # Not jax.distributed.shutdown(): its barrier would wait for the dead process
    # until jax's heartbeat timeout, then abort.
    os._exit(0)
    """
)


def run_with_one_killed(folder: Path, victim: int) -> list[tuple[int, str, str]]:
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    (folder / "out").mkdir()
    out = str(folder / "out")
    return run_to_end(
        [
            [sys.executable, "-c", KILLED_CHILD, str(port), str(i), out, str(victim)]
            for i in range(2)
        ],
        env,
        folder,
        timeout=120,
    )


def test_a_killed_process_1_fails_process_0_in_time_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    (code0, out0, _), (code1, _, _) = run_with_one_killed(tmp_path, victim=1)
    assert code1 == 9
    # Process 0 raises once `timeout` passes without process 1's report (jax's own
    # heartbeat timeout, 100 s by default, comes much later), and removes the output.
    assert code0 == 0, out0
    name, text = json.loads(out0.strip().splitlines()[-1])
    assert name == "TimeoutError"
    assert text.startswith("process 1 did not write its part within 5 s")
    assert os.listdir(tmp_path / "out") == []


def test_a_killed_process_0_ends_process_1_at_once(tmp_path: Path) -> None:
    (code0, _, _), (code1, out1, err1) = run_with_one_killed(tmp_path, victim=0)
    assert code0 == 9
    # Process 0 runs jax's coordination service. Process 1 either raises a clear
    # error at once and removes the temporary output, or jax's runtime terminates
    # it first (SIGABRT), which may leave the hidden temporary output, never the
    # target.
    left = os.listdir(tmp_path / "out")
    if code1 == 0:
        name, text = json.loads(out1.strip().splitlines()[-1])
        assert name == "ConnectionError", text
        assert "jax.distributed coordination service" in text
        assert left == []
    else:
        assert code1 == -signal.SIGABRT, err1[-2000:]
        assert "JAX distributed service detected fatal errors" in err1
        assert all(re.fullmatch(r"\.killed\.[0-9a-f]{16}\.tmp", n) for n in left), left
    # The same call made again replaces what the killed run left.
    x = np.arange(8 * 64, dtype=np.float32).reshape(8, 64)
    save_sharded(os.path.join(tmp_path / "out", "killed"), {PATTERN + "w": x})
    assert os.listdir(tmp_path / "out") == ["killed"]
    assert np.array_equal(
        load_flat(tmp_path / "out" / "killed")["model.layers.3.w"], x[3]
    )
