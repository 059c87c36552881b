"""Hugging Face Llama-family checkpoints <-> the stacked model of `llama_model.py`.

Hugging Face stores one tensor per layer and projection, named
`model.layers.{i}.self_attn.q_proj.weight`, in the `nn.Linear` layout `(out, in)`. The
scan model wants one `DecoderBlock` whose leaves carry a leading layer axis, attention
in the grouped-query layout `q_proj: (d_model, q_per_kv, kv_heads, head_dim)`. Query
head `n` reads kv head `n // q_per_kv` (HF's `repeat_kv`), so the `n_heads * head_dim`
output features split as `(kv_heads, q_per_kv, head_dim)`. One rule table
(`block_rules`, `model_rules`) runs both ways through `unflatten_by_rules` and
`flatten_by_rules`, which refuse a tensor no rule reads (a bias the config did not
announce) and a leaf no tensor fills. `config_from_hf` reads `config.json`
(transformers 4.x and 5.x) and refuses what `llama_model` does not implement.

Run `python examples/hf_llama_checkpoint.py [FOLDER]`: converts a Llama, Mistral or
Qwen2 folder (`config.json` and safetensors; without one, a tiny random Llama) to
stacked blocks and back, bit for bit, and runs the model. `--transformers` (needs
torch and transformers) also compares logits with transformers' own models
(`tools/compare_transformers.py`); the tests compare them with a head-by-head
reference (`tests/hf_llama_reference.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llama_model
from llama_model import Config, DecoderBlock, Llama3Rope, Model, block_shapes

import stackedtree
from stackedtree.checkpoint import (
    Rule,
    flatten_by_rules,
    load_flat,
    split_axis,
    transpose,
    unflatten_by_rules,
)

LAYER = "model.layers.{i}."
SMALL = Config(
    d_model=32, kv_heads=2, q_per_kv=3, head_dim=8, d_ff=48, num_layers=4, vocab=50
)

# ------------------------------------------------------------------ the rule table


def block_rules(cfg: Config) -> list[Rule]:
    """HF per-layer tensors <-> the leaves of a stacked `DecoderBlock`."""
    kv, q, h = cfg.kv_heads, cfg.q_per_kv, cfg.head_dim
    linear = transpose(1, 0)  # nn.Linear's (out, in) -> (in, out)
    # The heads * head_dim features split kv-major: query head n reads kv head n // q.
    q_heads = (split_axis(-2, (kv, q, h)), transpose(3, 1, 0, 2))  # -> (d, q, kv, h)
    kv_heads = (split_axis(-2, (kv, h)), transpose(2, 0, 1))  # -> (d, kv, h)
    out_heads = (split_axis(-1, (kv, q, h)), transpose(2, 1, 3, 0))  # -> (q, kv, h, d)
    rules = [
        Rule(LAYER + "input_layernorm.weight", "input_norm"),
        Rule(LAYER + "self_attn.q_proj.weight", "attention.q_proj", q_heads),
        Rule(LAYER + "self_attn.k_proj.weight", "attention.k_proj", kv_heads),
        Rule(LAYER + "self_attn.v_proj.weight", "attention.v_proj", kv_heads),
        Rule(LAYER + "self_attn.o_proj.weight", "attention.out_proj", out_heads),
        Rule(LAYER + "post_attention_layernorm.weight", "post_attn_norm"),
        Rule(LAYER + "mlp.gate_proj.weight", "gate_proj", linear),
        Rule(LAYER + "mlp.up_proj.weight", "up_proj", linear),
        Rule(LAYER + "mlp.down_proj.weight", "down_proj", linear),
    ]
    if cfg.qkv_bias:
        q_bias = (split_axis(-1, (kv, q, h)), transpose(1, 0, 2))  # -> (q, kv, h)
        kv_bias = split_axis(-1, (kv, h))  # -> (kv, h)
        rules.append(Rule(LAYER + "self_attn.q_proj.bias", "attention.q_bias", q_bias))
        rules += [
            Rule(LAYER + f"self_attn.{n}_proj.bias", f"attention.{n}_bias", kv_bias)
            for n in "kv"
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
    flat = flatten_by_rules(model, model_rules(cfg))
    return {k: np.asarray(x) for k, x in flat.items()}


def hf_to_stacked(
    flat: Mapping[str, Any], cfg: Config
) -> tuple[DecoderBlock, dict[str, Any]]:
    """A HF checkpoint -> `(block, rest)`: the stacked `DecoderBlock` (numpy leaves of
    shape `(num_layers, ...)`) and the tensors outside the layers under their HF names.
    A layer tensor no rule reads, a leaf no tensor fills or a shape other than `cfg`'s
    is a `ValueError`."""
    layers = {k: x for k, x in flat.items() if k.startswith("model.layers.")}
    rest = {k: x for k, x in flat.items() if k not in layers}
    dtype = np.asarray(next(iter(layers.values()))).dtype if layers else np.float32
    block = unflatten_by_rules(layers, block_rules(cfg), block_like(cfg, dtype))
    return block, rest


def stacked_to_hf(
    block: DecoderBlock, cfg: Config, rest: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_stacked`: stacked blocks (numpy or jax leaves) and the
    tensors outside the layers -> the HF checkpoint, numpy arrays by name."""
    flat = flatten_by_rules(block, block_rules(cfg))
    clash = sorted(set(flat) & set(rest))
    if clash:
        raise ValueError(f"`rest` holds layer tensors: {', '.join(map(repr, clash))}.")
    return {k: np.asarray(x) for k, x in {**flat, **rest}.items()}


# ----------------------------------------------------------------------- config.json

SUPPORTED = ("llama", "mistral", "qwen2")
# transformers' defaults where they differ between the supported model types.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": None, "sliding_window": None},
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "sliding_window": 4096},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
_REQUIRED += ("num_attention_heads",)


def config_from_hf(path: str | os.PathLike[str] | Mapping[str, Any]) -> Config:
    """The `Config` of a Hugging Face Llama, Mistral or Qwen2 `config.json` (a file,
    the folder holding it, or its parsed contents) as transformers 5 (`rope_parameters`)
    or 4.x (`rope_theta`, `rope_scaling`) writes it, with transformers' defaults.

    Raises `ValueError` naming every field that asks for what `llama_model` does not
    implement (another model or rope type, sliding windows, MLP biases, attention
    dropout, an activation other than SiLU, partial rotary embeddings, quantized
    weights), or a missing required size.
    """
    if isinstance(path, Mapping):
        hf = dict(path)
    else:
        file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
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
    heads = hf["num_attention_heads"]
    kv_heads = get("num_key_value_heads") or heads
    theta, scaling, rope_problems = _rope(hf)
    problems = _refusals(hf, kind, kv_heads) + rope_problems
    if problems:
        raise ValueError(
            "config.json asks for what llama_model does not implement:\n  "
            + "\n  ".join(problems)
        )
    bias = kind == "qwen2" or (kind == "llama" and bool(get("attention_bias", False)))
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


def _refusals(hf: dict[str, Any], kind: str, kv_heads: int) -> list[str]:
    """What `hf`, a `kind` config, asks for beyond rope that the model lacks."""
    get = {**_DEFAULTS[kind], **hf}.get
    problems = []

    def refuse(field: str, why: str) -> None:
        problems.append(f"`{field}` is {get(field)!r}: {why}")

    heads = hf["num_attention_heads"]
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
    layer_types = get("layer_types")
    if kind == "qwen2" and layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            refuse("layer_types", "every layer has full attention")
    elif kind == "qwen2" and (
        get("use_sliding_window", False)
        and get("sliding_window") is not None
        and get("max_window_layers", 28) < hf["num_hidden_layers"]
    ):
        refuse("use_sliding_window", "attention is full, without a sliding window")
    return problems


def _rope(hf: dict[str, Any]) -> tuple[float, Llama3Rope | None, list[str]]:
    """`(theta, llama3 scaling or None, problems)` of a config's rope settings:
    transformers 5 keeps them in `rope_parameters`, 4.x in `rope_theta` and
    `rope_scaling`."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(hf.get(field) or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    scaling, problems = None, []
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
    return theta, scaling, problems


# ----------------------------------------------------------------------------- run it


def random_model(cfg: Config, seed: int = 0) -> Model:
    """A `Model` of random float32 weights, to try the conversion on."""
    rng = np.random.default_rng(seed)

    def draw(s: jax.ShapeDtypeStruct) -> np.ndarray:
        return (rng.standard_normal(s.shape) / np.sqrt(s.shape[-1])).astype(s.dtype)

    return jax.tree.map(draw, model_like(cfg, np.float32))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folder", nargs="?", help="a model folder (default: a tiny random Llama)"
    )
    parser.add_argument(
        "--transformers", action="store_true", help="compare with transformers' models"
    )
    args = parser.parse_args(argv)

    if args.folder:
        cfg = config_from_hf(args.folder)
        hf = load_flat(args.folder)
    else:
        cfg = SMALL
        hf = model_to_hf(random_model(cfg), cfg)
    block, rest = hf_to_stacked(hf, cfg)
    print(stackedtree.describe(block))
    print("outside the layers:", sorted(rest))
    back = stacked_to_hf(block, cfg, rest)
    assert sorted(back) == sorted(hf)
    assert all(back[k].tobytes() == np.asarray(hf[k]).tobytes() for k in hf)
    print(f"round trip: {len(hf)} tensors bit-exact")

    model = hf_to_model(hf, cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, (2, 8))
    logits = jax.jit(llama_model.model_forward, static_argnums=2)(model, tokens, cfg)
    print(f"logits of 2 sequences of 8 tokens: {logits.shape}, {logits.dtype}")

    if args.transformers:  # a failure outside the tolerance exits non-zero
        tools = Path(__file__).resolve().parent.parent / "tools"
        sys.path.insert(0, str(tools))
        import compare_transformers

        compare_transformers.main()


if __name__ == "__main__":
    main()
