"""Decoding: cached == full forward, greedy == naive loop, padding, beams, sampling filters,
sharded == single device, fill-mask, the CLI and its errors.

Compiles are the cost here: the tests share a few prompt sets and shapes so that most calls
reuse programs compiled by an earlier test (the decoding module keeps them per shape), and
compile with XLA's optimizations mostly off (``quick_compiles``)."""

import dataclasses
import json
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5x_lite
from t5x_lite import decoding, partitioning
from t5x_lite.config import ConfigError
from t5x_lite.decoding import Sampling, beam_search, fill_mask, filter_logits, generate, generate_details
from t5x_lite.models import _jitted_apply, abstract_params, build_model

from helpers import tiny_cfg

K = 10  # new tokens
PROMPTS = [[3, 17, 9, 22], [3, 40, 41, 12, 7, 30, 33, 21, 45, 8, 50, 26], [3, 5, 60, 14, 11, 9, 28]]
FULL_LEN, FULL_ROWS = 24, 3  # the fixed shape of the no-cache reference (one compile)


def random_params(cfg, seed=0):
    """Random parameters from the abstract shapes: as good as ``init_params`` for equivalences,
    without compiling an initializer per config."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return (base + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, nn.meta.unbox(abstract_params(cfg)))


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
    """These tests compile ~25 small programs and run each for milliseconds: XLA's optimization
    passes cost more than they save (about half the compile time). Both sides of every equivalence
    compile under the same setting; it is restored for the other test modules."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def single():
    """A one-device mesh."""
    return partitioning.make_mesh(tiny_cfg("decoder"), jax.devices()[:1])


@pytest.fixture(scope="module")
def dec():
    cfg = tiny_cfg("decoder", "model.num_kv_heads=2")  # GQA, rope
    return cfg, random_params(cfg)


def full_forward(cfg, params, rows):
    """float32 logits ``[B, FULL_LEN, V]`` of the whole model without a cache; rows right-padded
    (and empty rows added up to FULL_ROWS)."""
    ids = np.zeros((FULL_ROWS, FULL_LEN), np.int32)
    seg = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], seg[i, :len(r)] = r, 1
    inputs = {"input_ids": ids, "segment_ids": seg}
    if cfg.objective == "prefix":
        inputs["prefix_mask"] = np.zeros(ids.shape, bool)
        for i, p in enumerate(rows.prompt_lengths):
            inputs["prefix_mask"][i, :p] = True
    return np.asarray(_jitted_apply(repr(cfg.model), cfg.model)(params, inputs), np.float32)[:len(rows)]


class Rows(list):
    """Prompt + new tokens per row, remembering the prompt lengths."""

    def __init__(self, prompts, new_tokens):
        super().__init__(np.concatenate([p, t]) for p, t in zip(prompts, new_tokens))
        self.prompt_lengths = [len(p) for p in prompts]


def logits_at_new_tokens(cfg, params, prompts, new_tokens):
    """Full-forward logits ``[B, n, V]`` that predict each of the n new tokens."""
    rows = Rows(prompts, new_tokens)
    full = full_forward(cfg, params, rows)
    n = np.asarray(new_tokens).shape[1]
    return np.stack([full[i, p - 1:p - 1 + n] for i, p in enumerate(rows.prompt_lengths)])


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sequence_score(logprobs_of_tokens, tokens, length_penalty, eos):
    """Sum of log-probs up to and including the first EOS, / length ** penalty."""
    n = int(np.argmax(tokens == eos)) + 1 if (tokens == eos).any() else len(tokens)
    return logprobs_of_tokens[:n].sum() / n ** length_penalty


# --------------------------------------------------------------------------- decoder


def test_cached_logits_equal_full_forward_decoder(dec, single):
    cfg, params = dec
    g = generate_details(cfg, params, PROMPTS, K, eos_id=None, output_logits=True, mesh=single)
    assert g.tokens.shape == (3, K) and g.logits.shape == (3, K, cfg.model.vocab_size)
    ref = logits_at_new_tokens(cfg, params, PROMPTS, g.tokens)
    np.testing.assert_allclose(g.logits, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(g.tokens, ref.argmax(-1))
    picked = np.take_along_axis(log_softmax(ref), g.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(g.logprobs, picked, atol=2e-5)


@pytest.fixture(scope="module")
def stop(dec, single):
    """A token that greedy decoding emits early in row 0, used as EOS so that rows stop at
    different steps (a random model hardly ever emits the real EOS)."""
    cfg, params = dec
    return int(generate_details(cfg, params, PROMPTS, K, eos_id=None, output_logits=True, mesh=single).tokens[0, 2])


def test_greedy_equals_naive_full_model_loop(dec, single, stop):
    cfg, params = dec
    eos = stop
    out = generate(cfg, params, PROMPTS, max_new_tokens=K, eos_id=eos, mesh=single)
    assert (out[0] == eos).any() and not out[0, -1]  # row 0 stopped early: padding after EOS is checked
    # naive: rerun the full model on the whole sequence for every token, stop a row at EOS
    new = [[] for _ in PROMPTS]
    for _ in range(K):
        rows = Rows(PROMPTS, [np.asarray(t, np.int32) for t in new])
        full = full_forward(cfg, params, rows)
        for i, r in enumerate(rows):
            if not new[i] or new[i][-1] != eos:
                new[i].append(int(full[i, len(r) - 1].argmax()))
    width = max(len(t) for t in new)
    expect = np.zeros((len(PROMPTS), width), np.int32)
    for i, t in enumerate(new):
        expect[i, :len(t)] = t
    np.testing.assert_array_equal(out, expect)
    # the layer scan unrolled when decoding (model.decode_scan_unroll, a GPU decode speed knob): the same tokens
    unrolled = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, decode_scan_unroll=cfg.model.num_layers))
    np.testing.assert_array_equal(generate(unrolled, params, PROMPTS, max_new_tokens=K, eos_id=eos, mesh=single), expect)
    from t5x_lite.decoding import _Decoder

    assert _Decoder(unrolled, single, len(PROMPTS)).model.cfg.scan_unroll == cfg.model.num_layers  # it took effect


def test_unrolled_decoding_splits_the_stacked_layers_once(dec, encdec, single):
    """With every layer unrolled (model.decode_scan_unroll), decoding reads each layer's own
    arrays, split out of the stacked parameters once per call, and keeps each layer's own cache
    (slicing a stack inside the token loop copies it every token): the same generation and beams
    as the scanned stack, for both families, on one device and with the parameters sharded over 8
    (ZeRO-3)."""
    for cfg, params, inputs in ((*dec, PROMPTS), (*encdec, [p[1:] + [1] for p in PROMPTS])):
        layers = max(cfg.model.num_layers, cfg.model.decoder_layers)
        unrolled = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, decode_scan_unroll=layers))
        d = decoding._decoder(unrolled, single, len(inputs))
        assert d.unstacked and not decoding._decoder(cfg, single, len(inputs)).unstacked
        split = d.put_params(params)
        stack = split["decoder"]["stack"]
        assert "layers" not in stack and sorted(stack) == sorted(f"layers_{i}" for i in range(layers))
        np.testing.assert_array_equal(stack["layers_1"]["mlp"]["wo"]["kernel"],
                                      params["decoder"]["stack"]["layers"]["mlp"]["wo"]["kernel"][1])
        assert jax.tree.structure(d.put_params(split)) == jax.tree.structure(split)  # already split: kept
        ref = generate_details(cfg, params, inputs, K, eos_id=None, mesh=single)
        got = generate_details(unrolled, params, inputs, K, eos_id=None, mesh=single)
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-5, atol=1e-6)
        # and its cache one entry a layer ([B, S, K, H], read without slicing a stack), beams reordered in it
        prompts = decoding.left_pad([np.asarray(r, np.int32) for r in inputs], max(len(r) for r in inputs))
        state = d.prefill(split, prompts, K, decoding.BOS_ID)
        layers_cache = state["cache"]["layers"]
        assert isinstance(layers_cache, list) and len(layers_cache) == layers
        assert layers_cache[0]["self"]["k"].shape == (len(inputs), state["cache"]["segment_ids"].shape[1],
                                                      cfg.model.kv_heads, cfg.model.dim_per_head)
        a = beam_search(unrolled, params, inputs[:2], K, num_beams=3, eos_id=None, mesh=single)
        b = beam_search(cfg, params, inputs[:2], K, num_beams=3, eos_id=None, mesh=single)
        np.testing.assert_array_equal(a.sequences, b.sequences)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    cfg, params = dec
    unrolled = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, decode_scan_unroll=cfg.model.num_layers))
    mesh8 = partitioning.make_mesh(cfg)
    np.testing.assert_array_equal(generate(unrolled, params, PROMPTS[:2] * 4, max_new_tokens=K, mesh=mesh8),
                                  generate(cfg, params, PROMPTS[:2] * 4, max_new_tokens=K, mesh=single))


def test_float32_parameters_decode_cast_once_to_the_compute_dtype(single):
    """Parameters stored in float32 (training's master weights) with bf16 compute: decoding casts
    the ones every module casts at use (kernels, embeddings, a Dense bias) once per call, and keeps
    norm scales and biases, T5's relative position table and a router's balancing bias in float32.
    The same logits as converting them inside every step."""
    from t5x_lite.decoding import cast_at_use, compute_dtype_params

    for family, extra in (("decoder", ["model.use_bias=true", "model.norm=layernorm"]),
                          ("encoder_decoder", [])):
        cfg = tiny_cfg(family, "model.dtype=bfloat16", *extra)
        params = random_params(cfg, seed=3)
        names = {jax.tree_util.keystr(p) for p in cast_at_use(params, jnp.bfloat16)}
        assert any(n.endswith("['kernel']") for n in names) and any(n.endswith("['embedding']") for n in names)
        assert not any(n.endswith("['scale']") or "rel_embedding" in n for n in names)
        if family == "decoder":  # Dense biases cast, the LayerNorm's kept
            assert any("['query']['bias']" in n for n in names)
            assert not any("_norm']['bias']" in n for n in names)
        cast = compute_dtype_params(params, jnp.bfloat16)
        d = decoding._decoder(cfg, single, len(PROMPTS))
        put = d.put_params(params)
        assert jax.tree.map(lambda x: x.dtype, put) == jax.tree.map(lambda x: x.dtype, cast)
        assert put["decoder"]["stack"]["layers"]["mlp"]["wo"]["kernel"].dtype \
            == jnp.bfloat16
        inputs = PROMPTS if family == "decoder" else [p[1:] + [1] for p in PROMPTS]
        ours = generate_details(cfg, params, inputs, K, eos_id=None, output_logits=True, mesh=single)
        # reference: every step converting the float32 weights itself (the cast made a no-op)
        original = decoding.compute_dtype_params
        try:
            decoding.compute_dtype_params = lambda p, dtype: p
            decoding._DECODERS.clear()
            ref = generate_details(cfg, params, inputs, K, eos_id=None, output_logits=True, mesh=single)
        finally:
            decoding.compute_dtype_params = original
            decoding._DECODERS.clear()
        np.testing.assert_array_equal(ours.tokens, ref.tokens)
        np.testing.assert_allclose(ours.logits, ref.logits, rtol=2e-2, atol=2e-2)


def test_fused_projections_decode_as_separate_ones(dec, single):
    """A config trained with model.fused_qkv / fused_mlp decodes with separate projections (fused
    ones copy the weights into one kernel: 22% slower a token on an H100), scanned or unrolled,
    to the same tokens."""
    from t5x_lite.decoding import _Decoder

    cfg, params = dec
    m = dataclasses.replace(cfg.model, fused_qkv=True, fused_mlp=True)
    for unroll in (0, m.num_layers):
        fused = dataclasses.replace(cfg, model=dataclasses.replace(m, decode_scan_unroll=unroll))
        model_cfg = _Decoder(fused, single, 2).model.cfg
        assert not model_cfg.fused_qkv and not model_cfg.fused_mlp
        np.testing.assert_array_equal(generate(fused, params, PROMPTS, max_new_tokens=K, mesh=single),
                                      generate(cfg, params, PROMPTS, max_new_tokens=K, mesh=single))


def test_stop_checks_every_n_tokens_give_the_same_generation(dec, single, monkeypatch):
    """model.decode_stop_every: N tokens at a time in a loop of known length between checks of
    whether every row has stopped; the tokens computed past the stop are thrown away. The same
    tokens, log-probabilities, logits and length as checking every token: with no stop id, with one
    row stopping early, with every row stopping before K (the loop then ends mid-block), greedy
    and sampled, N not dividing K and N above K."""
    cfg, params = dec
    free = generate_details(cfg, params, PROMPTS, K, eos_id=None, output_logits=True, mesh=single)
    stops = sorted({int(free.tokens[i, 2 + i]) for i in range(len(PROMPTS))})  # row i stops by step 2 + i
    every = lambda n: dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, decode_stop_every=n))
    for eos in (None, stops[0], stops):
        ref = generate_details(cfg, params, PROMPTS, K, eos_id=eos, output_logits=True, mesh=single)
        got = generate_details(every(3), params, PROMPTS, K, eos_id=eos, output_logits=True, mesh=single)
        assert got.tokens.shape == ref.tokens.shape
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        np.testing.assert_array_equal(got.logprobs, ref.logprobs)
        np.testing.assert_array_equal(got.logits, ref.logits)
    assert ref.tokens.shape[1] <= 2 + len(PROMPTS) < K  # the last case stopped every row early
    sampled = dict(max_new_tokens=K, eos_id=stops, temperature=0.9, top_k=20, seed=4, mesh=single)
    np.testing.assert_array_equal(generate(every(16), params, PROMPTS, **sampled),
                                  generate(cfg, params, PROMPTS, **sampled))
    # what it is for: the compiled token loop holds an inner loop whose trip count XLA knows (on a
    # GPU it then runs without reading the condition back to the host between tokens)
    from t5x_lite.decoding import _Decoder

    seen = []
    build = _Decoder._build_sample

    def recording(self, *a, **kw):
        fn = build(self, *a, **kw)

        def call(*args):
            seen.append((fn, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), args)))
            return fn(*args)
        return call

    monkeypatch.setattr(_Decoder, "_build_sample", recording)
    generate(every(3), params, PROMPTS, max_new_tokens=K, eos_id=stops, mesh=single)
    fn, args = seen[-1]
    assert '"known_trip_count":{"n":"3"}' in fn.lower(*args).compile().as_text()


def test_generation_in_parts_equals_one_call(dec, single):
    """generate_parts (for streaming): the parts joined are exactly generate_details's tokens and
    log-probabilities, greedy and sampled (token t draws with the key folded with t, whichever
    part makes it), rows stopping in different parts; it ends once every row has stopped; a part
    is rounded up to a multiple of model.decode_stop_every."""
    cfg, params = dec
    free = generate_details(cfg, params, PROMPTS, K, eos_id=None, mesh=single)
    stops = sorted({int(free.tokens[i, 2 + i]) for i in range(len(PROMPTS))})  # row i stops by step 2 + i
    every = lambda n: dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, decode_stop_every=n))
    for c, eos, sampling, part, sizes in [
            (cfg, None, {}, 3, [3, 3, 3, 1]),  # K = 10: a shorter last part
            (cfg, stops, {}, 2, None),  # every row stops before K: fewer parts
            (cfg, stops[0], dict(temperature=0.9, top_k=20, seed=4), 4, None),
            (every(2), None, dict(temperature=0.9, top_p=0.8, seed=5), 3, [4, 4, 2])]:
        ref = generate_details(c, params, PROMPTS, K, eos_id=eos, mesh=single, **sampling)
        parts = list(decoding.generate_parts(c, params, PROMPTS, K, eos_id=eos, mesh=single, part_tokens=part,
                                             **sampling))
        np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts], 1), ref.tokens)
        np.testing.assert_array_equal(np.concatenate([p.logprobs for p in parts], 1), ref.logprobs)
        if sizes:
            assert [p.tokens.shape[1] for p in parts] == sizes
        else:
            assert all(p.tokens.shape[1] == part for p in parts[:-1])
        if eos is stops:
            assert ref.tokens.shape[1] < K - part  # the rows stopped a whole part early: no more parts ran
    with pytest.raises(ConfigError, match="part_tokens=0 must be >= 1"):
        next(decoding.generate_parts(cfg, params, PROMPTS, K, part_tokens=0, mesh=single))


def test_scored_tokens_equal_the_full_forward(dec, single):
    """score_tokens: each token's log-probability given the tokens before it and the top-k there,
    for rows of different lengths in one padded batch, equal the log-softmax of one full forward
    pass of each row alone; refused where a model does not predict its input causally."""
    cfg, params = dec
    got = decoding.score_tokens(cfg, params, PROMPTS, top_k=3, mesh=single)
    for row, scores in zip(PROMPTS, got):
        logp = np.asarray(jax.nn.log_softmax(t5x_lite.logits(cfg, params, np.asarray([row]))[0], axis=-1))
        assert np.isnan(scores.logprobs[0]) and (scores.top_ids[0] == -1).all()
        np.testing.assert_allclose(scores.logprobs[1:], logp[np.arange(len(row) - 1), row[1:]], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(scores.top_ids[1:], np.argsort(-logp[:-1], axis=-1)[:, :3])
        np.testing.assert_allclose(scores.top_logprobs[1:], -np.sort(-logp[:-1], axis=-1)[:, :3], rtol=1e-5, atol=1e-5)
    assert decoding.score_tokens(cfg, params, PROMPTS[:1], mesh=single)[0].top_ids.shape == (len(PROMPTS[0]), 0)
    prefix = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, objective="prefix"))
    with pytest.raises(ConfigError, match="needs targets here: a prefix LM reads its input both ways"):
        decoding.score_tokens(prefix, params, PROMPTS, mesh=single)


def test_scored_targets_equal_the_full_forward(dec, encdec, single):
    """score_tokens(..., targets=): the targets' tokens given the input. Causal decoder: the
    targets' columns of scoring input + target; prefix LM: the input read both ways (the model
    called with its prefix mask); encoder_decoder: the decoder after the start token (logits with
    decoder_input_ids). Rows of different lengths in one batch, each equal to its row alone."""
    targets = [[7, 8, 9], [30], [11, 12, 13, 14, 15]]
    cfg, params = dec
    whole = decoding.score_tokens(cfg, params, [p + t for p, t in zip(PROMPTS, targets)], top_k=2, mesh=single)
    got = decoding.score_tokens(cfg, params, PROMPTS, top_k=2, targets=targets, mesh=single)
    for g, w, t in zip(got, whole, targets):
        np.testing.assert_allclose(g.logprobs, w.logprobs[-len(t):], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(g.top_ids, w.top_ids[-len(t):])

    prefix = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, objective="prefix"))
    model = build_model(prefix)
    got = decoding.score_tokens(prefix, params, PROMPTS, targets=targets, mesh=single)
    for p, t, g in zip(PROMPTS, targets, got):
        seq = np.asarray([p + t])
        mask = np.arange(seq.shape[1])[None] < len(p)
        logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, seq, prefix_mask=mask)[0], axis=-1))
        np.testing.assert_allclose(g.logprobs, logp[np.arange(len(p) - 1, len(p) + len(t) - 1), t], rtol=1e-5,
                                   atol=1e-5)
    causal = decoding.score_tokens(cfg, params, PROMPTS, targets=targets, mesh=single)
    assert not np.allclose(causal[0].logprobs, got[0].logprobs)  # the prefix is read both ways: other numbers

    cfg, params = encdec
    got = decoding.score_tokens(cfg, params, PROMPTS, top_k=1, targets=targets, start_id=0, mesh=single)
    for p, t, g in zip(PROMPTS, targets, got):
        logits = t5x_lite.logits(cfg, params, np.asarray([p]), decoder_input_ids=np.asarray([[0] + t[:-1]]))
        logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
        np.testing.assert_allclose(g.logprobs, logp[np.arange(len(t)), t], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(g.top_ids[:, 0], logp.argmax(-1))
    with pytest.raises(ConfigError, match="needs targets here: the encoder reads the input"):
        decoding.score_tokens(cfg, params, PROMPTS, mesh=single)
    with pytest.raises(ConfigError, match="targets has 1 rows for 3 inputs"):
        decoding.score_tokens(cfg, params, PROMPTS, targets=targets[:1], mesh=single)


def test_left_padded_batch_equals_each_prompt_alone(dec, single):
    cfg, params = dec
    batch = generate(cfg, params, PROMPTS, max_new_tokens=K, mesh=single)
    alone = generate(cfg, params, [PROMPTS[0]], max_new_tokens=K, mesh=single)  # 4 pads instead of 12
    np.testing.assert_array_equal(alone[0], batch[0, :alone.shape[1]])
    # the same batch given as a padded array with an attention mask (right padding here)
    arr = np.zeros((3, 12), np.int32)
    mask = np.zeros_like(arr)
    for i, p in enumerate(PROMPTS):
        arr[i, :len(p)], mask[i, :len(p)] = p, 1
    np.testing.assert_array_equal(generate(cfg, params, arr, K, attention_mask=mask, mesh=single), batch)


def test_beam_one_equals_greedy(dec, single):
    cfg, params = dec
    greedy = generate_details(cfg, params, PROMPTS, K, eos_id=None, output_logits=True, mesh=single)
    beams = beam_search(cfg, params, PROMPTS, K, num_beams=1, length_penalty=0.0, eos_id=None, mesh=single)
    np.testing.assert_array_equal(beams.sequences[:, 0], greedy.tokens)
    np.testing.assert_allclose(beams.scores[:, 0], greedy.logprobs.sum(-1), rtol=1e-5)


def test_beams_sorted_consistent_and_no_worse_than_greedy(dec, single, stop):
    """Scores sorted, equal to the full model's score of each returned sequence (log p up to EOS /
    length), padded after EOS, and the best no worse than greedy's."""
    cfg, params = dec
    prompts, alpha = PROMPTS[:2], 1.0
    beams = beam_search(cfg, params, prompts, K, num_beams=4, length_penalty=alpha, eos_id=stop, mesh=single)
    assert (beams.sequences == stop).any()  # some hypotheses finished with EOS
    assert np.all(np.diff(beams.scores, axis=1) <= 1e-6)
    for j in range(4):
        seqs = beams.sequences[:, j]
        ref = log_softmax(logits_at_new_tokens(cfg, params, prompts, seqs))
        logp = np.take_along_axis(ref, seqs[..., None], -1)[..., 0]
        for i in range(2):
            ended = seqs[i] == stop
            assert not ended.any() or not seqs[i, np.argmax(ended) + 1:].any()
            np.testing.assert_allclose(beams.scores[i, j], sequence_score(logp[i], seqs[i], alpha, stop), rtol=1e-4)
    greedy = generate_details(cfg, params, PROMPTS, K, eos_id=stop, mesh=single)  # rows decode independently
    for i in range(2):
        assert beams.scores[i, 0] >= sequence_score(greedy.logprobs[i], greedy.tokens[i], alpha, stop) - 1e-5
    best = generate(cfg, params, prompts, K, num_beams=4, eos_id=stop, mesh=single)
    np.testing.assert_array_equal(best, beams.sequences[:, 0, :best.shape[1]])


# --------------------------------------------------------------------------- sampling


def test_any_of_several_stop_ids_ends_a_row(dec, single):
    """eos_id as several tokens (a chat model's EOS and end of turn): each row ends at the first
    of them it emits, as the full greedy run cut there; beams take them too."""
    cfg, params = dec
    full = generate(cfg, params, PROMPTS, K, eos_id=None, mesh=single)
    row = full[0].tolist()
    p = next(i for i in range(1, K) if row[i] not in row[:i])  # a token row 0 first emits at step p
    absent = next(t for t in range(5, cfg.model.vocab_size) if t not in full)
    stops = [absent, row[p]]
    got = generate(cfg, params, PROMPTS, K, eos_id=stops, mesh=single)
    for r, g in zip(full, got):
        hits = [i for i, t in enumerate(r) if t in stops]
        end = hits[0] + 1 if hits else K
        np.testing.assert_array_equal(g[:end], r[:end])
        assert not g[end:].any()  # padding after the stop
    assert got.shape[1] <= K and not got[0, p + 1:].any()
    one = beam_search(cfg, params, PROMPTS[:1], K, num_beams=2, eos_id=row[p], mesh=single)
    two = beam_search(cfg, params, PROMPTS[:1], K, num_beams=2, eos_id=[absent, row[p]], mesh=single)
    np.testing.assert_array_equal(two.sequences, one.sequences)
    with pytest.raises(ConfigError, match="up to 4 of them"):
        generate(cfg, params, PROMPTS, K, eos_id=[1, 2, 3, 4, 5], mesh=single)


def test_filter_logits_keeps_exactly_top_k_and_nucleus():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
    order = np.argsort(-logits, axis=-1)
    for temp, k, p in [(1.0, 5, 1.0), (0.7, 0, 0.6), (1.3, 12, 0.8), (1.0, 0, 1.0)]:
        out = np.asarray(jax.jit(lambda x: filter_logits(x, Sampling(temp, k, p)))(logits))
        x = logits / temp
        for r in range(6):
            cand = order[r, :k] if k else order[r]
            probs = np.exp(x[r, cand] - x[r, cand].max())
            probs /= probs.sum()
            before = np.cumsum(probs) - probs
            expect = set(cand[before < p].tolist() if p < 1 else cand.tolist())
            assert set(np.flatnonzero(np.isfinite(out[r])).tolist()) == expect, (temp, k, p, r)
            kept = sorted(expect)
            np.testing.assert_allclose(out[r, kept], x[r, kept], rtol=1e-6)


def test_sampled_tokens_stay_in_top_k_and_nucleus_and_seed_reproduces(dec, single):
    cfg, params = dec
    args = dict(temperature=1.5, top_k=6, top_p=0.5, eos_id=None, output_logits=True, mesh=single)
    g = generate_details(cfg, params, PROMPTS, K, seed=7, **args)
    for r in range(len(PROMPTS)):
        for t in range(K):
            x = g.logits[r, t] / 1.5
            top = np.argsort(-x)[:6]
            probs = np.exp(x[top] - x[top].max())
            probs /= probs.sum()
            nucleus = top[np.cumsum(probs) - probs < 0.5]
            assert g.tokens[r, t] in nucleus
    again = generate_details(cfg, params, PROMPTS, K, seed=7, **args)
    np.testing.assert_array_equal(again.tokens, g.tokens)
    other = generate_details(cfg, params, PROMPTS, K, seed=8, **args)
    assert not np.array_equal(other.tokens, g.tokens)
    assert len({int(t) for t in g.tokens.ravel()}) > len(PROMPTS)  # it does sample, not argmax


def test_temperature_to_zero_equals_greedy(dec, single):
    cfg, params = dec
    greedy = generate(cfg, params, PROMPTS, K, mesh=single)
    cold = generate_details(cfg, params, PROMPTS, K, temperature=1e-6, seed=3, output_logits=True, mesh=single)
    np.testing.assert_array_equal(cold.tokens, greedy)


# --------------------------------------------------------------------------- other configs


@pytest.mark.parametrize("overrides", [("model.position=alibi", "data.objective=prefix", "model.sliding_window=3"),
                                       ("model.position=learned", "model.num_kv_heads=1", "model.qk_norm=true"),
                                       ("model.num_experts=8", "model.experts_per_token=2"),  # decoding steps gather experts
                                       ("model.norm_position=output", "model.qk_norm=true",  # OLMo 2's layer
                                        "model.qk_norm_scope=all_heads")])
def test_cached_logits_equal_full_forward_positions(overrides, single):
    cfg = tiny_cfg("decoder", *overrides)
    params = random_params(cfg, 1)
    g = generate_details(cfg, params, PROMPTS, K, eos_id=None, output_logits=True, mesh=single)
    ref = logits_at_new_tokens(cfg, params, PROMPTS, g.tokens)
    np.testing.assert_allclose(g.logits, ref, atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def encdec():
    cfg = tiny_cfg("encoder_decoder", "model.qk_norm=true")  # relative position bias on both sides; q / k norms
    return cfg, random_params(cfg)


def encdec_logits(cfg, params, inputs, decoded, start=3):
    enc = np.zeros((len(inputs), 16), np.int32)
    enc_mask = np.zeros_like(enc)
    for i, r in enumerate(inputs):
        enc[i, :len(r)], enc_mask[i, :len(r)] = r, 1
    dec_in = np.concatenate([np.full((len(inputs), 1), start, np.int32), decoded[:, :-1]], 1)
    return np.asarray(t5x_lite.logits(cfg, params, enc, decoder_input_ids=dec_in, attention_mask=enc_mask,
                                      decoder_attention_mask=np.ones_like(dec_in)))


def test_cached_logits_equal_full_forward_encoder_decoder(encdec, single):
    cfg, params = encdec
    inputs = [p[1:] + [1] for p in PROMPTS]  # encoder inputs end with EOS
    g = generate_details(cfg, params, inputs, K, eos_id=None, output_logits=True, mesh=single)
    ref = encdec_logits(cfg, params, inputs, g.tokens)
    np.testing.assert_allclose(g.logits, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(g.tokens, ref.argmax(-1))


def test_encoder_of_one_document_rows_reads_left_padded_prompts_through_the_mask(encdec, single, monkeypatch):
    """A T5 trained with model.max_segments 1 gives cuDNN a length a row, which assumes each row's
    document starts at slot 0; decoding's prompts are left-padded, so its encoder keeps the mask.
    With jax's XLA reference standing in for cuDNN, the cached logits equal the full forward."""
    from helpers import cudnn_as_xla

    cfg, params = encdec
    inputs = [p[1:] + [1] for p in PROMPTS]
    ref = generate_details(cfg, params, inputs, K, eos_id=None, output_logits=True, mesh=single)
    seen = cudnn_as_xla(monkeypatch)
    one_doc = tiny_cfg("encoder_decoder", "model.qk_norm=true", "model.attention=auto", "model.max_segments=1")
    g = generate_details(one_doc, params, inputs, K, eos_id=None, output_logits=True, mesh=single)
    prompt_len = max(t for *_, t in seen)  # not the initialisers' traces of 8 tokens
    assert prompt_len == 16 and {kind for kind, _, t in seen if t == prompt_len} == {"mask"}
    np.testing.assert_allclose(g.logits, ref.logits, atol=2e-5, rtol=2e-5)


def test_encoder_decoder_beams(encdec, single):
    cfg, params = encdec
    inputs = [PROMPTS[1][1:] + [1]]
    beams = beam_search(cfg, params, inputs, K, num_beams=3, length_penalty=0.6, eos_id=None, mesh=single)
    assert beams.sequences.shape == (1, 3, K)
    assert np.all(np.diff(beams.scores, axis=1) <= 1e-6)
    seqs = beams.sequences[0]  # the 3 hypotheses as 3 rows
    ref = log_softmax(encdec_logits(cfg, params, inputs * 3, seqs))
    logp = np.take_along_axis(ref, seqs[..., None], -1)[..., 0].sum(-1) / K ** 0.6
    np.testing.assert_allclose(beams.scores[0], logp, rtol=1e-4)
    assert len({tuple(s) for s in seqs}) == 3  # distinct hypotheses
    greedy = generate_details(cfg, params, inputs * 3, K, eos_id=None, output_logits=True, mesh=single)
    assert beams.scores[0, 0] >= greedy.logprobs[0].sum() / K ** 0.6 - 1e-5


def test_sharded_stage3_equals_single_device(dec, single):
    cfg, params = dec
    mesh8 = partitioning.make_mesh(cfg)  # fsdp=8, zero_stage=3: parameters sharded
    assert cfg.sharding.zero_stage == 3 and mesh8.shape["fsdp"] == 8
    sharded = decoding._decoder(cfg, mesh8, 8).put_params(params)
    assert not sharded["token_embed"]["embedding"].sharding.is_fully_replicated
    prompts = PROMPTS[:2]  # x 4 beams = 8 rows: the batch is split over the 8 devices too
    a = beam_search(cfg, sharded, prompts, K, num_beams=4, length_penalty=1.0)  # mesh taken from params
    b = beam_search(cfg, params, prompts, K, num_beams=4, length_penalty=1.0, mesh=single)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_experts_decode_sharded_as_on_one_device(single, expert_parallel):
    """A mixture of experts decoding on 8 devices (ZeRO-3: experts split over fsdp by their input
    width; or expert parallel: one whole expert per device), its steps gathering each token's
    experts, gives one device's tokens and logits."""
    cfg = tiny_cfg("decoder", "model.num_experts=8", "model.experts_per_token=2",
                   f"sharding.expert_parallel={str(expert_parallel).lower()}")
    params = random_params(cfg, 2)
    mesh8 = partitioning.make_mesh(cfg)
    sharded = decoding._decoder(cfg, mesh8, 8).put_params(params)
    wi = sharded["decoder"]["stack"]["layers"]["mlp"]["wi_0"]["kernel"]
    assert tuple(wi.sharding.spec)[:2] == ((None, "fsdp") if expert_parallel else (None, None))
    a = generate_details(cfg, sharded, PROMPTS[:2], K, eos_id=None, output_logits=True)
    b = generate_details(cfg, params, PROMPTS[:2], K, eos_id=None, output_logits=True, mesh=single)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------- encoder


def test_fill_mask_matches_full_forward(single):
    cfg = tiny_cfg("encoder")
    params = random_params(cfg)
    prompts = [[9, 4, 12, 30], [7, 8, 4, 20, 21, 4]]
    fills = fill_mask(cfg, params, prompts, top_k=3, mesh=single)
    assert [[f.position for f in row] for row in fills] == [[1], [2, 5]]
    ids, mask = np.zeros((2, 6), np.int32), np.zeros((2, 6), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = p, 1
    probs = np.exp(log_softmax(np.asarray(t5x_lite.logits(cfg, params, ids, attention_mask=mask))))
    for i, row in enumerate(fills):
        for f in row:
            best = np.argsort(-probs[i, f.position])[:3]
            assert f.token_ids == best.tolist()
            np.testing.assert_allclose(f.probs, probs[i, f.position, best], rtol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_error(dec, single):
    cfg, params = dec
    cases = [
        (dict(input_ids=[[3] * 60]), r"longest prompt \(60 tokens\) plus max_new_tokens=10 exceeds "
                                     r"model.max_length=64; lower max_new_tokens to at most 4"),
        (dict(input_ids=[[3] * 70]), r"prompt 0 has 70 tokens, more than model.max_length=64"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(temperature=-1.0), r"temperature=-1.0 must be >= 0"),
        (dict(top_k=-2), r"top_k=-2 must be >= 0"),
        (dict(num_beams=2, temperature=0.5), r"beam search \(num_beams=2\) is deterministic"),
        (dict(input_ids=[[3, 99]]), r"token id 99, outside the model's vocabulary \[0, 61\)"),
        (dict(input_ids=[[3], []]), r"prompt 1 is empty"),
    ]
    for kwargs, message in cases:
        args = dict(input_ids=PROMPTS, max_new_tokens=K, mesh=single)
        args.update(kwargs)
        with pytest.raises(ConfigError, match=message):
            generate(cfg, params, **args)
    enc_cfg = tiny_cfg("encoder")
    with pytest.raises(ConfigError, match="needs a decoder or encoder_decoder model.*fill_mask"):
        generate(enc_cfg, None, PROMPTS, K, num_beams=2)
    with pytest.raises(ConfigError, match=r"prompt\(s\) \[0\] hold no mask token"):
        fill_mask(enc_cfg, None, [[9, 10]], mesh=single)


# --------------------------------------------------------------------------- CLI


def _corpus(n_docs=200, seed=0):
    rng = np.random.default_rng(seed)
    syllables = ["ka", "to", "ri", "mo", "ne", "sa", "lu", "pe", "di", "fo", "ba", "zi"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
    return [" ".join(rng.choice(words, size=rng.integers(5, 40))) + "." for _ in range(n_docs)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A work dir as training leaves it: config.yaml, tokenizer.model and a checkpoint."""
    from t5x_lite.checkpoints import Checkpoints
    from t5x_lite.data import Tokenizer
    from t5x_lite.trainer import write_workdir_config

    path = str(tmp_path_factory.mktemp("decode_workdir"))
    cfg = tiny_cfg("decoder", "model.vocab_size=320", "data.num_sentinels=8", "model.num_kv_heads=2")
    write_workdir_config(cfg, path)
    Tokenizer.train(_corpus(), os.path.join(path, "tokenizer.model"), 320, 8, seed=0)
    params = random_params(cfg)
    ckpt = Checkpoints(path, cfg)
    ckpt.save(3, types.SimpleNamespace(params=params, opt_state={"count": np.zeros((), np.int32)}), {})
    ckpt.close()
    return path, cfg


def run_cli(capsys, *argv):
    from t5x_lite.cli import main

    code = main(["decode", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_decodes_reproducibly_and_matches_single_device_python(workdir, capsys, single):
    from t5x_lite.checkpoints import load_for_inference

    path, _ = workdir
    prompts = ["kato rimo", "ba zi lu pe sa"]
    argv = ["--workdir", path, "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "6",
            "--temperature", "0.9", "--top-k", "20", "--seed", "5"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert run_cli(capsys, *argv)[1] == out  # same arguments and seed: same output
    cfg, params, tok = load_for_inference(path, mesh=single)  # the CLI ran FSDP-sharded on 8 devices
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    tokens = generate(cfg, params, ids, 6, temperature=0.9, top_k=20, seed=5)
    expect = "".join(f">>> {p}\n{tok.decode(t)}\n" for p, t in zip(prompts, tokens))
    assert out == expect


def test_cli_decodes_a_file_of_prompts_in_batches(workdir, capsys, tmp_path):
    """--input JSON lines -> --output JSON lines: every record kept (other fields too) with its
    output, in input order, decoded --batch-size at a time (shortest first) as greedy decoding
    of each prompt alone on the command line would."""
    path, _ = workdir
    prompts = ["kato rimo ba zi lu pe sa ne", "ka", "ri mo ne", "sa lu pe di fo"]
    src, dst = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"question": p, "id": i}) + "\n" for i, p in enumerate(prompts)) + "\n")
    code, _, err = run_cli(capsys, "--workdir", path, "--input", str(src), "--field", "question", "--output", str(dst),
                           "--batch-size", "3", "--max-new-tokens", "5")
    assert code == 0, err
    assert "decoded 3/4 prompts" in err and f"wrote 4 records to {dst}" in err
    assert f"decoding 4 prompt(s) with the decoder model of {path} at step 3 (loaded in" in err
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [(r["question"], r["id"]) for r in records] == [(p, i) for i, p in enumerate(prompts)]
    for r in records:
        code, out, _ = run_cli(capsys, "--workdir", path, "--prompt", r["question"], "--max-new-tokens", "5")
        assert out == f">>> {r['question']}\n{r['output']}\n"
    code, _, err = run_cli(capsys, "--workdir", path, "--input", str(src), "--prompt", "ka")
    assert code == 2 and "one of the two" in err
    code, _, err = run_cli(capsys, "--workdir", path, "--input", str(src))
    assert code == 2 and "prompts.jsonl:1 has no text field 'input'" in err


def test_cli_chat_renders_each_prompt_as_a_user_turn(workdir, capsys, tmp_path):
    """--chat: a prompt is the user's turn of a conversation in the work dir's chat template
    (an --input record may give the conversation so far); the same tokens as the rendered text."""
    import shutil

    from t5x_lite.checkpoints import read_config
    from t5x_lite.trainer import write_workdir_config

    path, _ = workdir
    code, _, err = run_cli(capsys, "--workdir", path, "--prompt", "ka", "--chat")
    assert code == 2 and "--chat needs a chat template" in err
    chatty = str(tmp_path / "chatty")
    shutil.copytree(path, chatty)
    (tmp_path / "chat.json").write_text(json.dumps({
        "template": "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}", "bos_token": "", "eos_token": ""}))
    cfg = read_config(chatty)
    cfg.data.chat_template = str(tmp_path / "chat.json")
    write_workdir_config(cfg, chatty)
    args = ("--workdir", chatty, "--max-new-tokens", "4")
    _, out, _ = run_cli(capsys, *args, "--chat", "--prompt", "ka ri")
    _, rendered, _ = run_cli(capsys, *args, "--prompt", "<user> ka ri <assistant>")
    body = lambda printed: printed.split("\n", 1)[1][:-1]  # the completion, after the ">>> prompt" line
    assert body(out) == body(rendered) and out.startswith(">>> ka ri\n")
    src, dst = tmp_path / "talk.jsonl", tmp_path / "answers.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "ka ri"}]}) + "\n")
    assert run_cli(capsys, *args, "--chat", "--input", str(src), "--output", str(dst))[0] == 0
    assert json.loads(dst.read_text())["output"] == body(rendered)


def test_cli_errors(workdir, capsys, tmp_path):
    from t5x_lite.trainer import write_workdir_config

    path, cfg = workdir
    code, _, err = run_cli(capsys, "--workdir", path, "--prompt", "ka", "--top-p", "1.5", "--temperature", "-1")
    assert code == 2 and "--top-p=1.5 must be in (0, 1]" in err and "--temperature=-1.0 must be >= 0" in err
    code, _, err = run_cli(capsys, "--workdir", path, "--prompt", "ka " * 70)
    assert code == 2 and "more than model.max_length=64" in err
    write_workdir_config(cfg, str(tmp_path))  # a work dir that never saved a checkpoint
    code, _, err = run_cli(capsys, "--workdir", str(tmp_path), "--prompt", "ka")
    assert code == 2 and err.startswith("error: no checkpoint in") and "train first" in err
