"""Hypothesis strategies for random flat checkpoints, and a bit-exact comparison.

A generated checkpoint has N >= 1 layers named by a random pattern, random per-layer
keys of random shapes and dtypes (bfloat16 and float8 included) filled with random
bits (NaN payloads and all), and random other tensors the pattern does not match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume
from hypothesis import strategies as st

import stackedtree
from stackedtree.checkpoint import detect_experts
from stackedtree.checkpoint._layer_pattern import LayerPattern

DTYPES = [
    np.dtype(t)
    for t in (
        np.bool_,
        np.uint8,
        np.int8,
        np.int16,
        np.uint16,
        np.int32,
        np.uint32,
        np.int64,
        np.uint64,
        np.float16,
        ml_dtypes.bfloat16,
        np.float32,
        np.float64,
        np.complex64,
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
    )
]

NAME_CHARS = "abz._/-0159"
shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)
specs = st.tuples(shapes, st.sampled_from(DTYPES))


@st.composite
def patterns(draw: st.DrawFn) -> str:
    before = draw(st.text(alphabet="ab._/", max_size=6))
    # A digit right after `{i}` would be read as part of the index.
    after = draw(st.text(alphabet="ab._/", max_size=3))
    return before + "{i}" + after


class Case(NamedTuple):
    pattern: str
    num_layers: int
    flat: dict[str, np.ndarray]


@st.composite
def cases(draw: st.DrawFn, max_layers: int = 4) -> Case:
    """A random per-layer checkpoint with its pattern, without experts: keys such
    as `0.` and `5.` would read as experts numbered other than 0..E-1, which
    `stackedtree stack` rightly refuses."""
    pattern = draw(patterns())
    lp = LayerPattern.parse(pattern)
    n = draw(st.integers(1, max_layers))
    key_text = st.text(alphabet=NAME_CHARS, max_size=6)
    if lp.after == "":
        key_text = key_text.filter(lambda k: not k[:1].isdigit())
    keys = draw(st.lists(key_text, min_size=1, max_size=4, unique=True))
    key_specs = {k: draw(specs) for k in keys}
    rest_names = draw(
        st.lists(
            st.text(alphabet=NAME_CHARS, min_size=1, max_size=10).filter(
                lambda name: lp.match(name) is None
            ),
            max_size=3,
            unique=True,
        )
    )
    flat: dict[str, np.ndarray] = {}
    for name in rest_names:
        flat[name] = _draw_array(draw, *draw(specs))
    for i in range(n):
        for k, (shape, dtype) in key_specs.items():
            flat[lp.layer_name(i, k)] = _draw_array(draw, shape, dtype)
    assume(detect_experts(flat, pattern) is None)
    return Case(pattern, n, flat)


def _draw_array(draw: st.DrawFn, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    if dtype == np.bool_:
        raw = bytes(b & 1 for b in raw)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def same_bits(a: Any, b: Any) -> bool:
    """Bit-exact equality of two arrays of any library: dtype, shape and bytes."""
    a_np, b_np = np.asarray(a), np.asarray(b)
    return (
        a_np.dtype == b_np.dtype
        and a_np.shape == b_np.shape
        and a_np.tobytes() == b_np.tobytes()
    )


def same(a: Any, b: Any) -> bool:
    """Bit-exact equality of two arrays of the same type: dtype, shape and bytes."""
    return type(a) is type(b) and same_bits(a, b)


def flat_bits_equal(got: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """Two flat checkpoints hold the same names, each tensor bit for bit."""
    return sorted(got) == sorted(want) and all(same_bits(got[k], want[k]) for k in want)


def assert_same_flat(got: Mapping[str, Any], want: Mapping[str, Any]) -> None:
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not same(got[k], want[k])]
    assert not bad, f"tensors differ: {bad}"


LLAMA_KEYS: dict[str, tuple[tuple[int, ...], Any]] = {
    "input_layernorm.weight": ((4,), ml_dtypes.bfloat16),
    "self_attn.q_proj.weight": ((4, 4), np.float16),
    "mlp.up_proj.weight": ((2, 4), np.int32),
}
"""The per-layer keys of `llama`, with their shapes and dtypes, unless given."""


def llama(
    n: int = 3,
    keys: Mapping[str, tuple[tuple[int, ...], Any]] = LLAMA_KEYS,
    *,
    vocab: int = 6,
    d: int = 4,
    norm: bool = True,
    head: bool = False,
    dtype: Any = np.float32,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """A small Llama-shaped per-layer checkpoint, named as transformers names it.

    `model.embed_tokens.weight` (`(vocab, d)` `dtype`, `0, 1, 2, ...`), then layers
    `0..n-1` holding `keys` (`model.layers.{i}.key`, each full of `i`), then
    `model.norm.weight` (ones) when `norm` and `lm_head.weight` (as the embeddings)
    when `head`. With a `seed`, every tensor holds random values instead.
    """
    rng = None if seed is None else np.random.default_rng(seed)

    def tensor(shape: tuple[int, ...], dtype: Any, value: Any) -> np.ndarray:
        if rng is not None:
            return (rng.standard_normal(shape) * 4).astype(dtype)
        if np.ndim(value):
            return np.asarray(value, dtype).reshape(shape)
        return np.full(shape, value, dtype)

    embed = np.arange(vocab * d).reshape(vocab, d)
    flat = {"model.embed_tokens.weight": tensor((vocab, d), dtype, embed)}
    for i in range(n):
        for key, (shape, key_dtype) in keys.items():
            flat[f"model.layers.{i}.{key}"] = tensor(shape, key_dtype, i)
    if norm:
        flat["model.norm.weight"] = tensor((d,), dtype, 1)
    if head:
        flat["lm_head.weight"] = tensor((vocab, d), dtype, embed)
    return flat


def deepseek(dense: int = 2, moe: int = 3, experts: int = 2) -> dict[str, np.ndarray]:
    """A tiny DeepSeek-like checkpoint: dense layers, then MoE layers."""
    rng = np.random.default_rng(0)
    flat = {"model.embed_tokens.weight": rng.standard_normal((16, 8), np.float32)}
    for i in range(dense + moe):
        p = f"model.layers.{i}."
        flat[p + "input_layernorm.weight"] = np.full(8, i, ml_dtypes.bfloat16)
        flat[p + "self_attn.q_proj.weight"] = rng.standard_normal((8, 8), np.float32)
        if i < dense:
            flat[p + "mlp.up_proj.weight"] = rng.standard_normal((16, 8), np.float32)
        else:
            flat[p + "mlp.gate.weight"] = rng.standard_normal((experts, 8), np.float32)
            for e in range(experts):
                flat[p + f"mlp.experts.{e}.up_proj.weight"] = rng.integers(
                    0, 9, (4, 8), np.int8
                )
    flat["model.norm.weight"] = np.ones(8, np.float32)
    return flat


def save_shards(folder: Path, flat: Mapping[str, np.ndarray], files: int = 2) -> Path:
    """`flat` saved in `files` shards under `folder` with a
    `model.safetensors.index.json` naming them; the index's path."""
    from stackedtree.checkpoint import save_flat

    names = list(flat)
    per = -(-len(names) // files)
    weight_map = {}
    for k in range(files):
        shard = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        part = names[k * per : (k + 1) * per]
        save_flat(folder / shard, {n: flat[n] for n in part})
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def unwritable_dir(tmp_path: Any) -> str:
    """A folder this process cannot create files in, or skip the test."""
    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        return str(folder)
    for folder in ("/sys", "/proc/sys"):
        try:
            fd, name = tempfile.mkstemp(dir=folder)
        except PermissionError:
            return folder
        except OSError:
            continue
        os.close(fd)
        os.unlink(name)
    pytest.skip("no unwritable folder available to root")


SRC_ROOT = str(Path(stackedtree.__file__).resolve().parent.parent)


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m stackedtree ARGS` in a subprocess, importing this checkout's code."""
    env = {
        **os.environ,
        "PYTHONPATH": SRC_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.run(
        [sys.executable, "-m", "stackedtree", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def hf_moe(model: str, *, experts: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny mixture-of-experts checkpoint named as transformers writes `model`:
    `"deepseek_v3"` (3 dense layers, then MoE with shared experts and
    `e_score_correction_bias`), `"qwen3_moe"` (layer 0 dense, from `mlp_only_layers`),
    `"mixtral"` (all MoE, `block_sparse_moe`), `"qwen3_next"` (linear-attention and
    full-attention layers, all MoE) or `"llama4"` (dense and MoE layers interleaved,
    experts fused `(E, ...)`). Layers in state_dict order; bfloat16 weights."""
    rng = np.random.default_rng(seed)
    d, f, e = 8, 4, experts

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)

    def mlp(p: str, names: tuple[str, str, str] = ("gate", "up", "down")) -> dict:
        g, u, dn = names
        return {
            f"{p}{g}_proj.weight": w(f, d),
            f"{p}{u}_proj.weight": w(f, d),
            f"{p}{dn}_proj.weight": w(d, f),
        }

    def attn(p: str, norms: bool = False) -> dict:
        out = {f"{p}{x}_proj.weight": w(d, d) for x in "qkvo"}
        if norms:
            out |= {f"{p}q_norm.weight": w(2), f"{p}k_norm.weight": w(2)}
        return out

    def layer(i: int) -> dict[str, np.ndarray]:
        p = f"model.layers.{i}."
        out: dict[str, np.ndarray] = {}
        if model == "deepseek_v3":
            out |= {
                p + "self_attn.q_a_proj.weight": w(6, d),
                p + "self_attn.q_a_layernorm.weight": w(6),
                p + "self_attn.q_b_proj.weight": w(d, 6),
                p + "self_attn.kv_a_proj_with_mqa.weight": w(6, d),
                p + "self_attn.kv_a_layernorm.weight": w(4),
                p + "self_attn.kv_b_proj.weight": w(d, 4),
                p + "self_attn.o_proj.weight": w(d, d),
            }
            if i < 3:
                out |= mlp(p + "mlp.")
            else:
                for x in range(e):
                    out |= mlp(p + f"mlp.experts.{x}.")
                out |= {
                    p + "mlp.gate.weight": w(e, d),
                    p + "mlp.gate.e_score_correction_bias": np.zeros(e, np.float32),
                }
                out |= mlp(p + "mlp.shared_experts.")
        elif model == "qwen3_moe":
            out |= attn(p + "self_attn.", norms=True)
            if i == 0:
                out |= mlp(p + "mlp.")
            else:
                out[p + "mlp.gate.weight"] = w(e, d)
                for x in range(e):
                    out |= mlp(p + f"mlp.experts.{x}.")
        elif model == "mixtral":
            out |= attn(p + "self_attn.")
            out[p + "block_sparse_moe.gate.weight"] = w(e, d)
            for x in range(e):
                q = p + f"block_sparse_moe.experts.{x}."
                out |= {q + "w1.weight": w(f, d), q + "w2.weight": w(d, f)}
                out |= {q + "w3.weight": w(f, d)}
        elif model == "qwen3_next":
            if i % 4 == 3:
                out |= attn(p + "self_attn.", norms=True)
            else:
                q = p + "linear_attn."
                out |= {
                    q + "conv1d.weight": w(12, 1, 4),
                    q + "in_proj_qkvz.weight": w(16, d),
                    q + "in_proj_ba.weight": w(4, d),
                    q + "dt_bias": w(2),
                    q + "A_log": rng.standard_normal(2).astype(np.float32),
                    q + "norm.weight": w(4),
                    q + "out_proj.weight": w(d, 4),
                }
            out[p + "mlp.gate.weight"] = w(e, d)
            for x in range(e):
                out |= mlp(p + f"mlp.experts.{x}.")
            out |= mlp(p + "mlp.shared_expert.")
            out[p + "mlp.shared_expert_gate.weight"] = w(1, d)
        elif model == "llama4":
            out |= attn(p + "self_attn.")
            q = p + "feed_forward."
            if i % 2 == 0:
                out |= mlp(q)
            else:
                out |= {
                    q + "experts.gate_up_proj": w(e, d, 2 * f),
                    q + "experts.down_proj": w(e, f, d),
                    q + "router.weight": w(e, d),
                }
                out |= mlp(q + "shared_expert.")
        else:
            raise ValueError(f"unknown model {model!r}")
        out[p + "input_layernorm.weight"] = w(d)
        out[p + "post_attention_layernorm.weight"] = w(d)
        return out

    layers = {"deepseek_v3": 5, "qwen3_moe": 3, "mixtral": 2, "qwen3_next": 4}
    flat = {"model.embed_tokens.weight": w(16, d)}
    for i in range(layers.get(model, 4)):
        flat |= layer(i)
    flat |= {"model.norm.weight": w(d), "lm_head.weight": w(16, d)}
    return flat
