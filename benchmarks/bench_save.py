"""Saving sharded stacked arrays as a per-layer checkpoint: `save_sharded` against `cp`.

Builds Llama-shaped stacked arrays (Hugging Face names with `{i}`, bfloat16, about
`--size-gb`) on 8 fake CPU devices (one mesh axis `x`), under three shardings:

- `layer`: the layer axis split over the 8 devices (`P("x")`; the other tensors split
  along their first dimension);
- `hidden`: the model dimension split wherever it is, the layer axis whole;
- `replicated`: every tensor on every device.

and saves them as one per-layer `.safetensors` file, each save in a fresh process that
measures the call alone (after imports and a warm-up save): wall time including a
`sync` after it, bytes written (`wchar` of `/proc/self/io`) and peak resident memory
above the start (`VmHWM` after resetting it through `/proc/self/clear_refs`) minus the
arrays' own bytes (on CPU the devices' memory is host memory). Savers:

- `save_sharded`;
- the naive way: gather every array to the host (`np.asarray`), `unstack_by_name`,
  `save_flat` (what a script without `save_sharded` does; it cannot run on many hosts,
  where no process can gather an array that others hold part of);
- each of 2 processes (`jax.distributed` on 127.0.0.1, 4 devices each) saving with
  the layer axis split, and with everything replicated.

Right after each save, `cp` of the file it wrote, followed by `sync`, is timed, and
the save's time is divided by that (medians of `--repeat` such pairs), so that a busy
machine slows both sides of a ratio alike. Bytes written are divided by the process's
share of the tensor bytes (all of them for one process, half for each of two); memory
by one layer's largest tensor and by the checkpoint.

    python benchmarks/bench_save.py                # about 1 GB
    python benchmarks/bench_save.py --quick        # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from _proc import available, io_bytes, run_processes, status_bytes

DEVICES = 8
PATTERN = "model.layers.{i}."
SHARDINGS = ("layer", "hidden", "replicated")


def model_shape(size_bytes: float, quick: bool) -> dict[str, Any]:
    """Llama dimensions and a layer count (a multiple of 8) for about `size_bytes`."""
    d, f, vocab = (256, 688, 1024) if quick else (1024, 2752, 32000)
    per_layer = (4 * d * d + 3 * d * f + 2 * d) * 2
    fixed = (2 * vocab * d + d) * 2
    n = max(DEVICES, DEVICES * math.ceil((size_bytes - fixed) / per_layer / DEVICES))
    return {
        "d_model": d,
        "d_ff": f,
        "vocab": vocab,
        "num_layers": n,
        "bytes": n * per_layer + fixed,
        "largest_layer_tensor": f * d * 2,
    }


def stacked_specs(shape: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """The stacked names and shapes of `shape`'s model, in Hugging Face order."""
    d, f, vocab, n = (shape[k] for k in ("d_model", "d_ff", "vocab", "num_layers"))
    layer = [
        ("input_layernorm.weight", (d,)),
        ("self_attn.q_proj.weight", (d, d)),
        ("self_attn.k_proj.weight", (d, d)),
        ("self_attn.v_proj.weight", (d, d)),
        ("self_attn.o_proj.weight", (d, d)),
        ("post_attention_layernorm.weight", (d,)),
        ("mlp.gate_proj.weight", (f, d)),
        ("mlp.up_proj.weight", (f, d)),
        ("mlp.down_proj.weight", (d, f)),
    ]
    return [
        ("model.embed_tokens.weight", (vocab, d)),
        *[(PATTERN + key, (n, *s)) for key, s in layer],
        ("model.norm.weight", (d,)),
        ("lm_head.weight", (vocab, d)),
    ]


def spec_for(kind: str, name: str, shape: tuple[int, ...], d: int) -> Any:
    from jax.sharding import PartitionSpec as P

    if kind == "replicated" or len(shape) < 2:
        return P()
    if kind == "layer":
        return P("x")
    dims = [j for j, size in enumerate(shape) if size == d]
    entries: list[str | None] = [None] * len(shape)
    entries[dims[-1]] = "x"
    return P(*entries)


# ----------------------------------------------------------------- one save, in a child


def _arrays(config: dict[str, Any]) -> dict[str, Any]:
    """Random finite bfloat16 arrays, each block made where it is placed."""
    import jax
    import ml_dtypes
    import numpy as np
    from jax.sharding import AxisType, NamedSharding

    mesh = jax.make_mesh((DEVICES,), ("x",), axis_types=(AxisType.Auto,))
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def block(name: str, index: Any, shape: tuple[int, ...]) -> Any:
        box = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        rng = np.random.default_rng(zlib.crc32(f"{name}{box}".encode()))
        size = math.prod(b - a for a, b in box)
        raw = np.frombuffer(rng.bytes(2 * size), np.uint16) & 0xBFFF
        return raw.view(bf16).reshape(tuple(b - a for a, b in box))

    out = {}
    for name, shape in stacked_specs(config["shape"]):
        spec = spec_for(config["sharding"], name, shape, config["shape"]["d_model"])
        out[name] = jax.make_array_from_callback(
            shape,
            NamedSharding(mesh, spec),
            lambda index, name=name, shape=shape: block(name, index, shape),
        )
    return out


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Runs one save as `config` says, in this (fresh) process; returns the figures."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={config['local_devices']}"
    )
    import gc

    import jax
    import numpy as np

    from stackedtree.checkpoint import save_flat, save_sharded, unstack_by_name

    processes = 1
    if config.get("process") is not None:
        processes = config["processes"]
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{config['port']}",
            num_processes=processes,
            process_id=config["process"],
            initialization_timeout=60,
        )
    arrays = jax.block_until_ready(_arrays(config))
    out = Path(config["out"])
    # Warm up what a first save imports and allocates, so it is not counted.
    save_sharded(out.with_name("warm.safetensors"), {"w": arrays["model.norm.weight"]})
    if config.get("process", 0) == 0:
        os.unlink(out.with_name("warm.safetensors"))
    gc.collect()
    start_rss = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    w0, t0 = io_bytes("wchar"), time.perf_counter()
    if config["saver"] == "naive":
        flat = {name: np.asarray(x) for name, x in arrays.items()}
        stacked = {k.removeprefix(PATTERN): v for k, v in flat.items() if "{i}" in k}
        rest = {k: v for k, v in flat.items() if "{i}" not in k}
        save_flat(out, unstack_by_name(stacked, PATTERN, rest))
        del flat, stacked, rest
    else:
        save_sharded(out, arrays)
    os.sync()
    seconds = time.perf_counter() - t0
    written = io_bytes("wchar") - w0
    peak = status_bytes("VmHWM")
    data = sum(x.nbytes for x in arrays.values())
    if config.get("process") is not None:
        jax.distributed.shutdown()
    return {
        "seconds": seconds,
        "written": written,
        "share": data / processes,
        # The arrays were made before the start: what is above it is the save's.
        "extra_rss": peak - start_rss,
    }


def _command(config: dict[str, Any]) -> list[str]:
    return [sys.executable, __file__, "--child", json.dumps(config)]


def run_child(config: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    out = subprocess.run(
        _command(config), capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_two_processes(
    config: dict[str, Any], timeout: float = 900
) -> list[dict[str, Any]]:
    return run_processes(_command, config, "2-process save", timeout)


def time_cp(path: Path) -> float:
    """Wall seconds of `cp` of `path` and a `sync` after it; the copy removed after."""
    copy = path.with_name("copy.safetensors")
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", str(path), str(copy)], check=True)
    os.sync()
    seconds = time.perf_counter() - t0
    copy.unlink()
    return seconds


# ----------------------------------------------------------------- report


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def headline(results: dict[str, Any]) -> list[tuple[str, float | None]]:
    """Time against `cp`, and host memory beyond the arrays, of the sharded saves."""
    rows = {(r["sharding"], r["saver"]): r for r in results["runs"]}
    out: list[tuple[str, float | None]] = []
    layer = rows.get(("layer", "save_sharded"))
    if layer is not None:
        out.append(
            ("save_sharded / cp, time, layer axis split, 8 devices", layer["vs_cp"])
        )
    naive = rows.get(("hidden", "naive"))
    hidden = rows.get(("hidden", "save_sharded"))
    if hidden is not None and naive is not None and "extra_rss" in naive:
        out.append(
            (
                "naive gather-then-save extra host memory / save_sharded's, hidden",
                naive["extra_rss"] / max(hidden["extra_rss"], 1),
            )
        )
    return out


def report(results: dict[str, Any]) -> str:
    """The markdown section of these results."""
    ck = results["model"]
    lines = [
        "### Saving sharded stacked arrays per layer (`save_sharded`)",
        "",
        f"_{ck['bytes'] / 1e9:.2f} GB of stacked arrays ({ck['num_layers']} layers, "
        f"bfloat16) on {DEVICES} fake CPU devices, saved as one per-layer "
        f".safetensors file; {results['conditions']}. Medians of {results['repeat']} "
        "runs: time / cp is the save's wall seconds (with a `sync` after it) over "
        "those of `cp` of the file it wrote and a `sync`, run right after. "
        "written / share: bytes the process wrote (`wchar`) over its share of the "
        "tensor bytes (all of them for one process, half for each of two). extra: "
        "peak RSS above the start, less the arrays, over one layer's largest tensor "
        f"({ck['largest_layer_tensor'] / 2**20:.1f} MiB) and over the checkpoint._",
        "",
        "| sharding | saver | time / cp | written / share | extra / layer "
        "| extra / ckpt |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in results["runs"]:
        if row.get("skipped"):
            lines.append(f"| {row['sharding']} | {row['saver']} | {row['skipped']} |||")
            continue
        lines.append(
            f"| {row['sharding']} | {row['saver']} | {_f(row['vs_cp'])} "
            f"| {_f(row['written'] / row['share'], 3)} "
            f"| {_f(row['extra_rss'] / ck['largest_layer_tensor'])} "
            f"| {_f(row['extra_rss'] / ck['bytes'], 3)} |"
        )
    lines += ["", f"`cp` + `sync` of the file: {results['cp_seconds']:.2f} s (median)."]
    return "\n".join(lines)


# ----------------------------------------------------------------- main


def _measure(
    base: dict[str, Any], repeat: int, sharding: str, saver: str
) -> list[dict[str, Any]]:
    """`repeat` runs of one row (two rows for two processes), each with its `cp`."""
    config = {**base, "sharding": sharding, "saver": saver.split()[0]}
    out = Path(config["out"])
    trials: list[list[dict[str, Any]]] = []
    for _ in range(repeat):
        if saver.startswith("two"):
            config["local_devices"] = DEVICES // 2
            runs = run_two_processes(config)
        else:
            runs = [run_child(config)]
        cp = time_cp(out)
        for r in runs:
            r["cp_seconds"], r["vs_cp"] = cp, r["seconds"] / cp
        trials.append(runs)
        (shutil.rmtree if out.is_dir() else os.unlink)(out)
    rows = []
    for i in range(len(trials[0])):
        ts = [t[i] for t in trials]
        row = {k: statistics.median(t[k] for t in ts) for k in ts[0]}
        label = saver if len(trials[0]) == 1 else f"process {i} of 2"
        rows.append({"sharding": sharding, "saver": label, **row})
        print(
            f"{sharding:10} {label:14} {row['vs_cp']:6.2f} x cp, wrote "
            f"{row['written'] / row['share']:.3f} x share, extra "
            f"{row['extra_rss'] / 2**20:.1f} MiB",
            flush=True,
        )
    return rows


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

    cli = parser(__doc__)
    cli.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size")
    cli.add_argument("--repeat", type=int, default=3, help="runs per row (median)")
    cli.add_argument("--tmpdir", type=Path, help="where to write the checkpoint")
    args, machine, t0 = start(cli, argv)
    shape = model_shape(8e6 if args.quick else args.size_gb * 1e9, args.quick)
    repeat = 1 if args.quick else args.repeat
    print(f"model: {shape['bytes'] / 1e9:.3f} GB, {shape['num_layers']} layers")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        base = {
            "shape": shape,
            "local_devices": DEVICES,
            "out": str(folder / "model.safetensors"),
        }
        # --quick runs each saver once, the naive one and two processes on one
        # sharding only: every run starts fresh processes.
        for sharding in SHARDINGS:
            rows += _measure(base, repeat, sharding, "save_sharded")
            if args.quick and sharding != "hidden":
                continue
            # naive: the arrays, their gathered host copies, and the file's pages
            if shape["bytes"] * 3.5 < available():
                rows += _measure(base, repeat, sharding, "naive")
            else:
                rows.append(
                    {"sharding": sharding, "saver": "naive", "skipped": "(memory)"}
                )
        for sharding in ("layer",) if args.quick else ("layer", "replicated"):
            rows += _measure(base, repeat, sharding, "two processes")
    results = {
        "benchmark": "bench_save",
        "quick": args.quick,
        "model": shape,
        "cp_seconds": statistics.median(
            r["cp_seconds"] for r in rows if "cp_seconds" in r
        ),
        "repeat": repeat,
        "conditions": "page cache warm, a `sync` after each save and each `cp`",
        "machine": machine,
        "runs": rows,
        "wall_s": time.perf_counter() - t0,
    }
    finish(args, results, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
