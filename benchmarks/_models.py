"""The two models the benchmarks run.

- The Llama-style decoder of `examples/llama_model.py` at sizes that run fast on a CPU,
  with the three reference ways of running it: a Python loop, a hand-written
  `jax.lax.scan` and `scan_layers`.
- An activation-heavy model (a large carry, small layers), for memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import _env  # noqa: F401  (before jax, and puts examples/ on the path)
import jax
import jax.numpy as jnp
import numpy as np
from llama_model import Config, DecoderBlock, decoder_block, init_block

import stackedtree

LLAMA_SMALL = Config(
    d_model=128, kv_heads=4, q_per_kv=2, head_dim=16, d_ff=256, num_layers=8, vocab=256
)
LLAMA_BATCH, LLAMA_SEQ = 4, 64
LLAMA_QUICK = Config(
    d_model=32, kv_heads=2, q_per_kv=2, head_dim=8, d_ff=64, num_layers=2, vocab=64
)
LLAMA_QUICK_BATCH, LLAMA_QUICK_SEQ = 2, 16


def llama_setup(
    n: int, quick: bool = False, seed: int = 0
) -> tuple[Config, DecoderBlock, jax.Array]:
    """`(cfg, stacked params with leading axis n, input x)`; the same for every variant."""
    cfg = (LLAMA_QUICK if quick else LLAMA_SMALL)._replace(num_layers=n)
    batch, seq = (
        (LLAMA_QUICK_BATCH, LLAMA_QUICK_SEQ) if quick else (LLAMA_BATCH, LLAMA_SEQ)
    )
    k_params, k_x = jax.random.split(jax.random.key(seed))
    params = stackedtree.init_stacked(lambda k: init_block(k, cfg), k_params, n)
    x = jax.random.normal(k_x, (batch, seq, cfg.d_model), jnp.float32)
    return cfg, params, x


def llama_loss_value(y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(y))


def llama_python_loop(cfg: Config) -> Callable[[DecoderBlock, jax.Array], jax.Array]:
    """Loss via a Python loop over layers: the graph grows with N."""

    def loss(params: DecoderBlock, x: jax.Array) -> jax.Array:
        for i in range(cfg.num_layers):
            x = decoder_block(jax.tree.map(lambda a, i=i: a[i], params), x, cfg)
        return llama_loss_value(x)

    return loss


def llama_lax_scan(cfg: Config) -> Callable[[DecoderBlock, jax.Array], jax.Array]:
    """Loss via a hand-written `jax.lax.scan`, the scan tutorial's style."""

    def loss(params: DecoderBlock, x: jax.Array) -> jax.Array:
        def inner(x: jax.Array, input_: DecoderBlock) -> tuple[jax.Array, None]:
            return decoder_block(input_, x, cfg), None

        x, _ = jax.lax.scan(inner, x, params)
        return llama_loss_value(x)

    return loss


def llama_scan_layers(cfg: Config) -> Callable[[DecoderBlock, jax.Array], jax.Array]:
    """Loss via `stackedtree.scan_layers`."""

    def loss(params: DecoderBlock, x: jax.Array) -> jax.Array:
        def layer(x: jax.Array, input_: DecoderBlock) -> tuple[jax.Array, None]:
            return decoder_block(input_, x, cfg), None

        x, _ = stackedtree.scan_layers(layer, x, params)
        return llama_loss_value(x)

    return loss


def grad_of(loss: Callable[..., jax.Array]) -> Callable[..., Any]:
    """Gradient w.r.t. the first argument (the parameters)."""
    return jax.grad(loss)


def llama_model(quick: bool) -> dict[str, Any]:
    """The decoder's size, as recorded in the results."""
    cfg = (LLAMA_QUICK if quick else LLAMA_SMALL)._asdict()
    cfg.pop("num_layers")
    batch, seq = (
        (LLAMA_QUICK_BATCH, LLAMA_QUICK_SEQ) if quick else (LLAMA_BATCH, LLAMA_SEQ)
    )
    return {
        "config": cfg,
        "batch": batch,
        "seq": seq,
        "dtype": "float32",
        "loss": "mean(decoder(x) ** 2), gradient w.r.t. the parameters",
    }


def llama_text(model: dict[str, Any]) -> str:
    """`llama_model(...)` as a sentence for a report."""
    c = model.get("config") or {}
    heads = ""
    if {"kv_heads", "q_per_kv", "head_dim"} <= c.keys():
        heads = (
            f", {c['kv_heads'] * c['q_per_kv']} query and {c['kv_heads']} KV heads "
            f"of {c['head_dim']}"
        )
    return (
        f"Llama-style decoder of `examples/llama_model.py` (d_model {c.get('d_model')}"
        f"{heads}, d_ff {c.get('d_ff')}), batch {model.get('batch')}, sequence "
        f"{model.get('seq')}, {model.get('dtype')}; loss {model.get('loss')}."
    )


class Dense2(NamedTuple):
    w1: jax.Array  # (width, width)
    w2: jax.Array  # (width, width)


HEAVY_ROWS, HEAVY_WIDTH = 1024, 256
HEAVY_QUICK_ROWS, HEAVY_QUICK_WIDTH = 64, 32


def heavy_layer(x: jax.Array, p: Dense2) -> jax.Array:
    """Two matmuls with a tanh between and a residual: activations dominate memory."""
    return x + jnp.tanh(x @ p.w1) @ p.w2


def heavy_setup(n: int, quick: bool = False, seed: int = 0) -> tuple[Dense2, jax.Array]:
    rows, width = (
        (HEAVY_QUICK_ROWS, HEAVY_QUICK_WIDTH) if quick else (HEAVY_ROWS, HEAVY_WIDTH)
    )
    k_params, k_x = jax.random.split(jax.random.key(seed))

    def init(k: jax.Array) -> Dense2:
        k1, k2 = jax.random.split(k)
        scale = 1.0 / np.sqrt(width)
        return Dense2(
            jax.random.normal(k1, (width, width)) * scale,
            0.1 * jax.random.normal(k2, (width, width)) * scale,
        )

    params = stackedtree.init_stacked(init, k_params, n)
    x = jax.random.normal(k_x, (rows, width), jnp.float32)
    return params, x


def heavy_model(quick: bool) -> dict[str, Any]:
    """The activation-heavy model's size, as recorded in the results."""
    rows, width = (
        (HEAVY_QUICK_ROWS, HEAVY_QUICK_WIDTH) if quick else (HEAVY_ROWS, HEAVY_WIDTH)
    )
    return {
        "carry": [rows, width],
        "dtype": "float32",
        "layer": f"x + tanh(x @ w1) @ w2, w1 and w2 ({width}, {width})",
    }


def heavy_text(model: dict[str, Any]) -> str:
    """`heavy_model(...)` as a sentence for a report."""
    rows, width = model.get("carry") or ("?", "?")
    return (
        f"Activation-heavy model: layer `{model.get('layer')}`, carry {rows} x {width} "
        f"{model.get('dtype')}."
    )


def heavy_scan_loss(
    remat: Any = False, remat_group: Any = None
) -> Callable[[Dense2, jax.Array], jax.Array]:
    """Loss of the heavy model through `scan_layers` with the given remat options."""

    def loss(params: Dense2, x: jax.Array) -> jax.Array:
        def layer(x: jax.Array, p: Dense2) -> tuple[jax.Array, None]:
            return heavy_layer(x, p), None

        x, _ = stackedtree.scan_layers(
            layer, x, params, remat=remat, remat_group=remat_group
        )
        return jnp.mean(jnp.square(x))

    return loss
