"""The Hugging Face Llama-family example: rules, config.json, logits, strictness.

The checkpoints, configs and the reference model it is checked against are in
`hf_llama_reference.py`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
from ckptgen import flat_bits_equal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import hf_llama_checkpoint as ex
import hf_llama_reference as ref
import llama_model

import stackedtree
from stackedtree.checkpoint import (
    load_flat,
    save_flat,
    save_stacked,
    stack_by_name,
)

CFG = ex.SMALL
VARIANTS = list(ref.VARIANTS.items())


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize(("name", "cfg"), VARIANTS)
def test_round_trips_are_bit_exact(
    name: str, cfg: llama_model.Config, dtype: Any
) -> None:
    hf = ref.random_hf_checkpoint(cfg, seed=3, dtype=dtype)
    block, rest = ex.hf_to_stacked(hf, cfg)
    assert flat_bits_equal(ex.stacked_to_hf(block, cfg, rest), hf)
    assert flat_bits_equal(ex.model_to_hf(ex.hf_to_model(hf, cfg), cfg), hf)


@pytest.mark.parametrize(("name", "cfg"), VARIANTS)
def test_block_has_the_model_layout(name: str, cfg: llama_model.Config) -> None:
    block, rest = ex.hf_to_stacked(ref.random_hf_checkpoint(cfg), cfg)
    want = llama_model.block_shapes(cfg, np.float32)
    got = jax.tree.map(lambda x: (x.shape, x.dtype), block)
    assert got == jax.tree.map(lambda s: ((cfg.num_layers, *s.shape), s.dtype), want)
    head = [] if cfg.tie_embeddings else ["lm_head.weight"]
    assert sorted(rest) == [*head, "model.embed_tokens.weight", "model.norm.weight"]


def test_query_heads_read_their_kv_group() -> None:
    """Query head n of layer i is HF's rows n*h:(n+1)*h, in kv group n // q_per_kv."""
    hf = ref.random_hf_checkpoint(CFG, seed=1)
    block, _ = ex.hf_to_stacked(hf, CFG)
    h, q = CFG.head_dim, CFG.q_per_kv
    for i in range(CFG.num_layers):
        w = hf[f"model.layers.{i}.self_attn.q_proj.weight"]
        o = hf[f"model.layers.{i}.self_attn.o_proj.weight"]
        for n in range(CFG.kv_heads * q):
            rows = slice(n * h, (n + 1) * h)
            assert np.array_equal(
                block.attention.q_proj[i, :, n % q, n // q], w[rows].T
            )
            assert np.array_equal(
                block.attention.out_proj[i, n % q, n // q], o[:, rows].T
            )


def test_a_stacked_checkpoint_converts_too(tmp_path: Path) -> None:
    hf = ref.random_hf_checkpoint(CFG)
    stacked, rest = stack_by_name(hf, "model.layers.{i}.")
    save_stacked(str(tmp_path / "s.safetensors"), stacked, "model.layers.{i}.", rest)
    model = ex.hf_to_model(load_flat(str(tmp_path / "s.safetensors")), CFG)
    assert flat_bits_equal(ex.model_to_hf(model, CFG), hf)


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize(("name", "cfg"), VARIANTS)
def test_logits_equal_the_reference(name: str, cfg: llama_model.Config) -> None:
    """Under the suite's `jax_numpy_rank_promotion="raise"`."""
    hf = ref.random_hf_checkpoint(cfg, seed=2)
    model = ex.hf_to_model(hf, cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, (2, 6))
    logits = np.asarray(llama_model.model_forward(model, tokens, cfg))
    for b in range(2):
        want = ref.reference_logits(hf, tokens[b], cfg)
        np.testing.assert_allclose(logits[b], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "change",
    [
        {"rope_scaling": None},  # issue: llama3 scaling silently ignored
        {"qkv_bias": False, "out_bias": False},  # issue: biases silently dropped
    ],
)
def test_the_reference_catches_a_different_model(change: dict[str, Any]) -> None:
    cfg = ref.VARIANTS["Llama 3.2 (llama3 rope, tied)"]._replace(
        qkv_bias=True, out_bias=True
    )
    hf = ref.random_hf_checkpoint(cfg, seed=2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, 12)
    want = ref.reference_logits(hf, tokens, cfg)
    other = cfg._replace(**change)
    if not other.qkv_bias:
        hf = {k: x for k, x in hf.items() if not k.endswith("bias")}
    model = ex.hf_to_model(hf, other)
    got = np.asarray(llama_model.model_forward(model, tokens[None], other))[0]
    assert np.max(np.abs(got - want)) > 1e-2


def test_the_reference_catches_a_wrong_head_grouping() -> None:
    """Grouping the query heads kv-minor instead of kv-major changes the logits."""
    hf = ref.random_hf_checkpoint(CFG, seed=2)
    model = ex.hf_to_model(hf, CFG)
    a = model.layers.attention
    n, d, q, kv, h = a.q_proj.shape
    wrong = a.q_proj.transpose(0, 1, 3, 2, 4).reshape(n, d, q, kv, h)
    model = model._replace(
        layers=model.layers._replace(attention=a._replace(q_proj=wrong))
    )
    tokens = np.random.default_rng(0).integers(0, CFG.vocab, 12)
    got = np.asarray(llama_model.model_forward(model, tokens[None], CFG))[0]
    assert np.max(np.abs(got - ref.reference_logits(hf, tokens, CFG))) > 1e-2


# --------------------------------------------------------------- strict conversions


def test_a_bias_the_config_does_not_announce_is_refused() -> None:
    hf = ref.random_hf_checkpoint(CFG._replace(qkv_bias=True))
    with pytest.raises(ValueError) as e:
        ex.hf_to_stacked(hf, CFG)
    assert str(e.value).splitlines() == [
        "`flat` and `like` do not match one to one under `rules`:",
        *(
            f"  unused tensor 'model.layers.{{i}}.self_attn.{p}_proj.bias' (layers 0-3): "
            "no rule reads it"
            for p in "qkv"
        ),
    ]


def test_an_announced_bias_missing_from_the_checkpoint_is_refused() -> None:
    hf = ref.random_hf_checkpoint(CFG)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "unfilled leaf layers.attention.out_bias: `flat` has no "
            "'model.layers.{i}.self_attn.o_proj.bias' for `rules[13]`"
        ),
    ):
        ex.hf_to_model(hf, CFG._replace(qkv_bias=True, out_bias=True))


def test_tied_and_untied_heads_are_told_apart() -> None:
    untied = ref.random_hf_checkpoint(CFG)
    with pytest.raises(ValueError, match=re.escape("unused tensor 'lm_head.weight'")):
        ex.hf_to_model(untied, CFG._replace(tie_embeddings=True))
    tied = ref.random_hf_checkpoint(CFG._replace(tie_embeddings=True))
    with pytest.raises(
        ValueError,
        match=re.escape("unfilled leaf lm_head: `flat` has no 'lm_head.weight'"),
    ):
        ex.hf_to_model(tied, CFG)


def test_shapes_other_than_the_config_are_refused() -> None:
    hf = ref.random_hf_checkpoint(CFG)
    with pytest.raises(
        ValueError, match=re.escape("split_axis(-2, (2, 2, 8)) cannot split axis -2")
    ):
        ex.hf_to_stacked(hf, CFG._replace(q_per_kv=2))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "layers.input_norm from 'model.layers.{i}.input_layernorm.weight': shape (4, 32) != (5, 32)"
        ),
    ):
        ex.hf_to_model(hf, CFG._replace(num_layers=5))


# ----------------------------------------------------------------------- config.json


@pytest.mark.parametrize(("name", "cfg"), VARIANTS)
@pytest.mark.parametrize("version", [4, 5])
def test_config_json_of_both_transformers_versions(
    name: str, cfg: llama_model.Config, version: int, tmp_path: Path
) -> None:
    hf = ref.hf_config(cfg, transformers=version)
    assert ("rope_parameters" in hf) == (version == 5)
    assert ex.config_from_hf(hf) == cfg
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert ex.config_from_hf(tmp_path) == cfg
    assert ex.config_from_hf(str(tmp_path / "config.json")) == cfg


def llama(**changes: Any) -> dict[str, Any]:
    return {**ref.hf_config(CFG), **changes}


def test_config_defaults_follow_transformers() -> None:
    hf = llama()
    for field in (
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope_parameters",
    ):
        del hf[field]
    cfg = ex.config_from_hf(hf)
    assert (cfg.kv_heads, cfg.q_per_kv, cfg.head_dim) == (6, 1, 32 // 6)
    assert (cfg.rms_eps, cfg.rope_theta, cfg.tie_embeddings) == (1e-6, 10000.0, False)
    legacy = ex.config_from_hf(
        llama(
            rope_parameters=None,
            rope_scaling={
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
            rope_theta=5e5,
        )
    )
    assert legacy.rope_scaling == llama_model.Llama3Rope(8.0, 1.0, 4.0, 2048)
    assert legacy.rope_theta == 5e5
    qwen = ex.config_from_hf(
        llama(model_type="qwen2", sliding_window=4096, use_sliding_window=False)
    )
    assert (qwen.qkv_bias, qwen.out_bias) == (True, False)
    mistral = ex.config_from_hf(
        llama(model_type="mistral", sliding_window=None, attention_bias=True)
    )
    assert (mistral.qkv_bias, mistral.out_bias) == (False, False)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model_type": "gemma"}, "`model_type` is 'gemma'"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
            "`rope_parameters.rope_type` is 'yarn'",
        ),
        (
            {
                "rope_parameters": None,
                "rope_scaling": {"type": "linear", "factor": 2.0},
            },
            "`rope_scaling.rope_type` is 'linear'",
        ),
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
            "`rope_parameters` lacks 'low_freq_factor'",
        ),
        ({"partial_rotary_factor": 0.5}, "`partial_rotary_factor` is 0.5"),
        ({"mlp_bias": True}, "`mlp_bias` is True"),
        ({"hidden_act": "gelu"}, "`hidden_act` is 'gelu'"),
        ({"attention_dropout": 0.1}, "`attention_dropout` is 0.1"),
        (
            {"quantization_config": {"quant_method": "fp8"}},
            "`quantization_config` is {'quant_method': 'fp8'}",
        ),
        ({"model_type": "mistral"}, "`sliding_window` is 4096"),
        ({"model_type": "mistral", "sliding_window": 4096}, "`sliding_window` is 4096"),
        (
            {
                "model_type": "qwen2",
                "use_sliding_window": True,
                "sliding_window": 64,
                "max_window_layers": 2,
            },
            "`use_sliding_window` is True",
        ),
        (
            {
                "model_type": "qwen2",
                "layer_types": ["full_attention", "sliding_attention"] * 2,
            },
            "`layer_types` is",
        ),
        (
            {"num_key_value_heads": 4},
            "`num_key_value_heads` is 4: it does not divide 6 query heads",
        ),
        ({"hidden_size": None}, "config.json lacks `hidden_size`"),
    ],
)
def test_unimplemented_features_are_refused_by_name(
    changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        ex.config_from_hf(llama(**changes))


def test_every_refusal_is_listed_at_once() -> None:
    with pytest.raises(ValueError) as e:
        ex.config_from_hf(llama(mlp_bias=True, hidden_act="relu"))
    assert str(e.value).splitlines() == [
        "config.json asks for what llama_model does not implement:",
        "  `hidden_act` is 'relu': the MLP is SwiGLU (silu)",
        "  `mlp_bias` is True: the MLP has no biases",
    ]


# ------------------------------------------------------------------------- the example


def test_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    ex.main([])
    out = capsys.readouterr().out
    assert "round trip: 39 tensors bit-exact" in out
    assert "logits of 2 sequences of 8 tokens: (2, 8, 50), float32" in out


def test_example_runs_on_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder as transformers writes it: shards, their index and config.json."""
    cfg = ref.VARIANTS["Qwen2"]
    hf = ref.random_hf_checkpoint(cfg, seed=4)
    names = sorted(hf)
    weight_map = {}
    for k, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        save_flat(str(tmp_path / shard), {n: hf[n] for n in part})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(ref.hf_config(cfg)))
    ex.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert f"round trip: {len(hf)} tensors bit-exact" in out
    assert "attention=BiasedAttention(" in out


def test_every_variant_matches_the_reference(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """From files on disk (config.json included) to logits, for every variant."""
    ref.check_variants()
    out = capsys.readouterr().out
    for name in ref.VARIANTS:
        assert f"{name}: logits match the reference" in out


def test_save_and_load_of_a_converted_model(tmp_path: Path) -> None:
    hf = ref.random_hf_checkpoint(CFG)
    save_flat(str(tmp_path / "model.safetensors"), hf)
    model = ex.hf_to_model(load_flat(str(tmp_path / "model.safetensors")), CFG)
    assert stackedtree.num_layers(model.layers) == CFG.num_layers


def test_the_transformers_comparison_fails_outside_its_tolerance() -> None:
    """`--transformers` needs torch, which the tests never have: its verdict is
    checked on made-up comparisons."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import compare_transformers as ct

    ok = ct.Comparison("Llama", "float32", 3, 3.4e-6, 3.5, None)
    ok_bf16 = ct.Comparison("Qwen2", "bfloat16", 3, 0.05, 3.5, 0.05)
    assert ct.failures([ok, ok_bf16]) == []
    bad = [
        ok._replace(max_difference=2e-5),
        ok._replace(max_difference=float("nan")),
        ok_bf16._replace(max_difference=0.25),
    ]
    got = ct.failures([ok, *bad, ok_bf16])
    assert got == [
        f"outside the tolerance {ct.TOLERANCE[c.dtype]}: {c.line()}" for c in bad
    ]
    assert "Qwen2 (3 shards, bfloat16): max |logit difference| 2.5e-01" in got[2]
