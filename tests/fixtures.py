"""The small per-layer modules the tests stack: an attention block as NamedTuples."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np


class Attention(NamedTuple):
    q_proj: Any
    k_proj: Any


class Block(NamedTuple):
    norm: Any
    attention: Attention
    act: Any


def block(seed: int, lib: Any = np, n_heads: int = 2) -> Block:
    """One layer of random float32 parameters, with a static activation function."""
    rng = np.random.default_rng(seed)
    return Block(
        norm=lib.asarray(rng.normal(size=(4,)).astype(np.float32)),
        attention=Attention(
            q_proj=lib.asarray(rng.normal(size=(4, n_heads, 3)).astype(np.float32)),
            k_proj=lib.asarray(rng.normal(size=(4, 2, 3)).astype(np.float32)),
        ),
        act=jax.nn.gelu,
    )


def stacked_block(n: int = 4, lib: Any = np) -> Block:
    """A stack of `n` layers whose values count up, in three dtypes, with a static leaf."""
    return Block(
        norm=lib.asarray(np.arange(n * 3, dtype=np.float32).reshape(n, 3)),
        attention=Attention(
            q_proj=lib.asarray(np.arange(n * 6, dtype=np.int32).reshape(n, 2, 3)),
            k_proj=lib.asarray(np.arange(n, dtype=np.float16)),
        ),
        act="gelu",
    )
