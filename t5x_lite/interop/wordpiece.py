"""BERT's WordPiece tokenizer (``vocab.txt``), with the interface of ``t5x_lite.data.Tokenizer``.

Text is cleaned, split around CJK characters, whitespace and punctuation, lower-cased with
accents stripped (``do_lower_case``), then each word is cut greedily into the longest vocabulary
pieces (continuations carry ``##``); a word that cannot be cut is ``[UNK]``. Special tokens
written in the text (``[MASK]``, also ``<mask>``) stay whole. Ids: pad ``[PAD]``, bos ``[CLS]``,
eos ``[SEP]``, unk ``[UNK]``, mask ``[MASK]``; ``encode`` adds none of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from typing import Iterable, Optional

from t5x_lite.data import DataError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # longer words are [UNK], as in BERT


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def _clean(text: str) -> str:
    """Drop NUL, U+FFFD and control characters; every whitespace becomes a space; CJK characters
    stand alone."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp in (0, 0xFFFD) or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
            continue
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return "".join(out)


def _strip_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def _split_punctuation(word: str) -> list[str]:
    pieces, current = [], ""
    for ch in word:
        if _is_punctuation(ch):
            if current:
                pieces.append(current)
            pieces.append(ch)
            current = ""
        else:
            current += ch
    return pieces + ([current] if current else [])


class WordPieceTokenizer:
    """A WordPiece vocabulary: token -> id is the line number in ``vocab.txt``."""

    def __init__(self, vocab_text: str, lower_case: bool = True, strip_accents: Optional[bool] = None):
        self._text = vocab_text
        tokens = vocab_text.splitlines()
        self._ids = {t: i for i, t in enumerate(tokens)}
        self._tokens = tokens
        missing = [s for s in SPECIALS if s not in self._ids]
        if missing:
            raise DataError(f"the WordPiece vocabulary lacks {missing}")
        self.lower_case = lower_case
        self.strip_accents = lower_case if strip_accents is None else strip_accents
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS + ("<mask>",)) + ")")

    @classmethod
    def load(cls, path: str) -> "WordPieceTokenizer":
        """``vocab.txt`` with casing from ``tokenizer_config.json`` beside it (default uncased), or
        the JSON file ``save`` writes (vocabulary and casing in one file)."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read WordPiece vocabulary {path!r}: {e}") from None
        if text.startswith("{"):
            saved = json.loads(text)
            return cls(saved["vocab"], saved["lower_case"], saved["strip_accents"])
        options = {}
        config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.exists(config):
            with open(config) as f:
                options = json.load(f)
        return cls(text, lower_case=options.get("do_lower_case", True), strip_accents=options.get("strip_accents"))

    def save(self, path: str) -> None:
        """One JSON file (the work dir's ``tokenizer.model`` copy): vocabulary and casing."""
        saved = {"format": "wordpiece", "vocab": self._text, "lower_case": self.lower_case,
                 "strip_accents": self.strip_accents}
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(saved, f)
        os.replace(tmp, path)

    # ---------------------------------------------------------------- ids

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    pad_id = property(lambda self: self._ids["[PAD]"])
    unk_id = property(lambda self: self._ids["[UNK]"])
    bos_id = property(lambda self: self._ids["[CLS]"])
    eos_id = property(lambda self: self._ids["[SEP]"])
    mask_id = property(lambda self: self._ids["[MASK]"])
    sentinel_ids = property(lambda self: [])
    mask_token = "[MASK]"

    @property
    def special_ids(self) -> frozenset:
        return frozenset(self._ids[s] for s in SPECIALS)

    @property
    def sha256(self) -> str:
        flags = f"{self.lower_case}/{self.strip_accents}\n"
        return hashlib.sha256((flags + self._text).encode()).hexdigest()

    # ---------------------------------------------------------------- text

    def _words(self, text: str) -> list[str]:
        words = []
        for word in _clean(text).split():
            if self.lower_case:
                word = word.lower()
            if self.strip_accents:
                word = _strip_accents(word)
            words += _split_punctuation(word)
        return words

    def _pieces(self, word: str) -> list[int]:
        if len(word) > MAX_WORD_CHARS:
            return [self.unk_id]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self._ids:
                    out.append(self._ids[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk_id]
            start = end
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # a special token written in the text
                ids.append(self.mask_id if part == "<mask>" else self._ids[part])
                continue
            for word in self._words(part):
                ids += self._pieces(word)
        return ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text up to the first ``[SEP]``; ``[PAD]`` / ``[CLS]`` dropped; ``##`` pieces joined."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            token = self._tokens[i]
            if token.startswith("##") and words:
                words[-1] += token[2:]
            else:
                words.append(token)
        return " ".join(words)

    def token_name(self, i: int) -> str:
        """The vocabulary's token of id ``i`` (``[SEP]``, ``##ing``)."""
        return self._tokens[int(i)]

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, lower_case={self.lower_case})"
