"""Mixture-of-experts pieces shared by the checkpoint benchmarks: Qwen3-MoE tensor
names, the naive load-then-stack, and the report's lines on expert-parallel loads.
Imports neither jax nor stackedtree at module level (benchmark children set up jax
first)."""

from __future__ import annotations

from typing import Any


def moe_names(
    d: int, f: int, vocab: int, n: int, experts: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen3-MoE tensor names and shapes: layer 0 dense, the others MoE."""
    dense = [
        (f"mlp.{w}_proj.weight", s)
        for w, s in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f)))
    ]
    moe = [("mlp.gate.weight", (experts, d))] + [
        (k.replace("mlp.", f"mlp.experts.{e}."), s)
        for e in range(experts)
        for k, s in dense
    ]
    specs: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (vocab, d))
    ]
    for i in range(n):
        attn = [(f"self_attn.{x}_proj.weight", (d, d)) for x in "qkvo"]
        norms = [
            ("input_layernorm.weight", (d,)),
            ("post_attention_layernorm.weight", (d,)),
        ]
        body = attn + (dense if i == 0 else moe) + norms
        specs += [(f"model.layers.{i}.{k}", s) for k, s in body]
    return [*specs, ("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]


def naive_stack(flat: dict[str, Any], pattern: str) -> dict[str, Any]:
    """`stack_by_name` of the whole checkpoint in memory, kinds and experts as
    `stackedtree stack` finds them, under the stacked names."""
    from stackedtree.checkpoint import detect_experts, detect_kinds, stack_by_name
    from stackedtree.checkpoint._layer_pattern import LayerPattern

    experts = detect_experts(flat, pattern)
    kinds = detect_kinds(flat, pattern, experts=experts)
    layers = kinds if len(kinds) > 1 else None
    stacked, rest = stack_by_name(flat, pattern, layers=layers, experts=experts)
    per_kind = stacked if layers else {None: stacked}
    lp = LayerPattern.parse(pattern)
    return {
        lp.stacked_name(k, label): v
        for label, part in per_kind.items()
        for k, v in part.items()
    } | rest


def moe_note(results: dict[str, Any], devices: int) -> list[str]:
    """The report's lines on the mixture-of-experts loads."""
    moe = results.get("moe_checkpoint")
    rows = [r for r in results["runs"] if r["sharding"] == "experts (MoE)"]
    if not moe or not rows:
        return []
    shares = [
        f"{r['loader']} holds {r['share'] / moe['bytes']:.3f} of it and reads "
        f"{r['read'] / moe['bytes']:.3f}"
        for r in rows
        if r["loader"].startswith("process") and not r.get("skipped")
    ]
    return [
        "",
        f"`experts (MoE)`: a {moe['bytes'] / 1e9:.2f} GB Qwen3-MoE-shaped checkpoint "
        f"({moe['num_layers']} layers, layer 0 dense, {devices} experts per MoE "
        "layer), the expert axis of each `(N, E, ...)` tensor split over the "
        f"{devices} devices, the rest replicated; of the checkpoint, "
        + "; ".join(shares)
        + ".",
    ]
