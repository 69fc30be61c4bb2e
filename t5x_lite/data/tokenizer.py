"""A sentencepiece tokenizer with fixed special ids.

Models trained here use: pad=0 ``<pad>``, eos=1 ``</s>``, unk=2 ``<unk>``, bos=3 ``<s>``,
mask=4 ``<mask>`` and sentinels ``<extra_id_0>`` ... ``<extra_id_{n-1}>`` at ids 5 ... 5+n-1.
``<mask>`` and the sentinels are user-defined symbols, so typing them in text encodes them to
their ids. Normalisation is the identity and whitespace is kept, with byte fallback, so
``decode(encode(text)) == text`` for any text.

Models trained elsewhere (e.g. T5's ``spiece.model``) load too: the ids are read from the model;
bos falls back to pad when the model has none; a missing ``<mask>`` or missing sentinels read as
``None`` / ``[]`` and only the objectives that need them complain.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Iterator, Optional

import sentencepiece as spm

from t5x_lite.data import DataError
from t5x_lite.data.shards import atomic_write

PAD, EOS, UNK, BOS, MASK = "<pad>", "</s>", "<unk>", "<s>", "<mask>"
NUM_BYTE_PIECES = 256  # byte_fallback adds one piece per byte value
MIN_LEARNED_PIECES = 32  # room for the corpus' characters and a few merges


def sentinel_piece(i: int) -> str:
    return f"<extra_id_{i}>"


def min_vocab_size(num_sentinels: int) -> int:
    """Smallest vocab a trained tokenizer may have: 5 specials, the sentinels, 256 byte pieces
    and at least 32 learned pieces."""
    return 5 + num_sentinels + NUM_BYTE_PIECES + MIN_LEARNED_PIECES


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Sentencepiece learns from lines; newlines in a document are byte-fallback pieces."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def ids_until_eos(ids: Iterable[int], eos_id: int, drop: Iterable[int] = ()) -> list[int]:
    """``ids`` as ints up to (not including) the first ``eos_id``, without those in ``drop``."""
    dropped, out = set(drop), []
    for i in map(int, ids):
        if i == eos_id:
            break
        if i not in dropped:
            out.append(i)
    return out


class Tokenizer:
    """Wraps a ``sentencepiece.SentencePieceProcessor`` built from serialized model bytes."""

    mask_token = MASK

    def __init__(self, model_bytes: bytes):
        self._bytes = model_bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.num_threads = os.cpu_count() or 1
        self._mask_id = self._id_of(MASK)
        self._sentinel_ids = []
        while (i := self._id_of(sentinel_piece(len(self._sentinel_ids)))) is not None:
            self._sentinel_ids.append(i)
        specials = {self.pad_id, self.eos_id, self.unk_id, self.bos_id, *self._sentinel_ids}
        if self._mask_id is not None:
            specials.add(self._mask_id)
        self._special_ids = frozenset(i for i in specials if i >= 0)

    # ---------------------------------------------------------------- construction

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Load a sentencepiece ``.model`` file. A BERT WordPiece ``vocab.txt`` (or the JSON its
        tokenizer saves) loads as the same-interfaced ``interop.wordpiece.WordPieceTokenizer``; a
        Hugging Face ``tokenizer.json`` (or its saved copy) as ``interop.hf_tokenizer.HFTokenizer``."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"cannot read tokenizer model {path!r}: {e}") from None
        if data.lstrip().startswith(b"{"):  # JSON: a Hugging Face tokenizer (or our copy of one), parsed once
            import json

            from t5x_lite.interop.hf_tokenizer import HFTokenizer, is_hf_tokenizer

            try:
                text = data.decode("utf-8")
                parsed = json.loads(text)
            except (ValueError, UnicodeDecodeError):
                parsed = None
            if is_hf_tokenizer(parsed):
                return HFTokenizer.from_parsed(path, text, parsed)
        if path.endswith(".txt") or data.startswith(b"{"):
            from t5x_lite.interop.wordpiece import WordPieceTokenizer

            return WordPieceTokenizer.load(path)
        try:
            return cls(data)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{path!r} is not a sentencepiece model: {e}") from None

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        path: str,
        vocab_size: int,
        num_sentinels: int,
        seed: int = 0,
        input_sentence_size: int = 300_000,
    ) -> "Tokenizer":
        """Train a unigram model with exactly ``vocab_size`` pieces and write it to ``path``.

        Training sees at most ``input_sentence_size`` lines (a shuffled sample). The model file
        is written atomically (``save``).
        """
        minimum = min_vocab_size(num_sentinels)
        if vocab_size < minimum:
            raise DataError(
                f"model.vocab_size={vocab_size} is too small for data.num_sentinels={num_sentinels}: "
                f"a trained tokenizer needs at least {minimum} pieces (5 specials + {num_sentinels} "
                f"sentinels + {NUM_BYTE_PIECES} byte pieces + {MIN_LEARNED_PIECES} learned); "
                "raise model.vocab_size or lower data.num_sentinels"
            )
        model = io.BytesIO()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_lines(texts),
                model_writer=model,
                model_type="unigram",
                vocab_size=vocab_size,
                pad_id=0, eos_id=1, unk_id=2, bos_id=3,
                pad_piece=PAD, eos_piece=EOS, unk_piece=UNK, bos_piece=BOS,
                user_defined_symbols=[MASK] + [sentinel_piece(i) for i in range(num_sentinels)],
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                num_threads=2,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise DataError(
                f"sentencepiece could not train a {vocab_size}-piece tokenizer: {e}\n"
                "hint: 'Vocabulary size too high' means the corpus is too small for that many pieces "
                "(lower model.vocab_size / --vocab-size, or add data); 'smaller than required_chars' means "
                "it is too small for the corpus' characters (raise it)"
            ) from None
        tokenizer = cls(model.getvalue())
        tokenizer.save(path)
        return tokenizer

    def save(self, path: str) -> None:
        """Write the model bytes to ``path`` atomically (temporary file, fsync, rename)."""
        atomic_write(path, lambda f: f.write(self._bytes))

    # ---------------------------------------------------------------- ids

    def _id_of(self, piece: str) -> Optional[int]:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """The model's pad id; 0 when it has none (packed arrays always pad with 0)."""
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else 0

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        """The model's bos id; pad when it has none (T5 starts its decoder with pad)."""
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else self.pad_id

    @property
    def mask_id(self) -> Optional[int]:
        """Id of ``<mask>``; None when the model has no such piece."""
        return self._mask_id

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... as far as the model has them."""
        return list(self._sentinel_ids)

    @property
    def special_ids(self) -> frozenset:
        """pad, eos, unk, bos, mask and the sentinels (those the model has)."""
        return self._special_ids

    @property
    def sha256(self) -> str:
        """Hex digest of the serialized model."""
        return hashlib.sha256(self._bytes).hexdigest()

    # ---------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts with ``num_threads`` sentencepiece threads."""
        return self._sp.encode(list(texts), num_threads=self.num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to (not including) the first eos; pads are dropped."""
        return self._sp.decode(ids_until_eos(ids, self.eos_id, drop=(self.pad_id,)))

    def token_name(self, i: int) -> str:
        """The piece of id ``i`` as the vocabulary spells it (``</s>``, ``▁the``)."""
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
