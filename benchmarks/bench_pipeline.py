"""Pipelining on 8 fake CPU devices: bytes per device, collectives, schedule length.

Compares the gradient step of the Llama-style decoder stack (examples/llama_model.py)
run four ways on 8 devices:

- `pipeline R=1`: `pipeline_layers`, GPipe, on a ('stage', 'data') mesh of 4 x 2;
- `pipeline R=2`: the same with a circular schedule of 2 repeats;
- `scan FSDP`: `scan_layers` with every parameter sharded over all 8 devices on a
  non-layer dimension (FSDP style; XLA gathers each layer before use) and the batch
  split 8 ways;
- `scan DP`: `scan_layers` with the parameters replicated, the batch split 8 ways.

For each it reports the parameter bytes held by one device, XLA's temporary bytes of
the compiled step (activations kept for the backward pass, gathered parameters), and
the collectives in the compiled step: how many of each kind the HLO holds, how many run
per step (an op in a loop body counts once per trip), and the bytes they produce per
step. All four must give the same loss and gradient.

It also compiles the pipeline for S=4 stages, M in {4, 8, 16} microbatches and R in
{1, 2} repeats, reads the trip count of its loop from the compiled HLO and checks it
against `R * M + S - 1`, giving the bubble fraction `(S - 1) / (R * M + S - 1)`.

The 8 devices are fake CPU devices sharing the machine's cores, so step times say
nothing about a real pipeline: this benchmark reports counts and bytes, not speed-ups.

Run `python benchmarks/bench_pipeline.py [--quick] [--json PATH]`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import _env  # noqa: F401  (before jax: examples/ on the path, --quick flags)

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import _train_step as T
import jax
import jax.numpy as jnp
import numpy as np
from _hlo import temp_bytes
from _models import LLAMA_QUICK, LLAMA_SMALL, llama_loss_value
from _plots import Plot
from _report import finish, log, parser, ratio, start, table
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from llama_model import Config, decoder_block, init_block

from stackedtree import (
    init_stacked,
    pipeline_layers,
    scan_layers,
    stage_layers,
    unstage_layers,
)

STAGES = 4
KINDS = (
    "collective-permute",
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
)
SHORT = {
    "collective-permute": "permute",
    "all-gather": "gather",
    "all-reduce": "reduce",
    "reduce-scatter": "r-scatter",
    "all-to-all": "a2a",
}
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8}

# --------------------------------------------------------------------------------------
# Reading the compiled HLO


_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(")
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) ([a-z][a-z0-9-]*)\(")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
        total += size * DTYPE_BYTES.get(dtype, 4)
    return total


def hlo_collectives(text: str) -> dict[str, dict[str, int]]:
    """Collectives of a compiled HLO module: static count, runs per step, bytes per step.

    Runs per step multiply an op by the known trip counts of the while loops around it.
    """
    ops: dict[str, list[tuple[str, int]]] = {}  # computation -> [(kind, bytes)]
    calls: dict[str, list[tuple[str, int]]] = {}  # computation -> [(callee, times)]
    entry, current = "", ""
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            entry = current if line.startswith("ENTRY") else entry
            ops[current], calls[current] = [], []
            continue
        m = _OP.match(line)
        if not m or not current:
            continue
        shape, op = m.groups()
        kind = op.removesuffix("-start")
        if kind in KINDS:
            ops[current].append((kind, _shape_bytes(shape)))
        if op == "while":
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            body = re.search(r"body=%([^\s,]+)", line)
            if body:
                calls[current].append(
                    (body.group(1), int(trips.group(1)) if trips else 1)
                )
        for callee in re.findall(r"(?:calls|to_apply|condition)=%([^\s,]+)", line):
            calls[current].append((callee, 1))
    runs: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        runs[name] = runs.get(name, 0) + times
        for callee, n in calls.get(name, []):
            visit(callee, times * n)

    visit(entry, 1)
    out = {k: {"in_hlo": 0, "per_step": 0, "bytes_per_step": 0} for k in KINDS}
    for name, found in ops.items():
        for kind, nbytes in found:
            out[kind]["in_hlo"] += 1
            out[kind]["per_step"] += runs.get(name, 0)
            out[kind]["bytes_per_step"] += runs.get(name, 0) * nbytes
    return out


def while_trip_counts(text: str) -> list[int]:
    """Known trip counts of the while loops in the entry computation."""
    counts, in_entry = [], False
    for line in text.splitlines():
        if _COMPUTATION.match(line):
            in_entry = line.startswith("ENTRY")
        elif in_entry and " while(" in line:
            m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            counts.append(int(m.group(1)) if m else -1)
    return counts


# --------------------------------------------------------------------------------------
# The four ways to run the stack


def fsdp_specs(params: Any, axis: str, size: int) -> Any:
    """Each leaf sharded on its first non-layer dimension that `size` divides."""

    def spec(x: jax.Array) -> P:
        for d in range(1, x.ndim):
            if x.shape[d] % size == 0:
                return P(*([None] * d), axis)
        return P()

    return jax.tree.map(spec, params)


def device_bytes(tree: Any) -> int:
    """Bytes of `tree` held by the first device."""
    dev = jax.devices()[0]
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == dev
    )


def variants(
    cfg: Config, params: Any, x: jax.Array, microbatches: int
) -> dict[str, tuple[Callable[..., Any], Any, jax.Array]]:
    """name -> (loss(params, x), params placed on the devices, x placed)."""

    def layer(h: jax.Array, block: Any) -> tuple[jax.Array, None]:
        return decoder_block(block, h, cfg), None

    pipe_mesh = jax.make_mesh(
        (STAGES, 2), ("stage", "data"), axis_types=(AxisType.Auto, AxisType.Auto)
    )
    flat_mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    out = {}
    for repeats in (1, 2):

        def pipe_loss(p: Any, h: jax.Array) -> jax.Array:
            h = pipeline_layers(layer, h, p, mesh=pipe_mesh, microbatches=microbatches)
            return llama_loss_value(h)

        staged = jax.device_put(
            stage_layers(params, STAGES, repeats=repeats),
            NamedSharding(pipe_mesh, P(None, "stage")),
        )
        out[f"pipeline R={repeats}"] = (
            pipe_loss,
            staged,
            jax.device_put(x, NamedSharding(pipe_mesh, P("data"))),
        )

    def scan_loss(p: Any, h: jax.Array) -> jax.Array:
        return llama_loss_value(scan_layers(layer, h, p)[0])

    batch = jax.device_put(x, NamedSharding(flat_mesh, P("fsdp")))
    specs = fsdp_specs(params, "fsdp", 8)
    fsdp = jax.device_put(
        params, jax.tree.map(lambda s: NamedSharding(flat_mesh, s), specs)
    )
    out["scan FSDP"] = (scan_loss, fsdp, batch)
    out["scan DP"] = (
        scan_loss,
        jax.device_put(params, NamedSharding(flat_mesh, P())),
        batch,
    )
    return out


def compare(cfg: Config, quick: bool) -> dict[str, Any]:
    n = 8
    cfg = cfg._replace(num_layers=n)
    batch, seq = (16, 8) if quick else (16, 32)
    microbatches = 4
    k_params, k_x = jax.random.split(jax.random.key(0))
    params = init_stacked(lambda k: init_block(k, cfg), k_params, n)
    x = jax.random.normal(k_x, (batch, seq, cfg.d_model), jnp.float32)
    rows: dict[str, Any] = {}
    results: dict[str, tuple[Any, list[np.ndarray]]] = {}
    for name, (loss, p, h) in variants(cfg, params, x, microbatches).items():
        compiled = jax.jit(jax.value_and_grad(loss)).lower(p, h).compile()
        value, grad = compiled(p, h)
        if name.startswith("pipeline"):
            grad = unstage_layers(grad)
        results[name] = (value, [np.asarray(g) for g in jax.tree.leaves(grad)])
        rows[name] = {
            "param_bytes_per_device": device_bytes(p),
            "temp_bytes_per_device": temp_bytes(compiled),
            "collectives": hlo_collectives(compiled.as_text()),
        }
    # Every variant against the plain data-parallel scan.
    want_value, want_grad = results["scan DP"]
    for name, (value, grad) in results.items():
        same = bool(np.allclose(value, want_value, rtol=1e-5)) and all(
            np.allclose(a, b, rtol=1e-4, atol=1e-6)
            for a, b in zip(grad, want_grad, strict=True)
        )
        rows[name]["same_loss_and_grad"] = same
        log(
            f"  {name:13s} params/device {rows[name]['param_bytes_per_device']:>9d} B"
            f"  temp {rows[name]['temp_bytes_per_device']} B  same={same}  "
            + " ".join(
                f"{SHORT[k]}={v['per_step']}"
                for k, v in rows[name]["collectives"].items()
            )
        )
    return {
        "model": {
            "layers": n,
            "d_model": cfg.d_model,
            "d_ff": cfg.d_ff,
            "heads": cfg.q_per_kv * cfg.kv_heads,
            "batch": batch,
            "seq": seq,
            "microbatches": microbatches,
            "param_bytes": sum(int(v.nbytes) for v in jax.tree.leaves(params)),
        },
        "variants": rows,
    }


def schedule(quick: bool) -> list[dict[str, Any]]:
    """Trip count of the pipeline loop against R * M + S - 1, for a tiny stack."""
    mesh = jax.make_mesh(
        (STAGES, 2), ("stage", "data"), axis_types=(AxisType.Auto, AxisType.Auto)
    )
    width, n = 16, 8
    layers = {"w": jnp.ones((n, width, width)) / width}
    x = jnp.ones((32, width))
    out = []
    for repeats in (1, 2):
        for microbatches in (4, 8, 16):
            staged = stage_layers(layers, STAGES, repeats=repeats)

            def forward(
                p: Any, h: jax.Array, m: int = microbatches, mesh: Mesh = mesh
            ) -> jax.Array:
                return pipeline_layers(
                    lambda c, layer: (jnp.tanh(c @ layer["w"]), None),
                    h,
                    p,
                    mesh=mesh,
                    microbatches=m,
                )

            text = jax.jit(forward).lower(staged, x).compile().as_text()
            steps = max(while_trip_counts(text))
            formula = repeats * microbatches + STAGES - 1
            out.append(
                {
                    "stages": STAGES,
                    "repeats": repeats,
                    "microbatches": microbatches,
                    "steps": steps,
                    "formula": formula,
                    "layers_per_step": n // (repeats * STAGES),
                    "bubble": (STAGES - 1) / steps,
                }
            )
            log(
                f"  S={STAGES} R={repeats} M={microbatches:2d}: {steps} steps "
                f"(R*M+S-1 = {formula}), bubble {(STAGES - 1) / steps:.1%}"
            )
    return out


# --------------------------------------------------------------------------------------
# Report


def _kb(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 1024:,.0f}"


def report(results: dict[str, Any]) -> str:
    """The markdown section of this benchmark (tables fit an ~80-column page)."""
    model = results["compare"]["model"]
    rows = results["compare"]["variants"]
    out = [
        "### Pipelining: bytes per device",
        "",
        f"Gradient step of the decoder stack ({model['layers']} layers, d_model "
        f"{model['d_model']}, d_ff {model['d_ff']}; batch {model['batch']} x "
        f"{model['seq']} tokens, {model['microbatches']} microbatches; "
        f"{model['param_bytes'] / 1024:,.0f} KiB of parameters) on 8 devices: "
        "the pipelines on 4 stages x 2 data, the scans 8-way. Temp is XLA's "
        "temporary memory of the compiled step (saved activations, gathered "
        "parameters).",
        "",
        table(
            ["variant", "params (KiB)", "temp (KiB)", "same result"],
            [
                [
                    name,
                    _kb(r["param_bytes_per_device"]),
                    _kb(r["temp_bytes_per_device"]),
                    "yes" if r["same_loss_and_grad"] else "NO",
                ]
                for name, r in rows.items()
            ],
        ),
        "",
        "### Pipelining: collectives per gradient step",
        "",
        "Collectives run per step (an op inside a loop counts once per trip), and the "
        "KiB they produce on one device per step. The pipelines permute activations "
        "where FSDP gathers parameters; their all-reduces include the data-parallel "
        "gradient sum, which XLA on CPU places inside the pipeline's loop (once per "
        "pipeline step) rather than once at the end.",
        "",
        table(
            ["variant", *[SHORT[k] for k in KINDS], "KiB"],
            [
                [
                    name,
                    *[r["collectives"][k]["per_step"] for k in KINDS],
                    _kb(sum(v["bytes_per_step"] for v in r["collectives"].values())),
                ]
                for name, r in rows.items()
            ],
        ),
        "",
        "### Pipelining: schedule length and bubble",
        "",
        "Trip count of the pipeline's loop in the compiled HLO, against "
        "R * M + S - 1, and the idle fraction (S - 1) / steps; each step runs "
        "N / (R * S) layers.",
        "",
        table(
            ["S", "R", "M", "steps", "R*M+S-1", "layers/step", "bubble"],
            [
                [
                    r["stages"],
                    r["repeats"],
                    r["microbatches"],
                    r["steps"],
                    r["formula"],
                    r["layers_per_step"],
                    f"{r['bubble']:.1%}",
                ]
                for r in results["schedule"]
            ],
        ),
        "",
        "The devices are fake CPU devices sharing the machine's cores, so these are "
        "counts and bytes, not timings: a pipeline's speed-up can only be measured on "
        "real devices.",
        "",
        *(T.report_lines(results["train_step"]) if "train_step" in results else []),
    ]
    return "\n".join(out) + "\n"


def plots(results: dict[str, Any]) -> list[Plot]:
    """Temporary memory of the training step against the microbatch count."""
    if "train_step" not in results:  # results from before the training step
        return []
    return T.plot(results["train_step"], results.get("machine") or {})


def headline(results: dict[str, Any]) -> list[tuple[str, float | None]]:
    """The headline rows: what a pipeline moves and holds against FSDP."""
    rows = results["compare"]["variants"]

    def kib(name: str) -> float:
        return sum(v["bytes_per_step"] for v in rows[name]["collectives"].values())

    return [
        (
            "pipeline (R=2) / FSDP scan, collective bytes per step, 8 devices",
            ratio(kib("pipeline R=2"), kib("scan FSDP")),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args, machine, t_start = start(parser(__doc__), argv)
    if jax.device_count() < 8:
        log(
            "needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
        )
        return 2
    cfg = LLAMA_QUICK if args.quick else LLAMA_SMALL
    log("bytes and collectives of the gradient step:")
    compared = compare(cfg, args.quick)
    log("schedule:")
    steps = schedule(args.quick)
    log("training step (pipeline_value_and_grad):")
    train = T.measure(cfg, args.quick, hlo_collectives, while_trip_counts)
    ok = all(r["same_loss_and_grad"] for r in compared["variants"].values()) and all(
        r["steps"] == r["formula"] for r in steps
    )
    ok = ok and all(
        r["trips"][0] == T.expected_trips(r["schedule"], STAGES, r["repeats"], m)
        and r["all_gathers"] == 0
        for r in train["memory"]
        if r["schedule"] != "pipeline_layers + grad" and (m := r["microbatches"])
    )
    results = {
        "benchmark": "bench_pipeline",
        "quick": args.quick,
        "command": "python benchmarks/bench_pipeline.py"
        + (" --quick" if args.quick else ""),
        "machine": machine,
        "compare": compared,
        "schedule": steps,
        "train_step": train,
        "all_match": ok,
        "wall_s": time.perf_counter() - t_start,
    }
    finish(args, results, report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
