"""A Llama-style decoder scanned over its layers with stackedtree.

Run with `python examples/llama_decoder.py` (a few seconds on 2 CPU cores). It

1. prints the stacked parameter shapes of the 32-layer Llama 7B decoder, planned from
   `jax.ShapeDtypeStruct`s (nothing is allocated) — the scan tutorial's printout;
2. builds a small decoder with `init_stacked`, prints one layer as the scanned function
   sees it (`input_`, leading axis removed);
3. trains a few steps with dropout (one PRNG key per layer) and rematerialisation;
4. checks `scan_layers` against the written-out Python loop, forward and gradient;
5. generates a few tokens greedily from a prompt: the prompt fills the per-layer KV
   caches, then each step runs one token through the layers with
   `scan_layers(..., xs=caches, update_xs=True)` under `jit` with the caches donated,
   so every layer rewrites its own cache in place; the tokens are checked against the
   forward pass over the same sequence;
6. reports the compile time of the gradient step, scanned against the Python loop.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_model import (
    LLAMA_7B,
    Config,
    DecoderBlock,
    block_shapes,
    cached_decoder_block,
    decoder_block,
    init_block,
    init_cache,
    rms_norm,
)

from stackedtree import (
    describe,
    get_layer,
    init_stacked,
    layer_keys,
    scan_layers,
    stack,
)

SMALL = Config(
    d_model=64,
    kv_heads=2,
    q_per_kv=2,
    head_dim=16,
    d_ff=128,
    num_layers=8,
    vocab=128,
    dropout=0.1,
)


def init_model(key: jax.Array, cfg: Config) -> dict[str, Any]:
    """Top-level parameters: `embed`, `layers` (a stacked DecoderBlock), `final_norm`."""
    k_embed, k_layers = jax.random.split(key)
    return {
        "embed": jax.random.normal(k_embed, (cfg.vocab, cfg.d_model)) * 0.02,
        "layers": init_stacked(lambda k: init_block(k, cfg), k_layers, cfg.num_layers),
        "final_norm": jnp.ones((cfg.d_model,)),
    }


_printed = False


def forward(
    params: dict[str, Any],
    tokens: jax.Array,
    cfg: Config,
    *,
    key: jax.Array | None = None,
    remat: Any = False,
    loop: bool = False,
) -> jax.Array:
    """Logits for `tokens: (batch, seq)`; `loop=True` runs the written-out Python loop."""
    x = params["embed"][tokens]

    def layer(x: jax.Array, input_: DecoderBlock, *, key: jax.Array | None = None):
        global _printed
        if (
            not _printed
        ):  # runs while tracing: one layer as the scanned function sees it
            print("inside the layer function, `input_` is:")
            print(describe(input_), "\n")
            _printed = True
        return decoder_block(input_, x, cfg, key=key), None

    if loop:
        keys = layer_keys(key, cfg.num_layers) if key is not None else None
        for i in range(cfg.num_layers):
            kw = {"key": keys[i]} if keys is not None else {}
            x, _ = layer(x, get_layer(params["layers"], i), **kw)
    else:
        x, _ = scan_layers(layer, x, params["layers"], key=key, remat=remat)
    x = rms_norm(x, params["final_norm"], cfg.rms_eps)
    return x @ params["embed"].T


def loss_fn(
    params: dict[str, Any], tokens: jax.Array, cfg: Config, **kw: Any
) -> jax.Array:
    logits = forward(params, tokens[:, :-1], cfg, **kw)
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
    return -jnp.mean(target)


def make_batch(key: jax.Array, cfg: Config, batch: int = 8, seq: int = 33) -> jax.Array:
    """Sequences that count upward modulo the vocabulary: easy to learn."""
    start = jax.random.randint(key, (batch, 1), 0, cfg.vocab)
    return (start + jnp.arange(seq)[None, :]) % cfg.vocab


def cached_logits(
    params: dict[str, Any], tokens: jax.Array, caches: Any, pos: jax.Array, cfg: Config
) -> tuple[jax.Array, Any]:
    """Logits of `tokens` at positions `pos, ...`, and the caches with them written."""

    def layer(x: jax.Array, p: DecoderBlock, cache: Any) -> tuple[jax.Array, Any]:
        return cached_decoder_block(p, x, cfg, cache, pos)

    x = params["embed"][tokens]
    x, caches = scan_layers(layer, x, params["layers"], xs=caches, update_xs=True)
    return rms_norm(x, params["final_norm"], cfg.rms_eps) @ params["embed"].T, caches


def generate(
    params: dict[str, Any], prompt: jax.Array, steps: int, cfg: Config
) -> jax.Array:
    """`steps` tokens after `prompt: (batch, length)`, greedily, with KV caches."""
    batch, length = prompt.shape
    one = init_cache(cfg, batch, length + steps)
    caches = jax.tree.map(lambda c: jnp.zeros((cfg.num_layers, *c.shape)), one)
    # The caches are donated: each step's layers rewrite them in place.
    run = jax.jit(functools.partial(cached_logits, cfg=cfg), donate_argnums=2)
    logits, caches = run(params, prompt, caches, jnp.int32(0))  # prefill
    out = [jnp.argmax(logits[:, -1], axis=-1)]
    for i in range(steps - 1):
        pos = jnp.int32(length + i)
        logits, caches = run(params, out[-1][:, None], caches, pos)
        out.append(jnp.argmax(logits[:, -1], axis=-1))
    return jnp.stack(out, axis=1)


def check_generation(params: dict[str, Any], cfg: Config, steps: int = 6) -> None:
    prompt = make_batch(jax.random.key(3), cfg, batch=2, seq=5)
    tokens = generate(params, prompt, steps, cfg)
    # The forward pass over prompt + generated tokens predicts the same tokens.
    logits = forward(params, jnp.concatenate([prompt, tokens[:, :-1]], axis=1), cfg)
    want = jnp.argmax(logits[:, prompt.shape[1] - 1 :], axis=-1)
    np.testing.assert_array_equal(tokens, want)
    for row in range(prompt.shape[0]):
        print(f"prompt {prompt[row].tolist()} -> generated {tokens[row].tolist()}")
    print("greedy generation with in-place KV caches equals the forward pass\n")


def compile_seconds(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile-layers", type=int, nargs="*", default=[8, 32])
    args = parser.parse_args(argv)

    print("== Llama 7B, 32 stacked layers, planned abstractly (nothing allocated) ==")
    print(describe(stack([block_shapes(LLAMA_7B)] * LLAMA_7B.num_layers)), "\n")

    cfg = SMALL
    key = jax.random.key(0)
    params = init_model(key, cfg)
    print(f"== small decoder: {cfg.num_layers} layers, d_model={cfg.d_model} ==")
    print(describe(params, dtypes=True), "\n")

    # Train with dropout (a key per layer) and per-layer rematerialisation.
    grad_fn = jax.jit(
        jax.value_and_grad(
            lambda p, t, k: loss_fn(p, t, cfg, key=k, remat="dots_saveable")
        )
    )
    lr = 0.5
    for step in range(args.steps):
        k_batch, k_drop = jax.random.split(jax.random.fold_in(key, step))
        loss, grads = grad_fn(params, make_batch(k_batch, cfg), k_drop)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {float(loss):.4f}")
    print()

    # The scanned model equals the written-out loop, forward and gradient, with keys.
    tokens, k_drop = make_batch(jax.random.key(1), cfg), jax.random.key(2)
    scan_loss, scan_grads = jax.value_and_grad(loss_fn)(
        params, tokens, cfg, key=k_drop, remat=True
    )
    loop_loss, loop_grads = jax.value_and_grad(loss_fn)(
        params, tokens, cfg, key=k_drop, loop=True
    )
    err = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(scan_grads), jax.tree.leaves(loop_grads), strict=True
        )
    )
    np.testing.assert_allclose(scan_loss, loop_loss, rtol=1e-5)
    np.testing.assert_allclose(err, 0.0, atol=1e-4)
    print(
        f"scan_layers vs Python loop: loss {float(scan_loss):.6f} vs {float(loop_loss):.6f}, "
        f"max |grad difference| {err:.2e}\n"
    )

    check_generation(params, cfg)

    # Compile time of the gradient step: one block compiled (scan) vs N copies (loop).
    print("compile time of jax.grad (trace + compile), scan_layers vs Python loop:")
    print("| layers | scan_layers (s) | Python loop (s) | loop / scan |")
    print("|---:|---:|---:|---:|")
    for n in args.compile_layers:
        c = cfg._replace(num_layers=n)
        p = jax.eval_shape(lambda k, c=c: init_model(k, c), key)
        t = jax.ShapeDtypeStruct((8, 33), jnp.int32)
        s_scan = compile_seconds(jax.grad(lambda p, t, c=c: loss_fn(p, t, c)), p, t)
        s_loop = compile_seconds(
            jax.grad(lambda p, t, c=c: loss_fn(p, t, c, loop=True)), p, t
        )
        print(f"| {n} | {s_scan:.2f} | {s_loop:.2f} | {s_loop / s_scan:.1f}x |")


if __name__ == "__main__":
    main()
