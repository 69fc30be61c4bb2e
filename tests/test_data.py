"""Corpus readers, tokenizer, packing, the batch source and make_datasets."""

import gzip
import io
import json
import os
import re

import numpy as np
import pytest
import sentencepiece as spm

from t5x_lite import objectives
from t5x_lite.config import Config, ConfigError
from t5x_lite.data import (
    Batches,
    DataError,
    TokenStore,
    Tokenizer,
    load_documents,
    make_datasets,
    min_vocab_size,
    pack_sequences,
    read_documents,
    stdlib_docstrings,
)

from helpers import undo_span_corruption
from t5x_lite.data import corpus as corpus_module
from t5x_lite.data.corpus import Skipped
from t5x_lite.data.pipeline import pack_rows, shuffle_index, split_documents

NUM_SENTINELS = 16
VOCAB = 400


def synthetic_corpus(n_docs=300, seed=0):
    """Deterministic pseudo-English documents of varied length."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "to", "ri", "mo", "ne", "sa", "lu", "pe", "di", "fo", "ba", "zi", "qu", "ve", "ho"]
    words = sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(400)})
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(3, 80))
        sentence = " ".join(rng.choice(words, size=n))
        docs.append(sentence.capitalize() + ".\nSee also: " + rng.choice(words) + "()")
    return docs


@pytest.fixture(scope="session")
def corpus():
    return synthetic_corpus()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("tok") / "sp.model"
    return Tokenizer.train(corpus, str(path), VOCAB, NUM_SENTINELS, seed=0)


def make_cfg(family="decoder", objective=None, seq_len=32, batch_size=4, **data):
    cfg = Config()
    cfg.model.family = family
    cfg.model.vocab_size = VOCAB
    cfg.data.objective = objective
    cfg.data.seq_len = seq_len
    cfg.data.num_sentinels = NUM_SENTINELS
    cfg.train.batch_size = batch_size
    cfg.train.eval_batches = 2
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg.validate()


def token_docs(tokenizer, corpus):
    return [np.array(x, np.int32) for x in tokenizer.encode_batch(corpus)]


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_specials_and_roundtrip(tokenizer, tmp_path):
    tok = tokenizer
    assert tok.vocab_size == VOCAB
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.sentinel_ids == list(range(5, 5 + NUM_SENTINELS))
    assert tok.special_ids == frozenset(range(5 + NUM_SENTINELS))
    for text in ["Kato rimo ne.", "  two  spaces\nand a newline\ttab", "unseen: é, 中文, emoji 🙂", "<pad> literal"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("foo <mask> bar <extra_id_3>")
    assert tok.mask_id in ids and tok.sentinel_ids[3] in ids
    assert tok.encode("<extra_id_0>")[-1] == 5
    assert tok.decode(tok.encode("ka to") + [tok.eos_id] + tok.encode("ri")) == "ka to"
    assert tok.decode([tok.pad_id] + tok.encode("ka")) == "ka"
    assert tok.encode_batch(["ka to", "ri"]) == [tok.encode("ka to"), tok.encode("ri")]

    tok.save(str(tmp_path / "copy.model"))
    loaded = Tokenizer.load(str(tmp_path / "copy.model"))
    assert loaded.sha256 == tok.sha256 and loaded.encode("ka to ri") == tok.encode("ka to ri")
    assert os.listdir(tmp_path) == ["copy.model"], "temporary files left behind"


def test_tokenizer_training_deterministic(corpus, tokenizer, tmp_path):
    again = Tokenizer.train(corpus, str(tmp_path / "b.model"), VOCAB, NUM_SENTINELS, seed=0)
    assert again.sha256 == tokenizer.sha256


def test_tokenizer_vocab_errors(corpus, tmp_path):
    with pytest.raises(DataError, match=r"model\.vocab_size=100.*data\.num_sentinels=16.*at least 309"):
        Tokenizer.train(corpus, str(tmp_path / "x.model"), 100, NUM_SENTINELS)
    assert min_vocab_size(NUM_SENTINELS) == 309
    with pytest.raises(DataError, match="too small for model.vocab_size|hint"):
        Tokenizer.train(corpus[:5], str(tmp_path / "y.model"), 3000, NUM_SENTINELS)
    assert not os.path.exists(tmp_path / "x.model") and not os.path.exists(tmp_path / "y.model")


@pytest.fixture(scope="session")
def t5_style_tokenizer(tmp_path_factory, corpus):
    """A model trained elsewhere: pad 0, eos 1, unk 2, no bos, no <mask>, no sentinels."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("t5") / "spiece.model"
    path.write_bytes(model.getvalue())
    return Tokenizer.load(str(path))


def test_foreign_model_fallbacks(t5_style_tokenizer, corpus):
    tok = t5_style_tokenizer
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, 0)
    assert tok.mask_id is None and tok.sentinel_ids == []
    assert tok.special_ids == frozenset({0, 1, 2})
    docs = token_docs(tok, corpus[:20])
    Batches(make_cfg(), docs, tok).batches(0)  # causal needs neither
    with pytest.raises(DataError, match="<mask>"):
        Batches(make_cfg("encoder"), docs, tok)
    with pytest.raises(DataError, match="sentinels"):
        Batches(make_cfg("encoder_decoder"), docs, tok)
    with pytest.raises(DataError, match="not a sentencepiece model"):
        Tokenizer.load(__file__)


# ---------------------------------------------------------------------- corpus


def test_readers(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("gzipped doc")
    (tmp_path / "c.jsonl").write_text('{"text": "j1", "id": 1}\n\n{"text": "j2"}\n{"text": "   "}\n')
    sub = tmp_path / "sub"
    sub.mkdir()
    with gzip.open(sub / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "x", "text": "gz line"}) + "\n")
    (sub / "e.md").write_text("markdown as text")

    all_docs = ["first doc\nline two", "gzipped doc", "j1", "j2", "gz line", "markdown as text"]
    skipped = Skipped()
    assert read_documents(str(tmp_path), skipped=skipped) == all_docs
    assert skipped.counts == {"blank documents": 1} and skipped.first["blank documents"] == f"{tmp_path}/c.jsonl:4"
    assert read_documents(str(tmp_path / "*.jsonl")) == ["j1", "j2"]
    assert read_documents(str(tmp_path / "**" / "*.jsonl*")) == ["j1", "j2", "gz line"]
    assert read_documents(str(sub / "d.jsonl.gz"), field="body") == ["x"]
    assert read_documents(str(tmp_path), max_docs=3) == all_docs[:3]


def test_jsonl_byte_ranges_cover_every_line_once(tmp_path):
    lines = [json.dumps({"text": f"line {i} " + "x" * (i % 37)}) for i in range(400)]
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    for unit_bytes in (64, 1000, 1 << 20):  # cuts inside lines, at many places, none
        units = corpus_module.plan_units([str(tmp_path / "big.jsonl")], unit_bytes)
        got = [d for u in units for d, _ in corpus_module.unit_documents(u, "text", Skipped(strict=True))]
        assert got == [json.loads(x)["text"] for x in lines]
        assert sum(u[0].end - u[0].start for u in units) == (tmp_path / "big.jsonl").stat().st_size


def test_reader_problems_are_counted_or_strict(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "no text", "id": 2}\n[1]\n{oops\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    skipped = Skipped()
    assert read_documents(str(tmp_path), skipped=skipped) == ["ok"]
    assert skipped.counts == {"JSON lines without a text field 'text'": 1, "JSON lines not an object": 1,
                              "lines not JSON": 1, "files not UTF-8": 1}
    assert "bad.jsonl:2 (fields present: ['content', 'id']" in str(skipped)
    with pytest.raises(DataError, match=r"bad\.jsonl:2 \(fields present: \['content', 'id'\].*drop --strict"):
        read_documents(str(tmp_path / "bad.jsonl"), skipped=Skipped(strict=True))
    with pytest.raises(DataError, match="nothing_here"):
        read_documents(str(tmp_path / "nothing_here*.txt"))
    (tmp_path / "blank.txt").write_text("  \n\t ")
    cfg = make_cfg(path=str(tmp_path / "blank.txt"))
    with pytest.raises(DataError, match="corpus is empty.*blank.txt.*skipped: 1 blank documents"):
        load_documents(cfg.data)


@pytest.fixture(scope="module")
def stdlib_docs():
    return stdlib_docstrings()


def test_stdlib_corpus(stdlib_docs):
    docs = stdlib_docs
    assert len(docs) > 1000 and sum(map(len, docs)) > 500_000
    assert all(len(d) >= 40 and d == d.strip() for d in docs)
    assert len(set(docs)) == len(docs)
    # The statement-only walk finds what ast.walk finds, in the same order.
    import ast
    import inspect

    for path in corpus_module._stdlib_files()[::40]:
        source = open(path, "rb").read()
        expected = [inspect.cleandoc(d).strip() for n in ast.walk(ast.parse(source))
                    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                    and (d := ast.get_docstring(n, clean=False))]
        assert list(corpus_module._docstrings_of(source)) == expected, path


# ---------------------------------------------------------------------- packing


def test_pack_sequences_exact():
    seqs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9, 10, 11]), np.array([12])]
    tokens, seg, pos = pack_sequences(seqs, 4)
    # [6..11] is cut into [6, 7, 8, 9] and [10, 11]; a row closes when the next chunk does not fit.
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9], [10, 11, 12, 0]])
    np.testing.assert_array_equal(seg, [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 2, 0]])
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0], [0, 1, 0, 0], [0, 1, 2, 3], [0, 1, 0, 0]])
    assert tokens.dtype == seg.dtype == pos.dtype == np.int32


def test_pack_sequences_property():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 1000, size=rng.integers(1, 60)) for _ in range(300)]
    L = 16
    tokens, seg, pos = pack_sequences(seqs, L)
    # Reading segments row by row gives every sequence's chunks, in order, each exactly once.
    pieces = []
    for t, s, p in zip(tokens, seg, pos):
        assert (t[s == 0] == 0).all() and (p[s == 0] == 0).all()
        n = int((s > 0).sum())
        assert (s[n:] == 0).all() and (s[:n] > 0).all()  # pads only at the end
        for k in range(1, s.max() + 1):
            idx = np.flatnonzero(s == k)
            assert (np.diff(idx) == 1).all()
            np.testing.assert_array_equal(p[idx], np.arange(len(idx)))
            pieces.append(t[idx])
    expected = [q[i : i + L] for q in seqs for i in range(0, len(q), L)]
    assert len(pieces) == len(expected)
    for a, b in zip(pieces, expected):
        np.testing.assert_array_equal(a, b)
    # Greedy: a row is closed only when the next chunk does not fit.
    fill = (seg > 0).sum(1)
    first_len = np.array([(s == 1).sum() for s in seg])
    assert (fill[:-1] + first_len[1:] > L).all()


def test_pack_rows_span_capacities_and_shuffle_index():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 120, size=500)
    raw_len, target_len = objectives.span_corruption_raw_length(44, 0.15, 3.0)
    table = np.array([objectives.span_lengths(n, 0.15, 3.0) for n in range(raw_len + 1)])
    starts, fill = pack_rows(lengths, raw_len, (44, target_len), table)
    stream = np.concatenate([[0], np.cumsum(lengths)])
    # Rows tile the stream; a row's pieces (its parts of documents) are at most raw_len long and
    # fit both capacities once corrupted; a longer document continues in the next rows.
    assert starts[0] == 0 and starts[-1] == stream[-1] and (np.diff(starts) > 0).all()
    used = 0
    for a, b in zip(starts[:-1], starts[1:]):
        cuts = sorted({a, b} | {int(x) for x in stream if a < x < b})
        sizes = table[np.diff(cuts)].sum(0)
        assert sizes[0] <= 44 and sizes[1] <= target_len
        used += sizes[0]
    assert fill == pytest.approx(used / (44 * (len(starts) - 1)))
    with pytest.raises(AssertionError, match="chunk boundary inside a row"):  # capacities that break the layout
        pack_rows(lengths, 40, (60, 30), table[:41])

    keys = np.array([11, 22, 33, 44], np.uint64)
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        perm = shuffle_index(np.arange(n), n, keys)
        assert sorted(perm.tolist()) == list(range(n)), n  # a bijection of [0, n)
    perm = shuffle_index(np.arange(1000), 1000, keys)
    np.testing.assert_array_equal(shuffle_index(np.arange(990, 1000), 1000, keys), perm[990:])
    other = shuffle_index(np.arange(1000), 1000, keys + np.uint64(1))
    assert (perm != other).mean() > 0.9 and abs(np.corrcoef(perm, np.arange(1000))[0, 1]) < 0.1


def test_split_documents():
    train, held = split_documents(1000, 0.1, seed=0)
    assert len(np.intersect1d(train, held)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(1000))
    assert 60 < len(held) < 140
    again_train, again_held = split_documents(1000, 0.1, seed=0)
    np.testing.assert_array_equal(held, again_held)
    assert not np.array_equal(held, split_documents(1000, 0.1, seed=1)[1])
    assert len(split_documents(3, 0.01, 0)[1]) == 1  # at least one eval doc
    assert len(split_documents(2, 0.99, 0)[0]) == 1  # at least one train doc
    assert len(split_documents(50, 0.0, 0)[1]) == 0


# ---------------------------------------------------------------------- Batches


@pytest.fixture(scope="module")
def docs(tokenizer, corpus):
    return token_docs(tokenizer, corpus)


KEYS = {
    "causal": {"input_ids", "targets", "weights", "segment_ids", "positions"},
    "prefix": {"input_ids", "targets", "weights", "segment_ids", "positions", "prefix_mask"},
    "mlm": {"input_ids", "targets", "weights", "segment_ids", "positions"},
    "span": {"encoder_input_ids", "encoder_segment_ids", "encoder_positions",
             "input_ids", "targets", "weights", "segment_ids", "positions"},
}
FAMILIES = [("decoder", "causal"), ("decoder", "prefix"), ("encoder", "mlm"), ("encoder_decoder", "span")]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("family,objective", FAMILIES)
def test_batches_deterministic_resumable_sliceable(family, objective, docs, tokenizer):
    cfg = make_cfg(family, objective, batch_size=4)
    a, b = Batches(cfg, docs, tokenizer), Batches(cfg, docs, tokenizer)
    first = [a.batches(s) for s in range(8)]
    assert set(first[0]) == KEYS[objective]
    for batch in first:
        for k, v in batch.items():
            assert v.shape[0] == 4 and v.ndim == 2
            assert v.shape[1] == (cfg.data.seq_len if k.startswith("encoder") or objective != "span" else a.target_len)
    # Fresh object, same steps in another order (a resume at step 5): identical.
    for s in [5, 6, 7, 0]:
        assert_same(b.batches(s), first[s])
    assert not np.array_equal(first[0]["targets"], first[1]["targets"])
    # Two process slices are the two halves of the global batch.
    halves = [b(3, i, 2) for i in range(2)]  # calling the object is the same as .batches
    for k in first[3]:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), first[3][k])
    with pytest.raises(DataError, match="not divisible by process_count=3"):
        a.batches(0, 0, 3)


def test_a_far_step_reads_only_its_own_rows(docs, tokenizer):
    store = TokenStore.from_documents(docs, tokenizer.eos_id)
    read_tokens = []
    real_read = store.read
    store.read = lambda d, lo, hi: (read_tokens.append(int((hi - lo).sum())), real_read(d, lo, hi))[1]
    ds = Batches(make_cfg(batch_size=4), store, tokenizer)
    for step in (0, 10**9 + 7):  # a resume deep into epoch ~10**7 builds no permutation table
        read_tokens.clear()
        batch = ds.batches(step)
        assert sum(read_tokens) == int((batch["segment_ids"] > 0).sum())  # exactly the tokens served
    assert_same(Batches(make_cfg(batch_size=4), docs, tokenizer).batches(10**9 + 7), batch)


def test_epochs_permute_all_rows(docs, tokenizer):
    ds = Batches(make_cfg(batch_size=1), docs, tokenizer)
    R = ds.rows_per_epoch
    all_rows = Batches(make_cfg(batch_size=R), docs, tokenizer).batches(0)["targets"]
    expected = sorted(map(tuple, all_rows))
    assert len(expected) == R
    orders = []
    for epoch in range(2):
        order = [tuple(ds.batches(epoch * R + i)["targets"][0]) for i in range(R)]
        assert sorted(order) == expected
        orders.append(order)
    assert orders[0] != orders[1], "epochs are reshuffled"
    assert ds.num_documents == len(docs)
    assert ds.num_tokens == sum(len(d) + 1 for d in docs)
    assert 0.5 < ds.packing_efficiency <= 1.0


@pytest.mark.parametrize("packing", ["greedy", "best_fit"])
def test_causal_rows_hold_every_document_once(packing, docs, tokenizer):
    ds = Batches(make_cfg(batch_size=1, packing=packing), docs, tokenizer)
    rows = Batches(make_cfg(batch_size=ds.rows_per_epoch, packing=packing), docs, tokenizer).batches(0)
    np.testing.assert_array_equal(rows["input_ids"], objectives.shift_right(rows["targets"], rows["segment_ids"], 3))
    # Each document (+eos) appears once: its chunks are segments somewhere in the epoch.
    seen = []
    for t, s in zip(rows["targets"], rows["segment_ids"]):
        seen.extend(tuple(t[s == k]) for k in range(1, s.max() + 1))
    expected = [tuple(np.append(d, 1)[i : i + 32]) for d in docs for i in range(0, len(d) + 1, 32)]
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_concat_packing_fills_every_row_and_loses_nothing(objective, docs, tokenizer):
    family = "encoder" if objective == "mlm" else "decoder"
    greedy = Batches(make_cfg(family, objective, batch_size=1), docs, tokenizer)
    cfg = make_cfg(family, objective, batch_size=1, packing="concat")
    ds = Batches(cfg, docs, tokenizer)
    rows = Batches(make_cfg(family, objective, batch_size=ds.rows_per_epoch, packing="concat"), docs,
                   tokenizer).batches(0)
    stream = np.concatenate([np.append(d, 1) for d in docs])
    assert ds.rows_per_epoch == -(-len(stream) // 32) < greedy.rows_per_epoch
    assert ds.packing_efficiency > 0.99 > greedy.packing_efficiency
    # Rows in stream order (their starts) rebuild the token stream exactly: every row but the
    # last full, and a document crossing a row boundary goes on as the next row's first segment.
    starts = [np.flatnonzero(np.all(stream[i:i + 32] == rows["targets"][:, :min(32, len(stream) - i)], axis=1))
              for i in range(0, len(stream), 32)]
    order = [int(s[0]) for s in starts]
    targets, segments, positions = (rows[k][order] for k in ("targets", "segment_ids", "positions"))
    assert (segments[:-1] > 0).all()
    np.testing.assert_array_equal(targets[segments > 0], stream)
    for seg_row, pos_row in zip(segments, positions):  # positions restart in every segment
        for k in range(1, seg_row.max() + 1):
            np.testing.assert_array_equal(pos_row[seg_row == k], np.arange((seg_row == k).sum()))
    if objective == "mlm":  # full rows score the most positions; the loss's gather bound still holds
        from t5x_lite.losses import max_scored_positions

        assert rows["weights"].sum(1).max() <= max_scored_positions(32, cfg.data.mlm_rate)


def _segments_of(rows: dict, prefix: str = "") -> list[tuple]:
    """Every segment of every row, as a tuple of its target (or encoder input) tokens."""
    tokens = rows["encoder_input_ids" if prefix else "targets"]
    return [tuple(t[s == k]) for t, s in zip(tokens, rows[prefix + "segment_ids"]) for k in range(1, s.max() + 1)]


@pytest.mark.parametrize("family,objective,packing", [("decoder", "causal", "greedy"), ("decoder", "causal", "concat"),
                                                      ("encoder_decoder", "span", "greedy"),
                                                      ("decoder", "causal", "best_fit"),
                                                      ("encoder_decoder", "span", "best_fit")])
def test_max_segments_caps_documents_per_row_and_loses_nothing(family, objective, packing, docs, tokenizer):
    """model.max_segments (cuDNN's packed layout is built for it) caps the documents of a row;
    rows get more numerous, no token is lost or repeated."""
    def epoch(cap):
        cfg = make_cfg(family, objective, seq_len=48, batch_size=1, packing=packing)
        cfg.model.max_segments = cap
        rows = Batches(cfg, docs, tokenizer).rows_per_epoch
        cfg.train.batch_size = rows
        return rows, Batches(cfg, docs, tokenizer).batches(0)

    (free_rows, free), (capped_rows, capped) = epoch(0), epoch(1)
    assert free["segment_ids"].max() > 1 and capped["segment_ids"].max() == 1 and capped_rows > free_rows
    if objective == "span":  # the same raw chunks (corrupted afresh: the noise is drawn per row)
        sentinels = set(tokenizer.sentinel_ids)
        restored = [sorted(tuple(undo_span_corruption(e, t, sentinels)) for e, t in zip(_segments_of(rows, "encoder_"),
                                                                                    _segments_of(rows)))
                    for rows in (free, capped)]
        assert restored[0] == restored[1]
    elif packing in ("greedy", "best_fit"):  # the same documents, fewer to a row
        assert sorted(_segments_of(capped)) == sorted(_segments_of(free))
    else:  # concat: the same token stream, cut at 48 tokens or where the next document begins
        stream = np.concatenate([np.append(d, 1) for d in docs])
        served = capped["targets"][capped["segment_ids"] > 0]
        np.testing.assert_array_equal(np.sort(served), np.sort(stream))
        assert sum(len(s) for s in _segments_of(capped)) == len(stream)


@pytest.mark.parametrize("family,objective", [("decoder", "causal"), ("encoder", "mlm"), ("encoder_decoder", "span")])
def test_best_fit_packing_fills_rows(family, objective, docs, tokenizer):
    """data.packing=best_fit: the same documents served in an order next fit packs nearly full
    (documents of 40-215 tokens in rows of 256: greedy leaves a quarter of the rows padding)."""
    def build(packing):
        return Batches(make_cfg(family, objective, seq_len=256, packing=packing), docs, tokenizer)

    greedy, best = build("greedy"), build("best_fit")
    assert best.num_tokens == greedy.num_tokens and sorted(best._doc_ids) == sorted(greedy._doc_ids)
    assert best.packing_efficiency > max(0.95, greedy.packing_efficiency + 0.15), (best, greedy)
    assert best.rows_per_epoch < greedy.rows_per_epoch


def test_best_fit_keeps_storage_order_where_that_packs_tighter(docs, tokenizer, monkeypatch):
    from t5x_lite.data import pipeline

    # an order that packs badly under a cap of 2 documents a row: the shortest documents together
    monkeypatch.setattr(pipeline, "best_fit_order", lambda lengths, *a, **k: np.argsort(lengths, kind="stable"))
    cfg = make_cfg(seq_len=256, packing="best_fit")
    cfg.model.max_segments = 2
    kept = Batches(cfg, docs, tokenizer)
    cfg.data.packing = "greedy"
    greedy = Batches(cfg, docs, tokenizer)
    assert kept.packing_efficiency == greedy.packing_efficiency
    np.testing.assert_array_equal(kept._doc_ids, greedy._doc_ids)
    sorted_fill = pipeline.pack_rows(np.sort([len(d) + 1 for d in docs]), 256, (256,), max_pieces=2)[1]
    assert sorted_fill < greedy.packing_efficiency  # (the patched order was worse)


def test_best_fit_order_properties():
    """Next fit over the order needs fewer rows than greedy, as many as textbook best-fit
    decreasing on short sequences, honours max_pieces and a second capacity, loses nothing."""
    from t5x_lite.data.pipeline import best_fit_order

    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, 60, 300), rng.integers(100, 300, 20), [0, 0]])  # some long, some empty
    order = best_fit_order(lengths, 64, (64,))
    assert sorted(order.tolist()) == list(range(len(lengths)))
    greedy, _ = pack_rows(lengths, 64, (64,))
    best, fill = pack_rows(lengths[order], 64, (64,))
    assert len(best) < len(greedy) and fill > 0.95  # (a long sequence's last chunk must open its row)
    short = lengths[(lengths > 0) & (lengths <= 64)]
    bins = []  # textbook best-fit decreasing: the fullest bin that takes it
    for size in sorted(short.tolist(), reverse=True):
        fits = [i for i, used in enumerate(bins) if used + size <= 64]
        if fits:
            bins[max(fits, key=lambda i: bins[i])] += size
        else:
            bins.append(size)
    assert len(pack_rows(short[best_fit_order(short, 64, (64,))], 64, (64,))[0]) - 1 == len(bins)
    capped = best_fit_order(lengths, 64, (64,), max_pieces=2)
    rows, _ = pack_rows(lengths[capped], 64, (64,), max_pieces=2)  # (pack_rows checks chunks stay whole)
    assert len(rows) - 1 <= len(pack_rows(lengths, 64, (64,), max_pieces=2)[0]) - 1
    # many tiny sequences under a cap of 16 a row: spread over the rows, not left to rows of their own
    mixed = np.concatenate([rng.integers(1, 12, 600), rng.integers(40, 200, 150)])
    rng.shuffle(mixed)
    greedy_fill = pack_rows(mixed, 256, (256,), max_pieces=16)[1]
    best_fill = pack_rows(mixed[best_fit_order(mixed, 256, (256,), max_pieces=16)], 256, (256,), max_pieces=16)[1]
    assert best_fill > 0.93 and best_fill > greedy_fill + 0.1, (best_fill, greedy_fill)
    table = np.stack([np.arange(65), 1 + np.arange(65) // 8], axis=1)  # a second capacity: 1 + n // 8 of 10
    two = best_fit_order(lengths, 64, (64, 10), table)
    rows2, _ = pack_rows(lengths[two], 64, (64, 10), table)
    assert len(rows2) <= len(pack_rows(lengths, 64, (64, 10), table)[0])


def test_concat_packing_is_refused_for_span_corruption():
    with pytest.raises(ConfigError, match="data.packing=concat"):
        make_cfg("encoder_decoder", packing="concat")


def test_tiny_corpus_repeats_rows(docs, tokenizer):
    short = [d for d in docs if len(d) < 31][:1]
    ds = Batches(make_cfg(batch_size=8), short, tokenizer)
    assert ds.rows_per_epoch == 1
    batch = ds.batches(0)
    assert (batch["targets"] == batch["targets"][0]).all()
    with pytest.raises(DataError, match="empty"):
        Batches(make_cfg(), [], tokenizer)


def test_span_rows_fit_and_reconstruct(docs, tokenizer):
    cfg = make_cfg("encoder_decoder", seq_len=48, batch_size=1)
    raw_len, target_len = objectives.span_corruption_raw_length(48, 0.15, 3.0)
    ds = Batches(cfg, docs, tokenizer)
    assert ds.target_len == target_len
    whole = Batches(make_cfg("encoder_decoder", seq_len=48, batch_size=ds.rows_per_epoch), docs, tokenizer).batches(0)
    sentinels = set(tokenizer.sentinel_ids)
    restored = []
    for i in range(ds.rows_per_epoch):
        enc, enc_seg = whole["encoder_input_ids"][i], whole["encoder_segment_ids"][i]
        tgt, dec_seg = whole["targets"][i], whole["segment_ids"][i]
        assert enc_seg.max() == dec_seg.max()
        np.testing.assert_array_equal(whole["weights"][i], dec_seg > 0)
        for k in range(1, enc_seg.max() + 1):
            restored.append(tuple(undo_span_corruption(enc[enc_seg == k], tgt[dec_seg == k], sentinels)))
    np.testing.assert_array_equal(
        whole["input_ids"], objectives.shift_right(whole["targets"], whole["segment_ids"], tokenizer.bos_id)
    )
    expected = [tuple(np.append(d, 1)[j : j + raw_len]) for d in docs for j in range(0, len(d) + 1, raw_len)]
    assert sorted(restored) == sorted(expected)
    assert ds.packing_efficiency > 0.6
    with pytest.raises(DataError, match="data.target_len=3 is too small"):
        Batches(make_cfg("encoder_decoder", seq_len=48, target_len=3), docs, tokenizer)


# ---------------------------------------------------------------------- make_datasets


def write_corpus(path, docs):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def _fail(*_, **__):
    raise AssertionError("called despite the cache")


def test_make_datasets_trains_then_reuses_cache(tmp_path, corpus, monkeypatch):
    write_corpus(tmp_path / "c.jsonl", corpus)
    cfg = make_cfg(path=str(tmp_path / "c.jsonl"), eval_fraction=0.1)
    workdir = tmp_path / "run"
    lines = []
    tok, train, evaluation = make_datasets(cfg, str(workdir), log=lines.append)
    assert "300 docs" in lines[0] and "trained" in lines[1] and "tokenized" in lines[2]
    assert "packing efficiency" in lines[-1]
    assert (workdir / "tokenizer.model").exists() and tok.vocab_size == VOCAB
    (cache,) = (workdir / "data_cache").iterdir()
    assert (cache / "manifest.json").exists()
    assert train.num_documents + evaluation.num_documents == len(corpus) and evaluation.num_documents > 10
    assert evaluation.num_batches == 2
    eval_batches = list(evaluation)
    assert len(eval_batches) == 2 and not np.array_equal(eval_batches[0]["targets"], eval_batches[1]["targets"])
    for a, b in zip(eval_batches, list(evaluation)):
        assert_same(a, b)

    # A rerun reads no text: one stat per file finds the cache.
    mtime = (cache / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(corpus_module, "read_documents", _fail)
    monkeypatch.setattr(Tokenizer, "encode_batch", _fail)
    monkeypatch.setattr(Tokenizer, "train", _fail)
    lines.clear()
    tok2, train2, eval2 = make_datasets(cfg, str(workdir), log=lines.append)
    assert "loaded" in lines[0] and str(cache) in lines[1]
    assert tok2.sha256 == tok.sha256 and (cache / "manifest.json").stat().st_mtime_ns == mtime
    assert_same(train2.batches(7), train.batches(7))
    assert_same(eval2.batches(1), eval_batches[1])

    # A changed file is read again.
    os.utime(tmp_path / "c.jsonl", ns=(1, 1))
    with pytest.raises(AssertionError, match="despite the cache"):
        make_datasets(cfg, str(workdir), log=lines.append)


def test_default_corpus_is_cached_in_the_workdir(tmp_path, stdlib_docs, monkeypatch):
    monkeypatch.setattr(corpus_module, "stdlib_docstrings", lambda: stdlib_docs[:300])
    cfg = make_cfg()
    tok, train, _ = make_datasets(cfg, str(tmp_path), log=lambda _: None)
    monkeypatch.setattr(corpus_module, "stdlib_docstrings", _fail)
    lines = []
    _, again, _ = make_datasets(cfg, str(tmp_path), log=lines.append)
    assert not any("read in" in line for line in lines)
    assert_same(again.batches(3), train.batches(3))


def test_make_datasets_eval_docs_are_held_out(tmp_path, corpus):
    # Tag every document so that what each split serves can be traced back to document indices.
    tagged = [f"doc{i:03d} " + d for i, d in enumerate(corpus[:60])]
    write_corpus(tmp_path / "c.jsonl", tagged)
    cfg = make_cfg(path=str(tmp_path / "c.jsonl"), eval_fraction=0.2, seq_len=256, batch_size=1)
    tok, train, evaluation = make_datasets(cfg, str(tmp_path / "run"), log=lambda _: None)

    def served(ds):
        tags = set()
        for i in range(ds.rows_per_epoch):
            b = ds.batches(i)
            seg = b["segment_ids"][0]
            for k in range(1, seg.max() + 1):
                text = tok.decode(b["targets"][0][seg == k])
                if text.startswith("doc"):
                    tags.add(text[:6])
        return tags

    train_ids, eval_ids = split_documents(60, 0.2, cfg.train.seed)
    assert served(evaluation) == {f"doc{i:03d}" for i in eval_ids}
    assert served(train) == {f"doc{i:03d}" for i in train_ids}


def test_make_datasets_errors(tmp_path, tokenizer, t5_style_tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    workdir = tmp_path / "run"
    with pytest.raises(DataError, match="corpus is empty"):
        make_datasets(make_cfg(path=str(tmp_path / "empty.jsonl")), str(workdir), log=lambda _: None)
    assert not workdir.exists(), "an empty corpus must fail before writing anything"

    write_corpus(tmp_path / "c.jsonl", ["some text here", "more text there"])
    tok_path = tmp_path / "tok.model"
    tokenizer.save(str(tok_path))
    cfg = make_cfg(path=str(tmp_path / "c.jsonl"), tokenizer=str(tok_path))
    cfg.model.vocab_size = 350
    with pytest.raises(DataError, match=r"400 pieces.*model\.vocab_size=350"):
        make_datasets(cfg, str(workdir), log=lambda _: None)

    # A tokenizer without what the objective needs fails before anything is tokenized or cached.
    t5_path = tmp_path / "t5.model"
    t5_style_tokenizer.save(str(t5_path))
    cfg = make_cfg("encoder", path=str(tmp_path / "c.jsonl"), tokenizer=str(t5_path))
    with pytest.raises(DataError, match="<mask>"):
        make_datasets(cfg, str(workdir), log=lambda _: None)
    assert not workdir.exists()


# ---------------------------------------------------------------------- supervised (input, target) pairs


@pytest.mark.parametrize("family,packing", [("decoder", "greedy"), ("encoder_decoder", "best_fit")])
def test_supervised_rows_hold_every_pair_once_loss_on_targets(family, packing, docs, tokenizer):
    """Every pair once per epoch, whole (a row's k-th segment is one pair; encoder_decoder: the
    k-th segment of both sides); the loss weights exactly the target (and its eos); a pair too
    long for a row is cut as documented: decoder, the target's end and the input's start;
    encoder_decoder, each side's end, the input keeping its eos."""
    eos = tokenizer.eos_id
    pairs = [(docs[i], docs[i + 1][: 3 + i % 20]) for i in range(0, 160, 2)]  # inputs of all lengths
    store = TokenStore.from_documents([x for pair in pairs for x in pair], eos)
    cfg = make_cfg(family, "supervised", seq_len=40, batch_size=4, path="pairs.jsonl", packing=packing,
                   target_len=16 if family == "encoder_decoder" else None)
    ds = Batches(cfg, store, tokenizer)
    expected = []
    for x, y in pairs:
        x, y = list(x), list(y) + [eos]
        if family == "decoder":
            y = y[:40]
            expected.append((tuple(x[len(x) - min(len(x), 40 - len(y)):]), tuple(y)))
        else:
            expected.append((tuple(x[:39] + [eos]), tuple(y[:16])))
    assert ds.truncated == sum(e != (tuple(x) + ((eos,) if family != "decoder" else ()), tuple(y) + (eos,))
                               for e, (x, y) in zip(expected, pairs))
    assert 0 < ds.truncated < len(pairs)
    seen = []
    steps = -(-ds.rows_per_epoch // 4)
    for step in range(steps):
        b = ds.batches(step)
        for r in range(4):
            if step * 4 + r >= ds.rows_per_epoch:
                break
            seg, w = b["segment_ids"][r], b["weights"][r]
            for k in range(1, seg.max() + 1):
                tokens = b["targets"][r][seg == k]
                np.testing.assert_array_equal(b["positions"][r][seg == k], np.arange(len(tokens)))
                if family == "decoder":  # one causal sequence, weighted on its target part
                    scored = w[seg == k] > 0
                    assert scored[-1] and np.all(np.diff(scored.astype(int)) >= 0)  # input, then target
                    seen.append((tuple(tokens[~scored]), tuple(tokens[scored])))
                else:
                    assert np.all(w[seg == k] == 1)
                    enc = b["encoder_segment_ids"][r]
                    seen.append((tuple(b["encoder_input_ids"][r][enc == k]), tuple(tokens)))
    assert sorted(seen) == sorted(expected)
    again = Batches(cfg, store, tokenizer)  # batches are a pure function of the step
    assert_same(again.batches(3), ds.batches(3))


def test_default_pairs_are_signatures_and_docstring_summaries(monkeypatch):
    import json as json_module
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    monkeypatch.setattr(corpus_module, "_stdlib_files", lambda: [json_module.__file__, os.path.join(root, "bisect.py")])
    pairs = corpus_module.stdlib_pairs()
    table = dict(zip(pairs[::2], pairs[1::2]))
    assert len(pairs) % 2 == 0 and len(table) == len(pairs) // 2
    dumps = next(k for k in table if k.startswith("json: def dumps(obj, *, skipkeys=False"))
    assert table[dumps] == "Serialize ``obj`` to a JSON formatted ``str``."
    assert any(k.startswith("bisect: def insort_right(a, x, lo=0, hi=None, *, key=None)") for k in table)
    assert all(len(v) >= 40 and "\n\n" not in v for v in table.values())


def test_supervised_pairs_from_json_lines(tmp_path, corpus):
    """make_datasets on JSON lines of pairs: bad lines counted once each, the split by pair (a
    pair's input and target on one side), the log in pairs; a prepared corpus is refused."""
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"question": f"q{i:02d} " + corpus[i], "answer": f"a{i:02d} " + corpus[i + 50]}) + "\n")
        f.write("not json\n" + json.dumps({"question": "no answer"}) + "\n")
        f.write(json.dumps({"question": "blank", "answer": "  "}) + "\n")
    cfg = make_cfg("encoder_decoder", "supervised", seq_len=128, batch_size=1, path=str(path), eval_fraction=0.2,
                   input_field="question", target_field="answer", target_len=128)
    lines = []
    tok, train, evaluation = make_datasets(cfg, str(tmp_path / "run"), log=lines.append)
    assert "40 (input, target) pairs" in lines[0]
    assert "1 lines not JSON" in lines[0] and "without a text field 'answer'" in lines[0] and "blank target" in lines[0]
    assert any("train /" in line and "eval pairs" in line for line in lines)
    train_ids, eval_ids = split_documents(40, 0.2, cfg.train.seed)
    assert (train.num_documents, evaluation.num_documents) == (len(train_ids), len(eval_ids))

    def served(ds):
        out = {}
        for i in range(ds.rows_per_epoch):
            b = ds.batches(i)
            for k in range(1, b["segment_ids"][0].max() + 1):
                q = tok.decode(b["encoder_input_ids"][0][b["encoder_segment_ids"][0] == k])
                a = tok.decode(b["targets"][0][b["segment_ids"][0] == k])
                out[q[:3]] = a[:3]
        return out

    assert served(evaluation) == {f"q{i:02d}": f"a{i:02d}" for i in eval_ids}
    assert served(train) == {f"q{i:02d}": f"a{i:02d}" for i in train_ids}

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="is a prepared corpus of plain documents"):
        make_datasets(make_cfg("decoder", "supervised", path=str(prepared)), str(tmp_path / "run2"), log=print)


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def test_chat_templates_render_as_transformers_and_split_into_pairs(tmp_path):
    """Conversations rendered by a model's chat template as transformers renders them; the last
    assistant turn is the target (the template's EOS left to the pipeline, as a leading BOS)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from t5x_lite.data import chat

    talk = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}]
    prompts = {CHATML: "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                       "<|im_start|>assistant\n",
               LLAMA3: "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
                       "<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"}
    for template, bos, eos in [(CHATML, "", "<|im_end|>"), (LLAMA3, "<|begin_of_text|>", "<|eot_id|>")]:
        spec = {"template": template, "bos_token": bos, "eos_token": eos}
        for generation, messages in [(True, talk[:-1]), (False, talk)]:
            (want,), _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=generation,
                                               bos_token=bos, eos_token=eos)
            assert chat.render(spec, messages, generation) == want
        assert chat.as_pair(spec, talk) == (prompts[template], "Hello!")  # Llama 3's BOS left to the pipeline
    assert chat.as_pair({"template": CHATML}, talk)[1] == "Hello!<|im_end|>"  # no EOS named: the marker stays

    (tmp_path / "chat.json").write_text(json.dumps({"template": CHATML, "bos_token": "", "eos_token": "<|im_end|>"}))
    path = tmp_path / "talk.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": talk}, {"input": "plain", "target": "pair"}, {"messages": talk[:-1]},
        {"messages": "not a list"}]) + "\n")
    skipped = corpus_module.Skipped()
    pairs = corpus_module.read_pairs(str(path), corpus_module.PairFields(
        chat=chat.load(str(tmp_path / "chat.json")), turns="last"), skipped=skipped)
    assert pairs[1::2] == ["Hello!", "pair"] and pairs[2] == "plain"
    assert "ending with an assistant turn" in str(skipped) and "messages not a list" in str(skipped)
    skipped = corpus_module.Skipped()
    assert corpus_module.read_pairs(str(path), corpus_module.PairFields(), skipped=skipped) == ["plain", "pair"]
    assert "without data.chat_template" in str(skipped)


def test_conversations_give_a_pair_per_assistant_turn_and_split_together(tmp_path, corpus):
    """data.chat_turns=all: every assistant turn is a target, its input the conversation before
    it; a conversation's pairs all train or all evaluate (its later inputs hold its earlier
    targets); with last, the final turn alone, as before."""
    from t5x_lite.data import chat

    spec = {"template": CHATML, "bos_token": "", "eos_token": "<|im_end|>"}
    talk = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}, {"role": "user", "content": "?"}]
    assert chat.as_pairs(spec, talk) == [chat.as_pair(spec, talk[:3]), chat.as_pair(spec, talk[:5])]
    assert chat.as_pairs(spec, talk)[1][0].endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="ending with an assistant turn"):
        chat.as_pairs(spec, talk, "last")

    (tmp_path / "chat.json").write_text(json.dumps({k: spec[k] for k in ("template", "bos_token", "eos_token")}))
    path = tmp_path / "talks.jsonl"
    with open(path, "w") as f:  # conversation i: 1 + i % 3 assistant turns, each answer tagged with i
        for i in range(30):
            turns = [{"role": "user", "content": "hello"}]
            for t in range(1 + i % 3):
                turns += [{"role": "assistant", "content": f"a{i:02d} " + corpus[i + t][:60]},
                          {"role": "user", "content": "more"}]
            f.write(json.dumps({"messages": turns[:-1]}) + "\n")
    cfg = make_cfg("decoder", "supervised", seq_len=512, batch_size=1, path=str(path), eval_fraction=0.3,
                   chat_template=str(tmp_path / "chat.json"))
    lines = []
    tok, train, evaluation = make_datasets(cfg, str(tmp_path / "run"), log=lines.append)
    assert "60 (input, target) pairs of 30 records" in lines[0]

    def served(ds):  # conversation -> [(assistant turns in the input, the target's tag)]
        out = {}
        for i in range(ds.rows_per_epoch):
            b = ds.batches(i)
            for k in range(1, b["segment_ids"][0].max() + 1):
                at = b["segment_ids"][0] == k
                scored = b["weights"][0][at] > 0
                context, target = tok.decode(b["targets"][0][at][~scored]), tok.decode(b["targets"][0][at][scored])
                out.setdefault(target[:3], []).append(context.count("<|im_start|>assistant"))
        return out

    train_talks, eval_talks = served(train), served(evaluation)
    assert not set(train_talks) & set(eval_talks) and eval_talks
    assert len(train_talks) + len(eval_talks) == 30
    for name, contexts in {**train_talks, **eval_talks}.items():
        assert sorted(contexts) == list(range(1, 2 + int(name[1:]) % 3)), name  # each turn once, whole history

    last = make_cfg("decoder", "supervised", seq_len=512, batch_size=1, path=str(path), eval_fraction=0.3,
                    chat_template=str(tmp_path / "chat.json"), chat_turns="last")
    lines = []
    _, train, evaluation = make_datasets(last, str(tmp_path / "run-last"), log=lines.append)
    assert "30 (input, target) pairs" in lines[0] and train.num_documents + evaluation.num_documents == 30


# ---------------------------------------------------------------------- worker processes (data.workers)


def test_token_store_pickles_as_its_directory_or_by_value(tmp_path, corpus, docs, tokenizer):
    import pickle

    write_corpus(tmp_path / "c.jsonl", corpus)
    _, train, _ = make_datasets(make_cfg(path=str(tmp_path / "c.jsonl")), str(tmp_path / "run"), log=lambda s: None)
    store = train._corpus
    blob = pickle.dumps(store)
    assert store.directory and len(blob) < 1000  # the path, not the tokens
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.document(5), store.document(5))
    in_memory = TokenStore.from_documents(docs[:10], tokenizer.eos_id)
    assert pickle.loads(pickle.dumps(in_memory)).document(3).tolist() == list(docs[3])


@pytest.mark.parametrize("family,objective", [("encoder", "mlm"), ("encoder_decoder", "span")])
def test_worker_processes_make_the_loops_batches(family, objective, tmp_path, corpus):
    """Batches made ahead by worker processes equal the ones the loop makes, bit for bit: in
    order, after a jump back and forth (a resume), and for one process of two."""
    from t5x_lite.data.prefetch import Prefetcher

    write_corpus(tmp_path / "c.jsonl", corpus)
    cfg = make_cfg(family, objective, path=str(tmp_path / "c.jsonl"), batch_size=4)
    _, train, _ = make_datasets(cfg, str(tmp_path / "run"), log=lambda s: None)
    with Prefetcher(train, workers=2, log=pytest.fail) as ahead:
        assert ahead.rows_per_epoch == train.rows_per_epoch  # the wrapped source's attributes
        for step in [0, 1, 2, 9, 10, 3]:
            assert_same(ahead(step), train(step))
        assert_same(ahead(4, 1, 2), train(4, 1, 2))
        with pytest.raises(ValueError, match="step must be >= 0"):  # a worker's error reaches the caller
            ahead(-1)


def test_a_dead_worker_leaves_the_loop_making_batches(tmp_path, docs, tokenizer):
    import signal

    from t5x_lite.data.prefetch import Prefetcher

    train = Batches(make_cfg("decoder", "causal"), docs, tokenizer)
    lines = []
    ahead = Prefetcher(train, workers=1, log=lines.append)
    assert_same(ahead(0), train(0))
    for pid in list(ahead._pool._processes):
        os.kill(pid, signal.SIGKILL)
    for step in range(1, 6):  # steps made before the kill come back; then the loop makes them
        assert_same(ahead(step), train(step))
    assert len(lines) == 1 and "batch worker processes failed" in lines[0]
    ahead.close()


@pytest.mark.parametrize("packing", ["greedy", "best_fit"])
def test_fit_max_segments_packs_for_the_cap_the_rows_need(packing, tmp_path, corpus):
    """model.fit_max_segments: make_datasets packs for the smallest cap that packs as tight, says so,
    and finds the same one again (a resume); next fit serves exactly the rows of the larger cap."""
    from t5x_lite.data.pipeline import FIT_TOLERANCE

    write_corpus(tmp_path / "c.jsonl", corpus)

    def datasets(fit, cap=64):
        cfg = make_cfg(path=str(tmp_path / "c.jsonl"), eval_fraction=0.1, seq_len=128, packing=packing)
        cfg.model.max_segments, cfg.model.attention, cfg.model.fit_max_segments = cap, "auto", fit
        lines = []
        return cfg, lines, make_datasets(cfg, str(tmp_path / "run"), log=lines.append)

    _, _, (_, loose, loose_eval) = datasets(False)
    most = max(int(loose.documents_per_row.max()), int(loose_eval.documents_per_row.max()))
    assert 1 < most < 32 and loose.max_segments == 64
    cfg, lines, (_, train, evaluation) = datasets(True)
    fitted = train.max_segments
    assert evaluation.max_segments == fitted and cfg.model.max_segments == 64  # the config as given
    assert f"model.max_segments 64 -> {fitted} (model.fit_max_segments): no row held more than {most}" in lines[-1]
    assert max(train.documents_per_row.max(), evaluation.documents_per_row.max()) <= fitted
    if packing == "greedy":  # the cap never bound: the same rows, token for token
        assert fitted == most and "the same rows" in lines[-1]
        for step in range(3):
            assert_same(train(step), loose(step))
        assert_same(evaluation(1), loose_eval(1))
    else:  # ordered for the smaller cap: as tight within FIT_TOLERANCE, and half of it is not
        assert most <= fitted < 64 and train.packing_efficiency >= loose.packing_efficiency - FIT_TOLERANCE
        assert fitted == most or loose.fill_at(fitted // 2) < loose.packing_efficiency - FIT_TOLERANCE
    _, _, (_, again, _) = datasets(True)
    assert again.max_segments == fitted
    assert_same(again(5), train(5))
    _, lines, (_, tight, _) = datasets(True, cap=most)  # a cap the rows reach: nothing to fit
    assert tight.max_segments == most and not any("-> " in line for line in lines)


def test_fit_from_no_cap_goes_to_one_document_a_row_or_nowhere(tmp_path, corpus, docs, tokenizer):
    """model.max_segments 0 (no cap: cuDNN gets the mask): fit_max_segments lowers it to 1 where every
    row holds one document (cuDNN then gets a length a row), and otherwise leaves it at 0: never a
    packed layout of several documents the config did not ask for."""
    from t5x_lite.data.pipeline import FIT_TOLERANCE, fit_segments

    def cfg_for(seq_len, packing="greedy", attention="auto"):
        cfg = make_cfg(path=str(tmp_path / "c.jsonl"), eval_fraction=0.1, seq_len=seq_len, packing=packing)
        cfg.model.max_segments, cfg.model.attention, cfg.model.fit_max_segments = 0, attention, True
        return cfg

    write_corpus(tmp_path / "c.jsonl", corpus)
    lines = []
    cfg = cfg_for(16)  # rows of 16 tokens: every one holds a piece of one document
    assert cfg.model.fits_segments and not cfg_for(16, attention="cudnn").model.fits_segments
    _, train, evaluation = make_datasets(cfg, str(tmp_path / "run"), log=lines.append)
    assert (train.max_segments, evaluation.max_segments) == (1, 1) and train.documents_per_row.max() == 1
    assert "model.max_segments 0 -> 1 (model.fit_max_segments)" in lines[-1] and "a length a row" in lines[-1]
    for packing in ("greedy", "best_fit"):  # rows of 32 tokens hold up to 2 documents
        cfg = cfg_for(32, packing)
        loose = Batches(cfg, docs, tokenizer)
        assert loose.documents_per_row.max() == 2
        fit = fit_segments(cfg, [loose])
        assert fit.most == 2
        if packing == "greedy":
            assert fit.cap is None
        else:  # 1 only if one document a row packs as tight
            one = loose.fill_at(1)
            assert fit.cap == (1 if one >= loose.packing_efficiency - FIT_TOLERANCE else None)


def test_data_workers_must_not_be_negative():
    with pytest.raises(ConfigError, match="data.workers"):
        make_cfg(workers=-1)


@pytest.mark.parametrize("family,objective,packing", [("decoder", "causal", "greedy"), ("decoder", "causal", "best_fit"),
                                                      ("decoder", "causal", "concat"),
                                                      ("encoder_decoder", "span", "greedy")])
def test_segments_hint_names_a_cap_that_packs_the_same_rows(family, objective, packing, docs, tokenizer):
    """Documents per row as the packer made them; a max_segments far above the most a row holds is
    named in the log with a smaller cap (cuDNN's cost grows with it): next fit and concat, the rows' most, which
    serves exactly the same rows; best_fit, the smallest from there, doubling, that packs as tight."""
    from t5x_lite.data.pipeline import segments_hint

    def build(cap):
        cfg = make_cfg(family, objective, seq_len=128, batch_size=1, packing=packing)
        cfg.model.max_segments, cfg.model.attention = cap, "auto"
        return cfg, Batches(cfg, docs, tokenizer)

    cfg, loose = build(64)
    key = "encoder_segment_ids" if objective == "span" else "segment_ids"
    per_row = loose.documents_per_row
    assert len(per_row) == loose.rows_per_epoch and per_row.min() >= 1
    cfg.train.batch_size = loose.rows_per_epoch
    served = Batches(cfg, docs, tokenizer).batches(0)
    np.testing.assert_array_equal(np.sort(served[key].max(axis=1)), np.sort(per_row))  # what the rows hold (served shuffled)
    most = int(per_row.max())
    assert 1 < most <= 32
    hint = segments_hint(cfg, loose, None)
    assert hint and f"no row holds more than {most} documents (model.max_segments=64)" in hint
    if packing == "best_fit":  # ordered for its cap: the smallest cap, doubling, that packs within 0.5 points
        from t5x_lite.data import pipeline

        with pytest.MonkeyPatch.context() as mp:  # a corpus too large for trial packings: said, not tried
            mp.setattr(pipeline, "HINT_REPACK_DOCUMENTS", 10)
            assert "compare the packing efficiency" in segments_hint(cfg, loose, None)
        suggested = int(hint.split("max_segments=")[2].split()[0])
        assert most <= suggested <= 32 and f"{loose.fill_at(suggested):.1%} full (now {loose.packing_efficiency:.1%})" in hint
        _, tight = build(suggested)
        assert tight.packing_efficiency >= loose.packing_efficiency - 0.005
        assert suggested == most or build(suggested // 2)[1].packing_efficiency < loose.packing_efficiency - 0.005
        return
    cfg2, tight = build(most)
    cfg2.train.batch_size = tight.rows_per_epoch
    again = Batches(cfg2, docs, tokenizer).batches(0)
    for k in served:  # the same rows, token for token
        np.testing.assert_array_equal(again[k], served[k], err_msg=k)
    assert "packs the same rows" in hint
    assert segments_hint(cfg2, tight, None) is None  # a cap the rows reach: nothing to say
    cfg.model.attention = "xla"
    assert segments_hint(cfg, loose, None) is None  # no cuDNN: the cap costs nothing


# ---------------------------------------------------------------------- mixtures


def test_mixture_batches_take_each_corpus_share_of_its_own_rows(tokenizer):
    """data.mixture: every batch takes exactly B rows, each corpus's running count within one row
    of its weight; a corpus's rows of step s are the next ones of its own stream (corpora of
    disjoint tokens tell them apart); rows interleaved; the same batches again, and processes'
    slices join to the global batch."""
    from t5x_lite.data.pipeline import MixtureBatches

    rng = np.random.default_rng(0)
    cfg = make_cfg(batch_size=10)
    corpora = [[rng.integers(lo, lo + 90, rng.integers(5, 40)).astype(np.int32) for _ in range(n)]
               for lo, n in ((10, 80), (200, 30))]
    sources = [Batches(cfg, docs, tokenizer, stream=2 * i) for i, docs in enumerate(corpora)]
    mix = MixtureBatches(sources, [7, 3], ["a", "b"], seed=0)
    interleaved = False
    for step in range(40):
        counts = mix.counts(step)
        assert counts.sum() == 10 and (counts >= 0).all()
        assert np.all(np.abs(mix.served(step + 1) - np.array([0.7, 0.3]) * 10 * (step + 1)) < 1)
        batch = mix.batches(step)
        corpus_of = np.where(batch["targets"].max(1) >= 200, 1, 0)
        assert np.bincount(corpus_of, minlength=2).tolist() == counts.tolist()
        interleaved |= not np.all(np.diff(corpus_of) >= 0)
        for i, source in enumerate(sources):  # the rows of its stream at the positions it has reached
            positions = mix.served(step)[i] + np.arange(counts[i])
            want = source.rows_batch(source.rows_at(positions), step, positions)["targets"]
            assert sorted(map(tuple, batch["targets"][corpus_of == i])) == sorted(map(tuple, want))
        assert_same(mix.batches(step), batch)
        assert_same({k: np.concatenate([mix.batches(step, p, 5)[k] for p in range(5)]) for k in batch}, batch)
    assert interleaved
    assert [round(t, 3) for _, _, t in mix.epochs_read(40)] == [
        round(280 / sources[0].rows_per_epoch, 3), round(120 / sources[1].rows_per_epoch, 3)]


def test_mixture_of_raw_corpora_trains_one_tokenizer_and_mixes_both(tmp_path, corpus):
    """make_datasets of a mixture of two JSON-lines corpora: one tokenizer learned from both, each
    corpus tokenized and split alone, train and eval batches mixing them by weight; a rerun reads
    no text. Bad mixtures are one clear error."""
    left = [f"alpha {d[:50]}" for d in corpus[:150]]  # every document whole in a row: each row is one corpus's
    right = [f"omega {d[:50]}" for d in corpus[150:]]
    write_corpus(tmp_path / "left.jsonl", left)
    write_corpus(tmp_path / "right.jsonl", right)
    mixture = f"{tmp_path / 'left.jsonl'}=1, {tmp_path / 'right.jsonl'}=3"
    cfg = make_cfg(mixture=mixture, eval_fraction=0.1, batch_size=8, seq_len=128)
    lines = []
    tok, train, evaluation = make_datasets(cfg, str(tmp_path / "run"), log=lines.append)
    assert any("tokenizer trained on" in line and "of 2 corpora" in line for line in lines)
    assert any("left.jsonl (25.0% of each batch)" in line for line in lines)
    assert train.names == [str(tmp_path / "left.jsonl"), str(tmp_path / "right.jsonl")]
    assert train.num_documents + evaluation.num_documents == len(corpus)
    texts = [tok.decode(row) for step in range(6) for row in train.batches(step)["targets"]]
    firsts = [t.split()[0] for t in texts]
    assert firsts.count("alpha") == 12 and firsts.count("omega") == 36  # 1 : 3 of 48 rows
    assert len(list(evaluation)) == 2 and evaluation.weights.tolist() == [0.25, 0.75]
    lines.clear()
    _, again, _ = make_datasets(cfg, str(tmp_path / "run"), log=lines.append)
    assert not any("read in" in line or "trained" in line for line in lines)
    assert_same(again.batches(5), train.batches(5))
    for bad, says in [(f"{tmp_path / 'left.jsonl'}=1", "names 1 distinct corpus"),
                      (f"{tmp_path / 'left.jsonl'}=1, x=-1", "'x=-1' is not PATH=WEIGHT"),
                      (f"{tmp_path / 'left.jsonl'}=1, {tmp_path / 'right.jsonl'}=99", "less than one row")]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            make_cfg(mixture=bad, batch_size=8)
    with pytest.raises(ConfigError, match="data.path and data.mixture are both set"):
        make_cfg(mixture=mixture, path=str(tmp_path / "left.jsonl"))
    missing = make_cfg(mixture=f"{tmp_path / 'left.jsonl'}=1, {tmp_path / 'none.jsonl'}=1", batch_size=8)
    with pytest.raises(DataError, match=re.escape(f"data.mixture, corpus '{tmp_path / 'none.jsonl'}': ")):
        make_datasets(missing, str(tmp_path / "other"), log=lambda _: None)
