"""The pipelined training step (`pipeline_value_and_grad`) for bench_pipeline.

For the Llama-style decoder stack on a ('stage', 'data') mesh of 4 x 2 fake CPU
devices, with the rows of a microbatch fixed (so the batch grows with M):

- XLA's temporary bytes of the compiled step against the microbatch count M, for
  `"1f1b"`, `"gpipe"` and `jax.grad` of `pipeline_layers`;
- the trip counts of the step's loops against the formulas, and the all-gathers in
  its HLO (none: no parameter is gathered);
- step times of the three, alternated in one process (fake devices share the cores:
  the ratios say what the recompute costs in work, not what a real pipeline gains).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from _hlo import temp_bytes
from _plots import FIGSIZE, Plot, plot_where, pyplot
from _report import fmt, log, mb, ratio, table
from _timing import interleaved_steps, summary
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from llama_model import Config, decoder_block, init_block

from stackedtree import (
    init_stacked,
    pipeline_layers,
    pipeline_value_and_grad,
    stage_layers,
)

STAGES, LAYERS, ROWS, SEQ = 4, 8, 2, 16  # ROWS sequences of SEQ per microbatch
NAMES = ("1f1b", "gpipe", "pipeline_layers + grad")


def _steps(cfg: Config, m: int, repeats: int) -> dict[str, Callable[..., Any]]:
    mesh = jax.make_mesh(
        (STAGES, 2), ("stage", "data"), axis_types=(AxisType.Auto, AxisType.Auto)
    )

    def layer(h: jax.Array, block: Any) -> tuple[jax.Array, None]:
        return decoder_block(block, h, cfg), None

    def loss_fn(out: jax.Array, y: jax.Array, head: jax.Array) -> jax.Array:
        return jnp.mean((out * head[None, None, :] - y) ** 2)

    def train(schedule: str) -> Callable[..., Any]:
        def step(p: Any, x: jax.Array, head: jax.Array) -> Any:
            return pipeline_value_and_grad(
                layer, loss_fn, x, p, x, head=head, mesh=mesh, microbatches=m,
                schedule=schedule,
            )  # fmt: skip

        return step

    def grad_of_forward(p: Any, x: jax.Array, head: jax.Array) -> Any:
        def total(p: Any, x: jax.Array, head: jax.Array) -> jax.Array:
            out = pipeline_layers(layer, x, p, mesh=mesh, microbatches=m)
            parts = zip(jnp.split(out, m), jnp.split(x, m), strict=True)
            return jnp.mean(jnp.stack([loss_fn(o, y, head) for o, y in parts]))

        return jax.value_and_grad(total, argnums=(0, 1, 2))(p, x, head)

    fns = {"1f1b": train("1f1b"), "gpipe": train("gpipe")}
    if repeats == 1:
        fns["pipeline_layers + grad"] = grad_of_forward
    return fns


def _args(cfg: Config, m: int, repeats: int) -> tuple[Any, jax.Array, jax.Array]:
    mesh = jax.make_mesh(
        (STAGES, 2), ("stage", "data"), axis_types=(AxisType.Auto, AxisType.Auto)
    )
    k_params, k_x = jax.random.split(jax.random.key(0))
    params = init_stacked(lambda k: init_block(k, cfg), k_params, LAYERS)
    staged = jax.device_put(
        stage_layers(params, STAGES, repeats=repeats),
        NamedSharding(mesh, P(None, "stage")),
    )
    x = jax.random.normal(k_x, (m * ROWS, SEQ, cfg.d_model), jnp.float32)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    return staged, x, jnp.ones((cfg.d_model,))


def measure(
    cfg: Config, quick: bool, collectives: Callable[[str], Any], trips: Any
) -> dict[str, Any]:
    """Temp bytes, trip counts, all-gathers and step times of the training step."""
    ms = [4, 8] if quick else [4, 8, 16, 32]
    rows: list[dict[str, Any]] = []
    timed: dict[str, Callable[[], Any]] = {}
    for repeats in (1, 2):
        for m in ms if repeats == 1 else ms[-1:]:
            args = _args(cfg, m, repeats)
            for name, fn in _steps(cfg, m, repeats).items():
                if quick and name == NAMES[2] and m != ms[0]:
                    continue  # --quick: the plain gradient at the smallest M only
                compiled = jax.jit(fn).lower(*args).compile()
                text = compiled.as_text()
                gathers = collectives(text).get("all-gather", {}).get("per_step", 0)
                row = {
                    "schedule": name,
                    "repeats": repeats,
                    "microbatches": m,
                    "temp_bytes": temp_bytes(compiled),
                    "trips": sorted(trips(text), reverse=True),
                    "all_gathers": gathers,
                }
                rows.append(row)
                log(f"  {name:22s} R={repeats} M={m:2d}: temp {row['temp_bytes']} B, "
                      f"loops {row['trips']}, all-gathers {gathers}")  # fmt: skip
                if repeats == 1 and m == ms[0]:
                    timed[name] = lambda c=compiled, a=args: c(*a)
    times = interleaved_steps(timed, repeats=3 if quick else 10)
    return {
        "rows_per_microbatch": ROWS,
        "seq": SEQ,
        "d_model": cfg.d_model,
        "layers": LAYERS,
        "stages": STAGES,
        "memory": rows,
        "time_microbatches": ms[0],
        "times": {k: summary(v) for k, v in times.items()},
    }


def expected_trips(schedule: str, s: int, r: int, m: int) -> int:
    """The length of the step's main loop: 1F1B's ticks, or GPipe's forward pass."""
    if schedule == "1f1b":
        return r * m + r * s + s - 2
    return r * m + s - 1


def _growth(by: dict[tuple[str, int, int], Any], ms: list[int]) -> list[str]:
    """A line: each schedule's temporary bytes at the largest M over the smallest."""
    if len(ms) < 2:
        return []

    def grown(name: str) -> str:
        first = by.get((name, 1, ms[0]), {}).get("temp_bytes")
        last = by.get((name, 1, ms[-1]), {}).get("temp_bytes")
        return fmt(ratio(last, first))

    return [
        f"From M = {ms[0]} to M = {ms[-1]} the temporary bytes grow "
        f"{grown('1f1b')}x for 1f1b (it reads and writes the batch a microbatch at a "
        f"time and keeps a fixed number of stage inputs) and {grown('gpipe')}x for "
        "gpipe (every microbatch's activations).",
        "",
    ]


def report_lines(res: dict[str, Any]) -> list[str]:
    s = res["stages"]
    mem = res["memory"]
    ms = sorted({r["microbatches"] for r in mem if r["repeats"] == 1})
    by = {(r["schedule"], r["repeats"], r["microbatches"]): r for r in mem}

    def kib(name: str, r: int, m: int) -> str:
        row = by.get((name, r, m))
        return "n/a" if not row or row["temp_bytes"] is None else (
            f"{row['temp_bytes'] / 1024:,.0f}")  # fmt: skip

    med = {k: v["median_s"] for k, v in res["times"].items()}
    out = [
        "### Pipelined training step: memory against microbatches",
        "",
        f"`pipeline_value_and_grad` on the decoder stack ({res['layers']} layers, "
        f"d_model {res['d_model']}, {res['rows_per_microbatch']} sequences of "
        f"{res['seq']} tokens per microbatch, so the batch grows with M), 4 stages x 2 "
        "data: XLA's temporary KiB per device of the compiled step.",
        "",
        table(
            ["M", *NAMES, "1f1b / gpipe"],
            [
                [
                    m,
                    *[kib(n, 1, m) for n in NAMES],
                    fmt(
                        ratio(
                            by.get(("1f1b", 1, m), {}).get("temp_bytes"),
                            by.get(("gpipe", 1, m), {}).get("temp_bytes"),
                        )
                    ),
                ]
                for m in ms
            ],
        ),
        "",
        *_growth(by, ms),
        "Loops of the compiled step (trip counts) against the formulas: 1F1B runs "
        "R*M + R*S + S - 2 ticks (a forward and a backward slot each; a stage skips "
        "an empty slot), GPipe R*M + S - 1 forward and as many backward steps; both "
        "have the bubble (S - 1) / (R*M + S - 1).",
        "",
        table(
            ["schedule", "R", "M", "loops", "formula", "bubble", "all-gathers"],
            [
                [
                    r["schedule"],
                    r["repeats"],
                    r["microbatches"],
                    r["trips"],
                    expected_trips(r["schedule"], s, r["repeats"], r["microbatches"]),
                    f"{(s - 1) / (r['repeats'] * r['microbatches'] + s - 1):.1%}",
                    r["all_gathers"],
                ]
                for r in mem
                if r["schedule"] != "pipeline_layers + grad"
            ],
        ),
        "",
        f"Step time at M = {res['time_microbatches']} (median, alternated in one "
        "process): 1f1b / gpipe "
        f"{fmt(ratio(med.get('1f1b'), med.get('gpipe')))}, 1f1b / "
        "pipeline_layers + grad "
        f"{fmt(ratio(med.get('1f1b'), med.get('pipeline_layers + grad')))}. "
        "The fake devices share the machine's cores, so this is total work (1F1B "
        "recomputes each stage's forward), not a pipeline's speed.",
    ]
    return out


def plot(res: dict[str, Any], machine: dict[str, Any]) -> list[Plot]:
    plt = pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for name in NAMES:
        pts = sorted(
            (r["microbatches"], mb(r["temp_bytes"]))
            for r in res["memory"]
            if r["schedule"] == name and r["repeats"] == 1 and r["temp_bytes"]
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name)
    fig.suptitle(plot_where(machine))
    ax.set_title("training step temporary memory, rows per microbatch fixed")
    ax.set_xlabel("microbatches M")
    ax.set_ylabel("XLA temp_size_in_bytes (MB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    alt = "Temporary memory of the pipelined training step against the microbatches"
    return [Plot("pipeline_memory", alt, fig)]
