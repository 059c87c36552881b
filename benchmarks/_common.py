"""Shared helpers for the benchmarks: timing, machine description, the two models.

Not a public module: the benchmark scripts import it by putting this folder on
`sys.path` (they are run as plain scripts, `python benchmarks/bench_scan.py`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))

if "--quick" in sys.argv[1:]:
    # A smoke run checks that everything runs, not how fast: cheaper XLA compiles.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from llama_model import Config, DecoderBlock, decoder_block, init_block  # noqa: E402

import stackedtree  # noqa: E402

# --------------------------------------------------------------------------------------
# Command line and output


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes; a script adds its own to it."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes: a CI smoke run, not a measurement",
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument(
        "--device-label",
        metavar="LABEL",
        help="name for the device in the results (default: jax.devices()[0].device_kind)",
    )
    return p


def start(
    p: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, dict[str, Any], float]:
    """Parses a script's arguments and logs the machine: `(args, machine, start time)`."""
    args = p.parse_args(argv)
    machine = machine_info(args.device_label)
    log("machine:", machine_line(machine))
    return args, machine, time.perf_counter()


def finish(
    args: argparse.Namespace,
    results: dict[str, Any],
    report: Callable[[dict[str, Any]], str],
) -> None:
    """Writes the results (`--json`) and prints the script's report of them."""
    write_json(args.json, results)
    log("")
    log(report(results))
    if "wall_s" in results:
        log(f"\ndone in {results['wall_s']:.0f}s")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def log(*args: Any) -> None:
    print(*args, flush=True)


def dig(d: Any, *keys: Any) -> Any:
    """`d[k0][k1]...`, or None when a key is absent (results of older runs lack some)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ratio(a: Any, b: Any) -> float | None:
    """`a / b`, or None when either is missing or `b` is zero."""
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    return a / b


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; numbers get 3 significant digits and are right-aligned.

    Published tables must fit the docs' content column: about 80 characters of text in
    a row, so few columns, short headers with the unit in them.
    """
    numeric = [
        all(isinstance(r[j], int | float) or r[j] is None for r in rows) and rows
        for j in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "".join("---:|" if num else "---|" for num in numeric),
    ]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: Any, digits: int = 3) -> str:
    """A cell or a figure in text: 3 significant digits, `n/a` for a missing value."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int) or not isinstance(x, float):
        return str(x)
    if x == 0 or abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    text = f"{x:#.{digits}g}"
    return f"{x:.{digits - 1}e}" if "e" in text else text.rstrip(".")


def mb(b: Any) -> float | None:
    """Bytes as MB (10^6), for tables."""
    return b / 1e6 if isinstance(b, int | float) else None


def ms(s: Any) -> float | None:
    """Seconds as milliseconds, for tables."""
    return s * 1e3 if isinstance(s, int | float) else None


# --------------------------------------------------------------------------------------
# Machine and versions


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(label: str | None = None) -> dict[str, Any]:
    """What produced a result: hardware, software versions, date and JAX device."""
    dev = jax.devices()[0]
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count()
    mem = _memory_bytes()
    return {
        "device_label": label or dev.device_kind,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": cpus_usable,
        "memory_gb": round(mem / 2**30, 1) if mem else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "numpy": np.__version__,
        "flax": _version("flax"),
        "dm-haiku": _version("dm-haiku"),
        "equinox": _version("equinox"),
        "stackedtree": getattr(stackedtree, "__version__", None),
        "git": _git_commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "jax_backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
    }


def machine_line(m: dict[str, Any]) -> str:
    """One line naming the machine, the versions and the date; fields not known are left out.

    A results file states it once, at its top.
    """
    host = ", ".join(
        x
        for x in (
            m.get("processor"),
            m.get("cpu_count_usable") and f"{m['cpu_count_usable']} CPUs",
            m.get("memory_gb") and f"{m['memory_gb']} GB",
        )
        if x
    )
    label, backend = m.get("device_label"), m.get("jax_backend")
    device = host if label in (None, "cpu") else f"{label} ({backend}), host {host}"
    versions = [
        f"{name} {m[key]}"
        for name, key in (
            ("python", "python"),
            ("jax", "jax"),
            ("jaxlib", "jaxlib"),
            ("numpy", "numpy"),
            ("flax", "flax"),
            ("haiku", "dm-haiku"),
            ("equinox", "equinox"),
            ("stackedtree", "stackedtree"),
        )
        if m.get(key)
    ]
    if m.get("git") and m.get("stackedtree"):
        versions[-1] += f" ({m['git']})"
    return "; ".join(x for x in (device, ", ".join(versions), m.get("date")) if x)


def title(m: dict[str, Any]) -> str:
    """What a results file is about, as a heading: `CPU`, `GPU: NVIDIA H100 ...`."""
    backend = m.get("jax_backend") or "cpu"
    label = m.get("device_label")
    if backend == "cpu" and label in (None, "cpu"):
        return "CPU"
    return f"{backend.upper()}: {label}" if label else backend.upper()


# --------------------------------------------------------------------------------------
# Timing


def strip_hlo(text: str) -> str:
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


def hf_llama_names(
    d: int, f: int, vocab: int, n: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face Llama tensor names and shapes (`nn.Linear` weights are `(out, in)`),
    for the checkpoint benchmarks."""
    specs: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (vocab, d))
    ]
    for i in range(n):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (d, d)),
            (p + "self_attn.v_proj.weight", (d, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
        ]
    specs += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    return specs


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


# --------------------------------------------------------------------------------------
# The Llama-style decoder (examples/llama_model.py) at a size that runs fast on a CPU

LLAMA_SMALL = Config(
    d_model=128, kv_heads=4, q_per_kv=2, head_dim=16, d_ff=256, num_layers=8, vocab=256
)
LLAMA_BATCH, LLAMA_SEQ = 4, 64
LLAMA_QUICK = Config(
    d_model=32, kv_heads=2, q_per_kv=2, head_dim=8, d_ff=64, num_layers=2, vocab=64
)
LLAMA_QUICK_BATCH, LLAMA_QUICK_SEQ = 2, 16


def llama_setup(
    n: int, quick: bool = False, seed: int = 0
) -> tuple[Config, DecoderBlock, jax.Array]:
    """`(cfg, stacked params with leading axis n, input x)`; the same for every variant."""
    cfg = (LLAMA_QUICK if quick else LLAMA_SMALL)._replace(num_layers=n)
    batch, seq = (
        (LLAMA_QUICK_BATCH, LLAMA_QUICK_SEQ) if quick else (LLAMA_BATCH, LLAMA_SEQ)
    )
    k_params, k_x = jax.random.split(jax.random.key(seed))
    params = stackedtree.init_stacked(lambda k: init_block(k, cfg), k_params, n)
    x = jax.random.normal(k_x, (batch, seq, cfg.d_model), jnp.float32)
    return cfg, params, x


def llama_loss_value(y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(y))


def llama_python_loop(cfg: Config) -> Callable[[DecoderBlock, jax.Array], jax.Array]:
    """Loss via a Python loop over layers: the graph grows with N."""

    def loss(params: DecoderBlock, x: jax.Array) -> jax.Array:
        for i in range(cfg.num_layers):
            x = decoder_block(jax.tree.map(lambda a, i=i: a[i], params), x, cfg)
        return llama_loss_value(x)

    return loss


def llama_lax_scan(cfg: Config) -> Callable[[DecoderBlock, jax.Array], jax.Array]:
    """Loss via a hand-written `jax.lax.scan`, the scan tutorial's style."""

    def loss(params: DecoderBlock, x: jax.Array) -> jax.Array:
        def inner(x: jax.Array, input_: DecoderBlock) -> tuple[jax.Array, None]:
            return decoder_block(input_, x, cfg), None

        x, _ = jax.lax.scan(inner, x, params)
        return llama_loss_value(x)

    return loss


def llama_scan_layers(cfg: Config) -> Callable[[DecoderBlock, jax.Array], jax.Array]:
    """Loss via `stackedtree.scan_layers`."""

    def loss(params: DecoderBlock, x: jax.Array) -> jax.Array:
        def layer(x: jax.Array, input_: DecoderBlock) -> tuple[jax.Array, None]:
            return decoder_block(input_, x, cfg), None

        x, _ = stackedtree.scan_layers(layer, x, params)
        return llama_loss_value(x)

    return loss


def grad_of(loss: Callable[..., jax.Array]) -> Callable[..., Any]:
    """Gradient w.r.t. the first argument (the parameters)."""
    return jax.grad(loss)


def llama_model(quick: bool) -> dict[str, Any]:
    """The decoder's size, as recorded in the results."""
    cfg = (LLAMA_QUICK if quick else LLAMA_SMALL)._asdict()
    cfg.pop("num_layers")
    batch, seq = (
        (LLAMA_QUICK_BATCH, LLAMA_QUICK_SEQ) if quick else (LLAMA_BATCH, LLAMA_SEQ)
    )
    return {
        "config": cfg,
        "batch": batch,
        "seq": seq,
        "dtype": "float32",
        "loss": "mean(decoder(x) ** 2), gradient w.r.t. the parameters",
    }


def llama_text(model: dict[str, Any]) -> str:
    """`llama_model(...)` as a sentence for a report."""
    c = model.get("config") or {}
    heads = ""
    if {"kv_heads", "q_per_kv", "head_dim"} <= c.keys():
        heads = (
            f", {c['kv_heads'] * c['q_per_kv']} query and {c['kv_heads']} KV heads "
            f"of {c['head_dim']}"
        )
    return (
        f"Llama-style decoder of `examples/llama_model.py` (d_model {c.get('d_model')}"
        f"{heads}, d_ff {c.get('d_ff')}), batch {model.get('batch')}, sequence "
        f"{model.get('seq')}, {model.get('dtype')}; loss {model.get('loss')}."
    )


# --------------------------------------------------------------------------------------
# The activation-heavy model: a large carry, small layers


class Dense2(NamedTuple):
    w1: jax.Array  # (width, width)
    w2: jax.Array  # (width, width)


HEAVY_ROWS, HEAVY_WIDTH = 1024, 256
HEAVY_QUICK_ROWS, HEAVY_QUICK_WIDTH = 64, 32


def heavy_layer(x: jax.Array, p: Dense2) -> jax.Array:
    """Two matmuls with a tanh between and a residual: activations dominate memory."""
    return x + jnp.tanh(x @ p.w1) @ p.w2


def heavy_setup(n: int, quick: bool = False, seed: int = 0) -> tuple[Dense2, jax.Array]:
    rows, width = (
        (HEAVY_QUICK_ROWS, HEAVY_QUICK_WIDTH) if quick else (HEAVY_ROWS, HEAVY_WIDTH)
    )
    k_params, k_x = jax.random.split(jax.random.key(seed))

    def init(k: jax.Array) -> Dense2:
        k1, k2 = jax.random.split(k)
        scale = 1.0 / np.sqrt(width)
        return Dense2(
            jax.random.normal(k1, (width, width)) * scale,
            0.1 * jax.random.normal(k2, (width, width)) * scale,
        )

    params = stackedtree.init_stacked(init, k_params, n)
    x = jax.random.normal(k_x, (rows, width), jnp.float32)
    return params, x


def heavy_model(quick: bool) -> dict[str, Any]:
    """The activation-heavy model's size, as recorded in the results."""
    rows, width = (
        (HEAVY_QUICK_ROWS, HEAVY_QUICK_WIDTH) if quick else (HEAVY_ROWS, HEAVY_WIDTH)
    )
    return {
        "carry": [rows, width],
        "dtype": "float32",
        "layer": f"x + tanh(x @ w1) @ w2, w1 and w2 ({width}, {width})",
    }


def heavy_text(model: dict[str, Any]) -> str:
    """`heavy_model(...)` as a sentence for a report."""
    rows, width = model.get("carry") or ("?", "?")
    return (
        f"Activation-heavy model: layer `{model.get('layer')}`, carry {rows} x {width} "
        f"{model.get('dtype')}."
    )


def heavy_scan_loss(
    remat: Any = False, remat_group: Any = None
) -> Callable[[Dense2, jax.Array], jax.Array]:
    """Loss of the heavy model through `scan_layers` with the given remat options."""

    def loss(params: Dense2, x: jax.Array) -> jax.Array:
        def layer(x: jax.Array, p: Dense2) -> tuple[jax.Array, None]:
            return heavy_layer(x, p), None

        x, _ = stackedtree.scan_layers(
            layer, x, params, remat=remat, remat_group=remat_group
        )
        return jnp.mean(jnp.square(x))

    return loss


def temp_bytes(compiled: Any) -> int | None:
    """XLA's temporary buffer size for a compiled computation (None if not reported)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes)


# --------------------------------------------------------------------------------------
# Plots


class Plot(NamedTuple):
    """A figure a script publishes: saved as `name.png` (`name_TAG.png` with a tag)."""

    name: str
    alt: str
    figure: Any


# The docs' content column is about 690 px wide and shows a figure at 100 dpi: a figure
# this many inches wide keeps its text at the size asked for. Saved at 200 dpi (sharp on
# dense screens), it is scaled down to the column, text and all.
FIGSIZE = (6.9, 4.0)
SAVE_DPI = 200


def pyplot() -> Any:
    """`matplotlib.pyplot` drawing off-screen with 9-point text, or None without it."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.labelsize": 9,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "legend.fontsize": 9,
        }
    )
    return plt


def plot_where(m: dict[str, Any]) -> str:
    """The machine in a plot's title: `CPU, jax 0.10.2`."""
    return f"{title(m)}, jax {m.get('jax')}"
