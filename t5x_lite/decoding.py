"""Generation for the three families: sampling, beam search and fill-mask, compiled and sharded.

Decoder and encoder-decoder models generate with two compiled programs per shape:

- **prefill**: (encode the inputs once, then) run the prompt through the decoder, filling a
  KV cache of ``P + K`` slots (``P`` padded prompt length, ``K`` = ``max_new_tokens``); returns
  the next-token logits of every row.
- **loop**: a ``lax.while_loop`` on device. Each iteration picks the next token of every row
  (``next_token``: temperature / top-k / top-p, or greedy) or extends the beams
  (``beam_search``), then runs one cached decode step. It stops when every row has emitted EOS
  (beams: when no live beam can beat the finished ones) or after ``K`` tokens. The prefill state
  (cache included) is donated to it and updated in place; nothing returns to the host until the
  tokens are done.

Prompts of unequal length are LEFT-padded: segment id 1 on real tokens, 0 on padding, positions
counting from 0 at each row's first real token. All rows then share one cache index, padding is
never attended, and every row decodes exactly as it would alone. Padded lengths are rounded up
to a power of two (at least 8), so prompts of similar length share one compiled program.

Both programs are jitted with explicit shardings on the training mesh: parameters as the config's
rules place them (FSDP-sharded under ZeRO-3), prompts and cache split over the batch axes and the
cache's kv heads over ``tensor`` (logical axes ``CACHE_KV_AXES``). Compiled programs are kept per
(model config, mesh, settings, shapes): a second call with the same shapes compiles nothing.

The encoder family does not generate: ``fill_mask`` gives the top-k tokens at each ``<mask>``.
"""

from __future__ import annotations

import dataclasses
import json

import math
import os
import sys
import time
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5x_lite import partitioning
from t5x_lite.config import Config, ConfigError
from t5x_lite.models import CACHE_KV_AXES, abstract_params, build_model, inference_cfg, init_cache
from t5x_lite.models.layers import jnp_dtype
from t5x_lite.objectives import shift_right

Array = jax.Array

# The fixed special ids of this project's tokenizers (see data/tokenizer.py).
PAD_ID, EOS_ID, BOS_ID, MASK_ID = 0, 1, 3, 4
MAX_STOP_IDS = 4  # eos_id may name up to this many stop tokens (chat models end turns with their own)
StopIds = Optional[Union[int, Sequence[int]]]  # None: never stop early; an id; up to MAX_STOP_IDS ids
MASK_TOKEN = "<mask>"

_BATCH_LENGTH = ("act_batch", "act_length")


# ----------------------------------------------------------------------------- sampling


class Sampling(NamedTuple):
    """How the next token is chosen: ``temperature`` 0 is greedy (argmax); otherwise a draw from
    softmax(logits / temperature) restricted to the ``top_k`` best tokens (0 = all) and then to the
    nucleus: the fewest best tokens whose probability reaches ``top_p`` (1 = all).

    The fields may be traced scalars: the decode loop takes them as arguments, so changing them
    compiles nothing."""

    temperature: Any = 0.0
    top_k: Any = 0
    top_p: Any = 1.0

    def on_device(self, sharding) -> "Sampling":
        dtypes = (jnp.float32, jnp.int32, jnp.float32)
        return Sampling(*(jax.device_put(jnp.asarray(x, d), sharding) for x, d in zip(self, dtypes)))


def filter_logits(logits_BV: Array, sampling: Sampling) -> Array:
    """float32 ``logits / temperature`` with ``-inf`` outside the top-k and outside the nucleus
    (top-k first, then top-p of what is left, as Hugging Face does); for temperature > 0."""
    t, top_k, top_p = sampling
    x_BV = logits_BV.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
    v = x_BV.shape[-1]
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)

    def restrict(x_BV):
        sorted_BV = jax.lax.top_k(x_BV, v)[0]  # descending
        in_top_k_BV = jnp.arange(v) < k
        probs_BV = jax.nn.softmax(jnp.where(in_top_k_BV, sorted_BV, -jnp.inf), axis=-1)
        in_nucleus_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p) | (top_p >= 1)  # mass before < p
        cutoff_B1 = jnp.take_along_axis(sorted_BV, (in_top_k_BV & in_nucleus_BV).sum(-1, keepdims=True) - 1, -1)
        return jnp.where(x_BV >= cutoff_B1, x_BV, -jnp.inf)

    return jax.lax.cond((k < v) | (top_p < 1), restrict, lambda x: x, x_BV)  # no sort without a filter


def next_token(logits_BV: Array, key: Array, sampling: Sampling) -> Array:
    """int32 ``[B]``: the argmax when temperature is 0, else a draw from ``filter_logits``.

    A Python temperature decides while tracing (a greedy program holds no sampling code); a
    traced one decides on device."""
    draw = lambda: jax.random.categorical(key, filter_logits(logits_BV, sampling), axis=-1).astype(jnp.int32)
    argmax = lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if isinstance(sampling.temperature, (int, float)):
        return argmax() if sampling.temperature == 0 else draw()
    return jax.lax.cond(sampling.temperature == 0, argmax, draw)


# ----------------------------------------------------------------------------- validation


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def stop_ids(eos_id) -> list:
    """``eos_id`` as a list of token ids: None -> [], an id -> [id], a sequence as is (at most
    ``MAX_STOP_IDS``, non-negative)."""
    ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, (int, np.integer)) else list(eos_id)
    if len(ids) > MAX_STOP_IDS or any(not isinstance(i, (int, np.integer)) or i < 0 for i in ids):
        raise ConfigError(f"eos_id={eos_id!r}: None, a token id or up to {MAX_STOP_IDS} of them")
    return [int(i) for i in ids]


def check_generation_args(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float, num_beams: int,
                          length_penalty: float = 1.0, vocab_size: Optional[int] = None,
                          cli: bool = False) -> None:
    """Raise one ConfigError listing every bad argument (named as flags when ``cli``)."""
    name = _dashed if cli else (lambda n: n)
    errors = []
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        errors.append(f"{name('max_new_tokens')}={max_new_tokens} must be a positive integer")
    if not math.isfinite(temperature) or temperature < 0:
        errors.append(f"{name('temperature')}={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        errors.append(f"{name('top_k')}={top_k} must be >= 0 (0 = no top-k filter)")
    if not 0 < top_p <= 1:
        errors.append(f"{name('top_p')}={top_p} must be in (0, 1] (1 = no nucleus filter)")
    if num_beams < 1:
        errors.append(f"{name('num_beams')}={num_beams} must be >= 1")
    elif num_beams > 1 and (temperature > 0 or top_k > 0 or top_p < 1):
        errors.append(f"beam search ({name('num_beams')}={num_beams}) is deterministic: drop {name('temperature')}, "
                      f"{name('top_k')} and {name('top_p')}, or sample with {name('num_beams')}=1")
    elif vocab_size is not None and 2 * num_beams > vocab_size:
        errors.append(f"{name('num_beams')}={num_beams} needs a vocabulary of at least {2 * num_beams} tokens "
                      f"(model.vocab_size={vocab_size})")
    if not math.isfinite(length_penalty):
        errors.append(f"{name('length_penalty')}={length_penalty} must be finite")
    if errors:
        raise ConfigError("invalid decode arguments:\n  - " + "\n  - ".join(errors))


# ----------------------------------------------------------------------------- prompts


class Prompts(NamedTuple):
    """Left-padded prompts: ``ids``, ``segment_ids``, ``positions`` int32 ``[B, P]``; ``lengths [B]``."""

    ids: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray

    def repeat(self, n: int) -> "Prompts":
        """Every row ``n`` times in a row (beam search)."""
        return Prompts(*(np.repeat(a, n, axis=0) for a in self))


def prompt_rows(input_ids, attention_mask=None) -> list[np.ndarray]:
    """The token rows of ``input_ids``: a list of unequal lists, or a ``[B, L]`` array whose
    ``attention_mask`` (1 = token, 0 = padding, on either side) says which entries are real."""
    if attention_mask is not None:
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ConfigError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be the same [batch, length]")
        rows = [row[m.astype(bool)] for row, m in zip(ids, mask)]
    elif isinstance(input_ids, np.ndarray) or hasattr(input_ids, "shape"):
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ConfigError(f"input_ids must be [batch, length] or a list of token lists, got shape {ids.shape}")
        rows = list(ids)
    else:
        rows = [np.asarray(r) for r in input_ids]
        if any(r.ndim != 1 for r in rows):
            raise ConfigError("input_ids must be a list of token lists (one per prompt), or a [batch, length] array")
    if not rows:
        raise ConfigError("input_ids holds no prompt")
    for i, r in enumerate(rows):
        if r.size == 0:
            raise ConfigError(f"prompt {i} is empty; give at least one token (decoder prompts usually start "
                              f"with BOS, id {BOS_ID})")
        if not np.issubdtype(r.dtype, np.integer):
            raise ConfigError(f"prompt {i} holds {r.dtype} values; token ids are integers")
    return [r.astype(np.int32) for r in rows]


def bucket_length(n: int) -> int:
    """Padded length of an ``n``-token prompt: the next power of two, at least 8."""
    return max(8, 1 << (n - 1).bit_length())


def left_pad(rows: Sequence[np.ndarray], length: int) -> Prompts:
    """Rows right-aligned in ``[B, length]``; positions start at 0 at each row's first token."""
    b = len(rows)
    ids, seg, pos = (np.zeros((b, length), np.int32) for _ in range(3))
    lengths = np.asarray([len(r) for r in rows], np.int32)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        seg[i, length - len(r):] = 1
        pos[i, length - len(r):] = np.arange(len(r))
    return Prompts(ids, seg, pos, lengths)


def _check_rows(cfg: Config, rows: list[np.ndarray], max_new_tokens: int, cli: bool) -> None:
    """Token ids inside the vocabulary; prompt (+ generated tokens) within model.max_length."""
    m = cfg.model
    flag = _dashed("max_new_tokens") if cli else "max_new_tokens"
    what = "prompt" if m.family != "encoder_decoder" else "input"
    for i, r in enumerate(rows):
        if r.min() < 0 or r.max() >= m.vocab_size:
            raise ConfigError(f"{what} {i} holds token id {int(r.max() if r.max() >= m.vocab_size else r.min())}, "
                              f"outside the model's vocabulary [0, {m.vocab_size})")
        if len(r) > m.max_length:
            raise ConfigError(f"{what} {i} has {len(r)} tokens, more than model.max_length={m.max_length}; "
                              "shorten it")
    if m.family == "decoder":
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > m.max_length:
            raise ConfigError(
                f"the longest prompt ({longest} tokens) plus {flag}={max_new_tokens} exceeds "
                f"model.max_length={m.max_length}; lower {flag} to at most {m.max_length - longest} "
                "or shorten the prompt")
    elif m.family == "encoder_decoder" and 1 + max_new_tokens > m.max_length:
        raise ConfigError(f"{flag}={max_new_tokens} exceeds the decoder's room: at most "
                          f"{m.max_length - 1} (model.max_length={m.max_length})")


# ----------------------------------------------------------------------------- programs


def mesh_of(params) -> Optional[Mesh]:
    """The mesh the parameters are sharded on, if they carry a NamedSharding."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def _cache_names(path, leaf) -> P:
    """Logical axes of one cache leaf: k/v ``CACHE_KV_AXES`` (a layer's own, without ``layers``),
    slot metadata ``[batch, length]``."""
    top = path[0].key
    if top == "layers":
        return P(*CACHE_KV_AXES[len(CACHE_KV_AXES) - leaf.ndim:])
    return P() if top == "index" else P(*_BATCH_LENGTH)


def _state_names(path, leaf) -> P:
    """Logical axes of a prefill state leaf: ``{"cache", "logits" [B, V], "position" [B]}``."""
    top = path[0].key
    if top == "cache":
        return _cache_names(path[1:], leaf)
    return P("act_batch", "act_vocab") if top == "logits" else P("act_batch")


class _Decoder:
    """The compiled programs of one (config, mesh, batch rows): model, rules, shardings, jits.

    The logical rules are the training rules, except that ``act_batch`` keeps only the batch mesh
    axes that divide the number of rows (a single prompt on 8 devices is replicated)."""

    def __init__(self, cfg: Config, mesh: Mesh, rows: int):
        self.cfg, self.mesh, self.rows = cfg, mesh, rows
        # The layer scan unrolled as model.decode_scan_unroll says (a GPU decoding step is launch-bound).
        # Separate projections whatever model.fused_qkv / fused_mlp say (the same numbers): fused ones
        # concatenate the weights, and on an H100 (2026-11-23, llama_1b, its 16 layers unrolled) that
        # made each token 22% slower at batch 1 (2.46 against 2.02 ms) and 19% at 32, about the time
        # to copy the 1.25 GB of weights involved every token.
        # Experts: eval_capacity_factor (dropless by default), not training's capacity.
        # When that unrolls every layer, the layers' weights are split out of their stacked [L, ...]
        # arrays once per call (``put_params``) and the model reads each layer's own arrays: slicing a
        # layer out of the stack inside the token loop copies its weights every token (compiled for an
        # H100, llama_1b at batch 1: 2.2 GB of copies a token beside 1.6 GB of weights read;
        # bench/offline_gpu.py --decode 1), for ~1.8 GB more device memory while decoding.
        m = inference_cfg(cfg)  # left-padded prompts: the encoder reads them through the mask
        unroll = m.decode_scan_unroll or m.scan_unroll
        stacks = (m.num_layers, m.decoder_layers) if m.family == "encoder_decoder" else (m.num_layers,)
        self.unstacked = m.scan_layers and unroll >= max(stacks)
        decoding = dataclasses.replace(m, fused_qkv=False, fused_mlp=False, scan_unroll=unroll,
                                       scan_layers=m.scan_layers and not self.unstacked)
        self.model = build_model(dataclasses.replace(cfg, model=decoding), deterministic=True)
        batch_axes = partitioning.shardings_from_logical(
            nn.Partitioned(jax.ShapeDtypeStruct((rows,), jnp.int32), names=("act_batch",)), mesh,
            partitioning.logical_rules(cfg, mesh)).spec[0]
        self.rules = tuple((name, batch_axes if name == "act_batch" else axes)
                           for name, axes in partitioning.logical_rules(cfg, mesh))
        # the parameters as stored (layers stacked when the config scans them), and as the model reads them
        self.stored_shardings = partitioning.shardings_from_logical(abstract_params(cfg), mesh, self.rules)
        self.param_shardings = partitioning.shardings_from_logical(abstract_params(decoding), mesh, self.rules)
        self.replicated = NamedSharding(mesh, P())
        self.batch = self.sharding(P(*_BATCH_LENGTH))
        self._jits: dict = {}

    def sharding(self, logical: P) -> NamedSharding:
        return NamedSharding(self.mesh, nn.logical_to_mesh_axes(tuple(logical), self.rules))

    def context(self):
        """Mesh and logical rules, active while the model traces (its activation constraints)."""
        return partitioning.mesh_rules(self.mesh, self.rules)

    def put_params(self, params):
        """``params`` on this decoder's mesh, as its model reads them (each layer's own arrays when
        ``unstacked``: one copy of the layer weights a call, none a token)."""
        params = nn.meta.unbox(params)
        split = self.is_stacked(params)
        params = jax.device_put(params, self.stored_shardings if split else self.param_shardings)
        if not split and not cast_at_use(params, jnp_dtype(self.cfg.model.dtype)):
            return params  # already as the model reads them
        fn = self._jit(("prepare", split, _dtypes(params)),
                       lambda: jax.jit(self.prepare, out_shardings=self.param_shardings))
        with self.context():
            return fn(params)

    def is_stacked(self, params) -> bool:
        """Whether ``params`` still hold stacked layers this decoder reads one by one."""
        return self.unstacked and jax.tree.structure(params) != jax.tree.structure(self.param_shardings)

    def prepare(self, params):
        """``params`` (stored, or already prepared) as this decoder's model reads them: layers
        split out of their stacks (``unstacked``), weights in the compute dtype (``cast_at_use``)."""
        params = unstack_layers(params) if self.is_stacked(params) else params
        return compute_dtype_params(params, jnp_dtype(self.cfg.model.dtype))

    def put_prompts(self, prompts: Prompts) -> tuple:
        return tuple(jax.device_put(a, self.batch) for a in prompts[:3])

    def _jit(self, key: tuple, build):
        if key not in self._jits:
            self._jits[key] = build()
        return self._jits[key]

    # ------------------------------------------------------------------ prefill

    def prefill(self, params, prompts: Prompts, max_new_tokens: int, start_id: int) -> dict:
        """State ``{"cache", "logits" [B, V] float32, "position" [B]}`` after the prompt.

        decoder: the prompt fills slots ``[0, P)`` of a ``P + K`` cache. encoder_decoder: the
        prompt is the encoder input; the decoder cache (``1 + K`` slots, with the encoder's
        projected keys/values) holds the start token."""
        ids = self.put_prompts(prompts)
        key = ("prefill", prompts.ids.shape, max_new_tokens, start_id, _dtypes(params))
        fn = self._jit(key, lambda: self._build_prefill(params, ids, max_new_tokens, start_id))
        with self.context():
            return fn(params, *ids)

    def _build_prefill(self, params, ids, max_new_tokens: int, start_id: int):
        cfg, model = self.cfg, self.model
        m = model.cfg  # as decoding runs it (init_cache: one cache entry a layer when unrolled)
        prefix_lm = m.family == "decoder" and cfg.objective == "prefix"

        def run(params, ids_BP, seg_BP, pos_BP):
            b, p = ids_BP.shape
            variables = {"params": params}
            if m.family == "encoder_decoder":
                encoded_BPD = model.apply(variables, ids_BP, seg_BP, pos_BP, method="encode")
                cache = _constrain(init_cache(m, b, 1 + max_new_tokens, encoder_segment_ids=seg_BP), _cache_names)
                start_B1 = jnp.full((b, 1), start_id, jnp.int32)
                logits_B1V, cache = model.apply(variables, start_B1, jnp.ones_like(start_B1),
                                                jnp.zeros_like(start_B1), cache, encoded=encoded_BPD, method="decode")
                next_pos_B = jnp.ones((b,), jnp.int32)
            else:
                cache = _constrain(init_cache(m, b, p + max_new_tokens), _cache_names)
                logits_B1V, cache = model.apply(variables, ids_BP, seg_BP, pos_BP, cache, method="decode",
                                                prefix_mask=(seg_BP > 0) if prefix_lm else None)
                next_pos_B = pos_BP[:, -1] + 1  # left-padded: the last column is every row's last token
            state = {"cache": cache, "logits": logits_B1V[:, -1].astype(jnp.float32), "position": next_pos_B}
            return _constrain(state, _state_names)

        in_sh = (self.param_shardings,) + (self.batch,) * 3
        with self.context():
            abstract = jax.eval_shape(run, params, *ids)
        out_sh = self._state_shardings(abstract)
        return jax.jit(run, in_shardings=in_sh, out_shardings=out_sh)

    def _state_shardings(self, abstract_state):
        return jax.tree_util.tree_map_with_path(lambda path, x: self.sharding(_state_names(path, x)), abstract_state)

    def _step(self, params, state: dict, tokens_B: Array) -> dict:
        """Feed ``tokens_B`` at each row's next position: the state after one cached decode step."""
        tok_B1 = tokens_B[:, None]
        logits_B1V, cache = self.model.apply({"params": params}, tok_B1, jnp.ones_like(tok_B1),
                                             state["position"][:, None], state["cache"], method="decode")
        new = {"cache": cache, "logits": logits_B1V[:, 0].astype(jnp.float32), "position": state["position"] + 1}
        return _constrain(new, _state_names)

    # ------------------------------------------------------------------ sampling loop

    def sample(self, params, state: dict, seed: int, max_new_tokens: int, sampling: Sampling,
               eos_id: StopIds, output_logits: bool):
        """Run the sampling loop on a prefill ``state`` (donated). Returns device arrays
        ``(tokens [B, K], logprobs [B, K], logits [B, K, V] or None, steps)``. The seed, the
        sampling settings and ``eos_id`` are arguments of the compiled loop, not constants: one
        program serves greedy decoding, one every temperature > 0 / top-k / top-p."""
        (*out, _done), _final_state = self.sample_part(params, state, seed, max_new_tokens, sampling, eos_id,
                                                       output_logits)
        return tuple(out)

    def sample_part(self, params, state: dict, seed: int, max_new_tokens: int, sampling: Sampling,
                    eos_id: StopIds, output_logits: bool = False, start: int = 0, done=None):
        """``sample`` for up to ``max_new_tokens`` tokens of a longer generation that has made
        ``start`` tokens so far (``done [B]``: the rows that have stopped, None: none). Returns
        ``((tokens, logprobs, logits, steps, done), state)``: ``state`` (the prefill's, donated,
        with room for all the tokens) goes on to the next part. The parts of a generation give
        exactly the tokens one ``sample`` call gives (token ``t`` draws with the key folded with
        ``t``); a server streams them. ``max_new_tokens`` should be a multiple of
        ``model.decode_stop_every``: the tokens a block runs past a part's end advance the state."""
        greedy = float(sampling.temperature) == 0.0
        jkey = ("sample", _shapes(state), max_new_tokens, output_logits, greedy, _dtypes(params))
        fn = self._jit(jkey, lambda: self._build_sample(state, max_new_tokens, output_logits, greedy))
        key = jax.device_put(jax.random.key(seed), self.replicated)
        done = np.zeros((state["logits"].shape[0],), bool) if done is None else done
        with self.context():
            return fn(params, state, key, sampling.on_device(self.replicated), self._eos(eos_id),
                      jax.device_put(jnp.int32(start), self.replicated),
                      jax.device_put(done, self.sharding(P("act_batch"))))

    def _eos(self, eos_id) -> Array:
        """``eos_id`` (None, a token id or up to ``MAX_STOP_IDS`` of them) as a device vector of
        ``MAX_STOP_IDS`` ids, -1 (no token) for the unused: None never stops early."""
        ids = stop_ids(eos_id)
        return jax.device_put(jnp.asarray(ids + [-1] * (MAX_STOP_IDS - len(ids)), jnp.int32), self.replicated)

    def _build_sample(self, state, max_new_tokens: int, output_logits: bool, greedy: bool):
        k = max_new_tokens

        def run(params, state, key, sampling, eos_id, start, done):
            sampling = Sampling() if greedy else sampling  # greedy: argmax, traced in statically
            b, v = state["logits"].shape
            carry = {
                "step": jnp.zeros((), jnp.int32), "state": state, "done": done,
                "tokens": jnp.zeros((b, k), jnp.int32), "logprobs": jnp.zeros((b, k), jnp.float32),
                "logits": jnp.zeros((b, k, v), jnp.float32) if output_logits else None,
            }

            running = lambda c: (c["step"] < k) & ~jnp.all(c["done"])

            def body(c, checked=True):  # checked: the loop's condition has just said `running(c)`
                step, logits_BV = c["step"], c["state"]["logits"]
                tok_B = next_token(logits_BV, jax.random.fold_in(key, start + step), sampling)
                tok_B = jnp.where(c["done"], PAD_ID, tok_B)
                logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV), tok_B[:, None], axis=-1)[:, 0]
                # False: a token of a block of decode_stop_every past the end (computed, thrown away)
                live = jnp.bool_(True) if checked else running(c)
                at = jnp.minimum(step, k - 1)

                def put(out_BK, new_B):  # column `step` of the output, left as it is when not live
                    old_B = jax.lax.dynamic_index_in_dim(out_BK, at, 1, keepdims=False)
                    return jax.lax.dynamic_update_index_in_dim(out_BK, jnp.where(live, new_B, old_B), at, 1)

                out = dict(c, step=step + live.astype(jnp.int32), state=self._step(params, c["state"], tok_B))
                out["tokens"] = put(c["tokens"], tok_B)
                out["logprobs"] = put(c["logprobs"], jnp.where(c["done"], 0.0, logp_B))
                if output_logits:
                    out["logits"] = put(c["logits"], logits_BV)
                out["done"] = c["done"] | (live & jnp.any(tok_B[:, None] == eos_id, axis=-1))
                return out

            # decode_stop_every tokens in a loop of known length between checks of `running`: XLA runs
            # such a loop without reading its condition back to the host (model.decode_stop_every)
            block = min(self.model.cfg.decode_stop_every, k)
            blocked = body if block == 1 else lambda c: jax.lax.fori_loop(0, block, lambda _, c: body(c, False), c)
            c = jax.lax.while_loop(running, blocked, carry)
            return (c["tokens"], c["logprobs"], c["logits"], c["step"], c["done"]), c["state"]

        state_sh = self._state_shardings(state)
        tokens_sh = self.sharding(P(*_BATCH_LENGTH))
        logits_sh = self.sharding(P("act_batch", "act_length", "act_vocab")) if output_logits else None
        rows_sh = self.sharding(P("act_batch"))
        rep = self.replicated
        return jax.jit(run, in_shardings=(self.param_shardings, state_sh, rep, Sampling(rep, rep, rep), rep, rep,
                                          rows_sh),
                       out_shardings=((tokens_sh, tokens_sh, logits_sh, rep, rows_sh), state_sh),
                       donate_argnums=1)

    # ------------------------------------------------------------------ beam search

    def beams(self, params, state: dict, num_beams: int, max_new_tokens: int, length_penalty: float,
              eos_id: StopIds):
        """Beam search on a prefill ``state`` (donated) whose rows hold every prompt ``num_beams``
        times. Returns device arrays ``(sequences [B, W, K], scores [B, W], steps)``, best first."""
        jkey = ("beams", _shapes(state), num_beams, max_new_tokens, _dtypes(params))
        fn = self._jit(jkey, lambda: self._build_beams(state, num_beams, max_new_tokens))
        alpha = jax.device_put(jnp.float32(length_penalty), self.replicated)
        with self.context():
            out, _final_state = fn(params, state, alpha, self._eos(eos_id))
        return out

    def _build_beams(self, state, num_beams: int, max_new_tokens: int):
        w, k = num_beams, max_new_tokens

        def run(params, state, alpha, eos_id):
            penalty = lambda n: jnp.asarray(n, jnp.float32) ** alpha  # score = log p / length ** alpha
            n, v = state["logits"].shape
            b = n // w
            alive_logp_bW = jnp.tile(jnp.asarray([0.0] + [-jnp.inf] * (w - 1), jnp.float32), (b, 1))
            carry = {
                "step": jnp.zeros((), jnp.int32), "state": state, "done": jnp.zeros((b,), bool),
                "alive": jnp.zeros((b, w, k), jnp.int32), "alive_logp": alive_logp_bW,
                "finished": jnp.zeros((b, w, k), jnp.int32), "scores": jnp.full((b, w), -jnp.inf, jnp.float32),
            }

            def body(c):
                step = c["step"]
                # Every one-token extension of every live beam; the best 2W hold at least W without EOS.
                logp_bWV = jax.nn.log_softmax(c["state"]["logits"]).reshape(b, w, v) + c["alive_logp"][..., None]
                top_logp_bC, top_idx_bC = jax.lax.top_k(logp_bWV.reshape(b, w * v), 2 * w)
                parent_bC, tok_bC = top_idx_bC // v, (top_idx_bC % v).astype(jnp.int32)
                seqs_bCK = jnp.take_along_axis(c["alive"], parent_bC[..., None], axis=1)
                seqs_bCK = jnp.where(jnp.arange(k) == step, tok_bC[..., None], seqs_bCK)
                is_eos_bC = jnp.any(tok_bC[..., None] == eos_id, axis=-1)
                # Extensions ending in EOS compete with the finished hypotheses for W places.
                ended_bC = jnp.where(is_eos_bC & ~c["done"][:, None], top_logp_bC / penalty(step + 1), -jnp.inf)
                scores_bW, pick = jax.lax.top_k(jnp.concatenate([c["scores"], ended_bC], 1), w)
                finished = jnp.take_along_axis(jnp.concatenate([c["finished"], seqs_bCK], 1), pick[..., None], 1)
                # The best W without EOS stay alive; their parents' cache rows follow them.
                alive_logp_bW, pick = jax.lax.top_k(jnp.where(is_eos_bC, -jnp.inf, top_logp_bC), w)
                alive = jnp.take_along_axis(seqs_bCK, pick[..., None], axis=1)
                tok_n = jnp.take_along_axis(tok_bC, pick, 1).reshape(n)
                rows_n = (jnp.arange(b)[:, None] * w + jnp.take_along_axis(parent_bC, pick, 1)).reshape(n)
                st = c["state"]
                layers = st["cache"]["layers"]  # every layer's self-attention k / v, rows as the beams chose
                if isinstance(layers, list):  # one entry a layer: [B, S, K, H]
                    layers = [dict(c, self=jax.tree.map(lambda x: jnp.take(x, rows_n, axis=0), c["self"]))
                              for c in layers]
                else:
                    layers = dict(layers, self=jax.tree.map(lambda x: jnp.take(x, rows_n, axis=1), layers["self"]))
                cache = dict(st["cache"], layers=layers)
                new_state = self._step(params, dict(st, cache=cache), tok_n)
                # A row is done when even its best live beam, at its most favourable length, cannot
                # beat its worst finished hypothesis.
                best_bW = alive_logp_bW[:, 0]
                hope_b = jnp.maximum(best_bW / penalty(step + 1), best_bW / penalty(k))
                done = c["done"] | ((scores_bW[:, -1] > -jnp.inf) & (hope_b <= scores_bW[:, -1]))
                return {"step": step + 1, "state": new_state, "done": done, "alive": alive,
                        "alive_logp": alive_logp_bW, "finished": finished, "scores": scores_bW}

            c = jax.lax.while_loop(lambda c: (c["step"] < k) & ~jnp.all(c["done"]), body, carry)
            # Rows cut off by max_new_tokens: their live beams compete with the finished ones.
            live_bW = jnp.where(c["done"][:, None], -jnp.inf, c["alive_logp"] / penalty(c["step"]))
            scores_bW, pick = jax.lax.top_k(jnp.concatenate([c["scores"], live_bW], 1), w)
            seqs = jnp.take_along_axis(jnp.concatenate([c["finished"], c["alive"]], 1), pick[..., None], 1)
            return (seqs, scores_bW, c["step"]), c["state"]

        state_sh, rep = self._state_shardings(state), self.replicated
        return jax.jit(run, in_shardings=(self.param_shardings, state_sh, rep, rep),
                       out_shardings=((rep, rep, rep), state_sh), donate_argnums=1)

    # ------------------------------------------------------------------ fill-mask

    def top_tokens(self, params, prompts: Prompts, top_k: int):
        """Encoder family: ``(ids [B, P, k], probs [B, P, k])`` of the k likeliest tokens per position."""
        ids = self.put_prompts(prompts)
        model = self.model

        def run(params, ids_BP, seg_BP, pos_BP):
            logits_BPV = model.apply({"params": params}, ids_BP, seg_BP, pos_BP)
            probs_BPk, top_BPk = jax.lax.top_k(jax.nn.softmax(logits_BPV.astype(jnp.float32), axis=-1), top_k)
            return top_BPk.astype(jnp.int32), probs_BPk

        key = ("fill_mask", prompts.ids.shape, top_k, _dtypes(params))
        fn = self._jit(key, lambda: jax.jit(run, in_shardings=(self.param_shardings,) + (self.batch,) * 3,
                                            out_shardings=(self.replicated, self.replicated)))
        with self.context():
            return fn(params, *ids)

    def score(self, params, prompts: Prompts, top_k: int, prefix_BP=None, targets: Optional[Prompts] = None,
              start_id: int = BOS_ID):
        """One forward pass over left-padded ``prompts``: device arrays ``(logprobs [B, T],
        top_ids [B, T, k], top_logprobs [B, T, k])``, at column ``t`` the log-probability of token
        ``t`` given what comes before it and the ``k`` (at least 1) likeliest tokens there.

        decoder: the tokens are the prompts' (T = P; column 0 is 0: nothing comes before it);
        ``prefix_BP`` (prefix LM) marks the bidirectional prefix of each row. encoder_decoder:
        the prompts are the encoder's input and ``targets`` (right-padded) the decoder's tokens,
        read after ``start_id``."""
        ids = self.put_prompts(prompts)
        model, k = self.model, max(top_k, 1)
        encdec = self.model.cfg.family == "encoder_decoder"

        def scores(logits_BTV, tokens_BT):
            logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
            chosen_BT = jnp.take_along_axis(logp_BTV, tokens_BT[..., None], axis=-1)[..., 0]
            top_lp_BTk, top_BTk = jax.lax.top_k(logp_BTV, k)
            return chosen_BT, top_BTk.astype(jnp.int32), top_lp_BTk

        def run(params, ids_BP, seg_BP, pos_BP, extra):
            variables = {"params": params}
            if encdec:
                dec_in_BT, targets_BT, tseg_BT, tpos_BT = extra
                logits_BTV = model.apply(variables, ids_BP, dec_in_BT, seg_BP, tseg_BT, pos_BP, tpos_BT)
                return scores(logits_BTV, targets_BT)
            logits_BPV = model.apply(variables, ids_BP, seg_BP, pos_BP, prefix_mask=extra)
            first = lambda x: jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))  # column 0: nothing before
            return tuple(first(x) for x in scores(logits_BPV[:, :-1], ids_BP[:, 1:]))

        if encdec:  # the decoder reads the targets shifted right, after start_id
            dec_in = shift_right(targets.ids, targets.segment_ids, start_id)
            extra = tuple(jax.device_put(a, self.batch) for a in (dec_in, *targets[:3]))
        else:
            extra = None if prefix_BP is None else jax.device_put(prefix_BP, self.batch)
        key = ("score", prompts.ids.shape, None if targets is None else targets.ids.shape, prefix_BP is None, k,
               start_id, _dtypes(params))
        fn = self._jit(key, lambda: jax.jit(run, in_shardings=(self.param_shardings,) + (self.batch,) * 3
                                            + ((self.batch,) * 4 if encdec else None if prefix_BP is None
                                               else self.batch,),
                                            out_shardings=(self.replicated,) * 3))
        with self.context():
            return fn(params, *ids, extra)


# Parameters every module casts to the compute dtype before use (Dense and expert kernels and
# biases, LoRA factors, embedding tables, the logits bias): decoding casts them once per call.
# Norm scales and biases, T5's relative position table and the router's balancing bias are used in
# float32 and keep their dtype.
_CAST_AT_USE = frozenset({"kernel", "embedding", "lora_a", "lora_b", "logits_bias"})


def cast_at_use(params: dict, dtype) -> list:
    """The paths of the floating parameters the model casts to ``dtype`` at use that are not
    ``dtype`` yet (``_CAST_AT_USE``, and the ``bias`` of a module with a ``kernel``: a norm's
    bias is used in float32)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    key = lambda k: getattr(k, "key", None)
    with_kernel = {tuple(path[:-1]) for path, _ in leaves if key(path[-1]) == "kernel"}
    return [path for path, x in leaves
            if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype
            and (key(path[-1]) in _CAST_AT_USE or (key(path[-1]) == "bias" and tuple(path[:-1]) in with_kernel))]


def compute_dtype_params(params: dict, dtype) -> dict:
    """``params`` with the parameters of ``cast_at_use`` cast to ``dtype`` once: the same numbers,
    and a decoding step reads their half-size copies instead of converting float32 weights every
    token (XLA does not hoist the conversion out of the token loop: compiled for an H100, llama_1b
    at batch 1 with float32 parameters moved 18.2 GB a token, 6.6 ms estimated, against 2.0 GB and
    1.2 ms now; ``bench/offline_gpu.py --decode 1``)."""
    paths = set(cast_at_use(params, dtype))
    return jax.tree_util.tree_map_with_path(lambda path, x: x.astype(dtype) if path in paths else x, params)


def unstack_layers(params: dict) -> dict:
    """A parameter tree of scanned stacks (``.../stack/layers/...`` with a leading layer axis) as
    the same model's tree with ``model.scan_layers=false`` (``.../stack/layers_0/...``, one entry
    a layer): what ``_Decoder.put_params`` gives a decoder that runs every layer as straight code."""
    if not isinstance(params, dict):
        return params
    out = {k: unstack_layers(v) for k, v in params.items() if k != "layers"}
    if "layers" in params:
        n = jax.tree.leaves(params["layers"])[0].shape[0]
        for i in range(n):
            out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def _constrain(tree, names_fn):
    """Logical sharding constraints on every leaf of ``tree`` (names from ``names_fn(path, leaf)``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: nn.with_logical_constraint(x, tuple(names_fn(path, x))), tree)


def _shapes(tree) -> tuple:
    return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


def _dtypes(params) -> tuple:
    return tuple(sorted({str(x.dtype) for x in jax.tree.leaves(params)}))


_DECODERS: dict = {}


def _decoder(cfg: Config, mesh: Mesh, rows: int) -> _Decoder:
    """The ``_Decoder`` of (model, objective, sharding settings, mesh, rows); built once."""
    key = (repr(cfg.model), cfg.objective, repr(cfg.sharding), mesh, rows)
    if key not in _DECODERS:
        _DECODERS[key] = _Decoder(cfg, mesh, rows)
    return _DECODERS[key]


def prepare_params(cfg: Config, params, mesh: Optional[Mesh] = None):
    """``params`` as every decoding call reads them (on ``mesh``, default the parameters' own or
    the config's): weights in the compute dtype, layers split out of their stacks when decoding
    unrolls them. ``generate``, ``score_tokens``, ... do this on each call; a caller making many
    calls (a server) does it once and passes the result."""
    mesh = mesh or mesh_of(params) or partitioning.make_mesh(cfg)
    return _decoder(cfg, mesh, 1).put_params(params)


def _setup(cfg: Config, params, rows: list[np.ndarray], mesh: Optional[Mesh], max_new_tokens: int,
           repeat: int = 1):
    """Checked, left-padded prompts and the (decoder, params on its mesh) to run them."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"cfg must be a t5x_lite Config (load_config / load_for_inference), got {type(cfg).__name__}")
    _check_rows(cfg, rows, max_new_tokens, cli=False)
    prompts = left_pad(rows, bucket_length(max(len(r) for r in rows))).repeat(repeat)
    if mesh is None:
        mesh = mesh_of(params) or partitioning.make_mesh(cfg)
    dec = _decoder(cfg, mesh, len(prompts.ids))
    return prompts, dec, dec.put_params(params)


def _check_family(cfg: Config, what: str) -> None:
    if cfg.model.family == "encoder":
        raise ConfigError(f"{what} needs a decoder or encoder_decoder model; model.family=encoder fills masks "
                          f"instead: fill_mask(...), or a prompt with {MASK_TOKEN} on the command line")


# ----------------------------------------------------------------------------- public API


class Generation(NamedTuple):
    """What ``generate_details`` returns (host numpy arrays, ``n`` = tokens generated):
    ``tokens`` int32 ``[B, n]`` (EOS included, pad 0 after it); ``logprobs`` float32 ``[B, n]``,
    the model's log-probability of each token (temperature 1, no filtering; 0 on padding);
    ``logits`` float32 ``[B, n, V]`` the next-token logits at every step (``output_logits``)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    logits: Optional[np.ndarray]


class Beams(NamedTuple):
    """``sequences`` int32 ``[B, W, n]`` best first (EOS included, pad 0 after it) and their
    ``scores [B, W]``: sum of token log-probabilities / (number of tokens) ** length_penalty."""

    sequences: np.ndarray
    scores: np.ndarray


def generate_details(cfg: Config, params, input_ids, max_new_tokens: int = 32, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0, *, attention_mask=None,
                     eos_id: StopIds = EOS_ID, start_id: int = BOS_ID, output_logits: bool = False,
                     mesh: Optional[Mesh] = None) -> Generation:
    """Greedy decoding or sampling, with the per-token log-probabilities (and logits if asked).

    ``input_ids``: a list of token lists (any lengths) or a ``[B, L]`` array with an optional
    ``attention_mask``. decoder: the prompts to continue (the CLI starts them with BOS);
    encoder_decoder: the encoder inputs, the decoder starting from ``start_id``. ``eos_id``: the
    token that ends a row, or several (any of them ends it); None never stops early. ``mesh``: default the parameters' mesh, else the config's training mesh."""
    _check_family(cfg, "generate")
    check_generation_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          num_beams=1)
    stop_ids(eos_id)
    prompts, dec, params = _setup(cfg, params, prompt_rows(input_ids, attention_mask), mesh, max_new_tokens)
    state = dec.prefill(params, prompts, max_new_tokens, start_id)
    tokens, logprobs, logits, steps = dec.sample(params, state, seed, max_new_tokens,
                                                 Sampling(temperature, top_k, top_p), eos_id, output_logits)
    n = int(steps)
    return Generation(np.asarray(tokens)[:, :n], np.asarray(logprobs)[:, :n],
                      None if logits is None else np.asarray(logits)[:, :n])


def generate_parts(cfg: Config, params, input_ids, max_new_tokens: int = 32, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0, *, part_tokens: int = 16,
                   attention_mask=None, eos_id: StopIds = EOS_ID, start_id: int = BOS_ID,
                   mesh: Optional[Mesh] = None) -> Iterator[Generation]:
    """``generate_details`` (no logits) in parts of ``part_tokens`` new tokens (rounded up to a
    multiple of ``model.decode_stop_every``), each yielded as soon as the device has made it:
    for streaming. Joined along the tokens, the parts are exactly ``generate_details``'s tokens
    and log-probabilities (same seed, same draws). It ends early once every row has stopped.
    Each part is one compiled loop over the KV cache the prompt's prefill made for all
    ``max_new_tokens``; the state goes from part to part on the device."""
    _check_family(cfg, "generate")
    check_generation_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          num_beams=1)
    if part_tokens < 1:
        raise ConfigError(f"part_tokens={part_tokens} must be >= 1")
    block = cfg.model.decode_stop_every
    part = -(-part_tokens // block) * block
    stop_ids(eos_id)
    prompts, dec, params = _setup(cfg, params, prompt_rows(input_ids, attention_mask), mesh, max_new_tokens)
    state = dec.prefill(params, prompts, max_new_tokens, start_id)
    sampling, done, made = Sampling(temperature, top_k, top_p), None, 0
    while made < max_new_tokens:
        k = min(part, max_new_tokens - made)  # the last part may be shorter: nothing runs after it
        (tokens, logprobs, _, steps, done), state = dec.sample_part(params, state, seed, k, sampling, eos_id,
                                                                    start=made, done=done)
        n = int(steps)
        if n:
            yield Generation(np.asarray(tokens)[:, :n], np.asarray(logprobs)[:, :n], None)
        made += n
        if np.asarray(done).all():
            return


def beam_search(cfg: Config, params, input_ids, max_new_tokens: int = 32, num_beams: int = 4,
                length_penalty: float = 1.0, *, attention_mask=None, eos_id: StopIds = EOS_ID,
                start_id: int = BOS_ID, mesh: Optional[Mesh] = None) -> Beams:
    """Beam search (decoder and encoder_decoder): the ``num_beams`` best sequences of every prompt.

    Each step extends every live beam by every token and keeps the best 2W extensions: those
    ending in EOS compete with the finished hypotheses, the best W others stay alive. A sequence's
    score is its log-probability / length ** ``length_penalty`` (0: plain log-probability; > 0
    favours longer outputs). A row stops when no live beam can beat its finished ones."""
    _check_family(cfg, "beam search")
    stop_ids(eos_id)
    check_generation_args(max_new_tokens=max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, num_beams=num_beams,
                          length_penalty=length_penalty, vocab_size=cfg.model.vocab_size)
    prompts, dec, params = _setup(cfg, params, prompt_rows(input_ids, attention_mask), mesh, max_new_tokens,
                                  repeat=num_beams)
    state = dec.prefill(params, prompts, max_new_tokens, start_id)
    seqs, scores, steps = dec.beams(params, state, num_beams, max_new_tokens, float(length_penalty), eos_id)
    return Beams(np.asarray(seqs)[..., :int(steps)], np.asarray(scores))


def generate(cfg: Config, params, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, num_beams: int = 1, seed: int = 0, *, attention_mask=None,
             length_penalty: float = 1.0, eos_id: StopIds = EOS_ID, start_id: int = BOS_ID,
             mesh: Optional[Mesh] = None) -> np.ndarray:
    """New token ids, int32 ``[batch, new_length]``, EOS included and padded with 0 after it.

    ``temperature`` 0 is greedy; > 0 samples (``top_k`` 0 = off, ``top_p`` 1 = off) with
    ``jax.random.key(seed)``; ``num_beams`` > 1 returns each prompt's best beam. See
    ``generate_details`` for the inputs and ``beam_search`` for the beams."""
    check_generation_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          num_beams=num_beams, length_penalty=length_penalty, vocab_size=cfg.model.vocab_size)
    common = dict(attention_mask=attention_mask, eos_id=eos_id, start_id=start_id, mesh=mesh)
    if num_beams > 1:
        return beam_search(cfg, params, input_ids, max_new_tokens, num_beams, length_penalty, **common).sequences[:, 0]
    return generate_details(cfg, params, input_ids, max_new_tokens, temperature, top_k, top_p, seed,
                            **common).tokens


class TokenScores(NamedTuple):
    """One sequence's ``score_tokens``: ``logprobs [L]`` float32, the log-probability of each token
    given the tokens before it (NaN for the first, which nothing predicts); ``top_ids [L, k]`` and
    ``top_logprobs [L, k]`` the ``k`` likeliest tokens at each position, best first (-1 / NaN for
    the first)."""

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def score_tokens(cfg: Config, params, input_ids, top_k: int = 0, *, targets=None, attention_mask=None,
                 start_id: int = BOS_ID, mesh: Optional[Mesh] = None) -> list[TokenScores]:
    """Each token's log-probability given what comes before it, one forward pass for the batch,
    and the ``top_k`` likeliest tokens at every position (0: none). ``input_ids`` as
    ``generate_details`` takes them.

    - causal decoder: every token of ``input_ids`` given the tokens before it; with ``targets``
      (one token list per row), the targets' tokens given the input and the targets before them.
      The sum over a continuation is its log-likelihood given the context (what evaluation
      harnesses ask of a model).
    - prefix LM (``data.objective=prefix``): ``targets`` given the input read both ways.
    - encoder_decoder: ``targets`` given the input read by the encoder, the decoder starting
      from ``start_id`` (T5's rank classification)."""
    m = cfg.model
    if m.family == "encoder":
        raise ConfigError("score_tokens needs a decoder or encoder_decoder model; the encoder family fills masks")
    if targets is None and (m.family == "encoder_decoder" or cfg.objective == "prefix"):
        what = "a prefix LM reads its input both ways" if m.family == "decoder" else "the encoder reads the input"
        raise ConfigError(f"score_tokens needs targets here: {what}, the targets are what it predicts")
    if not 0 <= top_k <= m.vocab_size:
        raise ConfigError(f"top_k={top_k} must be in [0, {m.vocab_size}] (the vocabulary)")
    rows = prompt_rows(input_ids, attention_mask)
    goals = None if targets is None else prompt_rows(targets)
    if goals is not None and len(goals) != len(rows):
        raise ConfigError(f"targets has {len(goals)} rows for {len(rows)} inputs; give one target per input")
    if m.family == "decoder" and goals is not None:
        seqs = [np.concatenate([r, g]) for r, g in zip(rows, goals)]
        prompts, dec, params = _setup(cfg, params, seqs, mesh, max_new_tokens=0)
        prefix = None
        if cfg.objective == "prefix":  # the input's columns of each left-padded row
            width = prompts.ids.shape[1]
            prefix = np.zeros_like(prompts.segment_ids, dtype=bool)
            for i, (r, g) in enumerate(zip(rows, goals)):
                prefix[i, width - len(r) - len(g):width - len(g)] = True
        width = prompts.ids.shape[1]  # the targets: each row's last columns
        return _scores(dec.score(params, prompts, top_k, prefix_BP=prefix), top_k,
                       [slice(width - len(g), width) for g in goals])
    if m.family == "decoder":
        prompts, dec, params = _setup(cfg, params, rows, mesh, max_new_tokens=0)
        width = prompts.ids.shape[1]
        out = _scores(dec.score(params, prompts, top_k), top_k, [slice(width - len(r), width) for r in rows])
        for sc in out:  # nothing predicts a row's first token
            sc.logprobs[0], sc.top_ids[0], sc.top_logprobs[0] = np.nan, -1, np.nan
        return out
    longest = max(len(g) for g in goals)
    if longest > m.max_length:
        raise ConfigError(f"a target has {longest} tokens, more than model.max_length={m.max_length}")
    prompts, dec, params = _setup(cfg, params, rows, mesh, max_new_tokens=0)
    width = bucket_length(longest)  # the targets right-padded, positions from 0
    ids, seg = np.zeros((len(goals), width), np.int32), np.zeros((len(goals), width), np.int32)
    for i, g in enumerate(goals):
        ids[i, :len(g)], seg[i, :len(g)] = g, 1
    right = Prompts(ids, seg, np.where(seg > 0, np.arange(width, dtype=np.int32), 0), seg.sum(1))
    return _scores(dec.score(params, prompts, top_k, targets=right, start_id=start_id), top_k,
                   [slice(0, len(g)) for g in goals])


def _scores(arrays, top_k: int, columns: list) -> list[TokenScores]:
    """Each row's ``TokenScores`` of its ``columns`` (a slice a row) of ``_Decoder.score``'s arrays."""
    chosen, top, top_lp = (np.asarray(a) for a in arrays)
    return [TokenScores(chosen[i, at].copy(), top[i, at, :top_k].copy(), top_lp[i, at, :top_k].copy())
            for i, at in enumerate(columns)]


class MaskFill(NamedTuple):
    """Candidates for one mask: its ``position`` in the prompt, ``token_ids`` and ``probs`` (best first)."""

    position: int
    token_ids: list
    probs: list


def fill_mask(cfg: Config, params, input_ids, top_k: int = 5, *, mask_id: int = MASK_ID, attention_mask=None,
              mesh: Optional[Mesh] = None) -> list[list[MaskFill]]:
    """Encoder family: for every prompt, the ``top_k`` likeliest tokens at each ``mask_id``."""
    if cfg.model.family != "encoder":
        raise ConfigError(f"fill_mask needs model.family=encoder, not {cfg.model.family}; use generate")
    if not 1 <= top_k <= cfg.model.vocab_size:
        raise ConfigError(f"top_k={top_k} must be in [1, {cfg.model.vocab_size}] (the vocabulary)")
    rows = prompt_rows(input_ids, attention_mask)
    missing = [i for i, r in enumerate(rows) if not (r == mask_id).any()]
    if missing:
        raise ConfigError(f"prompt(s) {missing} hold no mask token (id {mask_id}, {MASK_TOKEN}): nothing to fill")
    prompts, dec, params = _setup(cfg, params, rows, mesh, max_new_tokens=0)
    ids, probs = (np.asarray(a) for a in dec.top_tokens(params, prompts, top_k))
    width = prompts.ids.shape[1]
    out = []
    for i, r in enumerate(rows):
        offset = width - len(r)
        out.append([MaskFill(int(p), ids[i, offset + p].tolist(), probs[i, offset + p].tolist())
                    for p in np.flatnonzero(r == mask_id)])
    return out


# ----------------------------------------------------------------------------- CLI


def cli_stop_ids(workdir: str, tokenizer) -> list:
    """The tokenizer's EOS and, for an imported model, the ``eos_token_id``s of its
    ``generation_config.json`` (chat models end a turn with their own token: Llama 3's
    ``<|eot_id|>``, Gemma's ``<end_of_turn>``), at most ``MAX_STOP_IDS``."""
    from t5x_lite.interop.hf import HF_FILES_DIR

    ids = [tokenizer.eos_id]
    path = os.path.join(workdir, HF_FILES_DIR, "generation_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            extra = json.load(f).get("eos_token_id")
        for i in extra if isinstance(extra, list) else [extra]:
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)
    return ids[:MAX_STOP_IDS]


def step_text(step) -> str:
    """`` at step N`` for a log line naming what was loaded ('' when the step is not known)."""
    return "" if step is None else f" at step {step}"


def text_prompt_ids(cfg: Config, tokenizer, prompt: str) -> list[int]:
    """Token ids of a text prompt (``decode``'s, ``serve``'s) as the family was trained: BOS first
    (decoder), EOS last (encoder_decoder inputs), as is (encoder)."""
    ids = tokenizer.encode(prompt)
    if cfg.model.family == "decoder":
        return [tokenizer.bos_id] + ids
    if cfg.model.family == "encoder_decoder":
        return ids + [tokenizer.eos_id]
    return ids


def _prompt_records(args) -> list[dict]:
    """The prompts of ``--prompt`` (records ``{"input": text}``) or of ``--input``'s JSON lines."""
    if bool(args.prompt) == bool(args.input):
        raise ConfigError("give the prompts with --prompt (repeatable) or --input FILE.jsonl, one of the two")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be >= 1")
    if args.prompt:
        return [{args.field: p} for p in args.prompt]
    records = []
    try:
        with open(args.input, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{args.input}:{lineno} is not JSON ({e.msg})") from None
                # (--chat: a conversation field may stand in, checked against the work dir's config)
                if not isinstance(record, dict) or not (args.chat or isinstance(record.get(args.field), str)):
                    raise ConfigError(f"{args.input}:{lineno} has no text field {args.field!r} (name it with --field)")
                records.append(record)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read --input {args.input}: {e}") from None
    if not records:
        raise ConfigError(f"--input {args.input} holds no prompt")
    return records


def fill_candidates(tokenizer, fills) -> list[dict]:
    """``fill_mask``'s ``MaskFill``s of one prompt as JSON: each mask's position and candidates."""
    return [{"position": int(f.position), "candidates": [{"token": tokenizer.decode([t]), "prob": float(p)}
                                                         for t, p in zip(f.token_ids, f.probs)]} for f in fills]


def run_decode_cli(args) -> int:
    """``t5x-lite decode``: one completion per prompt (``--prompt`` or ``--input`` JSON lines) from
    the latest checkpoint or ``--step`` (encoder family: the candidates for every ``<mask>``), printed or
    written to ``--output``. Prompts are decoded ``--batch-size`` at a time, similar lengths
    together (chunk k samples with seed + k). Same arguments and seed, same output."""
    from t5x_lite.checkpoints import open_for_inference

    check_generation_args(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, num_beams=args.num_beams, length_penalty=args.length_penalty, cli=True)
    records = _prompt_records(args)
    texts = shown = [r.get(args.field, "") for r in records]
    t0 = time.time()
    cfg, params, tokenizer, step = open_for_inference(args.workdir, step=args.step)
    if args.chat:  # the model's own conversation format, its turn to speak
        from t5x_lite.data import chat

        if not cfg.data.chat_template:
            raise ConfigError(f"--chat needs a chat template: {args.workdir}'s data.chat_template is unset "
                              "(import-hf keeps a model's; or set it to a chat_template.json)")
        template, talk = chat.load(cfg.data.chat_template), cfg.data.messages_field
        for i, r in enumerate(records):
            if not isinstance(r.get(talk), list) and not isinstance(r.get(args.field), str):
                raise ConfigError(f"prompt {i + 1} has neither a conversation {talk!r} nor a text field {args.field!r}")
        texts = [chat.prompt_text(template, r.get(talk) or [{"role": "user", "content": r[args.field]}])
                 for r in records]
    family = cfg.model.family
    if family == "encoder" and args.num_beams > 1:
        raise ConfigError(f"--num-beams={args.num_beams}: the encoder family fills masks, it does not search "
                          "beams; drop --num-beams (use --top-k for the number of candidates)")
    rows = [text_prompt_ids(cfg, tokenizer, p) for p in texts]
    stops = cli_stop_ids(args.workdir, tokenizer)
    if family == "encoder":
        if tokenizer.mask_id is None:
            raise ConfigError(f"the tokenizer of {args.workdir} has no {MASK_TOKEN} token to fill")
        missing = [p for p, r in zip(shown, rows) if tokenizer.mask_id not in r]
        if missing:
            raise ConfigError(f"an encoder model fills {MASK_TOKEN} tokens, and these prompts hold none: {missing[:5]}")
    else:
        _check_rows(cfg, [np.asarray(r) for r in rows], args.max_new_tokens, cli=True)
    print(f"decoding {len(rows)} prompt(s) with the {family} model of {args.workdir}{step_text(step)} "
          f"(loaded in {time.time() - t0:.1f}s)", file=sys.stderr)
    t0 = time.time()
    order = np.argsort([len(r) for r in rows], kind="stable")  # similar lengths share a chunk (and its padding)
    outputs: list = [None] * len(rows)
    for k, start in enumerate(range(0, len(rows), args.batch_size)):
        chunk = order[start:start + args.batch_size].tolist()
        if family == "encoder":
            fills = fill_mask(cfg, params, [rows[i] for i in chunk], args.top_k or 5, mask_id=tokenizer.mask_id)
            for i, row in zip(chunk, fills):
                outputs[i] = fill_candidates(tokenizer, row)
        else:
            tokens = generate(cfg, params, [rows[i] for i in chunk], args.max_new_tokens, args.temperature,
                              args.top_k, args.top_p, args.num_beams, args.seed + k,
                              length_penalty=args.length_penalty, eos_id=stops, start_id=tokenizer.bos_id)
            for i, row in zip(chunk, tokens):
                outputs[i] = tokenizer.decode(row)
        if len(rows) > args.batch_size:
            done = min(start + args.batch_size, len(rows))
            print(f"decoded {done}/{len(rows)} prompts ({done / (time.time() - t0):.1f}/s, compiles included)",
                  file=sys.stderr)
    print(f"decoded {len(rows)} prompt(s) in {time.time() - t0:.1f}s (compile included)", file=sys.stderr)
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for record, out in zip(records, outputs):
                f.write(json.dumps(dict(record, output=out), ensure_ascii=False) + "\n")
        os.replace(tmp, args.output)
        print(f"wrote {len(records)} records to {args.output}", file=sys.stderr)
        return 0
    for text, out in zip(shown, outputs):
        print(f">>> {text}")
        if family != "encoder":
            print(out)
            continue
        for j, fill in enumerate(out):
            cands = "  ".join(f"{c['token']!r} {c['prob']:.3f}" for c in fill["candidates"])
            print(f"{MASK_TOKEN} {j + 1} (token {fill['position']}): {cands}")
    return 0
