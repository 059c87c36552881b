"""Loading a per-layer checkpoint into sharded stacked arrays: `load_sharded` against `cp`.

Writes a random per-layer safetensors checkpoint with Hugging Face Llama names and
shapes, in 4 shards with an index (about `--size-gb`, bfloat16), then loads it into
stacked arrays on 8 fake CPU devices (one mesh axis `x`) under three shardings:

- `layer`: the layer axis split over the 8 devices (`P("x")`; the other tensors split
  along their first dimension);
- `hidden`: the model dimension split wherever it is (the last dimension of size
  d_model: the columns of q/k/v/o/gate/up, the rows of down), the layer axis whole;
- `replicated`: every tensor on every device.

Each load runs in a fresh process and measures the load call alone (after imports and
a warm-up): wall time, bytes read (`rchar` of `/proc/self/io`), and peak resident
memory above the start (`VmHWM` after resetting it through `/proc/self/clear_refs`)
minus the arrays' own bytes (their distinct buffers: on CPU the devices' memory is
host memory). Loaders:

- `load_sharded`, and for `hidden` also forced to read strided or by rows (the two
  ways to read blocks whose rows are split across devices);
- the naive way: `load_flat` + `stack_by_name` + `jax.device_put`;
- one of 2 processes (`jax.distributed` on 127.0.0.1, 4 devices each) loading with
  the layer axis split over all 8 devices;
- and `cp` of the checkpoint's files, the floor for moving the bytes.

Then a Qwen3-MoE-shaped checkpoint of about the same size loads with its expert axis
split over the 8 devices (`experts`: `P(None, "x")`, the rest replicated), by
`load_sharded`, the naive way and 2 processes, each reading its own experts' bytes.

The page cache is warm (the checkpoint was just written and fits in memory) and there
is no write-back in flight (`sync` before every run). Each load runs right after a `cp`
of the same files, and its wall and CPU times are divided by that `cp`'s (medians of
`--repeat` such pairs), so that a busy machine slows both sides of a ratio alike. Bytes
read are divided by the process's share of the checkpoint, memory by one layer's
largest tensor and by the checkpoint.

    python benchmarks/bench_load.py                # about 1 GB
    python benchmarks/bench_load.py --quick        # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _moe import moe_names, moe_note, naive_stack
from _proc import available, io_bytes, run_processes, status_bytes

DEVICES = 8
PATTERN = "model.layers.{i}."
SHARDINGS = ("layer", "hidden", "replicated")

# ----------------------------------------------------------------- the checkpoint


def write_checkpoint(
    folder: Path, size_bytes: float, quick: bool, moe: bool = False
) -> dict[str, Any]:
    """Random bf16 bits, Llama- (`moe`: Qwen3-MoE-) shaped: 4 shards, an index."""
    import ml_dtypes
    import numpy as np

    from stackedtree.checkpoint._io import safetensors_header

    bf16 = np.dtype(ml_dtypes.bfloat16)

    d, f, vocab = (256, 688, 1024) if quick else (1024, 2752, 32000)
    per_layer = (4 * d * d + 3 * d * f + 2 * d) * 2
    fixed = (2 * vocab * d + d) * 2
    n = max(DEVICES, DEVICES * math.ceil((size_bytes - fixed) / per_layer / DEVICES))
    from _hf_names import hf_llama_names

    specs = hf_llama_names(d, f, vocab, n)
    if moe:  # experts of a quarter of the Llama MLP each, one per device
        per_layer = (4 * d * d + 2 * d + DEVICES * (3 * d * (f // 4) + d)) * 2
        n = max(2, 1 + math.ceil((size_bytes - fixed) / per_layer))
        specs = moe_names(d, f // 4, vocab, n, DEVICES)
    folder.mkdir(exist_ok=True)
    shards = [specs[k::4] for k in range(4)]
    rng = np.random.default_rng(0)
    weight_map = {}
    files = []
    for k, part in enumerate(shards):
        path = folder / f"model-{k + 1:05d}-of-00004.safetensors"
        files.append(path)
        with open(path, "wb") as out:
            out.write(safetensors_header([(name, bf16, s) for name, s in part]))
            for name, shape in part:
                raw = rng.integers(0, 2**16, math.prod(shape), dtype=np.uint16)
                # Finite bfloat16 values: clear the top exponent bit.
                out.write((raw & 0xBFFF).astype("<u2").tobytes())
                weight_map[name] = path.name
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {
        "index": str(index),
        "files": [str(p) for p in files],
        "bytes": sum(p.stat().st_size for p in files),
        "num_layers": n,
        "d_model": d,
        "d_ff": f,
        "vocab": vocab,
        "largest_layer_tensor": f * d * 2,
    }


# ----------------------------------------------------------------- one load, in a child


def spec_for(kind: str, shape: tuple[int, ...], d: int) -> Any:
    from jax.sharding import PartitionSpec as P

    if kind == "replicated" or not shape:
        return P()
    if kind == "layer":
        return P("x")
    dims = [j for j, size in enumerate(shape) if size == d]
    entries: list[str | None] = [None] * len(shape)
    entries[dims[-1]] = "x"
    return P(*entries)


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Runs one load as `config` says, in this (fresh) process; returns the figures."""
    local = config["local_devices"]
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={local}"
    )
    import gc

    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from stackedtree.checkpoint import _sharded, load_flat

    if config.get("process") is not None:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{config['port']}",
            num_processes=config["processes"],
            process_id=config["process"],
            initialization_timeout=60,
        )
    options = _sharded.ReadOptions()
    if config.get("strided_min_run") is not None:
        options = _sharded.ReadOptions(strided_min_run=config["strided_min_run"])
    mesh = jax.make_mesh((DEVICES,), ("x",), axis_types=(AxisType.Auto,))
    kind, d = config["sharding"], config["d_model"]

    def sharding(name: str, shape: tuple[int, ...], dtype: Any) -> NamedSharding:
        if kind == "experts":  # expert parallelism: experts split, the rest whole
            spec = P(None, "x") if "{e}" in name else P()
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, spec_for(kind, shape, d))

    # Warm up what a first transfer allocates, so it is not counted.
    warm = np.zeros((DEVICES, d), np.float32)
    jax.block_until_ready(
        jax.make_array_from_callback(
            warm.shape, sharding("w", warm.shape, None), lambda i: warm[i]
        )
    )
    gc.collect()
    start_rss = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    r0, t0, c0 = io_bytes("rchar"), time.perf_counter(), time.process_time()
    if config["loader"] == "naive":
        flat = load_flat(config["index"])
        named = naive_stack(flat, PATTERN)
        arrays = jax.device_put(
            named, {k: sharding(k, v.shape, v.dtype) for k, v in named.items()}
        )
        del flat, named
    else:
        arrays = _sharded.load_with(config["index"], sharding, options, pattern=PATTERN)
    jax.block_until_ready(arrays)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    read = io_bytes("rchar") - r0
    peak = status_bytes("VmHWM")
    buffers: dict[int, int] = {}
    share = 0
    for x in arrays.values():
        seen = set()
        for s in x.addressable_shards:
            buffers[s.data.unsafe_buffer_pointer()] = s.data.nbytes
            key = tuple((sl.start, sl.stop) for sl in s.index)
            if key not in seen:
                seen.add(key)
                share += s.data.nbytes
    held = sum(buffers.values())
    if config.get("process") is not None:
        jax.distributed.shutdown()
    return {
        "seconds": seconds,
        "cpu": cpu,
        "read": read,
        "share": share,
        "held": held,
        "extra_rss": peak - start_rss - held,
    }


def run_child(config: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_two_processes(
    config: dict[str, Any], timeout: float = 600
) -> list[dict[str, Any]]:
    def command(c: dict[str, Any]) -> list[str]:
        return [sys.executable, __file__, "--child", json.dumps(c)]

    return run_processes(command, config, "2-process load", timeout)


def time_cp(files: list[str], folder: Path) -> tuple[float, float]:
    """Wall and CPU seconds of `cp` of `files`, the copies removed after."""
    dest = folder / "copies"
    dest.mkdir(exist_ok=True)
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(["cp", *files, str(dest)])
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("cp failed")
    for p in dest.iterdir():
        p.unlink()
    os.sync()
    return seconds, usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------- report


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def headline(results: dict[str, Any]) -> list[tuple[str, float | None]]:
    """Time against `cp`, and host memory beyond the arrays, of the sharded loads."""
    largest = results["checkpoint"]["largest_layer_tensor"]
    rows = {(r["sharding"], r["loader"]): r for r in results["runs"]}
    out: list[tuple[str, float | None]] = []
    layer = rows.get(("layer", "load_sharded"))
    if layer is not None:
        out.append(
            (
                "load_sharded / cp, time, layer axis split, 8 devices",
                layer["seconds_vs_cp"],
            )
        )
    hidden = rows.get(("hidden", "load_sharded"))
    if hidden is not None:
        out.append(
            (
                "load_sharded extra host memory / largest layer tensor, hidden split",
                hidden["extra_rss"] / largest,
            )
        )
    return out


def report(results: dict[str, Any]) -> str:
    """The markdown section of these results."""
    ck = results["checkpoint"]
    lines = [
        "### Loading into sharded stacked arrays (`load_sharded`)",
        "",
        f"_{ck['bytes'] / 1e9:.2f} GB per-layer checkpoint ({ck['num_layers']} "
        f"layers, bfloat16, 4 shards + index), {DEVICES} fake CPU devices; "
        f"{results['conditions']}. Medians of {results['repeat']} runs, each "
        "right after a `cp` of the same files: time / cp and CPU / cp are its wall "
        "and CPU (user + system) seconds over that `cp`'s. read / share: bytes the "
        "process read over the bytes of the blocks its devices hold. extra: peak "
        "RSS above the start, less the arrays, over one layer's largest tensor "
        f"({ck['largest_layer_tensor'] / 2**20:.1f} MiB) and over the checkpoint._",
        "",
        "| sharding | loader | time / cp | CPU / cp | read / share | extra / layer "
        "| extra / ckpt |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    cp = results["cp_seconds"]
    for row in results["runs"]:
        if row.get("skipped"):
            lines.append(
                f"| {row['sharding']} | {row['loader']} | {row['skipped']} | | | | |"
            )
            continue
        lines.append(
            f"| {row['sharding']} | {row['loader']} | {_f(row['seconds_vs_cp'])} "
            f"| {_f(row['cpu_vs_cp'])} "
            f"| {_f(row['read'] / row['share'], 3)} "
            f"| {_f(row['extra_rss'] / ck['largest_layer_tensor'])} "
            f"| {_f(row['extra_rss'] / ck['bytes'], 3)} |"
        )
    lines += [
        "",
        f"`cp` of the {len(ck['files'])} files: {cp:.2f} s (median). Blocks whose rows "
        "are split "
        "across devices (`hidden`) are read strided when their runs are at least "
        f"{results['strided_min_run']} bytes, else by rows; the two forced rows "
        "compare them.",
        *moe_note(results, DEVICES),
    ]
    return "\n".join(lines)


def measure_loaders(
    ck: dict[str, Any], folder: Path, repeat: int, *, size: float, quick: bool
) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
    """Every loader under every sharding, each run right after a `cp` of the same bytes,
    then a mixture of experts of `size` bytes with its experts split over the devices:
    `(rows, median cp seconds, the MoE checkpoint)`, a row per sharding and loader."""
    base = {
        "index": ck["index"],
        "d_model": ck["d_model"],
        "local_devices": DEVICES,
    }
    rows: list[dict[str, Any]] = []
    cps: list[float] = []

    def summary(sharding: str, loader: str, trials: list[dict[str, Any]]) -> None:
        row = {k: statistics.median(t[k] for t in trials) for k in trials[0]}
        for k in ("seconds", "cpu"):
            row[k + "_vs_cp"] = statistics.median(t[k] / t["cp_" + k] for t in trials)
        rows.append({"sharding": sharding, "loader": loader, **row})
        print(
            f"{sharding:10} {loader:24} {row['seconds_vs_cp']:6.2f} x cp "
            f"({row['cpu_vs_cp']:.2f} x cp's CPU time)",
            flush=True,
        )

    def with_cp(run: Any, files: list[str] | None = None) -> Any:
        """`run()`, right after a `cp` of the same bytes, whose times it carries."""
        cp_seconds, cp_cpu = time_cp(files or ck["files"], folder)
        cps.append(cp_seconds)
        out = run()
        for r in out if isinstance(out, list) else [out]:
            r["cp_seconds"], r["cp_cpu"] = cp_seconds, cp_cpu
        return out

    def measure(sharding: str, loader: str, **extra: Any) -> None:
        config = {
            **base,
            "sharding": sharding,
            "loader": loader.split()[0],
            **extra,
        }
        summary(
            sharding,
            loader,
            [with_cp(lambda: run_child(config)) for _ in range(repeat)],
        )

    for sharding in SHARDINGS:
        measure(sharding, "load_sharded")
        if sharding == "hidden":
            measure(sharding, "load_sharded (strided)", strided_min_run=0)
            measure(sharding, "load_sharded (rows)", strided_min_run=1 << 62)
        # naive: the flat load, its stacked copy, and the device copies
        need = ck["bytes"] * (2 + (DEVICES if sharding == "replicated" else 1))
        if need * 1.5 < available():
            measure(sharding, "naive")
        else:
            rows.append(
                {"sharding": sharding, "loader": "naive", "skipped": "(memory)"}
            )
    two = {**base, "sharding": "layer", "loader": "load_sharded"}
    two["local_devices"] = DEVICES // 2
    pairs = [with_cp(lambda: run_two_processes(two)) for _ in range(repeat)]
    for i in range(2):
        summary("layer", f"process {i} of 2", [p[i] for p in pairs])
    moe = write_checkpoint(folder / "moe", size, quick, moe=True)
    mbase = {**base, "index": moe["index"], "sharding": "experts"}
    for c in ({**mbase, "loader": "load_sharded"}, {**mbase, "loader": "naive"}):
        run = lambda c=c: run_child(c)  # noqa: E731
        summary(
            "experts (MoE)",
            c["loader"],
            [with_cp(run, moe["files"]) for _ in range(repeat)],
        )
    two = {**mbase, "loader": "load_sharded", "local_devices": DEVICES // 2}
    pair = lambda: run_two_processes(two)  # noqa: E731
    pairs = [with_cp(pair, moe["files"]) for _ in range(repeat)]
    for i in range(2):
        summary("experts (MoE)", f"process {i} of 2", [p[i] for p in pairs])
    return rows, statistics.median(cps), moe


# ----------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    # A child process sets its own device count before jax starts, so the shared
    # module (which imports jax) is imported only in the parent.
    if (argv is None and "--child" in sys.argv) or (argv and "--child" in argv):
        child_parser = argparse.ArgumentParser()
        child_parser.add_argument("--child")
        config, _ = child_parser.parse_known_args(argv)
        print(json.dumps(child(json.loads(config.child))))
        return 0
    from _report import finish, parser, start

    options = parser(__doc__)
    options.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size")
    options.add_argument("--repeat", type=int, default=5, help="runs per row (median)")
    options.add_argument("--tmpdir", type=Path, help="where to write the checkpoint")
    args, machine, t0 = start(options, argv)
    from stackedtree.checkpoint import _sharded

    size = 8e6 if args.quick else args.size_gb * 1e9
    repeat = 1 if args.quick else args.repeat
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        ck = write_checkpoint(folder, size, args.quick)
        print(
            f"checkpoint: {ck['bytes'] / 1e9:.3f} GB, {ck['num_layers']} layers",
            flush=True,
        )
        rows, cp, moe = measure_loaders(ck, folder, repeat, size=size, quick=args.quick)
    results = {
        "benchmark": "bench_load",
        "quick": args.quick,
        "checkpoint": ck,
        "moe_checkpoint": moe,
        "cp_seconds": cp,
        "repeat": repeat,
        "strided_min_run": _sharded.STRIDED_MIN_RUN,
        "conditions": "warm page cache, no write-back in flight (sync before each run)",
        "machine": machine,
        "runs": rows,
        "wall_s": time.perf_counter() - t0,
    }
    finish(args, results, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
