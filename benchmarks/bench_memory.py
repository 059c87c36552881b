"""Backward-pass temporary memory against depth, with and without remat.

The model is activation-heavy: a large carry and small layers (`x + tanh(x @ w1) @ w2`),
so what the backward pass stores per layer dominates. For each N it compiles the jitted
gradient and reads XLA's `memory_analysis().temp_size_in_bytes` for

- `no_remat`: `scan_layers` storing every layer's activations;
- `per_layer`: `scan_layers(..., remat=True)`, N carries stored;
- `sqrt_group`: `scan_layers(..., remat_group="sqrt")`, about N/g + g carries (each layer
  inside a group is checkpointed too);
- `flax_remat_scan`: Flax linen `nn.remat_scan(Block, lengths=(N // g, g))`, the same
  two-level scheme (groups rematerialised; layers inside a group are not), with the same g.

N runs over perfect squares so that g = sqrt(N) divides N for `nn.remat_scan`. All four
must give the same loss and gradient; step times of the gradient at one N are measured
with the variants alternating.

Run `python benchmarks/bench_memory.py [--quick] [--json PATH] [--device-label LABEL]`;
it prints `report(results)`, the markdown section `run_all.py` publishes.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import _env  # noqa: F401  (before jax: examples/ on the path, --quick flags)
import jax
import jax.numpy as jnp
import numpy as np
from _hlo import temp_bytes
from _models import (
    Dense2,
    heavy_layer,
    heavy_model,
    heavy_scan_loss,
    heavy_setup,
    heavy_text,
)
from _plots import FIGSIZE, Plot, plot_where, pyplot
from _report import dig, finish, fmt, log, mb, ms, parser, start, table
from _timing import compile_seconds, interleaved_steps, summary

from stackedtree._scan import sqrt_group_size

warnings.filterwarnings("ignore", category=DeprecationWarning)

LossFn = Callable[[Any, jax.Array], jax.Array]


def flax_remat_scan(n: int, stacked: Dense2) -> tuple[Callable[[], LossFn], Any]:
    """`(make_loss, params)` for `nn.remat_scan` over the heavy layer, same weights."""
    import flax.linen as nn

    g = sqrt_group_size(n)
    if n % g:
        raise ValueError(f"nn.remat_scan needs g={g} to divide N={n}")
    lengths = (n // g, g)
    width = stacked.w1.shape[-1]

    def build() -> Any:
        class Block(nn.Module):
            @nn.compact
            def __call__(self, x: jax.Array) -> jax.Array:
                w1 = self.param(
                    "w1", nn.initializers.zeros, (width, width), jnp.float32
                )
                w2 = self.param(
                    "w2", nn.initializers.zeros, (width, width), jnp.float32
                )
                return heavy_layer(x, Dense2(w1, w2))

        class Model(nn.Module):
            @nn.compact
            def __call__(self, x: jax.Array) -> jax.Array:
                return nn.remat_scan(Block, lengths=lengths)(name="stack")(x)

        return Model()

    x0 = jnp.zeros((1, width), jnp.float32)
    template = jax.eval_shape(build().init, jax.random.key(0), x0)["params"]["stack"]
    params = {"params": {"stack": {}}}
    for name in ("w1", "w2"):
        leaf = getattr(stacked, name)
        shape = tuple(template[name].shape)
        if (
            int(np.prod(shape[: len(lengths)])) != n
            or shape[len(lengths) :] != leaf.shape[1:]
        ):
            raise ValueError(f"unexpected nn.remat_scan param shape {shape} for {name}")
        # Layer i of the flat stack is (i // g, i % g) in remat_scan's nested layout.
        params["params"]["stack"][name] = leaf.reshape(shape)

    def make() -> LossFn:
        model = build()

        def loss(params: Any, x: jax.Array) -> jax.Array:
            return jnp.mean(jnp.square(model.apply(params, x)))

        return loss

    return make, params


def variants(n: int, stacked: Dense2) -> dict[str, tuple[Callable[[], LossFn], Any]]:
    return {
        "no_remat": ((lambda: heavy_scan_loss()), stacked),
        "per_layer": ((lambda: heavy_scan_loss(remat=True)), stacked),
        "sqrt_group": ((lambda: heavy_scan_loss(remat_group="sqrt")), stacked),
        "flax_remat_scan": flax_remat_scan(n, stacked),
    }


def _flat_grad(g: Any, n: int) -> list[np.ndarray]:
    """Gradient leaves in the flat `(N, ...)` layout, whatever the framework's layout."""
    # Leaves come in the order w1, w2 for both `Dense2` and Flax's {"w1", "w2"} dict.
    return [np.asarray(a).reshape((n, *a.shape[-2:])) for a in jax.tree.leaves(g)]


# --------------------------------------------------------------------------------------
# Report and plot

LABELS = {
    "no_remat": "no remat",
    "per_layer": "remat=True",
    "sqrt_group": 'remat_group="sqrt"',
    "flax_remat_scan": "nn.remat_scan",
}


def headline(results: dict[str, Any]) -> list[tuple[str, float | None]]:
    """This script's row of the headline table: `(measure, value)`."""
    h = results.get("headline") or {}
    return [
        (
            f"nn.remat_scan / remat=True, backward memory, N={h.get('n')}",
            h.get("flax_remat_scan_over_per_layer_memory"),
        )
    ]


def report(results: dict[str, Any]) -> str:
    """The markdown section for these results (headings `###` and `####`)."""
    temp = results.get("temp_bytes") or {}
    checks = results.get("same_loss_and_grad") or {}
    ns = results.get("ns", [])
    rows = [
        [n, dig(results, "group_size", str(n))]
        + [mb(dig(temp, k, str(n))) for k in LABELS]
        for n in ns
    ]
    differ = [
        f"{LABELS.get(k, k)} at N={n}"
        for n in ns
        for k, same in (checks.get(str(n)) or {}).items()
        if not same
    ]
    errors = results.get("errors") or {}
    checked = (
        "All four gave the same loss and gradient at every N."
        if not differ and not errors
        else "Failed or differed: "
        + "; ".join(differ + [f"{k}: {v}" for k, v in errors.items()])
        + "."
    )
    step = results.get("step") or {}
    steps = ", ".join(
        f"{label} {fmt(ms(dig(step, k, 'median_s')))} ms"
        for k, label in LABELS.items()
        if k in step
    )
    repeats = dig(step, "per_layer", "repeats")
    return "\n".join(
        [
            "### Backward memory against depth",
            "",
            heavy_text(results.get("model") or {})
            + " XLA's temporary memory of the compiled `jax.value_and_grad` "
            "(`temp_size_in_bytes`) for `scan_layers` with no remat, `remat=True` "
            '(`remat` below) and `remat_group="sqrt"` (`sqrt`), and for Flax '
            "`nn.remat_scan(Block, lengths=(N // g, g))` (`remat_scan`) with the same "
            f"group size g. {checked}",
            "",
            table(
                ["N", "g", "none (MB)", "remat (MB)", "sqrt (MB)", "remat_scan (MB)"],
                rows,
            ),
            "",
            f"Gradient step at N={step.get('n')}, median of {repeats} alternating: "
            f"{steps}.",
        ]
    )


def plots(results: dict[str, Any]) -> list[Plot]:
    """Backward temporary memory against N for every variant."""
    plt = pyplot()
    temp = results.get("temp_bytes") or {}
    if plt is None or not temp:
        return []
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for k, by_n in temp.items():
        pts = sorted((int(n), mb(b)) for n, b in by_n.items() if b is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=LABELS.get(k, k))
    model = results.get("model") or {}
    layer = (model.get("layer") or "").split(",")[0]
    fig.suptitle(plot_where(results.get("machine") or {}))
    ax.set_title(f"backward temporary memory, layer {layer}")
    ax.set_xlabel("layers N")
    ax.set_xticks(results.get("ns", []))
    ax.set_ylabel("XLA temp_size_in_bytes (MB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return [
        Plot(
            "memory",
            "Backward temporary memory against the number of layers, with and "
            "without remat",
            fig,
        )
    ]


def compile_all(
    n: int,
    stacked: Any,
    x: jax.Array,
    temp: dict[str, dict[str, int | None]],
    errors: dict[str, str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compiles every variant's `value_and_grad` at N = n, recording its temporary
    bytes in `temp` (None and a line in `errors` when it fails): `(compiled, params)`."""
    compiled, params_of = {}, {}
    for name in temp:
        try:
            make, params = variants(n, stacked)[name]
            r = compile_seconds(lambda make=make: jax.value_and_grad(make()), params, x)
            temp[name][str(n)] = temp_bytes(r["compiled"])
            compiled[name], params_of[name] = r["compiled"], params
        except Exception as e:
            errors[f"{name}@{n}"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            temp[name][str(n)] = None
            log(f"  N={n} {name}: FAILED {errors[f'{name}@{n}']}")
    return compiled, params_of


def same_as_plain(
    compiled: dict[str, Any],
    params_of: dict[str, Any],
    stacked: Any,
    x: jax.Array,
    n: int,
) -> dict[str, bool]:
    """Whether each variant gives the plain scan's loss and gradient."""
    ref_loss, ref_grad = compiled["no_remat"](stacked, x)
    ref = _flat_grad(ref_grad, n)
    same = {}
    for name, c in compiled.items():
        loss, grad = c(params_of[name], x)
        same[name] = bool(np.allclose(loss, ref_loss, rtol=1e-5)) and all(
            np.allclose(a, b, rtol=1e-4, atol=1e-6)
            for a, b in zip(_flat_grad(grad, n), ref, strict=True)
        )
    return same


def main(argv: list[str] | None = None) -> int:
    args, machine, t_start = start(parser(__doc__), argv)
    q = args.quick
    ns = [4, 9] if q else [16, 36, 64, 100]
    step_n = ns[-1] if q else 64
    names = ["no_remat", "per_layer", "sqrt_group", "flax_remat_scan"]
    temp: dict[str, dict[str, int | None]] = {k: {} for k in names}
    errors: dict[str, str] = {}
    checks: dict[str, dict[str, bool]] = {}
    steps: dict[str, Any] = {}
    for n in ns:
        stacked, x = heavy_setup(n, q)
        compiled, params_of = compile_all(n, stacked, x, temp, errors)
        # Same loss and gradient as the plain scan, before anything is timed.
        checks[str(n)] = same_as_plain(compiled, params_of, stacked, x, n)
        log(
            f"  N={n:3d} g={sqrt_group_size(n):2d}  backward temp MB: "
            + "  ".join(f"{k} {fmt(mb(temp[k][str(n)]))}" for k in names)
            + "  | same loss+grad: "
            + " ".join(f"{k}={v}" for k, v in checks[str(n)].items())
        )
        if n == step_n:
            timed = {k: c for k, c in compiled.items() if checks[str(n)][k]}
            times = interleaved_steps(
                {
                    k: (lambda c=c, p=params_of[k], x=x: c(p, x))
                    for k, c in timed.items()
                },
                repeats=3 if q else 7,
                warmup=1,
            )
            steps = {"n": n, **{k: summary(v) for k, v in times.items()}}
            log(
                f"  N={n} step (median): "
                + "  ".join(f"{k} {np.median(v):.3f}s" for k, v in times.items())
            )

    ok = not errors and all(all(v.values()) for v in checks.values())
    last = str(step_n)
    per_layer = temp["per_layer"].get(last)

    def ratio(name: str) -> float | None:
        b = temp[name].get(last)
        return None if b is None or not per_layer else b / per_layer

    def step_ratio(name: str) -> float | None:
        if name not in steps or "per_layer" not in steps:
            return None
        return steps[name]["median_s"] / steps["per_layer"]["median_s"]

    payload = {
        "benchmark": "bench_memory",
        "quick": q,
        "machine": machine,
        "model": heavy_model(q)
        | {"measured": "jax.value_and_grad of mean(out ** 2) w.r.t. the parameters"},
        "ns": ns,
        "group_size": {str(n): sqrt_group_size(n) for n in ns},
        "temp_bytes": temp,
        "same_loss_and_grad": checks,
        "errors": errors,
        "step": steps,
        "headline": {
            "n": step_n,
            "sqrt_over_per_layer_memory": ratio("sqrt_group"),
            "flax_remat_scan_over_per_layer_memory": ratio("flax_remat_scan"),
            "sqrt_over_per_layer_step": step_ratio("sqrt_group"),
            "flax_remat_scan_over_per_layer_step": step_ratio("flax_remat_scan"),
            "all_match": ok,
        },
        "wall_s": time.perf_counter() - t_start,
    }
    finish(args, payload, report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
