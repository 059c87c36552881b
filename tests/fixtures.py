"""The small per-layer modules the tests stack: an attention block as NamedTuples."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


# --- the layer the scan, pattern and pipeline tests run ------------------------------


class Layer(NamedTuple):
    """A dense layer with a static leaf, so every scan test also carries a static."""

    w: jax.Array
    b: jax.Array
    scale: float  # static: shared by all layers, handed to the layer unchanged


def with_static(params: tuple[jax.Array, jax.Array]) -> Layer:
    """Layer from its array leaves; `jit`/`grad` see only arrays, `scale` stays static."""
    return Layer(*params, scale=0.5)


def layer_block(
    carry: jax.Array, layer: Layer, x: jax.Array | None = None, *, key: Any = None
) -> tuple[jax.Array, jax.Array]:
    """Treats batch rows independently, except for the key's noise (one draw per call)."""
    assert isinstance(layer.scale, float)  # static leaves arrive unchanged
    h = jnp.tanh(carry @ layer.w + layer.b[None, :]) * layer.scale + carry
    if x is not None:
        h = h + x
    if key is not None:
        h = h + 0.1 * jax.random.normal(key, h.shape)
    return h, jnp.sum(h, axis=-1)


def assert_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float = 2e-5,
    atol: float = 2e-5,
    scaled: bool = False,
) -> None:
    """Same structure, equal static leaves and close arrays.

    With `scaled`, `atol` is taken relative to each expected leaf's largest magnitude
    (what gradients of very different sizes need) and `rtol` is ignored.
    """
    assert jax.tree.structure(actual) == jax.tree.structure(expected)

    def check(a: Any, e: Any) -> None:
        if isinstance(e, str):
            assert a == e
        elif scaled:
            scale = float(np.max(np.abs(e)))
            np.testing.assert_allclose(a, e, rtol=0, atol=atol * scale)
        else:
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)

    jax.tree.map(check, actual, expected)
