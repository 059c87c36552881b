"""Experts on their own axis: `detect_experts`, `stack_by_name(experts=...)` and its
inverse, against the written-out loop; refusals naming the layer, expert and tensor."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from ckptgen import DTYPES, _draw_array, assert_same_flat, same
from hypothesis import given, settings
from hypothesis import strategies as st

from stackedtree.checkpoint import (
    detect_experts,
    detect_kinds,
    missing_keys,
    stack_by_name,
    unstack_by_name,
)

P = "model.layers.{i}."
EP = "mlp.experts.{e}."


def moe(n: int = 3, e: int = 4, dense: int = 0) -> dict[str, np.ndarray]:
    """Qwen3-MoE-like names in state_dict order: `dense` dense layers, then MoE."""
    rng = np.random.default_rng(1)
    flat: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.ones((5, 4))}
    for i in range(n):
        p = f"model.layers.{i}."
        flat[p + "self_attn.q_proj.weight"] = rng.standard_normal((4, 4)).astype(
            ml_dtypes.bfloat16
        )
        if i < dense:
            flat[p + "mlp.up_proj.weight"] = rng.standard_normal((6, 4))
        else:
            flat[p + "mlp.gate.weight"] = rng.standard_normal((e, 4)).astype(np.float32)
            for x in range(e):
                for w in ("gate_proj", "up_proj"):
                    flat[p + f"mlp.experts.{x}.{w}.weight"] = rng.standard_normal(
                        (3, 4)
                    ).astype(np.float32)
                flat[p + f"mlp.experts.{x}.down_proj.weight"] = rng.integers(
                    -9, 9, (4, 3), np.int8
                )
            flat[p + "mlp.shared_experts.up_proj.weight"] = np.full((2, 4), i, np.int32)
        flat[p + "input_layernorm.weight"] = np.full(4, i, np.float16)
    flat["model.norm.weight"] = np.ones(4, np.float32)
    return flat


# ------------------------------------------------------------------ detect_experts


def test_detect_experts_finds_the_first_numbered_component_inside_layers() -> None:
    assert detect_experts(moe(), P) == EP
    mixtral = [
        f"model.layers.{i}.block_sparse_moe.experts.{e}.w{k}.weight"
        for i in range(2)
        for e in range(3)
        for k in (1, 2, 3)
    ]
    assert detect_experts(mixtral, P) == "block_sparse_moe.experts.{e}."
    # Dense layers, fused experts (Llama 4, gpt-oss), a single numbered component.
    assert detect_experts(["h.0.w", "h.1.w"], "h.{i}.") is None
    fused = ["model.layers.0.feed_forward.experts.gate_up_proj", "model.layers.1.x"]
    assert detect_experts(fused, P) is None
    assert detect_experts(["h.0.a.0.w", "h.1.a.0.w"], "h.{i}.") is None
    # Numbers outside the layers are not experts.
    assert detect_experts(["mtp.0.w", "mtp.1.w", "h.0.w", "h.1.w"], "h.{i}.") is None
    with pytest.raises(ValueError, match=r"exactly one `\{i\}`"):
        detect_experts(["h.0.w"], "h.")


# ------------------------------------------------------------- stacking experts


def test_experts_stack_on_a_second_axis_as_the_loop_does() -> None:
    flat = moe(n=3, e=4)
    stacked, rest = stack_by_name(flat, P, experts=EP)
    assert list(rest) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert list(stacked) == [
        "self_attn.q_proj.weight",
        "mlp.gate.weight",
        "mlp.experts.{e}.gate_proj.weight",
        "mlp.experts.{e}.up_proj.weight",
        "mlp.experts.{e}.down_proj.weight",
        "mlp.shared_experts.up_proj.weight",
        "input_layernorm.weight",
    ]
    for w in ("gate_proj", "up_proj", "down_proj"):
        got = stacked[f"mlp.experts.{{e}}.{w}.weight"]
        want = np.stack(
            [
                np.stack(
                    [
                        flat[f"{P.format(i=i)}mlp.experts.{e}.{w}.weight"]
                        for e in range(4)
                    ]
                )
                for i in range(3)
            ]
        )
        assert same(got, want)
    # Routers and shared experts stack over layers only.
    assert stacked["mlp.gate.weight"].shape == (3, 4, 4)
    assert stacked["mlp.shared_experts.up_proj.weight"].shape == (3, 2, 4)
    # The inverse gives every tensor back, in the checkpoint's order.
    back = unstack_by_name(stacked, P, rest, experts=EP)
    assert list(back) == [n for n in flat if n.startswith("model.layers.")] + list(rest)
    assert_same_flat(back, flat)


def test_without_experts_each_expert_stacks_over_layers_only() -> None:
    flat = moe(n=2, e=2)
    for experts in (None, "none"):
        stacked, _ = stack_by_name(flat, P, experts=experts)
        assert stacked["mlp.experts.1.up_proj.weight"].shape == (2, 3, 4)
        assert not any("{e}" in k for k in stacked)


def test_fused_experts_keep_their_names() -> None:
    # Llama 4: (E, d, 2f) already, interleaved dense and MoE layers.
    flat = {}
    for i in range(4):
        p = f"model.layers.{i}.feed_forward."
        if i % 2:
            flat[p + "experts.gate_up_proj"] = np.full((3, 4, 6), i, np.float32)
            flat[p + "experts.down_proj"] = np.full((3, 3, 4), i, np.float32)
            flat[p + "router.weight"] = np.zeros((3, 4), np.float32)
        else:
            flat[p + "up_proj.weight"] = np.zeros((6, 4), np.float32)
    assert detect_experts(flat, P) is None
    kinds = detect_kinds(flat, P)
    assert kinds == {"A": [0, 2], "B": [1, 3]}
    stacked, _ = stack_by_name(flat, P, layers=kinds)
    assert stacked["B"]["feed_forward.experts.gate_up_proj"].shape == (2, 3, 4, 6)


def test_kinds_with_experts_dense_then_moe() -> None:
    flat = moe(n=5, e=3, dense=2)
    kinds = detect_kinds(flat, P, experts=EP)
    assert kinds == {"A": [0, 1], "B": [2, 3, 4]}
    stacked, rest = stack_by_name(flat, P, layers=kinds, experts=EP)
    assert stacked["B"]["mlp.experts.{e}.down_proj.weight"].shape == (3, 3, 4, 3)
    assert "mlp.up_proj.weight" in stacked["A"]
    back = unstack_by_name(stacked, P, rest, layers=kinds, experts=EP)
    assert list(back) == [n for n in flat if n.startswith("model.layers.")] + list(rest)
    assert_same_flat(back, flat)


def test_abstract_and_jax_experts() -> None:
    abstract = {
        f"h.{i}.moe.{e}.w": jax.ShapeDtypeStruct((5,), jnp.bfloat16)
        for i in range(2)
        for e in range(3)
    }
    stacked, _ = stack_by_name(abstract, "h.{i}.", experts="moe.{e}.")
    assert stacked["moe.{e}.w"] == jax.ShapeDtypeStruct((2, 3, 5), jnp.bfloat16)
    concrete = {k: jnp.full(5, i, jnp.bfloat16) for i, k in enumerate(abstract)}
    stacked, _ = stack_by_name(concrete, "h.{i}.", experts="moe.{e}.")
    assert isinstance(stacked["moe.{e}.w"], jax.Array)
    assert float(stacked["moe.{e}.w"][1, 2, 0]) == 5.0
    assert_same_flat(unstack_by_name(stacked, "h.{i}.", experts="moe.{e}."), concrete)


# ------------------------------------------------------------------------- errors


def test_a_layer_missing_one_expert_tensor_is_an_error_not_a_kind() -> None:
    flat = moe(n=3, e=4)
    del flat["model.layers.1.mlp.experts.2.up_proj.weight"]
    assert detect_kinds(flat, P, experts=EP) == {"A": [0, 1, 2]}
    with pytest.raises(ValueError) as e:
        stack_by_name(flat, P, experts=EP)
    assert str(e.value) == (
        "pattern 'model.layers.{i}.', experts 'mlp.experts.{e}.': the layers do not "
        "hold the same experts, each expert tensor of one shape and dtype: layer 1 "
        "lacks expert 2's `up_proj.weight` "
        "(`model.layers.1.mlp.experts.2.up_proj.weight`; the experts of "
        "`mlp.experts.{e}.up_proj.weight` are numbered 0..3)."
    )


def test_a_layer_missing_one_expert() -> None:
    flat = moe(n=3, e=4)
    for w in ("gate_proj", "up_proj", "down_proj"):
        del flat[f"model.layers.2.mlp.experts.3.{w}.weight"]
    with pytest.raises(ValueError, match=r"layer 2 lacks expert 3's `gate_proj"):
        stack_by_name(flat, P, experts=EP)


def test_experts_not_numbered_from_zero() -> None:
    flat = {f"h.{i}.moe.{e}.w": np.zeros(2) for i in range(2) for e in (1, 2)}
    with pytest.raises(ValueError) as e:
        stack_by_name(flat, "h.{i}.", experts="moe.{e}.")
    assert "layer 0 lacks expert 0's `w` (`h.0.moe.0.w`" in str(e.value)
    assert "layer 1 lacks expert 0's `w` (`h.1.moe.0.w`" in str(e.value)
    assert "numbered 0..2" in str(e.value)


def test_experts_whose_shapes_or_dtypes_differ() -> None:
    flat = moe(n=2, e=3)
    flat["model.layers.1.mlp.experts.2.gate_proj.weight"] = np.zeros((3, 5), np.float32)
    flat["model.layers.0.mlp.experts.1.down_proj.weight"] = np.zeros((4, 3), np.int16)
    with pytest.raises(ValueError) as e:
        stack_by_name(flat, P, experts=EP)
    assert str(e.value).splitlines()[1:] == [
        "  layer 1 expert 2: `model.layers.1.mlp.experts.2.gate_proj.weight` has shape "
        "(3, 5) dtype float32, expected shape (3, 4) dtype float32 like "
        "`model.layers.0.mlp.experts.0.gate_proj.weight`",
        "  layer 0 expert 1: `model.layers.0.mlp.experts.1.down_proj.weight` has shape "
        "(4, 3) dtype int16, expected shape (4, 3) dtype int8 like "
        "`model.layers.0.mlp.experts.0.down_proj.weight`",
    ]


@pytest.mark.parametrize("bad", ["mlp.experts.", "mlp.{e}.{e}.", "{i}.{e}", 3])
def test_a_malformed_expert_pattern(bad: object) -> None:
    error = TypeError if not isinstance(bad, str) else ValueError
    with pytest.raises(error, match="`experts` must"):
        stack_by_name(moe(n=2, e=2), P, experts=bad)  # type: ignore[arg-type]


def test_an_expert_pattern_matching_nothing() -> None:
    with pytest.raises(ValueError, match=re.escape("'moe.{e}.' matches no per-layer")):
        stack_by_name(moe(n=2, e=2), P, experts="moe.{e}.")
    stacked, _ = stack_by_name(moe(n=2, e=2), P, experts=EP)
    with pytest.raises(ValueError, match=re.escape("`experts` 'moe.{e}.' matches no")):
        unstack_by_name(stacked, P, experts="moe.{e}.")


def test_unstack_refuses_expert_axes_of_different_lengths() -> None:
    stacked = {
        "moe.{e}.a": np.zeros((2, 3, 1)),
        "moe.{e}.b": np.zeros((2, 3, 1)),
        "moe.{e}.c": np.zeros((2, 4, 1)),
    }
    with pytest.raises(ValueError, match=r"most have E = 3: `moe\.\{e\}\.c` has shape"):
        unstack_by_name(stacked, "h.{i}.", experts="moe.{e}.")


def test_missing_keys_names_what_a_damaged_layer_lost() -> None:
    flat = moe(n=4, e=2, dense=1)
    del flat["model.layers.2.mlp.gate.weight"]
    assert detect_kinds(flat, P, experts=EP) == {"A": [0], "B": [1, 3], "C": [2]}
    assert missing_keys(flat, P, experts=EP) == {"C": ["mlp.gate.weight"]}
    assert missing_keys(moe(n=4, e=2, dense=1), P, experts=EP) == {}


# ---------------------------------------------------------------- round trip


@st.composite
def moe_cases(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], str]:
    n = draw(st.integers(1, 3))
    e = draw(st.integers(1, 3))
    subs = draw(st.lists(st.sampled_from(["w", "b.x", "c_1"]), min_size=1, unique=True))
    plain = draw(st.lists(st.sampled_from(["gate", "norm.w"]), unique=True))
    where = draw(st.sampled_from(["experts.{e}.", "m.experts.{e}.", "x{e}_"]))
    specs = {
        k: (
            draw(st.lists(st.integers(0, 2), max_size=2).map(tuple)),
            draw(st.sampled_from(DTYPES)),
        )
        for k in subs + plain
    }
    flat: dict[str, np.ndarray] = {"emb": _draw_array(draw, (2,), np.dtype(np.uint8))}
    for i in range(n):
        for k in plain[:1]:
            flat[f"h.{i}.{k}"] = _draw_array(draw, *specs[k])
        for x in range(e):
            for s in subs:
                flat[f"h.{i}." + where.replace("{e}", str(x)) + s] = _draw_array(
                    draw, *specs[s]
                )
        for k in plain[1:]:
            flat[f"h.{i}.{k}"] = _draw_array(draw, *specs[k])
    return flat, where


@settings(max_examples=40, deadline=None)
@given(moe_cases())
def test_round_trip_is_bit_exact(case: tuple[dict[str, np.ndarray], str]) -> None:
    flat, where = case
    stacked, rest = stack_by_name(flat, "h.{i}.", experts=where)
    n = 1 + max(int(k.split(".")[1]) for k in flat if k != "emb")
    for key, x in stacked.items():
        assert x.shape[0] == n
        if "{e}" in key:
            # Element [i, e] is layer i's expert e, bit for bit.
            for i in range(n):
                for e in range(x.shape[1]):
                    assert same(
                        x[i, e, ...], flat[f"h.{i}." + key.replace("{e}", str(e))]
                    )
    back = unstack_by_name(stacked, "h.{i}.", rest, experts=where)
    assert list(back) == [k for k in flat if k != "emb"] + ["emb"]
    assert_same_flat(back, flat)
