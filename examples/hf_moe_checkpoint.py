"""Hugging Face mixture-of-experts checkpoints <-> the stacked model of `moe_model.py`.

Qwen3-MoE and Mixtral store one tensor per layer, projection and expert, in
`nn.Linear`'s `(out, in)` layout: `model.layers.{i}.mlp.experts.{e}.gate_proj.weight`
(Mixtral: `block_sparse_moe.experts.{e}.w1`). The model wants one stack per kind of
layer (Qwen3-MoE's `mlp_only_layers` are dense), each expert weight one `(N, E, ...)`
array. Two steps: `stack_kinds` stacks each kind's layers and their experts
(`model.layers.{i:moe}.mlp.experts.{e}.gate_proj.weight`, shape `(N_moe, E, ...)`);
a rule table (`model_rules`), run both ways by `unflatten_by_rules` and
`flatten_by_rules`, changes layouts and refuses a tensor the config did not announce
(Qwen2-MoE's shared experts) or a leaf nothing fills. `config_from_hf` reads
`config.json` (transformers 4.x and 5.x) and refuses by name what the model lacks.

Run it: `python examples/hf_moe_checkpoint.py MODEL_FOLDER --tokens 1 2 3` prints the
model's shapes and the logits' argmax per position; the folder holds per-layer shards
or a file `stackedtree stack` wrote. `--transformers [PYTHON]` compares the logits
with transformers' own forward, run by an interpreter that has torch and transformers
(`tools/compare_moe_transformers.py`); a float32 difference over 2e-5 exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moe_model import Config, Model, block_shapes, model_forward

import stackedtree
from stackedtree.checkpoint import (
    Rule,
    flatten_by_rules,
    load_flat,
    split_axis,
    stack_by_name,
    transpose,
    unflatten_by_rules,
)

PATTERN = "model.layers.{i}."
# A stacked name, as `stackedtree stack` writes it: `model.layers.{i}.key`, or
# `model.layers.{i:B}.key` for the layers of kind B when the layers differ.
STACKED = re.compile(r"model\.layers\.\{i(?::(\w+))?\}\.(.*)")
# Each model type's MoE names: (the MoE module, its gate, up and down projections).
MOE_NAMES = {
    "qwen3_moe": ("mlp.", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe.", "w1", "w3", "w2"),
}

# ------------------------------------------------------------- kinds and experts


def expert_pattern(cfg: Config) -> str:
    return MOE_NAMES[cfg.model_type][0] + "experts.{e}."


def stacked_name(kind: str, key: str) -> str:  # `model.layers.{i:moe}.key`
    return PATTERN.replace("{i}", "{i:" + kind + "}") + key


def stack_kinds(flat: Mapping[str, Any], cfg: Config) -> dict[str, Any]:
    """HF names, per layer or stacked -> each kind's layers stacked, experts too:
    `model.layers.{i:moe}.mlp.experts.{e}.gate_proj.weight`, shape `(N_moe, E, ...)`.
    Other names are kept. A stacked file's kinds are told apart by their keys."""
    kinds = cfg.kinds
    if not any(STACKED.fullmatch(name) for name in flat):
        experts = expert_pattern(cfg) if "moe" in kinds else None
        stacked, rest = stack_by_name(flat, PATTERN, layers=kinds, experts=experts)
    else:
        labels: dict[str | None, dict[str, Any]] = {}
        rest = {}
        for name, x in flat.items():
            m = STACKED.fullmatch(name)
            if m is None:
                rest[name] = x
            else:
                labels.setdefault(m[1], {})[m[2]] = x
        stacked = {}
        router = MOE_NAMES[cfg.model_type][0] + "gate.weight"
        for label, part in labels.items():
            kind = "moe" if router in part else "dense"
            n = len(next(iter(part.values())))
            if kind in stacked or n != len(kinds.get(kind, ())):
                raise ValueError(
                    f"the stacked layers {label or 'i'} ({n} {kind} layers) do not "
                    f"fit the config's {kind} layers {kinds.get(kind, [])}."
                )
            stacked[kind] = part
    out = {
        stacked_name(kind, k): x
        for kind, part in stacked.items()
        for k, x in part.items()
    }
    return out | rest


# ------------------------------------------------------------------ the rule table


def block_rules(cfg: Config, kind: str) -> list[Rule]:
    """The HF tensors of one kind's stacked layers <-> its stacked `Block`."""
    h, L = cfg.head_dim, stacked_name(kind, "")
    linear = transpose(1, 0)  # nn.Linear's (out, in) -> (in, out)
    heads = (split_axis(-2, (-1, h)), transpose(2, 0, 1))  # -> (d, heads, h)
    out = (split_axis(-1, (-1, h)), transpose(1, 2, 0))  # -> (heads, h, d)
    rules = [
        Rule(L + "input_layernorm.weight", "input_norm"),
        Rule(L + "self_attn.q_proj.weight", "attention.q_proj", heads),
        Rule(L + "self_attn.k_proj.weight", "attention.k_proj", heads),
        Rule(L + "self_attn.v_proj.weight", "attention.v_proj", heads),
        Rule(L + "self_attn.o_proj.weight", "attention.o_proj", out),
        Rule(L + "post_attention_layernorm.weight", "post_attn_norm"),
    ]
    if cfg.qk_norm:
        rules.append(Rule(L + "self_attn.q_norm.weight", "attention.q_norm"))
        rules.append(Rule(L + "self_attn.k_norm.weight", "attention.k_norm"))
    moe, gate, up, down = MOE_NAMES[cfg.model_type]
    leaves = ("gate_proj", "up_proj", "down_proj")
    if kind == "moe":  # experts: (N, E, out, in) -> (N, E, in, out)
        rules.append(Rule(L + moe + "gate.weight", "mlp.router", linear))
        mlp, names = L + expert_pattern(cfg), (gate, up, down)
    else:
        mlp, names = L + "mlp.", leaves
    for name, leaf in zip(names, leaves, strict=True):
        rules.append(Rule(f"{mlp}{name}.weight", "mlp." + leaf, linear))
    return rules


def model_rules(cfg: Config) -> list[Rule]:
    """HF tensors (as `stack_kinds` gives them) <-> the leaves of a whole `Model`."""
    rules = [Rule("model.embed_tokens.weight", "embed")]
    for kind in cfg.kinds:
        rules += [
            Rule(r.name, f"layers.{kind}.{r.path}", r.transform)
            for r in block_rules(cfg, kind)
        ]
    rules.append(Rule("model.norm.weight", "final_norm"))
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", "lm_head", transpose(1, 0)))
    return rules


def model_like(cfg: Config, dtype: Any) -> Model:
    """The whole `Model`'s shapes, as `jax.ShapeDtypeStruct`s."""

    def s(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    layers = {
        kind: stackedtree.stack([block_shapes(cfg, kind, dtype)] * len(layers))
        for kind, layers in cfg.kinds.items()
    }
    head = None if cfg.tie_embeddings else s(cfg.d_model, cfg.vocab)
    return Model(s(cfg.vocab, cfg.d_model), layers, s(cfg.d_model), head)


def hf_to_model(flat: Mapping[str, Any], cfg: Config) -> Model:
    """A HF checkpoint (per-layer or stacked names) -> a `Model` of numpy arrays."""
    dtype = np.asarray(flat["model.embed_tokens.weight"]).dtype
    return unflatten_by_rules(
        stack_kinds(flat, cfg), model_rules(cfg), model_like(cfg, dtype)
    )


def model_to_hf(model: Model, cfg: Config) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_model`: per-layer HF names, numpy arrays."""
    flat = flatten_by_rules(model, model_rules(cfg), layers=cfg.kinds)
    return {k: np.asarray(x) for k, x in flat.items()}


# ----------------------------------------------------------------------- config.json

# transformers' defaults for the optional fields, where the model types differ.
DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e4,
                      num_experts=128, num_experts_per_tok=8, norm_topk_prob=False,
                      moe_intermediate_size=768, decoder_sparse_step=1),
    "mixtral": dict(num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                    num_experts=8, num_experts_per_tok=2),
}  # fmt: skip
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
REQUIRED += ("num_attention_heads",)


def unsupported(hf: Mapping[str, Any]) -> list[str]:
    """Every field of `hf` asking for what `moe_model` does not implement."""
    kind = hf.get("model_type")
    problems = []
    if kind not in DEFAULTS:
        problems.append(f"`model_type` is {kind!r}: not one of {', '.join(DEFAULTS)}")
    window = hf.get("sliding_window")
    if kind == "qwen3_moe" and not hf.get("use_sliding_window", False):
        window = None  # transformers ignores it then
    checks = [
        ("sliding_window", window, None, "full attention, without a window"),
        ("router_jitter_noise", hf.get("router_jitter_noise", 0), 0, "no noise"),
        ("hidden_act", hf.get("hidden_act", "silu"), "silu", "SiLU experts"),
        ("attention_bias", hf.get("attention_bias", False), False, "no biases"),
        ("attention_dropout", hf.get("attention_dropout", 0), 0, "no dropout"),
        ("shared_expert_intermediate_size", hf.get(
            "shared_expert_intermediate_size", 0), 0, "no shared experts"),
        ("n_shared_experts", hf.get("n_shared_experts", 0) or 0, 0, "no shared experts"),
        ("quantization_config", hf.get("quantization_config"), None, "plain weights"),
    ]  # fmt: skip
    for field, value, implemented, what in checks:
        if value != implemented:
            problems.append(f"`{field}` is {value!r}: the model has {what}")
    attention = set(hf.get("layer_types") or ["full_attention"])
    if attention != {"full_attention"}:
        problems.append(f"`layer_types` has {sorted(attention)}: full attention only")
    both = [hf.get("num_experts"), hf.get("num_local_experts")]
    if None not in both and both[0] != both[1]:
        problems.append(f"`num_experts` {both[0]} != `num_local_experts` {both[1]}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    field = "rope_parameters" if "rope_parameters" in hf else "rope_scaling"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"`{field}.rope_type` is {rope_type!r}: plain rope only")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        problems.append(f"`partial_rotary_factor` is {partial!r}: whole heads only")
    return problems


def config_from_hf(path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> Config:
    """The `Config` of a Qwen3-MoE or Mixtral `config.json`.

    Reads transformers 5's fields (`rope_parameters`, `num_local_experts`) and the
    hub's 4.x ones (`rope_theta`, `num_experts`), with transformers' defaults for
    missing optional fields. Qwen3-MoE's layers are MoE unless listed in
    `mlp_only_layers` or skipped by `decoder_sparse_step`; Mixtral's all are.

    Args:
        path_or_dict: a model folder, its `config.json`, or the parsed contents.

    Raises:
        ValueError: the config asks for anything `moe_model` does not implement,
            naming every such field; or lacks a required size.
    """
    if isinstance(path_or_dict, Mapping):
        hf = dict(path_or_dict)
    else:
        path = Path(path_or_dict)
        hf = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    problems = unsupported(hf)
    problems += [f"`{k}` is missing" for k in REQUIRED if k not in hf]
    if problems:
        raise ValueError(
            "config.json asks for what moe_model does not implement:\n  "
            + "\n  ".join(problems)
        )
    kind = hf["model_type"]

    def get(field: str) -> Any:
        value = hf.get(field)
        return DEFAULTS[kind].get(field) if value is None else value

    experts = hf.get("num_local_experts", get("num_experts"))
    n, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    dense = set(hf.get("mlp_only_layers") or [])
    step = get("decoder_sparse_step") or 1
    moe = [i for i in range(n) if i not in dense and experts and (i + 1) % step == 0]
    rope = hf.get("rope_parameters") or {}
    return Config(
        model_type=kind,
        vocab=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=n,
        heads=heads,
        kv_heads=get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        d_ff=hf["intermediate_size"],
        d_expert=get("moe_intermediate_size") or hf["intermediate_size"],
        num_experts=experts,
        top_k=get("num_experts_per_tok"),
        moe_layers=tuple(moe),
        norm_topk_prob=kind == "mixtral" or bool(get("norm_topk_prob")),
        qk_norm=kind == "qwen3_moe",
        rms_eps=float(get("rms_norm_eps")),
        rope_theta=float(rope.get("rope_theta") or get("rope_theta")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folder", nargs="?", help="a model folder: config.json and safetensors"
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument(
        "--transformers",
        nargs="?",
        const=sys.executable,
        metavar="PYTHON",
        help="compare logits with transformers' own Qwen3-MoE and Mixtral, run by "
        "PYTHON (an interpreter with torch and transformers; default: this one)",
    )
    args = parser.parse_args(argv)
    if args.transformers:  # a failure outside the tolerance exits non-zero
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
        import compare_moe_transformers

        compare_moe_transformers.main(["--python", args.transformers])
    if args.folder is None:
        if args.transformers:
            return
        parser.error("a model folder is needed (or --transformers)")
    cfg = config_from_hf(args.folder)
    model = hf_to_model(load_flat(args.folder), cfg)
    print(stackedtree.describe(model))
    tokens = np.asarray([args.tokens])
    logits = jax.jit(model_forward, static_argnums=2)(model, tokens, cfg)
    print("argmax per position:", np.argmax(logits[0], axis=-1).tolist())


if __name__ == "__main__":
    main()
