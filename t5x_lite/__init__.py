"""t5x_lite: encoder, decoder and encoder-decoder transformers in JAX/Flax, sharded over one mesh.

The stable Python interface::

    cfg = t5x_lite.load_config("configs/decoder_tiny.yaml", ["train.steps=10"])
    model = t5x_lite.build_model(cfg)
    params = t5x_lite.init_params(cfg, seed=0)
    logits = t5x_lite.logits(cfg, params, input_ids)   # float32 [batch, length, vocab]
    new_ids = t5x_lite.generate(cfg, params, prompts, max_new_tokens=32)  # int32 [batch, new]
"""

from t5x_lite.config import Config, ConfigError, load_config
from t5x_lite.models import build_model, encode, init_params, logits
from t5x_lite.decoding import fill_mask, generate

__all__ = ["Config", "ConfigError", "load_config", "build_model", "init_params", "logits", "encode", "generate",
           "fill_mask"]
__version__ = "0.1.0"
