"""A per-layer Llama checkpoint straight into FSDP-sharded stacked params, and a step.

No conversion step and no full copy in host memory: `load_sharded` reads the Hugging
Face Llama checkpoint as it is (`model.layers.{i}.self_attn.q_proj.weight`, ...,
`(out, in)` layouts, shards and an index) and assembles each stacked tensor
`(num_layers, ...)` on the fly, every device reading only its own rows of every
layer. The layer function then views one layer's Hugging Face tensors in the layout
of `llama_model.decoder_block` (a transpose and a reshape, which XLA folds into the
matmuls), and `scan_layers` runs the layers under `jax.jit`. FSDP-style: every weight
and the batch are split over one mesh axis `fsdp`; XLA gathers one layer's weights at
a time inside the scan.

Run it: `python examples/sharded_llama.py` (a few seconds on CPU; it makes 8 fake CPU
devices when jax has not started yet). It prints the loss before and after one SGD
step (checked against the same model on unsharded parameters), the parameter bytes
each device holds, and the bytes this process read.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

if "jax" not in sys.modules:  # 8 fake CPU devices, when jax has not started yet
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_model import Attention, Config, DecoderBlock, decoder_block, rms_norm

from stackedtree import layer_shardings, scan_layers
from stackedtree.checkpoint import load_flat, load_sharded, save_flat, stack_by_name

PATTERN = "model.layers.{i}."
CFG = Config(
    d_model=64, kv_heads=2, q_per_kv=4, head_dim=16, d_ff=256, num_layers=8, vocab=512
)

# One layer's specs, in the Hugging Face layout: FSDP splits the first dimension of
# every weight (its rows: each device reads contiguous byte ranges) and keeps the
# small norms whole. `layer_shardings` adds the layer axis, whole (axis=None), as a
# scan wants.
LAYER_SPECS = {
    "input_layernorm.weight": P(),
    "self_attn.q_proj.weight": P("fsdp"),
    "self_attn.k_proj.weight": P("fsdp"),
    "self_attn.v_proj.weight": P("fsdp"),
    "self_attn.o_proj.weight": P("fsdp"),
    "post_attention_layernorm.weight": P(),
    "mlp.gate_proj.weight": P("fsdp"),
    "mlp.up_proj.weight": P("fsdp"),
    "mlp.down_proj.weight": P("fsdp"),
}
OTHER_SPECS = {
    "model.embed_tokens.weight": P("fsdp"),
    "model.norm.weight": P(),
    "lm_head.weight": P("fsdp"),
}


def write_checkpoint(folder: str, cfg: Config, seed: int = 0) -> str:
    """A random Hugging Face Llama checkpoint in two shards and an index; its path."""
    rng = np.random.default_rng(seed)
    d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
    heads, kv = cfg.kv_heads * cfg.q_per_kv, cfg.kv_heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    flat = {"model.embed_tokens.weight": w(cfg.vocab, d)}
    for i in range(cfg.num_layers):
        p = PATTERN.format(i=i)
        flat[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        flat[p + "self_attn.q_proj.weight"] = w(heads * h, d)
        flat[p + "self_attn.k_proj.weight"] = w(kv * h, d)
        flat[p + "self_attn.v_proj.weight"] = w(kv * h, d)
        flat[p + "self_attn.o_proj.weight"] = w(d, heads * h)
        flat[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
        flat[p + "mlp.gate_proj.weight"] = w(f, d)
        flat[p + "mlp.up_proj.weight"] = w(f, d)
        flat[p + "mlp.down_proj.weight"] = w(d, f)
    flat["model.norm.weight"] = np.ones(d, np.float32)
    flat["lm_head.weight"] = w(cfg.vocab, d)

    names = list(flat)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        save_flat(os.path.join(folder, shard), {n: flat[n] for n in part})
        weight_map |= dict.fromkeys(part, shard)
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as out:
        json.dump({"metadata": {}, "weight_map": weight_map}, out)
    return index


def shardings(mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
    """Every tensor's sharding, layer tensors under their stacked names."""
    layers = layer_shardings(mesh, LAYER_SPECS)
    return {PATTERN + key: s for key, s in layers.items()} | {
        name: NamedSharding(mesh, spec) for name, spec in OTHER_SPECS.items()
    }


def split_params(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(layers, rest)`: the stacked tensors by per-layer key, and the others."""
    layers = {
        k.removeprefix(PATTERN): v for k, v in flat.items() if k.startswith(PATTERN)
    }
    return layers, {k: v for k, v in flat.items() if not k.startswith(PATTERN)}


def as_block(p: dict[str, jax.Array], cfg: Config) -> DecoderBlock:
    """One layer's Hugging Face tensors in the layout of `llama_model.decoder_block`.

    `nn.Linear` weights are `(out, in)`; query head `j` reads kv head `j // q_per_kv`,
    so the `heads * head_dim` features split as `(kv_heads, q_per_kv, head_dim)`.
    """
    d, kv, q, h = cfg.d_model, cfg.kv_heads, cfg.q_per_kv, cfg.head_dim
    return DecoderBlock(
        input_norm=p["input_layernorm.weight"],
        attention=Attention(
            q_proj=p["self_attn.q_proj.weight"]
            .T.reshape(d, kv, q, h)
            .transpose(0, 2, 1, 3),
            k_proj=p["self_attn.k_proj.weight"].T.reshape(d, kv, h),
            v_proj=p["self_attn.v_proj.weight"].T.reshape(d, kv, h),
            out_proj=p["self_attn.o_proj.weight"]
            .T.reshape(kv, q, h, d)
            .transpose(1, 0, 2, 3),
        ),
        post_attn_norm=p["post_attention_layernorm.weight"],
        gate_proj=p["mlp.gate_proj.weight"].T,
        up_proj=p["mlp.up_proj.weight"].T,
        down_proj=p["mlp.down_proj.weight"].T,
    )


def loss_fn(
    layers: dict[str, Any], rest: dict[str, Any], tokens: jax.Array
) -> jax.Array:
    """Next-token cross-entropy of the Llama model on `tokens: (batch, seq)`."""

    def layer(x: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
        return decoder_block(as_block(p, CFG), x, CFG), None

    x = rest["model.embed_tokens.weight"][tokens[:, :-1]]
    x, _ = scan_layers(layer, x, layers)
    x = rms_norm(x, rest["model.norm.weight"], CFG.rms_eps)
    logits = x @ rest["lm_head.weight"].T
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@jax.jit
def sgd_step(
    layers: Any, rest: Any, tokens: jax.Array, lr: float = 0.5
) -> tuple[jax.Array, Any, Any]:
    loss, (g_layers, g_rest) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        layers, rest, tokens
    )
    update = lambda p, g: p - lr * g  # noqa: E731
    return (
        loss,
        jax.tree.map(update, layers, g_layers),
        jax.tree.map(update, rest, g_rest),
    )


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(f.read().split("rchar:")[1].split()[0])


def main() -> None:
    if jax.device_count() < 8:
        raise SystemExit(
            "this example needs 8 devices (it makes 8 CPU ones when run alone)"
        )
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    tokens = np.random.default_rng(1).integers(0, CFG.vocab, (16, 33), np.int32)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P("fsdp")))

    with tempfile.TemporaryDirectory() as folder:
        index = write_checkpoint(folder, CFG)
        size = sum(
            os.path.getsize(os.path.join(folder, n))
            for n in os.listdir(folder)
            if n.endswith(".safetensors")
        )
        before = _rchar()
        flat = load_sharded(index, shardings(mesh), pattern=PATTERN)
        read = _rchar() - before
        # The same model on unsharded parameters, to check the sharded step against.
        plain, plain_rest = stack_by_name(load_flat(index), PATTERN)

    print("stacked, sharded parameters:")
    for name, x in flat.items():
        print(f"  {name:50} {x.shape!s:13} {x.sharding.spec}")
    per_device = dict.fromkeys(mesh.devices.flat, 0)
    for x in flat.values():
        for shard in x.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    total = sum(x.nbytes for x in flat.values())
    sizes = sorted(set(per_device.values()))
    print(
        f"parameter bytes per device: {' to '.join(map(str, sizes))} on each of "
        f"{len(per_device)}, of {total} in all"
    )
    print(f"bytes read: {read}, for {size} bytes of safetensors files")

    layers, rest = split_params(flat)
    loss, layers, rest = sgd_step(layers, rest, tokens)
    want = loss_fn(
        jax.tree.map(jnp.asarray, plain), jax.tree.map(jnp.asarray, plain_rest), tokens
    )
    np.testing.assert_allclose(loss, want, rtol=1e-4)
    print(
        f"loss {float(loss):.4f} -> {float(loss_fn(layers, rest, tokens)):.4f} after "
        "one jitted SGD step (the same loss as on unsharded parameters)"
    )


if __name__ == "__main__":
    main()
