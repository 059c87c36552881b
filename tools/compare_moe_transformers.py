"""Compares the MoE example's logits with transformers' own Qwen3-MoE and Mixtral.

torch and transformers are never dependencies of the project, so this runs in two
environments: the project's (jax, stackedtree) runs the example, and an interpreter
with torch and transformers (`--python`) builds tiny random models, saves them with
`save_pretrained` in several shards and writes their logits to `.npy` files.

    python tools/compare_moe_transformers.py --python /path/to/venv/bin/python

Prints one line per model and dtype and exits 1 when a float32 difference exceeds
2e-5. bfloat16 lines are for information: next to ours stands transformers' own
bfloat16 error (its bfloat16 logits against its float32 logits of the same rounded
weights); a token that bfloat16 rounding routes to another expert moves its logits by
far more than the arithmetic does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TOLERANCE = 2e-5
SMALL = dict(
    vocab_size=64,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
MODELS = {
    "Qwen3-MoE (mlp_only_layers [1], norm_topk_prob)": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
             head_dim=16, mlp_only_layers=[1], norm_topk_prob=True),
    ),
    "Qwen3-MoE (decoder_sparse_step 2, no norm_topk_prob, tied)": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32,
             decoder_sparse_step=2, tie_word_embeddings=True),
    ),
    "Mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2),
    ),
}  # fmt: skip


def write_models(out: Path, seq: int = 12) -> None:
    """In the environment with torch and transformers: one folder per model and
    dtype, holding the checkpoint, `tokens.npy` and transformers' `logits.npy`."""
    import torch
    import transformers as tf

    for k, (name, (config_cls, model_cls, kw)) in enumerate(MODELS.items()):
        for dtype in ("float32", "bfloat16"):
            torch.manual_seed(k)
            cfg = getattr(tf, config_cls)(**SMALL, **kw)
            model = getattr(tf, model_cls)(cfg).eval()
            with torch.no_grad():  # weights that make every term count
                for pname, p in model.named_parameters():
                    if pname.endswith("norm.weight"):
                        p.copy_(1 + 0.1 * torch.randn_like(p))
                    else:
                        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            model = model.to(getattr(torch, dtype))
            tokens = torch.randint(0, SMALL["vocab_size"], (2, seq))
            with torch.no_grad():
                logits = model(tokens).logits.float().numpy()
                exact = model.float()(tokens).logits.numpy()
            model = model.to(getattr(torch, dtype))
            folder = out / f"{k}-{dtype}"
            model.save_pretrained(folder, max_shard_size="100KB")
            np.save(folder / "tokens.npy", tokens.numpy())
            np.save(folder / "logits.npy", logits)
            np.save(folder / "float32_logits.npy", exact)
            meta = {"name": name, "dtype": dtype, "transformers": tf.__version__}
            meta["torch"] = torch.__version__
            (folder / "meta.json").write_text(json.dumps(meta))


def compare(out: Path) -> tuple[list[str], bool]:
    """In the project's environment: the example's logits against transformers'."""
    import jax

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import hf_moe_checkpoint as ex

    from stackedtree.checkpoint import load_flat

    lines, ok = [], True
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        meta = json.loads((folder / "meta.json").read_text())
        cfg = ex.config_from_hf(folder)
        model = ex.hf_to_model(load_flat(folder), cfg)
        tokens = np.load(folder / "tokens.npy")
        got = jax.jit(ex.model_forward, static_argnums=2)(model, tokens, cfg)
        want = np.load(folder / "logits.npy")
        err = float(np.max(np.abs(np.asarray(got, np.float32) - want)))
        shards = len(list(folder.glob("*.safetensors")))
        line = (
            f"{meta['name']} ({shards} shards, {meta['dtype']}): max |logit "
            f"difference| {err:.1e}, max |logit| {np.max(np.abs(want)):.1f}"
        )
        if meta["dtype"] == "float32":
            ok = ok and err <= TOLERANCE
        else:
            own = np.max(np.abs(want - np.load(folder / "float32_logits.npy")))
            line += f"; transformers' own {own:.1e}"
        lines.append(line)
    versions = f"transformers {meta['transformers']}, torch {meta['torch']}"
    return [versions, *lines], ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="an interpreter with torch and transformers",
    )
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)  # fmt: skip
    if args.write is not None:
        write_models(args.write)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [args.python, __file__, "--write", tmp]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        lines, ok = compare(Path(tmp))
    print("\n".join(lines))
    if not ok:
        raise SystemExit(f"a float32 difference exceeds {TOLERANCE}")


if __name__ == "__main__":
    main()
