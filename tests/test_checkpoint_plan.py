"""`checkpoint/_plan.py`: the one stacking plan, for per-layer names and stacked files."""

from __future__ import annotations

from pathlib import Path

import pytest
from ckptgen import deepseek, llama

from stackedtree.checkpoint import (
    convert_stack,
    detect_experts,
    detect_kinds,
    save_flat,
)
from stackedtree.checkpoint._io import read_checkpoint
from stackedtree.checkpoint._plan import StackEntry, plan_by_kind, plan_one_kind
from stackedtree.checkpoint._stacked import stored_plan

P = "model.layers.{i}."


def specs(flat: dict) -> dict:
    return {name: (x.shape, x.dtype) for name, x in flat.items()}


def test_a_plan_of_two_kinds_names_every_source_in_layer_order() -> None:
    flat = deepseek(dense=2, moe=3)
    plan = plan_by_kind(specs(flat), P)
    assert (plan.pattern, plan.num_layers) == (P, 5)
    assert plan.layers == detect_kinds(flat, P) == {"A": [0, 1], "B": [2, 3, 4]}
    dense, moe = plan.kinds
    assert dense.keys == (
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "mlp.up_proj.weight",
    )
    assert dense.entries[2] == StackEntry(
        "mlp.up_proj.weight",
        "model.layers.{i:A}.mlp.up_proj.weight",
        ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"),
    )
    gate = moe.names["mlp.gate.weight"]
    assert gate == "model.layers.{i:B}.mlp.gate.weight"
    assert [e.sources for e in moe.entries if e.name == gate] == [
        tuple(f"model.layers.{i}.mlp.gate.weight" for i in (2, 3, 4))
    ]
    assert plan.rest == ("model.embed_tokens.weight", "model.norm.weight")
    # Each stacked tensor takes its kind's first layer's place, in checkpoint order.
    arranged = [x if isinstance(x, str) else x[1].name for x in plan.arranged(flat)]
    assert arranged == [
        "model.embed_tokens.weight",
        *dense.names.values(),
        *moe.names.values(),
        "model.norm.weight",
    ]


def test_a_plan_of_one_kind_has_no_label() -> None:
    flat = llama(4)
    plan = plan_by_kind(specs(flat), P)
    assert plan.layers is None and [k.label for k in plan.kinds] == [None]
    assert plan.kinds[0].names["mlp.up_proj.weight"] == P + "mlp.up_proj.weight"
    assert plan == plan_one_kind(specs(flat), P)
    chosen = plan_one_kind(specs(flat), P, (3, 1))
    assert chosen.num_layers == 2 and chosen.kinds[0].layers == (3, 1)
    assert chosen.kinds[0].entries[0].sources == (
        "model.layers.3.input_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
    )
    assert "model.layers.0.input_layernorm.weight" in chosen.rest


def test_one_kind_refuses_what_kinds_accept() -> None:
    flat = deepseek(dense=2, moe=3)
    with pytest.raises(ValueError, match="the 5 layers do not hold the same keys"):
        plan_one_kind(specs(flat), P)


@pytest.mark.parametrize("flat", [deepseek(dense=2, moe=3), llama(3)], ids=["2", "1"])
def test_a_stacked_file_reads_back_into_the_plan_it_was_written_by(
    tmp_path: Path, flat: dict
) -> None:
    src, out = tmp_path / "a.safetensors", tmp_path / "s.safetensors"
    save_flat(src, flat)
    convert_stack(src, out)
    experts = detect_experts(list(flat), P)  # as the conversion detects them
    written = plan_by_kind(specs(flat), P, experts)
    stored = stored_plan(read_checkpoint(out))
    assert (stored.pattern, stored.num_layers, stored.rest) == (
        written.pattern,
        written.num_layers,
        written.rest,
    )
    assert stored.layers == written.layers
    for a, b in zip(stored.kinds, written.kinds, strict=True):
        assert (a.label, list(a.layers), a.names) == (b.label, list(b.layers), b.names)
        assert all(e.sources == () and e.first == e.name for e in a.entries)
