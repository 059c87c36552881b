"""The small Llama decoder trained as a pipeline over 4 stages x 2 data-parallel devices.

Run with `python examples/pipeline_llama.py` (about half a minute on 2 CPU cores). On 8
fake CPU devices (the script sets `XLA_FLAGS` itself unless it is already set), it

1. stages the decoder's 8 layers for a circular pipeline of 4 stages and 2 repeats
   (stage s holds layers s and 4 + s), placed so each device holds only its stage's
   layers;
2. trains a few SGD steps with `pipeline_layers` (microbatches split over the `data`
   axis) and, from the same start, with `scan_layers` on the same devices;
3. prints both losses per step and their largest difference.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_model import Config, DecoderBlock, decoder_block, init_block, rms_norm

from stackedtree import (
    init_stacked,
    pipeline_layers,
    scan_layers,
    stage_layers,
)

CFG = Config(
    d_model=64, kv_heads=2, q_per_kv=2, head_dim=16, d_ff=128, num_layers=8, vocab=128
)
STAGES, REPEATS, MICROBATCHES = 4, 2, 4
BATCH, SEQ = 8, 33
LR = 0.5


def init_model(key: jax.Array, cfg: Config) -> dict[str, Any]:
    """`embed`, `layers` (a stacked DecoderBlock) and `final_norm`."""
    k_embed, k_layers = jax.random.split(key)
    return {
        "embed": jax.random.normal(k_embed, (cfg.vocab, cfg.d_model)) * 0.02,
        "layers": init_stacked(lambda k: init_block(k, cfg), k_layers, cfg.num_layers),
        "final_norm": jnp.ones((cfg.d_model,)),
    }


def layer(x: jax.Array, block: DecoderBlock) -> tuple[jax.Array, None]:
    return decoder_block(block, x, CFG), None


def loss_with(
    run_layers: Callable[[jax.Array, Any], jax.Array],
) -> Callable[[dict[str, Any], jax.Array], jax.Array]:
    """The next-token loss, with the decoder stack run by `run_layers(x, layers)`."""

    def loss(params: dict[str, Any], tokens: jax.Array) -> jax.Array:
        x = params["embed"][tokens[:, :-1]]
        x = run_layers(x, params["layers"])
        logits = rms_norm(x, params["final_norm"], CFG.rms_eps) @ params["embed"].T
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return loss


def make_batch(key: jax.Array) -> jax.Array:
    """Sequences that count upward modulo the vocabulary: easy to learn."""
    start = jax.random.randint(key, (BATCH, 1), 0, CFG.vocab)
    return (start + jnp.arange(SEQ)[None, :]) % CFG.vocab


def train(
    loss: Callable[[dict[str, Any], jax.Array], jax.Array],
    params: dict[str, Any],
    batches: list[jax.Array],
) -> list[float]:
    step = jax.jit(jax.value_and_grad(loss))
    losses = []
    for tokens in batches:
        value, grads = step(params, tokens)
        params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
        losses.append(float(value))
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    mesh = jax.make_mesh(
        (STAGES, 2), ("stage", "data"), axis_types=(AxisType.Auto, AxisType.Auto)
    )
    params = init_model(jax.random.key(0), CFG)

    # Pipeline: stage s holds staged[:, s], i.e. layers s and 4 + s; the rest of the
    # model is replicated and the batch is split over `data`.
    staged = dict(
        params, layers=stage_layers(params["layers"], STAGES, repeats=REPEATS)
    )
    staged = jax.device_put(
        staged,
        {
            "embed": NamedSharding(mesh, P()),
            "layers": NamedSharding(mesh, P(None, "stage")),
            "final_norm": NamedSharding(mesh, P()),
        },
    )
    q_proj = staged["layers"].attention.q_proj
    per_device = {s.data.nbytes for s in q_proj.addressable_shards}
    print(
        f"{CFG.num_layers} layers staged as {q_proj.shape[:3]} (repeats, stages, "
        f"layers per block) on a {dict(mesh.shape)} mesh; q_proj: {q_proj.nbytes} "
        f"bytes in all, {per_device} bytes per device"
    )
    batches = [make_batch(jax.random.key(100 + i)) for i in range(args.steps)]
    data = NamedSharding(mesh, P("data"))

    def pipelined(x: jax.Array, layers: Any) -> jax.Array:
        return pipeline_layers(layer, x, layers, mesh=mesh, microbatches=MICROBATCHES)

    def scanned(x: jax.Array, layers: Any) -> jax.Array:
        return scan_layers(layer, x, layers)[0]

    pipe_losses = train(
        loss_with(pipelined), staged, [jax.device_put(b, data) for b in batches]
    )
    scan_losses = train(loss_with(scanned), params, batches)

    print("| step | pipeline_layers | scan_layers |")
    print("|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(pipe_losses, scan_losses, strict=True)):
        print(f"| {i} | {a:.6f} | {b:.6f} |")
    diff = max(abs(a - b) for a, b in zip(pipe_losses, scan_losses, strict=True))
    print(f"max |loss difference|: {diff:.2e}")
    assert diff < 1e-4, diff


if __name__ == "__main__":
    main()
