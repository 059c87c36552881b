"""A Hugging Face Llama checkpoint -> the stacked `DecoderBlock` of `llama_model.py`, and back.

Hugging Face stores one tensor per layer and projection, named
`model.layers.{i}.self_attn.q_proj.weight` with the `nn.Linear` layout
`(out_features, in_features)` (so `y = x @ W.T`). The scan model wants one
`DecoderBlock` whose leaves carry a leading layer axis, with attention in the
grouped-query layout `q_proj: (d_model, q_per_kv, kv_heads, head_dim)`.

`stack_by_name` does the stacking; the rest is a transpose and a reshape per
projection. Query head `h` reads kv head `h // q_per_kv` (HF's `repeat_kv`), so the
`n_heads * head_dim` output features split as `(kv_heads, q_per_kv, head_dim)`.

Run it: `python examples/hf_llama_checkpoint.py` (a few seconds on CPU). It writes a
small random checkpoint, converts it, checks the round trip is bit-exact and that
HF-style attention on the original weights equals `llama_model.attention` on the
converted ones.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_model import Attention, Config, DecoderBlock, attention

import stackedtree
from stackedtree.checkpoint import (
    flatten_names,
    load_flat,
    save_flat,
    stack_by_name,
    unflatten_names,
    unstack_by_name,
)

PATTERN = "model.layers.{i}."


def _t(w: np.ndarray) -> np.ndarray:
    """`(N, out, in)` -> `(N, in, out)`: HF's `nn.Linear` layout to `x @ W`."""
    return np.swapaxes(w, -1, -2)


def hf_to_stacked(
    flat: dict[str, np.ndarray], cfg: Config
) -> tuple[DecoderBlock, dict[str, np.ndarray]]:
    """Converts a HF Llama checkpoint into a stacked `DecoderBlock`.

    Args:
        flat: the HF tensors by name, e.g. from `load_flat`.
        cfg: the model's shapes.

    Returns:
        `(block, rest)`: the stacked decoder blocks (numpy leaves of shape
        `(num_layers, ...)`), and the tensors outside the layers (embedding, final
        norm, head) under their HF names.
    """
    s, rest = stack_by_name(flat, PATTERN)
    d, kv, q, h = cfg.d_model, cfg.kv_heads, cfg.q_per_kv, cfg.head_dim
    n = s["input_layernorm.weight"].shape[0]
    block = DecoderBlock(
        input_norm=s["input_layernorm.weight"],
        attention=Attention(
            q_proj=_t(s["self_attn.q_proj.weight"])
            .reshape(n, d, kv, q, h)
            .transpose(0, 1, 3, 2, 4),
            k_proj=_t(s["self_attn.k_proj.weight"]).reshape(n, d, kv, h),
            v_proj=_t(s["self_attn.v_proj.weight"]).reshape(n, d, kv, h),
            out_proj=_t(s["self_attn.o_proj.weight"])
            .reshape(n, kv, q, h, d)
            .transpose(0, 2, 1, 3, 4),
        ),
        post_attn_norm=s["post_attention_layernorm.weight"],
        gate_proj=_t(s["mlp.gate_proj.weight"]),
        up_proj=_t(s["mlp.up_proj.weight"]),
        down_proj=_t(s["mlp.down_proj.weight"]),
    )
    return block, rest


def stacked_to_hf(
    block: DecoderBlock, cfg: Config, rest: dict[str, Any]
) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_stacked`: a stacked `DecoderBlock` to HF tensor names.

    Args:
        block: stacked decoder blocks (numpy or jax leaves).
        cfg: the model's shapes.
        rest: the tensors outside the layers, under their HF names.

    Returns:
        The HF checkpoint, numpy arrays by name.
    """
    b = jax.tree.map(np.asarray, block)
    n = b.input_norm.shape[0]
    d, kv, q, h = cfg.d_model, cfg.kv_heads, cfg.q_per_kv, cfg.head_dim
    a = b.attention
    stacked = {
        "input_layernorm.weight": b.input_norm,
        "self_attn.q_proj.weight": _t(
            a.q_proj.transpose(0, 1, 3, 2, 4).reshape(n, d, kv * q * h)
        ),
        "self_attn.k_proj.weight": _t(a.k_proj.reshape(n, d, kv * h)),
        "self_attn.v_proj.weight": _t(a.v_proj.reshape(n, d, kv * h)),
        "self_attn.o_proj.weight": _t(
            a.out_proj.transpose(0, 2, 1, 3, 4).reshape(n, kv * q * h, d)
        ),
        "post_attention_layernorm.weight": b.post_attn_norm,
        "mlp.gate_proj.weight": _t(b.gate_proj),
        "mlp.up_proj.weight": _t(b.up_proj),
        "mlp.down_proj.weight": _t(b.down_proj),
    }
    return unstack_by_name(
        stacked, PATTERN, {k: np.asarray(v) for k, v in rest.items()}
    )


def random_hf_checkpoint(
    cfg: Config, seed: int = 0, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """A random checkpoint with HF Llama names and `(out, in)` layouts."""
    rng = np.random.default_rng(seed)
    d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
    heads, kv = cfg.kv_heads * cfg.q_per_kv, cfg.kv_heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype)

    flat = {"model.embed_tokens.weight": w(cfg.vocab, d)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        flat[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(
            dtype
        )
        flat[p + "self_attn.q_proj.weight"] = w(heads * h, d)
        flat[p + "self_attn.k_proj.weight"] = w(kv * h, d)
        flat[p + "self_attn.v_proj.weight"] = w(kv * h, d)
        flat[p + "self_attn.o_proj.weight"] = w(d, heads * h)
        flat[p + "post_attention_layernorm.weight"] = (
            1 + 0.1 * rng.standard_normal(d)
        ).astype(dtype)
        flat[p + "mlp.gate_proj.weight"] = w(f, d)
        flat[p + "mlp.up_proj.weight"] = w(f, d)
        flat[p + "mlp.down_proj.weight"] = w(d, f)
    flat["model.norm.weight"] = np.ones(d, dtype)
    flat["lm_head.weight"] = w(cfg.vocab, d)
    return flat


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """HF's rotate-half rotary embedding on `(seq, head_dim)`."""
    seq, dim = x.shape
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    angles = np.arange(seq, dtype=np.float32)[:, None] * freqs[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    rotated = np.concatenate([-x[:, dim // 2 :], x[:, : dim // 2]], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def hf_attention(
    flat: dict[str, np.ndarray], layer: int, x: np.ndarray, cfg: Config
) -> np.ndarray:
    """HF-style causal attention of one layer, written plainly head by head.

    Args:
        flat: the HF checkpoint.
        layer: the layer index.
        x: `(seq, d_model)` inputs.
        cfg: the model's shapes.

    Returns:
        `(seq, d_model)`: `o_proj(concat_h softmax(q_h k_g^T / sqrt(d)) v_g)` with
        `g = h // q_per_kv`.
    """
    p, h = f"model.layers.{layer}.self_attn.", cfg.head_dim
    wq, wk, wv, wo = (flat[p + f"{n}_proj.weight"] for n in "qkvo")
    seq = x.shape[0]
    mask = np.tril(np.ones((seq, seq), bool))
    heads = []
    for head in range(cfg.kv_heads * cfg.q_per_kv):
        g = head // cfg.q_per_kv  # repeat_kv
        q = _rope(x @ wq[head * h : (head + 1) * h].T, cfg.rope_theta)
        k = _rope(x @ wk[g * h : (g + 1) * h].T, cfg.rope_theta)
        v = x @ wv[g * h : (g + 1) * h].T
        logits = np.where(mask, q @ k.T / np.sqrt(h), -np.inf)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        heads.append(weights / weights.sum(-1, keepdims=True) @ v)
    return np.concatenate(heads, axis=-1) @ wo.T


SMALL = Config(
    d_model=32, kv_heads=2, q_per_kv=3, head_dim=8, d_ff=48, num_layers=4, vocab=50
)


def main() -> None:
    cfg = SMALL
    hf = random_hf_checkpoint(cfg)
    with tempfile.TemporaryDirectory() as folder:
        src = os.path.join(folder, "model.safetensors")
        save_flat(src, hf)

        # HF names -> stacked DecoderBlock.
        block, rest = hf_to_stacked(load_flat(src), cfg)
        print(stackedtree.describe(block))
        print("outside the layers:", sorted(rest))

        # The stacked block saves and loads by its own names (`attention.q_proj`, ...).
        out = os.path.join(folder, "block.safetensors")
        save_flat(out, flatten_names(block))
        block = unflatten_names(load_flat(out), block)

    # Back to HF names, bit for bit.
    back = stacked_to_hf(block, cfg, rest)
    assert sorted(back) == sorted(hf)
    assert all(back[k].tobytes() == hf[k].tobytes() for k in hf)
    print(f"round trip: {len(hf)} tensors bit-exact")

    # Same attention: HF's per-head loop on the original, the GQA einsums on the stack.
    x = np.random.default_rng(1).standard_normal((7, cfg.d_model)).astype(np.float32)
    for i in range(cfg.num_layers):
        layer = stackedtree.get_layer(block, i)
        with jax.numpy_rank_promotion("allow"):
            ours = np.asarray(attention(layer.attention, x[None], cfg))[0]
        np.testing.assert_allclose(
            ours, hf_attention(hf, i, x, cfg), rtol=2e-5, atol=2e-5
        )
    print(f"attention matches HF on all {cfg.num_layers} layers")


if __name__ == "__main__":
    main()
