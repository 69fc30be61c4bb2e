"""Hugging Face interop: import and export the weights of BERT / RoBERTa, GPT-2, LLaMA / Mistral
and T5 (v1.0, v1.1, Flan-T5).

``load(path)`` reads a model directory (``config.json`` + safetensors, one file or shards with an
index) into ``(Config, params)``; ``save(cfg, params, path)`` writes ``config.json`` +
``model.safetensors`` that ``transformers`` loads with ``from_pretrained``.

Every architecture is one table of ``Map`` rows: some HF tensors <-> some of our arrays, and the
``Layout`` that converts between them (HF ``Linear`` weights are ``[out, in]``; our kernels are
``[in..., out...]`` with heads split out, e.g. query ``[D, N, H]``, attention out ``[N, H, D]``).
The same table serves both directions and, run on shapes alone (``jax.eval_shape``), checks a
checkpoint against its config from the file headers before any tensor is read.

Folded on import: BERT's token-type embedding (type 0) into the position table, RoBERTa's
position offset (``padding_idx + 1`` rows) sliced off, a scaled untied T5 head's
``d_model ** -0.5`` into the head kernel. Dropped: BERT's pooler, buffers such as
``position_ids``. Export writes zero token-type embeddings and zero offset rows back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import lora
from t5x_lite.models.moe import ROUTER_BIAS
from t5x_lite.config import Config, ModelConfig, config_from_dict, parse_override
from t5x_lite.interop.tensors import InteropError, TensorFiles, _some, write

HEAD_PREFIXES = ("cls.", "lm_head.")  # heads' tensors sit beside the base model, never under its prefix
HF_CONFIG_FILE = "hf_config.json"  # the imported config.json, kept in the work dir for export
HF_FILES_DIR = "hf_files"  # the imported tokenizer / generation files, copied back on export
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "tokenizer.model", "added_tokens.json",
                   "generation_config.json")


# ----------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a layout needs besides the arrays: our model config and the HF config dict."""

    cfg: ModelConfig
    hf: dict


@dataclasses.dataclass(frozen=True)
class Layout:
    """``to_ours(hf_arrays, ctx) -> our arrays`` and its inverse ``to_hf``; tuples both ways.
    ``to_ours`` sees numpy arrays; ``to_hf`` must also trace (shape checks run it abstractly)."""

    to_ours: Callable[[tuple, Ctx], tuple]
    to_hf: Callable[[tuple, Ctx], tuple]


def _one(to_ours, to_hf) -> Layout:
    return Layout(lambda xs, c: (to_ours(xs[0], c),), lambda xs, c: (to_hf(xs[0], c),))


def _heads_in(heads: Callable[[ModelConfig], int]) -> Layout:
    """HF Linear ``[heads*H, D]`` <-> ours ``[D, heads, H]``."""
    return _one(lambda x, c: x.T.reshape(x.shape[1], heads(c.cfg), c.cfg.dim_per_head),
                lambda x, c: x.reshape(x.shape[0], -1).T)


def _head_bias(heads: Callable[[ModelConfig], int]) -> Layout:
    return _one(lambda x, c: x.reshape(heads(c.cfg), c.cfg.dim_per_head), lambda x, c: x.reshape(-1))


def _fused_qkv(xs, c):
    """GPT-2's ``c_attn`` ``[..., 3 * D]`` -> query, key, value ``[..., N, H]``."""
    x, d = xs[0], xs[0].shape[-1] // 3
    return tuple(x[..., i * d:(i + 1) * d].reshape(*x.shape[:-1], c.cfg.num_heads, c.cfg.dim_per_head)
                 for i in range(3))


def _split_rows(sizes: Callable[[ModelConfig], list], shapes: Callable[[ModelConfig], list]) -> Layout:
    """One HF Linear ``[sum(sizes), D]`` (Phi-3's fused ``qkv_proj`` / ``gate_up_proj``) <-> our
    kernels ``[D, *shape]``, one per block of rows."""
    def to_ours(xs, c):
        cuts = np.cumsum(sizes(c.cfg))[:-1]
        return tuple(part.T.reshape(part.shape[1], *shape)
                     for part, shape in zip(jnp.split(xs[0], cuts, axis=0), shapes(c.cfg)))

    return Layout(to_ours, lambda xs, c: (jnp.concatenate([x.reshape(x.shape[0], -1).T for x in xs], axis=0),))


PHI_QKV = _split_rows(lambda m: [m.num_heads * m.dim_per_head] + [m.kv_heads * m.dim_per_head] * 2,
                      lambda m: [(m.num_heads, m.dim_per_head)] + [(m.kv_heads, m.dim_per_head)] * 2)
PHI_GATE_UP = _split_rows(lambda m: [m.d_ff, m.d_ff], lambda m: [(m.d_ff,), (m.d_ff,)])


def _position_offset(c: Ctx) -> int:
    """RoBERTa numbers positions from ``padding_idx + 1``; BERT from 0."""
    return c.hf.get("pad_token_id", 1) + 1 if c.hf.get("model_type") == "roberta" else 0


def _bert_positions_to_ours(xs, c):
    positions, types = xs
    return (positions[_position_offset(c):] + types[0],)


def _bert_positions_to_hf(xs, c):
    table = xs[0]
    offset = jnp.zeros((_position_offset(c), table.shape[1]), table.dtype)
    types = jnp.zeros((c.hf.get("type_vocab_size", 2), table.shape[1]), table.dtype)
    return jnp.concatenate([offset, table]), types


SAME = _one(lambda x, c: x, lambda x, c: x)
LINEAR = _one(lambda x, c: x.T, lambda x, c: x.T)
Q, KV = _heads_in(lambda m: m.num_heads), _heads_in(lambda m: m.kv_heads)
Q_BIAS, KV_BIAS = _head_bias(lambda m: m.num_heads), _head_bias(lambda m: m.kv_heads)
OUT = _one(lambda x, c: x.T.reshape(c.cfg.num_heads, c.cfg.dim_per_head, x.shape[0]),
           lambda x, c: x.reshape(-1, x.shape[-1]).T)
CONV_OUT = _one(lambda x, c: x.reshape(c.cfg.num_heads, c.cfg.dim_per_head, x.shape[-1]),
                lambda x, c: x.reshape(-1, x.shape[-1]))
CONV_QKV = Layout(_fused_qkv, lambda xs, c: (jnp.concatenate([x.reshape(*x.shape[:-2], -1) for x in xs], -1),))
BERT_POSITIONS = Layout(_bert_positions_to_ours, _bert_positions_to_hf)
ONE_PLUS = _one(lambda x, c: x + 1.0, lambda x, c: x - 1.0)  # Gemma's norms scale by 1 + weight
# OLMo's q / k norms over all heads: HF ``[heads * head_dim]`` <-> our scale ``[heads, head_dim]``
HEADS_NORM = _one(lambda x, c: x.reshape(-1, c.cfg.dim_per_head), lambda x, c: x.reshape(-1))
SCALED_HEAD = _one(lambda x, c: x.T * c.cfg.d_model ** -0.5, lambda x, c: x.T / c.cfg.d_model ** -0.5)


@dataclasses.dataclass(frozen=True)
class Map:
    """HF tensors ``hf`` <-> our arrays ``ours`` (``/`` paths). With ``layers=n`` the row repeats
    for layer ``i`` in ``range(n)``: ``{i}`` in HF names, ``{layer}`` in our paths (``layers``,
    stacked on a leading axis when scanned, else ``layers_{i}``)."""

    hf: tuple
    ours: tuple
    layout: Layout = SAME
    layers: int = 0


def _map(hf, ours, layout=SAME, layers=0) -> Map:
    as_tuple = lambda v: (v,) if isinstance(v, str) else tuple(v)
    return Map(as_tuple(hf), as_tuple(ours), layout, layers)


def _attention_maps(hf: str, ours: str, names: tuple, layers: int, bias: bool,
                    qkv_bias: Optional[bool] = None) -> list[Map]:
    """q / k / v / out Linear rows of one attention block; ``names`` are HF's four module names.
    ``qkv_bias``: biases on q / k / v (default: ``bias``, which also sets the out projection's)."""
    q, k, v, o = names
    rows = [_map(f"{hf}.{q}.weight", f"{ours}/query/kernel", Q, layers),
            _map(f"{hf}.{k}.weight", f"{ours}/key/kernel", KV, layers),
            _map(f"{hf}.{v}.weight", f"{ours}/value/kernel", KV, layers),
            _map(f"{hf}.{o}.weight", f"{ours}/out/kernel", OUT, layers)]
    if bias if qkv_bias is None else qkv_bias:
        rows += [_map(f"{hf}.{q}.bias", f"{ours}/query/bias", Q_BIAS, layers),
                 _map(f"{hf}.{k}.bias", f"{ours}/key/bias", KV_BIAS, layers),
                 _map(f"{hf}.{v}.bias", f"{ours}/value/bias", KV_BIAS, layers)]
    if bias:
        rows.append(_map(f"{hf}.{o}.bias", f"{ours}/out/bias", SAME, layers))
    return rows


def _linear_maps(hf: str, ours: str, layers: int, bias: bool, layout: Layout = LINEAR) -> list[Map]:
    rows = [_map(f"{hf}.weight", f"{ours}/kernel", layout, layers)]
    return rows + [_map(f"{hf}.bias", f"{ours}/bias", SAME, layers)] if bias else rows


def _norm_maps(hf: str, ours: str, layers: int = 0, bias: bool = True, layout: Layout = SAME) -> list[Map]:
    rows = [_map(f"{hf}.weight", f"{ours}/scale", layout, layers)]
    return rows + [_map(f"{hf}.bias", f"{ours}/bias", SAME, layers)] if bias else rows


# ------------------------------------------------------------------ architectures

_GELU_ACTS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}


def _plain_mlp(act: str) -> dict:
    """Our ``mlp`` / ``gelu_approximate`` for a HF activation name of a plain (ungated) MLP."""
    if act in _GELU_ACTS:
        return {"mlp": "gelu", "gelu_approximate": _GELU_ACTS[act]}
    if act == "relu":
        return {"mlp": "relu"}
    raise InteropError(f"activation {act!r} is not supported; supported: {sorted(_GELU_ACTS) + ['relu']}")


def _hf_act(cfg: ModelConfig) -> str:
    if cfg.mlp in ("relu",):
        return "relu"
    if cfg.mlp in ("swiglu",):
        return "silu"
    return "gelu_new" if cfg.gelu_approximate else "gelu"


# model features most architectures cannot express: name -> (used by a config, what to say)
_EXTRAS = {
    "qk_norm": (lambda m: m.qk_norm, "model.qk_norm=True (a norm on each head's q and k: Qwen3's, Gemma 3's)"),
    "embed_scale": (lambda m: m.embed_scale, "model.embed_scale=True (embeddings times sqrt(d_model): Gemma's)"),
    "window_pattern": (lambda m: bool(m.sliding_window_pattern),
                       "model.sliding_window_pattern (local and global layers: Gemma 2 / 3)"),
    "local_rope": (lambda m: m.rope_local_theta not in (None, m.rope_theta),
                   "model.rope_local_theta (a RoPE base of the windowed layers' own: Gemma 3)"),
    "attention_scale_dim": (lambda m: m.attention_scale_dim not in (None, m.dim_per_head),
                            "model.attention_scale_dim (scores scaled by other than 1 / sqrt(head_dim): Gemma's)"),
    "softcap": (lambda m: bool(m.attn_logit_softcap or m.final_logit_softcap),
                "model.attn_logit_softcap / final_logit_softcap (soft-capped scores and logits: Gemma 2's)"),
    "experts": (lambda m: m.num_experts > 0, "model.num_experts (a mixture of experts: Mixtral's, Qwen3-MoE's)"),
    "shared_expert": (lambda m: bool(m.shared_expert_d_ff),
                      "model.shared_expert_d_ff (an always-on expert beside the routed ones: Qwen2-MoE's)"),
}


class Arch:
    """One HF architecture: its config translation both ways and its tensor table."""

    model_types: tuple = ()
    prefix = ""  # name prefix of the base model's tensors inside a model-with-head checkpoint
    # config.json keys of our dropout rates (model.dropout: after embeddings and sublayers;
    # model.attention_dropout: on attention probabilities); import reads the first, export writes all
    dropout_keys: dict = {}
    requires: dict = {}  # our model fields that this architecture fixes
    window_types: tuple = ()  # model_types that can express model.sliding_window
    extras: frozenset = frozenset()  # the optional _EXTRAS this architecture expresses

    def model_fields(self, hf: dict, names: set) -> dict:
        raise NotImplementedError

    def hf_config(self, cfg: ModelConfig, base: dict) -> dict:
        raise NotImplementedError

    def maps(self, cfg: ModelConfig) -> list[Map]:
        raise NotImplementedError

    def has_prefix(self, cfg: ModelConfig) -> bool:
        """Whether the exported checkpoint names the base model's tensors with ``prefix``."""
        return bool(self.prefix)

    def check_exportable(self, cfg: ModelConfig, name: str) -> None:
        wrong = [f"model.{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in self.requires.items()
                 if getattr(cfg, k) != v]
        if cfg.qk_norm and cfg.qk_norm_scope != self.requires.get("qk_norm_scope", "head"):
            wrong.append(f"model.qk_norm_scope={cfg.qk_norm_scope!r} (needs {self.requires.get('qk_norm_scope', 'head')!r})")
        if cfg.qkv_bias not in (None, cfg.use_bias) and "qkv_bias" not in self.requires:
            wrong.append(f"model.qkv_bias={cfg.qkv_bias} with use_bias={cfg.use_bias} (biases on q / k / v alone: "
                         "Qwen2's layout)")
        if cfg.sliding_window and name not in self.window_types:
            wrong.append(f"model.sliding_window={cfg.sliding_window} (sliding-window attention: "
                         f"{', '.join(self.window_types) or 'not'} in this family)")
        for flag, (used, what) in _EXTRAS.items():
            if used(cfg) and flag not in self.requires and flag not in self.extras:
                wrong.append(what)
        wrong += self.extra_problems(cfg)
        if wrong:
            raise InteropError(f"this model cannot be written as a Hugging Face {name}: " + "; ".join(wrong))

    def extra_problems(self, cfg: ModelConfig) -> list[str]:
        return []


def _plain_mha_problems(cfg) -> list:
    """What BERT and GPT-2 cannot express: gated MLPs, GQA, a head dim other than d_model / heads."""
    out = []
    if cfg.mlp not in ("gelu", "relu"):
        out.append(f"model.mlp={cfg.mlp!r} (needs 'gelu' or 'relu')")
    if cfg.dim_per_head * cfg.num_heads != cfg.d_model or cfg.kv_heads != cfg.num_heads:
        out.append("model.head_dim / model.num_kv_heads (needs head_dim * num_heads == d_model, no GQA)")
    return out


def _has_logits_bias(cfg: ModelConfig) -> bool:
    return cfg.use_bias if cfg.logits_bias is None else cfg.logits_bias


class Bert(Arch):
    """BERT (post-LN, learned positions, embedding LayerNorm), with or without the MLM head."""

    model_types = ("bert",)
    prefix = "bert."
    dropout_keys = {"dropout": ("hidden_dropout_prob",), "attention_dropout": ("attention_probs_dropout_prob",)}
    head = "cls.predictions"  # MLM head module
    head_names = ("transform.dense", "transform.LayerNorm", "bias", "decoder.weight")
    class_prefix = "Bert"  # of the transformers class names
    requires = dict(family="encoder", norm="layernorm", norm_position="post", embed_norm=True,
                    position="learned", use_bias=True, scale_attention=True)

    def _head(self, part: int) -> str:
        return f"{self.head}.{self.head_names[part]}"

    def model_fields(self, hf, names):
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise InteropError(f"position_embedding_type={hf['position_embedding_type']!r} is not supported "
                               "(only 'absolute')")
        has_head = f"{self._head(0)}.weight" in names
        tied = hf.get("tie_word_embeddings", True) or self._head(3) not in names
        return dict(family="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                    num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                    d_ff=hf["intermediate_size"], **_plain_mlp(hf.get("hidden_act", "gelu")),
                    norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12), norm_position="post",
                    embed_norm=True, position="learned",
                    max_length=hf.get("max_position_embeddings", 512) - _position_offset(Ctx(None, hf)),
                    use_bias=True, logits_bias=has_head, mlm_head_transform=has_head,
                    tie_embeddings=tied or not has_head, scale_attention=True)

    def hf_config(self, cfg, base):
        offset = _position_offset(Ctx(cfg, base))
        arch = "ForMaskedLM" if cfg.mlm_head_transform else "Model"
        return dict(architectures=[f"{self.class_prefix}{arch}"], vocab_size=cfg.vocab_size,
                    hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff, hidden_act=_hf_act(cfg),
                    layer_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_length + offset,
                    type_vocab_size=base.get("type_vocab_size", 2), position_embedding_type="absolute",
                    tie_word_embeddings=cfg.tie_embeddings, pad_token_id=base.get("pad_token_id", 0))

    def has_prefix(self, cfg):
        return cfg.mlm_head_transform

    def extra_problems(self, cfg):
        out = _plain_mha_problems(cfg)
        if cfg.mlm_head_transform and not _has_logits_bias(cfg):
            out.append("model.logits_bias=False (the MLM head has a bias)")
        if not cfg.mlm_head_transform and not cfg.tie_embeddings:
            out.append("an untied output layer without model.mlm_head_transform")
        return out

    def maps(self, cfg):
        n, e, lay = cfg.num_layers, "encoder", "encoder/stack/{layer}"
        rows = [_map("embeddings.word_embeddings.weight", "token_embed/embedding"),
                _map(("embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight"),
                     f"{e}/pos_embed/embedding", BERT_POSITIONS),
                *_norm_maps("embeddings.LayerNorm", f"{e}/embed_norm")]
        layer = "encoder.layer.{i}"
        rows += _attention_maps(f"{layer}.attention", f"{lay}/self_attention",
                                ("self.query", "self.key", "self.value", "output.dense"), n, bias=True)
        rows += _norm_maps(f"{layer}.attention.output.LayerNorm", f"{lay}/self_attention_norm", n)
        rows += _linear_maps(f"{layer}.intermediate.dense", f"{lay}/mlp/wi", n, bias=True)
        rows += _linear_maps(f"{layer}.output.dense", f"{lay}/mlp/wo", n, bias=True)
        rows += _norm_maps(f"{layer}.output.LayerNorm", f"{lay}/mlp_norm", n)
        if cfg.mlm_head_transform:
            rows += _linear_maps(self._head(0), "head/transform", 0, bias=True)
            rows += _norm_maps(self._head(1), "head/transform_norm")
        if _has_logits_bias(cfg):
            rows.append(_map(self._head(2), "head/logits_bias"))
        if not cfg.tie_embeddings:
            rows.append(_map(self._head(3), "head/lm_head/kernel", LINEAR))
        return rows


class Roberta(Bert):
    """RoBERTa: BERT's layers, positions numbered from ``padding_idx + 1``, head ``lm_head``."""

    model_types = ("roberta",)
    prefix = "roberta."
    head = "lm_head"
    head_names = ("dense", "layer_norm", "bias", "decoder.weight")
    class_prefix = "Roberta"


class Gpt2(Arch):
    """GPT-2: pre-LN, learned positions, fused Conv1D q/k/v, tied output layer without bias."""

    model_types = ("gpt2",)
    prefix = "transformer."
    dropout_keys = {"dropout": ("resid_pdrop", "embd_pdrop"), "attention_dropout": ("attn_pdrop",)}
    requires = dict(family="decoder", norm="layernorm", norm_position="pre", embed_norm=False,
                    position="learned", use_bias=True, tie_embeddings=True, mlm_head_transform=False)

    def model_fields(self, hf, names):
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise InteropError("GPT-2 with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn is not "
                               "supported")
        d = hf["n_embd"]
        return dict(family="decoder", vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"],
                    num_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
                    **_plain_mlp(hf.get("activation_function", "gelu_new")), norm="layernorm",
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_position="pre", position="learned",
                    max_length=hf.get("n_positions", 1024), use_bias=True, logits_bias=False,
                    tie_embeddings=True, scale_attention=hf.get("scale_attn_weights", True))

    def hf_config(self, cfg, base):
        return dict(architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size, n_embd=cfg.d_model,
                    n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
                    activation_function=_hf_act(cfg), layer_norm_epsilon=cfg.norm_eps, n_positions=cfg.max_length,
                    scale_attn_weights=cfg.scale_attention, tie_word_embeddings=True)

    def extra_problems(self, cfg):
        out = _plain_mha_problems(cfg)
        if _has_logits_bias(cfg):
            out.append("a logits bias (set model.logits_bias=false)")
        return out

    def maps(self, cfg):
        n, lay = cfg.num_layers, "decoder/stack/{layer}"
        att = f"{lay}/self_attention"
        return [
            _map("wte.weight", "token_embed/embedding"),
            _map("wpe.weight", "decoder/pos_embed/embedding"),
            *_norm_maps("h.{i}.ln_1", f"{lay}/self_attention_norm", n),
            _map("h.{i}.attn.c_attn.weight", (f"{att}/query/kernel", f"{att}/key/kernel", f"{att}/value/kernel"),
                 CONV_QKV, n),
            _map("h.{i}.attn.c_attn.bias", (f"{att}/query/bias", f"{att}/key/bias", f"{att}/value/bias"),
                 CONV_QKV, n),
            *_linear_maps("h.{i}.attn.c_proj", f"{att}/out", n, bias=True, layout=CONV_OUT),
            *_norm_maps("h.{i}.ln_2", f"{lay}/mlp_norm", n),
            *_linear_maps("h.{i}.mlp.c_fc", f"{lay}/mlp/wi", n, bias=True, layout=SAME),
            *_linear_maps("h.{i}.mlp.c_proj", f"{lay}/mlp/wo", n, bias=True, layout=SAME),
            *_norm_maps("ln_f", "decoder/final_norm"),
        ]


_LLAMA3_KEYS = {"rope_low_freq_factor": "low_freq_factor", "rope_high_freq_factor": "high_freq_factor",
                "rope_original_length": "original_max_position_embeddings"}


def _rope(hf: dict) -> dict:
    """Our RoPE fields from transformers 5 ``rope_parameters`` or 4.x ``rope_theta`` / ``rope_scaling``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    fields = {"rope_theta": params.get("rope_theta", hf.get("rope_theta", 10000.0))}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return fields
    if kind in ("linear", "llama3"):
        fields.update(rope_scaling=float(scaling["factor"]), rope_scaling_type=kind)
        if kind == "llama3":
            fields.update({ours: scaling[theirs] for ours, theirs in _LLAMA3_KEYS.items()})
        return fields
    raise InteropError(f"RoPE scaling {kind!r} is not supported; supported: 'default', 'linear', 'llama3'")


def _hf_rope(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling == 1.0 and cfg.rope_scaling_type == "linear":
        return {"rope_type": "default"}
    out = {"rope_type": cfg.rope_scaling_type, "factor": cfg.rope_scaling}
    if cfg.rope_scaling_type == "llama3":
        out.update({theirs: getattr(cfg, ours) for ours, theirs in _LLAMA3_KEYS.items()})
    return out


class Llama(Arch):
    """LLaMA / Mistral: RMSNorm, RoPE ("rotate half"), SwiGLU, GQA, tied or untied head."""

    model_types = ("llama", "mistral")
    window_types = ("mistral",)
    prefix = "model."
    dropout_keys = {"attention_dropout": ("attention_dropout",)}
    requires = dict(family="decoder", norm="rmsnorm", norm_position="pre", embed_norm=False, position="rope",
                    scale_attention=True, mlm_head_transform=False)

    def model_fields(self, hf, names):
        bias = hf.get("attention_bias", False)
        if bool(hf.get("mlp_bias", False)) != bool(bias):
            raise InteropError(f"attention_bias={bias} with mlp_bias={hf.get('mlp_bias')} is not supported "
                               "(biases in both or in neither)")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new"):
            raise InteropError(f"hidden_act={act!r} is not supported; supported: silu, gelu, gelu_pytorch_tanh")
        heads = hf["num_attention_heads"]
        max_length = hf.get("max_position_embeddings", 2048)
        window, kinds = hf.get("sliding_window") or 0, hf.get("layer_types")
        sliding = [kind == "sliding_attention" for kind in kinds] if kinds else [True]  # Mistral: every layer
        if window and not all(sliding):
            if any(sliding):  # some layers windowed, some not: exact up to the window, the model's length
                max_length = min(max_length, window)
            window = 0
        return dict(family="decoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                    num_layers=hf["num_hidden_layers"], num_heads=heads,
                    num_kv_heads=hf.get("num_key_value_heads") or heads,
                    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, d_ff=hf["intermediate_size"],
                    mlp="swiglu" if act == "silu" else "geglu", gelu_approximate=act != "gelu",
                    norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), norm_position="pre", position="rope",
                    **_rope(hf), max_length=max_length, sliding_window=window, use_bias=bias,
                    logits_bias=False, tie_embeddings=hf.get("tie_word_embeddings", False))

    def hf_config(self, cfg, base):
        model_type = base.get("model_type", "llama")
        rope = _hf_rope(cfg)
        out = dict(architectures=[f"{model_type.capitalize()}ForCausalLM"], vocab_size=cfg.vocab_size,
                   hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                   num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head, intermediate_size=cfg.d_ff,
                   hidden_act=_hf_act(cfg), rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_length,
                   rope_theta=cfg.rope_theta, rope_scaling=None if rope["rope_type"] == "default" else rope,
                   rope_parameters=dict(rope, rope_theta=cfg.rope_theta), attention_bias=cfg.use_bias,
                   mlp_bias=cfg.use_bias, tie_word_embeddings=cfg.tie_embeddings)
        if model_type == "mistral":
            out["sliding_window"] = cfg.sliding_window or None
        return out

    def extra_problems(self, cfg):
        out = []
        if not cfg.gated_mlp:
            out.append(f"model.mlp={cfg.mlp!r} (needs 'swiglu' or 'geglu')")
        if _has_logits_bias(cfg):
            out.append("a logits bias (set model.logits_bias=false)")
        return out

    norm_layout = SAME

    def post_attention_norm(self) -> str:
        """Our norm that HF's ``post_attention_layernorm`` is: the MLP's input norm (LLaMA)."""
        return "mlp_norm"

    def maps(self, cfg):
        n, lay, norm = cfg.num_layers, "decoder/stack/{layer}", self.norm_layout
        rows = [_map("embed_tokens.weight", "token_embed/embedding"),
                *_norm_maps("layers.{i}.input_layernorm", f"{lay}/self_attention_norm", n, bias=False, layout=norm),
                *_attention_maps("layers.{i}.self_attn", f"{lay}/self_attention",
                                 ("q_proj", "k_proj", "v_proj", "o_proj"), n, cfg.use_bias, cfg.qkv_bias),
                *_norm_maps("layers.{i}.post_attention_layernorm", f"{lay}/{self.post_attention_norm()}", n, bias=False,
                            layout=norm),
                *_linear_maps("layers.{i}.mlp.gate_proj", f"{lay}/mlp/wi_0", n, cfg.use_bias),
                *_linear_maps("layers.{i}.mlp.up_proj", f"{lay}/mlp/wi_1", n, cfg.use_bias),
                *_linear_maps("layers.{i}.mlp.down_proj", f"{lay}/mlp/wo", n, cfg.use_bias),
                *_norm_maps("norm", "decoder/final_norm", bias=False, layout=norm)]
        if not cfg.tie_embeddings:
            rows.append(_map("lm_head.weight", "head/lm_head/kernel", LINEAR))
        return rows


def _qwen_window(hf: dict) -> dict:
    """Qwen's sliding window and its layers: only with use_sliding_window (many configs name a
    window they never use), the layers from max_window_layers on unless layer_types says."""
    if not hf.get("use_sliding_window"):
        return dict(hf, sliding_window=None)
    first = hf.get("max_window_layers", 28)
    kinds = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                      for i in range(hf["num_hidden_layers"])]
    return dict(hf, layer_types=kinds)


def _hf_qwen_window(cfg: ModelConfig) -> dict:
    if not cfg.sliding_window:
        return dict(use_sliding_window=False)
    return dict(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=0,
                layer_types=["sliding_attention"] * cfg.num_layers)


class Qwen2(Llama):
    """Qwen2 / Qwen2.5: LLaMA's layers with biases on q / k / v only."""

    model_types = window_types = ("qwen2",)
    requires = dict(Llama.requires, use_bias=False, qkv_bias=True)

    def model_fields(self, hf, names):
        hf = dict(_qwen_window(hf), attention_bias=False, mlp_bias=False)
        return dict(super().model_fields(hf, names), qkv_bias=True)

    def hf_config(self, cfg, base):
        out = super().hf_config(cfg, base)
        for key in ("attention_bias", "mlp_bias"):
            out.pop(key)
        return dict(out, **_hf_qwen_window(cfg))


class Qwen3(Llama):
    """Qwen3: LLaMA's layers with an RMSNorm over each head's q and k (``q_norm`` / ``k_norm``)."""

    model_types = window_types = ("qwen3",)
    requires = dict(Llama.requires, use_bias=False, qk_norm=True)

    def model_fields(self, hf, names):
        if hf.get("attention_bias"):
            raise InteropError("attention_bias=True is not supported for qwen3 (biases on attention but not the MLP)")
        hf = dict(_qwen_window(hf), mlp_bias=False)
        return dict(super().model_fields(hf, names), qk_norm=True)

    def hf_config(self, cfg, base):
        out = super().hf_config(cfg, base)
        out.pop("mlp_bias")
        return dict(out, **_hf_qwen_window(cfg))

    def maps(self, cfg):
        lay = "decoder/stack/{layer}/self_attention"
        return super().maps(cfg) + [
            *_norm_maps("layers.{i}.self_attn.q_norm", f"{lay}/query_norm", cfg.num_layers, bias=False),
            *_norm_maps("layers.{i}.self_attn.k_norm", f"{lay}/key_norm", cfg.num_layers, bias=False)]


# Every expert's HF Linear ``[out, in]`` <-> our stacked ``[E, in, out]`` (router: a plain Linear)
EXPERTS = Layout(lambda xs, c: (np.stack([x.T for x in xs]),),
                 lambda xs, c: tuple(xs[0][e].T for e in range(xs[0].shape[0])))


class Experts:
    """A mixture-of-experts variant of a dense architecture (listed first among the bases): its
    MLP rows replaced by the router (``router``, a Linear) and the experts' gate / up / down
    projections (``expert``: HF's name of expert ``e``'s module, with ``{e}``; ``names``: its
    three Linears), each stacked over experts. A model without experts is refused by name."""

    router: str = ""
    expert: str = ""
    names: tuple = ()
    dense: str = ""  # the architecture a model without experts exports as
    count_key, width_key = "num_experts", "moe_intermediate_size"  # config.json's expert count and width
    renormalize_key: Optional[str] = "norm_topk_prob"  # None: the top-k weights always renormalised
    dense_layer_keys = True  # the config can name dense layers among the sparse ones (Qwen's)

    def moe_fields(self, hf: dict) -> dict:
        """Our mixture-of-experts fields; the load-balancing loss's weight only where the config
        trains with it (``output_router_logits``)."""
        if self.dense_layer_keys and (hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1):
            raise InteropError(f"mlp_only_layers={hf.get('mlp_only_layers')} / decoder_sparse_step="
                               f"{hf.get('decoder_sparse_step')}: dense layers among the experts' are not supported")
        count = hf.get(self.count_key, hf.get("num_local_experts"))  # transformers 5 writes Qwen3-MoE's so
        if count is None:
            raise KeyError(self.count_key)
        aux = float(hf.get("router_aux_loss_coef") or 0.0) if hf.get("output_router_logits") else 0.0
        return dict(num_experts=count, experts_per_token=hf["num_experts_per_tok"], expert_d_ff=hf[self.width_key],
                    router_renormalize=bool(hf.get(self.renormalize_key)) if self.renormalize_key else True,
                    router_aux_loss=aux)

    def moe_config(self, cfg: ModelConfig, base: dict) -> dict:
        out = {self.count_key: cfg.num_experts, self.width_key: cfg.expert_width,
               "num_experts_per_tok": cfg.experts_per_token, "output_router_logits": bool(cfg.router_aux_loss),
               "router_aux_loss_coef": cfg.router_aux_loss or base.get("router_aux_loss_coef", 0.001)}
        if self.renormalize_key:
            out[self.renormalize_key] = cfg.router_renormalize
        if self.dense_layer_keys:
            out.update(decoder_sparse_step=1, mlp_only_layers=[])
        return out

    def extra_problems(self, cfg):
        missing = [] if cfg.num_experts else [f"model.num_experts=0 (its MLPs are experts: set it, or export as "
                                              f"{self.dense})"]
        return super().extra_problems(cfg) + missing

    def maps(self, cfg):
        n, lay = cfg.num_layers, "decoder/stack/{layer}/mlp"
        rows = [m for m in super().maps(cfg) if "/mlp/" not in m.ours[0]]
        rows.append(_map(f"layers.{{i}}.{self.router}.weight", f"{lay}/router/kernel", LINEAR, n))
        for hf_name, ours in zip(self.names, ("wi_0", "wi_1", "wo")):
            tensors = [f"layers.{{i}}.{self.expert.format(e=e)}.{hf_name}.weight" for e in range(cfg.num_experts)]
            rows.append(_map(tensors, f"{lay}/{ours}/kernel", EXPERTS, n))
        return rows


class Qwen2Moe(Experts, Qwen2):
    """Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (biases on q / k / v), every
    MLP a mixture of SwiGLU experts plus a shared expert (``mlp.shared_expert``) gated per token
    by a sigmoid (``mlp.shared_expert_gate``). Dense layers among them are refused."""

    model_types = window_types = ("qwen2_moe",)
    requires = dict(Qwen2.requires, shared_expert_gate=True)
    extras = frozenset({"experts", "shared_expert"})
    router, expert, names, dense = "mlp.gate", "mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj"), "qwen2"

    def model_fields(self, hf, names):
        if not hf.get("qkv_bias", True):
            raise InteropError("qkv_bias=False is not supported for qwen2_moe (Qwen2's attention has them)")
        return dict(super().model_fields(hf, names), **self.moe_fields(hf),
                    shared_expert_d_ff=hf["shared_expert_intermediate_size"], shared_expert_gate=True)

    def hf_config(self, cfg, base):
        return dict(super().hf_config(cfg, base), architectures=["Qwen2MoeForCausalLM"], qkv_bias=True,
                    shared_expert_intermediate_size=cfg.shared_expert_d_ff, **self.moe_config(cfg, base))

    def extra_problems(self, cfg):
        return super().extra_problems(cfg) + ([] if cfg.shared_expert_d_ff else [
            "model.shared_expert_d_ff=0 (Qwen2-MoE has a shared expert)"])

    def maps(self, cfg):
        n, lay = cfg.num_layers, "decoder/stack/{layer}/mlp"
        return super().maps(cfg) + [
            *[_map(f"layers.{{i}}.mlp.shared_expert.{hf_name}.weight", f"{lay}/shared_expert/{ours}/kernel", LINEAR, n)
              for hf_name, ours in zip(self.names, ("wi_0", "wi_1", "wo"))],
            _map("layers.{i}.mlp.shared_expert_gate.weight", f"{lay}/shared_expert_gate/kernel", LINEAR, n)]


def _olmo_qk_norms(cfg: ModelConfig) -> list[Map]:
    """OLMo's q / k norms over all of a token's heads (``[heads * head_dim]`` weights)."""
    lay = "decoder/stack/{layer}/self_attention"
    return [_map("layers.{i}.self_attn.q_norm.weight", f"{lay}/query_norm/scale", HEADS_NORM, cfg.num_layers),
            _map("layers.{i}.self_attn.k_norm.weight", f"{lay}/key_norm/scale", HEADS_NORM, cfg.num_layers)]


def _olmo_fields(hf: dict) -> dict:
    if hf.get("clip_qkv") is not None:
        raise InteropError(f"clip_qkv={hf['clip_qkv']} is not supported (q / k / v clamped)")
    return dict(qk_norm=True, qk_norm_scope="all_heads")


class Olmo2(Llama):
    """OLMo 2: LLaMA's layers with each sublayer's output normed before the residual add (no
    input norms: ``post_attention_layernorm``, ``post_feedforward_layernorm``) and RMSNorms over
    all of a token's q and all of its k."""

    model_types = ("olmo2",)
    window_types = ()
    requires = dict(Llama.requires, use_bias=False, norm_position="output", qk_norm=True, qk_norm_scope="all_heads")

    def model_fields(self, hf, names):
        if hf.get("attention_bias"):
            raise InteropError("attention_bias=True is not supported for olmo2")
        return dict(super().model_fields(dict(hf, mlp_bias=False), names), norm_position="output",
                    **_olmo_fields(hf))

    def hf_config(self, cfg, base):
        out = super().hf_config(cfg, base)
        out.pop("mlp_bias")
        return out

    def maps(self, cfg):
        n, lay = cfg.num_layers, "decoder/stack/{layer}"
        rows = [m for m in super().maps(cfg) if "layernorm" not in m.hf[0]]
        return rows + _olmo_qk_norms(cfg) + [
            *_norm_maps("layers.{i}.post_attention_layernorm", f"{lay}/self_attention_norm", n, bias=False),
            *_norm_maps("layers.{i}.post_feedforward_layernorm", f"{lay}/mlp_norm", n, bias=False)]


class Olmoe(Experts, Llama):
    """OLMoE: LLaMA's pre-norm layers with RMSNorms over all of a token's q and k, every MLP a
    mixture of SwiGLU experts (``mlp.gate``, ``mlp.experts.{e}``) of width ``intermediate_size``,
    the top-k weights renormalised when ``norm_topk_prob``."""

    model_types = ("olmoe",)
    window_types = ()
    requires = dict(Llama.requires, use_bias=False, mlp="swiglu", qk_norm=True, qk_norm_scope="all_heads")
    extras = frozenset({"experts"})
    router, expert, names, dense = "mlp.gate", "mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj"), "llama"
    width_key, dense_layer_keys = "intermediate_size", False

    def model_fields(self, hf, names):
        fields = super().model_fields(dict(hf, attention_bias=False, mlp_bias=False), names)
        return dict(fields, **_olmo_fields(hf), **self.moe_fields(hf))

    def hf_config(self, cfg, base):
        out = super().hf_config(cfg, base)
        for key in ("attention_bias", "mlp_bias"):
            out.pop(key)
        return dict(out, architectures=["OlmoeForCausalLM"], clip_qkv=None, **self.moe_config(cfg, base))

    def maps(self, cfg):
        return super().maps(cfg) + _olmo_qk_norms(cfg)


class Qwen3Moe(Experts, Qwen3):
    """Qwen3-MoE: Qwen3's attention, every MLP a mixture of SwiGLU experts (``mlp.gate`` the
    router, ``mlp.experts.{e}`` gate / up / down) of width ``moe_intermediate_size``, the top-k
    weights renormalised when ``norm_topk_prob``. Dense layers among them (``mlp_only_layers``,
    ``decoder_sparse_step`` > 1) are refused."""

    model_types = window_types = ("qwen3_moe",)
    extras = frozenset({"experts"})
    router, expert, names, dense = "mlp.gate", "mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj"), "qwen3"

    def model_fields(self, hf, names):
        return dict(super().model_fields(hf, names), **self.moe_fields(hf))

    def hf_config(self, cfg, base):
        return dict(super().hf_config(cfg, base), architectures=["Qwen3MoeForCausalLM"], **self.moe_config(cfg, base))


class Phi3(Llama):
    """Phi-3 / Phi-4: LLaMA's layers with q / k / v in one tensor (``qkv_proj``) and gate / up in
    another (``gate_up_proj``)."""

    model_types = window_types = ("phi3",)
    dropout_keys = {"dropout": ("resid_pdrop", "embd_pdrop"), "attention_dropout": ("attention_dropout",)}
    requires = dict(Llama.requires, use_bias=False, mlp="swiglu")

    def model_fields(self, hf, names):
        factor = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if factor != 1.0:
            raise InteropError(f"partial_rotary_factor={factor} is not supported (RoPE on part of each head)")
        return super().model_fields(dict(hf, attention_bias=False, mlp_bias=False), names)

    def hf_config(self, cfg, base):
        out = super().hf_config(cfg, base)
        for key in ("attention_bias", "mlp_bias"):
            out.pop(key)
        return dict(out, sliding_window=cfg.sliding_window or None)

    def maps(self, cfg):
        n, lay = cfg.num_layers, "decoder/stack/{layer}"
        fused = {f"{lay}/self_attention/{name}/kernel" for name in ("query", "key", "value")} | {
            f"{lay}/mlp/{name}/kernel" for name in ("wi_0", "wi_1")}
        rows = [m for m in super().maps(cfg) if not set(m.ours) & fused]
        return rows + [
            _map("layers.{i}.self_attn.qkv_proj.weight",
                 [f"{lay}/self_attention/{name}/kernel" for name in ("query", "key", "value")], PHI_QKV, n),
            _map("layers.{i}.mlp.gate_up_proj.weight", [f"{lay}/mlp/wi_0/kernel", f"{lay}/mlp/wi_1/kernel"],
                 PHI_GATE_UP, n)]


class Mixtral(Experts, Llama):
    """Mixtral: Mistral's attention, every MLP a mixture of SwiGLU experts (``block_sparse_moe``:
    a router ``gate``, experts' ``w1`` gate, ``w3`` up, ``w2`` down), the top-k weights
    renormalised. ``router_jitter_noise`` (training-time noise on the router) is not modelled."""

    model_types = window_types = ("mixtral",)
    requires = dict(Llama.requires, use_bias=False, mlp="swiglu", router_renormalize=True)
    extras = frozenset({"experts"})
    router, expert, names, dense = "block_sparse_moe.gate", "block_sparse_moe.experts.{e}", ("w1", "w3", "w2"), "llama"
    count_key, width_key, renormalize_key, dense_layer_keys = "num_local_experts", "intermediate_size", None, False

    def model_fields(self, hf, names):
        fields = super().model_fields(dict(hf, attention_bias=False, mlp_bias=False), names)
        return dict(fields, **self.moe_fields(hf))

    def hf_config(self, cfg, base):
        out = super().hf_config(cfg, base)
        for key in ("attention_bias", "mlp_bias"):
            out.pop(key)
        return dict(out, sliding_window=cfg.sliding_window or None, **self.moe_config(cfg, base))


class Gemma(Llama):
    """Gemma (1): LLaMA's tensors with a tanh-GELU gated MLP, embeddings times sqrt(d_model) and
    norms that scale by 1 + weight (our scale = 1 + their weight), the output layer tied."""

    model_types = ("gemma",)
    window_types = ()
    requires = dict(Llama.requires, use_bias=False, embed_scale=True, mlp="geglu", gelu_approximate=True)
    norm_layout = ONE_PLUS

    def model_fields(self, hf, names):
        if hf.get("attention_bias"):
            raise InteropError("attention_bias=True is not supported for gemma")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        hf = dict(hf, hidden_act="gelu_pytorch_tanh" if act == "gelu" else act, mlp_bias=False,  # as transformers
                  tie_word_embeddings=hf.get("tie_word_embeddings", True))
        return dict(super().model_fields(hf, names), embed_scale=True)

    def hf_config(self, cfg, base):
        out = super().hf_config(cfg, base)
        out.pop("mlp_bias")
        return dict(out, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh")


class Gemma2(Gemma):
    """Gemma 2: Gemma's tensors with norms before and after each sublayer (sandwich), windowed
    layers with every ``sliding_window_pattern``-th one global, scores scaled by
    ``query_pre_attn_scalar``, attention scores and output logits soft-capped."""

    model_types = window_types = ("gemma2",)
    requires = dict(Gemma.requires, norm_position="sandwich")
    extras = frozenset({"window_pattern", "attention_scale_dim", "softcap"})

    def model_fields(self, hf, names):
        if hf.get("use_bidirectional_attention"):
            raise InteropError("use_bidirectional_attention=True is not supported")
        kinds = hf.get("layer_types") or ["sliding_attention" if (i + 1) % hf.get("sliding_window_pattern", 2)
                                          else "full_attention" for i in range(hf["num_hidden_layers"])]
        fields = super().model_fields(dict(hf, layer_types=None), names)
        return dict(fields, norm_position="sandwich", sliding_window=hf.get("sliding_window") or 0,
                    sliding_window_pattern=_window_pattern(kinds),
                    attention_scale_dim=float(hf.get("query_pre_attn_scalar", fields["head_dim"])),
                    attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                    final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0))

    def hf_config(self, cfg, base):
        out = super().hf_config(cfg, base)
        p = cfg.sliding_window_pattern
        kinds = ["sliding_attention" if not p or (i + 1) % p else "full_attention" for i in range(cfg.num_layers)]
        return dict(out, architectures=[f"{type(self).__name__}ForCausalLM"], layer_types=kinds,
                    sliding_window=cfg.sliding_window or None,
                    query_pre_attn_scalar=_int_if_whole(cfg.attention_scale_dim or cfg.dim_per_head),
                    attn_logit_softcapping=cfg.attn_logit_softcap or None,
                    final_logit_softcapping=cfg.final_logit_softcap or None)

    def maps(self, cfg):
        lay, n, norm = "decoder/stack/{layer}", cfg.num_layers, self.norm_layout
        return super().maps(cfg) + [
            *_norm_maps("layers.{i}.pre_feedforward_layernorm", f"{lay}/mlp_norm", n, bias=False, layout=norm),
            *_norm_maps("layers.{i}.post_feedforward_layernorm", f"{lay}/mlp_post_norm", n, bias=False, layout=norm)]

    def post_attention_norm(self) -> str:
        return "self_attention_post_norm"


class Gemma3(Gemma2):
    """Gemma 3 (text, ``Gemma3ForCausalLM``): Gemma 2's layers with norms on each head's q and k
    and a RoPE base of their own for the windowed layers."""

    model_types = window_types = ("gemma3_text",)
    requires = dict(Gemma2.requires, qk_norm=True)
    extras = Gemma2.extras | {"local_rope"}

    def model_fields(self, hf, names):
        rope = hf.get("rope_parameters") or {}
        full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise InteropError(f"RoPE scaling {local['rope_type']!r} on the sliding-window layers is not supported")
        hf = dict(hf, rope_parameters=full or None, sliding_window_pattern=hf.get("sliding_window_pattern", 6))
        return dict(super().model_fields(hf, names), qk_norm=True,
                    rope_local_theta=float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))))

    def hf_config(self, cfg, base):
        out = super().hf_config(cfg, base)
        for key in ("rope_scaling", "rope_theta"):
            out.pop(key)
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        return dict(out, rope_parameters={"full_attention": out["rope_parameters"], "sliding_attention": local})

    def maps(self, cfg):
        lay, n, norm = "decoder/stack/{layer}/self_attention", cfg.num_layers, self.norm_layout
        return super().maps(cfg) + [
            *_norm_maps("layers.{i}.self_attn.q_norm", f"{lay}/query_norm", n, bias=False, layout=norm),
            *_norm_maps("layers.{i}.self_attn.k_norm", f"{lay}/key_norm", n, bias=False, layout=norm)]


def _int_if_whole(x: float):
    return int(x) if float(x).is_integer() else x


def _window_pattern(kinds: list) -> int:
    """``model.sliding_window_pattern`` of HF ``layer_types``: 0 if all windowed, P if every P-th is global."""
    glob = [i for i, kind in enumerate(kinds) if kind != "sliding_attention"]
    if not glob:
        return 0
    p = glob[0] + 1
    if p < 2 or glob != list(range(p - 1, len(kinds), p)):
        raise InteropError(f"layer_types {kinds} are not every P-th layer global, the rest windowed")
    return p


def _t5_scales_head(hf: dict) -> bool:
    """T5 v1.0 scales the decoder output by d_model ** -0.5 before its (tied) head; v1.1 does not.
    transformers 5 says so in ``scale_decoder_outputs``, 4.x in ``tie_word_embeddings``."""
    return hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))


_T5_FF = {"relu": {"mlp": "relu"}, "gelu": {"mlp": "gelu", "gelu_approximate": False},
          "gated-gelu": {"mlp": "geglu", "gelu_approximate": True}, "gated-silu": {"mlp": "swiglu"}}


class T5(Arch):
    """T5 v1.0 (ReLU, tied and scaled head) and v1.1 / Flan-T5 (gated GELU, untied head)."""

    model_types = ("t5",)
    dropout_keys = {"attention_dropout": ("dropout_rate",), "dropout": ("dropout_rate",)}  # one rate: dropout's

    def __init__(self, head_from: str = "lm_head.weight", head_layout: Layout = LINEAR):
        # Import only: an unscaled head saved tied (transformers 5) reads ``shared.weight``; an
        # untied head that still scales by d_model ** -0.5 has the scale folded in.
        self.head_from, self.head_layout = head_from, head_layout

    requires = dict(family="encoder_decoder", norm="rmsnorm", norm_position="pre", embed_norm=False,
                    position="relative", use_bias=False, scale_attention=False, mlm_head_transform=False)

    def model_fields(self, hf, names):
        ff = hf.get("feed_forward_proj", "relu")
        if ff not in _T5_FF:
            raise InteropError(f"feed_forward_proj={ff!r} is not supported; supported: {sorted(_T5_FF)}")
        scaled = _t5_scales_head(hf)
        return dict(family="encoder_decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"],
                    num_layers=hf["num_layers"], num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
                    num_heads=hf["num_heads"], head_dim=hf["d_kv"], d_ff=hf["d_ff"], **_T5_FF[ff],
                    norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-6), norm_position="pre",
                    position="relative", relative_buckets=hf.get("relative_attention_num_buckets", 32),
                    relative_max_distance=hf.get("relative_attention_max_distance", 128),
                    max_length=hf.get("n_positions", 512), use_bias=False, scale_attention=False,
                    tie_embeddings=scaled and "lm_head.weight" not in names)

    def hf_config(self, cfg, base):
        ff = next(k for k, v in _T5_FF.items() if all(getattr(cfg, f) == x for f, x in v.items()))
        return dict(architectures=["T5ForConditionalGeneration"], vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                    d_kv=cfg.dim_per_head, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
                    num_decoder_layers=cfg.decoder_layers, num_heads=cfg.num_heads, feed_forward_proj=ff,
                    layer_norm_epsilon=cfg.norm_eps, relative_attention_num_buckets=cfg.relative_buckets,
                    relative_attention_max_distance=cfg.relative_max_distance, n_positions=cfg.max_length,
                    tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.tie_embeddings,
                    is_encoder_decoder=True, decoder_start_token_id=base.get("decoder_start_token_id", 0),
                    pad_token_id=base.get("pad_token_id", 0), eos_token_id=base.get("eos_token_id", 1))

    def extra_problems(self, cfg):
        out = []
        if not any(all(getattr(cfg, f) == x for f, x in v.items()) for v in _T5_FF.values()):
            out.append(f"model.mlp={cfg.mlp!r} with gelu_approximate={cfg.gelu_approximate} (T5 has relu, "
                       "gelu (erf), gated-gelu (tanh), gated-silu)")
        if cfg.kv_heads != cfg.num_heads:
            out.append("model.num_kv_heads (T5 has no GQA)")
        if _has_logits_bias(cfg):
            out.append("a logits bias (set model.logits_bias=false)")
        return out

    def _side(self, cfg, side: str, layers: int) -> list[Map]:
        lay, blk = f"{side}/stack/{{layer}}", f"{side}.block.{{i}}.layer"
        rows = [_map(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     f"{side}/relpos/rel_embedding"),
                *_attention_maps(f"{blk}.0.SelfAttention", f"{lay}/self_attention", ("q", "k", "v", "o"), layers,
                                 bias=False),
                *_norm_maps(f"{blk}.0.layer_norm", f"{lay}/self_attention_norm", layers, bias=False)]
        ff = 1
        if side == "decoder":
            ff = 2
            rows += _attention_maps(f"{blk}.1.EncDecAttention", f"{lay}/cross_attention", ("q", "k", "v", "o"),
                                    layers, bias=False)
            rows += _norm_maps(f"{blk}.1.layer_norm", f"{lay}/cross_attention_norm", layers, bias=False)
        mlp = ("wi_0", "wi_1", "wo") if cfg.mlp in ("geglu", "swiglu") else ("wi", "wo")
        for name in mlp:
            rows += _linear_maps(f"{blk}.{ff}.DenseReluDense.{name}", f"{lay}/mlp/{name}", layers, bias=False)
        rows += _norm_maps(f"{blk}.{ff}.layer_norm", f"{lay}/mlp_norm", layers, bias=False)
        rows += _norm_maps(f"{side}.final_layer_norm", f"{side}/final_norm", bias=False)
        return rows

    def maps(self, cfg):
        rows = [_map("shared.weight", "token_embed/embedding"), *self._side(cfg, "encoder", cfg.num_layers),
                *self._side(cfg, "decoder", cfg.decoder_layers)]
        if not cfg.tie_embeddings:
            rows.append(_map(self.head_from, "head/lm_head/kernel", self.head_layout))
        return rows


ARCHS = {t: a for a in (Bert(), Roberta(), Gpt2(), Llama(), Qwen2(), Qwen2Moe(), Qwen3(), Qwen3Moe(), Mixtral(), Olmo2(),
                        Olmoe(), Phi3(), Gemma(),
                        Gemma2(), Gemma3(), T5())
         for t in a.model_types}
SUPPORTED = sorted(ARCHS)
# multimodal checkpoints whose text model is imported alone: model_type -> its language model's tensor prefix
TEXT_OF_MULTIMODAL = {"gemma3": "language_model.model."}


def text_model_config(hf: dict) -> dict:
    """A multimodal config (Gemma 3 4B+: ``Gemma3ForConditionalGeneration``) as its text model's
    (``gemma3_text``, marked with where its tensors are); any other config as it is."""
    if hf.get("model_type") not in TEXT_OF_MULTIMODAL or not isinstance(hf.get("text_config"), dict):
        return hf
    text = dict(hf["text_config"], model_type="gemma3_text", _text_of=hf["model_type"])
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
    return text


# ------------------------------------------------------------------ tensor tables


def _ours_path(path: str, layer: Optional[int], scan: bool) -> str:
    return path.format(layer="layers" if scan or layer is None else f"layers_{layer}")


def _expected_hf_shapes(m: Map, ctx: Ctx, ours_shapes: dict, scan: bool) -> list[tuple]:
    """Shapes the HF tensors of one row must have, from our abstract parameter shapes."""
    structs = []
    for path in m.ours:
        shape = ours_shapes[_ours_path(path, 0 if m.layers else None, scan)]
        structs.append(jax.ShapeDtypeStruct(shape[1:] if m.layers and scan else shape, jnp.float32))
    return [tuple(s.shape) for s in jax.eval_shape(lambda *xs: m.layout.to_hf(xs, ctx), *structs)]


def _hf_names(m: Map, i: Optional[int]) -> list[str]:
    return [n.format(i=i) for n in m.hf]


def _check_tensors(maps: list[Map], files: TensorFiles, ctx: Ctx, ours_shapes: dict, scan: bool) -> None:
    """Every HF tensor the table needs is there with the shape the config implies."""
    missing, wrong = [], []
    for m in maps:
        expected = _expected_hf_shapes(m, ctx, ours_shapes, scan)
        for i in range(m.layers) if m.layers else [None]:
            for name, shape in zip(_hf_names(m, i), expected):
                if name not in files:
                    missing.append(files.original(name))
                elif files.shape(name) != shape:
                    wrong.append(f"{files.original(name)} has shape {files.shape(name)}, config.json implies {shape}")
    if missing:
        raise InteropError(f"the safetensors lack {len(missing)} tensor(s) this config needs: {_some(missing)}")
    if wrong:
        raise InteropError("tensor shapes do not match config.json:\n  - " + "\n  - ".join(wrong[:8]))


def _import_params(maps: list[Map], files: TensorFiles, ctx: Ctx, scan: bool, dtype) -> dict:
    flat = {}
    for m in maps:
        if not m.layers:
            outs = m.layout.to_ours(tuple(files.get(n) for n in m.hf), ctx)
            flat.update({p: np.asarray(x, dtype) for p, x in zip(m.ours, outs)})
            continue
        per_layer = [m.layout.to_ours(tuple(files.get(n) for n in _hf_names(m, i)), ctx) for i in range(m.layers)]
        for j, path in enumerate(m.ours):
            if scan:
                flat[_ours_path(path, None, True)] = np.stack([np.asarray(x[j], dtype) for x in per_layer])
            else:
                flat.update({_ours_path(path, i, False): np.asarray(x[j], dtype) for i, x in enumerate(per_layer)})
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def _export_tensors(maps: list[Map], flat: dict, ctx: Ctx, scan: bool, dtype) -> dict:
    out = {}
    for m in maps:
        for i in range(m.layers) if m.layers else [None]:
            ours = []
            for path in m.ours:
                x = flat[_ours_path(path, i, scan)]
                ours.append(x[i] if m.layers and scan else x)
            for name, x in zip(_hf_names(m, i), m.layout.to_hf(tuple(ours), ctx)):
                out[name] = np.asarray(x).astype(dtype)
    return out


def _abstract_shapes(cfg: ModelConfig) -> dict:
    from t5x_lite.models import abstract_params

    abstract = flax.linen.meta.unbox(abstract_params(cfg))
    return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract, sep="/").items()}


# --------------------------------------------------------------------------- API


def read_hf_config(path: str) -> dict:
    """``config.json`` of a HF model directory, with its ``model_type`` checked."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory (a Hugging Face model directory was expected)")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    with open(config_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise InteropError(f"{config_path} is not valid JSON: {e}") from None
    hf = text_model_config(hf)
    if hf.get("model_type") not in ARCHS:
        raise InteropError(f"model_type {hf.get('model_type')!r} in {config_path} is not supported; "
                           f"supported: {', '.join(SUPPORTED)}")
    return hf


def _arch_for_import(hf: dict, names: set) -> Arch:
    arch = ARCHS[hf["model_type"]]
    if not isinstance(arch, T5):
        return arch
    scaled = _t5_scales_head(hf)
    if "lm_head.weight" in names:
        return T5(head_layout=SCALED_HEAD) if scaled else arch
    return arch if scaled else T5(head_from="shared.weight")


def load(path: str, overrides: Sequence[str] = ()) -> tuple[Config, dict]:
    """``(Config, params)`` from a Hugging Face model directory.

    ``overrides`` (``["model.scan_layers=false", "data.seq_len=256", ...]``) are applied to the
    imported config before the parameters are laid out; params are float32 numpy arrays (or
    ``model.param_dtype``), in the layout of ``t5x_lite.init_params`` for that config."""
    hf = read_hf_config(path)
    files = TensorFiles(path)
    arch = ARCHS[hf["model_type"]]
    prefix = TEXT_OF_MULTIMODAL.get(hf.get("_text_of"), arch.prefix)  # (the vision tower's tensors go unread)
    if prefix:
        files.strip_prefix(prefix, keep=HEAD_PREFIXES)
    try:
        fields = arch.model_fields(hf, files.names())
        # training an imported model drops out as transformers does in train mode
        fields.update({name: float(hf.get(keys[0]) or 0.0) for name, keys in arch.dropout_keys.items()})
    except KeyError as e:
        raise InteropError(f"config.json lacks {e.args[0]!r}, which a {hf['model_type']} config needs") from None
    arch = _arch_for_import(hf, files.names())
    seq_len = min(128, fields["max_length"])
    cfg = config_from_dict({"model": fields, "data": {"seq_len": seq_len}})
    for item in overrides:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        cfg = config_from_dict({section: {name: value}}, cfg)
    cfg.validate()
    mcfg = cfg.model
    ctx = Ctx(mcfg, hf)
    maps = arch.maps(mcfg)
    ours_shapes = _abstract_shapes(mcfg)
    _check_tensors(maps, files, ctx, ours_shapes, mcfg.scan_layers)
    params = _import_params(maps, files, ctx, mcfg.scan_layers, jnp.dtype(mcfg.param_dtype))
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    # LoRA's adapters (B = 0) and model.router_bias_update's biases (0): fresh, the imported model's outputs
    new = {k for k in ours_shapes if k.rsplit("/", 1)[-1] in lora.LORA_LEAVES + (ROUTER_BIAS,)}
    if set(flat) != set(ours_shapes) - new:  # the table must cover the model exactly
        wrong = sorted(set(flat) ^ (set(ours_shapes) - new))
        raise AssertionError(f"{type(arch).__name__} table mismatch: {wrong}")
    if new:  # fresh from train.seed
        from t5x_lite.models import init_params

        fresh = flax.traverse_util.flatten_dict(init_params(cfg, cfg.train.seed), sep="/")
        flat.update({k: np.asarray(fresh[k]) for k in new})
        params = flax.traverse_util.unflatten_dict(flat, sep="/")
    return cfg, params


def _type_for_export(cfg: ModelConfig, base: dict) -> str:
    if base.get("model_type") in ARCHS:
        return base["model_type"]
    if cfg.family == "encoder":
        return "bert"
    if cfg.family == "encoder_decoder":
        return "t5"
    if cfg.position == "learned":
        return "gpt2"
    if cfg.embed_scale:
        if cfg.norm_position != "sandwich":
            return "gemma"
        return "gemma3_text" if cfg.qk_norm else "gemma2"
    all_heads = cfg.qk_norm and cfg.qk_norm_scope == "all_heads"
    if cfg.num_experts:
        return ("qwen2_moe" if cfg.shared_expert_d_ff else "olmoe" if all_heads else "qwen3_moe" if cfg.qk_norm
                else "mixtral")
    if cfg.norm_position == "output":
        return "olmo2"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.use_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def save(cfg, params, path: str, base_config: Optional[dict] = None, dtype: str = "float32") -> str:
    """Write ``config.json`` + ``model.safetensors`` into ``path`` for ``from_pretrained``.

    ``base_config``: the HF config the model was imported from (keeps model_type such as
    roberta / mistral, token ids and other fields we do not model); without it the
    architecture follows from the config (encoder: BERT, decoder: GPT-2 with learned positions,
    Gemma with scaled embeddings, Qwen3 with q / k norms, Qwen2 with biases on q / k / v alone,
    Mistral with a sliding window, else LLaMA; encoder_decoder: T5). LoRA adapters are merged
    into their kernels. Returns the architecture written."""
    mcfg = cfg.model if isinstance(cfg, Config) else cfg
    params = jax.device_get(flax.linen.meta.unbox(params))
    if mcfg.lora_rank:  # the adapters folded into their kernels: a plain model
        params = lora.merge(params, mcfg.lora_alpha / mcfg.lora_rank)
        mcfg = dataclasses.replace(mcfg, lora_rank=0)
    if mcfg.router_bias_update:  # routing biases: none of these architectures has them; at zero they change nothing
        biases = [v for k, v in flax.traverse_util.flatten_dict(params, sep="/").items() if k.endswith(ROUTER_BIAS)]
        if any(np.any(np.asarray(b) != 0) for b in biases):
            raise InteropError("model.router_bias_update has moved the routing biases: they choose other experts "
                               "than the router alone would, which no supported Hugging Face architecture expresses")
        mcfg = dataclasses.replace(mcfg, router_bias_update=0.0)
    base = dict(base_config or {})
    model_type = _type_for_export(mcfg, base)
    arch = ARCHS[model_type]
    arch.check_exportable(mcfg, model_type)
    base["model_type"] = model_type
    hf = dict(base, **arch.hf_config(mcfg, base), model_type=model_type, dtype=dtype)
    hf.update({key: getattr(mcfg, name) for name, keys in arch.dropout_keys.items() for key in keys})
    hf.pop("torch_dtype", None)
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    tensors = _export_tensors(arch.maps(mcfg), flat, Ctx(mcfg, base), mcfg.scan_layers, _np_dtype(dtype))
    if arch.has_prefix(mcfg):
        tensors = {(k if k.startswith(HEAD_PREFIXES) else arch.prefix + k): v for k, v in tensors.items()}
    write(tensors, path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    return hf["architectures"][0]


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name != "float32":
        raise InteropError(f"export dtype {name!r} is not supported; supported: float32, bfloat16")
    return np.float32


# --------------------------------------------------------------------- tokenizers


def _with_sentinels(model_bytes: bytes, count: int) -> bytes:
    """A sentencepiece model with T5's sentinels appended as user-defined pieces, numbered as
    transformers numbers them: ``<extra_id_0>`` is the last id, ``<extra_id_{count-1}>`` the first."""
    from sentencepiece import sentencepiece_model_pb2

    from t5x_lite.data.tokenizer import sentinel_piece

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    for i in reversed(range(count)):
        piece = proto.pieces.add()
        piece.piece, piece.score = sentinel_piece(i), 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


def _import_tokenizer(path: str, hf: dict, vocab_size: int):
    """``(kind, tokenizer)`` for the tokenizer in ``path``: ``sentencepiece`` (``tokenizer.model`` /
    ``spiece.model``; a T5 one gains the ``<extra_id_N>`` sentinels transformers adds), ``wordpiece``
    (``vocab.txt``), ``tokenizers`` (``tokenizer.json``: GPT-2's byte-level BPE and the rest), or
    ``(None, None)``."""
    from t5x_lite.data import Tokenizer
    from t5x_lite.interop.wordpiece import WordPieceTokenizer

    for name in ("tokenizer.model", "spiece.model"):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            continue
        tok = Tokenizer.load(file)
        extra = 0
        if hf["model_type"] == "t5" and not tok.sentinel_ids:
            options = _read_json(os.path.join(path, "tokenizer_config.json"))
            extra = min(options.get("extra_ids", 100), vocab_size - tok.vocab_size)
        if extra > 0:
            with open(file, "rb") as f:
                tok = Tokenizer(_with_sentinels(f.read(), extra))
        return "sentencepiece", _fits(tok, vocab_size, file)
    file = os.path.join(path, "vocab.txt")
    if os.path.exists(file):
        return "wordpiece", _fits(WordPieceTokenizer.load(file), vocab_size, file)
    file = os.path.join(path, "tokenizer.json")  # byte-level BPE (GPT-2, LLaMA 3, ...) and the rest
    if os.path.exists(file):
        from t5x_lite.interop.hf_tokenizer import HFTokenizer

        return "tokenizers", _fits(HFTokenizer.load(file), vocab_size, file)
    return None, None


def _fits(tok, vocab_size: int, file: str):
    if tok.vocab_size > vocab_size:
        raise InteropError(f"{file} has {tok.vocab_size} tokens, more than the model's vocab_size={vocab_size}")
    return tok


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- CLI


def _save_step0(cfg: Config, params: dict, workdir: str) -> None:
    """A step-0 checkpoint (params + fresh optimizer state) that ``t5x-lite train`` resumes."""
    from t5x_lite import partitioning
    from t5x_lite.checkpoints import Checkpoints
    from t5x_lite.trainer import TrainState, make_setup

    setup = make_setup(cfg, partitioning.make_mesh(cfg))
    with setup.activation_context():
        params = jax.device_put(params, setup.param_shardings)
        opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), setup.state_shardings.step)
    ckpt = Checkpoints(workdir, cfg)
    ckpt.save(0, TrainState(step=step, params=params, opt_state=opt_state), {"step": 0})
    ckpt.close()


def import_to_workdir(path: str, workdir: str, overrides: Sequence[str] = (), log: Callable = print) -> Config:
    """Import the HF model at ``path`` into a new work dir: ``config.yaml``, the tokenizer, a step-0
    checkpoint and the HF config / tokenizer files (for ``export_from_workdir``). Everything is
    read and checked before the first write; ``config.yaml`` is written last."""
    from t5x_lite.checkpoints import CHECKPOINT_DIR, CONFIG_FILE, TOKENIZER_FILE
    from t5x_lite.trainer import write_workdir_config

    if os.path.exists(os.path.join(workdir, CONFIG_FILE)) or os.path.exists(os.path.join(workdir, CHECKPOINT_DIR)):
        raise InteropError(f"--workdir {workdir} already holds a run; import into a new work dir")
    hf = read_hf_config(path)
    log(f"reading {hf['model_type']} weights from {path}")
    cfg, params = load(path, overrides)
    kind, tok = _import_tokenizer(path, hf, cfg.model.vocab_size)
    num = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log(f"imported {num:,} parameters: {cfg.model.family}, d_model={cfg.model.d_model}, "
        f"layers={cfg.model.num_layers}, heads={cfg.model.num_heads}/{cfg.model.kv_heads}")

    os.makedirs(os.path.join(workdir, HF_FILES_DIR), exist_ok=True)
    shutil.copyfile(os.path.join(path, "config.json"), os.path.join(workdir, HF_CONFIG_FILE))
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(path, name)):
            shutil.copyfile(os.path.join(path, name), os.path.join(workdir, HF_FILES_DIR, name))
    if kind in ("sentencepiece", "tokenizers"):
        tok.save(os.path.join(workdir, TOKENIZER_FILE))
    elif kind == "wordpiece":
        cfg.data.tokenizer = os.path.abspath(os.path.join(workdir, HF_FILES_DIR, "vocab.txt"))
    else:
        log(f"note: {path} has no sentencepiece model (tokenizer.model / spiece.model), WordPiece vocab.txt nor "
            "tokenizer.json: "
            "set data.tokenizer in the work dir's config.yaml before train or decode")
    log(f"tokenizer: {tok!r}" if tok is not None else "tokenizer: none")
    from t5x_lite.data import chat

    template = chat.from_hf(path)
    if template is not None:  # conversations (data.messages_field) in supervised data are rendered with it
        chat_path = os.path.abspath(os.path.join(workdir, chat.CHAT_FILE))
        with open(chat_path, "w", encoding="utf-8") as f:
            json.dump(template, f, indent=1)
        cfg.data.chat_template = chat_path
        log(f"chat template: {chat_path} (data.chat_template)")
    log("writing the step-0 checkpoint")
    _save_step0(cfg, params, workdir)
    write_workdir_config(cfg, workdir)
    log(f"done: fine-tune with `t5x-lite train --config {os.path.join(workdir, CONFIG_FILE)} --workdir {workdir}`")
    return cfg


def _workdir_params(workdir: str, step: Optional[int] = None) -> tuple[Config, Any]:
    """Config and parameters of a work dir's checkpoint ``step`` (default: the latest), or of a
    ``t5x-lite export`` directory."""
    from t5x_lite import partitioning
    from t5x_lite.checkpoints import EXPORT_FILE, abstract_param_tree, load_for_inference, read_config, read_params

    if os.path.exists(os.path.join(workdir, EXPORT_FILE)):
        cfg, params, _ = load_for_inference(workdir, step=step)
        return cfg, params
    cfg = read_config(workdir)
    _, params = read_params(workdir, cfg, abstract_param_tree(cfg, partitioning.make_mesh(cfg)), step)
    return cfg, params


def export_from_workdir(workdir: str, output: str, dtype: str = "float32", log: Callable = print,
                        step: Optional[int] = None) -> str:
    """Write the parameters of ``workdir``'s checkpoint ``step`` (default: the latest) as a HF model
    directory ``output``, with the tokenizer files it was imported with (or its sentencepiece
    model). Returns the architecture."""
    from t5x_lite.checkpoints import TOKENIZER_FILE

    if os.path.exists(output) and os.listdir(output):
        raise InteropError(f"--output {output} exists and is not empty; give a new path (export never overwrites)")
    _np_dtype(dtype)
    cfg, params = _workdir_params(workdir, step)
    base = text_model_config(_read_json(os.path.join(workdir, HF_CONFIG_FILE)))  # a multimodal import: its text model
    base.pop("_text_of", None)
    arch = save(cfg, params, output, base, dtype)
    files = os.path.join(workdir, HF_FILES_DIR)
    copied = sorted(os.listdir(files)) if os.path.isdir(files) else []
    for name in copied:
        shutil.copyfile(os.path.join(files, name), os.path.join(output, name))
    if not copied and os.path.exists(os.path.join(workdir, TOKENIZER_FILE)):
        name = "spiece.model" if cfg.model.family == "encoder_decoder" else "tokenizer.model"
        shutil.copyfile(os.path.join(workdir, TOKENIZER_FILE), os.path.join(output, name))
        copied = [name]
    log(f"wrote {arch} ({dtype}) to {output}" + (f" with {', '.join(copied)}" if copied else ""))
    return arch


def run_import_cli(args) -> int:
    """``t5x-lite import-hf PATH --workdir DIR [--set KEY=VALUE ...]``."""
    import_to_workdir(args.path, args.workdir, args.overrides)
    return 0


def run_export_cli(args) -> int:
    """``t5x-lite export-hf --workdir DIR --output PATH [--dtype bfloat16] [--step N]``."""
    export_from_workdir(args.workdir, args.output, args.dtype, step=args.step)
    return 0
