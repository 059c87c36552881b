"""Array leaves: what is one, its shape and dtype, and stacking them. Imports no jax.

The `stackedtree` command converts checkpoints with numpy alone and never imports jax
(it would dominate its start-up time), yet it shares these rules with the tree code.
A jax array or `jax.ShapeDtypeStruct` can only exist once jax is imported, so when jax
is not in `sys.modules` every jax case is simply false.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np


def _jax() -> Any:
    """The jax module if it is loaded, else None."""
    return sys.modules.get("jax")


def leaf_kind(x: Any) -> str:
    """`"numpy"`, `"jax"`, `"abstract"` for array leaves, `"static"` otherwise.

    Array leaves are `numpy.ndarray` and numpy scalars, `jax.Array` (tracers included)
    and `jax.ShapeDtypeStruct`. Every other leaf is *static*.
    """
    if isinstance(x, np.ndarray | np.generic):
        return "numpy"
    jax = _jax()
    if jax is not None:
        if isinstance(x, jax.ShapeDtypeStruct):
            return "abstract"
        if isinstance(x, jax.Array):
            return "jax"
    return "static"


def is_array(x: Any) -> bool:
    """Whether `x` is an *array leaf*: stacked, sliced and scanned (see `leaf_kind`)."""
    return leaf_kind(x) != "static"


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape of an array leaf as a tuple of ints."""
    return tuple(int(d) for d in x.shape)


def dtype_of(x: Any) -> Any:
    """The dtype of an array leaf, comparable with `==`.

    A numpy dtype, or a jax extended dtype (a typed PRNG key's `key<fry>`), which numpy
    cannot represent.
    """
    dtype = x.dtype
    jax = _jax()
    if jax is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return dtype
    return np.dtype(dtype)


_SHORT = {"bfloat16": "bf16", "bool": "bool"}
_NUMERIC = re.compile(r"(u?)(int|float|complex)(\d+)(_\w+)?")


def short_dtype(dtype: Any) -> str:
    """The short dtype names jax prints: `f32`, `bf16`, `i8`, `u16`, `c64`, `f8_e4m3fn`.

    Extended dtypes (a typed PRNG key's `key<fry>`) print as jax prints them.
    """
    if isinstance(dtype, str) and (dtype in _SHORT or _NUMERIC.fullmatch(dtype)):
        name = dtype  # a dtype's name, which may need no numpy dtype (`"bfloat16"`)
    elif not isinstance(dtype, np.dtype):
        try:
            name = np.dtype(dtype).name
        except TypeError:
            return str(dtype)
    else:
        name = dtype.name
    if name in _SHORT:
        return _SHORT[name]
    m = _NUMERIC.fullmatch(name)
    if m is None:
        return name
    kind = "u" if m[1] else {"int": "i", "float": "f", "complex": "c"}[m[2]]
    return kind + m[3] + (m[4] or "")


def fmt_shape(shape: Sequence[int]) -> str:
    """A shape as Python prints a tuple: `(8, 2)`, `(9,)`, `()`."""
    return repr(tuple(int(d) for d in shape))


def static_equal(a: Any, b: Any) -> bool:
    """Static leaves agree when `a == b` is a true boolean (or they are the same object)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def static_repr(x: Any) -> str:
    """`repr` of a static leaf, with functions named rather than shown by address."""
    text = repr(x)
    name = getattr(x, "__qualname__", None) or getattr(x, "__name__", None)
    if callable(x) and isinstance(name, str) and " at 0x" in text:
        return f"<{type(x).__name__} {name}>"
    return text


def stack_leaves(leaves: Sequence[Any], where: str) -> Any:
    """Stacks the same array leaf of N layers along a new leading axis.

    Numpy stays numpy (one host copy), any jax leaf makes the result jax, and
    `ShapeDtypeStruct`s give a `ShapeDtypeStruct` of shape `(N, *shape)`. The leaves
    must already agree in shape and dtype.

    Raises:
        TypeError: abstract and concrete leaves are mixed; the message names the
            leaf as `where` says (`` `layers` at ['w'] ``).
    """
    kinds = {leaf_kind(x) for x in leaves}
    if kinds == {"numpy"}:
        # Filling a preallocated buffer layer by layer is one copy of the bytes; np.stack
        # goes through concatenate's more general (and measurably slower) path.
        out = np.empty((len(leaves), *shape_of(leaves[0])), dtype=leaves[0].dtype)
        for i, leaf in enumerate(leaves):
            out[i] = leaf
        return out
    jax = _jax()
    if kinds == {"abstract"}:
        return jax.ShapeDtypeStruct(
            (len(leaves), *shape_of(leaves[0])), leaves[0].dtype
        )
    if "abstract" in kinds:
        raise TypeError(
            f"{where} mixes jax.ShapeDtypeStruct and concrete arrays; stack either "
            "all-abstract or all-concrete layers."
        )
    return on_bits(jax.numpy.stack, leaves)


def on_bits(f: Any, arrays: Sequence[Any], *rest: Any) -> Any:
    """`f(arrays, *rest)` for jax arrays that only moves data, done on their bits.

    XLA on the CPU computes some narrow float types (bfloat16) in float32, which turns
    a signalling NaN into a quiet one even in a copy, so stacking, concatenating or
    updating such arrays would not be bit-exact. Viewed as unsigned integers of the same
    width they move unchanged; `f` must only rearrange elements. Tracers (under `jit`
    or `grad`) take the plain path: a bitcast would cut the gradient.
    """
    jax = _jax()
    jnp = jax.numpy
    dtype = jnp.result_type(*arrays)
    traced = any(isinstance(x, jax.core.Tracer) for x in (*arrays, *rest))
    if traced or not jnp.issubdtype(dtype, jnp.floating):
        # Traced values are being computed on anyway, and a bitcast has no gradient.
        return f(arrays, *rest)
    bits = np.dtype(f"uint{np.dtype(dtype).itemsize * 8}")
    lax = jax.lax
    as_bits = [lax.bitcast_convert_type(jnp.asarray(x, dtype), bits) for x in arrays]
    rest = tuple(
        lax.bitcast_convert_type(jnp.asarray(x, dtype), bits) if is_array(x) else x
        for x in rest
    )
    return lax.bitcast_convert_type(f(as_bits, *rest), dtype)
