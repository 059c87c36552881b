"""muon_dims: Optax's Muon on a stacked tree updates each layer as it would alone."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackedtree import get_layer, muon_dims, stack, unstack

optax = pytest.importorskip("optax")
from optax.contrib import MuonDimensionNumbers as Dims  # noqa: E402


def random_tree(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
        name: jax.random.normal(k, shape)
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }


def muon_updates(tx: Any, params: Any, grads: list[Any]) -> Any:
    """The updates of the last of several steps (so momentum takes part)."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return updates


def per_layer_reference(tx: Any, stacked: Any, grads: list[Any]) -> Any:
    """Muon applied to each layer on its own, the updates stacked."""
    n = len(unstack(stacked))
    return stack(
        [
            muon_updates(tx, get_layer(stacked, i), [get_layer(g, i) for g in grads])
            for i in range(n)
        ]
    )


def assert_close(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def differs(a: Any, b: Any) -> bool:
    return any(
        not np.allclose(x, y, rtol=1e-3, atol=1e-5)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# --------------------------------------------------------------------- the property


@settings(max_examples=4, deadline=None)
@given(
    n=st.integers(1, 3),
    d=st.integers(2, 6),
    f=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_default_dims_update_each_layer_as_on_its_own(
    n: int, d: int, f: int, seed: int
) -> None:
    stacked = random_tree({"w": (n, d, f), "scale": (n, d), "out": (n, f, d)}, seed)
    grads = [
        random_tree({k: v.shape for k, v in stacked.items()}, seed + s) for s in (1, 2)
    ]
    want = per_layer_reference(optax.contrib.muon(0.1), stacked, grads)
    tx = optax.contrib.muon(0.1, muon_weight_dimension_numbers=muon_dims(stacked))
    assert_close(muon_updates(tx, stacked, grads), want)
    # What muon_dims is for: left to itself, optax sends the stacked (N, d, f) weights
    # to Adam and orthogonalises the stacked (N, d) norm scales.
    assert differs(muon_updates(optax.contrib.muon(0.1), stacked, grads), want)


def test_per_layer_dims_with_einsum_weights_and_experts() -> None:
    n, d, heads, head_dim, experts, ff = 3, 6, 2, 3, 4, 5
    shapes = {
        "q_proj": (n, d, heads, head_dim),
        "o_proj": (n, heads, head_dim, d),
        "experts": (n, experts, d, ff),
        "norm": (n, d),
    }
    per_layer = {
        "q_proj": Dims(0, (1, 2)),
        "o_proj": Dims((-3, -2), -1),
        "experts": Dims(1, 2),
        "norm": None,
    }
    stacked = random_tree(shapes, 0)
    grads = [random_tree(shapes, s) for s in (1, 2)]
    one_layer = optax.contrib.muon(0.1, muon_weight_dimension_numbers=per_layer)
    want = per_layer_reference(one_layer, stacked, grads)
    dims = muon_dims(stacked, per_layer)
    assert dims == {
        "q_proj": Dims(1, (2, 3)),
        "o_proj": Dims((1, 2), 3),
        "experts": Dims(2, 3),
        "norm": None,
    }
    tx = optax.contrib.muon(0.1, muon_weight_dimension_numbers=dims)
    assert_close(muon_updates(tx, stacked, grads), want)
    # One expert's matrix is orthogonalised on its own: each (d, ff) slice of the
    # update has equal singular values, as Muon's sign of a matrix gives them.
    scale = np.linalg.svd(np.asarray(want["experts"][0, 1]), compute_uv=False)
    assert scale.max() / scale.min() < 2.0


# ---------------------------------------------------------------------- the mapping


def test_default_dims_by_rank() -> None:
    tree = {
        "w": np.zeros((4, 8, 16)),
        "experts": np.zeros((4, 2, 8, 16)),
        "scale": np.zeros((4, 8)),
        "count": np.zeros((4,)),
        "bias": None,
        "act": "gelu",
    }
    assert muon_dims(tree) == {
        "act": None,
        "bias": None,
        "count": None,
        "experts": Dims(2, 3),
        "scale": None,
        "w": Dims(1, 2),
    }


def test_works_on_shape_structs_and_as_a_callable() -> None:
    tree = {"w": jax.ShapeDtypeStruct((4, 8, 16), jnp.float32)}
    assert muon_dims(tree) == {"w": Dims(1, 2)}
    # optax calls it with the params (the pure state of an NNX model, say).
    stacked = random_tree({"w": (2, 3, 4), "b": (2, 4)}, 0)
    grads = [random_tree({"w": (2, 3, 4), "b": (2, 4)}, 1)]
    by_value = optax.contrib.muon(0.1, muon_weight_dimension_numbers=muon_dims(stacked))
    by_call = optax.contrib.muon(0.1, muon_weight_dimension_numbers=muon_dims)
    assert_close(
        muon_updates(by_call, stacked, grads), muon_updates(by_value, stacked, grads)
    )


# ---------------------------------------------------------------------- bad input


def test_per_layer_with_another_structure_names_the_path() -> None:
    tree = {"attn": {"q": np.zeros((2, 4, 4))}, "mlp": np.zeros((2, 4, 4))}
    with pytest.raises(
        ValueError,
        match=r"`per_layer` must have the structure of one layer.* at \['attn'\]: "
        r"unexpected \['k'\]",
    ):
        muon_dims(tree, {"attn": {"q": Dims(), "k": Dims()}, "mlp": Dims()})
    with pytest.raises(ValueError, match=r"`per_layer` at \['mlp'\] holds int 3"):
        muon_dims(tree, {"attn": {"q": Dims()}, "mlp": 3})


def test_axes_outside_a_layer_or_overlapping_name_the_path() -> None:
    tree = {
        "q": np.zeros((2, 4, 3, 5)),
        "w": np.zeros((2, 4, 4)),
        "s": np.zeros((2, 4)),
    }
    with pytest.raises(ValueError) as info:
        muon_dims(tree, {"q": Dims(0, (1, 3)), "w": Dims(-1, 1), "s": Dims(0, 1)})
    text = str(info.value)
    assert (
        "`per_layer` at ['q']: output_axis (1, 3) is outside one layer's shape (4, 3, 5) (valid axes: -3 to 2)"
        in text
    )
    assert "`per_layer` at ['w']: reduction_axis -1 and output_axis 1 overlap" in text
    assert (
        "`per_layer` at ['s']: output_axis 1 is outside one layer's shape (4,)" in text
    )
    with pytest.raises(
        ValueError, match=r"at \['w'\]: output_axis must be an int or a non-empty"
    ):
        muon_dims({"w": np.zeros((2, 4, 4))}, {"w": Dims(0, ())})


def test_dims_for_a_static_leaf_or_a_0d_leaf_are_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"at \['act'\] gives dimension numbers where `stacked` holds 'gelu'",
    ):
        muon_dims({"act": "gelu"}, {"act": Dims()})
    with pytest.raises(ValueError, match=r"`stacked` at \['w'\] is 0-d"):
        muon_dims({"w": np.zeros(())})


def test_importing_stackedtree_does_not_import_optax() -> None:
    code = (
        "import sys, numpy as np, stackedtree\n"
        "from stackedtree import stack, describe, scan_layers\n"
        "describe(stack([{'w': np.zeros(2)}] * 2))\n"
        "assert 'optax' not in sys.modules, 'optax imported'\n"
        "stackedtree.muon_dims({'w': np.zeros((2, 3, 3))})\n"
        "assert 'optax' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
