"""The small Llama decoder trained as a pipeline over 4 stages x 2 data-parallel devices.

Run with `python examples/pipeline_llama.py` (about a minute on 2 CPU cores). On 8
fake CPU devices (the script sets `XLA_FLAGS` itself unless it is already set), it

1. stages the decoder's 8 layers for a circular pipeline of 4 stages and 2 repeats
   (stage s holds layers s and 4 + s), placed so each device holds only its stage's
   layers;
2. trains a few SGD steps with `pipeline_value_and_grad` (the interleaved 1F1B
   schedule, microbatches split over the `data` axis; the embedding runs outside the
   pipeline, the final norm and the tied output head are its `head`), and checks the
   first step's loss and gradients against `jax.value_and_grad` over `scan_layers`;
3. trains the same steps with `scan_layers` from the same start and prints both
   losses per step and their largest difference.
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
    pipeline_value_and_grad,
    scan_layers,
    stage_layers,
    unstage_layers,
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


def head_loss(x: jax.Array, next_tokens: jax.Array, head: dict[str, Any]) -> jax.Array:
    """The next-token loss of the decoder's output `x`; `head` holds the final norm and
    the (tied) embedding as output head."""
    logits = rms_norm(x, head["final_norm"], CFG.rms_eps) @ head["embed"].T
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, next_tokens[..., None], axis=-1))


def pipelined_step(
    mesh: jax.sharding.Mesh,
) -> Callable[[dict[str, Any], jax.Array], tuple[jax.Array, dict[str, Any]]]:
    """Loss and gradients of the whole model, the layers run as a 1F1B pipeline."""

    def step(params: dict[str, Any], tokens: jax.Array) -> Any:
        x, embed_vjp = jax.vjp(lambda e: e[tokens[:, :-1]], params["embed"])
        head = {"embed": params["embed"], "final_norm": params["final_norm"]}
        loss, (g_layers, g_x, g_head) = pipeline_value_and_grad(
            layer,
            head_loss,
            x,
            params["layers"],
            tokens[:, 1:],
            head=head,
            mesh=mesh,
            microbatches=MICROBATCHES,
        )
        # The embedding's gradient: through the lookup (from the carry's gradient)
        # and through the tied output head.
        g_embed = embed_vjp(g_x)[0] + g_head["embed"]
        grads = {
            "embed": g_embed,
            "layers": g_layers,
            "final_norm": g_head["final_norm"],
        }
        return loss, grads

    return jax.jit(step)


def loss_with(
    run_layers: Callable[[jax.Array, Any], jax.Array],
) -> Callable[[dict[str, Any], jax.Array], jax.Array]:
    """The next-token loss, with the decoder stack run by `run_layers(x, layers)`."""

    def loss(params: dict[str, Any], tokens: jax.Array) -> jax.Array:
        x = params["embed"][tokens[:, :-1]]
        x = run_layers(x, params["layers"])
        return head_loss(x, tokens[:, 1:], params)

    return loss


def make_batch(key: jax.Array) -> jax.Array:
    """Sequences that count upward modulo the vocabulary: easy to learn."""
    start = jax.random.randint(key, (BATCH, 1), 0, CFG.vocab)
    return (start + jnp.arange(SEQ)[None, :]) % CFG.vocab


def train(
    step: Callable[[dict[str, Any], jax.Array], tuple[jax.Array, Any]],
    params: dict[str, Any],
    batches: list[jax.Array],
) -> list[float]:
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

    def scanned(x: jax.Array, layers: Any) -> jax.Array:
        return scan_layers(layer, x, layers)[0]

    pipe_step = pipelined_step(mesh)
    scan_step = jax.jit(jax.value_and_grad(loss_with(scanned)))
    batches_on_data = [jax.device_put(b, data) for b in batches]
    # Once: the pipelined step's loss and gradients against the scan's.
    loss, grads = pipe_step(staged, batches_on_data[0])
    want_loss, want = scan_step(params, batches[0])
    grads = dict(grads, layers=unstage_layers(grads["layers"]))
    errors = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, want)
    worst = max([abs(float(loss - want_loss)), *jax.tree.leaves(errors)])
    print(
        f"first step: loss {float(loss):.6f}, largest difference from the scan's "
        f"loss and gradients: {worst:.2e}"
    )
    assert worst < 1e-4, errors

    pipe_losses = train(pipe_step, staged, batches_on_data)
    scan_losses = train(scan_step, params, batches)

    print("| step | pipeline_value_and_grad (1F1B) | scan_layers |")
    print("|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(pipe_losses, scan_losses, strict=True)):
        print(f"| {i} | {a:.6f} | {b:.6f} |")
    diff = max(abs(a - b) for a, b in zip(pipe_losses, scan_losses, strict=True))
    print(f"max |loss difference|: {diff:.2e}")
    assert diff < 1e-4, diff


if __name__ == "__main__":
    main()
