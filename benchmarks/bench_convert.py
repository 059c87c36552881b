"""Time and peak memory of `stackedtree stack` against `cp` and a load-everything script.

Writes a random per-layer safetensors checkpoint with Llama-style names (at least
`--size-gb`), then measures, each in a fresh process:

- `cp SRC DST`: the floor for moving the bytes;
- `python -m stackedtree --help`: the command's start-up (interpreter and imports);
- `python -m stackedtree stack SRC -o OUT` and `... unstack OUT -o BACK`;
- a naive script: `safetensors.numpy.load_file`, `np.stack` per key, `save_file`.

Then the same for a mixture-of-experts checkpoint of the same size (Qwen3-MoE names:
one dense layer, then MoE layers of E experts, a router and a shared expert), which
`stackedtree stack` stacks by kind and expert (`(N, E, ...)` tensors): `cp`, `stack`
and `unstack`, the round trip checked byte for byte.

Every command is timed together with its own write-back: `sync` before it (not timed),
then the command and a `sync` after it are timed, so a command is not credited with
dirty pages the kernel writes later (or charged with an earlier command's). Peak
resident memory is the command's own, from `/usr/bin/time -v` when present, else from
`os.wait4` (the child's `ru_maxrss`).

    python benchmarks/bench_convert.py                # 1 GB
    python benchmarks/bench_convert.py --quick        # tiny smoke run for CI

It prints `report(results)`, the markdown section `run_all.py` publishes.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _hf_names import hf_llama_names
from _report import dig, finish, parser, ratio, start, table

from stackedtree.checkpoint._io import safetensors_header

STARTUP = "python -m stackedtree --help"
NAIVE_LABEL = "naive (load_file + np.stack + save_file)"
NAIVE = r"""
import re, sys
import ml_dtypes  # noqa: F401  (numpy learns "bfloat16", which safetensors asks for)
import numpy as np
from safetensors.numpy import load_file, save_file
src, out = sys.argv[1], sys.argv[2]
flat = load_file(src)
layers = {}
rest = {}
for name, x in flat.items():
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", name)
    if m:
        layers.setdefault(m[2], {})[int(m[1])] = x
    else:
        rest[name] = x
stacked = {
    "model.layers.{i}." + k: np.stack([v[i] for i in range(len(v))]) for k, v in layers.items()
}
save_file({**stacked, **rest}, out)
"""


def _safetensors_holds(dtype: np.dtype, folder: Path) -> bool:
    """Whether this safetensors package's numpy API saves and loads `dtype`
    (bfloat16 needs a recent one)."""
    from safetensors.numpy import load_file, save_file

    probe = folder / "probe.safetensors"
    try:
        save_file({"x": np.zeros(2, dtype)}, str(probe))
        return load_file(str(probe))["x"].dtype == dtype
    except Exception:  # any failure means it cannot, whatever the version says
        return False
    finally:
        probe.unlink(missing_ok=True)


def write_checkpoint(path: Path, size_bytes: int, dtype: np.dtype, quick: bool) -> int:
    """Writes random bits in a Llama-shaped checkpoint of at least `size_bytes`."""
    d, f, vocab = (256, 688, 1000) if quick else (1024, 2752, 32000)
    per_layer = (4 * d * d + 3 * d * f + 2 * d) * dtype.itemsize
    fixed = (2 * vocab * d + d) * dtype.itemsize
    n = max(2, -(-(size_bytes - fixed) // per_layer))
    specs = hf_llama_names(d, f, vocab, n)
    rng = np.random.default_rng(0)
    with open(path, "wb") as out:
        out.write(safetensors_header([(name, dtype, shape) for name, shape in specs]))
        for _, shape in specs:
            count = int(np.prod(shape)) * dtype.itemsize // 4
            out.write(rng.integers(0, 2**32, count, dtype=np.uint32).tobytes())
    return n


def write_moe_checkpoint(
    path: Path, size_bytes: int, dtype: np.dtype, quick: bool
) -> tuple[int, int]:
    """Writes random bits in a Qwen3-MoE-shaped checkpoint of at least `size_bytes`
    (layer 0 dense, the others MoE); returns N and E."""
    d, f, e, vocab = (128, 64, 4, 1000) if quick else (1024, 512, 16, 32000)
    attn = [("self_attn." + w + ".weight", (d, d)) for w in "qkvo"]
    norms = [
        (w + ".weight", (d,)) for w in ("input_layernorm", "post_attention_layernorm")
    ]
    mlp = [
        ("mlp.gate_proj.weight", (f, d)),
        ("mlp.up_proj.weight", (f, d)),
        ("mlp.down_proj.weight", (d, f)),
    ]
    moe = [("mlp.gate.weight", (e, d))]
    for x in range(e):
        moe += [(k.replace("mlp.", f"mlp.experts.{x}."), s) for k, s in mlp]
    moe += [(k.replace("mlp.", "mlp.shared_experts."), s) for k, s in mlp]
    size = sum(int(np.prod(s)) for _, s in attn + norms + moe) * dtype.itemsize
    fixed = 2 * vocab * d * dtype.itemsize
    n = max(3, 1 + -(-(size_bytes - fixed) // size))
    specs = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(n):
        body = attn + (mlp if i == 0 else moe) + norms
        specs += [(f"model.layers.{i}.{k}", s) for k, s in body]
    specs += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    rng = np.random.default_rng(0)
    with open(path, "wb") as out:
        out.write(safetensors_header([(name, dtype, shape) for name, shape in specs]))
        for _, shape in specs:
            count = int(np.prod(shape)) * dtype.itemsize // 4
            out.write(rng.integers(0, 2**32, count, dtype=np.uint32).tobytes())
    return n, e


def measure(cmd: list[str]) -> dict[str, Any]:
    """Seconds of `cmd` and a `sync` after it, with `cmd`'s own time and peak RSS.

    A `sync` first, not timed, starts the command without earlier dirty pages; the
    `sync` after it charges the command with writing back its own output.
    """
    os.sync()
    t0 = time.perf_counter()
    own = run_and_measure(cmd)
    os.sync()
    return {"wall_s": time.perf_counter() - t0, **own}


def run_and_measure(cmd: list[str]) -> dict[str, Any]:
    """Wall seconds (without sync) and peak RSS (bytes) of `cmd` in a fresh process."""
    gnu_time = shutil.which("time") or (
        "/usr/bin/time" if os.path.exists("/usr/bin/time") else None
    )
    if gnu_time:
        r = subprocess.run([gnu_time, "-v", *cmd], capture_output=True, text=True)
        if r.returncode == 0 and "Maximum resident set size" in r.stderr:
            rss_kb = int(
                re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)[1]
            )  # type: ignore[index]
            wall = re.search(
                r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.+)", r.stderr
            )[1]  # type: ignore[index]
            seconds = sum(
                float(x) * 60**k for k, x in enumerate(reversed(wall.split(":")))
            )
            return {
                "command_s": seconds,
                "peak_rss": rss_kb * 1024,
                "via": "/usr/bin/time -v",
            }
        if r.returncode != 0:
            raise RuntimeError(f"{cmd} failed:\n{r.stderr}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{cmd} failed:\n{proc.stderr.read().decode() if proc.stderr else ''}"
        )
    scale = (
        1 if sys.platform == "darwin" else 1024
    )  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"command_s": wall, "peak_rss": usage.ru_maxrss * scale, "via": "os.wait4"}


# --------------------------------------------------------------------------------------
# Report

LABELS = {
    "cp": "cp",
    STARTUP: "start-up only",
    "stackedtree stack": "stackedtree stack",
    "stackedtree unstack": "stackedtree unstack",
    NAIVE_LABEL: "naive script",
}


def measure_all(
    runs: dict[str, list[str]], outputs: dict[str, Path], repeat: int
) -> dict[str, dict[str, Any]]:
    """Each command of `runs` measured `repeat` times, in rounds (every command once
    per round, in order, its output removed before it runs), so that the machine's
    drift falls on all of them alike: the median time, every time, the largest peak
    RSS and, per round, the time over that round's `cp` (`vs_cp_all`)."""
    trials: dict[str, list[dict[str, Any]]] = {label: [] for label in runs}
    for _ in range(repeat):
        for label, cmd in runs.items():
            outputs[label].unlink(missing_ok=True)  # each run writes a fresh file
            trials[label].append(measure(cmd))
    results: dict[str, dict[str, Any]] = {}
    for label, own in trials.items():
        walls = [t["wall_s"] for t in own]
        results[label] = {
            "wall_s": statistics.median(walls),
            "wall_s_all": walls,
            "command_s_all": [t["command_s"] for t in own],
            "peak_rss": max(t["peak_rss"] for t in own),
            "via": own[0]["via"],
        }
        if "cp" in trials:
            cps = [t["wall_s"] for t in trials["cp"]]
            results[label]["vs_cp_all"] = [
                w / c for w, c in zip(walls, cps, strict=True)
            ]
    return results


def _vs_cp(results: dict[str, dict[str, Any]]) -> None:
    """Each step's time over `cp`'s: the median of the rounds' ratios."""
    for r in results.values():
        ratios = r.get("vs_cp_all") or [float("nan")]
        r["time_vs_cp"] = statistics.median(ratios)


def measure_moe(
    folder: Path, size_bytes: int, dtype: np.dtype, quick: bool, repeat: int
) -> dict[str, Any]:
    """cp, stack and unstack of a mixture-of-experts checkpoint, as for the dense one."""
    src = folder / "moe.safetensors"
    n, e = write_moe_checkpoint(src, size_bytes, dtype, quick)
    size = src.stat().st_size
    cli = [sys.executable, "-m", "stackedtree"]
    stacked, back = folder / "moe-stacked.safetensors", folder / "moe-back.safetensors"
    runs = {
        "cp": ["cp", str(src), str(folder / "moe-copy.safetensors")],
        "stackedtree stack": [*cli, "stack", str(src), "-o", str(stacked), "-q"],
        "stackedtree unstack": [*cli, "unstack", str(stacked), "-o", str(back), "-q"],
    }
    outputs = {
        label: Path(cmd[-2] if cmd[-1] == "-q" else cmd[-1])
        for label, cmd in runs.items()
    }
    results = measure_all(runs, outputs, repeat)
    from stackedtree.checkpoint._io import read_checkpoint

    meta = read_checkpoint(stacked).metadata
    identical = filecmp.cmp(src, back, shallow=False)
    for path in (src, stacked, back, folder / "moe-copy.safetensors"):
        path.unlink(missing_ok=True)
    _vs_cp(results)
    for r in results.values():
        r["rss_fraction"] = r["peak_rss"] / size
    return {
        "checkpoint_bytes": size,
        "num_layers": n,
        "experts": e,
        "expert_pattern": meta.get("stackedtree.experts"),
        "kinds": meta.get("stackedtree.kinds"),
        "roundtrip_identical": identical,
        "results": results,
    }


def headline(results: dict[str, Any]) -> list[tuple[str, float | None]]:
    """This script's rows of the headline table: `(measure, value)`."""
    stack = dig(results, "results", "stackedtree stack") or {}
    return [
        ("`stackedtree stack` / cp, time with sync", stack.get("time_vs_cp")),
        ("`stackedtree stack` peak RSS / checkpoint size", stack.get("rss_fraction")),
        (
            "`stackedtree stack` of a MoE checkpoint / cp, time with sync",
            dig(results, "moe", "results", "stackedtree stack", "time_vs_cp"),
        ),
        (
            "`stackedtree stack` of a MoE checkpoint, peak RSS / checkpoint size",
            dig(results, "moe", "results", "stackedtree stack", "rss_fraction"),
        ),
    ]


def _step_rows(res: dict[str, Any]) -> list[list[Any]]:
    """A table row per timed step: its label, time, time / cp, RSS and RSS / ckpt."""
    return [
        [
            LABELS.get(step, step),
            r.get("wall_s"),
            r.get("time_vs_cp"),
            ratio(r.get("peak_rss"), 2**20),
            r.get("rss_fraction"),
        ]
        for step, r in res.items()
    ]


def report(results: dict[str, Any]) -> str:
    """The markdown section for these results (heading `###`)."""
    res = results.get("results") or {}
    rows = _step_rows(res)
    size = results.get("checkpoint_bytes") or 0
    identical = "byte-identical" if results.get("roundtrip_identical") else "DIFFERENT"
    return "\n".join(
        [
            "### Converting a checkpoint: `stackedtree stack` against `cp`",
            "",
            f"A {size / 1e9:.2f} GB safetensors checkpoint of {results.get('num_layers')}"
            f" layers, {results.get('dtype')}, with Llama's tensor names; unstacking "
            f"the stacked file gives back a {identical} copy. Each step runs in a fresh "
            "process and is timed together with a `sync` after it (a `sync` before it "
            f"is not timed), in {results.get('repeat')} rounds of every step; the "
            "time is the median, and / cp the median of each round's time over that "
            "round's `cp`. Start-up only is "
            "`python -m stackedtree --help`; the naive script loads the "
            "whole checkpoint (`safetensors.numpy.load_file`), `np.stack`s each "
            "weight and saves. RSS is the process's own peak resident memory. "
            "`cp` copies each byte to the same offset; a stacked file's header is "
            "longer than the per-layer file's, so its tensors land at other offsets "
            "within a page, which this file system copies and writes back more "
            "slowly (1.2-1.35x for a copy shifted by 1,000 bytes, measured with "
            "`copy_file_range` alone); `stackedtree` wins most of that back by "
            "starting the write-back of every 64 MiB it has copied while it copies "
            "on.",
            "",
            table(
                ["step", "time + sync (s)", "/ cp", "RSS (MiB)", "RSS / ckpt"],
                rows,
            ),
            *_moe_report(results.get("moe") or {}),
        ]
    )


def commands(
    src: Path, folder: Path, dtype: np.dtype, *, naive: bool
) -> dict[str, list[str]]:
    """The commands timed, by label, each writing its output into `folder`."""
    py = sys.executable
    runs: dict[str, list[str]] = {
        "cp": ["cp", str(src), str(folder / "copy.safetensors")],
        STARTUP: [py, "-m", "stackedtree", "--help"],
        "stackedtree stack": [
            py,
            "-m",
            "stackedtree",
            "stack",
            str(src),
            "-o",
            str(folder / "stacked.safetensors"),
            "-q",
        ],
        "stackedtree unstack": [
            py,
            "-m",
            "stackedtree",
            "unstack",
            str(folder / "stacked.safetensors"),
            "-o",
            str(folder / "back.safetensors"),
            "-q",
        ],
    }
    if naive:
        if not _safetensors_holds(dtype, folder):
            import safetensors

            print(
                f"note: safetensors {safetensors.__version__} cannot save and load "
                f"{dtype} with numpy; skipping the naive script"
            )
        else:
            runs[NAIVE_LABEL] = [
                py,
                "-c",
                NAIVE,
                str(src),
                str(folder / "naive.safetensors"),
            ]
    return runs


def time_commands(
    runs: dict[str, list[str]], folder: Path, repeat: int
) -> dict[str, dict[str, Any]]:
    """Each command `repeat` times, its output removed before each run: the median
    wall time (with its `sync`), every time and the peak RSS."""
    outputs = {
        label: Path(cmd[-2] if cmd[-1] == "-q" else cmd[-1])
        for label, cmd in runs.items()
    }
    outputs[STARTUP] = folder / "none"
    return measure_all(runs, outputs, repeat)


def _moe_report(moe: dict[str, Any]) -> list[str]:
    if not moe:
        return []
    rows = _step_rows(moe.get("results") or {})
    same = "byte-identical" if moe.get("roundtrip_identical") else "DIFFERENT"
    return [
        "",
        f"A mixture of experts: a {(moe.get('checkpoint_bytes') or 0) / 1e9:.2f} GB "
        f"checkpoint of {moe.get('num_layers')} layers with Qwen3-MoE's names (layer 0 "
        f"dense, the others {moe.get('experts')} experts, a router and a shared "
        f"expert), stacked by kind ({len(json.loads(moe.get('kinds') or '{}'))} "
        f"kinds) and expert "
        f"({moe.get('expert_pattern')!r}, `(N, E, ...)` tensors); unstacking gives "
        f"back a {same} copy. Timed as above.",
        "",
        table(["step", "time + sync (s)", "/ cp", "RSS (MiB)", "RSS / ckpt"], rows),
    ]


def main(argv: list[str] | None = None) -> int:
    options = parser(__doc__)
    options.add_argument(
        "--size-gb", type=float, default=1.0, help="checkpoint size (GB)"
    )
    options.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    options.add_argument("--tmpdir", type=Path, help="where to write the checkpoints")
    options.add_argument(
        "--no-naive", action="store_true", help="skip the naive script"
    )
    options.add_argument(
        "--repeat", type=int, default=3, help="runs per step; the median time is kept"
    )
    args, machine, t_start = start(options, argv)
    if args.quick:
        args.size_gb = 0.02
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32)
    repeat = 1 if args.quick else args.repeat
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        src = folder / "model.safetensors"
        n = write_checkpoint(src, int(args.size_gb * 1e9), dtype, args.quick)
        size = src.stat().st_size
        runs = commands(src, folder, dtype, naive=not args.no_naive)
        results = time_commands(runs, folder, repeat)
        identical = filecmp.cmp(src, folder / "back.safetensors", shallow=False)
        (folder / "copy.safetensors").unlink(missing_ok=True)
        for name in ("stacked", "back", "naive"):
            (folder / f"{name}.safetensors").unlink(missing_ok=True)
        moe = measure_moe(folder, int(args.size_gb * 1e9), dtype, args.quick, repeat)

    _vs_cp(results)
    base = results[STARTUP]["peak_rss"]
    for r in results.values():
        r["rss_fraction"] = r["peak_rss"] / size
        r["rss_above_startup_fraction"] = max(0, r["peak_rss"] - base) / size
    payload = {
        "benchmark": "bench_convert",
        "quick": args.quick,
        "machine": machine,
        "checkpoint_bytes": size,
        "num_layers": n,
        "dtype": args.dtype,
        "roundtrip_identical": identical,
        "repeat": repeat,
        "timed_with_sync": True,
        "results": results,
        "moe": moe,
        "wall_s": time.perf_counter() - t_start,
    }
    finish(args, payload, report)
    return 0 if identical and moe["roundtrip_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
