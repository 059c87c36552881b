"""The Hugging Face mixture-of-experts example: config.json, round trips, logits."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
from ckptgen import flat_bits_equal
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import hf_moe_checkpoint as ex
import moe_model

from stackedtree.checkpoint import (
    convert_stack,
    convert_unstack,
    detect_kinds,
    load_flat,
    save_flat,
    stack_by_name,
    unstack_by_name,
)

# Tiny configs as transformers 5 writes them: a Qwen3-MoE with a dense layer (two
# kinds) and a Mixtral.
QWEN3 = {
    "model_type": "qwen3_moe",
    "vocab_size": 40,
    "hidden_size": 16,
    "intermediate_size": 24,
    "moe_intermediate_size": 12,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "mlp_only_layers": [1],
    "decoder_sparse_step": 1,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "sliding_window": None,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "output_router_logits": False,
}
MIXTRAL = {
    "model_type": "mixtral",
    "vocab_size": 40,
    "hidden_size": 16,
    "intermediate_size": 12,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": None,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    "sliding_window": None,
    "router_jitter_noise": 0.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
CONFIGS = {"Qwen3-MoE": QWEN3, "Mixtral": MIXTRAL}
# One compiled forward per config, dtype and token shape, shared by the tests.
forward = jax.jit(ex.model_forward, static_argnums=2)


def random_checkpoint(
    cfg: moe_model.Config, seed: int = 0, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """Random tensors under the HF names of `cfg`'s model type, `(out, in)` layouts."""
    rng = np.random.default_rng(seed)
    d, h = cfg.d_model, cfg.head_dim
    moe, gate, up, down = ex.MOE_NAMES[cfg.model_type]

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype)

    def norm(n: int) -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(n)).astype(dtype)

    flat = {"model.embed_tokens.weight": w(cfg.vocab, d)}
    for i, kind in enumerate(cfg.pattern):
        p = f"model.layers.{i}."
        flat[p + "input_layernorm.weight"] = norm(d)
        for name, rows in (("q", cfg.heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
            flat[p + f"self_attn.{name}_proj.weight"] = w(rows * h, d)
        flat[p + "self_attn.o_proj.weight"] = w(d, cfg.heads * h)
        if cfg.qk_norm:
            flat[p + "self_attn.q_norm.weight"] = norm(h)
            flat[p + "self_attn.k_norm.weight"] = norm(h)
        flat[p + "post_attention_layernorm.weight"] = norm(d)
        if kind == "moe":
            flat[p + moe + "gate.weight"] = w(cfg.num_experts, d)
            for e in range(cfg.num_experts):
                q = f"{p}{moe}experts.{e}."
                flat[q + gate + ".weight"] = w(cfg.d_expert, d)
                flat[q + up + ".weight"] = w(cfg.d_expert, d)
                flat[q + down + ".weight"] = w(d, cfg.d_expert)
        else:
            flat[p + "mlp.gate_proj.weight"] = w(cfg.d_ff, d)
            flat[p + "mlp.up_proj.weight"] = w(cfg.d_ff, d)
            flat[p + "mlp.down_proj.weight"] = w(d, cfg.d_ff)
    flat["model.norm.weight"] = norm(d)
    if not cfg.tie_embeddings:
        flat["lm_head.weight"] = w(cfg.vocab, d)
    return flat


def reference_logits(
    flat: dict[str, np.ndarray], tokens: np.ndarray, cfg: moe_model.Config
) -> np.ndarray:
    """Logits of one sequence in float64 on the HF tensors, as transformers computes
    them: head by head, and token by token through the experts the router picks."""

    def t(name: str) -> np.ndarray:
        return np.asarray(flat[name], np.float64)

    def rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_eps)

    def swiglu(x: np.ndarray, g: str, u: str, dn: str) -> np.ndarray:
        gate = x @ t(g).T
        return (gate / (1 + np.exp(-gate)) * (x @ t(u).T)) @ t(dn).T

    h, seq, rep = cfg.head_dim, len(tokens), cfg.heads // cfg.kv_heads
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, h, 2) / h)
    angles = np.tile(np.arange(seq)[:, None] * freqs[None, :], 2)

    def rope(x: np.ndarray) -> np.ndarray:
        rotated = np.concatenate([-x[:, h // 2 :], x[:, : h // 2]], -1)
        return x * np.cos(angles) + rotated * np.sin(angles)

    moe, gate, up, down = ex.MOE_NAMES[cfg.model_type]
    x = t("model.embed_tokens.weight")[tokens]
    for i, kind in enumerate(cfg.pattern):
        p = f"model.layers.{i}."
        y = rms(x, t(p + "input_layernorm.weight"))
        q, k, v = (y @ t(p + f"self_attn.{n}_proj.weight").T for n in "qkv")
        heads = []
        for n in range(cfg.heads):
            g = n // rep  # repeat_kv
            qn, kg = q[:, n * h : (n + 1) * h], k[:, g * h : (g + 1) * h]
            if cfg.qk_norm:
                qn = rms(qn, t(p + "self_attn.q_norm.weight"))
                kg = rms(kg, t(p + "self_attn.k_norm.weight"))
            scores = rope(qn) @ rope(kg).T / np.sqrt(h)
            scores = np.where(np.tri(seq, dtype=bool), scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append(
                weights / weights.sum(-1, keepdims=True) @ v[:, g * h :][:, :h]
            )
        x = x + np.concatenate(heads, -1) @ t(p + "self_attn.o_proj.weight").T
        y = rms(x, t(p + "post_attention_layernorm.weight"))
        if kind == "dense":
            m = p + "mlp."
            x = x + swiglu(y, m + "gate_proj.weight", m + "up_proj.weight",
                           m + "down_proj.weight")  # fmt: skip
            continue
        for s in range(seq):
            logits = t(p + moe + "gate.weight") @ y[s]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            chosen = np.argsort(-probs)[: cfg.top_k]
            total = probs[chosen].sum() if cfg.norm_topk_prob else 1.0
            for e in chosen:
                q = f"{p}{moe}experts.{e}."
                out = swiglu(y[s], q + gate + ".weight", q + up + ".weight",
                             q + down + ".weight")  # fmt: skip
                x[s] += probs[e] / total * out
    x = rms(x, t("model.norm.weight"))
    head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    return x @ t(head).T


# -------------------------------------------------------------------------- config


def test_config_of_a_qwen3_moe_with_a_dense_layer() -> None:
    cfg = ex.config_from_hf(QWEN3)
    assert cfg.pattern == ["moe", "dense", "moe", "moe"]
    assert (cfg.num_experts, cfg.top_k, cfg.d_expert, cfg.d_ff) == (4, 2, 12, 24)
    assert cfg.qk_norm and cfg.norm_topk_prob and cfg.head_dim == 8
    assert (cfg.heads, cfg.kv_heads, cfg.rope_theta) == (4, 2, 10000.0)


def test_config_of_mixtral() -> None:
    cfg = ex.config_from_hf(MIXTRAL)
    assert cfg.pattern == ["moe"] * 3
    assert cfg.d_expert == 12 and cfg.head_dim == 4 and cfg.rms_eps == 1e-5
    assert cfg.norm_topk_prob and not cfg.qk_norm and cfg.tie_embeddings
    assert cfg.rope_theta == 1e6


def test_decoder_sparse_step_makes_every_other_layer_dense() -> None:
    cfg = ex.config_from_hf({**QWEN3, "mlp_only_layers": [], "decoder_sparse_step": 2})
    assert cfg.pattern == ["dense", "moe", "dense", "moe"]


def as_4x(hf: dict[str, Any]) -> dict[str, Any]:
    """The hub's transformers 4.x form: `rope_theta`, and Qwen3's `num_experts`."""
    old = {k: v for k, v in hf.items() if k != "rope_parameters"}
    old["rope_theta"] = hf["rope_parameters"]["rope_theta"]
    old["rope_scaling"] = None
    if hf["model_type"] == "qwen3_moe":
        old["num_experts"] = old.pop("num_local_experts")
    return old


@pytest.mark.parametrize("name", CONFIGS)
def test_4x_and_5x_configs_read_alike(name: str, tmp_path: Path) -> None:
    hf = CONFIGS[name]
    want = ex.config_from_hf(hf)
    (tmp_path / "config.json").write_text(json.dumps(as_4x(hf)))
    assert ex.config_from_hf(as_4x(hf)) == want
    assert ex.config_from_hf(tmp_path) == want
    assert ex.config_from_hf(str(tmp_path / "config.json")) == want


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_sliding_window": True, "sliding_window": 64}, "`sliding_window` is 64"),
        ({"model_type": "qwen2_moe"}, "`model_type` is 'qwen2_moe'"),
        (
            {"shared_expert_intermediate_size": 32},
            "`shared_expert_intermediate_size` is 32: the model has no shared experts",
        ),
        ({"rope_parameters": {"rope_type": "yarn"}}, "`rope_parameters.rope_type`"),
        ({"hidden_act": "gelu"}, "`hidden_act` is 'gelu'"),
        ({"attention_bias": True}, "`attention_bias` is True"),
        ({"num_experts": 8}, r"`num_experts` 8 != `num_local_experts` 4"),
        ({"layer_types": ["sliding_attention"] * 4}, "`layer_types`"),
        ({"partial_rotary_factor": 0.5}, "`partial_rotary_factor` is 0.5"),
        ({"quantization_config": {"bits": 4}}, "`quantization_config`"),
    ],
)
def test_unimplemented_fields_are_refused_by_name(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ex.config_from_hf({**QWEN3, **change})


def test_mixtral_refusals_name_every_field() -> None:
    hf = {**MIXTRAL, "sliding_window": 4096, "router_jitter_noise": 0.1}
    with pytest.raises(ValueError, match="`sliding_window` is 4096") as e:
        ex.config_from_hf(hf)
    assert "`router_jitter_noise` is 0.1" in str(e.value)


def test_fields_of_training_outputs_and_an_unused_window_are_accepted() -> None:
    hf = {**QWEN3, "output_router_logits": True, "router_aux_loss_coef": 0.01}
    hf |= {"sliding_window": 4096, "use_sliding_window": False}
    assert ex.config_from_hf(hf) == ex.config_from_hf(QWEN3)


def test_a_missing_size_is_named() -> None:
    hf = {k: v for k, v in MIXTRAL.items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="`hidden_size` is missing"):
        ex.config_from_hf(hf)


# --------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("name", CONFIGS)
def test_round_trips_are_bit_exact(name: str, dtype: Any) -> None:
    cfg = ex.config_from_hf(CONFIGS[name])
    hf = random_checkpoint(cfg, seed=3, dtype=dtype)
    assert flat_bits_equal(ex.model_to_hf(ex.hf_to_model(hf, cfg), cfg), hf)


@settings(max_examples=20, deadline=None)
@given(
    layers=st.integers(1, 5),
    experts=st.integers(1, 4),
    dense=st.sets(st.integers(0, 4)),
    step=st.integers(1, 3),
    tied=st.booleans(),
    dtype=st.sampled_from([np.float32, ml_dtypes.bfloat16, np.float16]),
    stacked=st.booleans(),
)
def test_any_qwen3_moe_layout_round_trips(
    layers: int,
    experts: int,
    dense: set[int],
    step: int,
    tied: bool,
    dtype: Any,
    stacked: bool,
) -> None:
    """Any mix of dense and MoE layers (or none of one kind), per-layer or stacked
    by kind and expert, comes back bit-exact."""
    hf_cfg = {**QWEN3, "num_hidden_layers": layers, "num_local_experts": experts}
    hf_cfg |= {"num_experts_per_tok": 1, "mlp_only_layers": sorted(dense)}
    hf_cfg |= {"decoder_sparse_step": step, "tie_word_embeddings": tied}
    cfg = ex.config_from_hf(hf_cfg)
    hf = random_checkpoint(cfg, dtype=dtype)
    flat = ex.stack_kinds(hf, cfg) if stacked else hf
    assert flat_bits_equal(ex.model_to_hf(ex.hf_to_model(flat, cfg), cfg), hf)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_model_has_one_stack_per_kind_and_experts_on_their_own_axis(
    name: str,
) -> None:
    cfg = ex.config_from_hf(CONFIGS[name])
    hf = random_checkpoint(cfg)
    model = ex.hf_to_model(hf, cfg)
    assert sorted(model.layers) == sorted(set(cfg.pattern))
    for kind, block in model.layers.items():
        want = moe_model.block_shapes(cfg, kind, np.float32)
        n = len(cfg.kinds[kind])
        assert jax.tree.map(np.shape, block) == jax.tree.map(
            lambda s, n=n: (n, *s.shape), want
        )
    moe, gate, _, _ = ex.MOE_NAMES[cfg.model_type]
    i = cfg.moe_layers[1]  # the second MoE layer: index 1 in the "moe" stack
    for e in range(cfg.num_experts):
        w = hf[f"model.layers.{i}.{moe}experts.{e}.{gate}.weight"]
        assert np.array_equal(model.layers["moe"].mlp.gate_proj[1, e], w.T)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("name", CONFIGS)
def test_a_file_stackedtree_stack_wrote_converts_too(
    name: str, dtype: Any, tmp_path: Path
) -> None:
    cfg = ex.config_from_hf(CONFIGS[name])
    hf = random_checkpoint(cfg, dtype=dtype)
    save_flat(str(tmp_path / "per-layer.safetensors"), hf)
    convert_stack(str(tmp_path / "per-layer.safetensors"), tmp_path / "s.safetensors")
    stacked = load_flat(str(tmp_path / "s.safetensors"))
    assert any("{i" in k for k in stacked)
    assert flat_bits_equal(ex.model_to_hf(ex.hf_to_model(stacked, cfg), cfg), hf)


def test_experts_stacked_on_their_axis_convert_too() -> None:
    """Stacked names with `{e}`, shape (N, E, ...): what the stack command writes
    once it stacks experts."""
    cfg = ex.config_from_hf(MIXTRAL)
    hf = random_checkpoint(cfg)
    flat = {k.replace("{i:moe}", "{i}"): x for k, x in ex.stack_kinds(hf, cfg).items()}
    assert flat["model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"].shape == (
        3, 4, 12, 16,
    )  # fmt: skip
    assert flat_bits_equal(ex.model_to_hf(ex.hf_to_model(flat, cfg), cfg), hf)


# -------------------------------------------------------------------- strictness


def test_a_shared_expert_the_config_does_not_announce_is_refused() -> None:
    cfg = ex.config_from_hf(QWEN3)
    hf = random_checkpoint(cfg)
    for i in cfg.moe_layers:
        hf[f"model.layers.{i}.mlp.shared_expert.up_proj.weight"] = np.zeros((8, 16))
    with pytest.raises(
        ValueError,
        match=r"unused tensor 'model\.layers\.\{i:moe\}\.mlp\.shared_expert\.",
    ):
        ex.hf_to_model(hf, cfg)


def test_a_missing_expert_is_named() -> None:
    cfg = ex.config_from_hf(MIXTRAL)
    hf = random_checkpoint(cfg)
    for i in range(cfg.num_layers):
        del hf[f"model.layers.{i}.block_sparse_moe.experts.2.w1.weight"]
    with pytest.raises(ValueError, match=r"layer 0 lacks expert 2's `w1.weight`"):
        ex.hf_to_model(hf, cfg)


def test_layers_the_config_calls_dense_must_be_dense() -> None:
    cfg = ex.config_from_hf(QWEN3)
    hf = random_checkpoint(cfg)
    other = ex.config_from_hf({**QWEN3, "mlp_only_layers": [2]})
    with pytest.raises(ValueError, match="keys"):
        ex.hf_to_model(hf, other)


def test_a_stacked_file_whose_kinds_do_not_fit_the_config_is_refused(
    tmp_path: Path,
) -> None:
    cfg = ex.config_from_hf(QWEN3)
    save_flat(str(tmp_path / "p.safetensors"), random_checkpoint(cfg))
    convert_stack(str(tmp_path / "p.safetensors"), tmp_path / "s.safetensors")
    other = ex.config_from_hf({**QWEN3, "mlp_only_layers": [1, 2]})
    with pytest.raises(ValueError, match=r"the stacked layers A \(3 moe layers\) do"):
        ex.hf_to_model(load_flat(str(tmp_path / "s.safetensors")), other)


# -------------------------------------------------------------------------- logits


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_the_per_token_per_expert_loop(name: str) -> None:
    cfg = ex.config_from_hf(CONFIGS[name])
    hf = random_checkpoint(cfg, seed=2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, (2, 6))
    logits = np.asarray(forward(ex.hf_to_model(hf, cfg), tokens, cfg))
    for b in range(2):
        want = reference_logits(hf, tokens[b], cfg)
        np.testing.assert_allclose(logits[b], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change", [{"norm_topk_prob": False}, {"num_experts_per_tok": 3}]
)
def test_the_loop_catches_different_routing(change: dict[str, Any]) -> None:
    cfg = ex.config_from_hf(QWEN3)
    hf = random_checkpoint(cfg, seed=2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, (2, 6))
    other = ex.config_from_hf({**QWEN3, **change})
    got = np.asarray(forward(ex.hf_to_model(hf, other), tokens, other))
    assert np.max(np.abs(got[0] - reference_logits(hf, tokens[0], cfg))) > 1e-3


def test_bfloat16_weights_compute_in_bfloat16() -> None:
    """Close to the float64 loop but for the odd token that bfloat16 rounding sends
    to another expert."""
    cfg = ex.config_from_hf(MIXTRAL)
    hf = random_checkpoint(cfg, dtype=ml_dtypes.bfloat16)
    tokens = np.arange(12).reshape(2, 6) % cfg.vocab
    logits = forward(ex.hf_to_model(hf, cfg), tokens, cfg)
    assert logits.dtype == jax.numpy.bfloat16
    want = reference_logits(hf, tokens[0], cfg)
    assert np.median(np.abs(np.asarray(logits[0], np.float32) - want)) < 0.05


def test_main_runs_a_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = ex.config_from_hf(QWEN3)
    save_flat(str(tmp_path / "model.safetensors"), random_checkpoint(cfg))
    (tmp_path / "config.json").write_text(json.dumps(QWEN3))
    ex.main([str(tmp_path), "--tokens", "3", "1", "4"])
    out = capsys.readouterr().out
    assert "gate_proj=(3, 4, 16, 12)" in out
    assert "argmax per position: [" in out


# ------------------------------------------ DeepSeek-V3: stacked and restored, no model


def deepseek_v3_checkpoint(dtype: Any = ml_dtypes.bfloat16) -> dict[str, np.ndarray]:
    """DeepSeek-V3's names at toy sizes: 2 dense layers (`first_k_dense_replace`),
    3 MoE layers (4 routed experts, a shared one, the router's score correction
    bias), multi-head latent attention, and a multi-token-prediction layer 5."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(dtype)

    d, f = 16, 8
    flat = {"model.embed_tokens.weight": w(40, d)}
    for i in range(6):
        p = f"model.layers.{i}."
        flat |= {
            p + "input_layernorm.weight": w(d),
            p + "self_attn.o_proj.weight": w(d, 24),
        }
        flat |= {p + "post_attention_layernorm.weight": w(d)}
        for name, shape in [("q_a_proj", (12, d)), ("q_a_layernorm", (12,)),
                            ("q_b_proj", (36, 12)), ("kv_a_proj_with_mqa", (10, d)),
                            ("kv_a_layernorm", (6,)), ("kv_b_proj", (40, 6))]:  # fmt: skip
            flat[f"{p}self_attn.{name}.weight"] = w(*shape)
        mlps = ["mlp.shared_experts.", *(f"mlp.experts.{e}." for e in range(4))]
        for m in ["mlp."] if i < 2 else mlps:
            flat |= {f"{p}{m}{n}_proj.weight": w(f, d) for n in ("gate", "up")}
            flat[f"{p}{m}down_proj.weight"] = w(d, f)
        if i >= 2:
            flat[p + "mlp.gate.weight"] = w(4, d)
            flat[p + "mlp.gate.e_score_correction_bias"] = w(4).astype(np.float32)
        if i == 5:  # the multi-token-prediction layer
            flat |= {p + "enorm.weight": w(d), p + "hnorm.weight": w(d)}
            flat |= {
                p + "eh_proj.weight": w(d, 2 * d),
                p + "embed_tokens.weight": w(40, d),
            }
    flat["model.norm.weight"] = w(d)
    flat["lm_head.weight"] = w(40, d)
    return flat


def test_a_deepseek_v3_checkpoint_stacks_by_kind_and_comes_back(tmp_path: Path) -> None:
    hf = deepseek_v3_checkpoint()
    kinds = detect_kinds(hf, "model.layers.{i}.")
    assert kinds == {"A": [0, 1], "B": [2, 3, 4], "C": [5]}
    stacked, rest = stack_by_name(hf, "model.layers.{i}.", layers=kinds)
    assert stacked["B"]["mlp.experts.3.down_proj.weight"].shape == (3, 16, 8)
    assert stacked["B"]["mlp.gate.e_score_correction_bias"].dtype == np.float32
    assert flat_bits_equal(
        unstack_by_name(stacked, "model.layers.{i}.", rest, layers=kinds), hf
    )

    save_flat(str(tmp_path / "per-layer.safetensors"), hf)
    convert_stack(str(tmp_path / "per-layer.safetensors"), tmp_path / "s.safetensors")
    names = load_flat(str(tmp_path / "s.safetensors"))
    assert "model.layers.{i:C}.eh_proj.weight" in names
    convert_unstack(str(tmp_path / "s.safetensors"), tmp_path / "back.safetensors")
    assert flat_bits_equal(load_flat(str(tmp_path / "back.safetensors")), hf)
    assert (tmp_path / "back.safetensors").read_bytes() == (
        tmp_path / "per-layer.safetensors"
    ).read_bytes()


def test_deepseek_v3_is_refused_by_name() -> None:
    hf = {**QWEN3, "model_type": "deepseek_v3", "n_shared_experts": 1}
    with pytest.raises(ValueError, match="`model_type` is 'deepseek_v3'") as e:
        ex.config_from_hf(hf)
    assert "`n_shared_experts` is 1: the model has no shared experts" in str(e.value)
