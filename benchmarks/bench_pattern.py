"""scan_pattern against a Python loop and a hand-written super-block scan.

On the Gemma-3-like decoder of `examples/gemma_pattern.py` (local and global attention
layers sharing one parameter stack, pattern `"LLLLLG"` repeated and cut at N):

(a) compile time (trace + lower + XLA compile) of `jax.grad` of a loss through N layers
    at N = 26, 62 and 122, for a Python loop over the layers, `scan_pattern`, and the
    MaxText-style super-block scan written by hand (a `jax.lax.scan` over the k whole
    periods whose body applies the period's six layers in order, then the remaining
    layers one by one). The two scans are compiled alternately, several times each;
    the loop once per N (it is slow and grows with N). Also whether XLA's optimised
    HLO of the two scans is identical.
(b) step time of the jitted gradient at N = 62 (Gemma 3 27B's depth), `scan_pattern`
    against the super-block scan, the two run alternately.

Every variant's loss and gradient are checked against the loop's before anything is
timed. Ratios are of medians of interleaved repeats in one process.

Run `python benchmarks/bench_pattern.py [--quick] [--json PATH]`.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import _env  # noqa: F401  (before jax: examples/ on the path, --quick flags)
import gemma_pattern as gemma
import jax
import jax.numpy as jnp
import numpy as np
from _hlo import strip_hlo
from _report import finish, log, parser, start
from _timing import paired_ratio, summary

import stackedtree

PERIOD = "LLLLLG"
FULL = gemma.Config(vocab=256, d_model=128, heads=4, head_dim=32, d_ff=256, window=16)
QUICK = gemma.Config(vocab=64, d_model=32, heads=2, head_dim=16, d_ff=64, window=4)
BATCH, SEQ = 4, 64
QUICK_BATCH, QUICK_SEQ = 2, 16

Loss = Callable[[dict[str, Any], jax.Array], jax.Array]
Layers = Callable[[jax.Array, Any], jax.Array]

# ----------------------------------------------------------------------- the variants


def make_loss(
    cfg: gemma.Config, run_layers: Callable[[dict, jax.Array, Any], Any]
) -> Loss:
    """Next-token loss of the decoder whose layers run as `run_layers(fns, x, layers)`.

    Each call builds fresh layer functions, so no trace cache is shared between two
    compilations being timed.
    """

    def loss(params: dict[str, Any], tokens: jax.Array) -> jax.Array:
        fns = gemma.layer_fns(cfg)
        x = params["embed"][tokens[:, :-1]] * np.sqrt(cfg.d_model)
        x = run_layers(fns, x, params["layers"])
        x = gemma.rms_norm(x, params["final_norm"], cfg.eps)
        logp = jax.nn.log_softmax(x @ params["embed"].T, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return loss


def python_loop(cfg: gemma.Config) -> Loss:
    """Every layer written out: the compiled program grows with N."""
    pattern = gemma.gemma_pattern(cfg.num_layers)

    def run(fns: dict, x: jax.Array, layers: Any) -> jax.Array:
        for i, kind in enumerate(pattern):
            x, _ = fns[kind](x, jax.tree.map(lambda a, i=i: a[i], layers))
        return x

    return make_loss(cfg, run)


def super_block(cfg: gemma.Config) -> Loss:
    """MaxText's way, by hand: one `lax.scan` over the whole periods, whose body applies
    the period's layers in order, then the remaining layers one by one."""
    n = cfg.num_layers
    p = len(PERIOD)
    k = n // p
    main = k * p
    pattern = gemma.gemma_pattern(n)

    def run(fns: dict, x: jax.Array, layers: Any) -> jax.Array:
        blocks = jax.tree.map(lambda a: a[:main].reshape(k, p, *a.shape[1:]), layers)

        def body(x: jax.Array, block: Any) -> tuple[jax.Array, None]:
            for t, kind in enumerate(PERIOD):
                x, _ = fns[kind](x, jax.tree.map(lambda a, t=t: a[t], block))
            return x, None

        x, _ = jax.lax.scan(body, x, blocks)
        for i in range(main, n):
            x, _ = fns[pattern[i]](x, jax.tree.map(lambda a, i=i: a[i], layers))
        return x

    return make_loss(cfg, run)


def scan_pattern(cfg: gemma.Config) -> Loss:
    pattern = gemma.gemma_pattern(cfg.num_layers)

    def run(fns: dict, x: jax.Array, layers: Any) -> jax.Array:
        return stackedtree.scan_pattern(fns, x, layers, pattern)[0]

    return make_loss(cfg, run)


VARIANTS: dict[str, Callable[[gemma.Config], Loss]] = {
    "python_loop": python_loop,
    "super_block": super_block,
    "scan_pattern": scan_pattern,
}


def setup(n: int, quick: bool) -> tuple[gemma.Config, dict[str, Any], jax.Array]:
    cfg = (QUICK if quick else FULL)._replace(num_layers=n)
    batch, seq = (QUICK_BATCH, QUICK_SEQ) if quick else (BATCH, SEQ)
    params = gemma.init_model(jax.random.key(0), cfg)
    tokens = gemma.make_batch(jax.random.key(1), cfg, batch=batch, seq=seq + 1)
    return cfg, params, tokens


# ----------------------------------------------------------------------- timing


def compile_seconds(
    make: Callable[[], Callable[..., Any]], *args: Any
) -> tuple[dict[str, float], Any]:
    """Seconds to trace + lower and to compile `jax.jit(make())`, and the executable.

    `make` builds a fresh function (new closures), so no trace cache is reused.
    `cpu_s` is this process's CPU time for both: unlike wall time, it barely moves
    when other processes load a shared machine (XLA compiles on several threads, so
    it exceeds the wall time on a quiet one).
    """
    fn = make()
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    times = {"total_s": t2 - t0, "lower_s": t1 - t0, "cpu_s": c2 - c0}
    return times, compiled


def interleaved(
    run: Callable[[Any], float], names: Sequence[Any], repeats: int
) -> dict[Any, list[float]]:
    """`run(name)` for each name in turn, `repeats` rounds, the order rotated each round
    so drifts of a shared machine hit every variant alike."""
    out: dict[Any, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = list(names[r % len(names) :]) + list(names[: r % len(names)])
        for name in order:
            out[name].append(run(name))
    return out


def step_seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


# ----------------------------------------------------------------------- measurements


def check_equal(n: int, quick: bool) -> dict[str, Any]:
    """Every variant gives the loop's loss and gradient (at full matmul precision)."""
    cfg, params, tokens = setup(n, quick)
    out = {}
    with jax.default_matmul_precision("highest"):
        for name, make in VARIANTS.items():
            loss, grads = jax.jit(jax.value_and_grad(make(cfg)))(params, tokens)
            out[name] = (float(loss), grads)
    want_loss, want_grads = out["python_loop"]
    for name, (loss, grads) in out.items():
        err = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(
                jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True
            )
        )
        log(f"  {name:12s} loss {loss:.6f}  max |grad - loop's| {err:.1e}")
        if not np.isclose(loss, want_loss, rtol=1e-5) or err > 1e-4:
            raise AssertionError(f"{name} disagrees with the loop; not timing it")
    return {"n": n, "losses": {k: v[0] for k, v in out.items()}, "all_equal": True}


def compile_vs_n(
    ns: list[int], quick: bool, repeats: int
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """(a) gradient compile seconds against N; also the scans' last executables.

    The two scans at every N are compiled in one interleaved sequence (each round
    compiles all of them, in a rotated order), so drifts of the machine's load hit
    every N alike and compile times at different N can be compared; the loop is
    compiled once per N afterwards.
    """
    scans = ["super_block", "scan_pattern"]
    setups = {n: setup(n, quick) for n in ns}
    compiled: dict[tuple[str, int], Any] = {}
    times: dict[tuple[str, int], list[dict[str, float]]] = {}

    def timed(job: tuple[str, int]) -> float:
        name, n = job
        cfg, params, tokens = setups[n]
        make = VARIANTS[name]
        took, compiled[job] = compile_seconds(
            lambda: jax.grad(make(cfg)), params, tokens
        )
        times.setdefault(job, []).append(took)
        return took["total_s"]

    interleaved(timed, [(name, n) for n in ns for name in scans], repeats)
    for n in ns:
        timed(("python_loop", n))
        compiled.pop(("python_loop", n))

    def series(name: str, n: int, key: str) -> list[float]:
        return [t[key] for t in times[(name, n)]]

    keys = ("total_s", "lower_s", "cpu_s")
    seconds = {
        name: {str(n): {key: summary(series(name, n, key)) for key in keys} for n in ns}
        for name in VARIANTS
    }
    ratios = {
        str(n): {
            key: paired_ratio(
                series("scan_pattern", n, key), series("super_block", n, key)
            )
            for key in keys
        }
        for n in ns
    }
    same_hlo = {
        str(n): strip_hlo(compiled[("super_block", n)].as_text())
        == strip_hlo(compiled[("scan_pattern", n)].as_text())
        for n in ns
    }
    for n in ns:
        med = {k: seconds[k][str(n)]["total_s"]["median_s"] for k in VARIANTS}
        r = ratios[str(n)]
        log(
            f"  N={n:3d}  compile of grad (median s): "
            + "  ".join(f"{k} {v:.2f}" for k, v in med.items())
            + f"; scan_pattern/super_block wall {r['total_s']['median_ratio']:.3f}, "
            f"cpu {r['cpu_s']['median_ratio']:.3f}, trace+lower "
            f"{r['lower_s']['median_ratio']:.3f}; "
            f"same optimised HLO: {same_hlo[str(n)]}"
        )
    out = {
        "ns": ns,
        "repeats": repeats,
        "seconds": seconds,
        "ratio": ratios,
        "optimized_hlo_identical": same_hlo,
    }
    executables = {n: {name: compiled[(name, n)] for name in scans} for n in ns}
    return out, executables


def step_time(
    n: int, quick: bool, repeats: int, compiled: dict[str, Any] | None = None
) -> dict[str, Any]:
    """(b) step seconds of the jitted gradient, scan_pattern against the super-block
    (`compiled`: their executables at this N, when (a) made them)."""
    cfg, params, tokens = setup(n, quick)
    if compiled is None:
        compiled = {
            name: compile_seconds(
                lambda make=VARIANTS[name]: jax.grad(make(cfg)), params, tokens
            )[1]
            for name in ("super_block", "scan_pattern")
        }
    for c in compiled.values():  # warm up
        for _ in range(2):
            jax.block_until_ready(c(params, tokens))
    gc.collect()
    gc.disable()
    try:
        steps = interleaved(
            lambda name: step_seconds(lambda: compiled[name](params, tokens)),
            list(compiled),
            repeats,
        )
    finally:
        gc.enable()
    out = {
        "n": n,
        "repeats": repeats,
        "seconds": {k: summary(v) for k, v in steps.items()},
        "ratio": paired_ratio(steps["scan_pattern"], steps["super_block"]),
    }
    log(
        f"  N={n}: step scan_pattern/super_block {out['ratio']['median_ratio']:.3f} "
        f"(medians {statistics.median(steps['scan_pattern']) * 1e3:.1f} ms / "
        f"{statistics.median(steps['super_block']) * 1e3:.1f} ms, {repeats} each)"
    )
    return out


# ----------------------------------------------------------------------- report


def headline(results: dict[str, Any]) -> list[tuple[str, float | None]]:
    """Compile time at the deepest N and step time, against the super-block scan."""
    a, b = results["compile_vs_n"], results["step"]
    n = str(a["ns"][-1])
    return [
        (
            f"scan_pattern / super-block scan, gradient compile time, N={n}",
            a["ratio"][n]["total_s"]["median_ratio"],
        ),
        (
            f"scan_pattern / super-block scan, gradient step time, N={b['n']}",
            b["ratio"]["median_ratio"],
        ),
    ]


def report(results: dict[str, Any]) -> str:
    """The markdown section of this benchmark."""
    a, b = results["compile_vs_n"], results["step"]
    model = results["model"]
    first = str(a["ns"][0])

    def median(name: str, n: str, key: str = "total_s") -> float:
        return a["seconds"][name][n][key]["median_s"]

    lines = [
        "### Layer patterns: `scan_pattern`",
        "",
        f"A Gemma-3-like decoder (`examples/gemma_pattern.py`, d_model "
        f"{model['d_model']}, {model['heads']} heads, batch {model['batch']}, seq "
        f'{model["seq"]}, float32; layers `"LLLLLG"` repeated, cut at N) run by '
        "a Python loop, by `scan_pattern`, and by the hand-written super-block "
        "scan (*block*: a `lax.scan` over the whole periods, six layers applied in "
        "order inside, then the remaining layers). Compile time of the gradient "
        "(trace + lower + XLA compile, wall clock; medians of "
        f"{a['repeats']} alternating compiles of the two scans, one of the loop):",
        "",
        f"| N | loop / block | pattern / block | pattern / pattern at N={first} "
        "| same HLO |",
        "|---:|---:|---:|---:|:---:|",
    ]
    for n in map(str, a["ns"]):
        block = median("super_block", n)
        lines.append(
            f"| {n} | {median('python_loop', n) / block:.2f} "
            f"| {a['ratio'][n]['total_s']['median_ratio']:.3f} "
            f"| {median('scan_pattern', n) / median('scan_pattern', first):.2f} "
            f"| {'yes' if a['optimized_hlo_identical'][n] else 'no'} |"
        )
    cpu = ", ".join(
        f"{a['ratio'][n]['cpu_s']['median_ratio']:.3f}" for n in map(str, a["ns"])
    )
    lines += [
        "",
        "*same HLO*: whether XLA's optimised program of `scan_pattern` is the "
        "super-block's, op for op. In process CPU time, which other load on the "
        f"machine disturbs less, pattern / block is {cpu} at these N.",
        "",
        f"Step time of the jitted gradient at N = {b['n']}, pattern / block: "
        f"**{b['ratio']['median_ratio']:.3f}** (ratio of the medians of "
        f"{b['repeats']} alternating steps each; median of the per-round ratios "
        f"{b['ratio']['paired_median_ratio']:.3f}, ratio of the fastest steps "
        f"{b['ratio']['min_ratio']:.3f}).",
    ]
    if results.get("quick"):
        lines += [
            "",
            "(`--quick`: tiny sizes and cheap compiles; the numbers mean nothing.)",
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args, machine, t_start = start(parser(__doc__), argv)
    q = args.quick
    log("checking the loop, the super-block scan and scan_pattern agree")
    check = check_equal(12 if q else 26, q)
    log("(a) compile time of the gradient against N")
    a, executables = compile_vs_n(
        [12] if q else [26, 62, 122], q, repeats=1 if q else 7
    )
    log("(b) step time of the gradient")
    step_n = 12 if q else 62
    b = step_time(step_n, q, repeats=3 if q else 30, compiled=executables.get(step_n))

    cfg = QUICK if q else FULL
    results = {
        "benchmark": "bench_pattern",
        "quick": q,
        "machine": machine,
        "model": {
            **{
                f: getattr(cfg, f)
                for f in ("d_model", "heads", "head_dim", "d_ff", "window")
            },
            "batch": QUICK_BATCH if q else BATCH,
            "seq": QUICK_SEQ if q else SEQ,
        },
        "equality_check": check,
        "compile_vs_n": a,
        "step": b,
        "headline": {
            "scan_pattern_over_super_block_compile": {
                n: r["total_s"]["median_ratio"] for n, r in a["ratio"].items()
            },
            "scan_pattern_over_super_block_step": b["ratio"]["median_ratio"],
        },
        "wall_s": time.perf_counter() - t_start,
    }
    finish(args, results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
