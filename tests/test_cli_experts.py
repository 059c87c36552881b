"""The command with experts: `stack` detects and records them, `unstack` gives the file
back byte for byte, `inspect` shows one expert; damaged files, `--kinds`, and paths."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from ckptgen import assert_same_flat, run_command, save_shards
from test_checkpoint_experts import moe

from stackedtree.checkpoint import (
    convert_stack,
    convert_unstack,
    inspect_checkpoint,
    load_flat,
    load_stacked,
    save_flat,
    stack_by_name,
)
from stackedtree.checkpoint._io import read_checkpoint
from stackedtree.cli import main

P = "model.layers.{i}."
EP = "mlp.experts.{e}."


def test_stack_detects_records_and_unstack_gives_the_file_back(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    flat = moe(n=5, e=3, dense=2)
    save_flat(src, flat, metadata={"format": "pt"})
    out = tmp_path / "stacked.safetensors"
    r = run_command("stack", str(src), "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"wrote {out}: 12 tensors, 1.9 KiB, 5 layers by pattern 'model.layers.{{i}}.' "
        "in 2 kinds: A (0-1), B (2-4), experts by 'mlp.experts.{e}.'"
    )
    assert read_checkpoint(out).metadata == {
        "format": "pt",
        "stackedtree.pattern": P,
        "stackedtree.num_layers": "5",
        "stackedtree.kinds": '{"A":[0,1],"B":[2,3,4]}',
        "stackedtree.experts": EP,
    }
    got = load_flat(out)
    w = got["model.layers.{i:B}.mlp.experts.{e}.gate_proj.weight"]
    assert w.shape == (3, 3, 3, 4)
    assert np.array_equal(
        w[1, 2], flat["model.layers.3.mlp.experts.2.gate_proj.weight"]
    )
    # Exactly stack_by_name with kinds and experts.
    stacked, rest, *_ = load_stacked(out)
    want, want_rest = stack_by_name(
        flat, P, layers={"A": [0, 1], "B": [2, 3, 4]}, experts=EP
    )
    for label in want:
        assert_same_flat(stacked[label], want[label])
    assert_same_flat(rest, want_rest)
    back = tmp_path / "back.safetensors"
    r = run_command("unstack", str(out), "-o", str(back), "-q")
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_through_npz(tmp_path: Path, fmt: str, capsys: Any) -> None:
    flat = moe(n=3, e=2)
    save_flat(tmp_path / f"a.{fmt}", flat)
    assert (
        main(["stack", str(tmp_path / f"a.{fmt}"), "-o", str(tmp_path / "s.npz")]) == 0
    )
    assert "experts by 'mlp.experts.{e}.'" in capsys.readouterr().out
    assert load_flat(tmp_path / "s.npz")[
        "model.layers.{i}.mlp.experts.{e}.up_proj.weight"
    ].shape == (3, 2, 3, 4)
    assert (
        main(["unstack", str(tmp_path / "s.npz"), "-o", str(tmp_path / f"u.{fmt}")])
        == 0
    )
    assert list(load_flat(tmp_path / f"u.{fmt}")) == list(flat)
    assert_same_flat(load_flat(tmp_path / f"u.{fmt}"), flat)


def test_experts_none_keeps_experts_apart(tmp_path: Path) -> None:
    save_flat(tmp_path / "a.safetensors", moe(n=2, e=2))
    done = convert_stack(
        tmp_path / "a.safetensors", tmp_path / "s.safetensors", experts="none"
    )
    assert done.experts is None
    meta = read_checkpoint(tmp_path / "s.safetensors").metadata
    assert "stackedtree.experts" not in meta
    names = list(load_flat(tmp_path / "s.safetensors"))
    assert "model.layers.{i}.mlp.experts.1.up_proj.weight" in names
    r = run_command(
        "stack",
        str(tmp_path / "a.safetensors"),
        "-o",
        str(tmp_path / "t.safetensors"),
        "--experts",
        "none",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.safetensors").read_bytes() == (
        tmp_path / "s.safetensors"
    ).read_bytes()


def _expert_free() -> dict[str, np.ndarray]:
    """Two kinds, fused experts, no expert index (the golden file below)."""
    flat = {"model.embed_tokens.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}
    for i in range(4):
        p = f"model.layers.{i}."
        flat[p + "input_layernorm.weight"] = np.full(4, i, ml_dtypes.bfloat16)
        if i < 2:
            flat[p + "mlp.up_proj.weight"] = (
                np.arange(8, dtype=np.int16).reshape(2, 4) + i
            )
        else:
            flat[p + "mlp.router.weight"] = np.arange(4, dtype=np.float16) * i
            flat[p + "mlp.experts.gate_up_proj"] = (
                np.arange(24, dtype=np.float32).reshape(2, 3, 4) - i
            )
    flat["lm_head.weight"] = np.ones((3, 4), np.float64)
    return flat


# The sha256 of what `stack` wrote for `_expert_free()` before experts had an axis.
GOLDEN = {
    "s.safetensors": "7604c0b07f44ae791d9e8b92e041793eb80dcf56a8d4b6a6a039ce88a58f2fc5",
    "s.npz": "13eaf5476f5444d846656f6e0755497b55ae90c3f4a4fc13dd89be8b6e54f359",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_an_expert_free_file_stacks_to_the_same_bytes_as_before(
    tmp_path: Path, name: str
) -> None:
    save_flat(tmp_path / "a.safetensors", _expert_free(), metadata={"format": "pt"})
    done = convert_stack(tmp_path / "a.safetensors", tmp_path / name)
    assert done.experts is None
    digest = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert digest == GOLDEN[name]


def test_inspect_shows_experts_per_kind(tmp_path: Path) -> None:
    save_flat(tmp_path / "a.safetensors", moe(n=3, e=5, dense=1))
    lines = inspect_checkpoint(tmp_path / "a.safetensors").splitlines()
    assert lines[1:4] == [
        "layer pattern: 'model.layers.{i}.' (detected), 3 layers of 2 kinds",
        "expert pattern: 'mlp.experts.{e}.' (detected)",
        "kind A: 1 layer (0) of 3 tensors (232 B each); layer 0:",
    ]
    at = lines.index(
        "kind B: 2 layers (1-2) of 19 tensors (692 B each), 5 experts; layer 1, "
        "one expert's tensors under `{e}`:"
    )
    assert lines[at + 1 : at + 8] == [
        "  input_layernorm.weight             f16[4]",
        "  mlp.experts.{e}.down_proj.weight   i8[4,3]",
        "  mlp.experts.{e}.gate_proj.weight   f32[3,4]",
        "  mlp.experts.{e}.up_proj.weight     f32[3,4]",
        "  mlp.gate.weight                    f32[5,4]",
        "  mlp.shared_experts.up_proj.weight  i32[2,4]",
        "  self_attn.q_proj.weight            bf16[4,4]",
    ]
    assert not any("experts.4" in line for line in lines)
    convert_stack(tmp_path / "a.safetensors", tmp_path / "s.safetensors")
    r = run_command("inspect", str(tmp_path / "s.safetensors"))
    assert r.returncode == 0, r.stderr
    assert "expert pattern: 'mlp.experts.{e}.'" in r.stdout
    assert (
        "kind B: 2 layers (1-2), 5 experts, 7 stacked tensors, leading axis = layer "
        "(and expert, for names with `{e}`):" in r.stdout
    )
    assert "model.layers.{i:B}.mlp.experts.{e}.up_proj.weight     f32[2,5,3,4]" in (
        r.stdout
    )
    r = run_command("inspect", str(tmp_path / "a.safetensors"), "--experts", "none")
    assert "mlp.experts.4.up_proj.weight" in r.stdout


def test_bad_experts_are_one_line_and_exit_2(tmp_path: Path) -> None:
    flat = moe(n=3, e=3)
    del flat["model.layers.2.mlp.experts.1.down_proj.weight"]
    save_flat(tmp_path / "a.safetensors", flat)
    out = tmp_path / "s.safetensors"
    r = run_command("stack", str(tmp_path / "a.safetensors"), "-o", str(out))
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.count("\n") == 1
    assert "layer 2 lacks expert 1's `down_proj.weight`" in r.stderr
    r = run_command(
        "stack", str(tmp_path / "a.safetensors"), "-o", str(out), "--experts", "moe."
    )
    assert r.returncode == 2 and "`experts` must contain exactly one `{e}`" in r.stderr
    r = run_command(
        "stack", str(tmp_path / "a.safetensors"), "-o", str(out), "--experts", "x.{e}."
    )
    assert r.returncode == 2 and "'x.{e}.' matches no per-layer key" in r.stderr
    assert not out.exists()


# ----------------------------------------------------------- a damaged file, --kinds


def _damaged(tmp_path: Path) -> Path:
    flat = moe(n=5, e=2)
    del flat["model.layers.1.mlp.shared_experts.up_proj.weight"]
    save_flat(tmp_path / "a.safetensors", flat)
    return tmp_path / "a.safetensors"


def test_a_kind_lacking_keys_is_warned_about(tmp_path: Path) -> None:
    src = _damaged(tmp_path)
    warning = (
        "kind B (layer 1) lacks `mlp.shared_experts.up_proj.weight`, which kind A "
        "(layers 0, 2-4) holds: a damaged file looks like this"
    )
    r = run_command("stack", str(src), "-o", str(tmp_path / "s.safetensors"), "-q")
    assert r.returncode == 0
    assert r.stderr == f"stackedtree: warning: {warning}\n"
    done = convert_stack(src, tmp_path / "t.safetensors")
    assert done.gaps == (warning,)
    r = run_command("inspect", str(src))
    assert f"warning: {warning}" in r.stdout.splitlines()
    # Kinds that are no subset of each other are no warning (DeepSeek).
    save_flat(tmp_path / "b.safetensors", moe(n=4, e=2, dense=1))
    assert (
        convert_stack(tmp_path / "b.safetensors", tmp_path / "u.safetensors").gaps == ()
    )


def test_kinds_1_insists_on_one_kind(tmp_path: Path) -> None:
    src = _damaged(tmp_path)
    out = tmp_path / "s.safetensors"
    r = run_command("stack", str(src), "-o", str(out), "--kinds", "1")
    assert r.returncode == 2 and not out.exists()
    assert r.stderr == (
        "stackedtree: error: the layers form 2 kinds, A (layers 0, 2-4), B (layers "
        "1), but 1 kind was asked for; kind B (layer 1) lacks "
        "`mlp.shared_experts.up_proj.weight`, which kind A (layers 0, 2-4) holds: a "
        "damaged file looks like this\n"
    )
    save_flat(tmp_path / "ok.safetensors", moe(n=3, e=2))
    r = run_command(
        "stack", str(tmp_path / "ok.safetensors"), "-o", str(out), "--kinds", "1"
    )
    assert r.returncode == 0, r.stderr
    r = run_command("stack", str(src), "-o", str(out), "--kinds", "0")
    assert r.returncode == 2 and "expected a positive integer" in r.stderr


# ------------------------------------------------------------------------- paths


def test_a_missing_path_says_so(tmp_path: Path) -> None:
    for path in ("/nonexistent", str(tmp_path / "nope.safetensors")):
        r = run_command("inspect", path)
        assert r.returncode == 2
        assert r.stderr.startswith("stackedtree: error: ")
        assert "o such file" in r.stderr and path in r.stderr


def test_an_error_about_a_folder_names_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    save_shards(folder, moe(n=3, e=2), files=4)
    r = run_command("unstack", str(folder), "-o", str(tmp_path / "u.safetensors"))
    assert r.returncode == 2
    assert f"`{folder}/` (4 files) is not a stacked checkpoint" in r.stderr
    assert "model-00001-of-00004" not in r.stderr
    # The folder stacks, and loads back, experts and all.
    r = run_command("stack", str(folder), "-o", str(tmp_path / "s.safetensors"), "-q")
    assert r.returncode == 0, r.stderr
    meta = json.loads(json.dumps(read_checkpoint(tmp_path / "s.safetensors").metadata))
    assert meta["stackedtree.experts"] == EP
    convert_unstack(tmp_path / "s.safetensors", tmp_path / "u.safetensors")
    assert_same_flat(load_flat(tmp_path / "u.safetensors"), moe(n=3, e=2))
