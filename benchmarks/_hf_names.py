"""Hugging Face Llama tensor names and shapes, for the checkpoint benchmarks.

Imports neither jax nor numpy, so a child process that must set up jax itself can use it.
"""

from __future__ import annotations


def hf_llama_names(
    d: int, f: int, vocab: int, n: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face Llama tensor names and shapes (`nn.Linear` weights are `(out, in)`),
    for the checkpoint benchmarks."""
    specs: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (vocab, d))
    ]
    for i in range(n):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (d, d)),
            (p + "self_attn.v_proj.weight", (d, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
        ]
    specs += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    return specs
