"""t5x_lite: encoder, decoder and encoder-decoder transformers in JAX/Flax, sharded over one mesh.

The stable Python interface::

    cfg = t5x_lite.load_config("configs/decoder_tiny.yaml", ["train.steps=10"])
    model = t5x_lite.build_model(cfg)
    params = t5x_lite.init_params(cfg, seed=0)
    logits = t5x_lite.logits(cfg, params, input_ids)   # float32 [batch, length, vocab]
    new_ids = t5x_lite.generate(cfg, params, prompts, max_new_tokens=32)  # int32 [batch, new]
    scores = t5x_lite.score_tokens(cfg, params, inputs, targets=answers)  # log p(answer | input), by token

The model functions are imported on first use, so ``import t5x_lite`` (and the data tools'
worker processes) do not pay for importing JAX and Flax.
"""

import importlib

from t5x_lite.config import Config, ConfigError, load_config

_LAZY = {"build_model": "t5x_lite.models", "init_params": "t5x_lite.models", "logits": "t5x_lite.models",
         "encode": "t5x_lite.models", "generate": "t5x_lite.decoding", "fill_mask": "t5x_lite.decoding",
         "score_tokens": "t5x_lite.decoding"}

__all__ = ["Config", "ConfigError", "load_config", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 't5x_lite' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
