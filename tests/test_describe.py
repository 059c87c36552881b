"""describe."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stackedtree import describe, get_layer, stack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from llama_model import LLAMA_7B, block_shapes

# Copied verbatim from ../shared/reference/scan-tutorial.md.
TUTORIAL_STACKED = """
DecoderBlock(
  input_norm=(32, 4096),
  attention=Attention(
    q_proj=(32, 4096, 1, 32, 128),
    k_proj=(32, 4096, 32, 128),
    v_proj=(32, 4096, 32, 128),
    out_proj=(32, 1, 32, 128, 4096)
  ),
  post_attn_norm=(32, 4096), gate_proj=(32, 4096, 11008),
  up_proj=(32, 4096, 11008), down_proj=(32, 11008, 4096)
)
"""

TUTORIAL_LAYER = """
DecoderBlock(
  input_norm=(4096),
  attention=Attention(
    q_proj=(4096, 1, 32, 128),
    k_proj=(4096, 32, 128),
    v_proj=(4096, 32, 128),
    out_proj=(1, 32, 128, 4096)
  ),
  post_attn_norm=(4096), gate_proj=(4096, 11008),
  up_proj=(4096, 11008), down_proj=(11008, 4096)
)
"""


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def llama() -> Any:
    return stack([block_shapes(LLAMA_7B)] * 32)


def test_reproduces_the_tutorial_printout(llama: Any) -> None:
    assert isinstance(llama.attention.q_proj, jax.ShapeDtypeStruct)  # nothing allocated
    assert squash(describe(llama)) == squash(TUTORIAL_STACKED)


def test_reproduces_the_tutorial_per_layer_printout(llama: Any) -> None:
    assert squash(describe(get_layer(llama, 0))) == squash(TUTORIAL_LAYER)


def test_lines_fit_the_width(llama: Any) -> None:
    for width in (40, 60, 88):
        text = describe(llama, width=width)
        assert squash(text) == squash(TUTORIAL_STACKED)
        # Leaves never split, so only a lone over-long atom may overflow.
        assert all(len(line) <= width or "=(" in line for line in text.splitlines())
    assert "\n" not in describe(llama, width=1000)


def test_dtypes(llama: Any) -> None:
    text = describe(llama, dtypes=True, width=1000)
    assert text.startswith(
        "DecoderBlock(input_norm=bf16[32,4096], attention=Attention("
    )
    assert "q_proj=bf16[32,4096,1,32,128]" in text
    tree = {
        "a": np.zeros((2,), np.float32),
        "b": np.zeros((2, 3), np.int8),
        "c": np.zeros((), np.uint32),
        "d": jnp.zeros((1,), jnp.complex64),
        "e": np.zeros((0,), np.bool_),
        "f": np.zeros((1,), np.float16),
        "k": jax.random.split(jax.random.key(0), 2),
    }
    assert describe(tree, dtypes=True, width=200) == (
        "{'a': f32[2], 'b': i8[2,3], 'c': u32[], 'd': c64[1], 'e': bool[0], "
        "'f': f16[1], 'k': key<fry>[2]}"
    )


def test_containers_and_static_leaves() -> None:
    tree = {"layers": [np.zeros((3, 2)), (np.zeros(4), "relu")], "n": 3, "none": None}
    assert describe(tree) == "{'layers': [(3, 2), ((4), 'relu')], 'n': 3, 'none': None}"


def test_dataclass_registered_as_pytree() -> None:
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Linear:
        weight: Any
        bias: Any
        activation: str = dataclasses.field(metadata={"static": True}, default="gelu")

    layer = Linear(np.zeros((4, 2)), np.zeros((2,)))
    assert describe(stack([layer] * 3)) == (
        "Linear(weight=(3, 4, 2), bias=(3, 2), activation='gelu')"
    )


def test_no_trailing_commas_when_broken(llama: Any) -> None:
    text = describe(llama, width=30)
    assert ",\n)" not in text and ",)" not in text
    assert "(4096,)" not in describe(get_layer(llama, 0))


def test_on_tracers_inside_jit() -> None:
    seen = []

    @jax.jit
    def f(tree: Any) -> Any:
        seen.append(describe(tree, dtypes=True))
        return tree

    f({"w": jnp.zeros((5, 3))})
    assert seen == ["{'w': f32[5,3]}"]


def test_a_tree_exactly_as_wide_as_width_stays_on_one_line() -> None:
    tree = {"w": np.zeros((3, 4)), "b": np.zeros(4)}
    flat = "{'w': (3, 4), 'b': (4)}"
    assert describe(tree, width=1000) == flat
    assert describe(tree, width=len(flat)) == flat
    assert describe(tree, width=len(flat) - 1) == "{\n  'w': (3, 4),\n  'b': (4)\n}"


def test_a_child_exactly_as_wide_as_width_stays_on_one_line() -> None:
    # The nested node's line, its indent and the comma after it included, is 26 columns.
    tree = {"attention": {"q": np.zeros(2)}, "n": np.zeros(1)}
    line = "  'attention': {'q': (2)},"
    assert describe(tree, width=len(line)) == "{\n" + line + "\n  'n': (1)\n}"
    assert describe(tree, width=len(line) - 1) == (
        "{\n  'attention': {\n    'q': (2)\n  },\n  'n': (1)\n}"
    )
