"""Benchmark `stack` and `unstack` against the hand-written peers they replace.

1. `stack` of N numpy layers (a Llama-style decoder block) against `np.copyto` of the
   same total bytes (one memory copy: the floor), and against `np.stack` per leaf by hand.
2. `unstack` against per-index slicing, `[jax.tree.map(lambda x: x[i], s) for i in
   range(n)]`, for numpy and for jax leaves.

Every peer runs in the same process, timed `timeit`-style (min and median of repeats);
the table reports ratios, which travel between machines better than absolute times.

    python benchmarks/bench_stack.py            # full size (about 50 MB of f32 layers)
    python benchmarks/bench_stack.py --quick    # a tiny smoke run for CI
    python benchmarks/bench_stack.py --json results.json

It prints `report(results)`, the markdown section `run_all.py` publishes.
"""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

import _env  # noqa: F401  (before jax: examples/ on the path, --quick flags)
import jax
import numpy as np
from _report import dig, finish, fmt, ms, parser, ratio, start, table
from _timing import block
from llama_model import Config, block_shapes

from stackedtree import stack, unstack

FULL = Config(d_model=256, kv_heads=4, q_per_kv=1, head_dim=64, d_ff=688, num_layers=16)
QUICK = Config(d_model=32, kv_heads=2, q_per_kv=1, head_dim=8, d_ff=64, num_layers=4)


def numpy_layer(cfg: Config, rng: np.random.Generator) -> Any:
    return jax.tree.map(
        lambda s: rng.standard_normal(s.shape, dtype=np.float32),
        block_shapes(cfg, np.float32),
    )


def measure(fn: Callable[[], Any], repeat: int, number: int) -> dict[str, float]:
    """Seconds per call: min and median over `repeat` runs of `number` calls each."""
    fn()  # warm up: compile caches, allocator
    times = [t / number for t in timeit.repeat(fn, repeat=repeat, number=number)]
    return {"min_s": min(times), "median_s": statistics.median(times)}


def first_call(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(cfg: Config, repeat: int, number: int) -> dict[str, Any]:
    n = cfg.num_layers
    rng = np.random.default_rng(0)
    layers = [numpy_layer(cfg, rng) for _ in range(n)]
    total_bytes = sum(x.nbytes for layer in layers for x in jax.tree.leaves(layer))
    leaves_per_layer = len(jax.tree.leaves(layers[0]))
    results: dict[str, Any] = {
        "layers": n,
        "leaves_per_layer": leaves_per_layer,
        "total_bytes": total_bytes,
    }

    # 1. stack of numpy layers.
    src = np.concatenate(
        [x.ravel() for layer in layers for x in jax.tree.leaves(layer)]
    )
    dst = np.empty_like(src)
    results["stack"] = {
        "stackedtree.stack": measure(lambda: stack(layers), repeat, number),
        "np.copyto (preallocated)": measure(
            lambda: np.copyto(dst, src), repeat, number
        ),
        "np.copyto (fresh buffer)": measure(
            lambda: np.copyto(np.empty_like(src), src), repeat, number
        ),
        "np.stack per leaf": measure(
            lambda: jax.tree.map(lambda *xs: np.stack(xs), *layers), repeat, number
        ),
    }

    # 2. unstack, numpy and jax leaves.
    stacked_np = stack(layers)
    stacked_jax = jax.device_put(stacked_np)
    block(stacked_jax)

    def naive(s: Any) -> list[Any]:
        return [jax.tree.map(lambda x, i=i: x[i], s) for i in range(n)]

    results["unstack_numpy"] = {
        "stackedtree.unstack": measure(lambda: unstack(stacked_np), repeat, number),
        "per-index slicing": measure(lambda: naive(stacked_np), repeat, number),
    }
    # First calls include compilation (unstack: one compiled call for all leaves;
    # slicing: one small compiled op per leaf shape).
    fresh = jax.device_put(stack([numpy_layer(cfg, rng) for _ in range(n + 1)]))
    results["unstack_jax_first_call_s"] = {
        "stackedtree.unstack": first_call(lambda: block(unstack(fresh))),
        "per-index slicing": first_call(lambda: block(naive(fresh))),
    }
    results["unstack_jax"] = {
        "stackedtree.unstack": measure(
            lambda: block(unstack(stacked_jax)), repeat, number
        ),
        "per-index slicing": measure(lambda: block(naive(stacked_jax)), repeat, number),
        "list(x) per leaf": measure(
            lambda: block(jax.tree.map(list, stacked_jax)), repeat, number
        ),
    }
    return results


BASELINES = {
    "stack": "np.copyto (preallocated)",
    "unstack_numpy": "per-index slicing",
    "unstack_jax": "per-index slicing",
}
TASKS = {
    "stack": "stack",
    "unstack_numpy": "unstack numpy",
    "unstack_jax": "unstack jax",
}


def _min(r: dict[str, Any], task: str, impl: str) -> float | None:
    return dig(r, task, impl, "min_s")


def headline(results: dict[str, Any]) -> list[tuple[str, float | None]]:
    """This script's rows of the headline table: `(measure, value)`."""
    r = results.get("results") or {}
    return [
        (
            "stackedtree.stack / np.copyto (preallocated), time",
            ratio(
                _min(r, "stack", "stackedtree.stack"),
                _min(r, "stack", "np.copyto (preallocated)"),
            ),
        ),
        *(
            (
                f"per-index slicing / unstack, time, {kind} leaves",
                ratio(
                    _min(r, f"unstack_{kind}", "per-index slicing"),
                    _min(r, f"unstack_{kind}", "stackedtree.unstack"),
                ),
            )
            for kind in ("numpy", "jax")
        ),
    ]


def report(results: dict[str, Any]) -> str:
    """The markdown section for these results (heading `###`)."""
    r = results.get("results") or {}
    rows = [
        [
            TASKS[task] if i == 0 else "",
            impl,
            ms(t.get("min_s")),
            ratio(t.get("min_s"), _min(r, task, base)),
        ]
        for task, base in BASELINES.items()
        for i, (impl, t) in enumerate((r.get(task) or {}).items())
    ]
    first = r.get("unstack_jax_first_call_s") or {}
    size = f"{r['total_bytes'] / 2**20:.1f} MiB" if r.get("total_bytes") else "?"
    return "\n".join(
        [
            "### Stack and unstack against numpy",
            "",
            f"{r.get('layers')} numpy layers of a Llama-style block, "
            f"{r.get('leaves_per_layer')} leaves each, {size} of float32. Fastest of "
            f"{results.get('repeat')} repeats of {results.get('number')} calls; ratio "
            "is against np.copyto into a preallocated buffer (the floor: one memory "
            "copy) for stack, against per-index slicing for unstack.",
            "",
            table(["task", "implementation", "min (ms)", "ratio"], rows),
            "",
            "First call of unstack on jax leaves, compile included: "
            + ", ".join(f"{k} {fmt(ms(v))} ms" for k, v in first.items())
            + ".",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args, machine, t_start = start(parser(__doc__), argv)
    cfg, repeat, number = (QUICK, 3, 2) if args.quick else (FULL, 7, 5)
    results = run(cfg, repeat, number)
    payload = {
        "benchmark": "bench_stack",
        "quick": args.quick,
        "machine": machine,
        "repeat": repeat,
        "number": number,
        "results": results,
        "wall_s": time.perf_counter() - t_start,
    }
    finish(args, payload, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
