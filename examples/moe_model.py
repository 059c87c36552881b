"""A mixture-of-experts decoder (Qwen3-MoE, Mixtral) written as NamedTuples.

A layer is a `Block`: attention, then either a dense SwiGLU `MLP` or `Experts`, E SwiGLU
experts of which a router picks `top_k` per token. The model keeps one stack per kind
of layer (`Model.layers`: `{"dense": Block, "moe": Block}`, leaves with a leading layer
axis; expert weights `(N, E, ...)`) and runs them in order with
`stackedtree.scan_pattern`. Every array operation spells its broadcasting out, so the
model runs under `jax.numpy_rank_promotion("raise")`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from llama_model import rms_norm, rope

from stackedtree import scan_pattern


class Config(NamedTuple):
    model_type: str  # "qwen3_moe" or "mixtral": the checkpoint's names
    vocab: int
    d_model: int
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    d_ff: int  # the dense layers' MLP width
    d_expert: int  # each expert's MLP width
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]  # the other layers are dense
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities
    qk_norm: bool = False  # RMS norms on each query and key head (Qwen3)
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    @property
    def pattern(self) -> list[str]:
        """Each layer's kind, in order: `"dense"` or `"moe"`."""
        moe = set(self.moe_layers)
        return ["moe" if i in moe else "dense" for i in range(self.num_layers)]

    @property
    def kinds(self) -> dict[str, list[int]]:
        """Each kind's layers, kinds in the order of their first layers."""
        kinds: dict[str, list[int]] = {}
        for i, kind in enumerate(self.pattern):
            kinds.setdefault(kind, []).append(i)
        return kinds


class Attention(NamedTuple):
    q_proj: jax.Array  # (d_model, heads, head_dim)
    k_proj: jax.Array  # (d_model, kv_heads, head_dim)
    v_proj: jax.Array  # (d_model, kv_heads, head_dim)
    o_proj: jax.Array  # (heads, head_dim, d_model)
    q_norm: jax.Array | None = None  # (head_dim,), with `qk_norm`
    k_norm: jax.Array | None = None  # (head_dim,)


class MLP(NamedTuple):
    gate_proj: jax.Array  # (d_model, d_ff)
    up_proj: jax.Array  # (d_model, d_ff)
    down_proj: jax.Array  # (d_ff, d_model)


class Experts(NamedTuple):
    router: jax.Array  # (d_model, E)
    gate_proj: jax.Array  # (E, d_model, d_expert)
    up_proj: jax.Array  # (E, d_model, d_expert)
    down_proj: jax.Array  # (E, d_expert, d_model)


class Block(NamedTuple):
    input_norm: jax.Array  # (d_model,)
    attention: Attention
    post_attn_norm: jax.Array  # (d_model,)
    mlp: MLP | Experts


class Model(NamedTuple):
    embed: jax.Array  # (vocab, d_model)
    layers: dict[str, Block]  # per kind, stacked: leaves (N_kind, ...)
    final_norm: jax.Array  # (d_model,)
    lm_head: jax.Array | None = None  # (d_model, vocab); None when tied to `embed`


def block_shapes(cfg: Config, kind: str, dtype: Any) -> Block:
    """One layer's parameter shapes as `jax.ShapeDtypeStruct`s."""

    def s(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    d, h, e, f = cfg.d_model, cfg.head_dim, cfg.num_experts, cfg.d_expert
    norms = (s(h), s(h)) if cfg.qk_norm else (None, None)
    attention = Attention(
        s(d, cfg.heads, h), s(d, cfg.kv_heads, h), s(d, cfg.kv_heads, h),
        s(cfg.heads, h, d), *norms,
    )  # fmt: skip
    mlp: MLP | Experts = (
        Experts(s(d, e), s(e, d, f), s(e, d, f), s(e, f, d))
        if kind == "moe"
        else MLP(s(d, cfg.d_ff), s(d, cfg.d_ff), s(cfg.d_ff, d))
    )
    return Block(s(d), attention, s(d), mlp)


def attention(p: Attention, x: jax.Array, cfg: Config) -> jax.Array:
    """Causal grouped-query attention on `x: (batch, seq, d_model)`: query head `n`
    reads kv head `n // (heads // kv_heads)`, as transformers' `repeat_kv` does."""
    b, s, _ = x.shape
    q = jnp.einsum("bsd,dnh->bsnh", x, p.q_proj)
    k = jnp.einsum("bsd,dnh->bsnh", x, p.k_proj)
    v = jnp.einsum("bsd,dnh->bsnh", x, p.v_proj)
    if p.q_norm is not None and p.k_norm is not None:
        q, k = rms_norm(q, p.q_norm, cfg.rms_eps), rms_norm(k, p.k_norm, cfg.rms_eps)
    q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    q = q.reshape(b, s, cfg.kv_heads, cfg.heads // cfg.kv_heads, cfg.head_dim)
    logits = jnp.einsum("bsgrh,btgh->bgrst", q, k) * cfg.head_dim**-0.5
    mask = jnp.tril(jnp.ones((s, s), dtype=bool)).reshape(1, 1, 1, s, s)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bgrst,btgh->bsgrh", weights, v).reshape(b, s, cfg.heads, -1)
    return jnp.einsum("bsnh,nhd->bsd", out, p.o_proj)


def router_weights(p: Experts, x: jax.Array, cfg: Config) -> jax.Array:
    """Each token's weight for each expert, `(batch, seq, E)`: the softmax of the
    router logits (in float32) on the `top_k` largest, zero elsewhere."""
    probs = jax.nn.softmax((x @ p.router).astype(jnp.float32), axis=-1)
    top, chosen = jax.lax.top_k(probs, cfg.top_k)  # (batch, seq, top_k)
    if cfg.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    one_hot = jax.nn.one_hot(chosen, cfg.num_experts, dtype=top.dtype)
    return jnp.einsum("bsk,bske->bse", top, one_hot).astype(x.dtype)


def experts(p: Experts, x: jax.Array, cfg: Config) -> jax.Array:
    """The mixture: every expert on every token, weighted by `router_weights`.

    Exact (an expert not chosen has weight 0) and plain, at `E / top_k` times the
    work of running the chosen experts only; at scale, sort the tokens by expert and
    run a grouped matmul (`jax.lax.ragged_dot`) instead.
    """
    gate = jnp.einsum("bsd,edf->bsef", x, p.gate_proj)
    up = jnp.einsum("bsd,edf->bsef", x, p.up_proj)
    out = jnp.einsum("bsef,efd->bsed", jax.nn.silu(gate) * up, p.down_proj)
    return jnp.einsum("bsed,bse->bsd", out, router_weights(p, x, cfg))


def decoder_block(p: Block, x: jax.Array, cfg: Config) -> jax.Array:
    """One pre-norm layer: attention, then the dense MLP or the experts."""
    x = x + attention(p.attention, rms_norm(x, p.input_norm, cfg.rms_eps), cfg)
    y = rms_norm(x, p.post_attn_norm, cfg.rms_eps)
    if isinstance(p.mlp, Experts):
        return x + experts(p.mlp, y, cfg)
    m = p.mlp
    return x + (jax.nn.silu(y @ m.gate_proj) * (y @ m.up_proj)) @ m.down_proj


def model_forward(model: Model, tokens: jax.Array, cfg: Config) -> jax.Array:
    """Logits `(batch, seq, vocab)` of `tokens: (batch, seq)`, in the weights' dtype:
    the embedding, the layers in the order of `cfg.pattern` (`scan_pattern` over one
    stack per kind), the final norm and the output head."""

    def layer(x: jax.Array, p: Block) -> tuple[jax.Array, None]:
        return decoder_block(p, x, cfg), None

    x = model.embed[tokens]
    x, _ = scan_pattern(
        dict.fromkeys(model.layers, layer), x, model.layers, cfg.pattern
    )
    x = rms_norm(x, model.final_norm, cfg.rms_eps)
    return x @ (model.embed.T if model.lm_head is None else model.lm_head)
