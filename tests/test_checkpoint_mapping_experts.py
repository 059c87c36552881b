"""Name rules with kinds and experts: one rule table maps a DeepSeek-style checkpoint,
per-layer or stacked, onto a pytree with one stack per kind and (N, E, ...) experts,
strictly both ways."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckptgen import assert_same_flat, hf_moe, same

from stackedtree.checkpoint import (
    Rule,
    convert_stack,
    detect_kinds,
    flatten_by_rules,
    load_flat,
    save_flat,
    stack_by_name,
    transpose,
    unflatten_by_rules,
)

P = "model.layers.{i}."
EP = "mlp.experts.{e}."
KINDS = {"A": [0, 1, 2], "B": [3, 4]}


def leaf(key: str) -> str:
    return key.replace(".", "_")


def deepseek_rules(flat: dict[str, np.ndarray]) -> list[Rule]:
    """One rule per tensor: dense layers to `dense`, MoE layers to `moe`, experts
    to `moe.experts` with `{e}` (gate and up transposed, as JAX code wants them)."""
    rules = [
        Rule("model.embed_tokens.weight", "embed"),
        Rule("model.norm.weight", "norm"),
        Rule("lm_head.weight", "head", transpose(1, 0)),
    ]
    for label, i, tree in (("A", 0, "dense"), ("B", 3, "moe")):
        keys = [n[len(P.format(i=i)) :] for n in flat if n.startswith(P.format(i=i))]
        for key in keys:
            if key.startswith("mlp.experts."):
                if not key.startswith("mlp.experts.0."):
                    continue
                sub = key[len("mlp.experts.0.") :]
                t = transpose(1, 0) if sub != "down_proj.weight" else ()
                rules.append(
                    Rule(
                        f"model.layers.{{i:B}}.mlp.experts.{{e}}.{sub}",
                        f"moe.experts.{leaf(sub)}",
                        t,
                    )
                )
            else:
                rules.append(
                    Rule(f"model.layers.{{i:{label}}}.{key}", f"{tree}.{leaf(key)}")
                )
    return rules


def like_of(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    stacked, _ = stack_by_name(flat, P, layers=KINDS, experts=EP)
    moe = {leaf(k): v for k, v in stacked["B"].items() if "{e}" not in k}
    moe["experts"] = {
        leaf(k.split("{e}.")[1]): np.swapaxes(v, -1, -2) if "down" not in k else v
        for k, v in stacked["B"].items()
        if "{e}" in k
    }
    return {
        "embed": flat["model.embed_tokens.weight"],
        "norm": flat["model.norm.weight"],
        "head": flat["lm_head.weight"].T,
        "dense": {leaf(k): v for k, v in stacked["A"].items()},
        "moe": moe,
    }


def check_tree(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want)
        for k in want:
            check_tree(got[k], want[k])
    else:
        assert same(np.asarray(got), np.asarray(want))


def test_one_table_reads_per_layer_and_stacked_and_writes_back(tmp_path: Path) -> None:
    flat = hf_moe("deepseek_v3", experts=4)
    assert detect_kinds(flat, P, experts=EP) == KINDS
    rules = deepseek_rules(flat)
    want = like_of(flat)
    assert want["moe"]["experts"]["up_proj_weight"].shape == (2, 4, 8, 4)
    tree = unflatten_by_rules(flat, rules, want)
    check_tree(tree, want)
    # The stacked file `stackedtree stack` writes, under the same rules.
    save_flat(tmp_path / "m.safetensors", flat)
    convert_stack(tmp_path / "m.safetensors", tmp_path / "s.safetensors")
    check_tree(
        unflatten_by_rules(load_flat(tmp_path / "s.safetensors"), rules, want), want
    )
    # And back: the per-layer checkpoint, bit for bit, in its order.
    back = flatten_by_rules(tree, rules, layers=KINDS)
    assert_same_flat(back, flat)
    layer_names = [n for n in flat if n.startswith("model.layers.")]
    assert [n for n in back if n.startswith("model.layers.")] == layer_names


def test_experts_of_one_kind_mixtral() -> None:
    flat = hf_moe("mixtral", experts=3)
    rules = [
        Rule(n, n)
        for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    ]
    rules += [
        Rule(P + k, "layers." + leaf(k))
        for k in (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "block_sparse_moe.gate.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        )
    ]
    rules += [
        Rule(P + f"block_sparse_moe.experts.{{e}}.{w}.weight", f"layers.{w}")
        for w in ("w1", "w2", "w3")
    ]
    stacked, rest = stack_by_name(flat, P, experts="block_sparse_moe.experts.{e}.")
    tree_like: dict[str, Any] = {"layers": {}}
    for r in rules:
        if r.path.startswith("layers."):
            tree_like["layers"][r.path[7:]] = stacked[r.name[len(P) :]]
        else:
            tree_like[r.path] = rest[r.name]
    got = unflatten_by_rules(flat, rules, tree_like)
    assert got["layers"]["w1"].shape == (2, 3, 4, 8)
    check_tree(got, tree_like)
    assert_same_flat(flatten_by_rules(got, rules), flat)


def test_strict_both_ways_with_kinds_and_experts() -> None:
    flat = hf_moe("deepseek_v3", experts=4)
    rules = deepseek_rules(flat)
    want = like_of(flat)
    fewer = [r for r in rules if "down_proj" not in r.name or "experts" not in r.name]
    with pytest.raises(ValueError) as e:
        unflatten_by_rules(flat, fewer, want)
    text = str(e.value)
    assert (
        "unused tensor 'model.layers.{i:B}.mlp.experts.{e}.down_proj.weight' (layers "
        "3-4): no rule reads it" in text
    )
    assert "unfilled leaf moe.experts.down_proj_weight: no rule fills it" in text
    with pytest.raises(
        ValueError, match=re.escape("`layers` must give each kind's layers")
    ):
        flatten_by_rules(want, rules)
    with pytest.raises(ValueError, match=r"unused leaf moe\.experts\.down_proj_weight"):
        flatten_by_rules(want, fewer, layers=KINDS)
    # A layer that lost one expert's tensor: named, before anything is stacked.
    broken = dict(flat)
    del broken["model.layers.4.mlp.experts.2.up_proj.weight"]
    with pytest.raises(ValueError, match=r"layer 4 lacks expert 2's `up_proj\.weight`"):
        unflatten_by_rules(broken, rules, want)


def test_malformed_expert_rules() -> None:
    with pytest.raises(ValueError, match=r"holds `\{e\}` but no `\{i\}`"):
        unflatten_by_rules({}, [Rule("experts.{e}.w", "w")], {"w": np.zeros(1)})
    with pytest.raises(ValueError, match=r"holds `\{e\}` 2 times"):
        unflatten_by_rules({}, [Rule("h.{i}.{e}.{e}.w", "w")], {"w": np.zeros(1)})
