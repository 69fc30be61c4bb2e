"""Objectives: hand-checked small cases and statistical checks over many rows."""

import numpy as np
import pytest

from t5x_lite import objectives as obj

from helpers import undo_span_corruption

BOS, MASK, EOS = 3, 4, 1
SPECIAL = {0, 1, 2, 3, 4}

# Two rows: row 0 holds segments of length 4 and 2 plus padding; row 1 one segment of 3 and two of 1.
TOKENS = np.array([[10, 11, 12, 13, 20, 21, 0, 0], [30, 31, 32, 40, 50, 0, 0, 0]], np.int32)
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 2, 3, 0, 0, 0]], np.int32)
POSITIONS = np.array([[0, 1, 2, 3, 0, 1, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0]], np.int32)


def test_shift_right_restarts_every_segment():
    got = obj.shift_right(TOKENS, SEGMENTS, BOS)
    want = np.array([[3, 10, 11, 12, 3, 20, 0, 0], [3, 30, 31, 3, 3, 0, 0, 0]])
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32


def test_causal_lm_exact():
    out = obj.causal_lm(TOKENS, SEGMENTS, POSITIONS, BOS)
    np.testing.assert_array_equal(out["input_ids"], [[3, 10, 11, 12, 3, 20, 0, 0], [3, 30, 31, 3, 3, 0, 0, 0]])
    np.testing.assert_array_equal(out["targets"], TOKENS)
    np.testing.assert_array_equal(out["weights"], [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    assert out["weights"].dtype == np.float32
    np.testing.assert_array_equal(out["segment_ids"], SEGMENTS)
    np.testing.assert_array_equal(out["positions"], POSITIONS)


def test_prefix_lm_exact_for_short_segments():
    # Lengths 2 and 1: the split of a 2-token segment can only be 1; a 1-token segment has no prefix.
    tokens = np.array([[10, 11, 20, 0]])
    segments = np.array([[1, 1, 2, 0]])
    positions = np.array([[0, 1, 0, 0]])
    out = obj.prefix_lm(tokens, segments, positions, BOS, np.random.default_rng(0))
    np.testing.assert_array_equal(out["input_ids"], [[3, 10, 3, 0]])
    np.testing.assert_array_equal(out["targets"], [[10, 11, 20, 0]])
    np.testing.assert_array_equal(out["prefix_mask"], [[True, True, False, False]])
    np.testing.assert_array_equal(out["weights"], [[0, 1, 1, 0]])
    assert out["prefix_mask"].dtype == bool


def test_prefix_lm_split_structure_and_uniformity():
    rng = np.random.default_rng(1)
    splits = []
    for _ in range(400):
        out = obj.prefix_lm(TOKENS, SEGMENTS, POSITIONS, BOS, rng)
        np.testing.assert_array_equal(out["input_ids"], obj.causal_lm(TOKENS, SEGMENTS, POSITIONS, BOS)["input_ids"])
        pm, w = out["prefix_mask"], out["weights"]
        for row, (start, n) in [(0, (0, 4)), (0, (4, 2)), (1, (0, 3))]:
            seg_pm, seg_w = pm[row, start : start + n], w[row, start : start + n]
            p = int(seg_pm.sum()) - 1  # prefix covers input positions 0..p
            assert 1 <= p <= n - 1
            np.testing.assert_array_equal(seg_pm, np.arange(n) <= p)
            np.testing.assert_array_equal(seg_w, np.arange(n) >= p)
            if (row, start) == (0, 0):
                splits.append(p)
        # 1-token segments: no prefix, full weight; padding: nothing.
        assert not pm[1, 3:].any() and (w[1, 3:5] == 1).all() and (w[:, 6:] == 0).all()
    counts = np.bincount(splits, minlength=4)[1:]
    assert counts.min() > 100, counts  # p uniform over {1, 2, 3} for the 4-token segment


def _mlm_rows(rows=2000, length=64, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 100, size=(rows, length)).astype(np.int32)
    tokens[:, ::7] = EOS  # specials sprinkled in
    seg = np.ones_like(tokens)
    cut = rng.integers(length // 2, length, size=rows)
    pad = np.arange(length) >= cut[:, None]
    tokens[pad], seg[pad] = 0, 0
    return tokens, seg, np.zeros_like(tokens)


def test_mlm_choice_counts_split_and_specials():
    tokens, seg, pos = _mlm_rows()
    out = obj.mlm(tokens, seg, pos, np.random.default_rng(0), mask_id=MASK, vocab_size=100, special_ids=SPECIAL)
    chosen = out["weights"] > 0
    maskable = (seg > 0) & ~np.isin(tokens, list(SPECIAL))
    np.testing.assert_array_equal(chosen.sum(1), np.maximum(np.round(0.15 * maskable.sum(1)), 1))
    assert not (chosen & ~maskable).any(), "a special or pad token was chosen"
    changed = out["input_ids"] != tokens
    assert not (changed & ~chosen).any(), "a token changed outside the chosen positions"
    np.testing.assert_array_equal(out["targets"], tokens)

    x = out["input_ids"][chosen]
    n = chosen.sum()
    masked = (x == MASK).mean()
    kept = (x == tokens[chosen]).mean()
    randomised = 1 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(randomised - 0.1 + 0.1 / 95) < 0.015 and abs(kept - 0.1 - 0.1 / 95) < 0.015, (
        masked, randomised, kept, n)
    replaced = x[(x != MASK) & (x != tokens[chosen])]
    assert not np.isin(replaced, list(SPECIAL)).any() and replaced.min() >= 0 and replaced.max() < 100


def test_mlm_deterministic_and_at_least_one():
    tokens = np.array([[7, 1, 0, 0]])  # one maskable token: round(0.15) = 0, but one must be chosen
    seg = np.array([[1, 1, 0, 0]])
    a = obj.mlm(tokens, seg, seg * 0, np.random.default_rng(5), mask_id=MASK, vocab_size=50, special_ids=SPECIAL)
    np.testing.assert_array_equal(a["weights"], [[1, 0, 0, 0]])
    big, s, p = _mlm_rows(rows=8)
    r1 = obj.mlm(big, s, p, np.random.default_rng(3), mask_id=MASK, vocab_size=100, special_ids=SPECIAL)
    r2 = obj.mlm(big, s, p, np.random.default_rng(3), mask_id=MASK, vocab_size=100, special_ids=SPECIAL)
    for k in r1:
        np.testing.assert_array_equal(r1[k], r2[k])
    with pytest.raises(ValueError, match="<mask>"):
        obj.mlm(big, s, p, np.random.default_rng(3), mask_id=None, vocab_size=100, special_ids=SPECIAL)


def test_mlm_with_a_generator_per_row_equals_each_row_alone():
    """The batch source corrupts a whole batch in one call, row i drawing from its own generator:
    the same rows as corrupting each alone (what makes a row independent of its batch)."""
    big, s, p = _mlm_rows(rows=6)
    gens = lambda: [np.random.default_rng([7, i]) for i in range(6)]
    together = obj.mlm(big, s, p, gens(), mask_id=MASK, vocab_size=100, special_ids=SPECIAL)
    alone = [obj.mlm(big[i:i + 1], s[i:i + 1], p[i:i + 1], g, mask_id=MASK, vocab_size=100, special_ids=SPECIAL)
             for i, g in enumerate(gens())]
    for k in together:
        np.testing.assert_array_equal(together[k], np.concatenate([a[k] for a in alone]))
    assert not np.array_equal(together["weights"][0], together["weights"][1])


# ---------------------------------------------------------------------- span corruption


def test_span_counts_and_t5_lengths():
    assert obj.num_noise_tokens(568, 0.15) == 85 and obj.num_noise_spans(568, 0.15, 3.0) == 28
    assert obj.span_lengths(568, 0.15, 3.0) == (512, 114)
    assert obj.span_corruption_raw_length(512, 0.15, 3.0) == (568, 114)
    assert obj.span_lengths(569, 0.15, 3.0)[0] > 512
    assert obj.num_noise_tokens(2, 0.15) == 1 and obj.num_noise_tokens(100, 0.999) == 99
    assert obj.num_noise_spans(10, 0.15, 3.0) == 1  # round(2 / 3) = 1
    assert obj.span_lengths(1, 0.15, 3.0) == (2, 1)


@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.5, 2.0), (0.3, 1.0)])
def test_span_corrupt_reconstructs(density, mean):
    rng = np.random.default_rng(0)
    sentinels = list(range(1000, 1300))
    for n in list(range(1, 40)) + [100, 568]:
        tokens = rng.integers(10, 900, size=n)
        for _ in range(5):
            mask = obj.noise_span_mask(n, density, mean, rng)
            spans = obj.num_noise_spans(n, density, mean)
            assert mask.sum() == obj.num_noise_tokens(n, density)
            assert int((mask[1:] & ~mask[:-1]).sum() + mask[0]) == spans
            if n >= 2:
                assert not mask[0] and mask[-1]
            inputs, targets = obj.span_corrupt(
                tokens, rng, noise_density=density, mean_span_length=mean, sentinel_ids=sentinels, eos_id=EOS
            )
            assert (len(inputs), len(targets)) == obj.span_lengths(n, density, mean)
            assert [t for t in inputs if t in sentinels] == sentinels[:spans]
            assert [t for t in targets if t in sentinels] == sentinels[:spans]
            assert inputs[-1] == EOS and targets[-1] == EOS
            assert undo_span_corruption(list(inputs), list(targets), set(sentinels)) == list(tokens)


def test_span_corrupt_exact_small_case():
    # Length 4, density 0.5, mean 2: 2 noise tokens in 1 span; non-noise 2 tokens, starts non-noise,
    # ends noise -> mask is always [F, F, T, T].
    inputs, targets = obj.span_corrupt(
        [7, 8, 9, 10], np.random.default_rng(0), noise_density=0.5, mean_span_length=2, sentinel_ids=[50], eos_id=EOS
    )
    np.testing.assert_array_equal(inputs, [7, 8, 50, EOS])
    np.testing.assert_array_equal(targets, [50, 9, 10, EOS])


def test_span_mean_length_statistics():
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(300):
        mask = obj.noise_span_mask(200, 0.15, 3.0, rng)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        lengths.extend(edges[1::2] - edges[0::2])
    assert abs(np.mean(lengths) - 3.0) < 0.05  # 30 noise tokens in 10 spans
    assert max(lengths) > 5  # lengths are random, not all equal


def test_span_corrupt_too_few_sentinels():
    with pytest.raises(ValueError, match="sentinel"):
        obj.span_corrupt(
            np.arange(100), np.random.default_rng(0), noise_density=0.15, mean_span_length=3.0,
            sentinel_ids=[5, 6], eos_id=EOS,
        )
