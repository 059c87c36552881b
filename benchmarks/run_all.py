"""Run the benchmark scripts and publish their results: JSON, markdown and plots.

    python benchmarks/run_all.py             # results.json, results.md, *.png
    python benchmarks/run_all.py --quick --out /tmp/b    # CI smoke run, numbers mean nothing
    python benchmarks/run_all.py --tag gpu   # results_gpu.json, results_gpu.md, *_gpu.png
    python benchmarks/run_all.py --render benchmarks/results_gpu.json --tag gpu

Each script in `SCRIPTS` runs as its own subprocess with `--json`. One that crashes or is
missing is reported by name with the end of its output, the others are still published,
and this command exits non-zero. The runner renders no figure itself: each script
module's `report(results)` gives its markdown section, its optional `headline(results)`
its rows of the headline table and its optional `plots(results)` its figures.
`--render` rebuilds the markdown and the plots from a results JSON without running.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from types import ModuleType
from typing import Any

from _env import HERE, ROOT
from _machine import machine_info, machine_line, title
from _plots import SAVE_DPI, Plot, pyplot
from _report import fmt, log, table, write_json

# In the order they run and are published. A new script is listed here.
SCRIPTS = [
    "bench_scan",
    "bench_peers",
    "bench_memory",
    "bench_pattern",
    "bench_decode",
    "bench_stack",
    "bench_convert",
    "bench_pipeline",
    "bench_load",
    "bench_save",
]


def module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except Exception:  # a broken script is reported by its own run; keep the others
        log(f"== {name}: cannot import:\n{traceback.format_exc(limit=2)}")
        return None


# --------------------------------------------------------------------------------------
# Running


def command(name: str, args: argparse.Namespace) -> list[str]:
    cmd = [f"benchmarks/{name}.py"]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--device-label", args.device_label] if args.device_label else []
    sized = name in ("bench_convert", "bench_load", "bench_save")
    cmd += ["--size-gb", str(args.size_gb)] if sized else []
    return cmd


def run_one(name: str, args: argparse.Namespace, json_path: str) -> dict[str, Any]:
    """Runs one script; its entry in `results.json`, with its own JSON as `data`."""
    cmd = command(name, args)
    entry: dict[str, Any] = {"script": cmd[0], "command": " ".join(["python", *cmd])}
    if not os.path.exists(os.path.join(ROOT, cmd[0])):
        entry.update(status="missing", error=f"{cmd[0]} does not exist")
        log(f"== {name}: MISSING ({entry['error']})")
        return entry
    log(f"== {name}: {entry['command']}")
    tail: deque[str] = deque(maxlen=40)
    t0 = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, *cmd, "--json", json_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write("   " + line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
        rc = proc.wait()
    entry.update(seconds=time.perf_counter() - t0, returncode=rc, data=None)
    try:
        with open(json_path) as f:
            entry["data"] = json.load(f)
    except (OSError, ValueError) as e:
        entry["json_error"] = f"{type(e).__name__}: {e}"
    entry["status"] = "ok" if rc == 0 and entry["data"] is not None else "failed"
    if entry["status"] != "ok":
        why = f"exit code {rc}" if rc else "no JSON written"
        entry["error"] = f"{why}; last lines of output:\n" + "\n".join(tail)
    log(f"== {name}: {entry['status']} in {entry['seconds']:.0f}s")
    return entry


# --------------------------------------------------------------------------------------
# Publishing: every figure comes from the scripts' own `report`, `headline`, `plots`


def hook(name: str, entry: dict[str, Any], fn: str) -> Any:
    """`NAME.fn(its results)`, or None when the script lacks it, has no results or
    fails on them (a changed JSON layout must not lose the other scripts' results)."""
    mod = module(name) if entry.get("data") is not None else None
    if not hasattr(mod, fn):
        return None
    try:
        return getattr(mod, fn)(entry["data"])
    except Exception as e:
        log(f"== {name}.{fn} failed on its results: {type(e).__name__}: {e}")
        return None


def headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"measure": measure, "value": value, "script": name}
        for name, entry in results["benchmarks"].items()
        for measure, value in hook(name, entry, "headline") or []
    ]


def save_plots(results: dict[str, Any], out_dir: str, suffix: str) -> list[Plot]:
    made = []
    for name, entry in results["benchmarks"].items():
        for plot in hook(name, entry, "plots") or []:
            path = os.path.join(out_dir, f"{plot.name}{suffix}.png")
            plot.figure.savefig(path, dpi=SAVE_DPI)
            pyplot().close(plot.figure)
            made.append(plot._replace(name=f"{plot.name}{suffix}.png", figure=None))
    return made


def section(name: str, entry: dict[str, Any]) -> str:
    """A script's report, or why there is none; failures show the end of the output."""
    out = []
    if entry["status"] != "ok":
        why, *tail = entry.get("error", "no error recorded").splitlines()
        out += [f"### {name} {entry['status']}", "", f"`{entry['command']}`: {why}", ""]
        out += ["```text", *tail, "```", ""] if tail else []
    report = hook(name, entry, "report")
    if report is None and entry.get("data") is not None:
        report = f"### {name}\n\nNo report: see the results JSON."
    return "\n".join([*out, report or ""]).strip()


def markdown(results: dict[str, Any], plots: list[Plot]) -> str:
    m = results["machine"]
    ran = ", ".join(
        f"`{name}` ({fmt(e.get('seconds'))} s)"
        if e["status"] == "ok"
        else f"`{name}` ({e['status']})"
        for name, e in results["benchmarks"].items()
    )
    quick = ""
    if results["quick"]:
        quick = " Quick mode: smoke-test sizes, the numbers mean nothing."
    out = [
        "<!-- Written by benchmarks/run_all.py from the results JSON; do not edit. -->",
        "",
        f"## {title(m)}",
        "",
        f"_Machine: {machine_line(m)}._",
        "",
        f"Made by `{results['command']}`, which ran {ran}.{quick}",
        "",
    ]
    if plots:
        out += ["### Plots", ""] + [f"![{p.alt}]({p.name})\n" for p in plots]
    rows = [[h["measure"], h["value"]] for h in results["headline"]]
    out += [
        "### Headline",
        "",
        "<!-- headline -->",
        "",
        table(["measure", "value"], rows),
        "",
        "Ratios are A / B of the same quantity measured in the same process; below 1 "
        "means A is smaller (faster, or less memory).",
        "",
        "<!-- /headline -->",
        "",
    ]
    out += [section(n, e) + "\n" for n, e in results["benchmarks"].items()]
    return "\n".join(out)


def publish(results: dict[str, Any], out_dir: str, tag: str) -> list[str]:
    """Writes `results[_TAG].json`, `.md` and the plots; returns the paths written."""
    suffix = f"_{tag}" if tag else ""
    results["headline"] = headline(results)
    paths = [os.path.join(out_dir, f"results{suffix}.{ext}") for ext in ("json", "md")]
    write_json(paths[0], results)  # first: whatever fails later, the figures are kept
    plots = save_plots(results, out_dir, suffix)
    with open(paths[1], "w") as f:
        f.write(markdown(results, plots))
    return paths + [os.path.join(out_dir, p.name) for p in plots]


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny sizes")
    p.add_argument("--out", default=HERE, help="output folder (default: benchmarks/)")
    p.add_argument("--tag", default="", help="name the outputs results_TAG.json, ...")
    p.add_argument(
        "--device-label",
        help="device name in the results (default: the JAX device kind, "
        "e.g. 'cpu' or 'NVIDIA H100 80GB HBM3')",
    )
    p.add_argument(
        "--size-gb", type=float, default=1.0, help="checkpoint size for bench_convert"
    )
    p.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these")
    p.add_argument(
        "--render",
        metavar="JSON",
        help="do not run: rebuild the markdown and plots from this results JSON",
    )
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        log("wrote " + ", ".join(publish(results, args.out, args.tag)))
        return 0
    argv = sys.argv[1:] if argv is None else argv
    machine = machine_info(args.device_label)
    log("machine:", machine_line(machine))
    t0 = time.perf_counter()
    bench: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or SCRIPTS:
            bench[name] = run_one(name, args, os.path.join(tmp, name + ".json"))
    results = {
        "machine": machine,
        "tag": args.tag,
        "quick": args.quick,
        "command": " ".join(["python benchmarks/run_all.py", *argv]),
        "wall_s": time.perf_counter() - t0,
        "benchmarks": bench,
    }
    written = publish(results, args.out, args.tag)
    log(
        "\n"
        + table(
            ["measure", "value"],
            [[h["measure"], h["value"]] for h in results["headline"]],
        )
    )
    log("wrote " + ", ".join(written))
    failed = [f"{n} ({e['status']})" for n, e in bench.items() if e["status"] != "ok"]
    if failed:
        log("FAILED: " + ", ".join(failed))
        return 1
    log(f"all {len(bench)} benchmarks ok in {results['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
