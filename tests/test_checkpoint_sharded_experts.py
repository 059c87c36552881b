"""load_sharded with experts: MoE folders of five model families straight into
`(N_kind, E, ...)` arrays, expert parallelism, and the bytes each process reads."""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from ckptgen import hf_moe, save_shards
from jax.sharding import NamedSharding, Sharding
from jax.sharding import PartitionSpec as P
from processes import free_port, reports, run_processes
from test_checkpoint_sharded import check_loaded, mesh

from stackedtree.checkpoint import (
    convert_stack,
    detect_experts,
    detect_kinds,
    load_flat,
    load_sharded,
    save_flat,
    stack_by_name,
)

PATTERN = "model.layers.{i}."
MODELS = ["deepseek_v3", "qwen3_moe", "mixtral", "qwen3_next", "llama4"]


def expert_parallel(m: Any) -> Any:
    """Experts split over `expert`, layers whole; other tensors split on their last
    dimension over `expert` where it divides, else replicated."""

    def how(name: str, shape: tuple[int, ...], dtype: Any) -> Sharding:
        if "{e}" in name:
            return NamedSharding(m, P(None, "expert"))
        if shape and shape[-1] % m.shape["expert"] == 0:
            return NamedSharding(m, P(*[None] * (len(shape) - 1), "expert"))
        return NamedSharding(m, P())

    return how


@pytest.mark.parametrize("model", MODELS)
def test_moe_folders_load_as_the_command_stacks_them(
    tmp_path: Path, model: str
) -> None:
    folder = tmp_path / model
    folder.mkdir()
    flat = hf_moe(model)
    save_shards(folder, flat, 3)
    stacked = tmp_path / "stacked.safetensors"
    convert_stack(folder, stacked)
    want = load_flat(stacked)
    how = expert_parallel(mesh(4, names=("expert",)))
    got = load_sharded(folder, how, pattern=PATTERN)
    assert list(got) == list(want)
    check_loaded(got, want, how)
    from_stacked = load_sharded(stacked, how)
    assert list(from_stacked) == list(want)
    check_loaded(from_stacked, want, how)
    # Each expert tensor is (N_kind, E, ...), equal to the written-out stack.
    kinds = detect_kinds(flat, PATTERN, experts=detect_experts(flat, PATTERN))
    for name, x in got.items():
        if "{e}" not in name:
            continue
        label = name.split("{i", 1)[1].split("}", 1)[0].lstrip(":")
        layers = kinds[label] if label else list(range(len(kinds["A"])))
        key = name.split("}.", 1)[1]
        assert x.shape[:2] == (len(layers), 4)
        for j, i in enumerate(layers):
            for e in range(4):
                per = flat[PATTERN.format(i=i) + key.replace("{e}", str(e))]
                assert np.array_equal(np.asarray(x[j, e]), per)
    assert any("{e}" in name for name in got) == (model != "llama4")


def test_deepseek_names_and_shapes(tmp_path: Path) -> None:
    save_flat(tmp_path / "m.safetensors", hf_moe("deepseek_v3", experts=8))
    got = load_sharded(
        tmp_path / "m.safetensors",
        expert_parallel(mesh(8, names=("expert",))),
        pattern=PATTERN,
    )
    assert got["model.layers.{i:A}.mlp.up_proj.weight"].shape == (3, 4, 8)
    assert got["model.layers.{i:B}.mlp.experts.{e}.up_proj.weight"].shape == (
        2,
        8,
        4,
        8,
    )
    assert got["model.layers.{i:B}.mlp.gate.e_score_correction_bias"].shape == (2, 8)
    assert got["model.layers.{i:B}.mlp.shared_experts.up_proj.weight"].shape == (
        2,
        4,
        8,
    )
    w = got["model.layers.{i:B}.mlp.experts.{e}.down_proj.weight"]
    assert w.addressable_shards[0].data.shape == (2, 1, 8, 4)


def test_experts_none_and_given(tmp_path: Path) -> None:
    flat = hf_moe("mixtral")
    save_flat(tmp_path / "m.safetensors", flat)
    one = NamedSharding(mesh(1, names=("x",)), P())
    apart = load_sharded(
        tmp_path / "m.safetensors", one, pattern=PATTERN, experts="none"
    )
    stacked, rest = stack_by_name(flat, PATTERN)
    assert (
        list(apart)
        == [n for n in flat if not n.startswith("model.layers.")][:1]
        + [PATTERN + k for k in stacked]
        + list(rest)[1:]
    )
    given = load_sharded(
        tmp_path / "m.safetensors",
        one,
        pattern=PATTERN,
        experts="block_sparse_moe.experts.{e}.",
    )
    assert given["model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"].shape == (
        2,
        4,
        4,
        8,
    )


def test_expert_refusals(tmp_path: Path) -> None:
    save_flat(tmp_path / "m.safetensors", hf_moe("qwen3_moe", experts=3))
    how = expert_parallel(mesh(2, names=("expert",)))
    with pytest.raises(
        ValueError,
        match=r"`model\.layers\.\{i:B\}\.mlp\.experts\.\{e\}\.gate_proj\.weight` has "
        r"shape \(2, 3, 4, 8\): dimension 1 \(the expert axis\) of size 3 is split "
        r"over mesh axes 'expert' of size 2",
    ):
        load_sharded(tmp_path / "m.safetensors", how, pattern=PATTERN)
    one = NamedSharding(mesh(1, names=("x",)), P())
    with pytest.raises(
        ValueError, match=re.escape("`experts` 'mlp.experts.{e}.' needs `pattern`")
    ):
        load_sharded(tmp_path / "m.safetensors", one, experts="mlp.experts.{e}.")
    with pytest.raises(
        ValueError, match=re.escape("'moe.{e}.' matches no per-layer key")
    ):
        load_sharded(
            tmp_path / "m.safetensors", one, pattern=PATTERN, experts="moe.{e}."
        )
    convert_stack(tmp_path / "m.safetensors", tmp_path / "s.safetensors")
    with pytest.raises(
        ValueError,
        match=re.escape("stacked with experts 'mlp.experts.{e}.'; `experts` 'none'"),
    ):
        load_sharded(tmp_path / "s.safetensors", one, experts="none")
    assert len(
        load_sharded(tmp_path / "s.safetensors", one, experts="mlp.experts.{e}.")
    )


# --------------------------------------------------------------------- two processes

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from stackedtree.checkpoint import load_flat, load_sharded

    port, pid, path, split, stacked = sys.argv[1:6]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2,
        process_id=int(pid), initialization_timeout=60,
    )
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    spec = P(None, "x") if split == "experts" else P("x")

    def rchar():
        with open("/proc/self/io") as f:
            return int(f.read().split("rchar:")[1].split()[0])

    def how(name, shape, dtype):
        if split == "experts":
            return NamedSharding(mesh, spec if "{e}" in name else P())
        return NamedSharding(mesh, spec if "{i" in name else P())

    def load():
        return load_sharded(path, how, pattern=None if stacked == "1" else
                            "model.layers.{i}.")

    load()  # so that what jax imports on first use is not counted
    before = rchar()
    got = load()
    read = rchar() - before
    want = load_flat(stacked == "1" and path or sys.argv[6])
    wrong, share = [], 0
    for name, x in got.items():
        seen = set()
        for s in x.addressable_shards:
            if not np.array_equal(np.asarray(s.data), want[name][s.index]):
                wrong.append(name)
            if str(s.index) not in seen:
                seen.add(str(s.index))
                share += s.data.nbytes
    print(json.dumps({"read": read, "share": share, "wrong": wrong}))
    jax.distributed.shutdown()
    """
)


@pytest.mark.parametrize(
    ("split", "stacked"), [("experts", False), ("experts", True), ("layers", False)]
)
def test_two_processes_each_read_their_experts(
    tmp_path: Path, split: str, stacked: bool
) -> None:
    # Qwen3-MoE-like: 8 MoE layers of 8 experts; the experts' bytes dominate.
    rng = np.random.default_rng(3)
    flat = {"model.embed_tokens.weight": rng.normal(size=(16, 16)).astype(np.float32)}
    for i in range(8):
        p = PATTERN.format(i=i)
        flat[p + "mlp.gate.weight"] = rng.normal(size=(8, 16)).astype(np.float32)
        for e in range(8):
            for w in ("gate_proj", "up_proj"):
                flat[p + f"mlp.experts.{e}.{w}.weight"] = rng.normal(
                    size=(64, 16)
                ).astype(np.float32)
    path = tmp_path / "model.safetensors"
    save_flat(path, flat)
    ref = tmp_path / "stacked.safetensors"
    convert_stack(path, ref)
    expert_bytes = sum(v.nbytes for k, v in flat.items() if ".experts." in k)
    other = sum(v.nbytes for v in flat.values()) - expert_bytes
    gate = sum(v.nbytes for k, v in flat.items() if "mlp.gate" in k)

    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    src = ref if stacked else path
    args = [str(port), "PID", str(src), split, "1" if stacked else "0", str(ref)]
    outs = run_processes(
        [
            [sys.executable, "-c", CHILD, *[str(i) if a == "PID" else a for a in args]]
            for i in range(2)
        ],
        env,
        tmp_path,
    )
    results = reports(outs)
    header = path.stat().st_size - expert_bytes - other
    for r in results:
        assert r["wrong"] == []
        if split == "experts":
            # Half the experts; the router and embedding, replicated, in full.
            assert r["share"] == expert_bytes // 2 + other
        else:
            # Half the layers (experts and routers); the embedding in full.
            assert r["share"] == (expert_bytes + gate) // 2 + other - gate
        assert r["share"] <= r["read"] <= 1.05 * r["share"] + header + 8192
        assert r["read"] < 0.6 * path.stat().st_size


def test_jax_sees_eight_devices() -> None:
    assert jax.device_count() == 8
