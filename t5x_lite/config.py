"""Typed experiment configuration.

The dataclasses below are the single source of truth for every knob. A YAML file only sets
fields that exist here; ``--set section.key=value`` overrides a field from the command line.
An unknown key, a wrong type or a value outside a field's choices is one ``ConfigError`` that
names the key and lists what would be valid. ``Config.validate`` checks the arithmetic that
would otherwise fail deep inside a compile (heads by kv heads, batch by micro-batches, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported before any work is done."""


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclasses.dataclass
class ModelConfig:
    family: str = dataclasses.field(default="decoder", metadata=_choices("encoder", "decoder", "encoder_decoder"))
    vocab_size: int = 32000
    d_model: int = 512
    num_layers: int = 6  # depth of the encoder (encoder, encoder_decoder) or decoder (decoder)
    num_decoder_layers: Optional[int] = None  # encoder_decoder only; None = num_layers
    num_heads: int = 8
    num_kv_heads: Optional[int] = None  # None = num_heads (MHA); 1 = MQA; in between = GQA
    head_dim: Optional[int] = None  # None = d_model // num_heads
    d_ff: int = 2048
    mlp: str = dataclasses.field(default="swiglu", metadata=_choices("swiglu", "geglu", "gelu", "relu"))
    gelu_approximate: bool = True  # tanh GELU (GPT-2, T5 v1.1); False = exact erf GELU (BERT)
    norm: str = dataclasses.field(default="rmsnorm", metadata=_choices("rmsnorm", "layernorm"))
    norm_eps: float = 1e-6
    # pre: x + f(norm(x)); post: norm(x + f(x)) (BERT); sandwich: x + norm'(f(norm(x))) (Gemma 2 / 3);
    # output: x + norm(f(x)) (OLMo 2); a final norm after the stack for all but post
    norm_position: str = dataclasses.field(default="pre", metadata=_choices("pre", "post", "sandwich", "output"))
    embed_norm: bool = False  # a norm right after the embedding (BERT)
    embed_scale: bool = False  # token embeddings times sqrt(d_model) (Gemma)
    position: str = dataclasses.field(default="rope", metadata=_choices("rope", "alibi", "relative", "learned"))
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # RoPE scaling factor (1.0: none); how it applies: rope_scaling_type
    # linear: every angle at position / rope_scaling (position interpolation); llama3 (Llama 3.1+):
    # wavelengths beyond rope_original_length / rope_low_freq_factor scaled, those below
    # rope_original_length / rope_high_freq_factor kept, a blend between
    rope_scaling_type: str = dataclasses.field(default="linear", metadata=_choices("linear", "llama3"))
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_length: int = 8192
    max_length: int = 2048  # longest sequence: size of learned position tables, decode cache limit
    # Sliding-window (local) causal self-attention: each token sees itself and the sliding_window - 1
    # tokens before it (Mistral); 0 = every earlier token. Prefix-LM prefixes still see each other.
    sliding_window: int = 0
    # P >= 2: local and global layers alternate, every P-th layer (P - 1, 2P - 1, ...) attending
    # to all earlier tokens (Gemma 2: 2, Gemma 3: 6); 0: every layer has the window
    sliding_window_pattern: int = 0
    rope_local_theta: Optional[float] = None  # RoPE base of the windowed layers, unscaled (Gemma 3); None: rope_theta
    relative_buckets: int = 32
    relative_max_distance: int = 128
    tie_embeddings: bool = False
    use_bias: bool = False  # biases in attention / MLP projections (BERT, GPT-2)
    qkv_bias: Optional[bool] = None  # biases on the q / k / v projections; None = use_bias (Qwen2: only these)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
    # head: over each head's features, one scale shared by the heads; all_heads: over all of a
    # token's q (and its k), a scale per feature (OLMo 2, OLMoE)
    qk_norm_scope: str = dataclasses.field(default="head", metadata=_choices("head", "all_heads"))
    logits_bias: Optional[bool] = None  # a bias on the output logits; None = use_bias (BERT: yes, GPT-2: no)
    mlm_head_transform: bool = False  # BERT's dense + activation + norm before the MLM output layer
    scale_attention: bool = True  # False: no 1/sqrt(head_dim) (T5 folds it into the init)
    # cap * tanh(x / cap) on attention scores (on XLA's path: cuDNN has no such kernel) and on the
    # output logits (Gemma 2: 50 and 30); 0 = none
    attn_logit_softcap: float = 0.0
    final_logit_softcap: float = 0.0
    # scores times 1/sqrt(this), not 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar)
    attention_scale_dim: Optional[float] = None
    dropout: float = 0.0
    # on attention probabilities (BERT's and T5's 0.1); training then runs attention on XLA's path
    attention_dropout: float = 0.0
    dtype: str = dataclasses.field(default="float32", metadata=_choices("float32", "bfloat16", "float16"))
    param_dtype: str = dataclasses.field(default="float32", metadata=_choices("float32", "bfloat16"))
    # minimal: keep weight-matmul and cuDNN attention outputs; dots: weight-matmul outputs only
    # (cuDNN attention's forward runs again in the backward pass); full: keep only layer inputs
    remat: str = dataclasses.field(default="none", metadata=_choices("none", "minimal", "dots", "full"))
    # One matmul for several projections of one input (the parameters stay separate: the same
    # checkpoints; the weights are concatenated per layer and step): self-attention's q, k, v
    # ([D, K, G + 2, H]), a gated MLP's gate and up ([D, 2, F]).
    fused_qkv: bool = False
    fused_mlp: bool = False
    # LoRA fine-tuning: rank > 0 adds a trainable x A B (alpha / rank) to each projection named in
    # lora_targets (query, key, value, out, wi_0, wi_1, wi, wo; cross-attention's too) and freezes
    # every other parameter (no gradient, no optimizer state); B starts at zero
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "query,key,value,out"
    # Mixture of experts (Mixtral, Qwen3-MoE): > 0 makes every layer's MLP num_experts MLPs of
    # width expert_d_ff (None: d_ff) behind a router that sends each token to experts_per_token
    # of them, their outputs weighted by its softmax probabilities (renormalised over the chosen
    # ones with router_renormalize). expert_capacity_factor (training): 0 = dropless (exact; every
    # expert has room for every token of a group, E / k times the experts' FLOPs); > 0: each expert
    # takes ceil(k * group * factor / E) tokens of a group, the rest of its choices dropped.
    # expert_group_size: tokens routed together (0 or not dividing the row: the row); the dispatch
    # and combine einsums cost ~4 x group x k x factor x d_model FLOPs per token, so not too many
    # router_aux_loss: weight of the load-balancing loss added to the training loss (Mixtral 0.02)
    num_experts: int = 0
    experts_per_token: int = 2
    expert_d_ff: Optional[int] = None
    expert_capacity_factor: float = 0.0
    eval_capacity_factor: float = 0.0  # the same for evaluation, decoding and logits (0: dropless, exact)
    expert_group_size: int = 256
    router_renormalize: bool = True
    router_aux_loss: float = 0.0
    router_z_loss: float = 0.0  # weight of the router's z-loss, mean logsumexp(router logits)^2 (ST-MoE: 1e-3)
    # > 0: balancing without a loss (DeepSeek-V3): a per-expert bias, added to the router's
    # probabilities to choose the experts (not to weight them), moves by this much after each
    # step, up for experts that got fewer than the mean share of the batch's choices, down for more
    router_bias_update: float = 0.0
    # an always-on expert of this width beside the routed ones (0: none), its output times a
    # per-token sigmoid gate with shared_expert_gate (Qwen2-MoE)
    shared_expert_d_ff: int = 0
    shared_expert_gate: bool = False
    scan_layers: bool = True
    scan_unroll: int = 1  # layers per iteration of the layer scan (lax.scan unroll; >= num_layers: straight code)
    # The same when generating (0: scan_unroll). A GPU decoding step is a few small kernels per layer
    # and the scan's loop costs between them (H100, llama_1b: 2.22 -> 2.01 ms a token at batch 1,
    # 3.21 -> 2.87 at 32, all 16 layers unrolled; compile 13 -> 39 s); training keeps scan_unroll.
    decode_scan_unroll: int = 0
    # Generated tokens between two checks of whether every row has stopped (a stop id or the length).
    # 1: every token, a loop XLA cannot count (on a GPU the host reads the answer back before it
    # launches the next token); N > 1: N tokens at a time in a loop of known length, which XLA runs
    # without reading anything back; once every row has stopped, up to N - 1 more tokens are computed
    # and thrown away. The same tokens either way.
    decode_stop_every: int = 1
    # pallas: jax's Pallas (Triton) flash attention for training's self-attention, documents from the
    # segment ids inside the kernel (GPU; no bias, window, dropout or soft cap; else as auto)
    attention: str = dataclasses.field(default="xla",
                                       metadata=_choices("xla", "cudnn", "auto", "cudnn_packed", "pallas"))
    # Documents (segments) a packed row may hold: the packer's cap, and M of cuDNN's packed layout,
    # which keeps a float32 [B * M, heads, T] softmax statistic per layer. 0 = no cap (cuDNN, if
    # used, gets the mask as a dense bias; not for cudnn_packed). With attention auto (on a GPU) or
    # cudnn_packed: >= 2 selects the packed layout; 1 = one document a row, from its first
    # position (what the packer makes), which cuDNN reads as a length a row (its padding mask):
    # no mask, and an attention bias (T5's) stays [1, N, T, S], its gradient too.
    max_segments: int = 0
    # Lower max_segments, when training starts, to the smallest cap that packs the training rows
    # within half a point as tight (next fit and concat: the most documents a row holds, the same
    # rows): what the corpus needs rather than what a config guessed (H100, llama_1b: 194.7 ms a
    # step at 1, ~202 at 32, 215.7 at 64). Resolved from the data, the same on every start; the
    # log says what it chose. Needs max_segments > 1 and the packed layout (attention auto or
    # cudnn_packed), or no cap (0) under auto, which it lowers only to 1 (every row one document:
    # cuDNN given lengths, not the mask), never to a packed layout the config did not ask for; it
    # changes the rows when best_fit reorders for the smaller cap.
    fit_max_segments: bool = False
    # Who computes the gradient of an attention bias ([1, N, T, S]: T5's relative positions, ALiBi)
    # where cuDNN runs the attention with a mask: "cudnn" (jax's kernel, over the [B, N, T, S] sum
    # of bias and mask, then summed over the batch) or "pallas" (cuDNN without a bias gradient and
    # a Pallas kernel summing it over the batch in registers: models/bias_grad.py). Rows of one
    # document (max_segments 1) give cuDNN the [1, N, T, S] bias as it is either way, and "cudnn"
    # its gradient summed over the batch inside cuDNN's kernel. No effect on XLA's attention or on
    # the packed layout.
    attention_bias_grad: str = dataclasses.field(default="cudnn", metadata=_choices("cudnn", "pallas"))

    @property
    def gated_mlp(self) -> bool:
        """The MLP gates its activation with a second input projection (swiglu, geglu: wi_0, wi_1)."""
        return self.mlp in ("swiglu", "geglu")

    @property
    def packed_slots(self) -> int:
        """M of cuDNN's packed layout when the model builds it (attention auto or cudnn_packed and
        max_segments >= 2; auto then uses it only where cuDNN runs), else 0."""
        if self.attention not in ("auto", "cudnn_packed") or self.max_segments < 2:
            return 0
        return self.max_segments

    @property
    def one_document_rows(self) -> bool:
        """Training rows hold one document each, from the row's first position (max_segments 1,
        attention auto or cudnn_packed): where cuDNN runs, it is given a length a row (its padding
        mask), not a mask. Rows whose document starts later (decoding's left-padded prompts) need
        max_segments 0."""
        return self.attention in ("auto", "cudnn_packed") and self.max_segments == 1

    @property
    def fits_segments(self) -> bool:
        """``fit_max_segments`` applies: a cap above one and the packed layout it would size, or no
        cap under ``auto`` (to be lowered to one document a row only)."""
        return self.fit_max_segments and (self.packed_slots > 0 or (self.max_segments == 0 and self.attention == "auto"))

    @property
    def lora_names(self) -> tuple:
        return tuple(n.strip() for n in self.lora_targets.split(",") if n.strip()) if self.lora_rank else ()

    @property
    def expert_width(self) -> int:
        return self.expert_d_ff or self.d_ff

    def for_inference(self) -> "ModelConfig":
        """The model as evaluation, decoding and ``logits`` run it: experts under
        ``eval_capacity_factor`` (dropless by default), not training's capacity."""
        if not self.num_experts or self.eval_capacity_factor == self.expert_capacity_factor:
            return self
        return dataclasses.replace(self, expert_capacity_factor=self.eval_capacity_factor)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers


LORA_TARGETS = ("query", "key", "value", "out", "wi_0", "wi_1", "wi", "wo")  # projections LoRA may adapt


@dataclasses.dataclass
class DataConfig:
    path: Optional[str] = None  # None: docstrings of this Python's standard library
    # several corpora mixed by weight, instead of data.path: "PATH=WEIGHT, PATH=WEIGHT, ..." (each
    # PATH as data.path takes it; weights relative). Every batch takes from each corpus its share
    # of the rows, the running counts within one row of the weights (data.pipeline.MixtureBatches)
    mixture: Optional[str] = None
    field: str = "text"  # JSONL field holding the text
    # objective supervised: JSON lines of (input, target) pairs; the loss is on the target only
    input_field: str = "input"
    target_field: str = "target"
    # records with a messages field (a conversation ending with the assistant's turn) are rendered
    # by this chat template file (import-hf writes the model's and sets this)
    messages_field: str = "messages"
    chat_template: Optional[str] = None
    # all: a pair per assistant turn, its input the conversation before it (a conversation's pairs
    # stay on one side of the train / eval split); last: the final (assistant) turn only
    chat_turns: str = dataclasses.field(default="all", metadata=_choices("all", "last"))
    tokenizer: Optional[str] = None  # sentencepiece .model; None: train one into the work dir
    seq_len: int = 128  # tokens per row (encoder input length for encoder_decoder)
    # encoder_decoder decoder length; None: what span corruption makes of seq_len (supervised: seq_len)
    target_len: Optional[int] = None
    # None: family default (encoder: mlm, decoder: causal, encoder_decoder: span). supervised
    # (decoder, encoder_decoder): fine-tuning on (input, target) pairs, the loss on the target
    objective: Optional[str] = dataclasses.field(
        default=None, metadata=_choices("causal", "prefix", "mlm", "span", "supervised")
    )
    mlm_rate: float = 0.15
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    num_sentinels: int = 100
    eval_fraction: float = 0.02  # fraction of documents held out for eval
    max_docs: Optional[int] = None  # cap on documents read (supervised: pairs; quick experiments)
    # greedy: whole documents, in order, into a row while they fit (long ones cut at seq_len);
    # concat: the token stream cut every seq_len tokens, every row full, a document that crosses
    # a row boundary goes on in the next row as a new segment (not for span corruption).
    # best_fit: whole documents too, served in the order best-fit decreasing packs them (rows
    # nearly full; storage order where that packs tighter: tiny documents and a binding
    # model.max_segments)
    packing: str = dataclasses.field(default="greedy", metadata=_choices("greedy", "concat", "best_fit"))
    # processes making the coming steps' training batches while the device runs (0: the training
    # loop makes each batch itself); the same batches either way
    workers: int = 0

    def mixture_sources(self) -> list[tuple[str, float]]:
        """``data.mixture`` as ``[(path, weight), ...]`` with the weights summing to 1 (``[]``
        unset). Raises ConfigError on a malformed one."""
        if not self.mixture:
            return []
        sources = []
        for item in self.mixture.split(","):
            path, eq, weight = item.strip().rpartition("=")
            try:
                value = float(weight)
            except ValueError:
                value = float("nan")
            if not eq or not path.strip() or not value > 0 or value == float("inf"):
                raise ConfigError(f"data.mixture item {item.strip()!r} is not PATH=WEIGHT with a weight > 0 "
                                  "(data.mixture=\"web.jsonl=3, code/=1\")")
            sources.append((path.strip(), value))
        paths = [p for p, _ in sources]
        if len(sources) < 2 or len(set(paths)) < len(paths):
            n = len(set(paths))
            raise ConfigError(f"data.mixture names {n} distinct {'corpus' if n == 1 else 'corpora'}; a mixture needs "
                              "two or more (one corpus: data.path)")
        total = sum(w for _, w in sources)
        return [(p, w / total) for p, w in sources]

    def resolved_objective(self, family: str) -> str:
        return self.objective or {"encoder": "mlm", "decoder": "causal", "encoder_decoder": "span"}[family]


def xla_option(item: str) -> tuple[str, object]:
    """One ``NAME=VALUE`` XLA option (as in ``XLA_FLAGS``, the dashes optional) as a compile call
    takes it. ``true`` / ``false`` become bools: XLA refuses a bool option given as the string
    ``"true"`` (it reads ``"True"``), and ``XLA_FLAGS`` spell them lower-case."""
    name, _, value = item.lstrip("-").partition("=")
    return name, {"true": True, "false": False}.get(value.lower(), value)


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global, in sequences
    micro_batches: int = 1  # gradient accumulation: batch_size is split into this many
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0: no periodic eval
    eval_batches: int = 4
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    progress: bool = True
    loss_chunk: int = 0  # >0: cross-entropy this many positions at a time (no full-batch fp32 logits)
    peak_tflops: Optional[float] = None  # one device's dense peak for MFU; None: known GPUs (H100: 989)
    # PRNG of the dropout masks: threefry2x32 (jax's default: the same masks on any mesh) or XLA's
    # RngBitGenerator (rbg, unsafe_rbg: cheaper on GPUs, masks depend on the sharding)
    dropout_rng: str = dataclasses.field(default="threefry2x32",
                                         metadata=_choices("threefry2x32", "rbg", "unsafe_rbg"))
    # Loss scaling for float16 compute (its gradients underflow below 6e-8 without it): the loss is
    # multiplied by a scale before the backward pass and the gradients divided by it; a step whose
    # gradients are not finite is skipped and halves the scale, loss_scale_period finite steps in a
    # row double it. auto: dynamic when model.dtype is float16 (bfloat16 has float32's range).
    loss_scale: str = dataclasses.field(default="auto", metadata=_choices("auto", "dynamic", "none"))
    loss_scale_init: float = 2.0 ** 15
    loss_scale_period: int = 2000
    # XLA options for the train step's compile only (not eval's or decoding's), NAME=VALUE pairs
    # separated by spaces, the names as in XLA_FLAGS (the dashes may be left out), e.g.
    # "xla_gpu_dot_merger_threshold_mb=0". XLA rejects a name or value it does not know.
    xla_options: str = ""

    def loss_scaling(self, compute_dtype: str) -> bool:
        return self.loss_scale == "dynamic" or (self.loss_scale == "auto" and compute_dtype == "float16")

    def compiler_options(self) -> dict[str, object]:
        """``xla_options`` as the compile call takes them: ``{name: value}``."""
        return dict(xla_option(item) for item in self.xla_options.split())


@dataclasses.dataclass
class OptimConfig:
    # muon: Muon (optax.contrib) on the layers' matrices, AdamW on embeddings, the output layer,
    # norms and biases; its updates scaled to AdamW's RMS (0.2), so AdamW's learning rates carry over
    name: str = dataclasses.field(default="adamw", metadata=_choices("adamw", "adafactor", "muon"))
    learning_rate: float = 3e-4
    # wsd: warmup, the peak held, then a linear decay over the last decay_fraction of the steps
    schedule: str = dataclasses.field(default="cosine",
                                      metadata=_choices("cosine", "linear", "inverse_sqrt", "constant", "wsd"))
    decay_fraction: float = 0.2  # wsd only
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1  # final learning rate / peak (cosine, linear)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # never applied to norms, biases
    clip_norm: float = 1.0  # global-norm clipping; 0 disables


@dataclasses.dataclass
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: the rest of the devices
    tensor: int = 1


@dataclasses.dataclass
class ShardingConfig:
    zero_stage: int = 3
    shard_opt_over_data: bool = False  # stages 1-3: also shard optimizer state over `data`
    # mixture of experts: each fsdp shard holds num_experts / fsdp whole experts (params, grads,
    # optimizer state; never gathered) and the tokens travel to them (all-to-all) and back
    expert_parallel: bool = False


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True
    fallback: bool = False  # on a damaged latest checkpoint, use the previous one
    keep_best: bool = False  # also keep the checkpoint with the best eval loss


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_max_segments(self, cap: int) -> "Config":
        """A copy with ``model.max_segments=cap`` (what ``fit_max_segments`` found the data needs)."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, max_segments=cap))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def objective(self) -> str:
        return self.data.resolved_objective(self.model.family)

    def validate(self) -> "Config":
        """Check everything that can be checked without devices. Raises ConfigError."""
        m, d, t, o = self.model, self.data, self.train, self.optim
        errors = []
        if m.num_heads <= 0 or m.d_model <= 0 or m.num_layers <= 0:
            errors.append("model.num_heads, model.d_model and model.num_layers must be positive")
        if m.head_dim is None and m.d_model % m.num_heads:
            errors.append(
                f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
                "set model.head_dim or pick heads that divide d_model"
            )
        if m.num_heads % m.kv_heads:
            divisors = [k for k in range(1, m.num_heads + 1) if m.num_heads % k == 0]
            errors.append(
                f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}; "
                f"valid num_kv_heads: {divisors}"
            )
        if m.max_segments < 0 or m.max_segments > d.seq_len:
            errors.append(f"model.max_segments={m.max_segments} must be in [0, data.seq_len={d.seq_len}] "
                          "(0 = no cap on documents per row)")
        elif m.attention == "cudnn_packed" and m.max_segments == 0:
            errors.append("model.attention=cudnn_packed needs model.max_segments > 0, the most documents a row "
                          "may hold (cuDNN keeps a float32 [batch x max_segments, heads, length] statistic per "
                          "layer): e.g. 16, or 1 for one document per row")
        if m.sliding_window < 0:
            errors.append(f"model.sliding_window={m.sliding_window} must be >= 0 (0 = no window)")
        elif m.sliding_window and m.family == "encoder":
            errors.append("model.sliding_window applies to causal self-attention, which the encoder family "
                          "does not have")
        if m.attn_logit_softcap < 0 or m.final_logit_softcap < 0:
            errors.append("model.attn_logit_softcap and model.final_logit_softcap must be >= 0 (0 = none)")
        elif m.attn_logit_softcap and m.attention in ("cudnn", "cudnn_packed"):
            errors.append(f"model.attn_logit_softcap={m.attn_logit_softcap} runs attention on XLA's path (cuDNN's "
                          f"kernels do not cap scores), not model.attention={m.attention}; use auto or xla")
        if m.lora_rank < 0:
            errors.append(f"model.lora_rank={m.lora_rank} must be >= 0 (0 = no LoRA)")
        elif m.lora_rank:
            unknown = sorted(set(m.lora_names) - set(LORA_TARGETS))
            if unknown or not m.lora_names:
                errors.append(f"model.lora_targets={m.lora_targets!r}: unknown {unknown or 'empty'}; valid: "
                              f"{', '.join(LORA_TARGETS)} (comma-separated)")
            if m.fused_qkv or m.fused_mlp:
                errors.append("model.lora_rank with model.fused_qkv / fused_mlp: LoRA adapts the separate "
                              "projections; set fused_qkv=false and fused_mlp=false")
        if m.num_experts < 0:
            errors.append(f"model.num_experts={m.num_experts} must be >= 0 (0 = a dense MLP)")
        elif m.num_experts:
            if not 1 <= m.experts_per_token <= m.num_experts:
                errors.append(f"model.experts_per_token={m.experts_per_token} must be in [1, model.num_experts="
                              f"{m.num_experts}]")
            if (m.expert_capacity_factor < 0 or m.eval_capacity_factor < 0 or m.expert_group_size < 0
                    or m.router_aux_loss < 0
                    or m.router_z_loss < 0 or m.shared_expert_d_ff < 0 or m.router_bias_update < 0):
                errors.append("model.expert_capacity_factor, eval_capacity_factor, expert_group_size, "
                              "router_aux_loss, router_z_loss, router_bias_update and shared_expert_d_ff must be >= 0")
            if m.fused_mlp:
                errors.append("model.fused_mlp applies to a dense MLP, not to experts (model.num_experts > 0)")
            adapted = sorted(set(m.lora_names) & {"wi_0", "wi_1", "wi", "wo"})
            if adapted:
                errors.append(f"model.lora_targets names {adapted}: with model.num_experts the MLP is experts, "
                              "which LoRA does not adapt; target query, key, value, out")
        if (m.shared_expert_d_ff or m.shared_expert_gate) and not m.num_experts:
            errors.append("model.shared_expert_d_ff / shared_expert_gate belong to a mixture of experts: set "
                          "model.num_experts")
        elif m.shared_expert_gate and not m.shared_expert_d_ff:
            errors.append("model.shared_expert_gate gates the shared expert: set model.shared_expert_d_ff")
        if self.sharding.expert_parallel and not m.num_experts:
            errors.append("sharding.expert_parallel splits a mixture of experts by expert: set model.num_experts")
        if m.sliding_window_pattern == 1 or m.sliding_window_pattern < 0:
            errors.append(f"model.sliding_window_pattern={m.sliding_window_pattern} must be 0 (every layer windowed) "
                          "or >= 2 (every P-th layer global)")
        elif (m.sliding_window_pattern or m.rope_local_theta) and not m.sliding_window:
            errors.append("model.sliding_window_pattern / rope_local_theta describe windowed layers: set "
                          "model.sliding_window")
        if not 0 <= m.dropout < 1 or not 0 <= m.attention_dropout < 1:
            errors.append(f"model.dropout={m.dropout} and model.attention_dropout={m.attention_dropout} must be in [0, 1)")
        elif m.attention_dropout > 0 and m.attention in ("cudnn", "cudnn_packed"):
            errors.append(f"model.attention_dropout={m.attention_dropout} trains attention on XLA's path (jax's cuDNN "
                          f"call repeats one dropout mask every step), not model.attention={m.attention}; use auto "
                          "(cuDNN for eval and decoding) or xla")
        if m.fused_mlp and not m.gated_mlp:
            errors.append(f"model.fused_mlp fuses a gated MLP's gate and up projections; model.mlp={m.mlp!r} "
                          "has one input projection (use swiglu or geglu, or fused_mlp=false)")
        if m.scan_unroll < 1:
            errors.append(f"model.scan_unroll={m.scan_unroll} must be >= 1 (layers per scan iteration)")
        if m.decode_stop_every < 1:
            errors.append(f"model.decode_stop_every={m.decode_stop_every} must be >= 1 (generated tokens between "
                          "checks of whether every row has stopped)")
        if m.decode_scan_unroll < 0:
            errors.append(f"model.decode_scan_unroll={m.decode_scan_unroll} must be >= 0 (layers per scan "
                          "iteration when generating; 0: model.scan_unroll)")
        if m.rope_scaling <= 0:
            errors.append(f"model.rope_scaling={m.rope_scaling} must be positive (1.0 = no scaling)")
        if m.rope_scaling_type == "llama3" and not (0 < m.rope_low_freq_factor < m.rope_high_freq_factor
                                                    and m.rope_original_length > 0):
            errors.append(f"llama3 RoPE scaling needs 0 < model.rope_low_freq_factor ({m.rope_low_freq_factor}) < "
                          f"model.rope_high_freq_factor ({m.rope_high_freq_factor}) and model.rope_original_length "
                          f"({m.rope_original_length}) > 0")
        if m.position == "rope" and m.dim_per_head % 2:
            errors.append(f"rope needs an even head dim, got {m.dim_per_head}")
        allowed = {"encoder": {"mlm"}, "decoder": {"causal", "prefix", "supervised"},
                   "encoder_decoder": {"span", "supervised"}}[m.family]
        if self.objective not in allowed:
            errors.append(
                f"data.objective={self.objective} does not fit model.family={m.family}; valid: {sorted(allowed)}"
            )
        if m.position == "learned":
            longest = max(d.seq_len, d.target_len or 0)
            if longest > m.max_length:
                errors.append(
                    f"data.seq_len={d.seq_len} exceeds model.max_length={m.max_length}, the size of the learned "
                    "position table; raise model.max_length or shorten data.seq_len"
                )
        if d.seq_len < 8:
            errors.append(f"data.seq_len={d.seq_len} is too short (at least 8)")
        if d.packing == "concat" and self.objective == "supervised":
            errors.append("data.packing=concat cuts documents at row boundaries; supervised pairs stay whole: "
                          "use data.packing=greedy or best_fit")
        if d.packing == "concat" and self.objective == "span":
            errors.append("data.packing=concat cuts documents at row boundaries, but span corruption packs whole "
                          "raw chunks of its own length; use data.packing=greedy for the span objective")
        if not 0 < d.mlm_rate < 1:
            errors.append(f"data.mlm_rate={d.mlm_rate} must be in (0, 1)")
        if not 0 < d.noise_density < 1:
            errors.append(f"data.noise_density={d.noise_density} must be in (0, 1)")
        if d.mean_span_length < 1:
            errors.append(f"data.mean_span_length={d.mean_span_length} must be >= 1")
        if t.loss_scale_init < 1 or t.loss_scale_period < 1:
            errors.append(f"train.loss_scale_init={t.loss_scale_init} and train.loss_scale_period="
                          f"{t.loss_scale_period} must be >= 1")
        if not 0 < o.decay_fraction <= 1:
            errors.append(f"optim.decay_fraction={o.decay_fraction} must be in (0, 1] (the share of the steps wsd decays over)")
        if d.workers < 0:
            errors.append(f"data.workers={d.workers} must be >= 0 (0: batches made in the training loop)")
        try:
            mixture = d.mixture_sources()
        except ConfigError as e:
            errors.append(str(e))
            mixture = []
        if mixture and d.path is not None:
            errors.append("data.path and data.mixture are both set: one corpus (data.path) or a mixture of several")
        few = [f"{p} ({w * t.batch_size:.2f})" for p, w in mixture if w * t.batch_size < 1]
        if few:
            errors.append(f"data.mixture gives {', '.join(few)} less than one row of a batch of train.batch_size="
                          f"{t.batch_size}: raise their weights or the batch size (every corpus takes a row or more "
                          "of every batch)")
        if not 0 <= d.eval_fraction < 1:
            errors.append(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
        if t.steps < 0:
            errors.append(f"train.steps={t.steps} must be >= 0")
        if t.batch_size <= 0 or t.micro_batches <= 0:
            errors.append("train.batch_size and train.micro_batches must be positive")
        elif t.batch_size % t.micro_batches:
            fits = [k for k in range(1, t.batch_size + 1) if t.batch_size % k == 0]
            errors.append(
                f"train.batch_size={t.batch_size} is not divisible by train.micro_batches={t.micro_batches}; "
                f"valid micro_batches: {fits}"
            )
        if t.loss_chunk < 0:
            errors.append(f"train.loss_chunk={t.loss_chunk} must be >= 0 (0 = the whole sequence at once)")
        if t.log_every <= 0:
            errors.append(f"train.log_every={t.log_every} must be positive")
        bad = [item for item in t.xla_options.split() if not re.fullmatch(r"(--)?xla_\w+=\S+", item)]
        if bad:
            errors.append(f"train.xla_options: {' '.join(bad)!r} is not NAME=VALUE with an XLA option's name "
                          "(xla_...), e.g. xla_gpu_dot_merger_threshold_mb=0")
        if o.learning_rate <= 0:
            errors.append(f"optim.learning_rate={o.learning_rate} must be positive")
        if o.warmup_steps < 0:
            errors.append(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
        if self.sharding.zero_stage not in (0, 1, 2, 3):
            errors.append(f"sharding.zero_stage={self.sharding.zero_stage} must be one of 0, 1, 2, 3")
        for axis in ("data", "fsdp", "tensor"):
            size = getattr(self.mesh, axis)
            if size == 0 or size < -1:
                errors.append(f"mesh.{axis}={size} must be a positive size or -1 (the rest of the devices)")
        if sum(getattr(self.mesh, a) == -1 for a in ("data", "fsdp", "tensor")) > 1:
            errors.append("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        if self.checkpoint.every_steps <= 0 or self.checkpoint.keep <= 0:
            errors.append("checkpoint.every_steps and checkpoint.keep must be positive")
        if errors:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
        return self


# ---------------------------------------------------------------------- loading

_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(key: str, value: Any, tp: Any, choices: Optional[tuple]) -> Any:
    optional, base = _is_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key} may not be null; expected {base.__name__}")
    try:
        if base is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                out = value.lower() in ("true", "yes", "on", "1")
            elif isinstance(value, int) and value in (0, 1):
                out = bool(value)
            else:
                raise ValueError
        elif base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                out = int(value)
            else:
                out = int(str(value).replace("_", ""))
        elif base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        elif base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            out = str(value)
        else:  # pragma: no cover - no other field types exist
            out = value
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {base.__name__}") from None
    if choices is not None and out is not None and out not in choices:
        hint = difflib.get_close_matches(str(out), choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}={out!r} is not one of {list(choices)}{extra}")
    return out


def _unknown(key: str, valid: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(f"unknown config key {key!r}{extra}; valid keys here: {', '.join(valid)}")


def _set_field(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config keys look like section.key, got {dotted!r}; sections: {', '.join(_SECTIONS)}")
    section_name, name = parts
    if section_name not in _SECTIONS:
        raise _unknown(section_name, list(_SECTIONS))
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        raise _unknown(dotted, list(fields))
    types_ = _field_types(type(section))
    setattr(section, name, _coerce(dotted, value, types_[name], fields[name].metadata.get("choices")))


def config_from_dict(tree: dict, base: Optional[Config] = None) -> Config:
    """Apply a nested {section: {key: value}} dict onto ``base`` (default: all defaults)."""
    cfg = base if base is not None else Config()
    if tree is None:
        return cfg
    if not isinstance(tree, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(tree).__name__}")
    for section_name, section in tree.items():
        if section_name not in _SECTIONS:
            raise _unknown(str(section_name), list(_SECTIONS))
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"config section {section_name!r} must be a mapping, got {section!r}")
        for name, value in section.items():
            _set_field(cfg, f"{section_name}.{name}", value)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML experiment file (or defaults when ``path`` is None), apply ``overrides``
    (``["model.d_model=256", ...]``) and validate."""
    cfg = Config()
    if path is not None:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        cfg = config_from_dict(tree or {}, cfg)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_field(cfg, key, value)
    return cfg.validate()


# How the model computes, not what it is: a run may continue with other values of these.
COMPUTE_ONLY = frozenset({"model.attention", "model.remat", "model.scan_unroll", "model.decode_scan_unroll",
                          "model.decode_stop_every", "model.fused_qkv", "model.fused_mlp", "data.workers"})


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:key=value,key=value`` (a named set of overrides, as the benches take) -> (NAME, overrides).
    A comma starts a new override only before ``key=``: values may hold commas
    (``lora:model.lora_rank=8,model.lora_targets=query,value``)."""
    name, sep, rest = text.partition(":")
    overrides = [x.strip() for x in re.split(r",(?=\s*[\w.]+=)", rest) if x.strip()]
    if not sep or not name or not overrides or any("=" not in x for x in overrides):
        raise ConfigError(f"variant {text!r}: expected NAME:key=value[,key=value...], e.g. remat_full:model.remat=full")
    return name, overrides


def config_diff(a: Config, b: Config, sections: tuple[str, ...] = ("model", "data"),
                ignore: frozenset = frozenset()) -> list[str]:
    """Keys (within ``sections``, other than ``ignore``) whose values differ between two configs."""
    out = []
    da, db = a.to_dict(), b.to_dict()
    for s in sections:
        for k in da[s]:
            if f"{s}.{k}" not in ignore and da[s][k] != db[s][k]:
                out.append(f"{s}.{k}: {da[s][k]!r} -> {db[s][k]!r}")
    return out
