"""Timing compiles and steps, the variants alternating, and statistics of the times."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import _env  # noqa: F401  (before jax)
import jax


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def compile_seconds(
    make_fn: Callable[[], Callable[..., Any]], *args: Any
) -> dict[str, Any]:
    """Trace + lower + compile time of `jax.jit(make_fn())` on `args`.

    `make_fn` must build a *fresh* function (new closures all the way down) so that no
    trace cache from an earlier measurement is reused; XLA compiles every time anyway.
    """
    fn = make_fn()
    gc.collect()
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "total_s": t2 - t0,
        "compiled": compiled,
    }


def interleaved_compile(
    makers: dict[str, Callable[[], Callable[..., Any]]],
    args: Sequence[Any],
    repeats: int,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Compile each variant `repeats` times, alternating A, B, A, B, ... (order rotated).

    Returns the total seconds per variant and each variant's last compiled executable.
    """
    out: dict[str, list[float]] = {name: [] for name in makers}
    compiled: dict[str, Any] = {}
    names = list(makers)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            res = compile_seconds(makers[name], *args)
            out[name].append(res["total_s"])
            compiled[name] = res["compiled"]
    return out, compiled


def interleaved_steps(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Time `fn()` (blocked until ready) for each variant, alternating between variants.

    Each round runs every variant once, in an order rotated per round, so slow drifts of
    the machine (frequency, other load) hit every variant alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                block(fns[name]())
                out[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return out


def summary(times: Sequence[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": len(times),
        "times_s": list(times),
    }


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Ratio a/b of two interleaved series: of medians, of minima, and median of pairs."""
    return {
        "median_ratio": statistics.median(a) / statistics.median(b),
        "min_ratio": min(a) / min(b),
        "paired_median_ratio": statistics.median(
            x / y for x, y in zip(a, b, strict=True)
        ),
    }
