"""A Llama-style decoder written as NamedTuples, the layout of the scan tutorial.

Parameters of one decoder block are a `DecoderBlock`; the whole stack is the same
NamedTuple whose leaves carry a leading layer axis. Attention uses the grouped-query
layout `q_proj: (d_model, q_per_kv, kv_heads, head_dim)`.

The same code runs the Llama family as Hugging Face `transformers` does (Llama 1-3,
Mistral without sliding windows, Qwen2): optional attention biases
(`BiasedAttention`), Llama 3.1's rope scaling (`Llama3Rope`), tied or separate output
heads (`Model`, `model_forward`). Every array operation spells its broadcasting out,
so the model runs under `jax.numpy_rank_promotion("raise")`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stackedtree import scan_layers


class Llama3Rope(NamedTuple):
    """Llama 3.1's rope scaling (`rope_type: "llama3"` in a Hugging Face config)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


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
    rope_scaling: Llama3Rope | None = None  # None: plain rope
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    out_bias: bool = False  # a bias on the output projection (Llama attention_bias)
    tie_embeddings: bool = False  # the output head is the embedding, transposed


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


class BiasedAttention(NamedTuple):
    """`Attention` with biases; a bias left None is not applied."""

    q_proj: jax.Array  # (d_model, q_per_kv, kv_heads, head_dim)
    k_proj: jax.Array  # (d_model, kv_heads, head_dim)
    v_proj: jax.Array  # (d_model, kv_heads, head_dim)
    out_proj: jax.Array  # (q_per_kv, kv_heads, head_dim, d_model)
    q_bias: jax.Array | None = None  # (q_per_kv, kv_heads, head_dim)
    k_bias: jax.Array | None = None  # (kv_heads, head_dim)
    v_bias: jax.Array | None = None  # (kv_heads, head_dim)
    out_bias: jax.Array | None = None  # (d_model,)


class DecoderBlock(NamedTuple):
    input_norm: jax.Array  # (d_model,)
    attention: Attention | BiasedAttention
    post_attn_norm: jax.Array  # (d_model,)
    gate_proj: jax.Array  # (d_model, d_ff)
    up_proj: jax.Array  # (d_model, d_ff)
    down_proj: jax.Array  # (d_ff, d_model)


class Model(NamedTuple):
    """A whole decoder: embedding, stacked blocks, final norm and output head."""

    embed: jax.Array  # (vocab, d_model)
    layers: DecoderBlock  # stacked: every leaf has a leading num_layers axis
    final_norm: jax.Array  # (d_model,)
    lm_head: jax.Array | None = None  # (d_model, vocab); None when tied to `embed`


def block_shapes(cfg: Config, dtype: Any = jnp.bfloat16) -> DecoderBlock:
    """One layer's parameter shapes as `jax.ShapeDtypeStruct`s: nothing is allocated."""

    def s(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    d, q, kv, h, f = cfg.d_model, cfg.q_per_kv, cfg.kv_heads, cfg.head_dim, cfg.d_ff
    projections = (s(d, q, kv, h), s(d, kv, h), s(d, kv, h), s(q, kv, h, d))
    attention: Attention | BiasedAttention = Attention(*projections)
    if cfg.qkv_bias or cfg.out_bias:
        qkv = (s(q, kv, h), s(kv, h), s(kv, h)) if cfg.qkv_bias else (None,) * 3
        attention = BiasedAttention(
            *projections, *qkv, out_bias=s(d) if cfg.out_bias else None
        )
    return DecoderBlock(
        input_norm=s(d),
        attention=attention,
        post_attn_norm=s(d),
        gate_proj=s(d, f),
        up_proj=s(d, f),
        down_proj=s(f, d),
    )


def init_block(key: jax.Array, cfg: Config, dtype: Any = jnp.float32) -> DecoderBlock:
    """Random parameters of one decoder block: unit norms, zero biases."""
    shapes = block_shapes(cfg, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    params = []
    for k, (path, sds) in zip(keys, leaves, strict=True):
        if path[-1].name.endswith("_bias"):
            params.append(jnp.zeros(sds.shape, dtype))
        elif len(sds.shape) == 1:  # norm scales
            params.append(jnp.ones(sds.shape, dtype))
        else:
            fan_in = sds.shape[0] if sds.shape[0] != cfg.q_per_kv else cfg.d_model
            params.append(jax.random.normal(k, sds.shape, dtype) / jnp.sqrt(fan_in))
    return jax.tree.unflatten(treedef, params)


def _lead(x: jax.Array, ndim: int) -> jax.Array:
    """`x` with leading axes of size 1 added up to `ndim` axes: explicit broadcasting."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return (x * jax.lax.rsqrt(var + eps)).astype(x.dtype) * _lead(scale, x.ndim)


def rope_frequencies(
    head_dim: int, theta: float, scaling: Llama3Rope | None = None
) -> np.ndarray:
    """The `head_dim // 2` rotation frequencies, float32, as `transformers` computes
    them (with Llama 3.1's smooth interpolation when `scaling` is given)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    if scaling is None:
        return inv_freq
    old = scaling.original_max_position
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(
    x: jax.Array,
    theta: float,
    *,
    scaling: Llama3Rope | None = None,
    offset: Any = 0,
) -> jax.Array:
    """Rotary embedding on `(batch, seq, *heads, head_dim)` in the rotate-half layout,
    for positions `offset, offset + 1, ...` (a decode step passes its position)."""
    seq, head_dim = x.shape[1], x.shape[-1]
    freqs = jnp.asarray(rope_frequencies(head_dim, theta, scaling))
    positions = (jnp.arange(seq) + offset).astype(jnp.float32)
    angles = positions[:, None] * freqs[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    shape = (1, seq) + (1,) * (x.ndim - 3) + (head_dim,)
    cos, sin = jnp.cos(angles).reshape(shape), jnp.sin(angles).reshape(shape)
    half = head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


def _add_bias(x: jax.Array, bias: jax.Array | None) -> jax.Array:
    return x if bias is None else x + _lead(bias, x.ndim)


def attention(p: Attention | BiasedAttention, x: jax.Array, cfg: Config) -> jax.Array:
    """Causal grouped-query attention on `x: (batch, seq, d_model)`."""
    q = jnp.einsum("bsd,dqkh->bsqkh", x, p.q_proj)
    k = jnp.einsum("bsd,dkh->bskh", x, p.k_proj)
    v = jnp.einsum("bsd,dkh->bskh", x, p.v_proj)
    q = _add_bias(q, getattr(p, "q_bias", None))
    k = _add_bias(k, getattr(p, "k_bias", None))
    v = _add_bias(v, getattr(p, "v_bias", None))
    q = rope(q, cfg.rope_theta, scaling=cfg.rope_scaling)
    k = rope(k, cfg.rope_theta, scaling=cfg.rope_scaling)
    logits = jnp.einsum("bsqkh,btkh->bqkst", q, k) / jnp.sqrt(cfg.head_dim).astype(
        x.dtype
    )
    seq = x.shape[1]
    mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    logits = jnp.where(_lead(mask, logits.ndim), logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bqkst,btkh->bsqkh", weights, v)
    out = jnp.einsum("bsqkh,qkhd->bsd", out, p.out_proj)
    return _add_bias(out, getattr(p, "out_bias", None))


def init_cache(cfg: Config, batch: int, length: int, dtype: Any = jnp.float32) -> Any:
    """One layer's KV cache: keys and values `(batch, length, kv_heads, head_dim)`."""
    shape = (batch, length, cfg.kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cached_attention(
    p: Attention | BiasedAttention, x: jax.Array, cfg: Config, cache: Any, pos: Any
) -> tuple[jax.Array, Any]:
    """`attention` of the tokens `x: (batch, seq, d_model)` at positions `pos, pos + 1,
    ...`, given a cache holding the keys and values of the positions before `pos`:
    writes theirs into the cache and attends to every position up to each token.
    With the prompt at `pos=0` it fills the cache (prefill); with one token it is a
    decode step."""
    q = _add_bias(
        jnp.einsum("bsd,dqkh->bsqkh", x, p.q_proj), getattr(p, "q_bias", None)
    )
    k = _add_bias(jnp.einsum("bsd,dkh->bskh", x, p.k_proj), getattr(p, "k_bias", None))
    v = _add_bias(jnp.einsum("bsd,dkh->bskh", x, p.v_proj), getattr(p, "v_bias", None))
    q = rope(q, cfg.rope_theta, scaling=cfg.rope_scaling, offset=pos)
    k = rope(k, cfg.rope_theta, scaling=cfg.rope_scaling, offset=pos)
    keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k, pos, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v, pos, axis=1)
    logits = jnp.einsum("bsqkh,btkh->bqkst", q, keys) / jnp.sqrt(cfg.head_dim).astype(
        x.dtype
    )
    seq, length = x.shape[1], keys.shape[1]
    mask = (jnp.arange(seq) + pos)[:, None] >= jnp.arange(length)[None, :]
    logits = jnp.where(_lead(mask, logits.ndim), logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bqkst,btkh->bsqkh", weights, values)
    out = jnp.einsum("bsqkh,qkhd->bsd", out, p.out_proj)
    return _add_bias(out, getattr(p, "out_bias", None)), {"k": keys, "v": values}


def cached_decoder_block(
    p: DecoderBlock, x: jax.Array, cfg: Config, cache: Any, pos: Any
) -> tuple[jax.Array, Any]:
    """`decoder_block` (without dropout) through `cached_attention`: `(x, cache)`."""
    h, cache = cached_attention(
        p.attention, rms_norm(x, p.input_norm, cfg.rms_eps), cfg, cache, pos
    )
    x = x + h
    y = rms_norm(x, p.post_attn_norm, cfg.rms_eps)
    return x + (jax.nn.silu(y @ p.gate_proj) * (y @ p.up_proj)) @ p.down_proj, cache


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


def model_forward(
    params: Model, tokens: jax.Array, cfg: Config, *, remat: Any = False
) -> jax.Array:
    """Logits `(batch, seq, vocab)` of `tokens: (batch, seq)`: embedding, the blocks
    scanned with `scan_layers`, final norm, then the output head (the embedding,
    transposed, when `params.lm_head` is None)."""
    x = params.embed[tokens]

    def block(x: jax.Array, layer: DecoderBlock) -> tuple[jax.Array, None]:
        return decoder_block(layer, x, cfg), None

    x, _ = scan_layers(block, x, params.layers, remat=remat)
    x = rms_norm(x, params.final_norm, cfg.rms_eps)
    head = params.embed.T if params.lm_head is None else params.lm_head
    return x @ head


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
