"""Name rules: unflatten_by_rules / flatten_by_rules, transpose, split_axis."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import ckptgen
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from ckptgen import DTYPES, _draw_array, assert_same_flat, same
from hypothesis import given, settings
from hypothesis import strategies as st

from stackedtree.checkpoint import (
    Rule,
    Transform,
    _mapping,
    flatten_by_rules,
    load_flat,
    save_stacked,
    split_axis,
    stack_by_name,
    transpose,
    unflatten_by_rules,
)


class Attn(NamedTuple):
    q: Any
    o: Any


class Block(NamedTuple):
    norm: Any
    attn: Attn


class Net(NamedTuple):
    embed: Any
    layers: Block
    head: Any


N, D, HEADS, H = 3, 4, 2, 3
L = "model.layers.{i}."
RULES = [
    Rule("model.embed_tokens.weight", "embed"),
    Rule(L + "norm.weight", "layers.norm"),
    Rule(
        L + "q.weight",
        "layers.attn.q",
        (split_axis(-2, (HEADS, H)), transpose(2, 0, 1)),
    ),
    Rule(
        L + "o.weight",
        "layers.attn.o",
        (split_axis(-1, (HEADS, -1)), transpose(1, 2, 0)),
    ),
    Rule("lm_head.weight", "head", transpose(1, 0)),
]


def checkpoint(dtype: Any = np.float32) -> dict[str, np.ndarray]:
    keys = {
        "norm.weight": ((D,), dtype),
        "q.weight": ((HEADS * H, D), dtype),
        "o.weight": ((D, HEADS * H), dtype),
    }
    return ckptgen.llama(
        N, keys, vocab=10, d=D, norm=False, head=True, dtype=dtype, seed=0
    )


def like(dtype: Any = np.float32) -> Net:
    def s(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    return Net(
        embed=s(10, D),
        layers=Block(norm=s(N, D), attn=Attn(q=s(N, D, HEADS, H), o=s(N, HEADS, H, D))),
        head=s(D, 10),
    )


def message(*lines: str) -> str:
    """A regex matching exactly this error text."""
    return "^" + re.escape("\n".join(lines)) + "$"


# ------------------------------------------------------------------ both directions


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_checkpoint_to_tree_and_back_is_bit_exact(dtype: Any) -> None:
    flat = checkpoint(dtype)
    net = unflatten_by_rules(flat, RULES, like(dtype))
    assert isinstance(net, Net) and isinstance(net.layers.attn, Attn)
    # Query head n of layer i is rows n*H:(n+1)*H of HF's weight, transposed.
    for i in range(N):
        w = flat[f"model.layers.{i}.q.weight"]
        for n in range(HEADS):
            assert same(net.layers.attn.q[i, :, n], w[n * H : (n + 1) * H].T)
    np.testing.assert_array_equal(net.head, flat["lm_head.weight"].T)
    back = flatten_by_rules(net, RULES)
    assert_same_flat(back, flat)
    # Rule order, each layer pattern layer by layer where its first rule stands.
    assert list(back) == list(flat)


def test_transpose_gives_views_of_numpy_tensors() -> None:
    flat = checkpoint()
    net = unflatten_by_rules(flat, RULES, like())
    assert net.head.base is flat["lm_head.weight"]
    assert net.embed is flat["model.embed_tokens.weight"]


def test_a_stacked_checkpoint_is_read_under_its_stacked_names(tmp_path: Any) -> None:
    flat = checkpoint()
    stacked, rest = stack_by_name(flat, L)
    path = str(tmp_path / "stacked.safetensors")
    save_stacked(path, stacked, L, rest)
    on_disk = load_flat(path)
    assert "model.layers.{i}.q.weight" in on_disk
    want = unflatten_by_rules(flat, RULES, like())
    got = unflatten_by_rules(on_disk, RULES, like())
    assert all(
        same(a, b)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )


def test_jax_stays_jax_and_abstract_stays_abstract() -> None:
    flat = {k: jnp.asarray(x) for k, x in checkpoint().items()}
    net = unflatten_by_rules(flat, RULES, like())
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(net))
    assert all(isinstance(x, jax.Array) for x in flatten_by_rules(net, RULES).values())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), checkpoint()
    )
    assert unflatten_by_rules(abstract, RULES, like()) == like()
    assert flatten_by_rules(like(), RULES) == abstract


def test_works_under_jit() -> None:
    flat = checkpoint()
    net = jax.jit(lambda f: unflatten_by_rules(f, RULES, like()))(flat)
    np.testing.assert_array_equal(
        net.layers.attn.o, unflatten_by_rules(flat, RULES, like()).layers.attn.o
    )


def test_static_leaves_of_like_are_kept() -> None:
    rules = [Rule("w", "w")]
    tree = unflatten_by_rules(
        {"w": np.ones(2)}, rules, {"w": np.zeros(2), "act": "gelu"}
    )
    assert tree["act"] == "gelu"


# ---------------------------------------------------------------------- strictness


def test_an_unused_tensor_is_listed() -> None:
    flat = checkpoint()
    for i in range(N):
        flat[f"model.layers.{i}.q.bias"] = np.zeros(HEADS * H, np.float32)
    flat["rotary.inv_freq"] = np.zeros(2, np.float32)
    with pytest.raises(
        ValueError,
        match=message(
            "`flat` and `like` do not match one to one under `rules`:",
            "  unused tensor 'model.layers.{i}.q.bias' (layers 0-2): no rule reads it",
            "  unused tensor 'rotary.inv_freq': no rule reads it",
        ),
    ):
        unflatten_by_rules(flat, RULES, like())


def test_an_unfilled_leaf_is_listed() -> None:
    flat = checkpoint()
    del flat["lm_head.weight"]
    with pytest.raises(
        ValueError,
        match=message(
            "`flat` and `like` do not match one to one under `rules`: unfilled leaf "
            "head: `flat` has no 'lm_head.weight' for `rules[4]`."
        ),
    ):
        unflatten_by_rules(flat, RULES, like())
    with pytest.raises(
        ValueError,
        match=message(
            "`flat` and `like` do not match one to one under `rules`:",
            "  unused tensor 'lm_head.weight': no rule reads it",
            "  unfilled leaf head: no rule fills it",
        ),
    ):
        unflatten_by_rules(checkpoint(), RULES[:-1], like())


def test_unused_tensors_and_unfilled_leaves_come_in_one_error() -> None:
    flat = checkpoint()
    flat["extra"] = np.zeros(1)
    for i in range(N):
        del flat[f"model.layers.{i}.norm.weight"]
    rules = [*RULES, Rule("x", "layers.attn.x")]
    with pytest.raises(ValueError) as e:
        unflatten_by_rules(flat, rules, like())
    assert str(e.value).splitlines() == [
        "`flat` and `like` do not match one to one under `rules`:",
        "  unused tensor 'extra': no rule reads it",
        "  unfilled leaf layers.norm: `flat` has no 'model.layers.{i}.norm.weight' "
        "for `rules[1]`",
        "  `rules[5]` fills layers.attn.x, which is no array leaf of `like`",
    ]


def test_two_rules_for_one_tensor() -> None:
    rules = [*RULES, Rule(L + "q.weight", "layers.attn.k")]
    with pytest.raises(
        ValueError,
        match=message(
            "`rules` are not one to one: `rules[2]` and `rules[5]` both read "
            "'model.layers.{i}.q.weight'."
        ),
    ):
        unflatten_by_rules(checkpoint(), rules, like())
    with pytest.raises(ValueError, match="both read"):
        flatten_by_rules(unflatten_by_rules(checkpoint(), RULES, like()), rules)


def test_two_rules_for_one_leaf_and_a_layer_read_twice() -> None:
    rules = [*RULES, Rule("other", "embed"), Rule("model.layers.1.q.weight", "q1")]
    with pytest.raises(
        ValueError,
        match=message(
            "`rules` are not one to one:",
            "  `rules[0]` and `rules[5]` both fill embed",
            "  `rules[6]` reads 'model.layers.1.q.weight', which `rules[2]` "
            "('model.layers.{i}.q.weight') reads as layer 1",
        ),
    ):
        unflatten_by_rules(checkpoint(), rules, like())


def test_a_plain_rule_may_read_a_tensor_of_one_layer() -> None:
    flat = {"h.0.w": np.zeros(2), "h.1.w": np.ones(2), "h.0.extra": np.full(3, 7.0)}
    rules = [Rule("h.{i}.w", "w"), Rule("h.0.extra", "extra")]
    tree = unflatten_by_rules(
        flat, rules, {"w": np.zeros((2, 2)), "extra": np.zeros(3)}
    )
    assert same(tree["extra"], flat["h.0.extra"])
    assert_same_flat(flatten_by_rules(tree, rules), flat)


def test_a_tensor_given_stacked_and_per_layer() -> None:
    flat = checkpoint()
    flat[L + "norm.weight"] = np.zeros((N, D), np.float32)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "tensor 'model.layers.{i}.norm.weight' is given both stacked and per layer"
        ),
    ):
        unflatten_by_rules(flat, RULES, like())


def test_a_transform_whose_inverse_does_not_round_trip() -> None:
    double = Transform(lambda x: x * 2, lambda x: x)
    rules = [Rule("w", "w", double)]
    with pytest.raises(
        ValueError,
        match=message(
            "`flat` does not fit `like` under `rules`: `rules[0]`: the transform and "
            "its inverse do not give back 'w' bit for bit."
        ),
    ):
        unflatten_by_rules({"w": np.ones(3)}, rules, {"w": np.zeros(3)})
    with pytest.raises(
        ValueError,
        match=message(
            "`tree` does not fit `rules`: `rules[0]`: the inverse of the transform and "
            "the transform do not give back w bit for bit."
        ),
    ):
        flatten_by_rules({"w": np.ones(3)}, rules)
    # A pair that does round-trip passes, and a NaN payload is compared by its bits.
    negate = Transform(np.negative, np.negative)
    x = np.array([1.0, np.nan, -0.0], np.float32)
    assert same(
        flatten_by_rules(
            unflatten_by_rules({"w": x}, [("w", "w", negate)], {"w": x}),
            [("w", "w", negate)],
        )["w"],
        x,
    )


def test_a_leaf_the_transforms_shape_differently_is_refused() -> None:
    rules = [
        *RULES[:2],
        Rule(L + "q.weight", "layers.attn.q", split_axis(-2, (HEADS, H))),
        *RULES[3:],
    ]
    with pytest.raises(
        ValueError,
        match=message(
            "`flat` does not fit `like` under `rules`: layers.attn.q from "
            "'model.layers.{i}.q.weight': shape (3, 2, 3, 4) != (3, 4, 2, 3)."
        ),
    ):
        unflatten_by_rules(checkpoint(), rules, like())
    with pytest.raises(ValueError, match=re.escape("dtype float32 != bfloat16")):
        unflatten_by_rules(checkpoint(), RULES, like(ml_dtypes.bfloat16))


def test_a_failing_transform_names_its_rule() -> None:
    rules = [
        *RULES[:2],
        Rule(L + "q.weight", "layers.attn.q", split_axis(-2, (4, 4))),
        *RULES[3:],
    ]
    with pytest.raises(
        ValueError,
        match=message(
            "`flat` does not fit `like` under `rules`: `rules[2]` "
            "('model.layers.{i}.q.weight' -> layers.attn.q): split_axis(-2, (4, 4)) "
            "cannot split axis -2 of shape (3, 6, 4): 6 is not 4 * 4."
        ),
    ):
        unflatten_by_rules(checkpoint(), rules, like())


def test_flatten_by_rules_is_strict_too() -> None:
    net = unflatten_by_rules(checkpoint(), RULES, like())
    with pytest.raises(
        ValueError,
        match=message(
            "`tree` and `rules` do not match one to one:",
            "  unused leaf head: no rule reads it",
            "  `rules[4]` reads lm_head, which is no array leaf of `tree`",
        ),
    ):
        flatten_by_rules(net, [*RULES[:4], Rule("lm_head.weight", "lm_head")])


def test_flatten_by_rules_checks_the_layer_count_and_the_head_shape() -> None:
    net = unflatten_by_rules(checkpoint(), RULES, like())
    short = net._replace(layers=net.layers._replace(norm=net.layers.norm[:2]))
    with pytest.raises(
        ValueError,
        match=message(
            "`tree` does not fit `rules`: `tree` at layers.norm has leading length 2, "
            "but layers.attn.q has 3."
        ),
    ):
        flatten_by_rules(short, RULES)
    wrong = net._replace(
        layers=net.layers._replace(
            attn=net.layers.attn._replace(q=net.layers.attn.q[..., :2])
        )
    )
    with pytest.raises(
        ValueError,
        match=message(
            "`tree` does not fit `rules`: `rules[2]` (layers.attn.q -> "
            "'model.layers.{i}.q.weight'): the inverse of split_axis(-2, (2, 3)) needs "
            "axes of sizes (2, 3) ending at axis -2, got shape (3, 2, 2, 4)."
        ),
    ):
        flatten_by_rules(wrong, RULES)


def test_malformed_rules() -> None:
    with pytest.raises(TypeError, match="`rules` must be a sequence of Rule"):
        unflatten_by_rules({}, {"w": "w"}, {})  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=re.escape(
            "`rules[0]` must be a Rule or a (name, path[, transform]) tuple, got str 'w'."
        ),
    ):
        flatten_by_rules({}, ["w"])  # type: ignore[list-item]
    with pytest.raises(
        TypeError, match=re.escape("`rules[0]`: a transform must be a Transform")
    ):
        flatten_by_rules({}, [("w", "w", np.transpose)])  # type: ignore[list-item]
    with pytest.raises(
        ValueError,
        match=re.escape("`rules[0]`: the name 'a.{i}.b.{i}' holds `{i}` 2 times"),
    ):
        flatten_by_rules({}, [("a.{i}.b.{i}", "w")])


def test_malformed_checkpoints() -> None:
    with pytest.raises(TypeError, match=re.escape("tensor names must be str, got 1.")):
        unflatten_by_rules({1: np.zeros(1)}, [("w", "w")], {"w": np.zeros(1)})
    with pytest.raises(TypeError, match="tensor `w` must be a numpy or jax array"):
        unflatten_by_rules({"w": [1.0]}, [("w", "w")], {"w": np.zeros(1)})
    with pytest.raises(
        ValueError, match=re.escape("pattern 'h.{i}.': missing layers 1")
    ):
        unflatten_by_rules(
            {"h.0.w": np.zeros(1), "h.2.w": np.zeros(1)},
            [("h.{i}.w", "w")],
            {"w": np.zeros((3, 1))},
        )


def test_transform_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="permutation"):
        transpose(0, 2)
    with pytest.raises(ValueError, match="permutation"):
        transpose()
    with pytest.raises(ValueError, match="`axis` must be negative"):
        split_axis(0, (2, 3))
    with pytest.raises(ValueError, match="at most one -1"):
        split_axis(-1, (-1, -1))
    assert repr(split_axis(-1, (2, -1))) == "split_axis(-1, (2, -1))"
    assert transpose(1, 0) == transpose(1, 0)
    assert split_axis(-1, (2, 3)).inverse(np.zeros((5, 2, 3))).shape == (5, 6)


# ------------------------------------------------------------- the round trip property


@st.composite
def transforms(
    draw: st.DrawFn, shape: tuple[int, ...]
) -> tuple[tuple[Transform, ...], tuple[int, ...]]:
    """A random chain of transforms valid for per-layer `shape`, and its result."""
    chain: list[Transform] = []
    for _ in range(draw(st.integers(0, 2))):
        if shape and draw(st.booleans()):
            axis = draw(st.integers(-len(shape), -1))
            size = shape[axis]
            first = draw(
                st.sampled_from([d for d in range(1, size + 1) if size % d == 0])
            )
            second = draw(st.sampled_from([size // first, -1]))
            t = split_axis(axis, (first, second))
        elif shape:
            perm = draw(st.permutations(range(len(shape))))
            t = transpose(*perm)
        else:
            continue
        chain.append(t)
        shape = jax.eval_shape(t.forward, jax.ShapeDtypeStruct(shape, np.float32)).shape
    return tuple(chain), shape


@st.composite
def trees(draw: st.DrawFn) -> tuple[dict[str, Any], list[Rule]]:
    """A tree of random stacked and unstacked leaves, with rules that name them."""
    n = draw(st.integers(1, 3))
    tree: dict[str, Any] = {"layers": {}, "top": {}}
    rules = []
    for j in range(draw(st.integers(1, 4))):
        layered = draw(st.booleans())
        shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
        chain, leaf_shape = draw(transforms(shape))
        dtype = draw(st.sampled_from(DTYPES))
        full = (n, *leaf_shape) if layered else leaf_shape
        if layered:
            tree["layers"][f"w{j}"] = _draw_array(draw, full, dtype)
            rules.append(Rule(f"model.layers.{{i}}.t{j}.weight", f"layers.w{j}", chain))
        else:
            tree["top"][f"w{j}"] = _draw_array(draw, full, dtype)
            rules.append(Rule(f"top.t{j}", f"top.w{j}", chain))
    return tree, rules


@settings(max_examples=60, deadline=None)
@given(trees())
def test_tree_to_names_to_tree_is_bit_exact(
    case: tuple[dict[str, Any], list[Rule]],
) -> None:
    tree, rules = case
    flat = flatten_by_rules(tree, rules)
    n_layered = sum(r.name.count("{i}") for r in rules)
    n = len(next(iter(tree["layers"].values()))) if tree["layers"] else 0
    assert len(flat) == len(rules) - n_layered + n * n_layered
    back = unflatten_by_rules(flat, rules, tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert same(a, b)
    assert_same_flat(flatten_by_rules(back, rules), flat)


def test_a_shape_mismatch_is_found_before_any_tensor_is_stacked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flat = {f"h.{i}.w": np.zeros((3, 2), np.float32) for i in range(4)}
    like = {"w": np.zeros((4, 2, 3), np.float32)}  # wants the transpose
    stacked_data = []
    real = _mapping.stack_by_name

    def counting(tensors, pattern, /, **kwargs):
        if any(isinstance(x, np.ndarray) for x in tensors.values()):
            stacked_data.append(pattern)
        return real(tensors, pattern, **kwargs)

    monkeypatch.setattr(_mapping, "stack_by_name", counting)
    with pytest.raises(ValueError, match=r"w from 'h.{i}.w': shape \(4, 3, 2\) != "):
        unflatten_by_rules(flat, [Rule("h.{i}.w", "w")], like)
    assert stacked_data == []
    tree = unflatten_by_rules(flat, [Rule("h.{i}.w", "w", transpose(1, 0))], like)
    assert tree["w"].shape == (4, 2, 3) and stacked_data == ["h.{i}."]
