"""Layers of several kinds: `layers=` in memory, kinds on disk, inspect and the command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import ckptgen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ckptgen import (
    NAME_CHARS,
    _draw_array,
    assert_same_flat,
    deepseek,
    patterns,
    run_command,
    same,
    specs,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from stackedtree.checkpoint import (
    StackedCheckpoint,
    convert_stack,
    convert_unstack,
    detect_kinds,
    inspect_checkpoint,
    load_flat,
    load_stacked,
    save_flat,
    save_stacked,
    stack_by_name,
    unstack_by_name,
)
from stackedtree.checkpoint._io import read_checkpoint
from stackedtree.checkpoint._layer_pattern import LayerPattern, kind_label
from stackedtree.checkpoint._stacked import stored_plan
from stackedtree.cli import main

P = "model.layers.{i}."


class KindCase(NamedTuple):
    pattern: str
    flat: dict[str, np.ndarray]
    kinds: dict[str, list[int]]


@st.composite
def kind_cases(draw: st.DrawFn, max_layers: int = 5, max_kinds: int = 3) -> KindCase:
    """A per-layer checkpoint, layer-major, whose layers hold one of a few key sets."""
    pattern = draw(patterns())
    lp = LayerPattern.parse(pattern)
    key_text = st.text(alphabet=NAME_CHARS, max_size=5)
    if lp.after == "":
        key_text = key_text.filter(lambda k: not k[:1].isdigit())
    key_sets = draw(
        st.lists(
            st.lists(key_text, min_size=1, max_size=3, unique=True),
            min_size=1,
            max_size=max_kinds,
            unique_by=frozenset,
        )
    )
    key_specs = [{key: draw(specs) for key in keys} for keys in key_sets]
    n = draw(st.integers(1, max_layers))
    assign = draw(st.lists(st.integers(0, len(key_sets) - 1), min_size=n, max_size=n))
    rest_names = draw(
        st.lists(
            st.text(alphabet=NAME_CHARS, min_size=1, max_size=8).filter(
                lambda name: lp.match(name) is None
            ),
            max_size=2,
            unique=True,
        )
    )
    flat = {name: _draw_array(draw, *draw(specs)) for name in rest_names}
    for i, k in enumerate(assign):
        for key, (shape, dtype) in key_specs[k].items():
            flat[lp.layer_name(i, key)] = _draw_array(draw, shape, dtype)
    first = list(dict.fromkeys(assign))
    kinds = {
        kind_label(j): [i for i, k in enumerate(assign) if k == kk]
        for j, kk in enumerate(first)
    }
    return KindCase(pattern, flat, kinds)


# ------------------------------------------------------------------------ properties


@settings(max_examples=40, deadline=None)
@given(case=kind_cases(), data=st.data())
def test_stacking_by_kind_round_trips_bit_exactly(case: KindCase, data: Any) -> None:
    lp = LayerPattern.parse(case.pattern)
    assert detect_kinds(case.flat, case.pattern) == case.kinds
    stacked, rest = stack_by_name(case.flat, case.pattern, layers=case.kinds)
    assert list(stacked) == list(case.kinds)
    for label, layers in case.kinds.items():
        for key, x in stacked[label].items():
            assert x.shape[0] == len(layers)
            for j, i in enumerate(layers):
                assert same(x[j, ...], case.flat[lp.layer_name(i, key)])
    assert_same_flat(rest, {k: v for k, v in case.flat.items() if lp.match(k) is None})
    back = unstack_by_name(stacked, case.pattern, rest, layers=case.kinds)
    assert_same_flat(back, case.flat)
    assert list(back) == [k for k in case.flat if lp.match(k)] + list(rest)

    # One kind alone, its layers in any order; the other layers stay in `rest`.
    label = data.draw(st.sampled_from(list(case.kinds)))
    order = data.draw(st.permutations(case.kinds[label]))
    one, others = stack_by_name(case.flat, case.pattern, layers=order)
    where = [case.kinds[label].index(i) for i in order]
    assert_same_flat(one, {k: x[where] for k, x in stacked[label].items()})
    assert_same_flat(
        unstack_by_name(one, case.pattern, others, layers=order), case.flat
    )


@settings(max_examples=20, deadline=None)
@given(case=kind_cases(max_layers=4), suffix=st.sampled_from([".safetensors", ".npz"]))
def test_converting_by_kind_round_trips_bit_exactly(
    tmp_path_factory: Any, case: KindCase, suffix: str
) -> None:
    folder = tmp_path_factory.mktemp("kinds")
    src, out, back = (folder / f"{n}{suffix}" for n in ("src", "out", "back"))
    save_flat(src, case.flat, metadata={"origin": "test"})
    several = len(case.kinds) > 1
    # Random keys may hold numbered parts; experts have their own property.
    done = convert_stack(src, out, pattern=case.pattern, experts="none")
    assert done.kinds == (case.kinds if several else None)
    assert done.num_layers == sum(map(len, case.kinds.values()))
    loaded = load_stacked(out)
    if several:
        stacked, rest, pattern, kinds = loaded
        assert kinds == case.kinds
        want = stack_by_name(case.flat, case.pattern, layers=kinds)
        assert list(stacked) == list(kinds)
        for label in kinds:
            assert_same_flat(stacked[label], want[0][label])
        save_stacked(folder / f"again{suffix}", stacked, pattern, rest, layers=kinds)
        again = folder / f"again{suffix}"
        assert_same_flat(load_flat(again), load_flat(out))
        assert read_checkpoint(again).metadata == {
            k: v for k, v in read_checkpoint(out).metadata.items() if k != "origin"
        }
    else:
        stacked, rest, pattern, kinds = loaded
        assert kinds is None
        want = stack_by_name(case.flat, case.pattern)
        assert_same_flat(stacked, want[0])
    assert pattern == case.pattern
    assert_same_flat(rest, want[1])
    assert read_checkpoint(out).metadata["origin"] == "test"

    done = convert_unstack(out, back)
    assert done.kinds == (case.kinds if several else None)
    assert_same_flat(load_flat(back), case.flat)
    assert read_checkpoint(back).metadata == {"origin": "test"}
    # Layer-major in, layer-major out: the same bytes, when the file's order is the
    # one written (the reader orders empty tensors, which share an offset, by name).
    if suffix == ".safetensors" and list(load_flat(src)) == list(case.flat):
        assert back.read_bytes() == src.read_bytes()


# --------------------------------------------------------------------- the file format


def llama() -> dict[str, np.ndarray]:
    return ckptgen.llama(head=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_uniform_model_is_stacked_byte_for_byte_as_before(tmp_path: Path) -> None:
    # The digests are of the files the code before the stacking plan wrote for this
    # checkpoint (whose format was that of before layers could be of several kinds).
    save_flat(tmp_path / "a.safetensors", llama(), metadata={"format": "pt"})
    done = convert_stack(tmp_path / "a.safetensors", tmp_path / "s.safetensors")
    assert done.kinds is None
    assert sha256(tmp_path / "s.safetensors") == (
        "d1e1e41855cbbbaa6b8ed16e245098f77bf97d404e69580eb85e65ead699e60f"
    )
    stacked, rest = stack_by_name(llama(), P)
    save_stacked(
        tmp_path / "s2.safetensors", stacked, P, rest, metadata={"format": "pt"}
    )
    assert sha256(tmp_path / "s2.safetensors") == (
        "0178a70066c064a13b7e26b09a9b76791b4bf7ce1ca123452b492f2d61500f42"
    )
    convert_unstack(tmp_path / "s.safetensors", tmp_path / "u.safetensors")
    assert (tmp_path / "u.safetensors").read_bytes() == (
        tmp_path / "a.safetensors"
    ).read_bytes()
    # One shape for every file: four fields, `kinds` None for one kind of layers.
    loaded = load_stacked(tmp_path / "s.safetensors")
    assert len(loaded) == 4 and loaded.kinds is None
    assert isinstance(loaded, StackedCheckpoint)


def test_kinds_file_layout(tmp_path: Path) -> None:
    flat = deepseek(dense=2, moe=3)
    save_flat(tmp_path / "a.safetensors", flat)
    done = convert_stack(
        tmp_path / "a.safetensors", tmp_path / "s.safetensors", experts="none"
    )
    assert done.kinds == {"A": [0, 1], "B": [2, 3, 4]} and done.num_tensors == 10
    assert list(load_flat(tmp_path / "s.safetensors")) == [
        "model.embed_tokens.weight",
        "model.layers.{i:A}.input_layernorm.weight",
        "model.layers.{i:A}.self_attn.q_proj.weight",
        "model.layers.{i:A}.mlp.up_proj.weight",
        "model.layers.{i:B}.input_layernorm.weight",
        "model.layers.{i:B}.self_attn.q_proj.weight",
        "model.layers.{i:B}.mlp.gate.weight",
        "model.layers.{i:B}.mlp.experts.0.up_proj.weight",
        "model.layers.{i:B}.mlp.experts.1.up_proj.weight",
        "model.norm.weight",
    ]
    assert read_checkpoint(tmp_path / "s.safetensors").metadata == {
        "stackedtree.pattern": P,
        "stackedtree.num_layers": "5",
        "stackedtree.kinds": '{"A":[0,1],"B":[2,3,4]}',
    }
    stacked, *_ = load_stacked(tmp_path / "s.safetensors")
    assert stacked["B"]["mlp.gate.weight"].shape == (3, 2, 8)
    assert same(
        stacked["B"]["mlp.gate.weight"][1], flat["model.layers.3.mlp.gate.weight"]
    )
    convert_unstack(tmp_path / "s.safetensors", tmp_path / "u.safetensors")
    assert (tmp_path / "u.safetensors").read_bytes() == (
        tmp_path / "a.safetensors"
    ).read_bytes()


def test_interleaved_kinds_and_their_labels(tmp_path: Path) -> None:
    # Qwen3-Next: three linear-attention layers, then one full-attention layer.
    flat = {}
    for i in range(8):
        attn = "self_attn.q_proj.weight" if i % 4 == 3 else "linear_attn.in_proj.weight"
        flat[f"model.layers.{i}.{attn}"] = np.full((2, 2), i, np.float32)
        flat[f"model.layers.{i}.mlp.up_proj.weight"] = np.full(2, i, np.float32)
    assert detect_kinds(flat, P) == {"A": [0, 1, 2, 4, 5, 6], "B": [3, 7]}
    save_flat(tmp_path / "a.safetensors", flat)
    convert_stack(tmp_path / "a.safetensors", tmp_path / "s.safetensors")
    stacked, *_ = load_stacked(tmp_path / "s.safetensors")
    np.testing.assert_array_equal(stacked["B"]["mlp.up_proj.weight"][:, 0], [3, 7])
    convert_unstack(tmp_path / "s.safetensors", tmp_path / "u.safetensors")
    assert (tmp_path / "u.safetensors").read_bytes() == (
        tmp_path / "a.safetensors"
    ).read_bytes()
    # Labels go on past Z.
    many = [f"h.{i}.k{i}" for i in range(28)]
    assert list(detect_kinds(many, "h.{i}."))[-3:] == ["Z", "AA", "AB"]


def test_stacked_names_of_kinds() -> None:
    lp = LayerPattern.parse(P)
    assert lp.stacked_name("mlp.w") == "model.layers.{i}.mlp.w"
    assert lp.stacked_name("mlp.w", "dense") == "model.layers.{i:dense}.mlp.w"
    assert lp.stacked_match("model.layers.{i:dense}.mlp.w") == ("dense", "mlp.w")
    assert lp.stacked_match("model.layers.{i}.mlp.w") == (None, "mlp.w")
    for name in (
        "model.layers.3.mlp.w",
        "model.layers.{i:}.w",
        "model.layers.{i:a-b}.w",
        "model.layers.{i:A}w",
        "model.layers.{i:A.w",
        "model.layers.{j}.w",
    ):
        assert lp.stacked_match(name) is None, name
        assert lp.match(name) is None or name == "model.layers.3.mlp.w"


def test_jax_and_abstract_stacks_by_kind() -> None:
    flat = {f"h.{i}.w": jnp.full((2,), i, jnp.bfloat16) for i in range(3)}
    flat["h.3.v"] = jnp.ones(3)
    stacked, rest = stack_by_name(flat, "h.{i}.", layers={"A": [2, 0], "B": [3]})
    assert isinstance(stacked["A"]["w"], jax.Array) and stacked["A"]["w"].shape == (
        2,
        2,
    )
    assert list(rest) == ["h.1.w"]
    back = unstack_by_name(stacked, "h.{i}.", rest, layers={"A": [2, 0], "B": [3]})
    assert sorted(back) == sorted(flat) and all(same(back[k], flat[k]) for k in flat)
    abstract = {f"h.{i}.w": jax.ShapeDtypeStruct((5,), jnp.float32) for i in range(4)}
    stacked, _ = stack_by_name(abstract, "h.{i}.", layers={"A": [0, 1], "B": [2, 3]})
    assert stacked["B"]["w"] == jax.ShapeDtypeStruct((2, 5), jnp.float32)


# ---------------------------------------------------------------------------- errors


def test_same_keys_with_other_shapes_stay_an_error(tmp_path: Path) -> None:
    flat = deepseek(dense=2, moe=3)
    flat["model.layers.3.mlp.gate.weight"] = np.zeros((3, 8), np.float32)
    flat["model.layers.1.self_attn.q_proj.weight"] = np.zeros((8, 8), np.float16)
    save_flat(tmp_path / "a.safetensors", flat)
    with pytest.raises(ValueError, match="across layers of one kind") as e:
        convert_stack(tmp_path / "a.safetensors", tmp_path / "s.safetensors")
    assert str(e.value).splitlines()[1:] == [
        "  kind A (layers 0-1): `model.layers.1.self_attn.q_proj.weight` has shape "
        "(8, 8) dtype float16, expected shape (8, 8) dtype float32 like "
        "`model.layers.0.self_attn.q_proj.weight`",
        "  kind B (layers 2-4): `model.layers.3.mlp.gate.weight` has shape (3, 8) "
        "dtype float32, expected shape (2, 8) dtype float32 like "
        "`model.layers.2.mlp.gate.weight`",
    ]
    assert not (tmp_path / "s.safetensors").exists()
    with pytest.raises(ValueError, match=r"`model\.layers\.3\.mlp\.gate\.weight` has"):
        stack_by_name(flat, P, layers=[2, 3, 4])


@pytest.mark.parametrize(
    ("layers", "error", "message"),
    [
        ([0, 1, 0], ValueError, r"`layers` repeats layer 0; list each layer once"),
        ([1, -1], ValueError, r"`layers\[1\]` is -1, but layer indices are 0 or more"),
        ([0, 1.0], TypeError, r"`layers\[1\]` is float 1\.0"),
        ([True], TypeError, r"`layers\[0\]` is bool True"),
        ("01", TypeError, r"`layers` must be a sequence of layer indices, got str"),
        (3, TypeError, r"`layers` must be a sequence of layer indices, got int"),
        ([], ValueError, r"`layers` is empty"),
        ([0, 9, 7], ValueError, r"`layers` lists layers 7, 9, which pattern "),
        (
            [1, 2],
            ValueError,
            r"layers 1-2 do not hold the same keys:\n  layer 1 has extra",
        ),
        ({"A": [0, 1], "B": [1, 2]}, ValueError, r"layer 1 is in kinds 'A' and 'B'"),
        ({"a b": [0]}, ValueError, r"has kind label 'a b'; a label is a non-empty"),
        ({0: [0]}, TypeError, r"`layers` must have str kind labels, got int 0"),
        ({"A": 0}, TypeError, r"`layers\['A'\]` must be a sequence"),
        ({}, ValueError, r"`layers` is an empty mapping"),
    ],
)
def test_bad_layers(layers: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        stack_by_name(deepseek(dense=2, moe=3), P, layers=layers)


def test_unstack_by_name_checks_layers() -> None:
    stacked, rest = stack_by_name(deepseek(), P, layers={"D": [0, 1], "M": [2, 3, 4]})
    with pytest.raises(ValueError, match=r"`layers` lists 3 layers, but the tensors"):
        unstack_by_name(stacked["D"], P, layers=[0, 1, 2])
    with pytest.raises(TypeError, match=r"`stacked\['D'\]` is a mapping: stacked "):
        unstack_by_name(stacked, P, rest)
    with pytest.raises(ValueError, match=r"must have the same kind labels"):
        unstack_by_name(stacked, P, rest, layers={"D": [0, 1]})
    with pytest.raises(ValueError, match=r"`stacked\['M'\]` holds 3 layers, but"):
        unstack_by_name(stacked, P, rest, layers={"D": [0, 1], "M": [2, 3]})
    # Other layers may stay in `rest`; the layers written here may not.
    part, others = stack_by_name(deepseek(), P, layers=[0, 1])
    assert len(unstack_by_name(part, P, others, layers=[0, 1])) == len(deepseek())
    with pytest.raises(
        ValueError, match=r"reads as layer tensors:\n  'model\.layers\.2"
    ):
        unstack_by_name(part, P, others, layers=[1, 2])


def test_save_stacked_checks_kinds(tmp_path: Path) -> None:
    kinds = {"D": [0, 1], "M": [3, 4]}
    stacked, rest = stack_by_name(deepseek(), P, layers=kinds)
    with pytest.raises(ValueError, match=r"must hold the layers 0\.\.N-1 .* 0-1, 3-4"):
        save_stacked(tmp_path / "x.npz", stacked, P, rest, layers=kinds)
    kinds = {"D": [0, 1], "M": [2, 3, 4]}
    stacked, rest = stack_by_name(deepseek(), P, layers=kinds)
    layer = {"model.layers.9.w": np.ones(1)}
    with pytest.raises(ValueError, match=r"reads as layer tensors: 'model\.layers\.9"):
        save_stacked(tmp_path / "x.npz", stacked, P, rest | layer, layers=kinds)
    with pytest.raises(TypeError, match=r"`layers` must map kind labels"):
        save_stacked(tmp_path / "x.npz", stacked["D"], P, rest, layers=[0, 1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`stacked\['D'\]` is a mapping"):
        save_stacked(tmp_path / "x.npz", stacked, P, rest)
    with pytest.raises(ValueError, match=r"read back as stacked tensors"):
        save_stacked(
            tmp_path / "x.npz", stacked["D"], P, {"model.layers.{i:Z}.w": np.ones(1)}
        )
    assert list(tmp_path.iterdir()) == []


def test_a_name_that_would_read_back_as_stacked_is_refused(tmp_path: Path) -> None:
    flat = {"h.0.w": np.zeros(2), "h.1.w": np.zeros(2), "h.{i}.w": np.zeros((2, 2))}
    save_flat(tmp_path / "a.safetensors", flat)
    with pytest.raises(ValueError, match=r"would be read back as stacked tensors"):
        convert_stack(tmp_path / "a.safetensors", tmp_path / "s.safetensors")


def _kinds_file(
    path: Path, kinds: str, n: int, tensors: dict[str, tuple[int, ...]]
) -> Path:
    shapes = tensors or {"h.{i:A}.w": (2, 4), "h.{i:B}.w": (1, 4)}
    save_flat(
        path,
        {name: np.zeros(shape, np.float32) for name, shape in shapes.items()},
        metadata={
            "stackedtree.pattern": "h.{i}.",
            "stackedtree.num_layers": str(n),
            "stackedtree.kinds": kinds,
        },
    )
    return path


@pytest.mark.parametrize(
    ("kinds", "n", "tensors", "message"),
    [
        ("nope", 3, {}, r"`stackedtree\.kinds` is not JSON"),
        ("[0, 1]", 3, {}, r"must map kind labels to lists of layers, got \[0, 1\]"),
        ("{}", 3, {}, r"must map kind labels to lists of layers, got \{\}"),
        ('{"A":[0,1],"A":[2]}', 3, {}, r"repeats kind A"),
        ('{"A":[0,1],"B":[1]}', 3, {}, r"gives layer 1 to kinds A and B"),
        (
            '{"A":[0,1],"B":[3]}',
            3,
            {},
            r"gives kind B layer 3, but the layers are 0\.\.2",
        ),
        ('{"A":[0,1],"B":[true]}', 3, {}, r"gives kind B layer true"),
        ('{"A":[0],"B":[1]}', 10**12, {}, r"gives 2 layers to its kinds, but"),
        ('{"A":[0,1],"B":[]}', 3, {}, r"gives kind B \[\], not a list of layers"),
        ('{"A":[0,1],"B":2}', 3, {}, r"gives kind B 2, not a list of layers"),
        ('{"A":[0,1]}', 3, {}, r"gives 2 layers to its kinds, but `stackedtree\.num_"),
        ('{"A":[0,1],"b c":[2]}', 3, {}, r"has kind label `b c`, which is not a word"),
        (
            '{"A":[0],"B":[1,2]}',
            3,
            {},
            r"`h\.\{i:A\}\.w` has shape \(2, 4\), but kind A ",
        ),
        (
            '{"A":[0,1],"B":[2]}',
            3,
            {"h.{i:A}.w": (2,), "h.{i:C}.w": (1,)},
            r"tensor `h\.\{i:C\}\.w` is stacked by its name, but .* records A, B",
        ),
        (
            '{"A":[0,1],"B":[2]}',
            3,
            {"h.{i:A}.w": (2,), "h.{i}.w": (3,)},
            r"tensor `h\.\{i\}\.w` is stacked by its name",
        ),
        (
            '{"A":[0,1],"B":[2],"C":[3]}',
            4,
            {},
            r"records kinds C, of which the file holds no tensor",
        ),
    ],
)
def test_malformed_kinds_are_refused(
    tmp_path: Path, kinds: str, n: int, tensors: dict[str, Any], message: str
) -> None:
    path = _kinds_file(tmp_path / "s.safetensors", kinds, n, tensors)
    for read in (
        load_stacked,
        inspect_checkpoint,
        lambda p: convert_unstack(p, tmp_path / "u.safetensors"),
    ):
        with pytest.raises(ValueError, match=message):
            read(path)
    assert not (tmp_path / "u.safetensors").exists()


def test_a_uniform_file_keeps_reading_as_before(tmp_path: Path) -> None:
    # Without recorded kinds, a `{i:A}` name is one of the other tensors, as it was.
    path = tmp_path / "s.safetensors"
    save_flat(
        path,
        {"h.{i}.w": np.zeros((2, 3)), "h.{i:A}.w": np.ones(1)},
        metadata={"stackedtree.pattern": "h.{i}.", "stackedtree.num_layers": "2"},
    )
    stacked, rest, _, _ = load_stacked(path)
    assert list(stacked) == ["w"] and list(rest) == ["h.{i:A}.w"]
    assert stored_plan(read_checkpoint(path)).kinds[0].names == {"w": "h.{i}.w"}


# ----------------------------------------------------------------- inspect, command


def test_inspect_shows_kinds(tmp_path: Path) -> None:
    save_flat(tmp_path / "a.safetensors", deepseek(dense=2, moe=3))
    assert inspect_checkpoint(
        tmp_path / "a.safetensors", experts="none"
    ).splitlines() == [
        "1 file, 23 tensors, 3.2 KiB (3312 bytes)",
        "layer pattern: 'model.layers.{i}.' (detected), 5 layers of 2 kinds",
        "kind A: 2 layers (0-1) of 3 tensors (784 B each); layer 0:",
        "  input_layernorm.weight   bf16[8]",
        "  mlp.up_proj.weight       f32[16,8]",
        "  self_attn.q_proj.weight  f32[8,8]",
        "kind B: 3 layers (2-4) of 5 tensors (400 B each); layer 2:",
        "  input_layernorm.weight        bf16[8]",
        "  mlp.experts.0.up_proj.weight  i8[4,8]",
        "  mlp.experts.1.up_proj.weight  i8[4,8]",
        "  mlp.gate.weight               f32[2,8]",
        "  self_attn.q_proj.weight       f32[8,8]",
        "other tensors (2):",
        "  model.embed_tokens.weight  f32[16,8]",
        "  model.norm.weight          f32[8]",
    ]
    convert_stack(
        tmp_path / "a.safetensors", tmp_path / "s.safetensors", experts="none"
    )
    assert inspect_checkpoint(tmp_path / "s.safetensors").splitlines()[1:5] == [
        "stacked checkpoint: pattern 'model.layers.{i}.', 5 layers of 2 kinds",
        "kind A: 2 layers (0-1), 3 stacked tensors, leading axis = layer:",
        "  model.layers.{i:A}.input_layernorm.weight   bf16[2,8]",
        "  model.layers.{i:A}.mlp.up_proj.weight       f32[2,16,8]",
    ]
    assert "kind B: 3 layers (2-4), 5 stacked tensors, leading axis = layer:" in (
        inspect_checkpoint(tmp_path / "s.safetensors")
    )


run = run_command


def test_the_command_stacks_and_unstacks_kinds(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    save_flat(src, deepseek(dense=2, moe=3), metadata={"format": "pt"})
    out = tmp_path / "stacked.safetensors"
    r = run("stack", str(src), "-o", str(out), "--experts", "none")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"wrote {out}: 10 tensors, 3.2 KiB, 5 layers by pattern 'model.layers.{{i}}.' "
        "in 2 kinds: A (0-1), B (2-4)"
    )
    r = run("inspect", str(out))
    assert "kind B: 3 layers (2-4), 5 stacked tensors" in r.stdout
    assert "metadata: format='pt'" in r.stdout
    back = tmp_path / "back.safetensors"
    r = run("unstack", str(out), "-o", str(back), "-q")
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()


def test_the_command_through_npz(tmp_path: Path, capsys: Any) -> None:
    flat = deepseek(dense=1, moe=2)
    save_flat(tmp_path / "a.npz", flat)
    assert main(["stack", str(tmp_path / "a.npz"), "-o", str(tmp_path / "s.npz")]) == 0
    assert "in 2 kinds: A (0), B (1-2)" in capsys.readouterr().out
    assert (
        main(["unstack", str(tmp_path / "s.npz"), "-o", str(tmp_path / "u.npz")]) == 0
    )
    assert_same_flat(load_flat(tmp_path / "u.npz"), flat)
    save_flat(
        tmp_path / "bad.safetensors",
        {**flat, "model.layers.2.mlp.gate.weight": np.zeros(1)},
    )
    assert (
        main(
            ["stack", str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "x.npz")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "across layers of one kind: kind B (layers 1-2): " in err


def test_kinds_metadata_is_compact_json(tmp_path: Path) -> None:
    flat = deepseek(dense=1, moe=2)
    stacked, rest = stack_by_name(flat, P, layers={"dense": [0], "moe": [2, 1]})
    save_stacked(
        tmp_path / "s.safetensors",
        stacked,
        P,
        rest,
        layers={"dense": [0], "moe": [2, 1]},
    )
    meta = read_checkpoint(tmp_path / "s.safetensors").metadata
    assert json.loads(meta["stackedtree.kinds"]) == {"dense": [0], "moe": [2, 1]}
    convert_unstack(tmp_path / "s.safetensors", tmp_path / "u.safetensors")
    assert_same_flat(load_flat(tmp_path / "u.safetensors"), flat)
