"""The HF Llama checkpoint example: conversion round trip and attention equivalence."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import hf_llama_checkpoint as ex
import llama_model

import stackedtree

CFG = ex.SMALL


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_round_trip_is_bit_exact(dtype: type) -> None:
    hf = ex.random_hf_checkpoint(CFG, seed=3, dtype=dtype)
    block, rest = ex.hf_to_stacked(hf, CFG)
    back = ex.stacked_to_hf(block, CFG, rest)
    assert sorted(back) == sorted(hf)
    for k in hf:
        assert back[k].dtype == hf[k].dtype and back[k].shape == hf[k].shape, k
        assert back[k].tobytes() == hf[k].tobytes(), k


def test_block_has_the_model_layout() -> None:
    block, rest = ex.hf_to_stacked(ex.random_hf_checkpoint(CFG), CFG)
    want = llama_model.block_shapes(CFG, np.float32)
    got = jax.tree.map(lambda x: (x.shape, x.dtype), block)
    assert got == jax.tree.map(lambda s: ((CFG.num_layers, *s.shape), s.dtype), want)
    assert sorted(rest) == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ]


def test_attention_equals_hf_per_head_attention() -> None:
    hf = ex.random_hf_checkpoint(CFG, seed=1)
    block, _ = ex.hf_to_stacked(hf, CFG)
    x = np.random.default_rng(2).standard_normal((5, CFG.d_model)).astype(np.float32)
    for i in range(CFG.num_layers):
        with jax.numpy_rank_promotion("allow"):
            ours = llama_model.attention(
                stackedtree.get_layer(block, i).attention, x[None], CFG
            )
        np.testing.assert_allclose(
            np.asarray(ours)[0], ex.hf_attention(hf, i, x, CFG), rtol=2e-5, atol=2e-5
        )


def test_a_wrong_head_grouping_is_caught() -> None:
    """The equivalence check can fail: grouping query heads kv-minor breaks it."""
    hf = ex.random_hf_checkpoint(CFG, seed=1)
    block, _ = ex.hf_to_stacked(hf, CFG)
    a = block.attention
    n, d, q, kv, h = a.q_proj.shape
    wrong = a._replace(q_proj=a.q_proj.transpose(0, 1, 3, 2, 4).reshape(n, d, q, kv, h))
    x = np.random.default_rng(2).standard_normal((5, CFG.d_model)).astype(np.float32)
    layer = stackedtree.get_layer(wrong, 0)
    with jax.numpy_rank_promotion("allow"):
        ours = np.asarray(llama_model.attention(layer, x[None], CFG))[0]
    assert not np.allclose(ours, ex.hf_attention(hf, 0, x, CFG), rtol=1e-3, atol=1e-3)


def test_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    ex.main()
    out = capsys.readouterr().out
    assert "round trip: 39 tensors bit-exact" in out
    assert "attention matches HF on all 4 layers" in out
