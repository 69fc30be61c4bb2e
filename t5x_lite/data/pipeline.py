"""Packing and the deterministic batch source.

``Batches.batches(step)`` is a pure function of (config, corpus, tokenizer, step), built so that
the rows of any step cost O(batch) to find and read, whatever the corpus size:

* **Row index, once.** The documents of a split (each ending in eos) form one token stream in
  storage order. Greedy in-order packing (next fit) cuts it into rows: a document longer than a
  row is cut into row-sized chunks, and a row closes when the next chunk would not fit. Every row
  is then a contiguous range of the stream, so the whole packing is ``row_starts`` (int64
  [R + 1], 8 bytes per row), computed from the document lengths alone (8 bytes per document,
  never the tokens) by one vectorised ``searchsorted`` and a walk over the rows. With
  ``data.packing=best_fit`` the split's documents are first put in the order best-fit decreasing
  packs them (``best_fit_order``, once per run), and the same next fit then makes nearly full rows.
* **Shuffling without a table.** Epoch e serves its rows in the order of a keyed Feistel
  permutation of [0, R) (``shuffle_index``): the row at any position is computed directly, with
  no O(R) permutation to build or store. Step s takes global positions [s*B, (s+1)*B) of the
  endless stream of epochs; process p of P takes its contiguous B/P of them.
* **Reading only what is served.** A row's tokens are the slices of its documents that fall
  in its range: a few memory-mapped reads. Row i of step s draws its objective randomness from
  ``default_rng([seed, stream, 2, s, i])``.

So the data position of a run is its step: resuming at step s reads exactly the rows the
uninterrupted run would have read at s, and nothing of the steps before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
import time
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from t5x_lite import objectives
from t5x_lite.data import DataError
from t5x_lite.data import shards as fmt
from t5x_lite.data.corpus import Skipped, load_documents, source_key
from t5x_lite.data.shards import TokenStore
from t5x_lite.data.tokenizer import Tokenizer

_TRAIN_STREAM, _EVAL_STREAM = 0, 1
_EPOCH, _OBJECTIVE, _MIXTURE = 1, 2, 3  # rng namespaces
_FEISTEL_ROUNDS = 4
_CACHE_VERSION = "2"
PAIR_GROUPS = "pair_groups.npy"  # supervised caches: each pair's record (a conversation's pairs share one)


# ---------------------------------------------------------------------- packing


def _chunks(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunks (each <= max_len) that sequences of ``lengths`` are cut into, in order:
    ``(chunk_lengths int64 [P], continues bool [P])``, True on every chunk but a sequence's first."""
    lengths = np.asarray(lengths, np.int64)
    n_chunks = -(-lengths // max_len)
    first_chunk = np.cumsum(n_chunks) - n_chunks
    index_in_seq = np.arange(int(n_chunks.sum())) - np.repeat(first_chunk, n_chunks)
    return np.minimum(max_len, np.repeat(lengths, n_chunks) - index_in_seq * max_len), index_in_seq > 0


def _orbit(nxt: np.ndarray) -> np.ndarray:
    """int64 [R]: 0, nxt[0], nxt[nxt[0]], ... while < len(nxt) (``nxt`` strictly increasing steps)."""
    out = np.empty(len(nxt), np.int64)
    nxt_view, out_view = memoryview(np.ascontiguousarray(nxt, np.int64)), memoryview(out)
    r, p, n = 0, 0, len(nxt)
    while p < n:
        out_view[r] = p
        r, p = r + 1, nxt_view[p]
    return out[:r]


def next_fit(sizes: np.ndarray, capacities: Sequence[int], max_pieces: int = 0) -> np.ndarray:
    """int64 [R]: the first item of each row when items of ``sizes`` (int [P, k], what each
    takes of the k ``capacities``) fill rows in order, a row closing when the next item would
    overflow a capacity or when it holds ``max_pieces`` items (0 = no cap)."""
    ends = np.cumsum(sizes, axis=0)
    starts = ends - sizes
    # A row opened by item p holds items p .. nxt[p] - 1: all that fit every capacity.
    nxt = np.min([np.searchsorted(ends[:, j], starts[:, j] + cap, side="right")
                  for j, cap in enumerate(capacities)], axis=0)
    if max_pieces:
        nxt = np.minimum(nxt, np.arange(len(sizes)) + max_pieces)
    return _orbit(nxt)


def pack_rows(lengths: np.ndarray, chunk_len: int, capacities: Sequence[int], size_table=None, max_pieces: int = 0):
    """Greedy in-order packing (next fit) of sequences into rows, as stream ranges.

    lengths: int [N], the sequences in order (their concatenation is the *stream*). Sequences are
    cut into chunks of at most ``chunk_len``; ``size_table`` (int [chunk_len + 1, k]) gives what a
    chunk of n tokens takes of each of the k ``capacities`` (default: n of the one capacity). A row
    closes when the next chunk would overflow one of them, or when it holds ``max_pieces`` chunks
    (0 = no cap). Returns ``(row_starts, fill)``:
    int64 [R + 1] stream offsets (row r is [row_starts[r], row_starts[r + 1])), and the used share
    of capacity 0 over all rows.

    Every chunk of a sequence but its last fills a row alone (with the capacities used here), so
    inside a row, pieces meet only at sequence boundaries; this is checked.
    """
    chunks, continues = _chunks(lengths, chunk_len)  # [P]
    if len(chunks) == 0:
        return np.zeros(1, np.int64), 0.0
    sizes = chunks[:, None] if size_table is None else np.asarray(size_table)[chunks]  # [P, k]
    first = next_fit(sizes, capacities, max_pieces)
    chunk_start = np.concatenate([[0], np.cumsum(chunks)])
    row_starts = np.append(chunk_start[first], chunk_start[-1])
    opens_row = np.zeros(len(chunks), bool)
    opens_row[first] = True
    if not opens_row[continues].all():
        raise AssertionError("packing put a sequence's chunk boundary inside a row")
    return row_starts, float(sizes[:, 0].sum() / (len(first) * capacities[0]))


def best_fit_order(lengths: np.ndarray, chunk_len: int, capacities: Sequence[int], size_table=None,
                   max_pieces: int = 0, sizes: Optional[np.ndarray] = None) -> np.ndarray:
    """int64 [N]: an order of the sequences for which ``pack_rows`` (next fit, in order) packs tight.

    What matters is what each sequence puts in its last row (a sequence longer than ``chunk_len``
    fills rows alone with its full chunks, and its last chunk must open a row). Rows: one per such
    opener, then empty ones up to the lower bound (all last chunks / the first capacity). With
    ``max_pieces``, the tiny sequences (that would fill a row's pieces before its room) are
    first spread over the rows in turn, so that no row ends up all tiny; then the rest, largest
    first, go into the open row with the least room left that takes them (best-fit decreasing:
    room on the first capacity, the others and ``max_pieces`` checked), else into a new row. The
    order lists each row's sequences, its opener first, so next fit over it closes rows where
    these end or later: never more rows. Arguments as ``pack_rows``; ``sizes`` (int [N, k]) gives
    each sequence's sizes directly (sequences that fit a row: supervised pairs). ~5 s per million
    sequences."""
    lengths = np.asarray(lengths, np.int64)
    tail = lengths - (np.maximum(lengths, 1) - 1) // chunk_len * chunk_len  # last chunk, in (0, chunk_len]
    if sizes is not None:
        sizes_np = np.asarray(sizes, np.int64)
    else:
        sizes_np = tail[:, None] if size_table is None else np.asarray(size_table)[tail]  # [N, k]
    sizes = sizes_np.tolist()
    caps = [int(c) for c in capacities]
    room_cap = caps[0]
    limit = max_pieces or len(lengths) + 1
    live, opener = lengths > 0, lengths > chunk_len
    members: list[list[int]] = [[seq] for seq in np.flatnonzero(opener).tolist()]
    used: list[list[int]] = [list(sizes[seq]) for row in members for seq in row]
    bound = -(-int(sizes_np[live, 0].sum()) // room_cap) if live.any() else 0
    while len(members) < bound:
        members.append([])
        used.append([0] * len(caps))

    def fits(row: int, size: list) -> bool:
        return len(members[row]) < limit and all(u + s <= c for u, s, c in zip(used[row], size, caps))

    def put(row: int, seq: int) -> None:
        members[row].append(seq)
        used[row] = [u + s for u, s in zip(used[row], sizes[seq])]

    placed = ~live | opener
    if max_pieces and members:  # tiny ones spread in turn, each row keeping a piece free for the rest
        tiny = np.flatnonzero(~placed & (tail * max_pieces < room_cap))
        turn = 0
        for seq in tiny[np.argsort(-tail[tiny], kind="stable")].tolist():
            for k in range(len(members)):
                row = (turn + k) % len(members)
                if len(members[row]) < limit - 1 and fits(row, sizes[seq]):
                    put(row, seq)
                    placed[seq], turn = True, row + 1
                    break

    # Open rows by the room they have left on the first capacity: counts in a Fenwick tree over
    # room 1..room_cap (the smallest room >= s is a search on prefix sums) and a stack of row
    # ids per room (the newest row first).
    tree = [0] * (room_cap + 1)
    stacks: list[list[int]] = [[] for _ in range(room_cap + 1)]
    high_bit = 1 << room_cap.bit_length()

    def add(room: int, delta: int) -> None:
        while room <= room_cap:
            tree[room] += delta
            room += room & -room

    def smallest_room_at_least(size: int) -> int:
        """room_cap + 1 when no open row has that much room."""
        below, j = 0, size - 1
        while j > 0:
            below += tree[j]
            j -= j & -j
        i, bit = 0, high_bit
        while bit:
            if i + bit <= room_cap and tree[i + bit] <= below:
                i += bit
                below -= tree[i]
            bit >>= 1
        return i + 1

    def file_row(row: int) -> None:  # among the open rows, if it can take more
        room = room_cap - used[row][0]
        if room > 0 and len(members[row]) < limit and all(u < c for u, c in zip(used[row], caps)):
            stacks[room].append(row)
            add(room, 1)

    for row in range(len(members)):
        file_row(row)
    rest = np.flatnonzero(~placed)
    for seq in rest[np.argsort(-tail[rest], kind="stable")].tolist():
        size = sizes[seq]
        room = smallest_room_at_least(size[0])
        while room <= room_cap:
            row = stacks[room][-1]
            if fits(row, size):
                stacks[room].pop()
                add(room, -1)
                put(row, seq)
                file_row(row)
                break
            room = smallest_room_at_least(room + 1)  # another capacity is short there: more room
        else:
            members.append([seq])
            used.append(list(size))
            file_row(len(members) - 1)
    order = [seq for row in members for seq in row] + np.flatnonzero(~live).tolist()
    return np.asarray(order, np.int64)


def concat_rows(seq_start: np.ndarray, length: int, max_pieces: int = 0):
    """The stream cut every ``length`` tokens (the last row may be short): ``(row_starts, fill)``
    as ``pack_rows`` returns them. A sequence crossing a cut goes on in the next row.

    seq_start: int64 [N + 1], the stream offsets of the sequences. With ``max_pieces`` > 0 a row
    also ends where its ``max_pieces + 1``-th sequence would begin (that row is then short)."""
    num_tokens = int(seq_start[-1])
    if not max_pieces:
        row_starts = np.append(np.arange(0, num_tokens, length, dtype=np.int64), num_tokens)
    else:
        starts, a, n = [], 0, len(seq_start) - 1
        while a < num_tokens:
            starts.append(a)
            first = int(np.searchsorted(seq_start, a, side="right")) - 1  # the sequence holding token a
            a = min(a + length, int(seq_start[min(first + max_pieces, n)]))
        row_starts = np.array(starts + [num_tokens], np.int64)
    rows = len(row_starts) - 1
    return row_starts, float(num_tokens / (rows * length)) if rows else 0.0


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """int64: ``starts[i] + [0, counts[i])`` for every i, back to back."""
    counts = np.asarray(counts, np.int64)
    return np.repeat(starts, counts) + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _pieces(row_starts: np.ndarray, seq_start: np.ndarray, rows: np.ndarray):
    """The parts of sequences inside packed rows.

    row_starts: int64 [R + 1]; seq_start: int64 [N + 1], the stream offsets of the sequences;
    rows: int [n]. Returns ``(seq, lo, hi, piece_row)``, int64 [P] each, in row then stream order:
    piece k is tokens [lo, hi) of sequence ``seq[k]`` and belongs to ``rows[piece_row[k]]``.
    """
    a, b = row_starts[rows], row_starts[rows + 1]
    first = np.searchsorted(seq_start, a, side="right") - 1
    counts = np.searchsorted(seq_start, b, side="left") - first
    piece_row = np.repeat(np.arange(len(rows)), counts)
    seq = _ranges(first, counts)
    lo = np.maximum(a[piece_row], seq_start[seq]) - seq_start[seq]
    hi = np.minimum(b[piece_row], seq_start[seq + 1]) - seq_start[seq]
    keep = hi > lo  # empty sequences make no piece
    return seq[keep], lo[keep], hi[keep], piece_row[keep]


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
    """Greedy in-order packing of 1-D int sequences into rows of ``length`` (``pack_rows``).

    A sequence longer than ``length`` is cut into chunks of at most ``length``; each chunk is a
    segment of its own. Returns ``(tokens, segment_ids, positions)``, int32 [R, length], as
    ``_scatter`` lays them out.
    """
    lengths = np.array([len(s) for s in seqs], np.int64)
    flat = np.concatenate([np.asarray(s, np.int32) for s in seqs]) if len(seqs) else np.zeros(0, np.int32)
    row_starts, _ = pack_rows(lengths, length, (length,))
    rows = np.arange(len(row_starts) - 1)
    seq, lo, hi, piece_row = _pieces(row_starts, np.concatenate([[0], np.cumsum(lengths)]), rows)
    starts = np.concatenate([[0], np.cumsum(lengths)])[seq]
    pieces = [flat[s + a : s + b] for s, a, b in zip(starts, lo, hi)]
    body = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return _scatter(body, hi - lo, piece_row, len(rows), length)


# ---------------------------------------------------------------------- shuffling


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (array arithmetic wraps silently)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_words(*words: int, count: int = 1) -> np.ndarray:
    """uint64 [count]: splitmix64 hashes of the words (non-negative ints) and of 0..count-1."""
    z = np.zeros(1, np.uint64)
    for w in words:
        z = _mix64(z ^ (np.uint64(w % 2**64) + _GOLDEN))
    return _mix64(z + (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN))


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
    """A balanced Feistel network on ``2 * half_bits``-bit values (uint64 [n]): a bijection."""
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = x >> shift, x & mask
    for key in keys:
        left, right = right, left ^ (_mix64(right + key) & mask)
    return (left << shift) | right


def shuffle_index(index: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """Where a keyed pseudo-random permutation of [0, n) sends ``index`` (int [m], each in [0, n)).

    A Feistel network on the smallest even number of bits covering n, re-applied to any value
    that lands outside [0, n) (cycle walking, under 4 rounds on average): a bijection of [0, n),
    O(1) per index and no table. keys: uint64 [rounds].
    """
    half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
    out = _feistel(np.asarray(index, np.uint64), half_bits, keys)
    outside = out >= n
    while outside.any():
        out[outside] = _feistel(out[outside], half_bits, keys)
        outside = out >= n
    return out.astype(np.int64)


# ---------------------------------------------------------------------- the batch source


def span_lengths_of(data_cfg) -> tuple[int, int]:
    """(raw chunk length, decoder length) of span corruption under ``data_cfg``."""
    d = data_cfg
    raw_len, derived_target_len = objectives.span_corruption_raw_length(d.seq_len, d.noise_density, d.mean_span_length)
    if d.target_len is not None and d.target_len < derived_target_len:
        raise DataError(
            f"data.target_len={d.target_len} is too small: span corruption of data.seq_len={d.seq_len} "
            f"(noise {d.noise_density}, mean span {d.mean_span_length}) makes targets of up to "
            f"{derived_target_len} tokens; set data.target_len >= {derived_target_len} or leave it unset"
        )
    return raw_len, d.target_len or derived_target_len


def check_objective(objective: str, data_cfg, has_mask: bool, num_sentinels: int) -> None:
    """Raise ``DataError`` unless a tokenizer with (or without) ``<mask>`` and ``num_sentinels``
    sentinels serves ``objective``: mlm needs the mask, span corruption a sentinel per noise span."""
    if objective == "mlm" and not has_mask:
        raise DataError("the mlm objective needs a '<mask>' piece, and the tokenizer has none")
    if objective != "span":
        return
    d = data_cfg
    raw_len, _ = span_lengths_of(d)
    spans = objectives.num_noise_spans(raw_len, d.noise_density, d.mean_span_length)
    if spans > num_sentinels:
        raise DataError(
            f"span corruption of data.seq_len={d.seq_len} needs up to {spans} sentinels, but the "
            f"tokenizer has {num_sentinels} (<extra_id_N> pieces); raise data.num_sentinels "
            "and retrain the tokenizer, or shorten data.seq_len"
        )



@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The ids the objectives use, copied from a tokenizer: a ``Batches`` holds these rather
    than the tokenizer, so it pickles to worker processes (``data.workers``) as plain values."""

    bos_id: int
    eos_id: int
    mask_id: Optional[int]
    vocab_size: int
    special_ids: frozenset
    sentinel_ids: tuple

    @classmethod
    def of(cls, tok) -> "TokenIds":
        return cls(tok.bos_id, tok.eos_id, tok.mask_id, tok.vocab_size, frozenset(tok.special_ids),
                   tuple(tok.sentinel_ids))


class Batches:
    """Deterministic, stateless batches of one objective over tokenized documents.

    documents: a ``TokenStore``, or token-id arrays (without eos) held in memory. doc_ids: int
    [n], the documents of this split (default: all), served in that order. ``stream`` separates
    the randomness of train (0) and eval (1). ``num_batches``: how many batches iteration yields
    (eval); None iterates forever. doc_lengths: ``documents.doc_lengths()`` when already at hand.

    Keys of ``batches(step)``, every array [B, L]:
      causal / mlm: input_ids, targets, weights, segment_ids, positions (L = data.seq_len);
      prefix: the same plus prefix_mask (bool);
      span (encoder_decoder): encoder_input_ids, encoder_segment_ids, encoder_positions
      (L = data.seq_len) and decoder input_ids, targets, weights, segment_ids, positions
      (L = target_len).
      supervised: ``documents`` alternates inputs and targets, ``doc_ids`` are pair ids. Decoder:
      as causal over input + target (the input's eos dropped), weights only on the target;
      encoder_decoder: as span, the input read by the encoder, the target predicted.
    """

    def __init__(
        self,
        cfg,
        documents,
        tokenizer: Tokenizer,
        *,
        doc_ids: Optional[Sequence[int]] = None,
        stream: int = _TRAIN_STREAM,
        num_batches: Optional[int] = None,
        doc_lengths: Optional[np.ndarray] = None,
    ):
        d = cfg.data
        self.objective = cfg.objective
        self.batch_size = cfg.train.batch_size
        self.seq_len = d.seq_len
        self.num_batches = num_batches
        self.max_segments = cfg.model.max_segments  # the cap the rows were packed with (0: none)
        self._cfg = d
        self._seed = cfg.train.seed
        self._stream = stream
        self._tokenizer = TokenIds.of(tokenizer)
        self._setup_objective()
        if not isinstance(documents, TokenStore):
            documents = TokenStore.from_documents(documents, tokenizer.eos_id)
        self._corpus = documents
        if self.objective == "supervised":
            self._init_pairs(cfg, doc_ids, documents.doc_lengths() if doc_lengths is None else doc_lengths)
            return
        self._doc_ids = np.arange(documents.num_documents) if doc_ids is None else np.asarray(doc_ids, np.int64)
        if len(self._doc_ids) == 0:
            raise DataError("no documents to batch: the corpus (or this split of it) is empty")
        self.num_documents = len(self._doc_ids)
        lengths = (documents.doc_lengths() if doc_lengths is None else doc_lengths)[self._doc_ids]
        self._seq_start = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self._seq_start[-1])
        cap = cfg.model.max_segments  # documents per row (cuDNN's packed layout is built for it)
        if self._cfg.packing == "concat":
            self._row_starts, self.packing_efficiency = concat_rows(self._seq_start, self.seq_len, max_pieces=cap)
        else:
            packing = ((self._raw_len, (self.seq_len, self.target_len), self._span_sizes) if self.objective == "span"
                       else (self.seq_len, (self.seq_len,), None))
            self._packing = (lengths, packing)
            order, self._row_starts, self.packing_efficiency = self._pack(cap)
            if order is not None:  # best_fit: serve the documents in an order that next fit packs tight
                self._doc_ids, lengths = self._doc_ids[order], lengths[order]
                self._seq_start = np.concatenate([[0], np.cumsum(lengths)])
        self.rows_per_epoch = len(self._row_starts) - 1
        # documents (pieces) of each row: those starting inside it, plus one (a row opens on a piece)
        self.documents_per_row = (np.searchsorted(self._seq_start[:-1], self._row_starts[1:], side="left")
                                  - np.searchsorted(self._seq_start[:-1], self._row_starts[:-1], side="right") + 1)

    def _pack(self, cap: int):
        """``(order or None, row_starts, fill)`` of the documents as read, at most ``cap`` a row:
        next fit in storage order, or (best_fit) in the best-fit order when that packs tighter
        (with many tiny documents and a binding cap, storage order can)."""
        lengths, packing = self._packing
        row_starts, fill = pack_rows(lengths, *packing, max_pieces=cap)
        if self._cfg.packing == "best_fit":
            order = best_fit_order(lengths, *packing, max_pieces=cap)
            tight_starts, tight = pack_rows(lengths[order], *packing, max_pieces=cap)
            if tight > fill:
                return order, tight_starts, tight
        return None, row_starts, fill

    def fill_at(self, cap: int) -> float:
        """The packing efficiency these documents would have at ``model.max_segments=cap``."""
        return self._pack(cap)[2]

    def _init_pairs(self, cfg, pair_ids, doc_lengths: np.ndarray) -> None:
        """Supervised pairs: what of each is kept, and rows of whole pairs (next fit, or the best-fit
        order). Too long a pair is cut: decoder, the target's end past the row, then the input's
        start (the end of a prompt is nearest its answer); encoder_decoder, each side's end (the
        input keeps its eos)."""
        if len(doc_lengths) % 2:
            raise DataError("a supervised corpus alternates inputs and targets: an odd number of documents")
        pairs = np.arange(len(doc_lengths) // 2) if pair_ids is None else np.asarray(pair_ids, np.int64)
        if len(pairs) == 0:
            raise DataError("no (input, target) pairs to batch: the corpus (or this split of it) is empty")
        in_len, tg_len = doc_lengths[2 * pairs], doc_lengths[2 * pairs + 1]  # eos included
        self._decoder_only = cfg.model.family == "decoder"
        if self._decoder_only:
            keep_tg = np.minimum(tg_len, self.seq_len)
            keep_in = np.minimum(in_len - 1, self.seq_len - keep_tg)
            sizes, caps = (keep_in + keep_tg)[:, None], (self.seq_len,)
        else:
            keep_in, keep_tg = np.minimum(in_len, self.seq_len), np.minimum(tg_len, self.target_len)
            sizes, caps = np.stack([keep_in, keep_tg], axis=1), (self.seq_len, self.target_len)
        self.truncated = int(np.sum((keep_in < in_len - self._decoder_only) | (keep_tg < tg_len)))
        cap = cfg.model.max_segments
        first = next_fit(sizes, caps, cap)
        if self._cfg.packing == "best_fit":
            order = best_fit_order(sizes[:, 0], self.seq_len, caps, max_pieces=cap, sizes=sizes)
            tight = next_fit(sizes[order], caps, cap)
            if len(tight) < len(first):
                pairs, in_len, keep_in, keep_tg, sizes, first = (
                    pairs[order], in_len[order], keep_in[order], keep_tg[order], sizes[order], tight)
        self._doc_ids, self._in_len, self._keep_in, self._keep_tg = pairs, in_len, keep_in, keep_tg
        self._row_first = np.append(first, len(pairs))
        self.num_documents, self.num_tokens = len(pairs), int(sizes.sum())
        self.rows_per_epoch = len(first)
        self.documents_per_row = np.diff(self._row_first)
        self.packing_efficiency = float(sizes[:, 0].sum() / (len(first) * caps[0]))

    def _pairs_batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of packed rows ``rows`` of supervised pairs."""
        a, b = self._row_first[rows], self._row_first[rows + 1]
        counts = b - a
        piece_rows = np.repeat(np.arange(len(rows)), counts)
        at = _ranges(a, counts)  # the pairs of the rows, in served order
        pair, keep_in, keep_tg = self._doc_ids[at], self._keep_in[at], self._keep_tg[at]
        tok, n, zeros = self._tokenizer, len(rows), np.zeros(len(at), np.int64)
        if not self._decoder_only:
            inputs = self._corpus.read(2 * pair, zeros, keep_in)
            inputs[np.cumsum(keep_in) - 1] = tok.eos_id  # a cut input still ends with eos
            return self._encoder_decoder_batch(inputs, keep_in, self._corpus.read(2 * pair + 1, zeros, keep_tg),
                                               keep_tg, piece_rows, n)
        in_lo = self._in_len[at] - 1 - keep_in  # the input's last keep_in tokens, its eos dropped
        lo, hi = np.stack([in_lo, zeros], 1).ravel(), np.stack([in_lo + keep_in, keep_tg], 1).ravel()
        flat = self._corpus.read(np.stack([2 * pair, 2 * pair + 1], 1).ravel(), lo, hi)
        is_target = np.repeat(np.tile(np.array([0, 1], np.int32), len(at)), hi - lo)
        tokens, segment_ids, positions = _scatter(flat, keep_in + keep_tg, piece_rows, n, self.seq_len)
        scored, _, _ = _scatter(is_target, keep_in + keep_tg, piece_rows, n, self.seq_len)
        out = objectives.causal_lm(tokens, segment_ids, positions, tok.bos_id)
        out["weights"] = (scored > 0).astype(np.float32)
        return out

    # ------------------------------------------------------------ setup

    def _setup_objective(self) -> None:
        """Check that the tokenizer has what the objective needs; for span corruption also fix
        the raw chunk length, the decoder length and the (inputs, targets) sizes of raw chunks."""
        tok, d = self._tokenizer, self._cfg
        check_objective(self.objective, d, tok.mask_id is not None, len(tok.sentinel_ids))
        self.target_len = self.seq_len
        if self.objective == "supervised":
            self.target_len = d.target_len or self.seq_len
        if self.objective == "span":
            self._raw_len, self.target_len = span_lengths_of(d)
            self._span_sizes = np.array(
                [objectives.span_lengths(n, d.noise_density, d.mean_span_length) for n in range(self._raw_len + 1)]
            )  # [raw_len + 1, 2]: inputs_len, targets_len

    # ------------------------------------------------------------ row selection

    def _epoch_keys(self, epoch: int) -> np.ndarray:
        return _hash_words(self._seed, self._stream, _EPOCH, epoch, count=_FEISTEL_ROUNDS)

    def _row_ids(self, start: int, count: int) -> np.ndarray:
        """Packed-row ids of global stream positions [start, start + count)."""
        return self.rows_at(np.arange(start, start + count, dtype=np.int64))

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Packed-row ids of positions of the endless stream of shuffled epochs."""
        epochs, index = np.divmod(np.asarray(positions, np.int64), self.rows_per_epoch)
        out = np.empty(len(index), np.int64)
        for e in np.unique(epochs):
            at = epochs == e
            out[at] = shuffle_index(index[at], self.rows_per_epoch, self._epoch_keys(int(e)))
        return out

    def _read(self, rows: np.ndarray):
        """``(flat int32 [T], piece_lengths [P], piece_rows [P])`` of ``rows``: their pieces back to back."""
        seq, lo, hi, piece_row = _pieces(self._row_starts, self._seq_start, rows)
        return self._corpus.read(self._doc_ids[seq], lo, hi), hi - lo, piece_row

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
        return self.rows_batch(self._row_ids(step * self.batch_size + first, per_process), step,
                               np.arange(first, first + per_process))

    __call__ = batches  # ``ds(step, process_index, process_count)`` works too

    def rows_batch(self, rows: np.ndarray, step: int, row_numbers: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of packed ``rows`` (``rows_at``'s ids) as rows ``row_numbers`` of the global
        batch of ``step`` (which fix each row's objective randomness)."""
        if self.objective == "supervised":
            return self._pairs_batch(rows)
        flat, lengths, piece_rows = self._read(rows)
        if self.objective == "span":
            return self._span_batch(flat, lengths, piece_rows, self._rngs(step, row_numbers))
        tokens, segment_ids, positions = _scatter(flat, lengths, piece_rows, len(rows), self.seq_len)
        if self.objective == "causal":
            return objectives.causal_lm(tokens, segment_ids, positions, self._tokenizer.bos_id)
        return self._dense_batch(tokens, segment_ids, positions, self._rngs(step, row_numbers))

    def _rngs(self, step: int, row_numbers: np.ndarray) -> list:
        """One generator per row: row ``i`` of the global batch of ``step`` for each ``i``."""
        return [np.random.default_rng([self._seed, self._stream, _OBJECTIVE, step, int(i)]) for i in row_numbers]

    def _dense_batch(self, tokens, segment_ids, positions, rngs: list) -> dict[str, np.ndarray]:
        """prefix / mlm: each row corrupted with its own generator (mlm: the whole batch in one
        call, each row drawing from its generator as if alone; prefix: row by row)."""
        tok = self._tokenizer
        if self.objective == "mlm":
            return objectives.mlm(tokens, segment_ids, positions, rngs, mask_id=tok.mask_id,
                                  vocab_size=tok.vocab_size, special_ids=tok.special_ids, rate=self._cfg.mlm_rate)
        per_row = [
            objectives.prefix_lm(tokens[i : i + 1], segment_ids[i : i + 1], positions[i : i + 1], tok.bos_id, rng)
            for i, rng in enumerate(rngs)
        ]
        return {k: np.concatenate([r[k] for r in per_row]) for k in per_row[0]}

    def _span_batch(self, flat, lengths, piece_rows, rngs: list) -> dict[str, np.ndarray]:
        """Every piece (a raw chunk) span-corrupted with its row's generator, then packed."""
        d, tok = self._cfg, self._tokenizer
        inputs, targets = [], []
        for piece, row in zip(np.split(flat, np.cumsum(lengths)[:-1]), piece_rows):
            x, y = objectives.span_corrupt(
                piece, rngs[row], noise_density=d.noise_density, mean_span_length=d.mean_span_length,
                sentinel_ids=tok.sentinel_ids, eos_id=tok.eos_id,
            )
            inputs.append(x)
            targets.append(y)
        return self._encoder_decoder_batch(np.concatenate(inputs), [len(x) for x in inputs], np.concatenate(targets),
                                           [len(y) for y in targets], piece_rows, len(rngs))

    def _encoder_decoder_batch(self, inputs, input_lengths, targets, target_lengths, piece_rows, n: int):
        """Pieces' inputs packed into encoder rows, their targets into decoder rows (the k-th
        segment of each side one piece), the decoder reading its targets shifted right."""
        tok = self._tokenizer
        enc = _scatter(inputs, input_lengths, piece_rows, n, self.seq_len)
        dec_targets, dec_segments, dec_positions = _scatter(targets, target_lengths, piece_rows, n, self.target_len)
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

    def epochs_read(self, steps: int) -> list[tuple[str, int, float]]:
        """``[(corpus name, its training rows, how many times ``steps`` steps read them)]``."""
        return [("", self.rows_per_epoch, steps * self.batch_size / self.rows_per_epoch)]

    def __repr__(self) -> str:
        return (
            f"Batches({self.objective}, docs={self.num_documents}, tokens={self.num_tokens}, "
            f"rows={self.rows_per_epoch}, packing={self.packing_efficiency:.1%})"
        )


class MixtureBatches:
    """Batches drawn from several corpora by weight (``data.mixture``), as stateless as ``Batches``.

    Each corpus keeps its own ``Batches`` (its packing, its endless stream of shuffled epochs).
    Before step ``s`` corpus ``i`` has served ``floor(w_i * s * B)`` rows, plus one for the first
    ``d`` corpora, ``d`` being what the floors leave of ``s * B``: every batch takes exactly ``B``
    rows, each corpus's running count stays within one row of its weight, and the rows a corpus
    serves at step ``s`` are the next ones of its own stream (a corpus never repeats a row before
    its epoch ends, whatever the other corpora's sizes). Requires ``w_i * B >= 1`` (``Config``
    checks), which keeps every count non-negative. The batch's rows are then put in an order
    shuffled by step, so that every process and micro-batch sees the mixture."""

    def __init__(self, sources: Sequence[Batches], weights: Sequence[float], names: Sequence[str], seed: int,
                 stream: int = _TRAIN_STREAM, num_batches: Optional[int] = None):
        self.sources, self.names = list(sources), list(names)
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        first = self.sources[0]
        self.objective, self.seq_len, self.batch_size = first.objective, first.seq_len, first.batch_size
        self.target_len, self.max_segments = first.target_len, first.max_segments
        self.num_batches, self._seed, self._stream = num_batches, seed, stream
        self.num_documents = sum(b.num_documents for b in self.sources)
        self.num_tokens = sum(b.num_tokens for b in self.sources)
        self.rows_per_epoch = sum(b.rows_per_epoch for b in self.sources)  # (each corpus's epochs are its own)
        self.packing_efficiency = float(np.average([b.packing_efficiency for b in self.sources],
                                                   weights=[b.rows_per_epoch for b in self.sources]))
        self.documents_per_row = np.concatenate([b.documents_per_row for b in self.sources])
        self.truncated = sum(getattr(b, "truncated", 0) for b in self.sources)

    def served(self, step: int) -> np.ndarray:
        """int64 [corpora]: the rows each corpus has served before ``step``."""
        target = self.weights * (step * self.batch_size)
        out = np.floor(target + 1e-9).astype(np.int64)  # (a weight like 0.3 times 10 must give 3, not 2)
        out[:step * self.batch_size - int(out.sum())] += 1
        return out

    def counts(self, step: int) -> np.ndarray:
        """int64 [corpora]: the rows each corpus gives the batch of ``step`` (summing to B)."""
        return self.served(step + 1) - self.served(step)

    def batches(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """The batch of ``step``: all B rows, or this process's contiguous B/process_count of them."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.batch_size % process_count or not 0 <= process_index < process_count:
            raise DataError(f"process {process_index} of {process_count} cannot take an equal share of "
                            f"train.batch_size={self.batch_size}")
        counts, start = self.counts(step), self.served(step)
        corpus = np.repeat(np.arange(len(self.sources)), counts)
        position = np.concatenate([s + np.arange(c) for s, c in zip(start, counts)])
        order = shuffle_index(np.arange(self.batch_size), self.batch_size,
                              _hash_words(self._seed, self._stream, _MIXTURE, step, count=_FEISTEL_ROUNDS))
        per = self.batch_size // process_count
        mine = slice(process_index * per, (process_index + 1) * per)
        corpus, position, numbers = corpus[order][mine], position[order][mine], np.arange(self.batch_size)[mine]
        out: dict = {}
        for i, source in enumerate(self.sources):
            at = np.flatnonzero(corpus == i)
            if not len(at):
                continue
            part = source.rows_batch(source.rows_at(position[at]), step, numbers[at])
            for key, value in part.items():
                if key not in out:
                    out[key] = np.zeros((per,) + value.shape[1:], value.dtype)
                out[key][at] = value
        return out

    __call__ = batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        steps = range(self.num_batches) if self.num_batches is not None else itertools.count()
        return (self.batches(step) for step in steps)

    @property
    def corpora(self) -> list[tuple[str, Batches]]:
        """``[(short name, its Batches)]``: the file or directory name without its extension (the
        whole path where two would read the same); eval reports a loss a corpus by them."""
        short = [os.path.basename(n.rstrip("/")).split(".")[0] or n for n in self.names]
        names = short if len(set(short)) == len(short) else self.names
        return list(zip(names, self.sources))

    def epochs_read(self, steps: int) -> list[tuple[str, int, float]]:
        """``Batches.epochs_read``, a line a corpus: each reads its own rows at its own pace."""
        return [(name, b.rows_per_epoch, int(n) / b.rows_per_epoch)
                for name, b, n in zip(self.names, self.sources, self.served(steps))]

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} {w:.0%}" for n, w in zip(self.names, self.weights))
        return f"MixtureBatches({self.objective}, {parts}, rows={self.rows_per_epoch})"


# ---------------------------------------------------------------------- splits


def _split_unit(n: int, seed: int) -> np.ndarray:
    """float64 [n] in [0, 1): a stable hash of (seed, document index), the splitmix64 stream
    seeded by ``seed``."""
    base = _mix64(np.array([seed % 2**64], np.uint64))
    z = _mix64(base + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def split_documents(n: int, eval_fraction: float, seed: int,
                    groups: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, eval_indices) of n documents: disjoint, covering, sorted.

    A document is held out when its hash is below ``eval_fraction``. With a fraction > 0 and
    n >= 2 there is at least one eval and one train document. ``groups`` (a group number per
    document, from 0: the pairs of one conversation) splits the groups so, each document going
    with its group; groups ``0..n-1`` split as the documents would.
    """
    if groups is not None:
        groups = np.asarray(groups, np.int64)[:n]
        _, held = split_documents(int(groups.max()) + 1 if n else 0, eval_fraction, seed)
        out = np.isin(groups, held)
        return np.flatnonzero(~out), np.flatnonzero(out)
    u = _split_unit(n, seed)
    held_out = u < eval_fraction
    if eval_fraction > 0 and n >= 2:
        held_out[np.argmin(u)] = True
        held_out[np.argmax(u)] = False
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


# ---------------------------------------------------------------------- corpora


def _check_tokenizer(tok: Tokenizer, cfg, where: str) -> None:
    """The model must embed every id, and the objective must find its special pieces."""
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"the tokenizer {where} has {tok.vocab_size} pieces, more than model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size >= {tok.vocab_size}"
        )
    check_objective(cfg.objective, cfg.data, tok.mask_id is not None, len(tok.sentinel_ids))


def _is_prepared_path(path: Optional[str]) -> bool:
    return path is not None and (fmt.is_prepared(path) or fmt.looks_unfinished(path))


def _check_prepared_with(store: TokenStore, tok: Tokenizer, path: str, tok_path: str) -> None:
    if store.manifest["tokenizer"]["sha256"] != tok.sha256:
        raise DataError(
            f"{tok_path} is not the tokenizer data.path={path!r} was prepared with; unset data.tokenizer, "
            f"use a new work dir, or prepare the corpus with --tokenizer {tok_path}"
        )


def _open_prepared(cfg, workdir: str, log: Callable) -> tuple[TokenStore, Tokenizer]:
    """A directory ``t5x-lite prepare`` wrote, memory-mapped, with its tokenizer. The config's
    tokenizer (if set) and the work dir's (if any) must be that one."""
    path = cfg.data.path
    store = TokenStore.open(path)
    tok_path = os.path.join(path, fmt.TOKENIZER)
    tok = Tokenizer.load(tok_path)
    _check_prepared_with(store, tok, path, tok_path)
    for other in (cfg.data.tokenizer, os.path.join(workdir, fmt.TOKENIZER)):
        if other and os.path.exists(other):
            _check_prepared_with(store, Tokenizer.load(other), path, other)
    _check_tokenizer(tok, cfg, f"of the prepared corpus {path}")
    log(f"data: prepared corpus {path}: {store.num_documents} docs, {store.num_tokens} tokens, "
        f"{len(store.manifest['shards'])} shards (memory-mapped)")
    return store, tok


def _read_corpus(cfg, log: Callable, groups: Optional[list] = None) -> list[str]:
    t0 = time.perf_counter()
    skipped = Skipped()
    groups = [] if groups is None else groups
    docs = load_documents(cfg.data, skipped, groups)
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    count = f"{len(docs)} docs"
    if cfg.objective == "supervised":
        records = groups[-1] + 1 if groups else 0
        count = f"{len(docs) // 2} (input, target) pairs" + (f" of {records} records (a pair per assistant turn)"
                                                               if records < len(docs) // 2 else "")
    default = "stdlib signatures -> docstring summaries" if cfg.objective == "supervised" else "stdlib docstrings"
    log(f"data: corpus {cfg.data.path or default}: {count}, {megabytes:.1f} MB, "
        f"read in {time.perf_counter() - t0:.1f}s" + (f"; skipped {skipped}" if skipped else ""))
    return docs


def _get_tokenizer(cfg, workdir: str, log: Callable) -> tuple[Tokenizer, Optional[list[str]], list]:
    """``data.tokenizer`` if set, else ``workdir/tokenizer.model`` if present, else a new one
    trained on the training documents (read now) and saved there. Returns the tokenizer, the
    documents (None when they were not read) and (supervised) their pairs' records."""
    docs, groups = None, []
    path = cfg.data.tokenizer or os.path.join(workdir, fmt.TOKENIZER)
    if cfg.data.tokenizer or os.path.exists(path):
        t0 = time.perf_counter()
        tok = Tokenizer.load(path)
        how = f"loaded {path}"
    else:
        check_objective(cfg.objective, cfg.data, True, cfg.data.num_sentinels)
        docs = _read_corpus(cfg, log, groups)
        t0 = time.perf_counter()
        train_idx = _tokenizer_training_docs(cfg, docs, groups)
        tok = Tokenizer.train(
            [docs[i] for i in train_idx], path, cfg.model.vocab_size, cfg.data.num_sentinels, seed=cfg.train.seed
        )
        how = f"trained on {len(train_idx)} docs -> {path}"
    _check_tokenizer(tok, cfg, path)
    log(f"data: tokenizer {how} (vocab {tok.vocab_size}, {len(tok.sentinel_ids)} sentinels) "
        f"in {time.perf_counter() - t0:.1f}s")
    return tok, docs, groups


def _tokenizer_training_docs(cfg, docs: list, groups: list) -> np.ndarray:
    """The indices of ``docs`` a new tokenizer learns from: the training split's (supervised: both
    texts of each training pair, split by pair as training does)."""
    if cfg.objective == "supervised":
        pairs, _ = split_documents(len(docs) // 2, cfg.data.eval_fraction, cfg.train.seed, groups)
        return np.stack([2 * pairs, 2 * pairs + 1], axis=1).ravel()
    return split_documents(len(docs), cfg.data.eval_fraction, cfg.train.seed)[0]


def _open_cached(cfg, workdir: str, log: Callable) -> tuple[TokenStore, Tokenizer]:
    """The stdlib corpus or raw files, tokenized once into ``workdir/data_cache/<key>`` (the
    prepared format). The key covers the files' sizes and times, the field, ``max_docs`` and the
    tokenizer, so a rerun finds it with a ``stat`` per file and reads no text."""
    source = source_key(cfg.data)
    tok, docs, groups = _get_tokenizer(cfg, workdir, log)
    key = hashlib.sha256("|".join([_CACHE_VERSION, source, tok.sha256]).encode()).hexdigest()[:24]
    cache = os.path.join(workdir, "data_cache", key)
    if not fmt.is_prepared(cache):
        if docs is None:
            docs = _read_corpus(cfg, log, groups)
        t0 = time.perf_counter()
        tokens, offsets = fmt.join_documents(tok.encode_batch(docs), tok.eos_id, fmt.token_dtype(tok.vocab_size))
        os.makedirs(cache, exist_ok=True)
        if cfg.objective == "supervised":  # which pairs are one conversation's (they split together)
            np.save(os.path.join(cache, PAIR_GROUPS), np.asarray(groups, np.int64))
        record = fmt.write_shard(cache, fmt.SHARD_PREFIX + "0", tokens, offsets,
                                 {"bytes": sum(len(d.encode("utf-8")) for d in docs)})
        tok.save(os.path.join(cache, fmt.TOKENIZER))
        fmt.write_manifest(cache, [record], tok, source=cfg.data.path or "stdlib docstrings")
        log(f"data: tokenized {len(docs)} docs in {time.perf_counter() - t0:.1f}s -> {cache}")
    store = TokenStore.open(cache)
    log(f"data: {store.num_documents} docs, {store.num_tokens} tokens from {cache}")
    return store, tok


def _prepared_pair_groups(manifest: dict, pairs: bool, path: str, log: Callable) -> Optional[np.ndarray]:
    """A prepared directory's record of each pair (``prepare --pairs``), checked against the
    objective: pairs train ``supervised`` only, plain documents everything else."""
    info = manifest.get("pairs")
    if pairs and info is None:
        raise DataError(f"data.objective=supervised reads (input, target) pairs; data.path={path!r} is a prepared "
                        "corpus of plain documents (prepare JSON lines of pairs with `t5x-lite prepare --pairs`)")
    if info is None:
        return None
    if not pairs:
        raise DataError(f"data.path={path!r} was prepared as (input, target) pairs (--pairs): train it with "
                        "data.objective=supervised")
    _, input_field, target_field, messages_field, template, turns = info["fields"]
    log(f"data: pairs prepared from fields {input_field!r} / {target_field!r}, conversations in {messages_field!r}"
        + (f" (chat template {template}, {turns} turns)" if template else "") + "; the data.*_field settings do not apply")
    groups, first = [], 0
    for records, per_record in zip(info["records"], info["pairs_per_record"]):
        counts = np.ones(records, np.int64) if per_record is None else np.asarray(per_record, np.int64)
        groups.append(np.repeat(np.arange(first, first + records), counts))
        first += records
    return np.concatenate(groups) if groups else np.zeros(0, np.int64)


HINT_REPACK_DOCUMENTS = 1_000_000  # best_fit: trial packings up to this many documents (~5 s each)
FIT_TOLERANCE = 0.005  # packing efficiency a smaller cap may give up (half a point)


class SegmentsFit(NamedTuple):
    """What the packed rows say of ``model.max_segments`` (``fit_segments``)."""

    most: int  # the most documents a packed row holds
    cap: Optional[int]  # a smaller cap that packs the rows as tight; None: none found (or not tried)
    fill: Optional[float]  # best_fit: the training rows' packing efficiency at ``cap``
    untried: bool = False  # best_fit over too many documents to repack on the way


def fit_segments(cfg, splits) -> SegmentsFit:
    """The smallest ``model.max_segments`` below the config's that packs these rows as tight. Next
    fit and concat close a row on the cap or on the next document, so the most documents a row
    holds serves exactly the same rows. best_fit orders the documents for the cap it is given: the
    smallest cap from the rows' most up, doubling, whose training rows (``splits[0]``) are within
    ``FIT_TOLERANCE`` as full; not for supervised pairs, nor over ``HINT_REPACK_DOCUMENTS``
    documents (each trial packing would take seconds to minutes). No cap (0, the mask): only one
    document a row is worth a fit (cuDNN given a length a row), never a packed layout of several."""
    cap = cfg.model.max_segments or 2
    splits = [b for b in splits if b is not None and b.rows_per_epoch]
    most = max(int(b.documents_per_row.max()) for b in splits)
    if most >= cap:
        return SegmentsFit(most, None, None)
    if cfg.data.packing != "best_fit":
        return SegmentsFit(most, most, None)
    if cfg.data.objective == "supervised":
        return SegmentsFit(most, None, None)
    if splits[0].num_documents > HINT_REPACK_DOCUMENTS:
        return SegmentsFit(most, None, None, untried=True)
    fill, smaller = splits[0].packing_efficiency, most
    while smaller < cap and (tried := splits[0].fill_at(smaller)) < fill - FIT_TOLERANCE:
        smaller *= 2
    return SegmentsFit(most, smaller, tried) if smaller < cap else SegmentsFit(most, None, None)


def segments_hint(cfg, *splits, fit: Optional[SegmentsFit] = None) -> Optional[str]:
    """A line for the log when ``model.max_segments`` is well above what the packed rows hold and
    ``model.fit_max_segments`` did not lower it: cuDNN's packed attention costs more the larger it
    is (H100, llama_1b: +10% a step at 64 against 1), and a cap that never bound can come down (see
    ``fit_segments``; ``fit``: its answer for these splits, when already at hand)."""
    cap = cfg.model.max_segments
    if cap <= 1 or cfg.model.attention not in ("auto", "cudnn_packed"):
        return None
    fit = fit or fit_segments(cfg, splits)
    if fit.most > cap // 2:
        return None
    said = f"data: no row holds more than {fit.most} documents (model.max_segments={cap})"
    costs = "cuDNN's packed attention (GPU) takes longer the larger it is"
    if fit.untried:
        return (f"{said}; {costs}: a smaller cap may pack as tight (best_fit orders the documents for the cap it "
                "is given: compare the packing efficiency logged above)")
    if fit.cap is None or fit.cap > cap // 2:
        return None
    how = "packs the same rows" if fit.fill is None else (
        f"packs the training rows {fit.fill:.1%} full (now {splits[0].packing_efficiency:.1%})")
    return f"{said}: max_segments={fit.cap} {how}, and {costs} (model.fit_max_segments=true lowers it when training starts)"


def make_datasets(cfg, workdir: str, log: Callable[[str], None] = print):
    """Corpus -> (tokenizer, train Batches, eval Batches or None).

    ``data.path`` may be a directory ``t5x-lite prepare`` wrote (memory-mapped; its tokenizer is
    copied into the work dir for decoding), raw text / JSON-lines files, or unset (the stdlib
    docstrings); the last two are tokenized once into ``workdir/data_cache``. Documents are split
    by a stable hash of (index, train.seed) with ``data.eval_fraction`` held out; ``data.max_docs``
    keeps the first documents. Eval serves ``train.eval_batches`` fixed batches; it is None when
    no document is held out. Bad input raises before anything is written to the work dir. With
    ``model.fit_max_segments`` the rows are packed for the smallest cap the data needs (the
    batches' ``max_segments``; the model's kernel is built for it: ``Config.with_max_segments``).
    ``data.mixture``: each corpus so, one tokenizer for all, batches mixed by ``MixtureBatches``.
    """
    if cfg.data.mixture_sources():
        return _mixture_datasets(cfg, workdir, log)
    corpus = _open_corpus(cfg, workdir, log)
    train, evaluation = corpus.splits(cfg)
    _log_splits(corpus, train, evaluation, log)
    fit = fit_segments(cfg, [train, evaluation]) if cfg.model.fits_segments else None
    if fit and fit.cap:
        train, evaluation = corpus.splits(cfg.with_max_segments(fit.cap))
        _log_fit(cfg, fit, train, log)
    elif hint := segments_hint(cfg, train, evaluation, fit=fit):  # (the fit's trial packings not run again)
        log(hint)
    _log_truncated(corpus, [train, evaluation], log)
    if corpus.prepared and not os.path.exists(os.path.join(workdir, fmt.TOKENIZER)):
        corpus.tokenizer.save(os.path.join(workdir, fmt.TOKENIZER))
    return corpus.tokenizer, train, evaluation


class _Corpus(NamedTuple):
    """One corpus opened and split: ``splits(cfg)`` makes its (train, eval or None) Batches."""

    tokenizer: Tokenizer
    store: TokenStore
    train_idx: np.ndarray
    eval_idx: np.ndarray
    lengths: np.ndarray
    pairs: bool
    prepared: bool
    n: int
    t0: float

    def splits(self, cfg):
        train = Batches(cfg, self.store, self.tokenizer, doc_ids=self.train_idx, stream=_TRAIN_STREAM,
                        doc_lengths=self.lengths)
        evaluation = None
        if len(self.eval_idx):
            evaluation = Batches(cfg, self.store, self.tokenizer, doc_ids=self.eval_idx, stream=_EVAL_STREAM,
                                 num_batches=cfg.train.eval_batches, doc_lengths=self.lengths)
        return train, evaluation


def _open_corpus(cfg, workdir: str, log: Callable) -> _Corpus:
    prepared = _is_prepared_path(cfg.data.path)
    pairs = cfg.objective == "supervised"
    groups = None
    if prepared and fmt.is_prepared(cfg.data.path):  # (an unfinished one: _open_prepared says so)
        groups = _prepared_pair_groups(fmt.read_json(os.path.join(cfg.data.path, fmt.MANIFEST)), pairs,
                                       cfg.data.path, log)
    store, tok = (_open_prepared if prepared else _open_cached)(cfg, workdir, log)
    if not prepared and pairs:
        groups_file = os.path.join(store.directory or "", PAIR_GROUPS)
        groups = np.load(groups_file) if os.path.exists(groups_file) else None

    t0 = time.perf_counter()
    n = store.num_documents // 2 if pairs else store.num_documents  # (read_pairs applied max_docs to pairs)
    n = n if cfg.data.max_docs is None else min(n, cfg.data.max_docs)
    train_idx, eval_idx = split_documents(n, cfg.data.eval_fraction, cfg.train.seed, groups)
    return _Corpus(tok, store, train_idx, eval_idx, store.doc_lengths(), pairs, prepared, n, t0)


def _log_splits(corpus: _Corpus, train, evaluation, log: Callable, name: str = "") -> None:
    eval_rows = evaluation.rows_per_epoch if evaluation else 0
    unit = "pairs" if corpus.pairs else "docs"
    log(f"data: {name}{len(corpus.train_idx)} train / {len(corpus.eval_idx)} eval {unit}; {train.rows_per_epoch} "
        f"train rows of {train.seq_len}, packing efficiency {train.packing_efficiency:.1%} (non-pad share); "
        f"{eval_rows} eval rows; indexed in {time.perf_counter() - corpus.t0:.2f}s")


def _log_fit(cfg, fit: "SegmentsFit", train, log: Callable) -> None:
    log(f"data: model.max_segments {cfg.model.max_segments} -> {fit.cap} (model.fit_max_segments): no row held "
        f"more than {fit.most} documents; " + ("the same rows" if fit.fill is None else
                                             f"packing efficiency {train.packing_efficiency:.1%}")
        + ("; cuDNN (GPU) is given a length a row instead of a mask" if fit.cap == 1 else
           "; cuDNN's packed attention (GPU) takes less time the fewer it is built for"))


def _log_truncated(corpus: _Corpus, splits: list, log: Callable) -> None:
    cut = sum(b.truncated for b in splits if b is not None) if corpus.pairs else 0
    if cut:
        log(f"data: {cut} of {corpus.n} pairs are longer than a row and were cut (decoder: the target's end, then the "
            "input's start; encoder_decoder: each side's end); raise data.seq_len / data.target_len to keep them")


def _mixture_datasets(cfg, workdir: str, log: Callable):
    """``make_datasets`` of ``data.mixture``: every corpus opened as ``data.path`` opens one, with
    one tokenizer (``data.tokenizer``; else the work dir's; else a prepared corpus's; else one
    trained on all the corpora's training documents), its rows packed alone; the batches mixed."""
    mixture = cfg.data.mixture_sources()
    subs = [dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path, mixture=None))
            for path, _ in mixture]
    _mixture_tokenizer(cfg, subs, workdir, log)
    corpora = []
    for sub in subs:  # each with the streams it has alone: its rows are the ones it would serve alone
        with _of_corpus(sub):
            corpora.append(_open_corpus(sub, workdir, log))
    if len({c.tokenizer.sha256 for c in corpora}) > 1:
        raise DataError("the corpora of data.mixture were tokenized with different tokenizers; prepare them with one "
                        "(t5x-lite prepare --tokenizer) or set data.tokenizer")
    names = [path for path, _ in mixture]

    pairs = [corpus.splits(cfg) for corpus in corpora]
    for (path, weight), corpus, (train, evaluation) in zip(mixture, corpora, pairs):
        _log_splits(corpus, train, evaluation, log, name=f"{path} ({weight:.1%} of each batch): ")
    if cfg.model.fits_segments:
        fits = [fit_segments(cfg, list(p)) for p in pairs]
        cap = None if any(f.cap is None for f in fits) else max(f.cap for f in fits)
        if cap:
            pairs = [corpus.splits(cfg.with_max_segments(cap)) for corpus in corpora]
            _log_fit(cfg, SegmentsFit(max(f.most for f in fits), cap, None), pairs[0][0], log)
    for corpus, p in zip(corpora, pairs):
        _log_truncated(corpus, list(p), log)
    weights = [w for _, w in mixture]
    train = MixtureBatches([p[0] for p in pairs], weights, names, cfg.train.seed)
    with_eval = [i for i, p in enumerate(pairs) if p[1] is not None]
    evaluation = None
    if with_eval:
        evaluation = MixtureBatches([pairs[i][1] for i in with_eval], [weights[i] for i in with_eval],
                                    [names[i] for i in with_eval], cfg.train.seed, stream=_EVAL_STREAM,
                                    num_batches=cfg.train.eval_batches)
    return corpora[0].tokenizer, train, evaluation


@contextlib.contextmanager
def _of_corpus(sub):
    """Errors about ``data.path`` while opening one corpus of a mixture name it as that."""
    try:
        yield
    except DataError as e:
        raise DataError(f"data.mixture, corpus {sub.data.path!r}: {e}") from None


def _mixture_tokenizer(cfg, subs: list, workdir: str, log: Callable) -> None:
    """Make sure every corpus of a mixture finds one tokenizer: ``data.tokenizer`` or the work
    dir's as they are; else the first prepared corpus's, copied into the work dir; else one
    trained on the training documents of all the raw corpora, saved there."""
    path = os.path.join(workdir, fmt.TOKENIZER)
    if cfg.data.tokenizer or os.path.exists(path):
        return
    prepared = [sub.data.path for sub in subs if _is_prepared_path(sub.data.path) and fmt.is_prepared(sub.data.path)]
    if prepared:
        Tokenizer.load(os.path.join(prepared[0], fmt.TOKENIZER)).save(path)
        log(f"data: the mixture's tokenizer is {prepared[0]}'s (copied to {path})")
        return
    check_objective(cfg.objective, cfg.data, True, cfg.data.num_sentinels)
    texts = []
    for sub in subs:
        groups: list = []
        with _of_corpus(sub):
            docs = _read_corpus(sub, log, groups)
        texts += [docs[i] for i in _tokenizer_training_docs(sub, docs, groups)]
    t0 = time.perf_counter()
    tok = Tokenizer.train(texts, path, cfg.model.vocab_size, cfg.data.num_sentinels, seed=cfg.train.seed)
    log(f"data: tokenizer trained on {len(texts)} docs of {len(subs)} corpora -> {path} (vocab {tok.vocab_size}) "
        f"in {time.perf_counter() - t0:.1f}s")
