"""scan_layers against a Python loop and a hand-written jax.lax.scan (issue 3).

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

Run `python benchmarks/bench_scan.py [--quick] [--json PATH]`.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import _common as C
import jax
import numpy as np

from stackedtree._scan import sqrt_group_size


def _strip_hlo(text: str) -> str:
    """Optimised HLO without metadata and names, to compare two programs' structure."""
    text = re.sub(r",?\s*metadata=\{[^}]*\}", "", text)
    # Debug tables (file names, source locations) differ with the Python call stack.
    text = re.sub(
        r"^(FileNames|FunctionNames|FileLocations|StackFrames)$", "", text, flags=re.M
    )
    text = re.sub(r"^\s*\d+ [{\"].*$", "", text, flags=re.M)
    text = re.sub(r"%[\w.\-]+", "%v", text)
    text = re.sub(r"^HloModule \S+", "HloModule", text, flags=re.M)
    return "\n".join(line for line in text.splitlines() if line.strip())


LLAMA_VARIANTS = {
    "python_loop": C.llama_python_loop,
    "lax_scan": C.llama_lax_scan,
    "scan_layers": C.llama_scan_layers,
}


def check_llama_equal(n: int, quick: bool) -> dict[str, Any]:
    """The three ways give the same loss and gradient before anything is timed.

    Checked at full float32 matmul precision: GPUs' default (TF32) rounds differently
    in the unrolled loop and in the scans, which would hide real bugs behind a loose
    tolerance.
    """
    cfg, params, x = C.llama_setup(n, quick)
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
        C.log(
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
        cfg, params, x = C.llama_setup(n, quick)
        makers = {
            name: (lambda make=make, cfg=cfg: C.grad_of(make(cfg)))
            for name, make in LLAMA_VARIANTS.items()
        }
        # The loop's compile time is large and grows with N; one measurement suffices.
        loop = C.compile_seconds(makers["python_loop"], params, x)
        loop.pop("compiled")
        results["python_loop"][str(n)] = {
            **loop,
            "best_s": loop["total_s"],
            "repeats": 1,
        }
        scans = {k: v for k, v in makers.items() if k != "python_loop"}
        times, _ = C.interleaved_compile(scans, (params, x), scan_repeats)
        for name, ts in times.items():
            results[name][str(n)] = {
                "best_s": min(ts),
                "median_s": float(np.median(ts)),
                "times_s": ts,
                "repeats": len(ts),
            }
        C.log(
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
    cfg, params, x = C.llama_setup(n, quick)
    makers = {
        "scan_layers": lambda: C.grad_of(C.llama_scan_layers(cfg)),
        "lax_scan": lambda: C.grad_of(C.llama_lax_scan(cfg)),
    }
    if not quick:
        C.compile_seconds(makers["lax_scan"], params, x)  # warm JAX's own caches first
    compile_times, compiled = C.interleaved_compile(
        makers, (params, x), compile_repeats
    )
    same_hlo = _strip_hlo(compiled["scan_layers"].as_text()) == _strip_hlo(
        compiled["lax_scan"].as_text()
    )
    steps = C.interleaved_steps(
        {name: (lambda c=c: c(params, x)) for name, c in compiled.items()}, step_repeats
    )
    out = {
        "n": n,
        "compile": {k: C.summary(v) | {"times_s": v} for k, v in compile_times.items()},
        "step": {k: C.summary(v) for k, v in steps.items()},
        "compile_ratio": C.paired_ratio(
            compile_times["scan_layers"], compile_times["lax_scan"]
        ),
        "step_ratio": C.paired_ratio(steps["scan_layers"], steps["lax_scan"]),
        "optimized_hlo_identical": same_hlo,
    }
    C.log(
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
        params, x = C.heavy_setup(n, quick)
        for name, opts in REMAT_VARIANTS.items():
            r = C.compile_seconds(
                lambda opts=opts: jax.grad(C.heavy_scan_loss(**opts)), params, x
            )
            temp[name][str(n)] = C.temp_bytes(r["compiled"])
        C.log(
            f"  N={n:3d}  backward temp MB: "
            + "  ".join(f"{k} {_mb(temp[k][str(n)])}" for k in REMAT_VARIANTS)
        )
    n = ns[-1]
    params, x = C.heavy_setup(n, quick)
    compiled = {
        name: C.compile_seconds(
            lambda opts=opts: jax.grad(C.heavy_scan_loss(**opts)), params, x
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
    steps = C.interleaved_steps(
        {name: (lambda c=c: c(params, x)) for name, c in compiled.items()}, step_repeats
    )
    mem_ratio = _ratio(temp["sqrt_group"][str(n)], temp["per_layer"][str(n)])
    step_ratio = C.paired_ratio(steps["sqrt_group"], steps["per_layer"])
    C.log(
        f"  N={n}: sqrt_group/per_layer temp {_fmt(mem_ratio)} (target <= 0.5), step "
        f"{step_ratio['median_ratio']:.3f} (target <= 1.3); step medians "
        + "  ".join(f"{k} {np.median(v):.3f}s" for k, v in steps.items())
    )
    return {
        "model": _heavy_model(quick),
        "ns": ns,
        "temp_bytes": temp,
        "step_n": n,
        "sqrt_group_size": sqrt_group_size(n),
        "step": {k: C.summary(v) for k, v in steps.items()},
        "memory_ratio_sqrt_over_per_layer": mem_ratio,
        "step_ratio_sqrt_over_per_layer": step_ratio,
        "gradients_equal": True,
    }


def _heavy_model(quick: bool) -> dict[str, Any]:
    rows, width = (
        (C.HEAVY_QUICK_ROWS, C.HEAVY_QUICK_WIDTH)
        if quick
        else (C.HEAVY_ROWS, C.HEAVY_WIDTH)
    )
    return {
        "carry": [rows, width],
        "dtype": "float32",
        "layer": f"x + tanh(x @ w1) @ w2, w1 and w2 ({width}, {width})",
    }


def _llama_model(quick: bool) -> dict[str, Any]:
    cfg = C.LLAMA_QUICK if quick else C.LLAMA_SMALL
    batch, seq = (
        (C.LLAMA_QUICK_BATCH, C.LLAMA_QUICK_SEQ)
        if quick
        else (C.LLAMA_BATCH, C.LLAMA_SEQ)
    )
    d = cfg._asdict()
    d.pop("num_layers")
    return {
        "config": d,
        "batch": batch,
        "seq": seq,
        "dtype": "float32",
        "loss": "mean(decoder(x) ** 2), gradient w.r.t. the stacked parameters",
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _mb(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 1e6:.1f}"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    args, machine, t_start = C.start(__doc__, argv)
    q = args.quick

    C.log("checking the loop, lax.scan and scan_layers agree (loss and gradient)")
    check = check_llama_equal(2 if q else 4, q)

    C.log("(a) compile time of the gradient against N")
    a = compile_vs_n([2, 4] if q else [8, 16, 32, 64], q, scan_repeats=1 if q else 2)
    a["model"] = _llama_model(q)

    C.log("(b) scan_layers against a hand-written jax.lax.scan")
    b = scan_layers_vs_lax_scan(
        4 if q else 32, q, compile_repeats=1 if q else 10, step_repeats=3 if q else 30
    )
    b["model"] = _llama_model(q)

    C.log("(c) backward temporary memory with remat")
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
    C.write_json(args.json, payload)
    C.log(
        "headline:",
        {k: round(v, 4) if isinstance(v, float) else v for k, v in headline.items()},
    )
    C.log(f"done in {payload['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
