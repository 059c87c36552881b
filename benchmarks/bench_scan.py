"""scan_layers against a Python loop and a hand-written jax.lax.scan.

Three measurements on the Llama-style decoder of `examples/llama_model.py` and on a small
activation-heavy model:

(a) compile time (trace + lower + XLA compile) of `jax.grad` of a loss through N layers,
    for a Python loop over layers, `stackedtree.scan_layers` and the scan tutorial's
    `jax.lax.scan(inner, x, params)`, at several N: the loop grows with N, a scan does not;
(b) scan_layers against the hand-written lax.scan: compile time and steady step time of
    the jitted gradient, the two measured alternately in one process, as ratios;
(c) backward-pass temporary memory (XLA's `memory_analysis().temp_size_in_bytes`) and
    step time with no remat, per-layer remat (`remat=True`) and grouped remat
    (`remat_group="sqrt"`) on a model whose activations dwarf its parameters.

Run `python benchmarks/bench_scan.py [--quick] [--json PATH] [--device-label LABEL]`;
it prints `report(results)`, the markdown section `run_all.py` publishes.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import _env  # noqa: F401  (before jax: examples/ on the path, --quick flags)
import jax
import numpy as np
from _hlo import strip_hlo, temp_bytes
from _models import (
    grad_of,
    heavy_model,
    heavy_scan_loss,
    heavy_setup,
    heavy_text,
    llama_lax_scan,
    llama_model,
    llama_python_loop,
    llama_scan_layers,
    llama_setup,
    llama_text,
)
from _report import dig, finish, fmt, log, mb, ms, parser, ratio, start, table
from _timing import (
    compile_seconds,
    interleaved_compile,
    interleaved_steps,
    paired_ratio,
    summary,
)

from stackedtree._scan import sqrt_group_size

LLAMA_VARIANTS = {
    "python_loop": llama_python_loop,
    "lax_scan": llama_lax_scan,
    "scan_layers": llama_scan_layers,
}


def check_llama_equal(n: int, quick: bool) -> dict[str, Any]:
    """The three ways give the same loss and gradient before anything is timed.

    Checked at full float32 matmul precision: GPUs' default (TF32) rounds differently
    in the unrolled loop and in the scans, which would hide real bugs behind a loose
    tolerance.
    """
    cfg, params, x = llama_setup(n, quick)
    losses, grads = {}, {}
    for name, make in LLAMA_VARIANTS.items():
        with jax.default_matmul_precision("highest"):
            value, grads[name] = jax.jit(jax.value_and_grad(make(cfg)))(params, x)
        losses[name] = float(value)
    ref = grads["lax_scan"]
    ok = True
    for name in LLAMA_VARIANTS:
        same_loss = np.allclose(losses[name], losses["lax_scan"], rtol=1e-5)
        same_grad = all(
            np.allclose(a, b, rtol=1e-4, atol=1e-6)
            for a, b in zip(
                jax.tree.leaves(grads[name]), jax.tree.leaves(ref), strict=True
            )
        )
        ok &= same_loss and same_grad
        log(
            f"  {name:12s} loss {losses[name]:.6f}  same loss {same_loss}  same grad {same_grad}"
        )
    if not ok:
        raise AssertionError(
            "variants disagree on the loss or gradient; not timing them"
        )
    return {"n": n, "losses": losses, "all_equal": ok}


def compile_vs_n(ns: list[int], quick: bool, scan_repeats: int) -> dict[str, Any]:
    """(a) gradient compile time against N for the loop and both scans."""
    results: dict[str, dict[str, Any]] = {name: {} for name in LLAMA_VARIANTS}
    for n in ns:
        cfg, params, x = llama_setup(n, quick)
        makers = {
            name: (lambda make=make, cfg=cfg: grad_of(make(cfg)))
            for name, make in LLAMA_VARIANTS.items()
        }
        # The loop's compile time is large and grows with N; one measurement suffices.
        loop = compile_seconds(makers["python_loop"], params, x)
        loop.pop("compiled")
        results["python_loop"][str(n)] = {
            **loop,
            "best_s": loop["total_s"],
            "repeats": 1,
        }
        scans = {k: v for k, v in makers.items() if k != "python_loop"}
        times, _ = interleaved_compile(scans, (params, x), scan_repeats)
        for name, ts in times.items():
            results[name][str(n)] = {
                "best_s": min(ts),
                "median_s": float(np.median(ts)),
                "times_s": ts,
                "repeats": len(ts),
            }
        log(
            f"  N={n:3d}  compile of grad (best of repeats): "
            + "  ".join(
                f"{k} {results[k][str(n)]['best_s']:.2f}s" for k in LLAMA_VARIANTS
            )
        )
    return {"ns": ns, "seconds": results}


def scan_layers_vs_lax_scan(
    n: int, quick: bool, compile_repeats: int, step_repeats: int
) -> dict[str, Any]:
    """(b) compile and step time of the jitted gradient, interleaved, as ratios."""
    cfg, params, x = llama_setup(n, quick)
    makers = {
        "scan_layers": lambda: grad_of(llama_scan_layers(cfg)),
        "lax_scan": lambda: grad_of(llama_lax_scan(cfg)),
    }
    if not quick:
        compile_seconds(makers["lax_scan"], params, x)  # warm JAX's own caches first
    compile_times, compiled = interleaved_compile(makers, (params, x), compile_repeats)
    same_hlo = strip_hlo(compiled["scan_layers"].as_text()) == strip_hlo(
        compiled["lax_scan"].as_text()
    )
    steps = interleaved_steps(
        {name: (lambda c=c: c(params, x)) for name, c in compiled.items()}, step_repeats
    )
    out = {
        "n": n,
        "compile": {k: summary(v) | {"times_s": v} for k, v in compile_times.items()},
        "step": {k: summary(v) for k, v in steps.items()},
        "compile_ratio": paired_ratio(
            compile_times["scan_layers"], compile_times["lax_scan"]
        ),
        "step_ratio": paired_ratio(steps["scan_layers"], steps["lax_scan"]),
        "optimized_hlo_identical": same_hlo,
    }
    log(
        f"  N={n}: scan_layers/lax.scan compile {out['compile_ratio']['median_ratio']:.3f} "
        f"(median of {compile_repeats} each; min ratio {out['compile_ratio']['min_ratio']:.3f}), "
        f"step {out['step_ratio']['median_ratio']:.3f} "
        f"(median of {step_repeats}; min ratio {out['step_ratio']['min_ratio']:.3f}); "
        f"optimised HLO identical: {same_hlo}"
    )
    return out


REMAT_VARIANTS = {
    "no_remat": {"remat": False},
    "per_layer": {"remat": True},
    "sqrt_group": {"remat_group": "sqrt"},
}


def remat_memory(ns: list[int], quick: bool, step_repeats: int) -> dict[str, Any]:
    """(c) backward temporary bytes against N, and step times at the largest N."""
    temp: dict[str, dict[str, int | None]] = {name: {} for name in REMAT_VARIANTS}
    for n in ns:
        params, x = heavy_setup(n, quick)
        for name, opts in REMAT_VARIANTS.items():
            r = compile_seconds(
                lambda opts=opts: jax.grad(heavy_scan_loss(**opts)), params, x
            )
            temp[name][str(n)] = temp_bytes(r["compiled"])
        log(
            f"  N={n:3d}  backward temp MB: "
            + "  ".join(f"{k} {fmt(mb(temp[k][str(n)]))}" for k in REMAT_VARIANTS)
        )
    n = ns[-1]
    params, x = heavy_setup(n, quick)
    compiled = {
        name: compile_seconds(
            lambda opts=opts: jax.grad(heavy_scan_loss(**opts)), params, x
        )["compiled"]
        for name, opts in REMAT_VARIANTS.items()
    }
    grads = {name: c(params, x) for name, c in compiled.items()}
    for name in REMAT_VARIANTS:
        for a, b in zip(
            jax.tree.leaves(grads[name]),
            jax.tree.leaves(grads["no_remat"]),
            strict=True,
        ):
            if not np.allclose(a, b, rtol=1e-4, atol=1e-6):
                raise AssertionError(f"{name} gradient differs from no_remat")
    steps = interleaved_steps(
        {name: (lambda c=c: c(params, x)) for name, c in compiled.items()}, step_repeats
    )
    mem_ratio = ratio(temp["sqrt_group"][str(n)], temp["per_layer"][str(n)])
    step_ratio = paired_ratio(steps["sqrt_group"], steps["per_layer"])
    log(
        f"  N={n}: sqrt_group/per_layer temp {fmt(mem_ratio)} (goal <= 0.5), step "
        f"{step_ratio['median_ratio']:.3f} (goal <= 1.3); step medians "
        + "  ".join(f"{k} {np.median(v):.3f}s" for k, v in steps.items())
    )
    return {
        "model": heavy_model(quick),
        "ns": ns,
        "temp_bytes": temp,
        "step_n": n,
        "sqrt_group_size": sqrt_group_size(n),
        "step": {k: summary(v) for k, v in steps.items()},
        "memory_ratio_sqrt_over_per_layer": mem_ratio,
        "step_ratio_sqrt_over_per_layer": step_ratio,
        "gradients_equal": True,
    }


# --------------------------------------------------------------------------------------
# Report

LABELS = {"python_loop": "loop", "lax_scan": "lax.scan", "scan_layers": "scan_layers"}
REMAT_LABELS = {
    "no_remat": "no remat",
    "per_layer": "remat=True",
    "sqrt_group": 'remat_group="sqrt"',
}


def headline(results: dict[str, Any]) -> list[tuple[str, float | None]]:
    """This script's rows of the headline table: `(measure, value)`."""
    h = results.get("headline") or {}
    n, n_loop, n_remat = h.get("ratio_n"), h.get("loop_compile_n"), h.get("remat_n")
    return [
        (
            f"scan_layers / lax.scan, gradient compile time, N={n}",
            h.get("scan_layers_over_lax_scan_compile"),
        ),
        (
            f"scan_layers / lax.scan, gradient step time, N={n}",
            h.get("scan_layers_over_lax_scan_step"),
        ),
        (
            f"Python loop / scan_layers, gradient compile time, N={n_loop}",
            h.get("loop_over_scan_layers_compile"),
        ),
        (
            f"remat_group='sqrt' / remat=True, backward memory, N={n_remat}",
            h.get("sqrt_over_per_layer_memory"),
        ),
        (
            f"remat_group='sqrt' / remat=True, gradient step time, N={n_remat}",
            h.get("sqrt_over_per_layer_step"),
        ),
    ]


def report(results: dict[str, Any]) -> str:
    """The markdown section for these results (headings `###` and `####`)."""
    a = results.get("compile_vs_n") or {}
    b = results.get("scan_layers_vs_lax_scan") or {}
    c = results.get("remat") or {}
    check = results.get("equality_check") or {}
    out = [
        "### Scan against a Python loop and a hand-written `jax.lax.scan`",
        "",
        llama_text(a.get("model") or b.get("model") or {})
        + " The loop, `jax.lax.scan` and `scan_layers` gave the same loss and "
        f"gradient at N={check.get('n')} before anything was timed.",
        "",
        "#### Compile time against depth",
        "",
        "Trace, lowering and XLA compile of `jax.grad` of the loss: the loop's grows "
        "with N, a scan's does not. Scans: best of "
        f"{dig(a, 'seconds', 'scan_layers', str(a.get('ns', [0])[-1]), 'repeats')} "
        "interleaved compiles; loop: one compile.",
        "",
    ]
    secs = a.get("seconds") or {}
    rows = [
        [n, *(dig(secs, k, str(n), "best_s") for k in LABELS)] for n in a.get("ns", [])
    ]
    out += [table(["N", *(f"{v} (s)" for v in LABELS.values())], rows), ""]

    comp, step = b.get("compile") or {}, b.get("step") or {}
    rows = [
        [
            LABELS[k],
            dig(comp, k, "median_s"),
            ms(dig(step, k, "median_s")),
        ]
        for k in ("scan_layers", "lax_scan")
    ]
    rows.append(
        [
            "scan_layers / lax.scan",
            dig(b, "compile_ratio", "median_ratio"),
            dig(b, "step_ratio", "median_ratio"),
        ]
    )
    hlo = b.get("optimized_hlo_identical")
    out += [
        "#### `scan_layers` against `jax.lax.scan`",
        "",
        f"The gradient at N={b.get('n')}: "
        f"{dig(comp, 'scan_layers', 'repeats')} compiles and "
        f"{dig(step, 'scan_layers', 'repeats')} steps of each, alternating; medians. "
        "The goal is a ratio within 0.95-1.05. The two optimised HLO programs are "
        f"{'identical' if hlo else 'not identical'} (metadata aside).",
        "",
        table(["", "compile (s)", "step (ms)"], rows),
        "",
    ]

    temp = c.get("temp_bytes") or {}
    rows = [
        [n, *(mb(dig(temp, k, str(n))) for k in REMAT_LABELS)] for n in c.get("ns", [])
    ]
    steps = ", ".join(
        f"{label} {fmt(ms(dig(c, 'step', k, 'median_s')))} ms"
        for k, label in REMAT_LABELS.items()
    )
    out += [
        "#### Memory with rematerialisation",
        "",
        heavy_text(c.get("model") or {})
        + " XLA's temporary memory of the compiled gradient (`temp_size_in_bytes`); "
        '`sqrt` is `remat_group="sqrt"`:',
        "",
        table(["N", "no remat (MB)", "remat=True (MB)", "sqrt (MB)"], rows),
        "",
        f"Gradient step at N={c.get('step_n')} (g={c.get('sqrt_group_size')}), median "
        f"of {dig(c, 'step', 'per_layer', 'repeats')} alternating: {steps}. The goal "
        'is `remat_group="sqrt"` at most half the memory of `remat=True`, for at most '
        "1.3x its step time.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args, machine, t_start = start(parser(__doc__), argv)
    q = args.quick

    log("checking the loop, lax.scan and scan_layers agree (loss and gradient)")
    check = check_llama_equal(2 if q else 4, q)

    log("(a) compile time of the gradient against N")
    a = compile_vs_n([2, 4] if q else [8, 16, 32, 64], q, scan_repeats=1 if q else 2)
    a["model"] = llama_model(q)

    log("(b) scan_layers against a hand-written jax.lax.scan")
    b = scan_layers_vs_lax_scan(
        4 if q else 32, q, compile_repeats=1 if q else 10, step_repeats=3 if q else 30
    )
    b["model"] = llama_model(q)

    log("(c) backward temporary memory with remat")
    c = remat_memory([4, 9] if q else [16, 32, 64], q, step_repeats=3 if q else 9)

    last = str(a["ns"][-1])
    secs = a["seconds"]
    headline = {
        "scan_layers_over_lax_scan_compile": b["compile_ratio"]["median_ratio"],
        "scan_layers_over_lax_scan_step": b["step_ratio"]["median_ratio"],
        "ratio_n": b["n"],
        "loop_over_scan_layers_compile": secs["python_loop"][last]["best_s"]
        / secs["scan_layers"][last]["best_s"],
        "loop_compile_n": int(last),
        "sqrt_over_per_layer_memory": c["memory_ratio_sqrt_over_per_layer"],
        "sqrt_over_per_layer_step": c["step_ratio_sqrt_over_per_layer"]["median_ratio"],
        "remat_n": c["step_n"],
    }
    payload = {
        "benchmark": "bench_scan",
        "quick": q,
        "machine": machine,
        "equality_check": check,
        "compile_vs_n": a,
        "scan_layers_vs_lax_scan": b,
        "remat": c,
        "headline": headline,
        "wall_s": time.perf_counter() - t_start,
    }
    finish(args, payload, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
