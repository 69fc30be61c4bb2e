"""The cuDNN attention paths as a GPU would compile them, checked on this CPU.

``jit(f).trace(...).lower(lowering_platforms=("cuda",))`` lowers for a GPU without one; jax's
cuDNN attention asks the (absent) GPU for its
cuDNN version and compute capability while tracing, so those two answers are given here
(cuDNN 9.10 on a Hopper). What is checked is the StableHLO a GPU would
receive: which cuDNN kernels run, with which mask type, which operands (a dense bias or none),
and the size of what they keep for the backward pass.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import pytest

import t5x_lite
from helpers import random_batch, tiny_cfg
from t5x_lite.models import build_model, model_kwargs

_CALL = re.compile(r'stablehlo\.custom_call @__cudnn\$(\w+)\(.*?backend_config = "(.*?)".*?'
                   r' : \((.*?)\) -> \((.*?)\)')
_TENSOR = re.compile(r"tensor<([0-9x]*)x?(\w+)>")


@pytest.fixture
def hopper(monkeypatch):
    """jax's cuDNN attention sees cuDNN 9.10 on compute capability 9.0; ``attention=auto`` sees a GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    from t5x_lite.models import layers

    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(layers, "on_gpu", lambda: True)


def _shapes(types: str) -> list[tuple]:
    return [tuple(int(d) for d in dims.split("x") if d) for dims, _ in _TENSOR.findall(types)]


def _dtypes(types: str) -> list[str]:
    return [dtype for _, dtype in _TENSOR.findall(types)]


def cudnn_calls(fn, *args) -> list[dict]:
    """The cuDNN attention custom calls of ``jit(fn)(*args)`` lowered for CUDA: kernel name,
    backend config, operand and result shapes, in module order."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    return _calls_in(jitted.trace(*args).lower(lowering_platforms=("cuda",)).as_text())


def _calls_in(text: str) -> list[dict]:
    calls = []
    for kernel, config, operands, results in _CALL.findall(text):
        config = json.loads(config.replace("\\22", '"'))["cudnn_fmha_backend_config"]
        calls.append({"kernel": kernel, "mask_type": config["mask_type"], "segments": config["max_seg_per_batch"],
                      "window": config.get("sliding_window_length"),
                      "operands": _shapes(operands), "operand_dtypes": _dtypes(operands), "results": _shapes(results)})
    return calls


def _grad_calls(cfg) -> list[dict]:
    """cuDNN calls of the gradient of the model's summed logits (forward and backward kernels)."""
    params = t5x_lite.init_params(cfg, 0)
    batch = model_kwargs(cfg.model.family, {k: jnp.asarray(v) for k, v in random_batch(cfg, seed=1).items()})
    model = build_model(cfg)

    def loss(params):
        return model.apply({"params": params}, **batch).astype(jnp.float32).sum()

    return cudnn_calls(jax.grad(loss), params)


def _forward(calls):
    return [c for c in calls if not c["kernel"].endswith("Backward")]


B, T, N = 8, 16, 4  # tiny_cfg: batch 8, length 16, 4 heads


def test_cudnn_packed_decoder_runs_causal_segments_without_a_bias(hopper):
    """Decoder + GQA, 2 documents per row: cuDNN's causal padding kernel over packed segments,
    no mask turned into a bias, a softmax statistic of B x max_segments rows (not B x T)."""
    cfg = tiny_cfg("decoder", "model.dtype=bfloat16", "model.num_kv_heads=2", "model.attention=cudnn_packed",
                   "model.max_segments=2")
    calls = _grad_calls(cfg)
    assert sorted(c["kernel"] for c in calls) == ["fmhaSoftmax", "fmhaSoftmaxBackward"]
    fwd, = _forward(calls)
    assert fwd["mask_type"] == "PADDING_CAUSAL" and fwd["segments"] == 2
    q, k, v, *segments = fwd["operands"]
    assert q == (B, T, N, 8) and segments == [(B, 2), (B, 2), (B, 3), (B, 3)]
    # jax < 0.11 scales packed kv offsets by the query heads, so it is given N key/value heads
    assert k == v == (B, T, 2 if jax.__version_info__ >= (0, 11) else N, 8)
    assert fwd["results"][1] == (B * 2, N, T)  # float32 softmax statistic kept for the backward pass


def test_soft_capped_scores_attend_on_xla(hopper):
    """model.attn_logit_softcap (Gemma 2): attention=auto keeps it off cuDNN, which cannot cap."""
    cfg = tiny_cfg("decoder", "model.dtype=bfloat16", "model.attention=auto", "model.max_segments=2",
                   "model.attn_logit_softcap=50")
    assert _grad_calls(cfg) == []


def test_sliding_window_reaches_the_packed_kernel(hopper):
    """model.sliding_window with the packed layout (no mask): cuDNN is told the window, forward
    and backward; without one it is told none."""
    settings = ("model.dtype=bfloat16", "model.attention=cudnn_packed", "model.max_segments=2")
    calls = _grad_calls(tiny_cfg("decoder", *settings, "model.sliding_window=3"))
    assert len(calls) == 2 and {c["window"] for c in calls} == {3}
    assert {c["window"] for c in _grad_calls(tiny_cfg("decoder", *settings))} <= {0, None}
    # local and global layers (Gemma 2 / 3): both kernels in the scanned layer, one per branch of a cond
    calls = _grad_calls(tiny_cfg("decoder", *settings, "model.sliding_window=3", "model.sliding_window_pattern=2"))
    windows = sorted((c["kernel"], c["window"] or 0) for c in calls)
    assert windows == [("fmhaSoftmax", 0), ("fmhaSoftmax", 3), ("fmhaSoftmaxBackward", 0), ("fmhaSoftmaxBackward", 3)]


@pytest.mark.parametrize("max_segments,kernel,mask_type,slots", [(0, "fmhaScaleBiasSoftmax", "NO_MASK", 1),
                                                                  (1, "fmhaSoftmax", "PADDING_CAUSAL", 1),
                                                                  (3, "fmhaSoftmax", "PADDING_CAUSAL", 3)])
def test_auto_on_a_gpu_takes_the_packed_layout_when_rows_are_capped(hopper, max_segments, kernel, mask_type, slots):
    """attention=auto (the GPU configs): cuDNN with the mask as a bias when rows are not capped,
    the packed layout when model.max_segments caps them at 2 or more, and a length a row (no
    offsets) when rows hold one document."""
    cfg = tiny_cfg("decoder", "model.dtype=bfloat16", "model.attention=auto", f"model.max_segments={max_segments}")
    fwd, = _forward(_grad_calls(cfg))
    assert (fwd["kernel"], fwd["mask_type"], fwd["segments"]) == (kernel, mask_type, slots)
    if max_segments == 1:
        assert fwd["operands"][3:] == [(B,), (B,)]  # q and kv lengths, nothing else


def test_t5_rows_of_one_document_keep_the_bias_and_its_gradient_per_head(hopper):
    """T5 (relative bias) with model.max_segments 1: the bias reaches cuDNN as [1, N, T, S] and
    its gradient comes back [1, N, T, S] (cuDNN sums over the batch), the rows as lengths. With
    max_segments 0 jax adds the [B, 1, T, S] mask into a [B, N, T, S] bias and cuDNN returns that
    whole gradient; cross-attention then takes the gradient of its mask as well."""
    def calls(max_segments):
        cfg = tiny_cfg("encoder_decoder", "model.dtype=bfloat16", "model.attention=auto",
                       f"model.max_segments={max_segments}")
        return _grad_calls(cfg)

    one = calls(1)
    assert len(one) == 6 and {c["mask_type"] for c in one} == {"PADDING", "PADDING_CAUSAL"}
    biased = [c for c in one if "Bias" in c["kernel"]]
    assert len(biased) == 4  # encoder and decoder self-attention, forward and backward
    for c in biased:
        assert (1, N, T, T) in c["operands"] and not [s for s in c["operands"] if s[:2] == (B, N) and len(s) == 4]
    assert [c["results"][3] for c in biased if c["kernel"].endswith("Backward")] == [(1, N, T, T)] * 2
    dense = calls(0)
    assert {c["mask_type"] for c in dense} == {"NO_MASK"}
    grads = sorted(c["results"][3] for c in dense if c["kernel"].endswith("Backward"))
    assert grads == [(B, 1, T, T), (B, N, T, T), (B, N, T, T)]


def test_auto_decodes_single_tokens_on_xla(hopper):
    """A decoding step (one query a row) under ``auto`` attends with XLA's einsums (as fast, half
    the compile of cuDNN's kernels); the prompt's forward (several queries) keeps cuDNN, and
    ``attention=cudnn`` takes cuDNN for a single query too."""
    from t5x_lite.models.layers import dot_product_attention

    def calls(t, implementation):
        q = jnp.zeros((2, t, N, 16), jnp.bfloat16)
        kv = jnp.zeros((2, T, 2, 16), jnp.bfloat16)
        mask = jnp.ones((2, 1, t, T), bool)
        return cudnn_calls(lambda q, k, v: dot_product_attention(q, k, v, mask, None, 0.25, implementation), q, kv, kv)

    assert calls(1, "auto") == [] and len(calls(4, "auto")) == 1 and len(calls(1, "cudnn")) == 1


def test_cudnn_mask_becomes_a_dense_non_causal_bias(hopper):
    """Why cudnn_packed exists: model.attention=cudnn hands jax the [B, 1, T, S] document mask,
    which jax turns into an additive bias on a kernel with no mask type (no causal skipping)."""
    cfg = tiny_cfg("decoder", "model.dtype=bfloat16", "model.attention=cudnn")
    fwd, = _forward(_grad_calls(cfg))
    assert fwd["kernel"] == "fmhaScaleBiasSoftmax" and fwd["mask_type"] == "NO_MASK"
    assert fwd["operands"][3] == (B, 1, T, T)


def test_cudnn_packed_encoder_and_t5(hopper):
    """Encoder: the padding kernel over segments. T5: the relative-position bias [1, N, T, S]
    rides along on both self-attentions (and gets its gradient); cross-attention pairs the k-th
    decoder document with the k-th encoder document, without a bias."""
    enc = _forward(_grad_calls(tiny_cfg("encoder", "model.dtype=bfloat16", "model.attention=cudnn_packed",
                                        "model.max_segments=4")))
    assert [(c["kernel"], c["mask_type"], c["segments"]) for c in enc] == [("fmhaSoftmax", "PADDING", 4)]

    calls = _grad_calls(tiny_cfg("encoder_decoder", "model.dtype=bfloat16", "model.attention=cudnn_packed",
                                 "model.max_segments=2"))
    fwd = sorted((c["kernel"], c["mask_type"], c["segments"], c["operands"][3]) for c in _forward(calls))
    assert fwd == [("fmhaScaleBiasSoftmax", "PADDING", 2, (1, N, T, T)),  # encoder self-attention
                   ("fmhaScaleBiasSoftmax", "PADDING_CAUSAL", 2, (1, N, T, T)),  # decoder self-attention
                   ("fmhaSoftmax", "PADDING", 2, (B, 2))]  # cross-attention: operand 3 is q_seqlen
    bias_grads = [c for c in calls if c["kernel"] == "fmhaScaleBiasSoftmaxBackward" and (1, N, T, T) in c["results"]]
    assert len(bias_grads) == 2  # dbias of the relative-position bias, encoder and decoder
    # the float32 relative bias reaches cuDNN in bf16, like q, k and v
    assert {c["operand_dtypes"][3] for c in _forward(calls) if c["kernel"] == "fmhaScaleBiasSoftmax"} == {"bf16"}


def _train_step_calls(cfg) -> list[dict]:
    """cuDNN calls of the whole train step (loss, gradients, AdamW) lowered for CUDA on one
    device (on a mesh, jax wraps each call in a custom partitioning callback that the GPU
    compiler expands, so the kernels are not in the text)."""
    from t5x_lite import partitioning, trainer

    setup = trainer.make_setup(cfg, partitioning.make_mesh(cfg, jax.devices()[:1]))
    with setup.activation_context():
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
                 for k, v in trainer.batch_shapes(cfg).items()}
        return cudnn_calls(setup.train_step, setup.abstract_state, batch)


@pytest.mark.parametrize("remat,forward_kernels", [("minimal", 1), ("dots", 2)])
def test_remat_minimal_keeps_the_attention_kernel_output(hopper, remat, forward_kernels):
    """The GPU configs' remat=minimal saves cuDNN's forward outputs: the train step runs the
    attention forward kernel once per layer, not again inside the backward pass (remat=dots)."""
    cfg = tiny_cfg("decoder", "model.dtype=bfloat16", "model.attention=auto", "model.max_segments=2",
                   f"model.remat={remat}", "train.loss_chunk=8", "mesh.fsdp=1")
    calls = _train_step_calls(cfg)
    assert len(_forward(calls)) == forward_kernels and len(calls) == forward_kernels + 1
    assert {c["mask_type"] for c in calls} == {"PADDING_CAUSAL"}


def test_attention_dropout_trains_on_xla_and_evaluates_on_cudnn(hopper):
    """attention=auto with model.attention_dropout: jax's cuDNN call would repeat one mask every
    step, so training attends on XLA's path; eval and decoding (no dropout) keep cuDNN."""
    cfg = tiny_cfg("encoder", "model.dtype=bfloat16", "model.attention=auto", "model.max_segments=2",
                   "model.attention_dropout=0.1", "mesh.fsdp=1")
    assert _train_step_calls(cfg) == []
    assert _forward(_grad_calls(cfg))  # the deterministic model (eval): cuDNN's packed kernel
    assert _forward(_train_step_calls(tiny_cfg("encoder", "model.dtype=bfloat16", "model.attention=auto",
                                               "model.max_segments=2", "model.dropout=0.1", "mesh.fsdp=1")))


def test_mixture_of_experts_train_step_lowers_for_a_gpu(hopper):
    """moe_1b's recipe (experts under a capacity, the load-balancing loss, remat=minimal) lowers
    for CUDA with cuDNN's packed attention, its forward kernel kept as with a dense MLP."""
    cfg = tiny_cfg("decoder", "model.dtype=bfloat16", "model.attention=auto", "model.max_segments=2",
                   "model.remat=minimal", "train.loss_chunk=8", "mesh.fsdp=1", "model.num_experts=4",
                   "model.expert_capacity_factor=1.25", "model.expert_group_size=8", "model.router_aux_loss=0.02")
    calls = _train_step_calls(cfg)
    assert len(_forward(calls)) == 1 and len(calls) == 2


@pytest.mark.parametrize("remat,hidden_dots", [("minimal", 3), ("dots", 5)])
def test_remat_minimal_keeps_the_experts_projections(remat, hidden_dots):
    """The expert einsums carry the experts as a batch dimension, which jax's dot policies do not
    save: remat=minimal keeps the dispatched tokens and the gate / up projections by name, so the
    train step computes the [E, G, C, F] hidden activations 3 times a layer (gate, up, and the
    down projection's input gradient) instead of 5 (gate and up again in the backward pass)."""
    from t5x_lite import partitioning, trainer

    cfg = tiny_cfg("decoder", f"model.remat={remat}", "mesh.fsdp=1", "model.num_experts=4", "model.num_layers=1",
                   "model.expert_capacity_factor=1.25", "model.expert_group_size=8", "model.expert_d_ff=24")
    setup = trainer.make_setup(cfg, partitioning.make_mesh(cfg, jax.devices()[:1]))
    with setup.activation_context():
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
                 for k, v in trainer.batch_shapes(cfg).items()}
        text = setup.train_step.lower(setup.abstract_state, batch).as_text()
    hidden = re.findall(r"stablehlo.dot_general.*-> tensor<4x\d+x\d+x24xf32>", text)
    assert len(hidden) == hidden_dots


def _grad_text(cfg) -> str:
    params = t5x_lite.init_params(cfg, 0)
    batch = model_kwargs(cfg.model.family, {k: jnp.asarray(v) for k, v in random_batch(cfg, seed=1).items()})
    model = build_model(cfg)
    loss = lambda p: model.apply({"params": p}, **batch).astype(jnp.float32).sum()  # noqa: E731
    return jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("bias_grad,target_len,kernels,cudnn_bias_grads",
                         [("cudnn", 64, 0, 2), ("pallas", 64, 2, 0), ("pallas", 16, 1, 1)])
def test_t5_bias_gradient_from_cudnn_or_the_pallas_kernel(hopper, bias_grad, target_len, kernels,
                                                          cudnn_bias_grads):
    """model.attention_bias_grad=pallas: T5's self-attention backward kernels return no bias
    gradient and one Triton kernel a stack (the Pallas kernel, lowered to Triton IR here) sums it;
    with cudnn, or a decoder of 16 tokens (not in blocks of 64), the backward kernel returns the
    [B, N, T, S] gradient of bias plus mask."""
    t = 64  # the kernel's blocks of 64
    cfg = tiny_cfg("encoder_decoder", "model.dtype=bfloat16", "model.attention=cudnn", "model.d_model=64",
                   f"model.attention_bias_grad={bias_grad}", f"data.seq_len={t}", f"data.target_len={target_len}")
    text = _grad_text(cfg)
    bias_shape = lambda s: len(s) == 4 and s[:2] == (B, N) and s[2] == s[3]  # noqa: E731  [B, N, T, T]
    self_bwd = [c for c in _calls_in(text) if c["kernel"] == "fmhaScaleBiasSoftmaxBackward"
                and any(map(bias_shape, c["operands"]))]
    assert len(self_bwd) == 2  # encoder and decoder self-attention (scanned stacks)
    dbias = [c for c in self_bwd if any(map(bias_shape, c["results"]))]
    assert len(dbias) == cudnn_bias_grads
    assert text.count("@__gpu$xla.gpu.triton") == kernels


def test_t5_rows_as_lengths_with_the_pallas_bias_gradient(hopper):
    """model.max_segments 1 with attention_bias_grad=pallas: cuDNN gets the lengths and the
    [1, N, T, S] bias (padding mask; the decoder's causal) and returns no bias gradient; one
    Triton kernel a stack sums it instead."""
    t = 64  # the kernel's blocks of 64, decoder too
    cfg = tiny_cfg("encoder_decoder", "model.dtype=bfloat16", "model.attention=auto", "model.d_model=64",
                   "model.max_segments=1", "model.attention_bias_grad=pallas", f"data.seq_len={t}",
                   f"data.target_len={t}")
    text = _grad_text(cfg)
    calls = _calls_in(text)
    biased = [c for c in calls if "Bias" in c["kernel"]]
    assert {(c["kernel"], c["mask_type"]) for c in biased} == {
        ("fmhaScaleBiasSoftmax", "PADDING"), ("fmhaScaleBiasSoftmax", "PADDING_CAUSAL"),
        ("fmhaScaleBiasSoftmaxBackward", "PADDING"), ("fmhaScaleBiasSoftmaxBackward", "PADDING_CAUSAL")}
    for c in biased:
        assert (1, N, t, t) in c["operands"] and (B,) in c["operands"]
        if c["kernel"].endswith("Backward"):
            assert len(c["results"]) == 4  # dq, dk, dv, workspace: no bias gradient
    assert text.count("@__gpu$xla.gpu.triton") == 2


def test_alibi_bias_without_a_gradient_leaves_cudnn_without_one(hopper):
    """ALiBi's bias has no trainable source: with attention_bias_grad=pallas cuDNN computes no bias
    gradient (the kernel's unused result is XLA's to drop when it compiles)."""
    cfg = tiny_cfg("decoder", "model.dtype=bfloat16", "model.attention=cudnn", "model.position=alibi",
                   "model.d_model=64", "model.attention_bias_grad=pallas", "data.seq_len=64")
    text = _grad_text(cfg)
    bwd = [c for c in _calls_in(text) if c["kernel"].endswith("Backward")]
    assert len(bwd) == 1 and len(bwd[0]["results"]) == 4  # dq, dk, dv, workspace


@pytest.mark.parametrize("remat,kernels", [("minimal", 3), ("dots", 4)])
def test_pallas_attention_lowers_to_triton_and_minimal_keeps_its_forward(hopper, remat, kernels):
    """model.attention=pallas on a GPU: no cuDNN call, the Pallas kernels as Triton (forward, the
    backward's preprocessing and backward); remat=minimal keeps the forward kernel's output and
    statistic, dots runs the forward kernel again inside the backward pass."""
    cfg = tiny_cfg("decoder", "model.dtype=bfloat16", "model.attention=pallas", "model.d_model=64",
                   "model.num_kv_heads=2", f"model.remat={remat}", "train.loss_chunk=8", "mesh.fsdp=1")
    from t5x_lite import partitioning, trainer

    setup = trainer.make_setup(cfg, partitioning.make_mesh(cfg, jax.devices()[:1]))
    with setup.activation_context():
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
                 for k, v in trainer.batch_shapes(cfg).items()}
        text = setup.train_step.trace(setup.abstract_state, batch).lower(lowering_platforms=("cuda",)).as_text()
    assert "cudnn" not in text and text.count("@__gpu$xla.gpu.triton") == kernels


@pytest.mark.parametrize("remat,forward_kernels", [("minimal", 3), ("dots", 6)])
def test_remat_minimal_keeps_cudnn_forward_under_the_own_bias_gradient(hopper, remat, forward_kernels):
    """T5 with attention_bias_grad=pallas in a train step: remat=minimal still runs each cuDNN
    forward kernel once (encoder, decoder, cross-attention), dots again in the backward pass."""
    cfg = tiny_cfg("encoder_decoder", "model.dtype=bfloat16", "model.attention=cudnn", "model.d_model=64",
                   "model.attention_bias_grad=pallas", f"model.remat={remat}", "data.seq_len=64",
                   "data.target_len=64", "mesh.fsdp=1")
    calls = _train_step_calls(cfg)
    assert len(_forward(calls)) == forward_kernels and len(calls) - len(_forward(calls)) == 3
