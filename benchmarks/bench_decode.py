"""A KV-cache decode step: scan_layers(update_xs=True) against the xs/ys scan and the
hand-written in-place scan.

One token through N attention layers, each reading and rewriting its own KV cache
(`(batch, positions, heads, head_dim)` keys and values per layer, stacked to
`(N, ...)`), jitted with the caches donated, three ways:

- `xs_ys`: `jax.lax.scan` with the caches as xs and the updated caches as ys (what a
  hand-written scan, `nn.scan` with a cache collection and `update_xs=False` do);
- `update_xs`: `stackedtree.scan_layers(..., xs=caches, update_xs=True)`;
- `in_place`: the floor, written by hand: the stacked caches in the scan's carry, each
  layer's slice read with `dynamic_index_in_dim` and written back with
  `dynamic_update_index_in_dim`.

For two cache sizes it reports XLA's temporary memory of the step
(`memory_analysis().temp_size_in_bytes`) as a multiple of the caches' bytes, whether
the output aliases the donated caches (`alias_size_in_bytes`), and the step time
(medians of steps run alternately in one process) as a ratio to `in_place`. The three
are checked equal (bit for bit) before anything is timed.

Run `python benchmarks/bench_decode.py [--quick] [--json PATH] [--device-label LABEL]`.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from _hlo import temp_bytes
from _report import dig, finish, fmt, ms, parser, start, table
from _timing import interleaved_steps, paired_ratio, summary

from stackedtree import scan_layers


class Size(NamedTuple):
    layers: int
    batch: int
    positions: int
    heads: int
    head_dim: int


# The cache (16 layers, batch 4, 2,048 positions, 8 heads of 64: 537 MB of
# float32) and one a quarter of it.
FULL = [Size(16, 4, 512, 8, 64), Size(16, 4, 2048, 8, 64)]
QUICK = [Size(4, 1, 16, 2, 8), Size(4, 1, 64, 2, 8)]


def setup(size: Size, seed: int = 0) -> tuple[Any, Any, jax.Array]:
    """Per-layer projections, KV caches with some history, and one token's state."""
    n, b, t, h, d = size
    width = h * d
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "qkv": jax.random.normal(k1, (n, width, 3 * width)) / np.sqrt(width),
        "out": jax.random.normal(k2, (n, width, width)) / np.sqrt(width),
    }
    cache = {
        "k": jax.random.normal(k3, (n, b, t, h, d)) * 0.1,
        "v": jnp.full((n, b, t, h, d), 0.01),
    }
    x = jnp.ones((b, width)) * 0.1
    return params, cache, x


def attend(x: jax.Array, p: Any, c: Any, pos: jax.Array) -> tuple[jax.Array, Any]:
    """One layer of one-token decoding: writes position `pos` of its cache, attends."""
    b, _, h, d = c["k"].shape
    q, k, v = jnp.split(x @ p["qkv"], 3, axis=-1)
    keys = jax.lax.dynamic_update_index_in_dim(c["k"], k.reshape(b, h, d), pos, 1)
    values = jax.lax.dynamic_update_index_in_dim(c["v"], v.reshape(b, h, d), pos, 1)
    scores = jnp.einsum("bhd,bthd->bht", q.reshape(b, h, d), keys) / np.sqrt(d)
    mask = jnp.arange(keys.shape[1])[None, None, :] <= pos
    weights = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    out = jnp.einsum("bht,bthd->bhd", weights, values).reshape(b, h * d)
    return x + out @ p["out"], {"k": keys, "v": values}


def xs_ys(params: Any, cache: Any, x: jax.Array, pos: jax.Array) -> Any:
    def body(x: jax.Array, layer: Any) -> tuple[jax.Array, Any]:
        p, c = layer
        return attend(x, p, c, pos)

    return jax.lax.scan(body, x, (params, cache))


def update_xs(params: Any, cache: Any, x: jax.Array, pos: jax.Array) -> Any:
    def fn(x: jax.Array, p: Any, c: Any) -> tuple[jax.Array, Any]:
        return attend(x, p, c, pos)

    return scan_layers(fn, x, params, xs=cache, update_xs=True)


def in_place(params: Any, cache: Any, x: jax.Array, pos: jax.Array) -> Any:
    n = jax.tree.leaves(params)[0].shape[0]

    def body(state: Any, layer: Any) -> tuple[Any, None]:
        (x, cache), (p, i) = state, layer
        c = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), cache)
        x, c = attend(x, p, c, pos)
        cache = jax.tree.map(
            lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, i, 0), cache, c
        )
        return (x, cache), None

    return jax.lax.scan(body, (x, cache), (params, jnp.arange(n)))[0]


VARIANTS = {"xs_ys": xs_ys, "update_xs": update_xs, "in_place": in_place}


def check_equal(size: Size) -> bool:
    """The three give the same state and caches, bit for bit (without donation)."""
    params, cache, x = setup(size)
    pos = jnp.int32(size.positions // 2)
    outs = {name: jax.jit(f)(params, cache, x, pos) for name, f in VARIANTS.items()}
    ref = jax.tree.leaves(outs["in_place"])
    return all(
        all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(o), ref, strict=True))
        for o in outs.values()
    )


def measure(size: Size, repeats: int) -> dict[str, Any]:
    """Memory of each compiled step, then step times run alternately."""
    params, cache, x = setup(size)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(cache))
    out: dict[str, Any] = {"size": size._asdict(), "cache_bytes": nbytes}
    steps, state = {}, {}
    for name, f in VARIANTS.items():
        step = jax.jit(f, donate_argnums=1)
        compiled = step.lower(params, cache, x, jnp.int32(0)).compile()
        memory = compiled.memory_analysis()
        out[name] = {
            "temp_bytes": temp_bytes(compiled),
            "temp_x_cache": temp_bytes(compiled) / nbytes,
            "alias_bytes": None if memory is None else memory.alias_size_in_bytes,
        }
        steps[name] = compiled
        state[name] = jax.tree.map(jnp.copy, cache)
    del cache

    def run(name: str) -> Any:
        def go() -> Any:
            pos = jnp.int32(len(times[name]) % size.positions)
            _, state[name] = steps[name](params, state[name], x, pos)
            return state[name]

        return go

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    times = interleaved_steps({name: run(name) for name in VARIANTS}, repeats)
    for name in VARIANTS:
        out[name]["step"] = summary(times[name])
        out[name]["vs_in_place"] = paired_ratio(times[name], times["in_place"])
    return out


def headline(results: dict[str, Any]) -> list[tuple[str, str]]:
    last = (results.get("results") or [{}])[-1]
    if not last:
        return []
    mib = last["cache_bytes"] / 2**20
    return [
        (
            f"decode step, {mib:.0f} MiB KV cache: temporary memory, update_xs vs xs/ys",
            f"{fmt(dig(last, 'update_xs', 'temp_x_cache'))}x vs "
            f"{fmt(dig(last, 'xs_ys', 'temp_x_cache'))}x the cache",
        ),
        (
            f"decode step, {mib:.0f} MiB KV cache: time of update_xs / in-place floor",
            fmt(dig(last, "update_xs", "vs_in_place", "median_ratio")),
        ),
    ]


def report(results: dict[str, Any]) -> str:
    """The markdown section for these results (heading `###`)."""
    rows = []
    for r in results.get("results") or []:
        s = r["size"]
        label = (
            f"{s['layers']} layers, batch {s['batch']}, {s['positions']} positions, "
            f"{s['heads']}x{s['head_dim']}: {r['cache_bytes'] / 2**20:.0f} MiB"
        )
        for i, name in enumerate(VARIANTS):
            v = r[name]
            rows.append(
                [
                    label if i == 0 else "",
                    name,
                    fmt(v["temp_x_cache"]),
                    "yes" if v["alias_bytes"] == r["cache_bytes"] else "no",
                    fmt(ms(dig(v, "step", "median_s"))),
                    fmt(dig(v, "vs_in_place", "median_ratio")),
                ]
            )
    return "\n".join(
        [
            "### Decoding with per-layer KV caches",
            "",
            "One token through a stack of attention layers, each rewriting its KV "
            "cache, jitted with the caches donated: the xs/ys `lax.scan`, "
            "`scan_layers(update_xs=True)` and the hand-written in-place carry scan "
            f"(the floor). Equal bit for bit: {results.get('equal')}. Medians of "
            f"{results.get('repeats')} steps per variant, run alternately.",
            "",
            table(
                [
                    "caches",
                    "step",
                    "temp memory (x caches)",
                    "output aliases caches",
                    "step (ms)",
                    "time / in-place",
                ],
                rows,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args, machine, t_start = start(parser(__doc__), argv)
    sizes, repeats = (QUICK, 3) if args.quick else (FULL, 15)
    equal = all(check_equal(size) for size in sizes[:1])
    results = [measure(size, repeats) for size in sizes]
    payload = {
        "benchmark": "bench_decode",
        "quick": args.quick,
        "machine": machine,
        "repeats": repeats,
        "equal": equal,
        "results": results,
        "wall_s": time.perf_counter() - t_start,
    }
    finish(args, payload, report)
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
