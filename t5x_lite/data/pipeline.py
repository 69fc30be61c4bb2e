"""Packing and the deterministic batch source.

``Batches.batches(step)`` is a pure function of (config, token documents, tokenizer, step):
documents (each + eos) are packed into rows once, in a seed-determined order; epoch e serves the
rows in the permutation ``default_rng([seed, stream, 1, e])``; step s takes global rows
[s*B, (s+1)*B) of the endless stream of epochs; row i of step s draws its objective randomness
from ``default_rng([seed, stream, 2, s, i])``. Resuming at any step needs no replay, and a
process can build its own slice of a global batch without building the rest.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from t5x_lite import objectives
from t5x_lite.data import DataError
from t5x_lite.data.corpus import load_documents
from t5x_lite.data.tokenizer import Tokenizer

_TRAIN_STREAM, _EVAL_STREAM = 0, 1
_ORDER, _EPOCH, _OBJECTIVE = 0, 1, 2  # rng namespaces
_CACHE_VERSION = "1"


# ---------------------------------------------------------------------- packing


def _chunk_lengths(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Lengths of the chunks (each <= max_len) that sequences of ``lengths`` are cut into, in order."""
    lengths = np.asarray(lengths, np.int64)
    n_chunks = -(-lengths // max_len)
    seq_of_chunk = np.repeat(np.arange(len(lengths)), n_chunks)
    index_in_seq = np.arange(int(n_chunks.sum())) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    return np.minimum(max_len, lengths[seq_of_chunk] - index_in_seq * max_len)


def _next_fit(sizes: np.ndarray, capacities: Sequence[int]) -> np.ndarray:
    """Greedy in-order bin assignment: item i joins the current row unless one of its sizes
    would overflow that row's capacity, in which case a new row starts.

    sizes: int [N, k] (each item's size in each of k dimensions, every one <= its capacity).
    Returns int64 [N]: the row of each item (non-decreasing from 0).
    """
    rows = np.empty(len(sizes), np.int64)
    row, used = 0, [0] * len(capacities)
    for i, size in enumerate(sizes.tolist()):
        if any(u + s > c for u, s, c in zip(used, size, capacities)):
            row, used = row + 1, [0] * len(capacities)
        used = [u + s for u, s in zip(used, size)]
        rows[i] = row
    return rows


def _scatter(flat: np.ndarray, piece_lengths: np.ndarray, piece_rows: np.ndarray, num_rows: int, length: int):
    """Lay pieces out as packed rows.

    flat: int [T], the pieces back to back; piece_lengths, piece_rows: int [P], with every row's
    pieces consecutive and in row order. Returns ``(tokens, segment_ids, positions)``, int32
    [num_rows, length]: a row's pieces are its segments 1..k, positions restart per piece, pads are 0.
    """
    tokens = np.zeros((num_rows, length), np.int32)
    segment_ids = np.zeros((num_rows, length), np.int32)
    positions = np.zeros((num_rows, length), np.int32)
    if len(piece_lengths) == 0:
        return tokens, segment_ids, positions
    piece_lengths = np.asarray(piece_lengths, np.int64)
    piece_rows = np.asarray(piece_rows, np.int64)
    piece_start = np.cumsum(piece_lengths) - piece_lengths
    new_row = np.ones(len(piece_rows), bool)
    new_row[1:] = piece_rows[1:] != piece_rows[:-1]
    row_first_piece = np.flatnonzero(new_row)[np.cumsum(new_row) - 1]  # [P]
    piece_column = piece_start - piece_start[row_first_piece]
    piece_segment = np.arange(len(piece_lengths)) - row_first_piece + 1

    piece_of_token = np.repeat(np.arange(len(piece_lengths)), piece_lengths)
    position = np.arange(len(flat)) - piece_start[piece_of_token]
    row = piece_rows[piece_of_token]
    column = piece_column[piece_of_token] + position
    tokens[row, column] = flat
    segment_ids[row, column] = piece_segment[piece_of_token]
    positions[row, column] = position
    return tokens, segment_ids, positions


def pack_sequences(seqs: Sequence[np.ndarray], length: int):
    """Greedy in-order packing of 1-D int sequences into rows of ``length``.

    A sequence longer than ``length`` is first cut into chunks of at most ``length``; each chunk
    is a segment of its own. A new row starts when the next chunk does not fit. Returns
    ``(tokens, segment_ids, positions)``, int32 [N, length], as ``_scatter`` lays them out.
    """
    lengths = np.array([len(s) for s in seqs], np.int64)
    flat = np.concatenate([np.asarray(s, np.int32) for s in seqs]) if len(seqs) else np.zeros(0, np.int32)
    chunks = _chunk_lengths(lengths, length)
    rows = _next_fit(chunks[:, None], (length,))
    return _scatter(flat, chunks, rows, int(rows[-1]) + 1 if len(rows) else 0, length)


# ---------------------------------------------------------------------- the batch source


class Batches:
    """Deterministic, stateless batches of one objective over tokenized documents.

    documents: int arrays (token ids, no eos; eos is appended here). ``stream`` separates the
    randomness of train (0) and eval (1). ``num_batches``: how many batches iteration yields
    (eval); None iterates forever.

    Keys of ``batches(step)``, every array [B, L]:
      causal / mlm: input_ids, targets, weights, segment_ids, positions (L = data.seq_len);
      prefix: the same plus prefix_mask (bool);
      span (encoder_decoder): encoder_input_ids, encoder_segment_ids, encoder_positions
      (L = data.seq_len) and decoder input_ids, targets, weights, segment_ids, positions
      (L = target_len).
    """

    def __init__(
        self,
        cfg,
        documents: Sequence[np.ndarray],
        tokenizer: Tokenizer,
        *,
        stream: int = _TRAIN_STREAM,
        num_batches: Optional[int] = None,
    ):
        d = cfg.data
        self.objective = cfg.objective
        self.batch_size = cfg.train.batch_size
        self.seq_len = d.seq_len
        self.num_batches = num_batches
        self._cfg = d
        self._seed = cfg.train.seed
        self._stream = stream
        self._tokenizer = tokenizer
        self._setup_objective()
        if len(documents) == 0:
            raise DataError("no documents to batch: the corpus (or this split of it) is empty")
        self.num_documents = len(documents)

        order = np.random.default_rng([self._seed, stream, _ORDER]).permutation(len(documents))
        eos = np.array([tokenizer.eos_id], np.int32)
        docs = [np.asarray(documents[i], np.int32) for i in order]
        self._flat = np.concatenate([x for doc in docs for x in (doc, eos)])
        doc_lengths = np.array([len(doc) + 1 for doc in docs], np.int64)
        self.num_tokens = int(doc_lengths.sum())
        if self.objective == "span":
            self._pack_span(doc_lengths)
        else:
            self.target_len = self.seq_len
            chunks = _chunk_lengths(doc_lengths, self.seq_len)
            rows = _next_fit(chunks[:, None], (self.seq_len,))
            self._rows = _scatter(self._flat, chunks, rows, int(rows[-1]) + 1, self.seq_len)
            self.rows_per_epoch = len(self._rows[0])
            self.packing_efficiency = float((self._rows[1] > 0).mean())
        self._permutations: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------ setup

    def _setup_objective(self) -> None:
        """Check that the tokenizer has what the objective needs; for span corruption also fix
        the raw chunk length and the decoder length."""
        tok, d = self._tokenizer, self._cfg
        if self.objective == "mlm" and tok.mask_id is None:
            raise DataError("the mlm objective needs a '<mask>' piece, and the tokenizer has none")
        if self.objective == "span":
            self._raw_len, derived_target_len = objectives.span_corruption_raw_length(
                d.seq_len, d.noise_density, d.mean_span_length
            )
            if d.target_len is not None and d.target_len < derived_target_len:
                raise DataError(
                    f"data.target_len={d.target_len} is too small: span corruption of data.seq_len={d.seq_len} "
                    f"(noise {d.noise_density}, mean span {d.mean_span_length}) makes targets of up to "
                    f"{derived_target_len} tokens; set data.target_len >= {derived_target_len} or leave it unset"
                )
            self.target_len = d.target_len or derived_target_len
            spans = objectives.num_noise_spans(self._raw_len, d.noise_density, d.mean_span_length)
            if spans > len(tok.sentinel_ids):
                raise DataError(
                    f"span corruption of data.seq_len={d.seq_len} needs up to {spans} sentinels, but the "
                    f"tokenizer has {len(tok.sentinel_ids)} (<extra_id_N> pieces); raise data.num_sentinels "
                    "and retrain the tokenizer, or shorten data.seq_len"
                )

    def _pack_span(self, doc_lengths: np.ndarray) -> None:
        """Cut documents into raw chunks of <= raw_len and pack them so that every row's corrupted
        inputs fit seq_len and its targets fit target_len (both depend only on chunk lengths)."""
        d = self._cfg
        chunks = _chunk_lengths(doc_lengths, self._raw_len)
        table = np.array(
            [objectives.span_lengths(n, d.noise_density, d.mean_span_length) for n in range(self._raw_len + 1)]
        )
        sizes = table[chunks]  # [C, 2]: inputs_len, targets_len
        rows = _next_fit(sizes, (self.seq_len, self.target_len))
        self._chunk_start = np.cumsum(chunks) - chunks
        self._chunk_length = chunks
        self._row_first_chunk = np.searchsorted(rows, np.arange(rows[-1] + 1))
        self._row_num_chunks = np.bincount(rows)
        self.rows_per_epoch = len(self._row_num_chunks)
        self.packing_efficiency = float(sizes[:, 0].sum() / (self.rows_per_epoch * self.seq_len))

    # ------------------------------------------------------------ row selection

    def _permutation(self, epoch: int) -> np.ndarray:
        """The row order of ``epoch`` (a few recent ones are memoised)."""
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self._seed, self._stream, _EPOCH, epoch]).permutation(self.rows_per_epoch)
            if len(self._permutations) >= 4:
                self._permutations.clear()
            self._permutations[epoch] = perm
        return perm

    def _row_ids(self, start: int, count: int) -> np.ndarray:
        """Packed-row ids of global stream positions [start, start + count)."""
        g = np.arange(start, start + count)
        epochs, index = np.divmod(g, self.rows_per_epoch)
        out = np.empty(count, np.int64)
        for e in np.unique(epochs):
            at = epochs == e
            out[at] = self._permutation(int(e))[index[at]]
        return out

    # ------------------------------------------------------------ serving

    def batches(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """The batch of ``step``: all B rows, or this process's contiguous B/process_count of them."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.batch_size % process_count:
            raise DataError(
                f"train.batch_size={self.batch_size} is not divisible by process_count={process_count}"
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} is outside [0, {process_count})")
        per_process = self.batch_size // process_count
        first = process_index * per_process
        rows = self._row_ids(step * self.batch_size + first, per_process)
        if self.objective == "causal":
            tokens, segment_ids, positions = (a[rows] for a in self._rows)
            return objectives.causal_lm(tokens, segment_ids, positions, self._tokenizer.bos_id)
        rngs = [
            np.random.default_rng([self._seed, self._stream, _OBJECTIVE, step, first + i])
            for i in range(per_process)
        ]
        if self.objective == "span":
            return self._span_batch(rows, rngs)
        return self._dense_batch(rows, rngs)

    __call__ = batches  # ``ds(step, process_index, process_count)`` works too

    def _dense_batch(self, rows: np.ndarray, rngs: list) -> dict[str, np.ndarray]:
        """prefix / mlm: the objective applied row by row, each row with its own generator."""
        tokens, segment_ids, positions = (a[rows] for a in self._rows)
        tok = self._tokenizer
        if self.objective == "prefix":
            per_row = [
                objectives.prefix_lm(tokens[i : i + 1], segment_ids[i : i + 1], positions[i : i + 1], tok.bos_id, rng)
                for i, rng in enumerate(rngs)
            ]
        else:
            per_row = [
                objectives.mlm(
                    tokens[i : i + 1], segment_ids[i : i + 1], positions[i : i + 1], rng,
                    mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=tok.special_ids,
                    rate=self._cfg.mlm_rate,
                )
                for i, rng in enumerate(rngs)
            ]
        return {k: np.concatenate([r[k] for r in per_row]) for k in per_row[0]}

    def _span_batch(self, rows: np.ndarray, rngs: list) -> dict[str, np.ndarray]:
        d, tok = self._cfg, self._tokenizer
        inputs, targets, piece_rows = [], [], []
        for i, (row, rng) in enumerate(zip(rows, rngs)):
            first = self._row_first_chunk[row]
            for c in range(first, first + self._row_num_chunks[row]):
                start = self._chunk_start[c]
                x, y = objectives.span_corrupt(
                    self._flat[start : start + self._chunk_length[c]], rng,
                    noise_density=d.noise_density, mean_span_length=d.mean_span_length,
                    sentinel_ids=tok.sentinel_ids, eos_id=tok.eos_id,
                )
                inputs.append(x)
                targets.append(y)
                piece_rows.append(i)
        n = len(rows)
        enc = _scatter(np.concatenate(inputs), [len(x) for x in inputs], piece_rows, n, self.seq_len)
        dec_targets, dec_segments, dec_positions = _scatter(
            np.concatenate(targets), [len(y) for y in targets], piece_rows, n, self.target_len
        )
        return {
            "encoder_input_ids": enc[0],
            "encoder_segment_ids": enc[1],
            "encoder_positions": enc[2],
            "input_ids": objectives.shift_right(dec_targets, dec_segments, tok.bos_id),
            "targets": dec_targets,
            "weights": (dec_segments > 0).astype(np.float32),
            "segment_ids": dec_segments,
            "positions": dec_positions,
        }

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        steps = range(self.num_batches) if self.num_batches is not None else itertools.count()
        return (self.batches(step) for step in steps)

    def __repr__(self) -> str:
        return (
            f"Batches({self.objective}, docs={self.num_documents}, tokens={self.num_tokens}, "
            f"rows={self.rows_per_epoch}, packing={self.packing_efficiency:.1%})"
        )


# ---------------------------------------------------------------------- datasets


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _split_unit(n: int, seed: int) -> np.ndarray:
    """float64 [n] in [0, 1): a stable hash of (seed, document index), the splitmix64 stream
    seeded by ``seed``."""
    with np.errstate(over="ignore"):
        base = _mix64(np.array([seed % 2**64], np.uint64))
        z = _mix64(base + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def split_documents(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, eval_indices) of n documents: disjoint, covering, sorted.

    A document is held out when its hash is below ``eval_fraction``. With a fraction > 0 and
    n >= 2 there is at least one eval and one train document.
    """
    u = _split_unit(n, seed)
    held_out = u < eval_fraction
    if eval_fraction > 0 and n >= 2:
        held_out[np.argmin(u)] = True
        held_out[np.argmax(u)] = False
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def _corpus_fingerprint(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _atomic_savez(path: str, **arrays) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".cache-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _flatten(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(x) for x in ids], np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(lengths.sum()))
    return flat, lengths


def _unflatten(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _tokenize_cached(tokenizer, train_docs, eval_docs, key: str, cache_dir: str):
    """Token ids of both splits, from ``cache_dir/<key>.npz`` when present. Returns
    ``(train_ids, eval_ids, cache_hit)``, each a list of int32 arrays."""
    path = os.path.join(cache_dir, f"{key}.npz")
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as z:
            return _unflatten(z["train"], z["train_lengths"]), _unflatten(z["eval"], z["eval_lengths"]), True
    train_flat, train_lengths = _flatten(tokenizer.encode_batch(train_docs))
    eval_flat, eval_lengths = _flatten(tokenizer.encode_batch(eval_docs) if eval_docs else [])
    _atomic_savez(path, train=train_flat, train_lengths=train_lengths, eval=eval_flat, eval_lengths=eval_lengths)
    return _unflatten(train_flat, train_lengths), _unflatten(eval_flat, eval_lengths), False


def _get_tokenizer(cfg, workdir: str, train_docs: list[str], log: Callable) -> Tokenizer:
    """``data.tokenizer`` if set, else ``workdir/tokenizer.model`` if present, else a new one
    trained on the training documents and saved there."""
    t0 = time.perf_counter()
    path = cfg.data.tokenizer or os.path.join(workdir, "tokenizer.model")
    if cfg.data.tokenizer or os.path.exists(path):
        tok = Tokenizer.load(path)
        how = f"loaded {path}"
    else:
        tok = Tokenizer.train(
            train_docs, path, cfg.model.vocab_size, cfg.data.num_sentinels, seed=cfg.train.seed
        )
        how = f"trained on {len(train_docs)} docs -> {path}"
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"the tokenizer {path} has {tok.vocab_size} pieces, more than model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size >= {tok.vocab_size}"
        )
    log(f"data: tokenizer {how} (vocab {tok.vocab_size}, {len(tok.sentinel_ids)} sentinels) "
        f"in {time.perf_counter() - t0:.1f}s")
    return tok


def make_datasets(cfg, workdir: str, log: Callable[[str], None] = print):
    """Corpus -> (tokenizer, train Batches, eval Batches or None).

    Documents are split by a stable hash of (index, train.seed) with ``data.eval_fraction`` held
    out. Token ids are cached in ``workdir/data_cache/<key>.npz``. Eval serves
    ``train.eval_batches`` fixed batches; it is None when no document is held out.
    """
    t0 = time.perf_counter()
    docs = load_documents(cfg.data)
    train_idx, eval_idx = split_documents(len(docs), cfg.data.eval_fraction, cfg.train.seed)
    train_docs = [docs[i] for i in train_idx]
    eval_docs = [docs[i] for i in eval_idx]
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    source = cfg.data.path or "stdlib docstrings"
    log(f"data: corpus {source}: {len(docs)} docs ({len(train_docs)} train, {len(eval_docs)} eval), "
        f"{megabytes:.1f} MB, read in {time.perf_counter() - t0:.1f}s")

    tok = _get_tokenizer(cfg, workdir, train_docs, log)

    t0 = time.perf_counter()
    key_text = "|".join(
        [_CACHE_VERSION, tok.sha256, _corpus_fingerprint(docs), str(cfg.train.seed), repr(cfg.data.eval_fraction)]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    train_ids, eval_ids, hit = _tokenize_cached(tok, train_docs, eval_docs, key, os.path.join(workdir, "data_cache"))
    n_train, n_eval = sum(len(x) for x in train_ids), sum(len(x) for x in eval_ids)
    log(f"data: {n_train} train / {n_eval} eval tokens "
        f"({'from cache' if hit else 'tokenized'} in {time.perf_counter() - t0:.1f}s)")

    train = Batches(cfg, train_ids, tok, stream=_TRAIN_STREAM)
    evaluation = (
        Batches(cfg, eval_ids, tok, stream=_EVAL_STREAM, num_batches=cfg.train.eval_batches) if eval_ids else None
    )
    eval_rows = evaluation.rows_per_epoch if evaluation else 0
    log(f"data: {train.rows_per_epoch} train rows of {train.seq_len}, packing efficiency "
        f"{train.packing_efficiency:.1%}; {eval_rows} eval rows")
    return tok, train, evaluation
