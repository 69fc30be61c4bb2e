"""Pre-training objectives as pure numpy functions.

Packed rows follow one convention: ``tokens [B, L]`` int32; ``segment_ids [B, L]`` numbering the
documents of a row 1..k with 0 on padding; ``positions [B, L]`` restarting at 0 in every segment
(0 on padding). The pad id is 0. Outputs are int32, except ``weights`` (float32, the loss weight
of each target) and ``prefix_mask`` (bool). Randomness comes only from the ``np.random.Generator``
passed in, so a seeded generator makes every function deterministic.

Rounding follows Python's ``round`` (half to even), as T5 does.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

# ---------------------------------------------------------------------- shared helpers


def _segment_starts(segment_ids: np.ndarray) -> np.ndarray:
    """bool [..., L]: True on the first token of every segment (never on padding)."""
    starts = np.ones(segment_ids.shape, bool)
    starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    return starts & (segment_ids > 0)


def _segment_table(segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index every segment of a [B, L] batch.

    Returns ``(segment_of_token [B, L], offset [B, L], lengths [S])``: the batch-wide index of
    each token's segment (-1 on padding), the token's offset inside its segment (0 on padding),
    and the length of each of the S segments.
    """
    valid = (segment_ids > 0).ravel()
    starts = _segment_starts(segment_ids).ravel()
    index = np.cumsum(starts) - 1
    start_at = np.flatnonzero(starts)
    lengths = np.bincount(index[valid], minlength=len(start_at))
    offset = np.zeros(segment_ids.size, np.int64)
    offset[valid] = np.flatnonzero(valid) - start_at[index[valid]]
    segment_of_token = np.where(valid, index, -1)
    return segment_of_token.reshape(segment_ids.shape), offset.reshape(segment_ids.shape), lengths


def shift_right(targets: np.ndarray, segment_ids: np.ndarray, start_id: int) -> np.ndarray:
    """Teacher-forcing inputs: ``targets`` shifted right by one *within each segment*.

    targets, segment_ids: int [..., L]. Returns int32 [..., L] whose first token of every segment
    is ``start_id`` and whose padding is 0. Used for decoder-only inputs and enc-dec decoder inputs.
    """
    targets = np.asarray(targets)
    segment_ids = np.asarray(segment_ids)
    shifted = np.zeros_like(targets)
    shifted[..., 1:] = targets[..., :-1]
    shifted = np.where(_segment_starts(segment_ids), start_id, shifted)
    return np.where(segment_ids > 0, shifted, 0).astype(np.int32)


def _as_int32(*arrays) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.int32) for a in arrays]


# ---------------------------------------------------------------------- decoder objectives


def causal_lm(tokens, segment_ids, positions, bos_id: int) -> dict[str, np.ndarray]:
    """Next-token prediction on packed rows.

    tokens, segment_ids, positions: int [B, L]. Returns ``input_ids`` (tokens shifted right per
    segment, ``bos_id`` first), ``targets`` (= tokens), ``weights`` (1 on every non-pad token),
    ``segment_ids`` and ``positions``, all [B, L].
    """
    tokens, segment_ids, positions = _as_int32(tokens, segment_ids, positions)
    valid = segment_ids > 0
    return {
        "input_ids": shift_right(tokens, segment_ids, bos_id),
        "targets": np.where(valid, tokens, 0).astype(np.int32),
        "weights": valid.astype(np.float32),
        "segment_ids": segment_ids,
        "positions": positions,
    }


def prefix_lm(tokens, segment_ids, positions, bos_id: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Prefix LM: causal LM where each segment starts with a bidirectional prefix.

    For every segment of length n >= 2 a split p is drawn uniformly from [1, n-1]. ``prefix_mask``
    (bool [B, L]) is True on the segment's input positions 0..p (BOS and tokens 0..p-1), which may
    attend to each other both ways; ``weights`` are 0 on targets before p (tokens the prefix
    already sees) and 1 from p on. Segments of length 1 get no prefix. Other keys as ``causal_lm``.
    """
    out = causal_lm(tokens, segment_ids, positions, bos_id)
    segment_of_token, offset, lengths = _segment_table(out["segment_ids"])
    split = rng.integers(1, np.maximum(lengths, 2))  # [S]; unused for length-1 segments
    valid = segment_of_token >= 0
    has_prefix = np.zeros(valid.shape, bool)
    has_prefix[valid] = lengths[segment_of_token[valid]] >= 2
    p = np.zeros(valid.shape, np.int64)
    p[valid] = split[segment_of_token[valid]]
    out["prefix_mask"] = has_prefix & (offset <= p)
    out["weights"] = (valid & ~(has_prefix & (offset < p))).astype(np.float32)
    return out


# ---------------------------------------------------------------------- encoder objective


def _special_table(vocab_size: int, special_ids: Iterable[int], max_token: int) -> tuple[np.ndarray, np.ndarray]:
    """``(is_special [max(V, max_token + 1)] bool, the non-special ids below V)``."""
    is_special = np.zeros(max(vocab_size, max_token + 1), bool)
    is_special[list(special_ids)] = True
    return is_special, np.flatnonzero(~is_special[:vocab_size])


def _draw(rng, shape: tuple, draw) -> np.ndarray:
    """``draw(generator, shape)``: one generator for the whole array, or one per row (a sequence
    of generators, row i drawing ``shape[1:]`` from the i-th: the same values as a call per row)."""
    if isinstance(rng, np.random.Generator):
        return draw(rng, shape)
    return np.stack([draw(r, (1, *shape[1:]))[0] for r in rng])


def mlm(
    tokens,
    segment_ids,
    positions,
    rng,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    rate: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> dict[str, np.ndarray]:
    """BERT masked-language modelling on packed rows.

    tokens, segment_ids, positions: int [B, L]. In each row exactly ``round(rate * m)`` of the m
    maskable tokens (non-pad, not in ``special_ids``) are chosen, at least one when m > 0. Of the
    chosen, a ``mask_frac`` share becomes ``mask_id``, a ``random_frac`` share a random non-special
    id in [0, vocab_size), the rest stays. Returns ``input_ids`` (corrupted), ``targets``
    (= tokens), ``weights`` (1 exactly on chosen tokens), ``segment_ids``, ``positions``, all [B, L].
    ``rng``: one generator, or one per row (each row then as if corrupted alone with its own).
    """
    if mask_id is None:
        raise ValueError("the mlm objective needs a '<mask>' token, and the tokenizer has none")
    tokens, segment_ids, positions = _as_int32(tokens, segment_ids, positions)
    is_special, candidates = _special_table(vocab_size, special_ids, int(tokens.max(initial=0)))
    maskable = (segment_ids > 0) & ~is_special[tokens]
    count = maskable.sum(axis=-1)
    wanted = np.where(count > 0, np.maximum(np.round(rate * count), 1), 0)

    # per row: keys, actions and random ids, drawn in that order
    draws = _draw(rng, (tokens.shape[0], 3, *tokens.shape[1:]), lambda g, shape: np.stack(
        [g.random(shape[:1] + shape[2:]), g.random(shape[:1] + shape[2:]),
         g.integers(0, len(candidates), shape[:1] + shape[2:])], axis=1))
    keys = np.where(maskable, draws[:, 0], np.inf)
    order = np.argsort(keys, axis=-1, kind="stable")  # the wanted smallest keys of each row are chosen
    chosen = np.zeros(tokens.shape, bool)
    np.put_along_axis(chosen, order, np.arange(tokens.shape[-1]) < wanted[..., None], axis=-1)

    action = draws[:, 1]
    to_mask = chosen & (action < mask_frac)
    to_random = chosen & (action >= mask_frac) & (action < mask_frac + random_frac)
    random_ids = candidates[draws[:, 2].astype(np.int64)]

    input_ids = np.where(to_mask, mask_id, np.where(to_random, random_ids, tokens))
    return {
        "input_ids": input_ids.astype(np.int32),
        "targets": np.where(segment_ids > 0, tokens, 0).astype(np.int32),
        "weights": chosen.astype(np.float32),
        "segment_ids": segment_ids,
        "positions": positions,
    }


# ---------------------------------------------------------------------- span corruption (T5)


def num_noise_tokens(length: int, noise_density: float) -> int:
    """Noise tokens in a segment: ``clip(round(length * density), 1, length - 1)``; 0 if length < 2."""
    if length < 2:
        return 0
    return int(min(max(round(length * noise_density), 1), length - 1))


def num_noise_spans(length: int, noise_density: float, mean_span_length: float) -> int:
    """Noise spans in a segment: ``max(1, round(noise / mean_span_length))``, also capped by the
    noise and non-noise token counts so that every span is non-empty; 0 if length < 2."""
    noise = num_noise_tokens(length, noise_density)
    if noise == 0:
        return 0
    return int(min(max(round(noise / mean_span_length), 1), noise, length - noise))


def span_lengths(n: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(inputs_len, targets_len) of a corrupted raw segment of n tokens, eos included.

    inputs: non-noise tokens + one sentinel per span + eos; targets: noise tokens + one sentinel
    per span + eos. Depends only on n.
    """
    noise = num_noise_tokens(n, noise_density)
    spans = num_noise_spans(n, noise_density, mean_span_length)
    return n - noise + spans + 1, noise + spans + 1


def span_corruption_raw_length(inputs_len: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(raw_len, targets_len): the longest raw segment whose corrupted inputs fit ``inputs_len``,
    and its targets length (the longest any raw segment up to raw_len produces).

    T5's setting: inputs 512 at density 0.15, mean span 3 -> raw 568, targets 114.
    """
    if inputs_len < 2:
        raise ValueError(f"span corruption needs inputs of at least 2 tokens, got {inputs_len}")
    raw = 1
    while span_lengths(raw + 1, noise_density, mean_span_length)[0] <= inputs_len:
        raw += 1
    return raw, span_lengths(raw, noise_density, mean_span_length)[1]


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """int [parts]: a uniformly random composition of ``total`` into ``parts`` positive lengths
    (the parts - 1 cut points are a uniform random subset of the total - 1 gaps)."""
    edges = np.empty(parts + 1, np.int64)
    edges[0], edges[-1] = 0, total
    edges[1:-1] = np.sort(rng.permutation(total - 1)[: parts - 1]) + 1
    return edges[1:] - edges[:-1]


def noise_span_mask(length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator) -> np.ndarray:
    """bool [length]: which tokens of a segment are noise.

    ``num_noise_tokens`` noise tokens in ``num_noise_spans`` spans; the span lengths of noise and of
    non-noise are independent random compositions. The segment opens with non-noise and the two
    alternate, ending on noise.
    """
    noise = num_noise_tokens(length, noise_density)
    spans = num_noise_spans(length, noise_density, mean_span_length)
    if spans == 0:
        return np.zeros(length, bool)
    runs = np.empty(2 * spans, np.int64)
    runs[0::2] = _random_partition(length - noise, spans, rng)
    runs[1::2] = _random_partition(noise, spans, rng)
    return np.repeat(np.arange(2 * spans) % 2 == 1, runs)


def _replace_runs(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray, eos_id: int) -> np.ndarray:
    """int32 [m]: ``tokens`` with every run of True in ``mask`` replaced by the next sentinel,
    then ``eos_id``. ``sentinels`` holds one id per run."""
    run_start = mask.copy()
    run_start[1:] &= ~mask[:-1]
    body = tokens.copy()
    body[run_start] = sentinels
    keep = ~mask | run_start
    out = np.empty(int(keep.sum()) + 1, np.int32)
    out[:-1] = body[keep]
    out[-1] = eos_id
    return out


def span_corrupt(
    tokens_1d,
    rng: np.random.Generator,
    *,
    noise_density: float,
    mean_span_length: float,
    sentinel_ids: Sequence[int],
    eos_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one raw segment.

    tokens_1d: int [n]. Returns ``(inputs, targets)``, int32 of lengths ``span_lengths(n)``:
    inputs are the non-noise tokens with each noise span replaced by the next sentinel
    (``sentinel_ids[0]``, ``[1]``, ...) then ``eos_id``; targets are, per span, its sentinel and its
    noise tokens, then ``eos_id``. A 1-token segment has no noise: (token, eos) and (eos,).
    Raises ValueError if there are fewer sentinels than spans.
    """
    tokens = np.asarray(tokens_1d, dtype=np.int32)
    n = len(tokens)
    spans = num_noise_spans(n, noise_density, mean_span_length)
    if spans > len(sentinel_ids):
        raise ValueError(
            f"span corruption of {n} tokens makes {spans} noise spans but only {len(sentinel_ids)} "
            "sentinel ids exist; raise data.num_sentinels (and retrain the tokenizer) or shorten data.seq_len"
        )
    if spans == 0:
        return np.append(tokens, eos_id).astype(np.int32), np.array([eos_id], np.int32)
    sentinels = np.asarray(sentinel_ids[:spans], dtype=np.int32)
    mask = noise_span_mask(n, noise_density, mean_span_length, rng)
    # The segment opens with non-noise and closes with noise, so non-noise runs pair up with the
    # noise runs that follow them: the targets are the same replacement with the mask inverted.
    return _replace_runs(tokens, mask, sentinels, eos_id), _replace_runs(tokens, ~mask, sentinels, eos_id)
