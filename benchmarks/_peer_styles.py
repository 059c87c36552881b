"""The same Llama-style decoder block in each library's layer-scanning style.

Each style is a function `(cfg, stacked) -> (make_loss, params)`: `make_loss()` builds a
fresh loss function `loss(params, x)` (fresh closures, so no trace cache is shared
between measurements), and `params` is that library's parameter tree holding the weights
of `stacked`, so that every style computes the same loss. `bench_peers.py` times them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import _env  # noqa: F401  (before jax: examples/ on the path, --quick flags)
import jax
import jax.numpy as jnp
from _models import (
    llama_lax_scan,
    llama_loss_value,
    llama_python_loop,
    llama_scan_layers,
)
from llama_model import Config, DecoderBlock, block_shapes, decoder_block

import stackedtree

LossFn = Callable[[Any, jax.Array], jax.Array]


def _names(cfg: Config) -> tuple[list[str], list[jax.ShapeDtypeStruct], Any]:
    """Flat parameter names (`attention_q_proj`), per-layer shapes, and the treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(block_shapes(cfg, jnp.float32))
    names = ["_".join(str(getattr(k, "name", k)) for k in path) for path, _ in flat]
    return names, [s for _, s in flat], treedef


def _to_named(tree: DecoderBlock) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "_".join(str(getattr(k, "name", k)) for k in path): leaf for path, leaf in flat
    }


def _from_named(named: dict[str, Any], cfg: Config) -> DecoderBlock:
    names, _, treedef = _names(cfg)
    return jax.tree.unflatten(treedef, [named[n] for n in names])


# --------------------------------------------------------------------------------------
# The styles


def v_python_loop(
    cfg: Config, stacked: DecoderBlock
) -> tuple[Callable[[], LossFn], Any]:
    return (lambda: llama_python_loop(cfg)), stacked


def v_lax_scan(cfg: Config, stacked: DecoderBlock) -> tuple[Callable[[], LossFn], Any]:
    return (lambda: llama_lax_scan(cfg)), stacked


def v_scan_layers(
    cfg: Config, stacked: DecoderBlock
) -> tuple[Callable[[], LossFn], Any]:
    return (lambda: llama_scan_layers(cfg)), stacked


def v_haiku(cfg: Config, stacked: DecoderBlock) -> tuple[Callable[[], LossFn], Any]:
    import haiku as hk

    names, shapes, _ = _names(cfg)

    def build() -> Any:
        class Block(hk.Module):
            def __call__(self, x: jax.Array) -> jax.Array:
                named = {
                    n: hk.get_parameter(n, s.shape, s.dtype, init=jnp.zeros)
                    for n, s in zip(names, shapes, strict=True)
                }
                return decoder_block(_from_named(named, cfg), x, cfg)

        def forward(x: jax.Array) -> jax.Array:
            return hk.layer_stack(cfg.num_layers)(lambda x: Block(name="block")(x))(x)

        return hk.without_apply_rng(hk.transform(forward))

    model = build()
    x0 = jnp.zeros((1, 2, cfg.d_model), jnp.float32)
    template = jax.eval_shape(model.init, jax.random.key(0), x0)
    named = _to_named(stacked)
    (module,) = template  # e.g. "layer_stack/~/block": one module, N-stacked params
    params = {module: {}}
    for n, sds in template[module].items():
        if tuple(sds.shape) != named[n].shape:
            raise ValueError(
                f"haiku param {module}/{n}: {sds.shape} != {named[n].shape}"
            )
        params[module][n] = named[n]

    def make() -> LossFn:
        apply = build().apply

        def loss(params: Any, x: jax.Array) -> jax.Array:
            return llama_loss_value(apply(params, x))

        return loss

    return make, params


def v_flax_linen(
    cfg: Config, stacked: DecoderBlock
) -> tuple[Callable[[], LossFn], Any]:
    import flax.linen as nn

    names, shapes, _ = _names(cfg)

    def build() -> Any:
        class Block(nn.Module):
            cfg: Config

            @nn.compact
            def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
                named = {
                    n: self.param(n, nn.initializers.zeros, s.shape, s.dtype)
                    for n, s in zip(names, shapes, strict=True)
                }
                return decoder_block(_from_named(named, self.cfg), x, self.cfg), None

        class Model(nn.Module):
            cfg: Config

            @nn.compact
            def __call__(self, x: jax.Array) -> jax.Array:
                scanned = nn.scan(
                    Block,
                    variable_axes={"params": 0},
                    split_rngs={"params": True},
                    length=self.cfg.num_layers,
                )
                x, _ = scanned(self.cfg, name="layers")(x, None)
                return x

        return Model(cfg)

    model = build()
    x0 = jnp.zeros((1, 2, cfg.d_model), jnp.float32)
    template = jax.eval_shape(model.init, jax.random.key(0), x0)
    named = _to_named(stacked)
    layer = template["params"]["layers"]
    for n, sds in layer.items():
        if tuple(sds.shape) != named[n].shape:
            raise ValueError(f"linen param layers/{n}: {sds.shape} != {named[n].shape}")
    params = {"params": {"layers": {n: named[n] for n in layer}}}

    def make() -> LossFn:
        m = build()

        def loss(params: Any, x: jax.Array) -> jax.Array:
            return llama_loss_value(m.apply(params, x))

        return loss

    return make, params


def _nnx_block(cfg: Config) -> type:
    """One decoder layer as an `nnx.Module`: one `nnx.Param` per weight of the layer.

    Both NNX styles use this class, so they time the same model.
    """
    from flax import nnx

    names, _, _ = _names(cfg)

    class Block(nnx.Module):
        def __init__(self, p: DecoderBlock):
            for n, leaf in _to_named(p).items():
                setattr(self, n, nnx.Param(leaf))

        def __call__(self, x: jax.Array) -> jax.Array:
            named = {n: getattr(self, n)[...] for n in names}
            return decoder_block(_from_named(named, cfg), x, cfg)

    return Block


def v_flax_nnx(cfg: Config, stacked: DecoderBlock) -> tuple[Callable[[], LossFn], Any]:
    from flax import nnx

    Block = _nnx_block(cfg)

    class Model(nnx.Module):
        def __init__(self, stacked: DecoderBlock):
            # The NNX docs' pattern: a vmap-created stack of blocks ...
            @nnx.vmap(in_axes=0, out_axes=0)
            def create(p: DecoderBlock) -> Any:
                return Block(p)

            self.blocks = create(stacked)

        def __call__(self, x: jax.Array) -> jax.Array:
            # ... run with nnx.scan over the layer axis.
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def forward(x: jax.Array, block: Any) -> jax.Array:
                return block(x)

            return forward(x, self.blocks)

    graphdef, state = nnx.split(Model(stacked))

    def make() -> LossFn:
        def loss(state: Any, x: jax.Array) -> jax.Array:
            return llama_loss_value(nnx.merge(graphdef, state)(x))

        return loss

    return make, state


def v_flax_nnx_scan_layers(
    cfg: Config, stacked: DecoderBlock
) -> tuple[Callable[[], LossFn], Any]:
    """The same NNX blocks, one per layer, stacked with `stackedtree.stack` into one
    module (an `nnx.Module` is a pytree) and run with `scan_layers`; `jax.grad` takes
    the gradient with respect to that stacked module."""
    Block = _nnx_block(cfg)
    layers = stackedtree.stack([Block(p) for p in stackedtree.unstack(stacked)])

    def make() -> LossFn:
        def loss(layers: Any, x: jax.Array) -> jax.Array:
            def layer(x: jax.Array, block: Any) -> tuple[jax.Array, None]:
                return block(x), None

            x, _ = stackedtree.scan_layers(layer, x, layers)
            return llama_loss_value(x)

        return loss

    return make, layers


def v_equinox(cfg: Config, stacked: DecoderBlock) -> tuple[Callable[[], LossFn], Any]:
    import equinox as eqx

    class Block(eqx.Module):
        p: DecoderBlock
        cfg: Config = eqx.field(static=True)

        def __call__(self, x: jax.Array) -> jax.Array:
            return decoder_block(self.p, x, self.cfg)

    model = eqx.filter_vmap(lambda p: Block(p, cfg))(stacked)

    def make() -> LossFn:
        def loss(model: Any, x: jax.Array) -> jax.Array:
            dynamic, static = eqx.partition(model, eqx.is_array)

            def f(x: jax.Array, dyn: Any) -> tuple[jax.Array, None]:
                return eqx.combine(dyn, static)(x), None

            x, _ = jax.lax.scan(f, x, dynamic)
            return llama_loss_value(x)

        return loss

    return make, model


VARIANTS: dict[
    str, Callable[[Config, DecoderBlock], tuple[Callable[[], LossFn], Any]]
] = {
    "python_loop": v_python_loop,
    "lax_scan": v_lax_scan,
    "scan_layers": v_scan_layers,
    "haiku_layer_stack": v_haiku,
    "flax_linen_scan": v_flax_linen,
    "flax_nnx_scan": v_flax_nnx,
    "flax_nnx_scan_layers": v_flax_nnx_scan_layers,
    "equinox_scan": v_equinox,
}
REFERENCE = "lax_scan"

# How the report and the plot name them.
LABELS = {
    "python_loop": "Python loop",
    "lax_scan": "jax.lax.scan",
    "scan_layers": "scan_layers",
    "haiku_layer_stack": "Haiku layer_stack",
    "flax_linen_scan": "Flax nn.scan",
    "flax_nnx_scan": "Flax nnx.scan",
    "flax_nnx_scan_layers": "Flax NNX + scan_layers",
    "equinox_scan": "Equinox + lax.scan",
}

# How the report describes them, in a sentence.
DESCRIPTIONS = {
    "python_loop": "a Python loop",
    "lax_scan": "a hand-written `jax.lax.scan`",
    "scan_layers": "`scan_layers`",
    "haiku_layer_stack": "Haiku `hk.layer_stack`",
    "flax_linen_scan": "Flax linen `nn.scan`",
    "flax_nnx_scan": "Flax NNX `nnx.vmap` + `nnx.scan`",
    "flax_nnx_scan_layers": "the same NNX modules, one per layer, put together with "
    "`stack` and run with `scan_layers`",
    "equinox_scan": "Equinox `filter_vmap` + `partition` + `jax.lax.scan`",
}
