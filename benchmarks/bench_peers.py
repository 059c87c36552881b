"""One Llama-style decoder block, scanned over N layers eight ways.

The block is `examples/llama_model.py`'s `decoder_block` in every variant, and every
variant's parameters are filled from the same stacked weights:

- `python_loop`: a Python loop over layers (the graph grows with N);
- `lax_scan`: the scan tutorial's hand-written `jax.lax.scan(inner, x, params)`;
- `scan_layers`: `stackedtree.scan_layers`;
- `haiku_layer_stack`: an `hk.Module` whose parameters come from `hk.get_parameter`,
  repeated with `hk.layer_stack`;
- `flax_linen_scan`: a linen Module repeated with `nn.scan(variable_axes={'params': 0},
  split_rngs={'params': True}, length=N)`;
- `flax_nnx_scan`: an `nnx.Module` stacked with `nnx.vmap` and run with `nnx.scan`;
- `flax_nnx_scan_layers`: the same `nnx.Module`, one per layer, stacked with
  `stackedtree.stack` (a module is a pytree) and run with `scan_layers`;
- `equinox_scan`: `eqx.filter_vmap` builds stacked modules, `eqx.partition` splits off the
  arrays, `jax.lax.scan` runs over them and `eqx.combine` rebuilds each layer.

The styles are in `_peer_styles.py`. Before anything is timed, every variant's loss and gradient norm must match the
hand-written scan (printed and asserted at every N). Then, for each N: trace + lower +
compile seconds of the forward and of `jax.grad`, and the steady step time of the compiled
gradient, the variants run alternately.

Run `python benchmarks/bench_peers.py [--quick] [--json PATH] [--device-label LABEL]`;
it prints `report(results)`, the markdown section `run_all.py` publishes.
"""

from __future__ import annotations

import sys
import time
import traceback
import warnings
from typing import Any

import _env  # noqa: F401  (before jax: examples/ on the path, --quick flags)
import jax
import jax.numpy as jnp
import numpy as np
from _models import llama_model, llama_setup, llama_text
from _peer_styles import DESCRIPTIONS, LABELS, REFERENCE, VARIANTS
from _plots import FIGSIZE, Plot, plot_where, pyplot
from _report import dig, finish, log, parser, start, table
from _timing import compile_seconds, interleaved_steps, summary

import stackedtree

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


def tolerance() -> dict[str, float]:
    """Relative tolerances for the loss and gradient-norm checks.

    The check reuses the timed executables, which run at the backend's default matmul
    precision: float32 on CPU, TF32 on recent NVIDIA GPUs, where the unrolled loop and
    the scans round differently (the scans agree with each other bit for bit).
    """
    if jax.default_backend() == "cpu":
        return {"loss_rtol": 1e-5, "grad_norm_rtol": 1e-4}
    return {"loss_rtol": 1e-3, "grad_norm_rtol": 1e-3}


def _grad_norm(g: Any) -> float:
    return float(
        np.sqrt(sum(float(jnp.sum(jnp.square(a))) for a in jax.tree.leaves(g)))
    )


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def run_n(n: int, quick: bool, step_repeats: int, rotate: int) -> dict[str, Any]:
    cfg, stacked, x = llama_setup(n, quick)
    rows: dict[str, dict[str, Any]] = {}
    compiled_grads: dict[str, tuple[Any, Any]] = {}
    names = list(VARIANTS)
    order = names[rotate % len(names) :] + names[: rotate % len(names)]
    for name in order:
        row: dict[str, Any] = {}
        rows[name] = row
        try:
            make, params = VARIANTS[name](cfg, stacked)
            fwd = compile_seconds(make, params, x)
            grad = compile_seconds(lambda make=make: jax.grad(make()), params, x)
            row["forward_compile_s"] = fwd["total_s"]
            row["forward_lower_s"] = fwd["lower_s"]
            row["grad_compile_s"] = grad["total_s"]
            row["grad_lower_s"] = grad["lower_s"]
            row["loss"] = float(fwd["compiled"](params, x))
            g = grad["compiled"](params, x)
            row["grad_norm"] = _grad_norm(g)
            row["num_grad_leaves"] = len(jax.tree.leaves(g))
            compiled_grads[name] = (grad["compiled"], params)
        except Exception as e:
            row["error"] = _error(e)
            log(f"  N={n} {name}: FAILED {row['error']}")
            traceback.print_exc()
    ref = rows[REFERENCE]
    tol = tolerance()
    for row in rows.values():
        if "error" in row or "loss" not in ref:
            row["matches"] = False
            continue
        row["matches"] = bool(
            np.allclose(row["loss"], ref["loss"], rtol=tol["loss_rtol"])
            and np.allclose(
                row["grad_norm"], ref["grad_norm"], rtol=tol["grad_norm_rtol"]
            )
        )
    log(f"  N={n}: loss and gradient norm against {REFERENCE}")
    for name in names:
        r = rows[name]
        if "error" in r:
            log(f"    {name:20s} FAILED: {r['error']}")
        else:
            log(
                f"    {name:20s} loss {r['loss']:.7f}  |grad| {r['grad_norm']:.7f}  "
                f"matches {r['matches']}"
            )
    # Time only the variants that compute the same thing.
    timed = {k: v for k, v in compiled_grads.items() if rows[k]["matches"]}
    steps = interleaved_steps(
        {k: (lambda c=c, p=p: c(p, x)) for k, (c, p) in timed.items()},
        step_repeats,
        warmup=1,
    )
    for name, ts in steps.items():
        rows[name]["grad_step"] = summary(ts)
    log(
        f"  N={n}: {'variant':20s} {'fwd compile':>11s} {'grad compile':>12s} {'grad step':>10s}"
    )
    for name in names:
        r = rows[name]
        if "error" in r:
            continue
        step = r.get("grad_step", {}).get("median_s")
        log(
            f"        {name:20s} {r['forward_compile_s']:10.2f}s {r['grad_compile_s']:11.2f}s "
            f"{'n/a' if step is None else f'{step * 1e3:8.1f}ms'}"
        )
    return rows


def _cell(row: dict[str, Any], value: Any) -> Any:
    if "error" in row:
        return "failed"
    return value if row.get("matches") else "differs"


def report(results: dict[str, Any]) -> str:
    """The markdown section for these results (headings `###` and `####`)."""
    ns, res = results.get("ns", []), results.get("results") or {}
    variants = results.get("variants") or []
    tol = results.get("tolerance") or {}
    ref = LABELS.get(results.get("reference", ""), results.get("reference"))
    bad = [
        f"{LABELS.get(v, v)} at N={n}: {row.get('error', 'different loss or gradient')}"
        for n in ns
        for v in variants
        if not (row := dig(res, str(n), v) or {}).get("matches")
    ]
    checked = (
        "All variants matched."
        if not bad
        else "Not matching, so not timed: " + "; ".join(bad) + "."
    )
    repeats = sorted(
        {
            r
            for n in ns
            for v in variants
            if (r := dig(res, str(n), v, "grad_step", "repeats"))
        }
    )
    words = {7: "seven", 8: "eight", 9: "nine"}
    styles = "; ".join(DESCRIPTIONS.get(v, f"`{v}`") for v in variants)
    out = [
        "### The same decoder in "
        f"{words.get(len(variants), str(len(variants)))} layer-scanning styles",
        "",
        llama_text(results.get("model") or {})
        + f" Every variant holds the same weights: {styles}. Before timing, each one's "
        f"loss and gradient norm were compared with `{ref}` at every N (relative "
        f"tolerances {tol.get('loss_rtol')} and {tol.get('grad_norm_rtol')}). {checked}",
    ]
    for heading, key, scale in (
        ("Gradient compile time (s)", "grad_compile_s", 1.0),
        ("Forward compile time (s)", "forward_compile_s", 1.0),
        ("Gradient step time (ms)", "grad_step", 1e3),
    ):
        rows = []
        for v in variants:
            cells = []
            for n in ns:
                row = dig(res, str(n), v) or {}
                x = dig(row, key, "median_s") if key == "grad_step" else row.get(key)
                cells.append(_cell(row, x * scale if x is not None else None))
            rows.append([LABELS.get(v, v), *cells])
        out += ["", f"#### {heading}", ""]
        if key == "grad_step":
            out += [
                "Median of "
                + " or ".join(str(r) for r in repeats)
                + " steps of each, the variants alternating.",
                "",
            ]
        else:
            out += ["Trace, lowering and XLA compile, once per variant and N.", ""]
        out.append(table(["variant", *(f"N={n}" for n in ns)], rows))
    return "\n".join(out)


def plots(results: dict[str, Any]) -> list[Plot]:
    """Compile time against N, of the gradient and of the forward, for every variant."""
    plt = pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, sharey=True)
    ns, res = results.get("ns", []), results.get("results") or {}
    for ax, key, what in (
        (axes[0], "grad_compile_s", "jax.grad"),
        (axes[1], "forward_compile_s", "the forward"),
    ):
        for v in results.get("variants", []):
            pts = [(n, dig(res, str(n), v, key)) for n in ns]
            pts = [(n, y) for n, y in pts if isinstance(y, int | float)]
            if pts:
                ours = v == "scan_layers"  # drawn on top, so the others cannot hide it
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    ms=3,
                    lw=2.5 if ours else 1.5,
                    zorder=3 if ours else 2,
                    label=LABELS.get(v, v),
                )
        ax.set_title(f"compile time of {what}")
        ax.set_xlabel("layers N")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("trace + lower + compile (s)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(plot_where(results.get("machine") or {}))
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    return [
        Plot(
            "compile_time",
            "Compile time of jax.grad and of the forward against the number of layers",
            fig,
        )
    ]


def main(argv: list[str] | None = None) -> int:
    args, machine, t_start = start(parser(__doc__), argv)
    q = args.quick
    ns = [2, 4] if q else [8, 16, 32, 64]
    results: dict[str, Any] = {}
    for i, n in enumerate(ns):
        repeats = 2 if q else (7 if n <= 16 else 5)
        results[str(n)] = run_n(n, q, repeats, rotate=i)

    ok = all(r["matches"] for rows in results.values() for r in rows.values())
    mismatched = sorted(
        {
            name
            for rows in results.values()
            for name, r in rows.items()
            if not r["matches"]
        }
    )
    last = str(ns[-1])
    headline = {
        "n": ns[-1],
        "grad_compile_s": {
            k: r.get("grad_compile_s") for k, r in results[last].items()
        },
        "grad_step_median_s": {
            k: r.get("grad_step", {}).get("median_s") for k, r in results[last].items()
        },
        "all_match": ok,
        "mismatched_or_failed": mismatched,
    }
    payload = {
        "benchmark": "bench_peers",
        "quick": q,
        "machine": machine,
        "model": llama_model(q),
        "variants": list(VARIANTS),
        "reference": REFERENCE,
        "tolerance": tolerance(),
        "ns": ns,
        "results": results,
        "headline": headline,
        "stackedtree_version": getattr(stackedtree, "__version__", None),
        "wall_s": time.perf_counter() - t_start,
    }
    finish(args, payload, report)
    if not ok:
        log(f"MISMATCH or FAILURE: {', '.join(mismatched)} (reported, not timed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
