"""Hugging Face ``tokenizer.json`` files (byte-level BPE of GPT-2 / LLaMA 3 / Mistral, and any
other model the ``tokenizers`` library reads) behind the project's tokenizer interface.

The ``tokenizers`` library does the tokenizing; this module only names the special tokens the
pipeline needs. Those come from ``tokenizer_config.json`` beside the file (``eos_token``,
``bos_token``, ``pad_token``, ``unk_token``, ``mask_token``), else from the usual spellings
(``<|endoftext|>``, ``</s>``, ...). A model without a pad token (GPT-2) pads with its end-of-text
id: padded positions carry weight 0, so the id never matters there.

A work dir keeps one JSON file (``tokenizer.model``): the ``tokenizer.json`` text and the names
of the special tokens, so a copied work dir decodes without the original directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

from t5x_lite.data import DataError
from t5x_lite.data.tokenizer import ids_until_eos

FORMAT = "hf_tokenizers"
ROLES = ("eos", "bos", "pad", "unk", "mask")
FALLBACKS = {
    "eos": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]"),
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]", "<|endoftext|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]", "<|endoftext|>"),
    "mask": ("<mask>", "[MASK]"),
}


def is_hf_tokenizer(data) -> bool:
    """A ``tokenizers`` serialisation (what that library's ``Tokenizer.save`` writes), or the
    work-dir copy ``HFTokenizer.save`` writes."""
    return isinstance(data, dict) and (("model" in data and "added_tokens" in data) or data.get("format") == FORMAT)


def _token_name(value) -> Optional[str]:
    """``tokenizer_config.json`` writes a special token as a string or as ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer:
    """The project's tokenizer interface over a ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer_json: str, specials: Optional[dict] = None):
        try:
            from tokenizers import Tokenizer as _Backend
        except ImportError:
            raise DataError("reading a Hugging Face tokenizer.json needs the `tokenizers` package: "
                            "pip install tokenizers (or t5x_lite[hf])") from None
        try:
            self._tok = _Backend.from_str(tokenizer_json)
        except Exception as e:  # the library raises its own exception types
            raise DataError(f"not a readable Hugging Face tokenizer.json: {e}") from None
        self._json = tokenizer_json
        vocab = self._tok.get_vocab(with_added_tokens=True)
        names = {}
        for role in ROLES:
            given = _token_name((specials or {}).get(role))
            if given is not None and given not in vocab:
                raise DataError(f"the tokenizer's {role} token {given!r} is not in its vocabulary")
            names[role] = given or next((t for t in FALLBACKS[role] if t in vocab), None)
        if names["eos"] is None:
            raise DataError("the tokenizer names no end-of-text token (eos_token in tokenizer_config.json) and has "
                            f"none of {list(FALLBACKS['eos'])}; documents need one between them")
        self._names = names
        self._ids = {role: (vocab[name] if name is not None else None) for role, name in names.items()}
        self._vocab_size = max(vocab.values()) + 1

    @classmethod
    def load(cls, path: str) -> "HFTokenizer":
        """A ``tokenizer.json`` (special tokens from ``tokenizer_config.json`` beside it), or the
        one-file JSON that ``save`` writes."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            data = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read Hugging Face tokenizer {path!r}: {e}") from None
        return cls.from_parsed(path, text, data)

    @classmethod
    def from_parsed(cls, path: str, text: str, data: dict) -> "HFTokenizer":
        """``load`` of a file already read (``text``) and parsed (``data``)."""
        if data.get("format") == FORMAT:
            return cls(data["tokenizer"], data["specials"])
        config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        specials = {}
        if os.path.exists(config):
            with open(config, encoding="utf-8") as f:
                options = json.load(f)
            specials = {role: _token_name(options.get(f"{role}_token")) for role in ROLES}
        return cls(text, specials)

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "tokenizer": self._json, "specials": self._names}, f)
        os.replace(tmp, path)

    # ---------------------------------------------------------------- ids

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    eos_id = property(lambda self: self._ids["eos"])
    bos_id = property(lambda self: self._ids["bos"] if self._ids["bos"] is not None else self._ids["eos"])
    pad_id = property(lambda self: self._ids["pad"] if self._ids["pad"] is not None else self._ids["eos"])
    unk_id = property(lambda self: self._ids["unk"] if self._ids["unk"] is not None else -1)
    mask_id = property(lambda self: self._ids["mask"])
    sentinel_ids = property(lambda self: [])

    @property
    def mask_token(self) -> Optional[str]:
        return self._names["mask"]

    @property
    def special_ids(self) -> frozenset:
        return frozenset(i for i in self._ids.values() if i is not None and i >= 0)

    @property
    def sha256(self) -> str:
        return hashlib.sha256((json.dumps(self._names, sort_keys=True) + self._json).encode()).hexdigest()

    # ---------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without the template's added tokens (the pipeline adds eos itself)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text up to the first end-of-text id, special tokens dropped."""
        return self._tok.decode(ids_until_eos(ids, self.eos_id), skip_special_tokens=True)

    def token_name(self, i: int) -> str:
        """The token of id ``i`` as the vocabulary spells it."""
        return self._tok.id_to_token(int(i)) or f"<{int(i)}>"

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos={self._names['eos']!r})"
