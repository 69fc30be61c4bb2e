"""Model construction, initialisation and a plain forward pass for all three families."""

from __future__ import annotations

import dataclasses
from typing import Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite.config import Config, ModelConfig
from t5x_lite.models.transformer import (
    CACHE_KV_AXES,
    DecoderModel,
    EncoderDecoderModel,
    EncoderModel,
    build_model as _build,
    init_cache,
)

__all__ = [
    "build_model", "init_params", "abstract_params", "logits", "encode", "model_kwargs", "init_cache",
    "EncoderModel", "DecoderModel", "EncoderDecoderModel", "CACHE_KV_AXES", "INPUT_KEYS",
]

# Batch keys a model consumes, per family; the rest of a batch (targets, weights) feeds the loss.
INPUT_KEYS = {
    "encoder": ("input_ids", "segment_ids", "positions"),
    "decoder": ("input_ids", "segment_ids", "positions", "prefix_mask"),
    "encoder_decoder": ("encoder_input_ids", "input_ids", "encoder_segment_ids", "segment_ids",
                        "encoder_positions", "positions"),
}


def _model_cfg(cfg: Union[Config, ModelConfig]) -> ModelConfig:
    return cfg.model if isinstance(cfg, Config) else cfg


def inference_cfg(cfg: Union[Config, ModelConfig]) -> ModelConfig:
    """The model ``logits``, ``encode`` and decoding run: experts under ``eval_capacity_factor``,
    and rows of any 0 / 1 pattern (an ``attention_mask``'s gaps, decoding's left-padded prompts),
    which only the mask expresses: no packed layout, no lengths (max_segments 0)."""
    return dataclasses.replace(_model_cfg(cfg).for_inference(), max_segments=0)


def build_model(cfg: Union[Config, ModelConfig], deterministic: bool = True) -> nn.Module:
    """The flax module of ``cfg.model.family``; ``deterministic=False`` enables dropout."""
    return _build(_model_cfg(cfg), deterministic=deterministic)


def model_kwargs(family: str, batch: dict) -> dict:
    """The subset of ``batch`` that the model of ``family`` takes as keyword arguments."""
    return {k: batch[k] for k in INPUT_KEYS[family] if k in batch}


def _dummy_inputs(mcfg: ModelConfig, length: int = 8) -> dict:
    ids = jnp.ones((1, length), jnp.int32)
    if mcfg.family == "encoder_decoder":
        return {"encoder_input_ids": ids, "input_ids": ids}
    return {"input_ids": ids}


def abstract_params(cfg: Union[Config, ModelConfig]):
    """Shapes and dtypes of the parameters, still boxed with their logical axis names."""
    mcfg = _model_cfg(cfg)
    model = build_model(mcfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **_dummy_inputs(mcfg)))["params"]


def init_fn(cfg: Union[Config, ModelConfig]):
    """``rng -> boxed params``: the function the trainer jits with output shardings."""
    mcfg = _model_cfg(cfg)
    model = build_model(mcfg)
    return lambda rng: model.init(rng, **_dummy_inputs(mcfg))["params"]


def jit_init(fn, **jit_kwargs):
    """``jax.jit`` for a function run once per process, such as parameter init. On CPU it is
    compiled without backend optimisation: the threefry-heavy init then compiles 4-5x faster,
    and running it unoptimised costs far less than that."""
    jitted = jax.jit(fn, **jit_kwargs)
    if jax.default_backend() != "cpu":
        return jitted
    compiled = {}

    def call(*args):
        if "exe" not in compiled:
            lowered = jitted.lower(*args)
            compiled["exe"] = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
        return compiled["exe"](*args)

    return call


_INIT_CACHE: dict = {}


def init_params(cfg: Union[Config, ModelConfig], seed: int = 0):
    """Randomly initialised parameters (a plain pytree of arrays, no axis metadata)."""
    mcfg = _model_cfg(cfg)
    key = repr(mcfg)
    if key not in _INIT_CACHE:  # one compile per config: the RNG-heavy init is slow to compile
        _INIT_CACHE[key] = jit_init(init_fn(mcfg))
    return nn.meta.unbox(_INIT_CACHE[key](jax.random.key(seed)))


def logits(cfg: Union[Config, ModelConfig], params, input_ids, decoder_input_ids=None, attention_mask=None,
           decoder_attention_mask=None) -> jax.Array:
    """float32 logits ``[batch, length, vocab]`` of one forward pass (for ``encoder_decoder``,
    over the decoder positions, with ``input_ids`` going to the encoder).

    ``attention_mask`` (1 = token, 0 = padding) becomes segment ids, so padding never attends
    or is attended to; positions count from 0 at the start of the row, as in Hugging Face.
    """
    mcfg = inference_cfg(cfg)  # experts: eval_capacity_factor (dropless by default)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    seg = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    params = nn.meta.unbox(params)
    if mcfg.family == "encoder_decoder":
        if decoder_input_ids is None:
            raise ValueError("encoder_decoder logits need decoder_input_ids")
        dec = jnp.asarray(decoder_input_ids, jnp.int32)
        dec_seg = None if decoder_attention_mask is None else jnp.asarray(decoder_attention_mask, jnp.int32)
        if seg is not None and dec_seg is None:
            dec_seg = jnp.ones_like(dec)
        if dec_seg is not None and seg is None:
            seg = jnp.ones_like(input_ids)
        inputs = dict(encoder_input_ids=input_ids, input_ids=dec, encoder_segment_ids=seg, segment_ids=dec_seg)
    else:
        if decoder_input_ids is not None:
            raise ValueError(f"decoder_input_ids only apply to encoder_decoder, not {mcfg.family}")
        inputs = dict(input_ids=input_ids, segment_ids=seg)
    return _jitted_apply(repr(mcfg), mcfg)(params, inputs).astype(jnp.float32)


def encode(cfg: Union[Config, ModelConfig], params, input_ids, attention_mask=None) -> jax.Array:
    """float32 final hidden states ``[batch, length, d_model]`` of the encoder (``encoder`` and
    ``encoder_decoder`` families); ``attention_mask`` as in ``logits``."""
    mcfg = inference_cfg(cfg)
    if mcfg.family == "decoder":
        raise ValueError("encode needs an encoder: model.family is decoder (use logits)")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    seg = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    key = repr(mcfg) + "/encode"
    if key not in _APPLY_CACHE:
        model = build_model(mcfg)
        _APPLY_CACHE[key] = jax.jit(lambda p, ids, s: model.apply({"params": p}, ids, s, method="encode"))
    return _APPLY_CACHE[key](nn.meta.unbox(params), input_ids, seg).astype(jnp.float32)


_APPLY_CACHE: dict = {}


def _jitted_apply(key: str, mcfg: ModelConfig):
    """One compiled forward per model config (``key`` is its repr: configs are mutable, unhashable)."""
    if key not in _APPLY_CACHE:
        model = build_model(mcfg)
        _APPLY_CACHE[key] = jax.jit(lambda params, inputs: model.apply({"params": params}, **inputs))
    return _APPLY_CACHE[key]
