"""A Llama-style decoder written as NamedTuples, the layout of the scan tutorial.

Parameters of one decoder block are a `DecoderBlock`; the whole stack is the same
NamedTuple whose leaves carry a leading layer axis. Attention uses the grouped-query
layout `q_proj: (d_model, q_per_kv, kv_heads, head_dim)`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Config(NamedTuple):
    d_model: int
    kv_heads: int
    q_per_kv: int
    head_dim: int
    d_ff: int
    num_layers: int
    vocab: int = 256
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    dropout: float = 0.0


LLAMA_7B = Config(
    d_model=4096,
    kv_heads=32,
    q_per_kv=1,
    head_dim=128,
    d_ff=11008,
    num_layers=32,
    vocab=32000,
)
"""The 32-layer Llama 7B shapes used by the tutorial's printout."""


class Attention(NamedTuple):
    q_proj: jax.Array  # (d_model, q_per_kv, kv_heads, head_dim)
    k_proj: jax.Array  # (d_model, kv_heads, head_dim)
    v_proj: jax.Array  # (d_model, kv_heads, head_dim)
    out_proj: jax.Array  # (q_per_kv, kv_heads, head_dim, d_model)


class DecoderBlock(NamedTuple):
    input_norm: jax.Array  # (d_model,)
    attention: Attention
    post_attn_norm: jax.Array  # (d_model,)
    gate_proj: jax.Array  # (d_model, d_ff)
    up_proj: jax.Array  # (d_model, d_ff)
    down_proj: jax.Array  # (d_ff, d_model)


def block_shapes(cfg: Config, dtype: jnp.dtype = jnp.bfloat16) -> DecoderBlock:
    """One layer's parameter shapes as `jax.ShapeDtypeStruct`s: nothing is allocated."""

    def s(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    d, q, kv, h, f = cfg.d_model, cfg.q_per_kv, cfg.kv_heads, cfg.head_dim, cfg.d_ff
    return DecoderBlock(
        input_norm=s(d),
        attention=Attention(
            q_proj=s(d, q, kv, h),
            k_proj=s(d, kv, h),
            v_proj=s(d, kv, h),
            out_proj=s(q, kv, h, d),
        ),
        post_attn_norm=s(d),
        gate_proj=s(d, f),
        up_proj=s(d, f),
        down_proj=s(f, d),
    )


def init_block(
    key: jax.Array, cfg: Config, dtype: jnp.dtype = jnp.float32
) -> DecoderBlock:
    """Random parameters of one decoder block."""
    shapes = block_shapes(cfg, dtype)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    params = []
    for k, sds in zip(keys, leaves, strict=True):
        if len(sds.shape) == 1:  # norm scales
            params.append(jnp.ones(sds.shape, dtype))
        else:
            fan_in = sds.shape[0] if sds.shape[0] != cfg.q_per_kv else cfg.d_model
            params.append(jax.random.normal(k, sds.shape, dtype) / jnp.sqrt(fan_in))
    return jax.tree.unflatten(treedef, params)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return (x * jax.lax.rsqrt(var + eps)).astype(x.dtype) * scale


def rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on `(batch, seq, *heads, head_dim)` in the rotate-half layout."""
    seq, head_dim = x.shape[1], x.shape[-1]
    freqs = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    shape = (1, seq) + (1,) * (x.ndim - 3) + (head_dim,)
    cos, sin = jnp.cos(angles).reshape(shape), jnp.sin(angles).reshape(shape)
    half = head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


def attention(p: Attention, x: jax.Array, cfg: Config) -> jax.Array:
    """Causal grouped-query attention on `x: (batch, seq, d_model)`."""
    q = jnp.einsum("bsd,dqkh->bsqkh", x, p.q_proj)
    k = jnp.einsum("bsd,dkh->bskh", x, p.k_proj)
    v = jnp.einsum("bsd,dkh->bskh", x, p.v_proj)
    q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    logits = jnp.einsum("bsqkh,btkh->bqkst", q, k) / jnp.sqrt(cfg.head_dim).astype(
        x.dtype
    )
    seq = x.shape[1]
    mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bqkst,btkh->bsqkh", weights, v)
    return jnp.einsum("bsqkh,qkhd->bsd", out, p.out_proj)


def decoder_block(
    p: DecoderBlock, x: jax.Array, cfg: Config, *, key: jax.Array | None = None
) -> jax.Array:
    """One pre-norm decoder block: attention then a SwiGLU MLP, with residuals.

    With a `key` and `cfg.dropout > 0`, dropout is applied to both residual branches.
    """
    h = attention(p.attention, rms_norm(x, p.input_norm, cfg.rms_eps), cfg)
    if key is not None and cfg.dropout > 0:
        key, sub = jax.random.split(key)
        h = _dropout(h, cfg.dropout, sub)
    x = x + h
    y = rms_norm(x, p.post_attn_norm, cfg.rms_eps)
    h = (jax.nn.silu(y @ p.gate_proj) * (y @ p.up_proj)) @ p.down_proj
    if key is not None and cfg.dropout > 0:
        h = _dropout(h, cfg.dropout, key)
    return x + h


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
