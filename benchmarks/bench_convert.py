"""Time and peak memory of `stackedtree stack` against `cp` and a load-everything script.

Writes a random per-layer safetensors checkpoint with Llama-style names (at least
`--size-gb`), then measures, each in a fresh process:

- `cp SRC DST`: the floor for moving the bytes;
- `python -c "import stackedtree.checkpoint"`: interpreter and import start-up;
- `python -m stackedtree stack SRC -o OUT` and `... unstack OUT -o BACK`;
- a naive script: `safetensors.numpy.load_file`, `np.stack` per key, `save_file`.

Every command is timed together with its own write-back: `sync` before it (not timed),
then the command and a `sync` after it. Peak resident memory is the command's own, from
`/usr/bin/time -v` when present, else from `os.wait4` (the child's `ru_maxrss`). Prints a markdown table; `--json PATH`
writes the figures.

    python benchmarks/bench_convert.py                # 1 GB
    python benchmarks/bench_convert.py --quick        # tiny smoke run for CI
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stackedtree.checkpoint._io import safetensors_header

NAIVE = r"""
import re, sys
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


def llama_names(
    d: int, f: int, vocab: int, n: int
) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes (`(out, in)` layouts)."""
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


def write_checkpoint(path: Path, size_bytes: int, dtype: np.dtype, quick: bool) -> int:
    """Writes random bits in a Llama-shaped checkpoint of at least `size_bytes`."""
    d, f, vocab = (256, 688, 1000) if quick else (1024, 2752, 32000)
    per_layer = (4 * d * d + 3 * d * f + 2 * d) * dtype.itemsize
    fixed = (2 * vocab * d + d) * dtype.itemsize
    n = max(2, -(-(size_bytes - fixed) // per_layer))
    specs = llama_names(d, f, vocab, n)
    rng = np.random.default_rng(0)
    with open(path, "wb") as out:
        out.write(safetensors_header([(name, dtype, shape) for name, shape in specs]))
        for _, shape in specs:
            count = int(np.prod(shape)) * dtype.itemsize // 4
            out.write(rng.integers(0, 2**32, count, dtype=np.uint32).tobytes())
    return n


def measure(cmd: list[str]) -> dict[str, float]:
    """Seconds of `cmd` and a `sync` after it, with `cmd`'s own time and peak RSS.

    A `sync` first, not timed, starts the command without earlier dirty pages; the
    `sync` after it charges the command with writing back its own output.
    """
    os.sync()
    start = time.perf_counter()
    own = run_and_measure(cmd)
    os.sync()
    return {"wall_s": time.perf_counter() - start, **own}


def run_and_measure(cmd: list[str]) -> dict[str, float]:
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
            }  # type: ignore[dict-item]
        if r.returncode != 0:
            raise RuntimeError(f"{cmd} failed:\n{r.stderr}")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{cmd} failed:\n{proc.stderr.read().decode() if proc.stderr else ''}"
        )
    scale = (
        1 if sys.platform == "darwin" else 1024
    )  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"command_s": wall, "peak_rss": usage.ru_maxrss * scale, "via": "os.wait4"}  # type: ignore[dict-item]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size-gb", type=float, default=1.0, help="checkpoint size (GB)"
    )
    parser.add_argument("--quick", action="store_true", help="a ~20 MB smoke run")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--tmpdir", type=Path, help="where to write the checkpoints")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive script")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per step; the median time is kept"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size_gb = 0.02
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32)
    py = sys.executable
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        src = folder / "model.safetensors"
        n = write_checkpoint(src, int(args.size_gb * 1e9), dtype, args.quick)
        size = src.stat().st_size
        runs: dict[str, list[str]] = {
            "cp": ["cp", str(src), str(folder / "copy.safetensors")],
            "python -c 'import stackedtree.checkpoint'": [
                py,
                "-c",
                "import stackedtree.checkpoint",
            ],
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
        if not args.no_naive:
            if dtype == np.dtype(ml_dtypes.bfloat16):
                print(
                    "note: safetensors.numpy cannot load bfloat16; skipping the naive script"
                )
            else:
                runs["naive (load_file + np.stack + save_file)"] = [
                    py,
                    "-c",
                    NAIVE,
                    str(src),
                    str(folder / "naive.safetensors"),
                ]
        outputs = {
            label: Path(cmd[-2] if cmd[-1] == "-q" else cmd[-1])
            for label, cmd in runs.items()
        }
        outputs["python -c 'import stackedtree.checkpoint'"] = folder / "none"
        results: dict[str, dict[str, Any]] = {}
        for label, cmd in runs.items():
            trials = []
            for _ in range(1 if args.quick else args.repeat):
                outputs[label].unlink(missing_ok=True)  # each run writes a fresh file
                trials.append(measure(cmd))
            walls = sorted(t["wall_s"] for t in trials)
            results[label] = {
                "wall_s": walls[len(walls) // 2],
                "wall_s_all": walls,
                "command_s_all": [t["command_s"] for t in trials],
                "peak_rss": max(t["peak_rss"] for t in trials),
                "via": trials[0]["via"],
            }
        identical = filecmp.cmp(src, folder / "back.safetensors", shallow=False)
        (folder / "copy.safetensors").unlink(missing_ok=True)

    cp_time = results["cp"]["wall_s"]
    base = results["python -c 'import stackedtree.checkpoint'"]["peak_rss"]
    for r in results.values():
        r["time_vs_cp"] = r["wall_s"] / cp_time if cp_time > 0 else float("nan")
        r["rss_fraction"] = r["peak_rss"] / size
        r["rss_above_startup_fraction"] = max(0, r["peak_rss"] - base) / size
    print(
        f"checkpoint: {size / 1e9:.2f} GB ({size} bytes), {n} layers, {args.dtype}; "
        f"unstack(stack(src)) byte-identical to src: {identical}"
    )
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    print(
        f"median of {1 if args.quick else args.repeat} runs per step, each timed with a "
        f"sync after it (peak RSS from {results['cp']['via']})"
    )
    print()
    print(
        "| step | time with sync (s) | time / cp | peak RSS (MiB) | RSS / ckpt | (RSS - start-up) / ckpt |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        print(
            f"| {label} | {r['wall_s']:.2f} | {r['time_vs_cp']:.2f} | {r['peak_rss'] / 2**20:.0f} "
            f"| {r['rss_fraction']:.3f} | {r['rss_above_startup_fraction']:.3f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "checkpoint_bytes": size,
                    "num_layers": n,
                    "dtype": args.dtype,
                    "roundtrip_identical": identical,
                    "timed_with_sync": True,
                    "machine": platform.platform(),
                    "results": results,
                },
                indent=2,
            )
        )
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
