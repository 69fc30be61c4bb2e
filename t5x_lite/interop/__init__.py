"""Interop with other ecosystems: Hugging Face ``transformers`` model directories (``hf``).

``t5x_lite.interop.load`` / ``save`` are ``hf.load`` / ``hf.save``, imported on first use so that
``t5x_lite.data`` can use the WordPiece tokenizer without importing JAX.
"""


def __getattr__(name: str):
    if name in ("load", "save", "SUPPORTED"):
        from t5x_lite.interop import hf

        return getattr(hf, name)
    raise AttributeError(f"module 't5x_lite.interop' has no attribute {name!r}")


__all__ = ["load", "save", "SUPPORTED"]
