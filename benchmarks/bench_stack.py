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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import stackedtree
from stackedtree import stack, unstack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from llama_model import Config, block_shapes

FULL = Config(d_model=256, kv_heads=4, q_per_kv=1, head_dim=64, d_ff=688, num_layers=16)
QUICK = Config(d_model=32, kv_heads=2, q_per_kv=1, head_dim=8, d_ff=64, num_layers=4)


def numpy_layer(cfg: Config, rng: np.random.Generator) -> Any:
    return jax.tree.map(
        lambda s: rng.standard_normal(s.shape, dtype=np.float32),
        block_shapes(cfg, np.float32),
    )


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def measure(fn: Callable[[], Any], repeat: int, number: int) -> dict[str, float]:
    """Seconds per call: min and median over `repeat` runs of `number` calls each."""
    fn()  # warm up: compile caches, allocator
    times = [t / number for t in timeit.repeat(fn, repeat=repeat, number=number)]
    return {"min_s": min(times), "median_s": statistics.median(times)}


def first_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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


def machine() -> dict[str, str]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "jax_backend": jax.default_backend(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "stackedtree": stackedtree.__version__,
    }


def table(results: dict[str, Any]) -> str:
    mb = results["total_bytes"] / 2**20
    lines = [
        f"{results['layers']} layers x {results['leaves_per_layer']} leaves, "
        f"{mb:.1f} MiB in total",
        "",
        "| benchmark | implementation | min (ms) | median (ms) | ratio (min) |",
        "|---|---|---:|---:|---:|",
    ]
    baselines = {
        "stack": "np.copyto (preallocated)",
        "unstack_numpy": "per-index slicing",
        "unstack_jax": "per-index slicing",
    }
    for bench, base in baselines.items():
        rows = results[bench]
        for name, t in rows.items():
            ratio = t["min_s"] / rows[base]["min_s"]
            lines.append(
                f"| {bench} | {name} | {t['min_s'] * 1e3:.3f} | "
                f"{t['median_s'] * 1e3:.3f} | {ratio:.2f}x |"
            )
    first = results["unstack_jax_first_call_s"]
    lines.append("")
    lines.append(
        "unstack_jax first call (compile included): "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in first.items())
    )
    lines.append("ratio (min) is against the row named in the benchmark's baseline:")
    lines.extend(f"  {bench}: {base}" for bench, base in baselines.items())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args(argv)
    cfg, repeat, number = (QUICK, 3, 2) if args.quick else (FULL, 7, 5)
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    results = run(cfg, repeat, number)
    print(table(results))
    if args.json:
        args.json.write_text(
            json.dumps({"machine": info, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
