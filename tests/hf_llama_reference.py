"""What checks `examples/hf_llama_checkpoint.py`: checkpoints and configs as transformers
writes them, and the logits its `LlamaForCausalLM` computes, written out plainly.

- `random_hf_checkpoint`: random tensors under Hugging Face Llama names, in the
  `(out, in)` layout, built without the example's rules (so a rule that transposes or
  splits wrongly cannot go unseen); norm scales near 1 and large biases, so every term
  counts.
- `hf_config`: a `config.json` as transformers 5 (or 4.x) writes it, the inverse of
  `config_from_hf`.
- `reference_logits`: a float64 numpy model of the Hugging Face tensors as stored, every
  head in a Python loop.
- `VARIANTS` and `check_variant`: the model families checked end to end, from files on
  disk to logits.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from ckptgen import flat_bits_equal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import hf_llama_checkpoint as ex
from llama_model import Config, Llama3Rope, model_forward, rope_frequencies

from stackedtree.checkpoint import load_flat, save_flat

SMALL = ex.SMALL
VARIANTS = {
    "Llama 2": SMALL._replace(rms_eps=1e-5),
    "Llama, attention_bias": SMALL._replace(qkv_bias=True, out_bias=True),
    "Llama 3.2 (llama3 rope, tied)": SMALL._replace(
        rope_theta=500000.0,
        rope_scaling=Llama3Rope(32.0, 1.0, 4.0, 16),
        tie_embeddings=True,
    ),
    "Qwen2": SMALL._replace(qkv_bias=True, rope_theta=1000000.0),
}


def random_hf_checkpoint(
    cfg: Config, seed: int = 0, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """A random checkpoint with HF Llama names and `(out, in)` layouts."""
    rng = np.random.default_rng(seed)
    d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
    heads, kv = cfg.kv_heads * cfg.q_per_kv, cfg.kv_heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(d)).astype(dtype)

    def bias(n: int) -> np.ndarray:
        return (0.5 * rng.standard_normal(n)).astype(dtype)

    flat = {"model.embed_tokens.weight": w(cfg.vocab, d)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        flat[p + "input_layernorm.weight"] = norm()
        for name, rows in (("q", heads * h), ("k", kv * h), ("v", kv * h)):
            flat[p + f"self_attn.{name}_proj.weight"] = w(rows, d)
            if cfg.qkv_bias:
                flat[p + f"self_attn.{name}_proj.bias"] = bias(rows)
        flat[p + "self_attn.o_proj.weight"] = w(d, heads * h)
        if cfg.out_bias:
            flat[p + "self_attn.o_proj.bias"] = bias(d)
        flat[p + "post_attention_layernorm.weight"] = norm()
        flat[p + "mlp.gate_proj.weight"] = w(f, d)
        flat[p + "mlp.up_proj.weight"] = w(f, d)
        flat[p + "mlp.down_proj.weight"] = w(d, f)
    flat["model.norm.weight"] = norm()
    if not cfg.tie_embeddings:
        flat["lm_head.weight"] = w(cfg.vocab, d)
    return flat


def hf_config(cfg: Config, *, transformers: int = 5) -> dict[str, Any]:
    """A `config.json` for `cfg` as transformers 5 (or 4.x) writes it: the inverse
    of `config_from_hf`. Biases on q, k and v alone make a Qwen2 config."""
    qwen2 = cfg.qkv_bias and not cfg.out_bias
    if cfg.out_bias and not cfg.qkv_bias:
        raise ValueError("no supported model type has an output bias alone.")
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.kv_heads * cfg.q_per_kv,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": cfg.rms_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
    }
    if qwen2:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=28)
    else:
        out.update(attention_bias=cfg.out_bias, mlp_bias=False, pretraining_tp=1)
    scaling = {}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
    if transformers >= 5:
        out["rope_parameters"] = {
            "rope_type": "default",
            **scaling,
            "rope_theta": cfg.rope_theta,
        }
    else:
        out.update(rope_theta=cfg.rope_theta, rope_scaling=scaling or None)
    return out


def reference_logits(
    flat: Mapping[str, np.ndarray], tokens: np.ndarray, cfg: Config
) -> np.ndarray:
    """Logits of one sequence `tokens: (seq,)`, computed in float64 on the HF tensors
    as transformers' `LlamaForCausalLM` does, plainly, head by head."""

    def t(name: str) -> np.ndarray:
        return np.asarray(flat[name], np.float64)

    def rms_norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_eps)

    h, seq = cfg.head_dim, len(tokens)
    freqs = rope_frequencies(h, cfg.rope_theta, cfg.rope_scaling).astype(np.float64)
    angles = np.arange(seq)[:, None] * freqs[None, :]
    cos, sin = np.cos(np.tile(angles, 2)), np.sin(np.tile(angles, 2))

    def rope(x: np.ndarray) -> np.ndarray:
        return x * cos + np.concatenate([-x[:, h // 2 :], x[:, : h // 2]], -1) * sin

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        y = x @ t(name + ".weight").T
        return y + t(name + ".bias") if name + ".bias" in flat else y

    mask = np.tril(np.ones((seq, seq), bool))
    x = t("model.embed_tokens.weight")[tokens]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        y = rms_norm(x, t(p + "input_layernorm.weight"))
        q, k, v = (linear(y, p + f"self_attn.{n}_proj") for n in "qkv")
        heads = []
        for n in range(cfg.kv_heads * cfg.q_per_kv):
            g = n // cfg.q_per_kv  # repeat_kv
            qn, kg = rope(q[:, n * h : (n + 1) * h]), rope(k[:, g * h : (g + 1) * h])
            logits = np.where(mask, qn @ kg.T / np.sqrt(h), -np.inf)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            heads.append(weights @ v[:, g * h : (g + 1) * h])
        x = x + linear(np.concatenate(heads, -1), p + "self_attn.o_proj")
        y = rms_norm(x, t(p + "post_attention_layernorm.weight"))
        gate, up = linear(y, p + "mlp.gate_proj"), linear(y, p + "mlp.up_proj")
        x = x + linear(gate / (1 + np.exp(-gate)) * up, p + "mlp.down_proj")
    x = rms_norm(x, t("model.norm.weight"))
    head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    return x @ t(head).T


def check_variant(cfg: Config, folder: str, *, transformers: int = 5) -> float:
    """Writes `cfg`'s checkpoint and config.json, converts them and checks the round
    trip and the logits; returns the largest logit difference from the reference."""
    hf = random_hf_checkpoint(cfg)
    save_flat(os.path.join(folder, "model.safetensors"), hf)
    Path(folder, "config.json").write_text(
        json.dumps(hf_config(cfg, transformers=transformers))
    )

    cfg = ex.config_from_hf(folder)
    model = ex.hf_to_model(load_flat(os.path.join(folder, "model.safetensors")), cfg)
    back = ex.model_to_hf(model, cfg)
    assert sorted(back) == sorted(hf)
    assert flat_bits_equal(back, hf)

    tokens = np.random.default_rng(1).integers(0, cfg.vocab, (2, 7))
    logits = jax.jit(model_forward, static_argnums=2)(model, tokens, cfg)
    return max(
        float(
            np.max(np.abs(np.asarray(logits[b]) - reference_logits(hf, tokens[b], cfg)))
        )
        for b in range(len(tokens))
    )


def check_variants() -> None:
    """Runs `check_variant` on every variant, printing one line each."""
    for name, cfg in VARIANTS.items():
        with tempfile.TemporaryDirectory() as folder:
            err = check_variant(cfg, folder)
        assert err < 1e-4, (name, err)
        print(f"{name}: logits match the reference (max |difference| < 1e-4)")
