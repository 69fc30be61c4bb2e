"""Model semantics: causality, prefix LM, document masking, GQA, scan/remat invariance."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5x_lite
from t5x_lite.models import build_model
from t5x_lite.models.layers import alibi_slopes, dot_product_attention, relative_bucket

import helpers
from helpers import tiny_cfg

POSITIONS = ["rope", "alibi", "relative", "learned"]


def apply(cfg, params, **inputs):
    from t5x_lite.models import _jitted_apply

    return _jitted_apply(repr(cfg.model), cfg.model)(params, {k: jnp.asarray(v) for k, v in inputs.items()})


def ids(shape, seed=0, vocab=61):
    return np.random.default_rng(seed).integers(5, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("position", POSITIONS)
def test_causal_decoder_never_sees_the_future(position):
    cfg = tiny_cfg("decoder", f"model.position={position}")
    params = t5x_lite.init_params(cfg, 0)
    x = ids((2, 12))
    base = np.asarray(t5x_lite.logits(cfg, params, x))
    for t in (0, 5, 11):
        y = x.copy()
        y[:, t] = (y[:, t] + 7) % 61
        out = np.asarray(t5x_lite.logits(cfg, params, y))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t:], base[:, t:])  # the changed position and after do see it


def test_encoder_decoder_decoder_side_is_causal():
    cfg = tiny_cfg("encoder_decoder")
    params = t5x_lite.init_params(cfg, 0)
    enc, dec = ids((2, 10), 1), ids((2, 8), 2)
    base = np.asarray(t5x_lite.logits(cfg, params, enc, decoder_input_ids=dec))
    dec2 = dec.copy()
    dec2[:, 5] += 1
    out = np.asarray(t5x_lite.logits(cfg, params, enc, decoder_input_ids=dec2))
    np.testing.assert_array_equal(out[:, :5], base[:, :5])
    enc2 = enc.copy()
    enc2[:, 9] += 1  # every decoder position sees every encoder token
    out = np.asarray(t5x_lite.logits(cfg, params, enc2, decoder_input_ids=dec))
    assert not np.allclose(out[:, 0], base[:, 0])


def test_prefix_lm_bidirectional_prefix_causal_rest():
    cfg = tiny_cfg("decoder", "data.objective=prefix")
    params = t5x_lite.init_params(cfg, 0)
    x = ids((2, 12))
    prefix = np.zeros((2, 12), bool)
    prefix[:, :5] = True
    base = np.asarray(apply(cfg, params, input_ids=x, prefix_mask=prefix))
    # A prefix position sees later prefix tokens...
    y = x.copy()
    y[:, 4] += 1
    out = np.asarray(apply(cfg, params, input_ids=y, prefix_mask=prefix))
    assert not np.allclose(out[:, 0], base[:, 0])
    # ...but never tokens after the prefix, and later positions never see their future.
    for t in (5, 8):
        y = x.copy()
        y[:, t] += 1
        out = np.asarray(apply(cfg, params, input_ids=y, prefix_mask=prefix))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
    # Without a prefix it is a plain causal LM.
    causal = np.asarray(apply(cfg, params, input_ids=x))
    np.testing.assert_allclose(np.asarray(apply(cfg, params, input_ids=x, prefix_mask=np.zeros_like(prefix))),
                               causal, atol=1e-6)
    assert not np.allclose(causal[:, :5], base[:, :5])


def test_sliding_window_sees_the_last_w_tokens_of_its_document():
    """model.sliding_window=3 on one layer: a token changes the outputs at its position and the
    two after it, nothing else; packed documents equal each alone; more layers see further back."""
    cfg = tiny_cfg("decoder", "model.sliding_window=3", "model.num_layers=1")
    params = t5x_lite.init_params(cfg, 0)
    x = ids((2, 12))
    base = np.asarray(t5x_lite.logits(cfg, params, x))
    y = x.copy()
    y[:, 4] += 1
    out = np.asarray(t5x_lite.logits(cfg, params, y))
    changed = ~np.isclose(out, base, atol=1e-6, rtol=0).all(axis=(0, 2))
    np.testing.assert_array_equal(np.flatnonzero(changed), [4, 5, 6])
    full = tiny_cfg("decoder", "model.num_layers=1")  # the same weights without the window
    assert not np.allclose(np.asarray(t5x_lite.logits(full, params, x))[:, 3:], base[:, 3:], atol=1e-4)
    np.testing.assert_allclose(np.asarray(t5x_lite.logits(full, params, x))[:, :3], base[:, :3], atol=1e-6)

    a, b = ids((7,), 1), ids((6,), 2)
    row, seg, pos = _pack(a, b, 16)
    packed = np.asarray(apply(cfg, params, input_ids=row, segment_ids=seg, positions=pos))
    np.testing.assert_allclose(packed[0, :7], np.asarray(apply(cfg, params, input_ids=a[None]))[0], atol=2e-5)
    np.testing.assert_allclose(packed[0, 7:13], np.asarray(apply(cfg, params, input_ids=b[None]))[0], atol=2e-5)

    deep = tiny_cfg("decoder", "model.sliding_window=3", "model.num_layers=2")
    deep_params = t5x_lite.init_params(deep, 0)
    base, out = (np.asarray(t5x_lite.logits(deep, deep_params, z)) for z in (x, y))
    changed = ~np.isclose(out, base, atol=1e-6, rtol=0).all(axis=(0, 2))
    np.testing.assert_array_equal(np.flatnonzero(changed), [4, 5, 6, 7, 8])


def _pack(a, b, length):
    """Two documents in one row (then padding): ids, segment ids, positions."""
    row = np.zeros(length, np.int32)
    seg = np.zeros(length, np.int32)
    pos = np.zeros(length, np.int32)
    row[: len(a)], row[len(a): len(a) + len(b)] = a, b
    seg[: len(a)], seg[len(a): len(a) + len(b)] = 1, 2
    pos[: len(a)], pos[len(a): len(a) + len(b)] = np.arange(len(a)), np.arange(len(b))
    return row[None], seg[None], pos[None]


@pytest.mark.parametrize("family", ["encoder", "decoder"])
@pytest.mark.parametrize("position", POSITIONS)
def test_packed_equals_unpacked(family, position):
    cfg = tiny_cfg(family, f"model.position={position}")
    params = t5x_lite.init_params(cfg, 0)
    a, b = ids((7,), 1), ids((6,), 2)
    row, seg, pos = _pack(a, b, 16)
    packed = np.asarray(apply(cfg, params, input_ids=row, segment_ids=seg, positions=pos))
    alone_a = np.asarray(apply(cfg, params, input_ids=a[None]))
    alone_b = np.asarray(apply(cfg, params, input_ids=b[None]))
    np.testing.assert_allclose(packed[0, :7], alone_a[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[0, 7:13], alone_b[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["relative", "rope"])
def test_packed_equals_unpacked_encoder_decoder(position):
    cfg = tiny_cfg("encoder_decoder", f"model.position={position}")
    params = t5x_lite.init_params(cfg, 0)
    ea, eb, da, db = ids((6,), 1), ids((8,), 2), ids((5,), 3), ids((4,), 4)
    erow, eseg, epos = _pack(ea, eb, 16)
    drow, dseg, dpos = _pack(da, db, 12)
    packed = np.asarray(apply(cfg, params, encoder_input_ids=erow, input_ids=drow, encoder_segment_ids=eseg,
                              segment_ids=dseg, encoder_positions=epos, positions=dpos))
    alone_a = np.asarray(apply(cfg, params, encoder_input_ids=ea[None], input_ids=da[None]))
    alone_b = np.asarray(apply(cfg, params, encoder_input_ids=eb[None], input_ids=db[None]))
    np.testing.assert_allclose(packed[0, :5], alone_a[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[0, 5:9], alone_b[0], atol=2e-5, rtol=1e-5)


def test_attention_mask_argument_equals_unpadded():
    for family in ("decoder", "encoder"):
        cfg = tiny_cfg(family)
        params = t5x_lite.init_params(cfg, 0)
        x = ids((1, 9))
        padded = np.concatenate([x, np.zeros((1, 3), np.int32)], axis=1)
        mask = np.concatenate([np.ones((1, 9)), np.zeros((1, 3))], axis=1)
        np.testing.assert_allclose(np.asarray(t5x_lite.logits(cfg, params, padded, attention_mask=mask))[:, :9],
                                   np.asarray(t5x_lite.logits(cfg, params, x)), atol=2e-5)


def reference_attention(q, k, v, mask, scale):
    """Textbook multi-head attention with k/v heads repeated to the query heads."""
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    s = np.where(mask, s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gqa_attention_matches_reference(kv_heads):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    v = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    mask = rng.random((2, 1, 5, 7)) > 0.3
    mask[..., 0] = True
    out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), None, 0.35, "xla")
    np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, mask, 0.35), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_attention_dropout_drops_probabilities(kv_heads):
    """With one-hot values the output *is* the probability row: every entry is dropped (0) or
    kept and scaled by 1 / (1 - rate), about a rate's share dropped, a new mask per key."""
    b, t, s, n, rate = 4, 16, 16, 4, 0.5
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(b, t, n, s)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, kv_heads, s)), jnp.float32)
    v = jnp.broadcast_to(jnp.eye(s)[None, :, None, :], (b, s, kv_heads, s))  # value of key j: e_j
    mask = jnp.asarray(np.tril(np.ones((t, s), bool))[None, None].repeat(b, 0))
    probs = np.asarray(dot_product_attention(q, k, v, mask, None, 0.25, "xla"))  # [b, t, n, s]
    dropped = [np.asarray(dot_product_attention(q, k, v, mask, None, 0.25, "xla", dropout=(rate, jax.random.key(i))))
               for i in (0, 1)]
    live = probs > 1e-6
    for out in dropped:
        kept = np.isclose(out, probs / (1 - rate), rtol=1e-5, atol=1e-7)
        assert np.all(kept | (out == 0)) and np.all(kept[~live])  # nothing else; masked keys stay 0
        assert abs((out[live] == 0).mean() - rate) < 0.05
    assert not np.array_equal(dropped[0] == 0, dropped[1] == 0)
    np.testing.assert_array_equal(dropped[0], dot_product_attention(q, k, v, mask, None, 0.25, "xla",
                                                                    dropout=(rate, jax.random.key(0))))


def test_attention_dropout_only_while_training():
    from t5x_lite.models import build_model

    cfg = tiny_cfg("encoder", "model.attention_dropout=0.3")
    params = t5x_lite.init_params(cfg, 0)
    x = jnp.asarray(ids((2, 16)))
    plain = t5x_lite.logits(tiny_cfg("encoder"), params, x)
    np.testing.assert_array_equal(t5x_lite.logits(cfg, params, x), plain)  # eval, decoding: no dropout
    train = build_model(cfg.model, deterministic=False).apply({"params": params}, x, rngs={"dropout": jax.random.key(0)})
    assert np.abs(np.asarray(train) - np.asarray(plain)).max() > 1e-2
    with pytest.raises(t5x_lite.ConfigError, match="attention_dropout"):
        tiny_cfg("encoder", "model.attention_dropout=0.1", "model.attention=cudnn")


def test_gqa_model_equals_mha_with_repeated_kv_heads():
    gqa = tiny_cfg("decoder", "model.num_kv_heads=2")
    mha = tiny_cfg("decoder", "model.num_kv_heads=4")
    params = t5x_lite.init_params(gqa, 0)

    def widen(path, leaf):
        names = [getattr(p, "key", None) for p in path]
        if "key" in names or "value" in names:  # kernel [L, D, K, H] -> [L, D, N, H]
            return jnp.repeat(leaf, 2, axis=2)
        return leaf

    mha_params = jax.tree_util.tree_map_with_path(widen, params)
    x = ids((2, 10))
    np.testing.assert_allclose(np.asarray(t5x_lite.logits(mha, mha_params, x)),
                               np.asarray(t5x_lite.logits(gqa, params, x)), atol=2e-5)


def _loss_and_grads(cfg, params, batch):
    from t5x_lite.trainer import make_loss_fn

    loss_sums = make_loss_fn(cfg, build_model(cfg))

    def loss(p):
        s = loss_sums(p, batch, jax.random.key(0))
        return s["loss"] / s["weight"]

    return jax.jit(jax.value_and_grad(loss))(params)


def _stack_layers(params):
    """Unrolled params (``layers_0``, ``layers_1``, ...) -> the scanned layout (``layers``)."""
    if isinstance(params, dict):
        keys = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
        out = {k: _stack_layers(v) for k, v in params.items() if not k.startswith("layers_")}
        if keys:
            out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in keys])
        return out
    return params


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])  # the latter covers the encoder stack
def test_scan_equals_unrolled(family, extra=()):
    from helpers import random_batch

    unrolled = tiny_cfg(family, "model.scan_layers=false", *extra)
    scanned = tiny_cfg(family, "model.scan_layers=true", *extra)
    params_u = t5x_lite.init_params(unrolled, 0)
    params_s = _stack_layers(params_u)
    chex.assert_trees_all_equal_shapes(params_s, t5x_lite.init_params(scanned, 0))
    batch = {k: jnp.asarray(v) for k, v in random_batch(scanned).items()}
    loss_u, grads_u = _loss_and_grads(unrolled, params_u, batch)
    loss_s, grads_s = _loss_and_grads(scanned, params_s, batch)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
    chex.assert_trees_all_close(grads_s, _stack_layers(grads_u), atol=1e-5, rtol=1e-4)
    # model.scan_unroll: the same scan, its 2 layers as one straight iteration
    loss_r, grads_r = _loss_and_grads(tiny_cfg(family, "model.scan_unroll=2", *extra), params_s, batch)
    np.testing.assert_allclose(loss_r, loss_s, rtol=1e-6)
    chex.assert_trees_all_close(grads_r, grads_s, atol=1e-6, rtol=1e-5)


def test_scan_equals_unrolled_with_local_and_global_layers():
    """model.sliding_window_pattern: a traced layer index picks each layer's kind in the scan."""
    test_scan_equals_unrolled("decoder", ("model.sliding_window=3", "model.sliding_window_pattern=2",
                                          "model.rope_local_theta=100"))


@pytest.mark.parametrize("policy,scan,extra", [("minimal", "true", ()), ("dots", "true", ()), ("full", "false", ()),
                                               ("minimal", "true", ("model.scan_unroll=2",)),
                                               ("minimal", "true", ("model.num_experts=4", "model.expert_group_size=8",
                                                                    "model.expert_capacity_factor=1.25"))])
def test_remat_equals_no_remat(policy, scan, extra):
    from helpers import random_batch

    base = tiny_cfg("decoder", "model.remat=none", f"model.scan_layers={scan}", *extra)
    remat = tiny_cfg("decoder", f"model.remat={policy}", f"model.scan_layers={scan}", *extra)
    params = t5x_lite.init_params(base, 0)
    batch = {k: jnp.asarray(v) for k, v in random_batch(base).items()}
    loss_a, grads_a = _loss_and_grads(base, params, batch)
    loss_b, grads_b = _loss_and_grads(remat, params, batch)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    chex.assert_trees_all_close(grads_b, grads_a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mlp,approximate,biased", [("swiglu", False, False), ("geglu", True, False),
                                                    ("gelu", False, False), ("gelu", True, False),
                                                    ("gelu", False, True), ("geglu", True, True)])
def test_mlp_activation_without_remat_keeps_only_its_inputs(mlp, approximate, biased):
    """Without remat the MLP's activation is differentiated by computing it again in the backward
    pass: the values and gradients of autodiff, which also keeps SiLU's sigmoid / GELU's tanh or
    erf (and the biased input); the activation's inputs are all it keeps. Under a remat policy it
    is autodiff's own in a scan's loop, and recomputed where the layers run as straight code."""
    from t5x_lite.models.layers import mlp_activation

    act = {"swiglu": jax.nn.silu, "geglu": lambda x: jax.nn.gelu(x, approximate=approximate),
           "gelu": lambda x: jax.nn.gelu(x, approximate=approximate)}[mlp]
    n = 1 if mlp == "gelu" else 2
    if n == 1:
        reference = (lambda h, b: act(h + b)) if biased else act
    else:
        reference = (lambda gate, up, gb, ub: act(gate + gb) * (up + ub)) if biased else (lambda g, u: act(g) * u)
    cfg = tiny_cfg("decoder", f"model.mlp={mlp}", f"model.gelu_approximate={approximate}", "model.remat=none").model
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    inputs = tuple(2 * jax.random.normal(k, (3, 5, 16)) for k in keys[:n])
    inputs += tuple(jax.random.normal(k, (16,)) for k in keys[2:2 + n]) if biased else ()
    cotangent = jax.random.normal(keys[4], (3, 5, 16))
    kept = lambda vjp: sum(leaf.shape == cotangent.shape for leaf in jax.tree_util.tree_leaves(vjp))
    out, vjp = jax.vjp(mlp_activation(cfg), *inputs)
    ref_out, ref_vjp = jax.vjp(reference, *inputs)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)
    chex.assert_trees_all_close(vjp(cotangent), ref_vjp(cotangent), rtol=1e-6, atol=1e-6)
    assert kept(vjp) == n < kept(ref_vjp)
    remat = dataclasses.replace(cfg, remat="minimal")
    assert kept(jax.vjp(mlp_activation(remat), *inputs)[1]) == kept(ref_vjp)
    # the layers as straight code: XLA would merge the policy's recomputation with the forward pass
    straight = dataclasses.replace(remat, scan_unroll=cfg.num_layers)
    assert kept(jax.vjp(mlp_activation(straight), *inputs)[1]) == n


@pytest.mark.parametrize("family,extra", [("decoder", ("model.num_heads=4", "model.num_kv_heads=2")),
                                          ("encoder", ("model.use_bias=true", "model.mlp=geglu")),
                                          ("encoder_decoder", ("model.mlp=geglu",))])
def test_fused_projections_equal_separate(family, extra):
    """model.fused_qkv / fused_mlp: one matmul over the concatenated weights, the same parameters;
    loss and gradients equal the separate projections (GQA, biases, T5's cross-attention k / v)."""
    from helpers import random_batch

    base = tiny_cfg(family, *extra)
    fused = tiny_cfg(family, *extra, "model.fused_qkv=true", "model.fused_mlp=true")
    params = t5x_lite.init_params(base, 0)
    chex.assert_trees_all_equal_shapes(params, t5x_lite.init_params(fused, 0))
    batch = {k: jnp.asarray(v) for k, v in random_batch(base).items()}
    loss_a, grads_a = _loss_and_grads(base, params, batch)
    loss_b, grads_b = _loss_and_grads(fused, params, batch)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    chex.assert_trees_all_close(grads_b, grads_a, atol=1e-6, rtol=1e-5)
    # forward GEMMs saved per scanned stack body: q/k/v 3 -> 1, gate/up 2 -> 1, T5's cross k/v 2 -> 1
    count = lambda cfg: str(jax.make_jaxpr(lambda p: _loss_and_grads(cfg, p, batch))(params)).count("dot_general")
    saved = {"decoder": 3, "encoder": 3, "encoder_decoder": 3 + 4}[family]
    assert count(base) - count(fused) == 3 * saved  # each with its two backward GEMMs


def test_fused_mlp_needs_a_gated_mlp():
    with pytest.raises(t5x_lite.ConfigError, match="fused_mlp"):
        tiny_cfg("encoder", "model.mlp=gelu", "model.fused_mlp=true")


def test_learned_positions_reject_long_inputs():
    cfg = tiny_cfg("encoder")
    params = t5x_lite.init_params(cfg, 0)
    with pytest.raises(ValueError, match="max_length"):
        t5x_lite.logits(cfg, params, ids((1, cfg.model.max_length + 1)))


def test_position_helpers():
    # ALiBi slopes for 8 heads are 1/2, 1/4, ..., 1/256 (the paper's values).
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-6)
    assert len(alibi_slopes(6)) == 6
    # T5 buckets: distance 0 -> bucket 0; near distances exact; far ones share the last bucket.
    rel = jnp.asarray([[0, -1, -2, -200]])
    out = np.asarray(relative_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128))
    np.testing.assert_array_equal(out, [[0, 1, 2, 31]])
    both = np.asarray(relative_bucket(jnp.asarray([[1, -1]]), bidirectional=True, num_buckets=32,
                                      max_distance=128))
    assert both[0, 0] != both[0, 1]


def test_param_count_of_llama_1b_matches_hugging_face():
    from t5x_lite.config import load_config
    from t5x_lite.models import abstract_params

    cfg = load_config("configs/llama_1b.yaml")
    n = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract_params(cfg))))
    assert n == 886_114_304


def test_every_parameter_has_logical_axes():
    for family in ("encoder", "decoder", "encoder_decoder"):
        from t5x_lite.models import abstract_params

        boxed = abstract_params(tiny_cfg(family, "model.use_bias=true"))
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        for leaf in leaves:
            assert len(leaf.names) == leaf.value.ndim


def _emulated_cudnn_packed(seen):
    """Stands in for jax's cuDNN packed-layout kernel (GPU only): the documents rebuilt from the
    lengths / starts alone, then XLA attention. Records the mask type and kind of each call."""
    from t5x_lite.models.layers import attention_mask, segments_from_lengths_and_starts

    def attention(q, k, v, bias, segments, scale, causal, window=0):
        q_lengths, q_starts, kv_lengths, kv_starts = segments
        seen.append(("causal" if causal else "padding", "self" if kv_lengths is q_lengths else "cross"))
        t, s = q.shape[1], k.shape[1]
        q_seg = segments_from_lengths_and_starts(q_lengths, q_starts, t)
        kv_seg = segments_from_lengths_and_starts(kv_lengths, kv_starts, s)
        mask = attention_mask(q_seg, kv_seg, causal=causal, q_idx_T=jnp.arange(t), k_idx_S=jnp.arange(s),
                              window=window)
        return dot_product_attention(q, k, v, mask, bias, scale, "xla")

    return attention


@pytest.mark.parametrize("family,position", [("decoder", "rope"), ("encoder", "learned"),
                                             ("encoder_decoder", "relative"), ("decoder", "window"),
                                             ("decoder", "pattern")])
def test_cudnn_packed_layout_is_given_the_documents(family, position, monkeypatch):
    """model.attention=cudnn_packed hands each self-attention the documents of its rows as
    lengths / starts and the right mask type (T5's cross-attention: decoder documents against
    encoder documents); with the kernel emulated, logits equal XLA's."""
    from t5x_lite.models import layers
    from helpers import random_batch
    from t5x_lite.models import model_kwargs

    seen = []
    monkeypatch.setattr(layers, "cudnn_packed_attention", _emulated_cudnn_packed(seen))
    settings = {"window": ["model.sliding_window=3"],  # told the window; pattern: in the local layers only
                "pattern": ["model.sliding_window=3", "model.sliding_window_pattern=2"]}.get(
                    position, [f"model.position={position}"])
    cfg = tiny_cfg(family, *settings)
    params = t5x_lite.init_params(cfg, 0)
    batch = model_kwargs(family, {k: jnp.asarray(v) for k, v in random_batch(cfg, seed=4).items()})
    want = apply(cfg, params, **batch)
    packed_cfg = tiny_cfg(family, *settings, "model.attention=cudnn_packed", "model.max_segments=2")
    got = apply(packed_cfg, params, **batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    assert set(seen) == {"decoder": {("causal", "self")}, "encoder": {("padding", "self")},
                         "encoder_decoder": {("padding", "self"), ("causal", "self"), ("padding", "cross")}}[family]


def _one_document_rows(cfg, seed: int) -> dict:
    """Model inputs whose rows hold one document each, from slot 0, of varied lengths (one row all
    padding): what the packer makes with model.max_segments 1."""
    from helpers import positions_from_segments, random_batch
    from t5x_lite.models import model_kwargs

    batch = random_batch(cfg, seed=seed, packed=False)
    for prefix, lengths in (("", [16, 9, 1, 0, 12, 5, 16, 3]), ("encoder_", [11, 16, 4, 0, 16, 2, 7, 13])):
        if prefix + "segment_ids" in batch:
            seg = (np.arange(16)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
            batch[prefix + "segment_ids"], batch[prefix + "positions"] = seg, positions_from_segments(seg)
    return model_kwargs(cfg.model.family, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.mark.parametrize("family,position", [("decoder", "rope"), ("encoder", "learned"),
                                             ("encoder_decoder", "relative"), ("decoder", "alibi"),
                                             ("decoder", "window")])
def test_one_document_rows_reach_cudnn_as_lengths(family, position, monkeypatch):
    """model.max_segments 1 (rows of one document from slot 0): where cuDNN runs, each attention
    gets a length a row (cuDNN's padding mask, causal where it should be) and no mask, and a bias
    as ``[1, N, T, S]``. With jax's XLA reference behind those calls, the logits of every real
    token and the gradients of a loss over them equal this model's own masked attention."""
    settings = ["model.sliding_window=3"] if position == "window" else [f"model.position={position}"]
    cfg = tiny_cfg(family, *settings)
    params = t5x_lite.init_params(cfg, 0)
    batch = _one_document_rows(cfg, seed=6)
    real_BT = np.asarray(batch["segment_ids"]) > 0
    probe = jax.random.normal(jax.random.key(1), (cfg.model.vocab_size,))

    def run(cfg):
        model = build_model(cfg)

        def loss(params):
            logits = model.apply({"params": params}, **batch).astype(jnp.float32)
            return jnp.sum(jnp.where(real_BT[..., None], jnp.tanh(logits) * probe, 0.0)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits), grads

    want_logits, want_grads = run(cfg)  # on this CPU: the mask, XLA attention
    seen = helpers.cudnn_as_xla(monkeypatch)
    got_logits, got_grads = run(tiny_cfg(family, *settings, "model.attention=auto", "model.max_segments=1"))
    assert np.isfinite(got_logits).all()  # the all-padding row too
    np.testing.assert_allclose(got_logits[real_BT], want_logits[real_BT], atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(got_grads, want_grads, atol=1e-4, rtol=1e-3)
    n, t = cfg.model.num_heads, 16
    bias = {"relative": (1, n, t, t), "alibi": (1, n, t, t)}.get(position)
    assert {call[:2] for call in seen} == {
        "decoder": {("causal", bias)}, "encoder": {("padding", None)},
        "encoder_decoder": {("padding", bias), ("causal", bias), ("padding", None)}}[family]


def test_logits_take_any_attention_mask_whatever_the_training_rows(monkeypatch):
    """t5x_lite.logits / encode take an attention_mask of any pattern (left padding, a gap): a
    model trained on rows of one document (max_segments 1) or packed rows (4) runs them through
    the mask, not as lengths or the packed layout, and gives what the unpacked config gives."""
    cfg = tiny_cfg("encoder_decoder")
    params = t5x_lite.init_params(cfg, 0)
    enc, dec = ids((3, 16), 1), ids((3, 8), 2)
    mask = np.ones((3, 16), np.int32)
    mask[0, :5] = 0  # left padding
    mask[1, 6:9] = 0  # a gap
    want = np.asarray(t5x_lite.logits(cfg, params, enc, decoder_input_ids=dec, attention_mask=mask))
    want_enc = np.asarray(t5x_lite.encode(cfg, params, enc, attention_mask=mask))
    seen = helpers.cudnn_as_xla(monkeypatch)
    for cap in (1, 4):
        other = tiny_cfg("encoder_decoder", "model.attention=auto", f"model.max_segments={cap}")
        got = t5x_lite.logits(other, params, enc, decoder_input_ids=dec, attention_mask=mask)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(t5x_lite.encode(other, params, enc, attention_mask=mask)), want_enc,
                                   atol=2e-5, rtol=1e-5)
    assert seen and {kind for kind, *_ in seen} == {"mask"}


def test_segment_lengths_and_starts():
    from t5x_lite.models.layers import segment_lengths_and_starts, segments_from_lengths_and_starts

    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0] * 8])
    lengths, starts = segment_lengths_and_starts(seg, 8)
    np.testing.assert_array_equal(lengths[:, :4], [[3, 2, 1, -1], [8, -1, -1, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(starts[:, :4], [[0, 3, 5, -1], [0, -1, -1, -1], [-1, -1, -1, -1]])
    assert lengths.shape == (3, 8) and starts.shape == (3, 9) and (starts[:, -1] == -1).all()
    np.testing.assert_array_equal(segments_from_lengths_and_starts(lengths, starts, 8), seg)


def test_cross_segments_keep_documents_paired_after_cudnn_closes_gaps():
    """cuDNN closes up the -1 slots of the query side and of the key side separately, then pairs
    the i-th segments: a document empty on one side must be dropped on both."""
    from t5x_lite.models.layers import cross_segments

    def close_gaps(a):  # what jax does to lengths / starts before the kernel (-1 entries last)
        return [[x for x in row if x >= 0] for row in np.asarray(a).tolist()]

    q_len, q_start = jnp.array([[3, -1, 2]]), jnp.array([[0, -1, 3, -1]])  # decoder: document 2 empty
    kv_len, kv_start = jnp.array([[4, 5, 1]]), jnp.array([[0, 4, 9, -1]])
    ql, qs, kl, ks = cross_segments(q_len, q_start, kv_len, kv_start)
    assert list(zip(close_gaps(ql)[0], close_gaps(kl)[0])) == [(3, 4), (2, 1)]  # documents 1 and 3
    assert list(zip(close_gaps(qs)[0], close_gaps(ks)[0])) == [(0, 0), (3, 9)]


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_pallas_attention_trains_as_xla(family, monkeypatch):
    """model.attention=pallas: jax's Pallas flash attention (in its interpreter here), documents
    from the segment ids inside the kernel, GQA by repeating k / v: the same loss and gradients as
    XLA's attention on packed rows with padding (causal and not)."""
    from helpers import random_batch
    from t5x_lite.models import layers

    monkeypatch.setattr(layers, "PALLAS_INTERPRET", True)
    calls = []
    real = layers.pallas_segment_attention
    monkeypatch.setattr(layers, "pallas_segment_attention", lambda *a: calls.append(a[5]) or real(*a))
    sizes = ["model.d_model=64", "model.num_kv_heads=2"] + (["model.position=learned"] if family == "encoder" else [])
    cfg = tiny_cfg(family, *sizes)
    params = t5x_lite.init_params(cfg, 0)
    batch = {k: jnp.asarray(v) for k, v in random_batch(cfg, seed=3).items()}
    want_loss, want_grads = _loss_and_grads(cfg, params, batch)
    got_loss, got_grads = _loss_and_grads(tiny_cfg(family, *sizes, "model.attention=pallas"), params, batch)
    assert set(calls) == {family == "decoder"}  # the scanned stack's self-attention, causal for the decoder
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)
    # off a GPU (and outside the interpreter) the same config attends on XLA's path
    monkeypatch.setattr(layers, "PALLAS_INTERPRET", False)
    calls.clear()
    off_loss, _ = _loss_and_grads(tiny_cfg(family, *sizes, "model.attention=pallas"), params, batch)
    assert calls == [] and float(off_loss) == pytest.approx(float(want_loss), rel=1e-6)
