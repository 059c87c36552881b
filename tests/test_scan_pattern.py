"""scan_pattern against the written-out loop of DESIGN.md, its split, and its errors."""

from __future__ import annotations

import contextlib
import enum
import functools
import io
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from stackedtree import get_layer, layer_keys, scan_layers, scan_pattern, stack
from stackedtree._scan_pattern import Split, kind_runs, split_pattern, traced_calls

D, E = 4, 2  # model width; experts of the MoE kind


class Attn(NamedTuple):
    """The parameters shared by the local and the global kind (Gemma 3)."""

    w: Any  # (D, D)
    b: Any  # (D,)
    window: int  # static: shared by every layer, handed to the layer unchanged


def noise(key, shape):
    """A small offset that depends on every bit of `key` (and compiles in no time)."""
    data = jax.random.key_data(key) if key.dtype != jnp.uint32 else key
    return jnp.full(shape, 0.1) * jnp.cos(data.astype(jnp.float32) / 2**20).sum()


def local(carry, layer, x=None, *, key=None):
    assert layer.window == 3  # static leaves arrive unchanged
    h = jnp.tanh(carry @ layer.w + layer.b[None, :]) * 0.5 + carry
    if x is not None:
        h = h + jnp.mean(x, axis=0)[None, :]
    if key is not None:
        h = h + noise(key, h.shape)
    return h, jnp.sum(h, axis=-1)


def global_(carry, layer, x=None, *, key=None):
    h = jnp.sin(carry @ layer.w) + carry * layer.b[None, :]
    if x is not None:
        h = h - jnp.sum(x, axis=0)[None, :]
    if key is not None:
        h = h + noise(key, h.shape)
    return h, None  # a kind without outputs


def dense(carry, layer, x=None, *, key=None):
    assert layer["act"] == "tanh"
    h = carry + jnp.tanh(carry @ layer["w"])
    if x is not None:
        h = h + jnp.mean(x, axis=0)[None, :]
    if key is not None:
        h = h + noise(key, h.shape)
    return h, {"norm": jnp.sum(h**2, axis=-1)}


def moe(carry, layer, x=None, *, key=None):
    gate = jax.nn.softmax(carry @ layer["gate"], axis=-1)  # (rows, E)
    h = carry + 0.5 * jnp.tanh(jnp.einsum("re,edf,rd->rf", gate, layer["w"], carry))
    if x is not None:
        h = h * jnp.cos(jnp.sum(x, axis=0))[None, :]
    if key is not None:
        h = h + noise(key, h.shape)
    return h, gate


class Case(NamedTuple):
    fns: dict
    pattern: str
    per_kind: bool  # `layers` holds one stack per kind
    xs_per_kind: bool  # `xs` holds one stack per kind


CASES = {
    # Gemma 3: one shared stack; prefix "GG", period "LLG" x 3, remainder "L".
    "gemma": Case({"L": local, "G": global_}, "GG" + "LLG" * 3 + "L", False, False),
    # Gemma's KV caches differ by kind (window vs full), its parameters do not.
    "gemma_cache": Case(
        {"L": local, "G": global_}, "GG" + "LLG" * 3 + "L", False, True
    ),
    # DeepSeek-V3: 3 dense layers, then MoE layers, each kind its own stack.
    "deepseek": Case({"D": dense, "M": moe}, "DDD" + "M" * 5, True, True),
    # Both kinds in the period, per-kind stacks, one shared xs.
    "mixed": Case({"D": dense, "M": moe}, "DD" + "MDM" * 3 + "D", True, False),
}

INIT = jnp.linspace(-1.0, 1.0, 2 * D).reshape(2, D)


def arrays_of(case: Case, seed: int = 0, width: int = D):
    """The case's parameters (array leaves only, so `jit`/`grad` take them)."""
    counts = Counter(case.pattern)
    n = len(case.pattern)
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32) / np.sqrt(D))

    if not case.per_kind:
        return (normal(n, width, width), normal(n, width))
    return {
        "D": {"w": normal(counts["D"], D, D)},
        "M": {"w": normal(counts["M"], E, D, D), "gate": normal(counts["M"], D, E)},
    }


def case_layers(case: Case, arrays):
    if not case.per_kind:
        return Attn(*arrays, window=3)
    return {"D": {**arrays["D"], "act": "tanh"}, "M": arrays["M"]}


def xs_of(case: Case):
    counts = Counter(case.pattern)

    def ramp(n, rows):
        return jnp.linspace(-0.5, 0.5, n * rows * D).reshape(n, rows, D)

    if not case.xs_per_kind:
        return ramp(len(case.pattern), 2)
    return {kind: ramp(c, 2 + i) for i, (kind, c) in enumerate(sorted(counts.items()))}


def reference_loop(fns, init, layers, pattern, xs=None, key=None):
    """The loop from DESIGN.md's "Heterogeneous stacks", written out."""

    def per_kind(tree):
        return isinstance(tree, dict) and set(tree) == set(fns)

    keys = layer_keys(key, len(pattern)) if key is not None else None
    seen = {kind: 0 for kind in fns}
    outs: dict[Any, list] = {kind: [] for kind in fns}
    carry = init
    for i, kind in enumerate(pattern):
        j = seen[kind]
        seen[kind] += 1
        layer = get_layer(layers[kind], j) if per_kind(layers) else get_layer(layers, i)
        args = []
        if xs is not None:
            args.append(get_layer(xs[kind], j) if per_kind(xs) else get_layer(xs, i))
        kwargs = {"key": keys[i]} if key is not None else {}
        carry, y = fns[kind](carry, layer, *args, **kwargs)
        outs[kind].append(y)
    ys = {k: None if v[0] is None else stack(v) for k, v in outs.items()}
    return carry, ys


def loss_from(run):
    def loss(params, init, xs):
        carry, ys = run(params, init, xs)
        return jnp.sum(carry**2) + sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(ys))

    return loss


@functools.cache
def reference(name: str, key_seed: int | None, with_xs: bool):
    """The loop's output and gradient, computed once per configuration."""
    case = CASES[name]
    key = jax.random.key(key_seed) if key_seed is not None else None

    def loop(params, init, xs):
        return reference_loop(
            case.fns, init, case_layers(case, params), case.pattern, xs=xs, key=key
        )

    args = (arrays_of(case), INIT, xs_of(case) if with_xs else None)
    return loop(*args), jax.grad(loss_from(loop), argnums=(0, 1, 2))(*args)


def _policy(prim, *_, **__):  # a policy callable: save matmul outputs only
    return prim is jax.lax.dot_general_p


@pytest.mark.parametrize(
    ("name", "key_seed", "with_xs", "remat"),
    [
        ("gemma", None, False, False),
        ("gemma", 5, True, True),
        ("gemma", 5, False, "dots_saveable"),
        ("gemma_cache", 5, True, False),
        ("deepseek", None, False, False),
        ("deepseek", 5, True, True),
        ("mixed", None, True, False),
        ("mixed", 5, True, _policy),
    ],
)
def test_equals_loop(name, key_seed, with_xs, remat):
    """Forward and gradient (w.r.t. parameters, carry and xs) equal the loop's."""
    case = CASES[name]
    key = jax.random.key(key_seed) if key_seed is not None else None

    def ours(params, init, xs):
        return scan_pattern(
            case.fns,
            init,
            case_layers(case, params),
            case.pattern,
            xs=xs,
            key=key,
            remat=remat,
        )

    @jax.jit
    def out_and_grads(*args):
        return ours(*args), jax.grad(loss_from(ours), argnums=(0, 1, 2))(*args)

    args = (arrays_of(case), INIT, xs_of(case) if with_xs else None)
    assert_close(out_and_grads(*args), reference(name, key_seed, with_xs))


def saved_residuals(remat: Any, pattern: str) -> list[str]:
    """What the backward pass of `scan_pattern` over `pattern` stores, as jax prints."""
    n = len(pattern)
    w = jnp.ones((n, D, D)) / D

    def layer(c, w):
        return jnp.tanh(c @ w), None

    def loss(w, x):
        fns = {"A": layer, "B": layer}
        return scan_pattern(fns, x, w, pattern, remat=remat)[0].sum()

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(loss, w, INIT)
    return out.getvalue().splitlines()


# A run of one layer applied directly, a period scanned 3 times, a run of two.
@pytest.mark.parametrize("pattern", ["B" + "AAB" * 3 + "AA", "ABABAB"])
def test_remat_saves_what_its_policy_says(pattern):
    everything, nothing = (
        saved_residuals(False, pattern),
        saved_residuals(True, pattern),
    )
    dots = saved_residuals("dots_saveable", pattern)
    # dots_saveable keeps the matmul outputs that True recomputes, and no more.
    assert len(nothing) < len(dots) < len(everything)
    assert saved_residuals(_policy, pattern) == dots
    assert saved_residuals("nothing_saveable", pattern) == nothing


def test_cases_have_prefix_period_and_remainder():
    """The cases above exercise every part of a split (else they test less)."""
    for name in ("gemma", "mixed"):
        pattern = CASES[name].pattern
        split = split_pattern(tuple(pattern))
        assert 0 < split.start and split.repeats >= 2 and split.stop < len(pattern)
    assert split_pattern(tuple(CASES["deepseek"].pattern)) == Split(3, 1, 5)


# ------------------------------------------------------------------ compiled size


def gemma_pattern(n: int) -> str:
    return ("LLLLLG" * n)[: n - n % 6] + "L" * (n % 6)


def count_traces(n: int, *, grad: bool, remat: Any = False) -> Counter:
    counts: Counter = Counter()

    def counted(kind, fn):
        def wrapped(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)

        return wrapped

    fns = {"L": counted("L", local), "G": counted("G", global_)}
    case = CASES["gemma"]._replace(pattern=gemma_pattern(n))
    params = arrays_of(case)

    def run(params, init, xs):
        return scan_pattern(
            fns, init, case_layers(case, params), case.pattern, xs=xs, remat=remat
        )

    f = jax.grad(loss_from(run)) if grad else run
    jax.make_jaxpr(f)(params, INIT, None)
    return counts


@pytest.mark.parametrize(
    ("grad", "remat"), [(False, False), (True, False), (True, True)]
)
def test_traces_do_not_grow_with_depth(grad, remat):
    assert gemma_pattern(26) == "LLLLLG" * 4 + "LL"
    assert gemma_pattern(62) == "LLLLLG" * 10 + "LL"
    shallow = count_traces(26, grad=grad, remat=remat)
    deep = count_traces(62, grad=grad, remat=remat)
    assert shallow == deep
    # Five local layers in the period's body, then the remainder "LL" applied directly.
    if not grad:
        assert shallow == {"L": 7, "G": 1}


def test_period_is_one_scan_over_repeats():
    case = CASES["gemma"]._replace(pattern=gemma_pattern(62))
    params = case_layers(case, arrays_of(case))
    jaxpr = jax.make_jaxpr(lambda i: scan_pattern(case.fns, i, params, case.pattern))(
        INIT
    )
    lengths = sorted(
        e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"
    )
    assert lengths == [10]  # the remainder "LL" is too short to scan


# ------------------------------------------------------------------ the split


def brute_force_cost(kinds: tuple) -> int:
    """The fewest traced calls over every valid split, found by trying them all."""
    n = len(kinds)
    best = traced_calls(kinds, Split(0, 0, 0))
    for a in range(n):
        for p in range(1, n - a + 1):
            for k in range(2, (n - a) // p + 1):
                if kinds[a : a + k * p] == kinds[a : a + p] * k:
                    best = min(best, traced_calls(kinds, Split(a, p, k)))
    return best


patterns = st.integers(1, 3).flatmap(
    lambda m: st.lists(st.sampled_from("abc"[:m]), min_size=1, max_size=40)
)


@settings(max_examples=300, deadline=None)
@given(patterns)
def test_split_is_valid_and_cheapest(pattern):
    kinds = tuple(pattern)
    split = split_pattern(kinds)
    a, p, k = split
    n = len(kinds)
    if p == 0:
        assert split == Split(0, 0, 0)
    else:
        assert k >= 2 and 0 <= a and split.stop <= n
        assert kinds[a : split.stop] == kinds[a : a + p] * k
    # The runs outside the period and the period cover the pattern in order.
    covered = [kinds[s:e] for _, s, e in kind_runs(kinds, 0, a)]
    covered.append(kinds[a : split.stop])
    covered += [kinds[s:e] for _, s, e in kind_runs(kinds, split.stop, n)]
    assert sum(covered, ()) == kinds
    for kind, s, e in kind_runs(kinds, 0, n):
        assert set(kinds[s:e]) == {kind}
    assert traced_calls(kinds, split) == brute_force_cost(kinds)


def test_split_of_known_models():
    assert split_pattern(tuple("LLLLLG" * 10 + "LL")) == Split(0, 6, 10)
    assert split_pattern(tuple("D" * 3 + "M" * 58)) == Split(3, 1, 58)
    assert split_pattern(tuple("LLLF" * 12)) == Split(0, 4, 12)
    assert split_pattern(tuple("A" * 8)) == Split(0, 1, 8)
    assert split_pattern(("A",)) == Split(0, 0, 0)


def toy_fns(kinds: str):
    """One cheap function per kind, different enough to tell kinds apart."""

    def make(c: int):
        def fn(carry, layer, x=None, *, key=None):
            h = jnp.tanh(carry * layer["w"] + c) + x
            if key is not None:
                h = h + noise(key, h.shape)
            return h, h[0] * c

        return fn

    return {kind: make(i + 1) for i, kind in enumerate(kinds)}


@settings(max_examples=8, deadline=None)
@given(patterns, st.booleans())
def test_any_pattern_equals_loop(pattern, with_key):
    fns = toy_fns(sorted(set(pattern)))
    n = len(pattern)
    layers = {"w": jnp.linspace(0.5, 1.5, n * 3).reshape(n, 3)}
    xs = jnp.linspace(-0.1, 0.1, n * 3).reshape(n, 3)
    key = jax.random.key(1) if with_key else None
    init = jnp.ones(3)
    got = jax.jit(
        lambda layers, init: scan_pattern(fns, init, layers, pattern, xs=xs, key=key)
    )(layers, init)
    assert_close(got, reference_loop(fns, init, layers, pattern, xs=xs, key=key))


# ------------------------------------------------------------------ behaviours


def test_keys_do_not_change_when_written_as_a_pattern():
    """Layer i gets fold_in(key, i) with i counting all layers, as in scan_layers."""
    case = CASES["gemma"]
    layers = case_layers(case, arrays_of(case))
    key = jax.random.key(9)

    def record(carry, layer, *, key):
        return carry, jax.random.key_data(key)

    _, ys = scan_pattern(
        {"L": record, "G": record}, INIT, layers, case.pattern, key=key
    )
    _, all_keys = scan_layers(record, INIT, layers, key=key)
    kinds = np.array(list(case.pattern))
    np.testing.assert_array_equal(ys["L"], all_keys[kinds == "L"])
    np.testing.assert_array_equal(ys["G"], all_keys[kinds == "G"])
    raw = jax.random.PRNGKey(9)
    _, ys_raw = scan_pattern(
        {"L": lambda c, p, *, key: (c, key), "G": lambda c, p, *, key: (c, key)},
        INIT,
        layers,
        case.pattern,
        key=raw,
    )
    np.testing.assert_array_equal(ys_raw["G"][2], jax.random.fold_in(raw, 4))


def test_one_kind_equals_scan_layers():
    case = CASES["gemma"]
    layers = case_layers(case, arrays_of(case))
    xs = xs_of(case)
    key = jax.random.key(2)
    carry, ys = scan_pattern({"L": local}, INIT, layers, "L" * 12, xs=xs, key=key)
    want = scan_layers(local, INIT, layers, xs=xs, key=key)
    assert_close((carry, ys["L"]), want)


@pytest.mark.parametrize(
    "pattern",
    [
        ["sliding"] * 5 + ["global"] + ["sliding"] * 5 + ["global"],
        [0, 0, 0, 0, 0, 1] * 2,
        np.array([0, 0, 0, 0, 0, 1] * 2),
    ],
)
def test_labels_longer_than_one_character(pattern):
    labels = list(pattern)
    a, b = sorted(set(labels), key=labels.index)
    case = CASES["gemma"]._replace(pattern="LLLLLG" * 2)
    layers = case_layers(case, arrays_of(case))
    fns = {a: local, b: global_}
    got = scan_pattern(fns, INIT, layers, pattern)
    assert_close(got, reference_loop(fns, INIT, layers, pattern))
    assert got[1][a].shape == (10, 2)


def test_numpy_params_static_outputs_and_eval_shape():
    case = CASES["deepseek"]
    params = case_layers(case, jax.tree.map(np.asarray, arrays_of(case)))
    assert isinstance(params["M"]["w"], np.ndarray)

    def tagged(fn):
        def wrapped(carry, layer):
            carry, y = fn(carry, layer)
            return carry, {"y": y, "tag": "moe"}

        return wrapped

    fns = {"D": dense, "M": tagged(moe)}
    carry, ys = scan_pattern(fns, INIT, params, case.pattern)
    assert ys["M"]["tag"] == "moe" and ys["M"]["y"].shape == (5, 2, E)
    assert_close((carry, ys), reference_loop(fns, INIT, params, case.pattern))
    shapes = jax.eval_shape(
        lambda p: scan_pattern(case.fns, INIT, case_layers(case, p), case.pattern),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), arrays_of(case)),
    )
    assert shapes[1]["D"]["norm"].shape == (3, 2)


def test_vmap_over_a_batch_of_carries():
    case = CASES["mixed"]
    layers = case_layers(case, arrays_of(case))
    inits = jnp.stack([INIT, -INIT])
    got = jax.vmap(lambda i: scan_pattern(case.fns, i, layers, case.pattern))(inits)
    for b in range(2):
        assert_close(
            jax.tree.map(lambda x, b=b: x[b], got),
            reference_loop(case.fns, inits[b], layers, case.pattern),
        )


# ------------------------------------------------------------------ errors


def gemma_args():
    case = CASES["gemma"]
    return case.fns, case_layers(case, arrays_of(case)), case.pattern


def deepseek_args():
    case = CASES["deepseek"]
    return case.fns, case_layers(case, arrays_of(case)), case.pattern


def test_pattern_length_differs_from_the_stack():
    fns, layers, pattern = gemma_args()
    with pytest.raises(
        ValueError, match=r"^`layers` has 12 layers, but `pattern` has 13 layers\.$"
    ):
        scan_pattern(fns, INIT, layers, pattern + "L")


def test_kind_without_function_and_function_never_used():
    fns, layers, _ = gemma_args()
    with pytest.raises(
        ValueError,
        match=r"`pattern` has kind 'X' at layers 3, 6 but `fns` has no function for it",
    ):
        scan_pattern(fns, INIT, layers, "GGLXGLXGLLGL")
    with pytest.raises(
        ValueError,
        match=r"^`fns` and `pattern` disagree:\n  `pattern` has kind 'X'.*\n"
        r"  `fns\['G'\]` is never used",
    ):
        scan_pattern(fns, INIT, layers, "X" + "L" * 11)
    with pytest.raises(
        ValueError, match=r"^`fns\['G'\]` is never used: `pattern` has no 'G' layer\.$"
    ):
        scan_pattern(fns, INIT, layers, "L" * 12)


def test_str_pattern_with_long_labels_gets_a_hint():
    _, layers, _ = gemma_args()
    fns = {"local": local, "global": global_}
    with pytest.raises(ValueError, match="pass a list for longer labels"):
        scan_pattern(fns, INIT, layers, "local" * 2 + "gl")


def test_per_kind_stack_of_the_wrong_length():
    fns, layers, pattern = deepseek_args()
    with pytest.raises(
        ValueError,
        match=r"^`layers\['M'\]` has 5 layers, but `pattern` has 6 'M' layers\.$",
    ):
        scan_pattern(fns, INIT, layers, pattern + "M")
    # Both kinds wrong: every problem is listed, once.
    with pytest.raises(
        ValueError,
        match=r"^`layers` does not match `pattern`:\n"
        r"  `layers\['D'\]` has 3 layers, but `pattern` has 2 'D' layers\n"
        r"  `layers\['M'\]` has 5 layers, but `pattern` has 6 'M' layers$",
    ):
        scan_pattern(fns, INIT, layers, "DD" + "M" * 6)


def test_per_kind_stack_whose_leaves_disagree_names_the_path():
    fns, layers, pattern = deepseek_args()
    layers["M"]["gate"] = layers["M"]["gate"][:4]
    with pytest.raises(
        ValueError,
        match=r"^`layers\['M'\]` at \['w'\] has leading length 5, "
        r"but \['gate'\] has 4\.$",
    ):
        scan_pattern(fns, INIT, layers, pattern)


def test_mapping_with_other_keys_is_one_stack_and_says_so():
    fns, layers, pattern = deepseek_args()
    with pytest.raises(
        ValueError,
        match=r"read as one stack per kind only when its keys are exactly the kinds "
        r"of `fns`: 'D', 'M'",
    ):
        scan_pattern(fns, INIT, {"D": layers["D"], "moe": layers["M"]}, pattern)


def test_xs_of_the_wrong_length():
    fns, layers, pattern = gemma_args()
    xs = jnp.zeros((11, 2, D))
    with pytest.raises(
        ValueError, match=r"^`xs` has 11 layers, but `pattern` has 12 layers\.$"
    ):
        scan_pattern(fns, INIT, layers, pattern, xs=xs)
    per_kind = {"L": jnp.zeros((7, 2, D)), "G": jnp.zeros((4, 3, D))}
    with pytest.raises(
        ValueError,
        match=r"^`xs\['G'\]` has 4 layers, but `pattern` has 5 'G' layers\.$",
    ):
        scan_pattern(fns, INIT, layers, pattern, xs=per_kind)


@pytest.mark.parametrize(
    ("fns", "pattern", "error", "match"),
    [
        ([local], "L", TypeError, r"`fns` must be a mapping"),
        (
            {"L": 3},
            "L",
            TypeError,
            r"every value of `fns` must be a layer function: `fns\['L'\]` is a int",
        ),
        ({"L": local}, 12, TypeError, r"`pattern` must be a str .* got int"),
        ({"L": local}, jnp.zeros(12), TypeError, r"`pattern` must be a str"),
        ({"L": local}, {"L": 1}, TypeError, r"`pattern` must be a str"),
        ({"L": local}, "", ValueError, r"`pattern` is empty"),
        (
            {"L": local},
            [["L"]],
            TypeError,
            r"hashable kind labels, got a list at layer 0",
        ),
        ({"L": local, 0: global_}, ["L", 0], TypeError, r"must be sortable"),
    ],
)
def test_bad_fns_and_pattern(fns, pattern, error, match):
    _, layers, _ = gemma_args()
    with pytest.raises(error, match=match):
        scan_pattern(fns, INIT, layers, pattern)


def test_unsortable_enum_kinds_are_refused():
    class Kind(enum.Enum):
        LOCAL = 1
        GLOBAL = 2

    _, layers, _ = gemma_args()
    with pytest.raises(TypeError, match="must be sortable"):
        scan_pattern(
            {Kind.LOCAL: local, Kind.GLOBAL: global_},
            INIT,
            layers,
            [Kind.LOCAL] * 11 + [Kind.GLOBAL],
        )


def test_bad_key_and_remat():
    fns, layers, pattern = gemma_args()
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
        scan_pattern(fns, INIT, layers, pattern, key=3)
    with pytest.raises(
        ValueError, match="`remat` 'dots' is not a known checkpoint policy"
    ):
        scan_pattern(fns, INIT, layers, pattern, remat="dots")


def test_layer_function_errors_name_the_kind():
    fns, layers, pattern = gemma_args()
    with pytest.raises(
        TypeError, match=r"`fns\['G'\]` must return a pair `\(carry, y\)`"
    ):
        scan_pattern({**fns, "G": lambda c, p: c}, INIT, layers, pattern)
    with pytest.raises(
        TypeError, match=r"`fns\['G'\]` must return a carry with the shapes"
    ):
        scan_pattern({**fns, "G": lambda c, p: (c[:1], None)}, INIT, layers, pattern)


def test_outputs_that_cannot_be_stacked():
    fns, layers, pattern = gemma_args()
    calls = Counter()

    def moody(carry, layer):  # returns a different static output at each trace
        calls["L"] += 1
        return carry, {"call": calls["L"], "h": carry}

    with pytest.raises(
        TypeError,
        match=r"`fns\['L'\]` must return a `y` of the same structure, shapes and "
        r"dtypes at every layer .*: layer 3's `y` differs from layer 2's at "
        r"\['call'\]: static leaf 2 != 1",
    ):
        scan_pattern({**fns, "L": moody}, INIT, layers, pattern)


# ------------------------------------------------------------------ the example


def test_gemma_example_equals_its_loop():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import gemma_pattern as ex

    assert ex.gemma_pattern(26) == "LLLLLG" * 4 + "LL"
    cfg = ex.Config(vocab=16, d_model=8, heads=2, head_dim=4, d_ff=16, num_layers=8)
    params = ex.init_model(jax.random.key(0), cfg)
    tokens = ex.make_batch(jax.random.key(1), cfg, batch=2, seq=6)
    scan = jax.jit(lambda p, t: ex.forward(p, t, cfg))(params, tokens)
    loop = ex.forward(params, tokens, cfg, loop=True)  # eagerly: compiles faster
    np.testing.assert_allclose(scan, loop, rtol=1e-4, atol=1e-4)


def test_an_eager_call_finds_a_later_layers_mistake_before_computing() -> None:
    # Runs of one or two layers are applied layer by layer; called outside `jit`,
    # a mistake of layer 3 must still be found before layer 2 computes anything.
    computed = []

    def add(c, p):
        return c + p["w"], None

    def mul(c, p):
        computed.append(not isinstance(c, jax.core.Tracer))
        return c * p["w"], jnp.ones(1 if len(computed) % 2 else 2)

    with pytest.raises(TypeError, match=r"`fns\['b'\]` must return a `y` of the same"):
        scan_pattern({"a": add, "b": mul}, jnp.array(1.0), {"w": jnp.ones(4)}, "aabb")
    assert computed and not any(computed)


# ------------------------------------------------------------------ update_xs


def cached(fn):
    """A layer of `fn` that rewrites its cache entry `x` (a `y` matching `x`)."""

    def layer(carry, params, x, *, key=None):
        h, _ = fn(carry, params, x, key=key)
        return h, x * 0.75 + jnp.tanh(h).sum(axis=0)[None, :]

    return layer


CACHED = {"L": cached(local), "G": cached(global_)}


def assert_equal_bits(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


# The width of the layers whose two forms are compared bit for bit. Below about 16,
# XLA's CPU backend may compile the tiny loop of the xs/ys form as a "small call",
# whose fused arithmetic rounds differently (by an ulp) from the same fusions
# compiled as usual; from 16 on, both forms compile alike and agree bit for bit.
WIDE = 16


def cache_run(pattern, xs, update_xs, key=None, remat=False):
    width = jax.tree.leaves(xs)[0].shape[-1]
    arrays = arrays_of(Case(CACHED, pattern, False, False), width=width)
    layers = Attn(*arrays, window=3)
    init = jnp.linspace(-1.0, 1.0, 2 * width).reshape(2, width)
    return jax.jit(
        lambda init, xs: scan_pattern(
            CACHED,
            init,
            layers,
            pattern,
            xs=xs,
            key=key,
            remat=remat,
            update_xs=update_xs,
        )
    )(init, xs)


# A period with a remainder of two layers applied directly; runs of one kind scanned.
CACHE_PATTERNS = ["LLLLLG" * 2 + "LL", "G" + "L" * 4 + "GG" + "L" * 3]


@pytest.mark.parametrize("pattern", CACHE_PATTERNS)
@pytest.mark.parametrize(("key_seed", "remat"), [(None, False), (4, True)])
def test_update_xs_per_kind_caches_equal_the_ys(pattern, key_seed, remat):
    # Gemma 3: the local layers hold a window of 3 rows, the global ones 5.
    counts = Counter(pattern)
    xs = {
        "L": jnp.linspace(-0.5, 0.5, counts["L"] * 3 * WIDE).reshape(-1, 3, WIDE),
        "G": jnp.linspace(0.5, -0.5, counts["G"] * 5 * WIDE).reshape(-1, 5, WIDE),
    }
    key = None if key_seed is None else jax.random.key(key_seed)
    carry, caches = cache_run(pattern, xs, True, key, remat)
    assert set(caches) == {"L", "G"}
    assert_equal_bits((carry, caches), cache_run(pattern, xs, False, key, remat))


@pytest.mark.parametrize("pattern", CACHE_PATTERNS)
def test_update_xs_one_shared_stack_of_caches(pattern):
    xs = jnp.linspace(-0.5, 0.5, len(pattern) * 3 * WIDE).reshape(-1, 3, WIDE)
    carry, cache = cache_run(pattern, xs, True)
    want_carry, ys = cache_run(pattern, xs, False)
    # Layer i's entry is its kind's output at its ordinal among that kind's layers.
    seen = Counter()
    want = []
    for kind in pattern:
        want.append(ys[kind][seen[kind]])
        seen[kind] += 1
    assert_equal_bits((carry, cache), (want_carry, jnp.stack(want)))


def test_update_xs_under_grad_equals_the_ys():
    pattern = CACHE_PATTERNS[0]
    xs = jnp.linspace(-0.5, 0.5, len(pattern) * 3 * D).reshape(-1, 3, D)
    arrays = arrays_of(Case(CACHED, pattern, False, False))

    def loss(update_xs):
        def f(arrays, xs):
            layers = Attn(*arrays, window=3)
            carry, out = scan_pattern(
                CACHED, INIT, layers, pattern, xs=xs, update_xs=update_xs
            )
            return jnp.sum(carry**2) + sum(
                jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out)
            )

        return jax.jit(jax.grad(f, argnums=(0, 1)))(arrays, xs)

    assert_close(loss(True), loss(False))


@pytest.mark.parametrize(
    ("pattern", "temp", "bound"),
    # One stack shared by the kinds; one per kind without a repeated period (where
    # one global entry alone is 0.21 of the caches: the step holds about that one);
    # one per kind with a period of both kinds repeated 8 times (each kind's entries
    # of one period are read before they are written back, so XLA copies no stack
    # whole).
    [
        (CACHE_PATTERNS[0], None, 0.2),
        (CACHE_PATTERNS[1], (256, 1024), 0.25),
        ("LLG" * 8 + "L", (256, 1024), 0.2),
    ],
)
def test_update_xs_pattern_with_donation_aliases_the_caches(pattern, temp, bound):
    layers = Attn(*arrays_of(Case(CACHED, pattern, False, False)), window=3)
    counts = Counter(pattern)
    if temp is None:
        xs = jnp.zeros((len(pattern), 256, D))
    else:
        xs = {k: jnp.zeros((counts[k], t, D)) for k, t in zip("LG", temp, strict=True)}
    size = sum(x.nbytes for x in jax.tree.leaves(xs))

    def step(xs, init):
        return scan_pattern(CACHED, init, layers, pattern, xs=xs, update_xs=True)

    memory = jax.jit(step, donate_argnums=0).lower(xs, INIT).compile().memory_analysis()
    assert memory.alias_size_in_bytes == size
    assert memory.temp_size_in_bytes <= bound * size


def test_update_xs_per_kind_period_is_in_place_at_any_depth():
    # Gemma 3's caches, one stack per kind, with a period repeated 4 and 8 times: the
    # caches come back bit for bit as the ys, and the program does not grow.
    def compiled(repeats):
        pattern = "LLG" * repeats + "L"
        counts = Counter(pattern)
        xs = {
            "L": jnp.linspace(-0.5, 0.5, counts["L"] * 64 * D).reshape(-1, 64, D),
            "G": jnp.linspace(0.5, -0.5, counts["G"] * 256 * D).reshape(-1, 256, D),
        }
        assert_equal_bits(cache_run(pattern, xs, True), cache_run(pattern, xs, False))
        layers = Attn(*arrays_of(Case(CACHED, pattern, False, False)), window=3)

        def step(xs, init):
            return scan_pattern(CACHED, init, layers, pattern, xs=xs, update_xs=True)

        lowered = jax.jit(step, donate_argnums=0).lower(xs, INIT)
        return lowered.compile(), sum(x.nbytes for x in jax.tree.leaves(xs))

    (small, _), (deep, size) = compiled(4), compiled(8)
    memory = deep.memory_analysis()
    assert memory.alias_size_in_bytes == size
    assert memory.temp_size_in_bytes <= 0.2 * size
    assert len(deep.as_text()) <= 1.1 * len(small.as_text())


def test_update_xs_errors_name_the_kind():
    fns, layers, pattern = gemma_args()
    with pytest.raises(ValueError, match=r"`update_xs=True` needs `xs`"):
        scan_pattern(fns, INIT, layers, pattern, update_xs=True)
    counts = Counter(pattern)
    xs = {"L": jnp.zeros((counts["L"], 3, D)), "G": jnp.zeros((counts["G"], 5, D))}
    bad = {"L": CACHED["L"], "G": lambda c, p, x: (c, x[:2])}
    with pytest.raises(
        TypeError,
        match=r"`fns\['G'\]` must return a `y` with the structure, shapes and dtypes "
        r"of its `x`(.|\n)*shape \(2, 4\) != \(5, 4\)",
    ):
        scan_pattern(bad, INIT, layers, pattern, xs=xs, update_xs=True)
