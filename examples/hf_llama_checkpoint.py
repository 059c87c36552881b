"""Hugging Face Llama-family checkpoints <-> the stacked model of `llama_model.py`.

Hugging Face stores one tensor per layer and projection, named
`model.layers.{i}.self_attn.q_proj.weight` with the `nn.Linear` layout
`(out_features, in_features)` (so `y = x @ W.T`). The scan model wants one
`DecoderBlock` whose leaves carry a leading layer axis, with attention in the
grouped-query layout `q_proj: (d_model, q_per_kv, kv_heads, head_dim)`. Query head
`n` reads kv head `n // q_per_kv` (HF's `repeat_kv`), so the `n_heads * head_dim`
output features split as `(kv_heads, q_per_kv, head_dim)`.

The whole conversion is one rule table (`block_rules`, `model_rules`) run both ways by
`stackedtree.checkpoint.unflatten_by_rules` and `flatten_by_rules`, which refuse a
checkpoint with a tensor no rule reads (a bias the config did not announce) or a leaf
no tensor fills. `config_from_hf` reads `config.json` (transformers 4.x and 5.x) and
refuses every feature `llama_model` does not implement.

Run it: `python examples/hf_llama_checkpoint.py` (a few seconds on CPU). It writes
small random checkpoints with their `config.json`, converts them, checks the round trip
is bit-exact and that the scanned model's logits equal a plain head-by-head reference.
With `--transformers` (needs `torch` and `transformers`), it builds tiny random Llama,
Qwen2 and Mistral models with `save_pretrained` and compares logits with theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_model import (
    Config,
    DecoderBlock,
    Llama3Rope,
    Model,
    block_shapes,
    model_forward,
    rope_frequencies,
)

import stackedtree
from stackedtree.checkpoint import (
    Rule,
    flatten_by_rules,
    load_flat,
    save_flat,
    split_axis,
    transpose,
    unflatten_by_rules,
)

LAYER = "model.layers.{i}."

# ------------------------------------------------------------------ the rule table


def block_rules(cfg: Config) -> list[Rule]:
    """HF per-layer tensors <-> the leaves of a stacked `DecoderBlock`."""
    kv, q, h = cfg.kv_heads, cfg.q_per_kv, cfg.head_dim
    linear = transpose(1, 0)  # nn.Linear's (out, in) -> (in, out)
    kv_heads = (split_axis(-2, (kv, h)), transpose(2, 0, 1))  # -> (d, kv, h)
    rules = [
        Rule(LAYER + "input_layernorm.weight", "input_norm"),
        Rule(
            LAYER + "self_attn.q_proj.weight",
            "attention.q_proj",
            (split_axis(-2, (kv, q, h)), transpose(3, 1, 0, 2)),  # -> (d, q, kv, h)
        ),
        Rule(LAYER + "self_attn.k_proj.weight", "attention.k_proj", kv_heads),
        Rule(LAYER + "self_attn.v_proj.weight", "attention.v_proj", kv_heads),
        Rule(
            LAYER + "self_attn.o_proj.weight",
            "attention.out_proj",
            (split_axis(-1, (kv, q, h)), transpose(2, 1, 3, 0)),  # -> (q, kv, h, d)
        ),
        Rule(LAYER + "post_attention_layernorm.weight", "post_attn_norm"),
        Rule(LAYER + "mlp.gate_proj.weight", "gate_proj", linear),
        Rule(LAYER + "mlp.up_proj.weight", "up_proj", linear),
        Rule(LAYER + "mlp.down_proj.weight", "down_proj", linear),
    ]
    if cfg.qkv_bias:
        rules += [
            Rule(
                LAYER + "self_attn.q_proj.bias",
                "attention.q_bias",
                (split_axis(-1, (kv, q, h)), transpose(1, 0, 2)),  # -> (q, kv, h)
            ),
            Rule(
                LAYER + "self_attn.k_proj.bias",
                "attention.k_bias",
                split_axis(-1, (kv, h)),
            ),
            Rule(
                LAYER + "self_attn.v_proj.bias",
                "attention.v_bias",
                split_axis(-1, (kv, h)),
            ),
        ]
    if cfg.out_bias:
        rules.append(Rule(LAYER + "self_attn.o_proj.bias", "attention.out_bias"))
    return rules


def model_rules(cfg: Config) -> list[Rule]:
    """HF tensors <-> the leaves of a whole `Model`; no head when it is tied."""
    rules = [Rule("model.embed_tokens.weight", "embed")]
    rules += [Rule(r.name, "layers." + r.path, r.transform) for r in block_rules(cfg)]
    rules.append(Rule("model.norm.weight", "final_norm"))
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", "lm_head", transpose(1, 0)))
    return rules


def block_like(cfg: Config, dtype: Any) -> DecoderBlock:
    """The stacked `DecoderBlock`'s shapes, as `jax.ShapeDtypeStruct`s."""
    return stackedtree.stack([block_shapes(cfg, dtype)] * cfg.num_layers)


def model_like(cfg: Config, dtype: Any) -> Model:
    """The whole `Model`'s shapes, as `jax.ShapeDtypeStruct`s."""
    d, v = cfg.d_model, cfg.vocab
    return Model(
        embed=jax.ShapeDtypeStruct((v, d), dtype),
        layers=block_like(cfg, dtype),
        final_norm=jax.ShapeDtypeStruct((d,), dtype),
        lm_head=None if cfg.tie_embeddings else jax.ShapeDtypeStruct((d, v), dtype),
    )


def hf_to_model(flat: Mapping[str, Any], cfg: Config) -> Model:
    """A HF checkpoint (per-layer or stacked names) -> a `Model` of numpy arrays."""
    dtype = np.asarray(flat["model.embed_tokens.weight"]).dtype
    return unflatten_by_rules(flat, model_rules(cfg), model_like(cfg, dtype))


def model_to_hf(model: Model, cfg: Config) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_model`: HF names, numpy arrays."""
    return {
        k: np.asarray(x) for k, x in flatten_by_rules(model, model_rules(cfg)).items()
    }


def hf_to_stacked(
    flat: Mapping[str, Any], cfg: Config
) -> tuple[DecoderBlock, dict[str, Any]]:
    """Converts a HF checkpoint into a stacked `DecoderBlock`.

    Args:
        flat: the HF tensors by name, e.g. from `load_flat`.
        cfg: the model's shapes.

    Returns:
        `(block, rest)`: the stacked decoder blocks (numpy leaves of shape
        `(num_layers, ...)`), and the tensors outside the layers (embedding, final
        norm, head) under their HF names.

    Raises:
        ValueError: a layer tensor is read by no rule (a bias `cfg` does not have),
            a leaf of the block finds no tensor, or a shape differs from `cfg`'s.
    """
    layers = {k: x for k, x in flat.items() if k.startswith("model.layers.")}
    rest = {k: x for k, x in flat.items() if k not in layers}
    dtype = np.asarray(next(iter(layers.values()))).dtype if layers else np.float32
    block = unflatten_by_rules(layers, block_rules(cfg), block_like(cfg, dtype))
    return block, rest


def stacked_to_hf(
    block: DecoderBlock, cfg: Config, rest: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_stacked`: a stacked `DecoderBlock` to HF tensor names.

    Args:
        block: stacked decoder blocks (numpy or jax leaves).
        cfg: the model's shapes.
        rest: the tensors outside the layers, under their HF names.

    Returns:
        The HF checkpoint, numpy arrays by name.
    """
    flat = {
        k: np.asarray(x) for k, x in flatten_by_rules(block, block_rules(cfg)).items()
    }
    clash = sorted(set(flat) & set(rest))
    if clash:
        raise ValueError(f"`rest` holds layer tensors: {', '.join(map(repr, clash))}.")
    return {**flat, **{k: np.asarray(x) for k, x in rest.items()}}


# ----------------------------------------------------------------------- config.json

SUPPORTED = ("llama", "mistral", "qwen2")
# transformers' defaults where they differ between the supported model types.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": None, "sliding_window": None},
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "sliding_window": 4096},
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def config_from_hf(path: str | os.PathLike[str] | Mapping[str, Any]) -> Config:
    """The `Config` of a Hugging Face Llama, Mistral or Qwen2 `config.json`.

    Reads transformers 5's field names (`rope_parameters`) and 4.x's (`rope_theta`,
    `rope_scaling`), with transformers' defaults for missing optional fields.

    Args:
        path: a `config.json`, the model folder holding it, or its parsed contents.

    Returns:
        The model's `Config`.

    Raises:
        ValueError: the config asks for anything `llama_model` does not implement
            (another model type or rope type, sliding-window attention, MLP biases,
            attention dropout, an activation other than SiLU, partial rotary
            embeddings, quantized weights), naming every such field; or lacks a
            required size.
    """
    if isinstance(path, Mapping):
        hf = dict(path)
    else:
        file = Path(path)
        if file.is_dir():
            file = file / "config.json"
        hf = json.loads(file.read_text())
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(
            f"`model_type` is {kind!r}; this model implements {', '.join(SUPPORTED)}."
        )
    missing = [f for f in _REQUIRED if hf.get(f) is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(f'`{f}`' for f in missing)}.")
    get = {**_DEFAULTS[kind], **hf}.get
    problems = []

    def refuse(field: str, why: str) -> None:
        problems.append(f"`{field}` is {get(field)!r}: {why}")

    heads = hf["num_attention_heads"]
    kv_heads = get("num_key_value_heads") or heads
    if heads % kv_heads:
        refuse("num_key_value_heads", f"it does not divide {heads} query heads")
    if get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the MLP is SwiGLU (silu)")
    if get("attention_dropout", 0.0):
        refuse("attention_dropout", "the model has no attention dropout")
    if get("quantization_config") is not None:
        refuse("quantization_config", "the model reads plain, unquantized weights")
    if kind == "llama" and get("mlp_bias", False):
        refuse("mlp_bias", "the MLP has no biases")
    if kind == "mistral" and get("sliding_window") is not None:
        refuse("sliding_window", "attention is full, without a sliding window")
    if kind == "qwen2":
        layer_types = get("layer_types")
        if layer_types is not None:
            if any(t != "full_attention" for t in layer_types):
                refuse("layer_types", "every layer has full attention")
        elif (
            get("use_sliding_window", False)
            and get("sliding_window") is not None
            and get("max_window_layers", 28) < hf["num_hidden_layers"]
        ):
            refuse("use_sliding_window", "attention is full, without a sliding window")

    # transformers 5 keeps the rope settings in `rope_parameters`, 4.x in `rope_theta`
    # and `rope_scaling`.
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(hf.get(field) or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    scaling = None
    if any(isinstance(v, Mapping) for v in rope.values()):
        problems.append(f"`{field}` is per layer type: one rope serves every layer")
    elif rope_type == "llama3":
        try:
            scaling = Llama3Rope(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position=int(
                    rope.get("original_max_position_embeddings")
                    or hf["max_position_embeddings"]
                ),
            )
        except KeyError as e:
            problems.append(f"`{field}` lacks {e} for llama3 rope scaling")
    elif rope_type != "default":
        problems.append(
            f"`{field}.rope_type` is {rope_type!r}: the model implements plain rope "
            "('default') and 'llama3' scaling"
        )
    if partial not in (None, 1, 1.0):
        problems.append(
            f"`partial_rotary_factor` is {partial!r}: rope turns whole heads"
        )
    if problems:
        raise ValueError(
            "config.json asks for what llama_model does not implement:\n  "
            + "\n  ".join(problems)
        )

    bias = {
        "llama": bool(get("attention_bias", False)),
        "mistral": False,
        "qwen2": True,
    }[kind]
    return Config(
        d_model=hf["hidden_size"],
        kv_heads=kv_heads,
        q_per_kv=heads // kv_heads,
        head_dim=get("head_dim") or hf["hidden_size"] // heads,
        d_ff=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        vocab=hf["vocab_size"],
        rms_eps=float(get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        qkv_bias=bias,
        out_bias=bias and kind == "llama",
        tie_embeddings=bool(get("tie_word_embeddings", False)),
    )


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


# ------------------------------------------------------ test checkpoints and reference


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


SMALL = Config(
    d_model=32, kv_heads=2, q_per_kv=3, head_dim=8, d_ff=48, num_layers=4, vocab=50
)

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


def check_variant(cfg: Config, folder: str, *, transformers: int = 5) -> float:
    """Writes `cfg`'s checkpoint and config.json, converts them and checks the round
    trip and the logits; returns the largest logit difference from the reference."""
    hf = random_hf_checkpoint(cfg)
    save_flat(os.path.join(folder, "model.safetensors"), hf)
    Path(folder, "config.json").write_text(
        json.dumps(hf_config(cfg, transformers=transformers))
    )

    cfg = config_from_hf(folder)
    model = hf_to_model(load_flat(os.path.join(folder, "model.safetensors")), cfg)
    back = model_to_hf(model, cfg)
    assert sorted(back) == sorted(hf)
    assert all(back[k].tobytes() == hf[k].tobytes() for k in hf)

    tokens = np.random.default_rng(1).integers(0, cfg.vocab, (2, 7))
    logits = jax.jit(model_forward, static_argnums=2)(model, tokens, cfg)
    return max(
        float(
            np.max(np.abs(np.asarray(logits[b]) - reference_logits(hf, tokens[b], cfg)))
        )
        for b in range(len(tokens))
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--transformers",
        action="store_true",
        help="also compare with transformers' own models (needs torch, transformers)",
    )
    args = parser.parse_args(argv)

    cfg = SMALL
    hf = random_hf_checkpoint(cfg)
    block, rest = hf_to_stacked(hf, cfg)
    print(stackedtree.describe(block))
    print("outside the layers:", sorted(rest))
    back = stacked_to_hf(block, cfg, rest)
    assert sorted(back) == sorted(hf)
    assert all(back[k].tobytes() == hf[k].tobytes() for k in hf)
    print(f"round trip: {len(hf)} tensors bit-exact")

    for name, variant in VARIANTS.items():
        with tempfile.TemporaryDirectory() as folder:
            err = check_variant(variant, folder)
        assert err < 1e-4, (name, err)
        print(f"{name}: logits match the reference (max |difference| < 1e-4)")

    if args.transformers:
        lines = compare_with_transformers()
        print("\n".join(lines))
        for line in lines[1:]:
            err = float(line.split("max |logit difference| ")[1].split(",")[0])
            tolerance = 2e-5 if "float32" in line else 0.2
            if err >= tolerance:
                raise SystemExit(f"outside the tolerance {tolerance}: {line}")


# --------------------------------------------------- against transformers' own models


def compare_with_transformers(seq: int = 12) -> list[str]:
    """Builds tiny random models with `transformers` (Llama plain, with
    `attention_bias`, with llama3 rope and tied embeddings; Qwen2; Mistral), saves
    each with `save_pretrained` in several shards, loads it with `config_from_hf` and
    `hf_to_model`, and compares `model_forward`'s logits with transformers'.

    Returns:
        One line per model and dtype: the largest absolute logit difference and the
        logits' largest magnitude.
    """
    import torch
    import transformers as tf

    small = dict(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    v5 = int(tf.__version__.split(".")[0]) >= 5
    llama3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    llama3["original_max_position_embeddings"] = 8
    if v5:
        llama3_kw: dict[str, Any] = dict(
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, **llama3)
        )
    else:
        llama3_kw = dict(
            rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **llama3)
        )
    models = {
        "Llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rms_norm_eps=1e-5)),
        "Llama attention_bias": (
            tf.LlamaConfig,
            tf.LlamaForCausalLM,
            dict(attention_bias=True),
        ),
        "Llama llama3 rope, tied": (
            tf.LlamaConfig,
            tf.LlamaForCausalLM,
            dict(tie_word_embeddings=True, **llama3_kw),
        ),
        "Qwen2 tied": (
            tf.Qwen2Config,
            tf.Qwen2ForCausalLM,
            dict(tie_word_embeddings=True),
        ),
        "Qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "Mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=None)),
    }
    lines = [f"transformers {tf.__version__}, torch {torch.__version__}"]
    for name, (config_cls, model_cls, kw) in models.items():
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = model_cls(config_cls(**small, **kw)).eval()
            with torch.no_grad():  # weights that make every term count
                for pname, p in model.named_parameters():
                    if pname.endswith("norm.weight"):
                        p.copy_(1 + 0.1 * torch.randn_like(p))
                    elif pname.endswith("bias"):
                        p.copy_(0.5 * torch.randn_like(p))
                    else:
                        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            model = model.to(dtype)
            tokens = torch.randint(0, small["vocab_size"], (2, seq))
            with torch.no_grad():
                want = model(tokens).logits.float().numpy()
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder, max_shard_size="40KB")
                shards = sorted(Path(folder).glob("*.safetensors"))
                index = Path(folder, "model.safetensors.index.json")
                cfg = config_from_hf(folder)
                flat = load_flat(str(index) if index.exists() else str(shards[0]))
            params = hf_to_model(flat, cfg)
            got = jax.jit(model_forward, static_argnums=2)(params, tokens.numpy(), cfg)
            got = np.asarray(got, np.float32)
            err = float(np.max(np.abs(got - want)))
            line = (
                f"{name} ({len(shards)} shards, {str(dtype).split('.')[-1]}): "
                f"max |logit difference| {err:.1e}, max |logit| "
                f"{np.max(np.abs(want)):.1f}"
            )
            if dtype != torch.float32:
                # The noise of bfloat16 arithmetic itself: transformers' bfloat16
                # logits against its float32 logits of the same (rounded) weights.
                with torch.no_grad():
                    exact = model.float()(tokens).logits.numpy()
                line += f"; transformers' own {np.max(np.abs(want - exact)):.1e}"
            lines.append(line)
    return lines


if __name__ == "__main__":
    main()
