"""Run every benchmark and publish one results file, one markdown report and the plots.

    python benchmarks/run_all.py                 # full size: results.json, results.md, *.png
    python benchmarks/run_all.py --quick         # CI smoke run (numbers mean nothing)
    python benchmarks/run_all.py --tag gpu --out benchmarks/   # results_gpu.json, ...

Each benchmark runs as its own subprocess with `--json`, so one that crashes is reported
by name (with the end of its output) and makes this command exit non-zero, while the
others still run and are published.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any

import _common as C

BENCHMARKS = [
    "bench_stack",
    "bench_convert",
    "bench_scan",
    "bench_peers",
    "bench_memory",
]
PEER_LABELS = {
    "python_loop": "Python loop",
    "lax_scan": "jax.lax.scan (by hand)",
    "scan_layers": "stackedtree.scan_layers",
    "haiku_layer_stack": "Haiku hk.layer_stack",
    "flax_linen_scan": "Flax linen nn.scan",
    "flax_nnx_scan": "Flax NNX nnx.scan",
    "equinox_scan": "Equinox partition + lax.scan",
}


def dig(d: Any, *keys: Any) -> Any:
    """`d[k0][k1]...`, or None when any key is absent (other scripts' JSON may change)."""
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def div(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    return a / b


# --------------------------------------------------------------------------------------
# Running


def run_one(name: str, args: argparse.Namespace, json_path: str) -> dict[str, Any]:
    script = os.path.join(C.HERE, name + ".py")
    entry: dict[str, Any] = {"script": f"benchmarks/{name}.py"}
    if not os.path.exists(script):
        entry.update(status="missing", error=f"benchmarks/{name}.py does not exist")
        C.log(f"== {name}: MISSING ({entry['error']})")
        return entry
    with open(script) as f:
        source = f.read()
    cmd = [sys.executable, script, "--json", json_path]
    if args.quick:
        cmd.append("--quick")
    if name == "bench_convert" and not args.quick:
        cmd += ["--size-gb", str(args.size_gb)]
    if args.device_label and '"--device-label"' in source:
        cmd += ["--device-label", args.device_label]
    entry["command"] = " ".join(["python", f"benchmarks/{name}.py", *cmd[2:]]).replace(
        json_path, "RAW.json"
    )
    C.log(f"== {name}: {entry['command']}")
    tail: deque[str] = deque(maxlen=40)
    t0 = time.perf_counter()
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=C.ROOT
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write("   " + line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
        rc = proc.wait()
    entry["seconds"] = time.perf_counter() - t0
    entry["returncode"] = rc
    data = None
    if os.path.exists(json_path):
        try:
            with open(json_path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            entry["json_error"] = f"{type(e).__name__}: {e}"
    entry["data"] = data
    if rc == 0 and data is not None:
        entry["status"] = "ok"
    else:
        entry["status"] = "failed"
        why = f"exit code {rc}" if rc else "no JSON written"
        entry["error"] = f"{why}; last lines of output:\n" + "\n".join(tail)
    C.log(f"== {name}: {entry['status']} in {entry['seconds']:.0f}s")
    return entry


# --------------------------------------------------------------------------------------
# Headline numbers


def headline(bench: dict[str, dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    """The figures the project's issues ask for; `met` is None in quick (smoke) runs."""
    scan = dig(bench, "bench_scan", "data", "headline") or {}
    stack = dig(bench, "bench_stack", "data", "results") or {}
    conv = dig(bench, "bench_convert", "data", "results") or {}
    mem = dig(bench, "bench_memory", "data", "headline") or {}

    def row(
        measure: str, value: Any, target: str, ok: Any, source: str, note: str = ""
    ) -> dict[str, Any]:
        value = value if isinstance(value, int | float) else None
        met = None if value is None or ok is None or quick else bool(ok(value))
        return {
            "measure": measure,
            "value": value,
            "target": target,
            "met": met,
            "source": source,
            "note": note,
        }

    n_ratio = scan.get("ratio_n", "n/a")
    n_loop = scan.get("loop_compile_n", "n/a")
    n_remat = scan.get("remat_n", "n/a")
    unstack_np = div(
        dig(stack, "unstack_numpy", "per-index slicing", "min_s"),
        dig(stack, "unstack_numpy", "stackedtree.unstack", "min_s"),
    )
    unstack_jax = div(
        dig(stack, "unstack_jax", "per-index slicing", "min_s"),
        dig(stack, "unstack_jax", "stackedtree.unstack", "min_s"),
    )
    in_5pct = lambda v: 0.95 <= v <= 1.05  # noqa: E731
    return [
        row(
            f"scan_layers / lax.scan, gradient compile time (N={n_ratio})",
            scan.get("scan_layers_over_lax_scan_compile"),
            "0.95-1.05",
            in_5pct,
            "bench_scan (b)",
            "median of interleaved repeats",
        ),
        row(
            f"scan_layers / lax.scan, gradient step time (N={n_ratio})",
            scan.get("scan_layers_over_lax_scan_step"),
            "0.95-1.05",
            in_5pct,
            "bench_scan (b)",
            "median of interleaved repeats",
        ),
        row(
            f"Python loop / scan_layers, gradient compile time (N={n_loop})",
            scan.get("loop_over_scan_layers_compile"),
            "> 1 (grows with N)",
            lambda v: v > 1,
            "bench_scan (a)",
        ),
        row(
            f"remat_group='sqrt' / remat=True, backward temp memory (N={n_remat})",
            scan.get("sqrt_over_per_layer_memory"),
            "<= 0.5",
            lambda v: v <= 0.5,
            "bench_scan (c)",
            "XLA temp_size_in_bytes",
        ),
        row(
            f"remat_group='sqrt' / remat=True, gradient step time (N={n_remat})",
            scan.get("sqrt_over_per_layer_step"),
            "<= 1.3",
            lambda v: v <= 1.3,
            "bench_scan (c)",
        ),
        row(
            f"nn.remat_scan / remat=True, backward temp memory (N={mem.get('n', 'n/a')})",
            mem.get("flax_remat_scan_over_per_layer_memory"),
            "(peer)",
            None,
            "bench_memory",
        ),
        row(
            "stackedtree.stack / np.copyto (preallocated), time",
            div(
                dig(stack, "stack", "stackedtree.stack", "min_s"),
                dig(stack, "stack", "np.copyto (preallocated)", "min_s"),
            ),
            "(a copy is the floor)",
            None,
            "bench_stack",
            "min of repeats",
        ),
        row(
            "unstack speedup over per-index slicing, numpy leaves",
            unstack_np,
            "> 1",
            lambda v: v > 1,
            "bench_stack",
            "slicing time / unstack time",
        ),
        row(
            "unstack speedup over per-index slicing, jax leaves",
            unstack_jax,
            "> 1",
            lambda v: v > 1,
            "bench_stack",
            "slicing time / unstack time",
        ),
        row(
            "`stackedtree stack` time / cp",
            dig(conv, "stackedtree stack", "time_vs_cp"),
            "(cp is the floor)",
            None,
            "bench_convert",
        ),
        row(
            "`stackedtree stack` peak RSS / checkpoint size",
            dig(conv, "stackedtree stack", "rss_fraction"),
            "small fraction",
            lambda v: v < 0.5,
            "bench_convert",
        ),
    ]


# --------------------------------------------------------------------------------------
# Markdown


def _mb(b: Any) -> str:
    return "n/a" if not isinstance(b, int | float) else f"{b / 1e6:.1f}"


def _s(x: Any, scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if not isinstance(x, int | float) else C.fmt(x * scale, digits)


def _met(m: Any) -> str:
    return {True: "yes", False: "**no**", None: "-"}[m]


def md_scan(d: dict[str, Any], machine: str) -> list[str]:
    out = [
        "## bench_scan: scan_layers, lax.scan and a Python loop (issue 3)",
        "",
        machine,
        "",
    ]
    model = dig(d, "compile_vs_n", "model") or {}
    out += [
        f"Llama-style decoder `{model.get('config')}`, batch {model.get('batch')}, "
        f"seq {model.get('seq')}, {model.get('dtype')}; {model.get('loss')}.",
        "",
    ]
    a = d.get("compile_vs_n") or {}
    secs = a.get("seconds") or {}
    out += ["### (a) Compile time of `jax.grad` (trace + lower + compile, seconds)", ""]
    names = [k for k in ("python_loop", "lax_scan", "scan_layers") if k in secs]
    rows = [
        [f"N={n}"] + [_s(dig(secs, k, str(n), "best_s")) for k in names]
        for n in a.get("ns", [])
    ]
    out += [
        C.table(["layers"] + [PEER_LABELS.get(k, k) for k in names], rows),
        "",
        "Scans: best of 2 interleaved compiles; loop: one compile.",
        "",
    ]
    b = d.get("scan_layers_vs_lax_scan") or {}
    out += [f"### (b) scan_layers against a hand-written lax.scan (N={b.get('n')})", ""]
    rows = []
    for k in ("scan_layers", "lax_scan"):
        rows.append(
            [
                PEER_LABELS[k],
                _s(dig(b, "compile", k, "median_s")),
                _s(dig(b, "compile", k, "min_s")),
                _s(dig(b, "step", k, "median_s"), 1e3),
                _s(dig(b, "step", k, "min_s"), 1e3),
            ]
        )
    rows.append(
        [
            "ratio scan_layers / lax.scan",
            _s(dig(b, "compile_ratio", "median_ratio"), digits=4),
            _s(dig(b, "compile_ratio", "min_ratio"), digits=4),
            _s(dig(b, "step_ratio", "median_ratio"), digits=4),
            _s(dig(b, "step_ratio", "min_ratio"), digits=4),
        ]
    )
    out += [
        C.table(
            [
                "",
                "compile median (s)",
                "compile min (s)",
                "step median (ms)",
                "step min (ms)",
            ],
            rows,
        ),
        "",
        f"{dig(b, 'compile', 'scan_layers', 'repeats')} compiles and "
        f"{dig(b, 'step', 'scan_layers', 'repeats')} steps of each, alternating. "
        f"Optimised HLO identical (metadata aside): {b.get('optimized_hlo_identical')}.",
        "",
    ]
    c = d.get("remat") or {}
    temp = c.get("temp_bytes") or {}
    out += [
        f"### (c) Backward temporary memory with remat (model: {dig(c, 'model', 'layer')}, "
        f"carry {dig(c, 'model', 'carry')} {dig(c, 'model', 'dtype')})",
        "",
    ]
    names = ["no_remat", "per_layer", "sqrt_group"]
    rows = [
        [f"N={n}"] + [_mb(dig(temp, k, str(n))) for k in names] for n in c.get("ns", [])
    ]
    out += [
        C.table(
            ["layers", "no remat (MB)", "remat=True (MB)", "remat_group='sqrt' (MB)"],
            rows,
        ),
        "",
    ]
    step = c.get("step") or {}
    rows = [[k, _s(dig(step, k, "median_s")), _s(dig(step, k, "min_s"))] for k in names]
    out += [
        f"Gradient step at N={c.get('step_n')} (g={c.get('sqrt_group_size')}), "
        "seconds, alternating:",
        "",
        C.table(["variant", "median (s)", "min (s)"], rows),
        "",
    ]
    return out


def md_peers(d: dict[str, Any], machine: str) -> list[str]:
    model = d.get("model") or {}
    out = [
        "## bench_peers: the same decoder block in seven layer-scanning styles (issue 5)",
        "",
        machine,
        "",
        f"Llama-style decoder `{model.get('config')}`, batch {model.get('batch')}, "
        f"seq {model.get('seq')}, {model.get('dtype')}; {model.get('loss')}. Every "
        "variant holds the same weights; its loss and gradient norm are checked against "
        f"`{d.get('reference')}` at every N before timing (relative tolerances "
        f"{d.get('tolerance')}).",
        "",
    ]
    ns = d.get("ns", [])
    res = d.get("results") or {}
    variants = d.get("variants") or []
    for title, key, scale, unit in (
        (
            "Compile time of `jax.grad` (trace + lower + compile)",
            "grad_compile_s",
            1,
            "s",
        ),
        ("Compile time of the forward", "forward_compile_s", 1, "s"),
        ("Gradient step time (median of interleaved repeats)", "grad_step", 1e3, "ms"),
    ):
        rows = []
        for v in variants:
            cells = []
            for n in ns:
                r = dig(res, str(n), v) or {}
                if "error" in r:
                    cells.append("failed")
                    continue
                x = dig(r, key, "median_s") if key == "grad_step" else r.get(key)
                cells.append(_s(x, scale))
            rows.append([PEER_LABELS.get(v, v), *cells])
        out += [
            f"### {title} ({unit})",
            "",
            C.table(["variant"] + [f"N={n}" for n in ns], rows),
            "",
        ]
    rows = []
    for v in variants:
        cells = []
        for n in ns:
            r = dig(res, str(n), v) or {}
            cells.append(
                "failed: " + r["error"]
                if "error" in r
                else ("yes" if r.get("matches") else "**NO**")
            )
        rows.append([PEER_LABELS.get(v, v), *cells])
    out += [
        "### Same loss and gradient norm as the hand-written scan",
        "",
        C.table(["variant"] + [f"N={n}" for n in ns], rows),
        "",
    ]
    return out


def md_memory(d: dict[str, Any], machine: str) -> list[str]:
    model = d.get("model") or {}
    out = [
        "## bench_memory: backward temporary memory against depth (issue 5)",
        "",
        machine,
        "",
        f"Model: {model.get('layer')}, carry {model.get('carry')} {model.get('dtype')};"
        f" {model.get('measured')}. XLA `memory_analysis().temp_size_in_bytes`, MB.",
        "",
    ]
    names = ["no_remat", "per_layer", "sqrt_group", "flax_remat_scan"]
    labels = ["no remat", "remat=True", "remat_group='sqrt'", "nn.remat_scan((N/g, g))"]
    temp = d.get("temp_bytes") or {}
    checks = d.get("same_loss_and_grad") or {}
    rows = []
    for n in d.get("ns", []):
        ok = all((checks.get(str(n)) or {"x": False}).values())
        rows.append(
            [f"N={n}", str(dig(d, "group_size", str(n)))]
            + [_mb(dig(temp, k, str(n))) for k in names]
            + ["yes" if ok else "**NO**"]
        )
    out += [C.table(["layers", "g", *labels, "same loss+grad"], rows), ""]
    step = d.get("step") or {}
    rows = [
        [lab, _s(dig(step, k, "median_s")), _s(dig(step, k, "min_s"))]
        for k, lab in zip(names, labels, strict=True)
    ]
    out += [
        f"Gradient step at N={step.get('n')}, seconds, alternating:",
        "",
        C.table(["variant", "median (s)", "min (s)"], rows),
        "",
    ]
    if d.get("errors"):
        out += [
            "Failures: " + "; ".join(f"{k}: {v}" for k, v in d["errors"].items()),
            "",
        ]
    return out


def md_stack(d: dict[str, Any], machine: str) -> list[str]:
    res = d.get("results") or {}
    out = ["## bench_stack: stack and unstack against numpy", "", machine, ""]
    if res.get("total_bytes"):
        out += [
            f"{res.get('layers')} layers x {res.get('leaves_per_layer')} leaves, "
            f"{res['total_bytes'] / 2**20:.1f} MiB in total.",
            "",
        ]
    rows = []
    for bench in ("stack", "unstack_numpy", "unstack_jax"):
        for impl, t in (res.get(bench) or {}).items():
            rows.append(
                [bench, impl, _s(dig(t, "min_s"), 1e3), _s(dig(t, "median_s"), 1e3)]
            )
    if rows:
        out += [
            C.table(["benchmark", "implementation", "min (ms)", "median (ms)"], rows),
            "",
        ]
    else:
        out += [
            "(no table: the script's JSON has no `results.stack`; see results.json)",
            "",
        ]
    return out


def md_convert(d: dict[str, Any], machine: str) -> list[str]:
    res = d.get("results") or {}
    size = d.get("checkpoint_bytes")
    out = [
        "## bench_convert: `stackedtree stack` against cp and a load-everything script",
        "",
        machine,
        "",
    ]
    if size:
        out += [
            f"Checkpoint {size / 1e9:.2f} GB, {d.get('num_layers')} layers, "
            f"{d.get('dtype')}; unstack(stack(src)) byte-identical: "
            f"{d.get('roundtrip_identical')}.",
            "",
        ]
    rows = [
        [
            step,
            _s(r.get("wall_s")),
            _s(r.get("time_vs_cp")),
            _s(div(r.get("peak_rss"), 2**20)),
            _s(r.get("rss_fraction")),
            _s(r.get("rss_above_startup_fraction")),
        ]
        for step, r in res.items()
        if isinstance(r, dict)
    ]
    if rows:
        out += [
            C.table(
                [
                    "step",
                    "wall (s)",
                    "time / cp",
                    "peak RSS (MiB)",
                    "RSS / ckpt",
                    "(RSS - start-up) / ckpt",
                ],
                rows,
            ),
            "",
        ]
    return out


RENDER = {
    "bench_scan": md_scan,
    "bench_peers": md_peers,
    "bench_memory": md_memory,
    "bench_stack": md_stack,
    "bench_convert": md_convert,
}


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    m = results["machine"]
    machine = f"_Machine: {C.machine_line(m)}._"
    title = "stackedtree benchmarks" + (
        f" ({results['tag']})" if results.get("tag") else ""
    )
    out = [
        f"# {title}",
        "",
        machine,
        "",
        f"Regenerate with `{results['command']}`"
        + (
            " (quick mode: smoke sizes, the numbers mean nothing)."
            if results["quick"]
            else "."
        ),
        "",
    ]
    out += ["## Headline", "", machine, ""]
    rows = [
        [
            h["measure"],
            _s(h["value"], digits=3),
            h["target"],
            _met(h["met"]),
            h["source"],
            h["note"],
        ]
        for h in results["headline"]
    ]
    out += [
        C.table(["measure", "value", "target", "met", "from", "note"], rows),
        "",
        "Ratios are A / B of the same quantity measured in the same process; below 1 "
        "means A is smaller (faster, or less memory).",
        "",
    ]
    status = [
        [name, e["status"], _s(e.get("seconds"), digits=3), e.get("command", "")]
        for name, e in results["benchmarks"].items()
    ]
    out += [
        "## Runs",
        "",
        C.table(["benchmark", "status", "seconds", "command"], status),
        "",
    ]
    for name, e in results["benchmarks"].items():
        if e["status"] != "ok":
            out += [
                f"**{name} {e['status']}**: "
                + "\n\n```\n"
                + e.get("error", "")
                + "\n```",
                "",
            ]
    for name, e in results["benchmarks"].items():
        if e.get("data") is not None and name in RENDER:
            try:
                out += RENDER[name](e["data"], machine)
            except Exception as ex:  # a changed JSON layout must not lose the rest
                out += [
                    f"## {name}",
                    "",
                    f"(could not render: {type(ex).__name__}: {ex}; "
                    "the raw figures are in the JSON)",
                    "",
                ]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# Plots


def plots(results: dict[str, Any], out_dir: str, suffix: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        C.log("matplotlib is not installed: no plots")
        return []
    made = []
    where = (
        f"{results['machine'].get('device_label')}, jax {results['machine'].get('jax')}"
    )
    peers = dig(results, "benchmarks", "bench_peers", "data")
    scan = dig(results, "benchmarks", "bench_scan", "data")
    if peers or scan:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        if peers:
            for ax, key, title in (
                (axes[0], "grad_compile_s", "jax.grad"),
                (axes[1], "forward_compile_s", "forward"),
            ):
                for v in peers.get("variants", []):
                    pts = [
                        (n, dig(peers, "results", str(n), v, key)) for n in peers["ns"]
                    ]
                    pts = [(n, y) for n, y in pts if isinstance(y, int | float)]
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=True),
                            marker="o",
                            label=PEER_LABELS.get(v, v),
                        )
                ax.set_title(f"compile time of {title} ({where})", fontsize=9)
        else:
            secs = dig(scan, "compile_vs_n", "seconds") or {}
            for v, by_n in secs.items():
                pts = sorted((int(n), r["best_s"]) for n, r in by_n.items())
                axes[0].plot(
                    *zip(*pts, strict=True), marker="o", label=PEER_LABELS.get(v, v)
                )
            axes[0].set_title(f"compile time of jax.grad ({where})", fontsize=9)
            axes[1].axis("off")
        for ax in axes:
            if ax.lines:
                ax.set_xlabel("layers N")
                ax.set_ylabel("trace + lower + compile (s)")
                ax.set_xscale("log", base=2)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"compile_time{suffix}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        made.append(name)
    mem = dig(results, "benchmarks", "bench_memory", "data")
    temp = (mem or {}).get("temp_bytes") or dig(scan, "remat", "temp_bytes")
    if temp:
        labels = {
            "no_remat": "no remat",
            "per_layer": "remat=True",
            "sqrt_group": "remat_group='sqrt'",
            "flax_remat_scan": "Flax nn.remat_scan",
        }
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for v, by_n in temp.items():
            pts = sorted(
                (int(n), b / 1e6) for n, b in by_n.items() if isinstance(b, int | float)
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=labels.get(v, v))
        model = dig(mem, "model", "layer") or dig(scan, "remat", "model", "layer")
        ax.set_title(f"backward temp memory, {model}\n({where})", fontsize=9)
        ax.set_xlabel("layers N")
        ax.set_ylabel("XLA temp_size_in_bytes (MB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"memory{suffix}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        made.append(name)
    return made


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny sizes")
    p.add_argument("--out", default=C.HERE, help="output folder (default: benchmarks/)")
    p.add_argument(
        "--tag", default="", help="suffix for the outputs: results_TAG.json ..."
    )
    p.add_argument(
        "--device-label",
        help="device name in the results (default: the "
        "JAX device kind, e.g. 'cpu' or 'NVIDIA H100 80GB HBM3')",
    )
    p.add_argument(
        "--size-gb",
        type=float,
        default=1.0,
        help="checkpoint size for bench_convert (full runs)",
    )
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    args = p.parse_args(argv)
    names = args.only or BENCHMARKS
    os.makedirs(args.out, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    command = "python benchmarks/run_all.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    machine = C.machine_info(args.device_label)
    C.log("machine:", C.machine_line(machine))
    t0 = time.perf_counter()
    bench: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            bench[name] = run_one(name, args, os.path.join(tmp, name + ".json"))
    results = {
        "machine": machine,
        "tag": args.tag,
        "quick": args.quick,
        "command": command,
        "wall_s": time.perf_counter() - t0,
        "headline": headline(bench, args.quick),
        "benchmarks": bench,
    }
    made = plots(results, args.out, suffix)
    json_path = os.path.join(args.out, f"results{suffix}.json")
    md_path = os.path.join(args.out, f"results{suffix}.md")
    C.write_json(json_path, results)
    with open(md_path, "w") as f:
        f.write(markdown(results, made))
    C.log("")
    C.log(
        C.table(
            ["measure", "value", "target", "met"],
            [
                [h["measure"], _s(h["value"]), h["target"], _met(h["met"])]
                for h in results["headline"]
            ],
        )
    )
    failed = [n for n, e in bench.items() if e["status"] != "ok"]
    C.log(
        f"wrote {json_path}, {md_path}"
        + "".join(f", {os.path.join(args.out, m)}" for m in made)
    )
    if failed:
        C.log("FAILED: " + ", ".join(f"{n} ({bench[n]['status']})" for n in failed))
        return 1
    C.log(f"all {len(names)} benchmarks ok in {results['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
