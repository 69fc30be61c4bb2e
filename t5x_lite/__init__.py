"""t5x_lite: encoder, decoder and encoder-decoder transformers in JAX/Flax, sharded over one mesh.

The stable Python interface::

    cfg = t5x_lite.load_config("configs/decoder_tiny.yaml", ["train.steps=10"])
    model = t5x_lite.build_model(cfg)
    params = t5x_lite.init_params(cfg, seed=0)
    logits = t5x_lite.logits(cfg, params, input_ids)   # float32 [batch, length, vocab]
"""

from t5x_lite.config import Config, ConfigError, load_config
from t5x_lite.models import build_model, init_params, logits

__all__ = ["Config", "ConfigError", "load_config", "build_model", "init_params", "logits"]
__version__ = "0.1.0"
