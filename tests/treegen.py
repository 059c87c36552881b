"""Hypothesis strategies for random per-layer trees, and a bit-exact tree comparison.

A *template* describes one layer: nested dicts, lists, tuples and NamedTuples whose
leaves are `ArraySpec`s (shape, dtype and array library) or static values. `make_layers`
turns a template into N layers of random bits, so round trips can be checked bit-exactly
(NaN payloads and all).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

# Dtypes jax holds without x64; numpy leaves also get the 64-bit ones.
JAX_DTYPES = [
    np.dtype(np.bool_),
    np.dtype(np.int8),
    np.dtype(np.uint8),
    np.dtype(np.int16),
    np.dtype(np.uint32),
    np.dtype(np.int32),
    np.dtype(np.float16),
    np.dtype(jnp.bfloat16),
    np.dtype(np.float32),
    np.dtype(np.complex64),
]
NUMPY_DTYPES = [
    *JAX_DTYPES,
    np.dtype(np.float64),
    np.dtype(np.int64),
    np.dtype(np.uint64),
]

# "mixed" leaves are numpy in layer 0 and jax in the other layers; stacking makes them jax.
KINDS = ["numpy", "jax", "mixed", "abstract"]


class Pair(NamedTuple):
    first: Any
    second: Any


class Block(NamedTuple):
    norm: Any
    inner: Any
    out: Any


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    kind: str


def _array_specs() -> st.SearchStrategy[ArraySpec]:
    shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)

    @st.composite
    def spec(draw: st.DrawFn) -> ArraySpec:
        kind = draw(st.sampled_from(KINDS))
        dtypes = NUMPY_DTYPES if kind == "numpy" else JAX_DTYPES
        return ArraySpec(draw(shapes), draw(st.sampled_from(dtypes)), kind)

    return spec()


_statics = st.one_of(
    st.integers(-5, 5),
    st.text(alphabet="abc", max_size=3),
    st.floats(allow_nan=False, width=32),
    st.sampled_from([jax.nn.relu, jnp.tanh, "gelu"]),
)


def _has_array(t: Any) -> bool:
    return any(isinstance(x, ArraySpec) for x in jax.tree.leaves(t))


templates: st.SearchStrategy[Any] = st.recursive(
    st.one_of(_array_specs(), _array_specs(), _statics),
    lambda children: st.one_of(
        st.dictionaries(
            st.text(alphabet="xyz", min_size=1, max_size=2), children, max_size=3
        ),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.builds(Pair, children, children),
        st.builds(Block, children, children, children),
    ),
    max_leaves=6,
).filter(_has_array)
"""Templates with at least one array leaf (a stack needs a layer axis)."""


def random_array(spec: ArraySpec, rng: np.random.Generator) -> np.ndarray:
    """Random bits of `spec`'s shape and dtype (bools are 0 or 1)."""
    if spec.dtype == np.bool_:
        return rng.integers(0, 2, spec.shape).astype(np.bool_)
    nbytes = int(np.prod(spec.shape, dtype=np.int64)) * spec.dtype.itemsize
    return (
        rng.integers(0, 256, nbytes, dtype=np.uint8)
        .view(spec.dtype)
        .reshape(spec.shape)
    )


def make_layer(template: Any, rng: np.random.Generator, index: int) -> Any:
    """One layer built from `template`: array leaves of the spec's library, random bits."""

    def leaf(x: Any) -> Any:
        if not isinstance(x, ArraySpec):
            return x
        if x.kind == "abstract":
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        data = random_array(x, rng)
        if x.kind == "numpy" or (x.kind == "mixed" and index == 0):
            return data
        return jnp.asarray(data)

    return jax.tree.map(leaf, template)


def make_layers(template: Any, n: int, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    return [make_layer(template, rng, i) for i in range(n)]


def kind(x: Any) -> str:
    if isinstance(x, jax.ShapeDtypeStruct):
        return "abstract"
    if isinstance(x, np.ndarray | np.generic):
        return "numpy"
    if isinstance(x, jax.Array):
        return "jax"
    return "static"


def assert_bits_equal(
    actual: Any, expected: Any, *, stacked_kinds: bool = False
) -> None:
    """`actual` equals `expected` bit for bit, leaf by leaf, and keeps each leaf's library.

    With `stacked_kinds`, a numpy leaf of `expected` may be jax in `actual` (what stacking
    a layer mixing numpy and jax gives).
    """
    flat_a, td_a = jax.tree_util.tree_flatten_with_path(actual)
    flat_e, td_e = jax.tree_util.tree_flatten_with_path(expected)
    assert td_a == td_e, f"structure {td_a} != {td_e}"
    for (path, a), (_, e) in zip(flat_a, flat_e, strict=True):
        where = jax.tree_util.keystr(path)
        ka, ke = kind(a), kind(e)
        assert ka == ke or (stacked_kinds and (ka, ke) == ("jax", "numpy")), (
            f"{where}: {ka} != {ke}"
        )
        if ke == "static":
            assert a is e or a == e, f"{where}: {a!r} != {e!r}"
            continue
        assert tuple(a.shape) == tuple(e.shape), f"{where}: {a.shape} != {e.shape}"
        assert a.dtype == e.dtype, f"{where}: {a.dtype} != {e.dtype}"
        if ke != "abstract":
            ba, be = np.asarray(a).tobytes(), np.asarray(e).tobytes()
            assert ba == be, f"{where}: bits differ"


def expected_stack(layers: list[Any]) -> Any:
    """The stack written out with numpy, leaf by leaf, for comparison."""

    def stack_leaf(*xs: Any) -> Any:
        if kind(xs[0]) == "abstract":
            return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
        if kind(xs[0]) == "static":
            return xs[0]
        data = np.stack([np.asarray(x) for x in xs])
        return data if all(kind(x) == "numpy" for x in xs) else jnp.asarray(data)

    return jax.tree.map(stack_leaf, *layers)
