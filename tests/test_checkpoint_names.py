"""stack_by_name / unstack_by_name, pattern rules, detect_pattern, pytree names."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import ckptgen
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from ckptgen import assert_same_flat, cases, same
from fixtures import Attention, Block
from hypothesis import given, settings

from stackedtree.checkpoint import (
    detect_pattern,
    flatten_names,
    stack_by_name,
    unflatten_names,
    unstack_by_name,
)

P = "model.layers.{i}."


def llama_flat(n: int = 3) -> dict[str, np.ndarray]:
    keys = {
        "self_attn.q_proj.weight": ((4, 4), np.float32),
        "input_layernorm.weight": ((4,), np.float32),
    }
    return ckptgen.llama(n, keys, vocab=8)


# ------------------------------------------------------------------------ stacking


def test_stack_by_name_stacks_layers_in_order_and_keeps_rest() -> None:
    flat = llama_flat(3)
    stacked, rest = stack_by_name(flat, P)
    assert list(stacked) == ["self_attn.q_proj.weight", "input_layernorm.weight"]
    q = stacked["self_attn.q_proj.weight"]
    assert isinstance(q, np.ndarray) and q.shape == (3, 4, 4)
    np.testing.assert_array_equal(q[:, 0, 0], [0, 1, 2])
    assert list(rest) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert rest["model.norm.weight"] is flat["model.norm.weight"]


def test_stack_by_name_keeps_jax_as_jax_and_abstract_as_abstract() -> None:
    flat = {f"h.{i}.w": jnp.full((2,), i, jnp.bfloat16) for i in range(2)}
    stacked, _ = stack_by_name(flat, "h.{i}.")
    assert isinstance(stacked["w"], jax.Array) and stacked["w"].dtype == jnp.bfloat16
    abstract = {f"h.{i}.w": jax.ShapeDtypeStruct((5, 3), jnp.float32) for i in range(4)}
    stacked, _ = stack_by_name(abstract, "h.{i}.")
    assert stacked["w"] == jax.ShapeDtypeStruct((4, 5, 3), jnp.float32)
    back = unstack_by_name(stacked, "h.{i}.")
    assert back == abstract


def test_index_is_the_whole_canonical_decimal_run() -> None:
    w = np.zeros(2, np.float32)
    flat = {
        "layers.0.w": w,
        "layers.1.w": w + 1,
        "layers.1x.w": w + 2,  # not layer 1
        "layers.01.w": w + 3,  # not layer 1: leading zero
    }
    flat.update({f"layers.{i}.w": w + i for i in range(2, 11)})  # layers.10 is 10
    stacked, rest = stack_by_name(flat, "layers.{i}.")
    assert stacked["w"].shape == (11, 2)
    np.testing.assert_array_equal(stacked["w"][:, 0], np.arange(11))
    assert sorted(rest) == ["layers.01.w", "layers.1x.w"]


def test_layers_10_is_not_layer_1_without_separator() -> None:
    flat = {"b0": np.zeros(1), "b1": np.ones(1), "b10": np.full(1, 10.0)}
    with pytest.raises(ValueError, match=r"missing layers 2-9"):
        stack_by_name(flat, "b{i}")


@pytest.mark.parametrize("pattern", ["model.layers.", "a.{i}.{i}.", "{i}{i}"])
def test_pattern_needs_exactly_one_index(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"exactly one `\{i\}`"):
        stack_by_name(llama_flat(), pattern)


def test_pattern_must_be_str() -> None:
    with pytest.raises(TypeError, match="`pattern` must be a str"):
        stack_by_name(llama_flat(), 3)  # type: ignore[arg-type]


def test_pattern_matching_nothing() -> None:
    with pytest.raises(ValueError, match=r"'decoder\.\{i\}\.' matches no tensor name"):
        stack_by_name(llama_flat(), "decoder.{i}.")


def test_missing_layers_are_named() -> None:
    flat = {f"h.{i}.w": np.zeros(2) for i in (0, 1, 3, 6, 7)}
    with pytest.raises(
        ValueError, match=r"missing layers 2, 4-5; found layers 0-1, 3, 6-7"
    ):
        stack_by_name(flat, "h.{i}.")
    with pytest.raises(ValueError, match=r"missing layers 0;"):
        stack_by_name({"h.1.w": np.zeros(2)}, "h.{i}.")


def test_missing_and_extra_keys_per_layer() -> None:
    flat = llama_flat(4)
    del flat["model.layers.2.input_layernorm.weight"]
    flat["model.layers.3.mlp.bias"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="do not hold the same keys") as e:
        stack_by_name(flat, P)
    msg = str(e.value)
    assert "layer 2 is missing keys 'input_layernorm.weight'" in msg
    assert "layer 3 has extra keys 'mlp.bias'" in msg
    assert "layer 0" not in msg and "layer 1" not in msg


def test_shape_mismatch_names_tensor_expected_and_actual() -> None:
    flat = llama_flat(3)
    flat["model.layers.1.self_attn.q_proj.weight"] = np.zeros((4, 5), np.float32)
    with pytest.raises(
        ValueError,
        match=r"`model\.layers\.1\.self_attn\.q_proj\.weight` has shape \(4, 5\) dtype "
        r"float32, expected shape \(4, 4\) dtype float32 like "
        r"`model\.layers\.0\.self_attn\.q_proj\.weight`",
    ):
        stack_by_name(flat, P)


def test_dtype_mismatch_is_reported() -> None:
    flat = llama_flat(3)
    flat["model.layers.0.input_layernorm.weight"] = np.zeros(4, ml_dtypes.bfloat16)
    with pytest.raises(
        ValueError,
        match=r"`model\.layers\.0\.input_layernorm\.weight` has shape \(4,\) dtype "
        r"bfloat16, expected shape \(4,\) dtype float32",
    ):
        stack_by_name(flat, P)


def test_non_array_value_is_a_type_error() -> None:
    flat: dict[str, Any] = llama_flat(2)
    flat["model.layers.1.input_layernorm.weight"] = [1.0, 2.0]
    with pytest.raises(TypeError, match=r"`model\.layers\.1\.input_layernorm\.weight`"):
        stack_by_name(flat, P)


def test_unstack_by_name_gives_views_and_puts_rest_last() -> None:
    stacked = {"w": np.arange(6.0).reshape(3, 2)}
    flat = unstack_by_name(stacked, "h.{i}.", {"emb": np.zeros(1)})
    assert list(flat) == ["h.0.w", "h.1.w", "h.2.w", "emb"]
    assert np.shares_memory(flat["h.2.w"], stacked["w"])


def test_unstack_by_name_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="`stacked` holds no tensors"):
        unstack_by_name({}, P)
    with pytest.raises(ValueError, match=r"`stacked\['w'\]` is a 0-d array"):
        unstack_by_name({"w": np.float32(1)}, P)
    with pytest.raises(
        ValueError,
        match=r"`stacked\['b'\]` has leading length 2, but `stacked\['a'\]` has 3",
    ):
        unstack_by_name({"a": np.zeros(3), "c": np.zeros(3), "b": np.zeros(2)}, P)
    with pytest.raises(
        ValueError, match=r"reads as layer tensors: 'model\.layers\.0\.x'"
    ):
        unstack_by_name({"w": np.zeros(2)}, P, {"model.layers.0.x": np.zeros(1)})
    with pytest.raises(ValueError, match="exactly one"):
        unstack_by_name({"w": np.zeros(2)}, "model.layers.")


@settings(max_examples=60, deadline=None)
@given(cases())
def test_unstack_inverts_stack_bit_exactly(case: Any) -> None:
    stacked, rest = stack_by_name(case.flat, case.pattern)
    assert all(x.shape[0] == case.num_layers for x in stacked.values())
    assert_same_flat(unstack_by_name(stacked, case.pattern, rest), case.flat)
    again, rest_again = stack_by_name(
        unstack_by_name(stacked, case.pattern, rest), case.pattern
    )
    assert_same_flat(again, stacked)
    assert_same_flat(rest_again, rest)


def test_jax_round_trip_is_bit_exact() -> None:
    flat = {f"b.{i}.w": jnp.asarray([np.nan, i, -0.0], jnp.bfloat16) for i in range(3)}
    flat["head"] = jnp.ones(2)
    stacked, rest = stack_by_name(flat, "b.{i}.")
    back = unstack_by_name(stacked, "b.{i}.", rest)
    assert all(same(back[k], flat[k]) for k in flat) and sorted(back) == sorted(flat)


# ----------------------------------------------------------------- detect_pattern


def test_detect_pattern_hf_llama() -> None:
    assert detect_pattern(llama_flat(3)) == P


def test_detect_pattern_ignores_nested_experts() -> None:
    names = [f"model.layers.{i}.moe.experts.{e}.w1" for i in range(2) for e in range(4)]
    assert detect_pattern([*names, "lm_head.weight"]) == "model.layers.{i}."


def test_detect_pattern_ambiguous_lists_candidates() -> None:
    names = [f"{part}.block.{i}.w" for part in ("encoder", "decoder") for i in range(3)]
    names += ["decoder.block.3.w"]
    with pytest.raises(
        ValueError,
        match=r"ambiguous, candidates are 'encoder\.block\.\{i\}\.' \(3 layers: 0-2\); "
        r"'decoder\.block\.\{i\}\.' \(4 layers: 0-3\); choose one with --pattern",
    ):
        detect_pattern(names)


def test_detect_pattern_none() -> None:
    with pytest.raises(ValueError, match="found no layer pattern"):
        detect_pattern(["a.weight", "h.0.w", "b.01.w"])


# ------------------------------------------------------------------ pytrees <-> names


@dataclasses.dataclass
class Holder:
    inner: Any


jax.tree_util.register_dataclass(Holder, data_fields=["inner"], meta_fields=[])


def test_flatten_names_uses_attribute_names_keys_and_indices() -> None:
    tree = Block(
        norm=np.zeros(2),
        attention=Attention(np.zeros(3), np.zeros(4)),
        act={"up": [np.zeros(1), Holder(np.zeros(5))]},
    )
    flat = flatten_names(tree)
    assert list(flat) == [
        "norm",
        "attention.q_proj",
        "attention.k_proj",
        "act.up.0",
        "act.up.1.inner",
    ]
    assert flatten_names(tree, sep="/")["act/up/1/inner"] is tree.act["up"][1].inner
    back = unflatten_names(flat, tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert all(
        a is b
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True)
    )


def test_unflatten_names_lists_missing_and_extra() -> None:
    like = Attention(q_proj=np.zeros(1), k_proj=np.zeros(1))
    with pytest.raises(
        ValueError, match=r"missing from `flat`: 'k_proj'; not in `like`: 'v_proj'"
    ):
        unflatten_names({"q_proj": 1, "v_proj": 2}, like)


def test_flatten_names_refuses_colliding_names() -> None:
    with pytest.raises(ValueError, match=r"several leaves share the names 'a\.b'"):
        flatten_names({"a.b": np.zeros(1), "a": {"b": np.zeros(1)}})


class Activated(NamedTuple):
    w: Any
    act: str


def test_static_leaves_stay_with_the_template(tmp_path: Any) -> None:
    from stackedtree import stack
    from stackedtree.checkpoint import load_flat, save_flat

    stacked = stack([Activated(np.ones(2, ml_dtypes.bfloat16), "gelu")] * 3)
    path = tmp_path / "a.safetensors"
    save_flat(path, flatten_names(stacked))
    back = unflatten_names(load_flat(path), stacked)
    assert back.act == "gelu" and back.w.shape == (3, 2)
    assert same(back.w, stacked.w)


def test_stacked_namedtuple_round_trips_through_names() -> None:
    block = Block(
        np.ones((2, 3)), Attention(np.ones((2, 4)), np.ones((2, 5))), np.ones(2)
    )
    flat = flatten_names(block)
    back = unflatten_names(
        flat, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), block)
    )
    assert isinstance(back, Block) and back.attention.k_proj is block.attention.k_proj
