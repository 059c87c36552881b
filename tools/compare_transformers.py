"""Compares the Hugging Face example's model with transformers' own Llama-family models.

Builds tiny random models with transformers itself (configs constructed in code, nothing
downloaded: Llama plain, with `attention_bias`, with llama3 rope and tied embeddings;
Qwen2, tied and not; Mistral), gives every parameter a random value so that each term
counts, saves each with `save_pretrained` in several shards, reads it back with the
example's `config_from_hf` and `hf_to_model`, and compares `model_forward`'s logits
with transformers' in float32 and bfloat16.

Run `python tools/compare_transformers.py` (or `python examples/hf_llama_checkpoint.py
--transformers`) in an environment with torch and transformers, which the project never
depends on. Exits non-zero when a model is outside its tolerance: 2e-5 in float32, 0.2
in bfloat16 (about the noise of bfloat16 arithmetic itself, which each bfloat16 line
shows as transformers' own distance from its float32 logits).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from hf_llama_checkpoint import config_from_hf, hf_to_model
from llama_model import model_forward

from stackedtree.checkpoint import load_flat

TOLERANCE = {"float32": 2e-5, "bfloat16": 0.2}
SMALL = dict(
    vocab_size=64,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


class Comparison(NamedTuple):
    """One model in one dtype against transformers."""

    name: str
    dtype: str
    shards: int
    max_difference: float  # the largest absolute logit difference
    max_logit: float  # transformers' largest absolute logit
    own_noise: float | None  # bfloat16: transformers' own distance from float32

    def line(self) -> str:
        text = (
            f"{self.name} ({self.shards} shards, {self.dtype}): max |logit difference| "
            f"{self.max_difference:.1e}, max |logit| {self.max_logit:.1f}"
        )
        if self.own_noise is not None:
            text += f"; transformers' own {self.own_noise:.1e}"
        return text


def models(tf: Any) -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    """`name -> (config class, model class, config fields)` of the models compared."""
    llama3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    llama3["original_max_position_embeddings"] = 8
    if int(tf.__version__.split(".")[0]) >= 5:
        llama3_kw: dict[str, Any] = dict(
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, **llama3)
        )
    else:
        llama3_kw = dict(
            rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **llama3)
        )
    llama = (tf.LlamaConfig, tf.LlamaForCausalLM)
    qwen2 = (tf.Qwen2Config, tf.Qwen2ForCausalLM)
    return {
        "Llama": (*llama, dict(rms_norm_eps=1e-5)),
        "Llama attention_bias": (*llama, dict(attention_bias=True)),
        "Llama llama3 rope, tied": (
            *llama,
            dict(tie_word_embeddings=True, **llama3_kw),
        ),
        "Qwen2 tied": (*qwen2, dict(tie_word_embeddings=True)),
        "Qwen2": (*qwen2, {}),
        "Mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=None)),
    }


def compare(
    name: str, config_cls: Any, model_cls: Any, kw: dict[str, Any], dtype: Any, seq: int
) -> Comparison:
    """Builds one model with transformers and compares its logits with the example's."""
    import torch

    torch.manual_seed(0)
    model = model_cls(config_cls(**SMALL, **kw)).eval()
    with torch.no_grad():  # weights that make every term count
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model = model.to(dtype)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, seq))
    with torch.no_grad():
        want = model(tokens).logits.float().numpy()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size="40KB")
        shards = len(list(Path(folder).glob("*.safetensors")))
        cfg = config_from_hf(folder)
        params = hf_to_model(load_flat(folder), cfg)
    got = jax.jit(model_forward, static_argnums=2)(params, tokens.numpy(), cfg)
    got = np.asarray(got, np.float32)
    own = None
    if dtype != torch.float32:
        # The noise of bfloat16 arithmetic itself: transformers' bfloat16 logits
        # against its float32 logits of the same (rounded) weights.
        with torch.no_grad():
            exact = model.float()(tokens).logits.numpy()
        own = float(np.max(np.abs(want - exact)))
    return Comparison(
        name,
        str(dtype).split(".")[-1],
        shards,
        float(np.max(np.abs(got - want))),
        float(np.max(np.abs(want))),
        own,
    )


def compare_with_transformers(seq: int = 12) -> list[Comparison]:
    """Every model of `models`, in float32 and bfloat16, on 2 sequences of `seq`."""
    import torch
    import transformers as tf

    return [
        compare(name, config_cls, model_cls, kw, dtype, seq)
        for name, (config_cls, model_cls, kw) in models(tf).items()
        for dtype in (torch.float32, torch.bfloat16)
    ]


def failures(comparisons: list[Comparison]) -> list[str]:
    """The comparisons outside their dtype's tolerance (NaN is outside), as lines."""
    return [
        f"outside the tolerance {TOLERANCE[c.dtype]}: {c.line()}"
        for c in comparisons
        if not c.max_difference < TOLERANCE[c.dtype]
    ]


def main() -> None:
    """Prints one line per model and dtype; exits non-zero outside the tolerance."""
    import torch
    import transformers as tf

    print(f"transformers {tf.__version__}, torch {torch.__version__}")
    comparisons = compare_with_transformers()
    print("\n".join(c.line() for c in comparisons))
    if bad := failures(comparisons):
        raise SystemExit("\n".join(bad))


if __name__ == "__main__":
    main()
