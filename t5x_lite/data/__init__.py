"""The data side of t5x_lite: corpus readers, the sentencepiece tokenizer, the prepared-corpus
format and ``t5x-lite prepare``, packing and the deterministic batch source. Everything here is
plain numpy; nothing imports JAX."""


class DataError(ValueError):
    """A data problem (empty corpus, missing field, tokenizer mismatch...), reported with what to fix."""


from t5x_lite.data.corpus import load_documents, read_documents, stdlib_docstrings  # noqa: E402
from t5x_lite.data.pipeline import Batches, make_datasets, pack_sequences  # noqa: E402
from t5x_lite.data.shards import TokenStore  # noqa: E402
from t5x_lite.data.tokenizer import Tokenizer, min_vocab_size  # noqa: E402

__all__ = [
    "Batches",
    "DataError",
    "TokenStore",
    "Tokenizer",
    "load_documents",
    "make_datasets",
    "min_vocab_size",
    "pack_sequences",
    "read_documents",
    "stdlib_docstrings",
]
