"""`t5x-lite prepare` and training from a prepared directory: exact round trip, idempotence,
interrupted runs, bad input, per-process slices and resume."""

import gzip
import json
import os
import shutil

import numpy as np
import pytest

from t5x_lite import cli
from t5x_lite.data import DataError, TokenStore, Tokenizer, make_datasets
from t5x_lite.data import prepare as prepare_module
from t5x_lite.data import shards
from t5x_lite.data.pipeline import split_documents
from t5x_lite.data.prepare import prepare

from test_data import FAMILIES, KEYS, NUM_SENTINELS, VOCAB, assert_same, make_cfg, synthetic_corpus

UNIT = 8192  # bytes per unit: the corpus below makes several shards, a.jsonl is cut in byte ranges


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small corpus of every input kind, with one of each problem; and the documents it holds."""
    root = tmp_path_factory.mktemp("inputs")
    docs = synthetic_corpus(180, seed=5)
    with open(root / "a.jsonl", "w") as f:
        for i, d in enumerate(docs[:120]):
            f.write(json.dumps({"text": d, "id": i}) + "\n")
            if i == 40:
                f.write('{"body": "no text field"}\n\n{"text": "  "}\n')
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[120:179])
    (root / "c.txt").write_text(docs[179])
    (root / "d.bin").write_bytes(b"\xff\xfe\x00\x80" * 8)
    return root, docs


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory):
    root, _ = inputs
    out = tmp_path_factory.mktemp("prepared") / "corpus"
    lines = []
    manifest = prepare([str(root)], str(out), vocab_size=VOCAB, num_sentinels=NUM_SENTINELS, workers=2,
                       unit_bytes=UNIT, progress=False, log=lines.append)
    return out, manifest, lines


def snapshot(directory):
    return {n: (os.stat(os.path.join(directory, n)).st_mtime_ns, os.path.getsize(os.path.join(directory, n)))
            for n in sorted(os.listdir(directory))}


def _fail(*_, **__):
    raise AssertionError("work was done on a rerun")


# ---------------------------------------------------------------------- prepare


def test_prepare_round_trips_every_document(inputs, prepared):
    _, docs = inputs
    out, manifest, lines = prepared
    tok = Tokenizer.load(str(out / "tokenizer.model"))
    assert tok.vocab_size == VOCAB and tok.mask_id == 4 and len(tok.sentinel_ids) == NUM_SENTINELS
    store = TokenStore.open(str(out))
    assert store.num_documents == len(docs) == manifest["documents"]
    for i, text in enumerate(docs):
        np.testing.assert_array_equal(store.document(i), tok.encode(text), err_msg=f"document {i}")
    assert store.num_tokens == manifest["tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)
    assert manifest["tokenizer"]["sha256"] == tok.sha256 and manifest["dtype"] == "uint16"
    assert len(manifest["shards"]) >= 4 and "trained a 400-piece tokenizer" in lines[1]
    assert manifest["skipped"]["counts"] == {"JSON lines without a text field 'text'": 1, "blank documents": 1,
                                             "files not UTF-8": 1}
    assert "skipped 1 JSON lines without a text field 'text' (first: " in lines[-1]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_rerun_is_a_noop(inputs, prepared, monkeypatch):
    root, _ = inputs
    out, manifest, _ = prepared
    before = snapshot(out)
    monkeypatch.setattr(prepare_module, "_tokenize_unit", _fail)
    monkeypatch.setattr(Tokenizer, "train", _fail)
    lines = []
    again = prepare([str(root)], str(out), num_sentinels=NUM_SENTINELS, workers=1, unit_bytes=UNIT,
                    progress=False, log=lines.append)
    assert again == manifest and "up to date" in lines[0] and len(lines) == 1
    assert snapshot(out) == before


def test_cli_prepare_then_noop(inputs, prepared, tmp_path, capsys):
    root, _ = inputs
    out, _, _ = prepared
    args = ["prepare", "--input", str(root / "*.txt"), "--input", str(root / "b.jsonl.gz"), "--output",
            str(tmp_path / "p"), "--tokenizer", str(out / "tokenizer.model"), "--workers", "1"]
    assert cli.main(args) == 0
    assert "60 documents" in capsys.readouterr().out
    assert cli.main(args) == 0
    assert "up to date" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(args[:-2] + ["--vocab-size", "500"])  # argparse: --tokenizer or --vocab-size
    assert "not allowed with argument --tokenizer" in capsys.readouterr().err
    assert cli.main(args[:2] + [str(root / "none*")] + args[3:]) == 2
    assert capsys.readouterr().err.startswith("error: --input")


def test_interrupted_prepare_leaves_nothing_that_looks_whole_and_resumes(inputs, prepared, tmp_path, monkeypatch):
    root, _ = inputs
    out, manifest, _ = prepared
    run = tmp_path / "run"
    kwargs = dict(tokenizer=str(out / "tokenizer.model"), workers=1, unit_bytes=UNIT, progress=False)
    real_write_json = shards.write_json
    records = []

    def killed_before_second_record(path, obj):
        if path.endswith(".json") and os.path.basename(path).startswith("shard-"):
            if records:
                raise KeyboardInterrupt  # the arrays of shard 2 are written, its record is not
            records.append(path)
        real_write_json(path, obj)

    monkeypatch.setattr(shards, "write_json", killed_before_second_record)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(root)], str(run), log=lambda _: None, **kwargs)
    monkeypatch.undo()

    assert not (run / "manifest.json").exists()
    names = [s["name"] for s in manifest["shards"]]
    assert shards.read_record(str(run), names[0]) is not None
    assert os.path.exists(run / f"{names[1]}.tokens.npy") and shards.read_record(str(run), names[1]) is None
    with pytest.raises(DataError, match="unfinished `t5x-lite prepare`.*rerun"):
        TokenStore.open(str(run))
    with pytest.raises(DataError, match="unfinished"):
        make_datasets(make_cfg(path=str(run)), str(tmp_path / "wd"), log=lambda _: None)
    assert not (tmp_path / "wd").exists()

    (run / ".tmp-stale").write_bytes(b"half a shard")
    kept = snapshot(run)[f"{names[0]}.tokens.npy"]
    lines = []
    resumed = prepare([str(root)], str(run), log=lines.append, **kwargs)
    assert f"1 of {len(names)} shards are already whole and kept" in lines[1]
    assert snapshot(run)[f"{names[0]}.tokens.npy"] == kept
    assert resumed["shards"] == manifest["shards"]  # names and content hashes: as if never interrupted
    assert not (run / ".tmp-stale").exists()


def test_strict_stops_at_the_first_bad_input_and_keeps_what_is_done(inputs, prepared, tmp_path):
    root, _ = inputs
    out, manifest, _ = prepared
    kwargs = dict(tokenizer=str(out / "tokenizer.model"), workers=1, unit_bytes=UNIT, progress=False,
                  log=lambda _: None)
    with pytest.raises(DataError, match=r"a\.jsonl@byte\d+ \(fields present: \['body'\].*drop --strict"):
        prepare([str(root)], str(tmp_path / "s"), strict=True, **kwargs)
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert shards.read_record(str(tmp_path / "s"), manifest["shards"][0]["name"]) is not None
    assert prepare([str(root)], str(tmp_path / "s"), **kwargs)["shards"] == manifest["shards"]


def test_bad_input_changes_nothing(inputs, prepared, tmp_path):
    root, _ = inputs
    out, manifest, _ = prepared
    quiet = dict(progress=False, log=lambda _: None, unit_bytes=UNIT, workers=1)
    with pytest.raises(DataError, match=r"--input '.*nothing\*\.txt' matches no file"):
        prepare([str(root), str(root / "nothing*.txt")], str(tmp_path / "new"), **quiet)
    with pytest.raises(DataError, match="--tokenizer or --vocab-size, not both"):
        prepare([str(root)], str(tmp_path / "new"), tokenizer=str(out / "tokenizer.model"), vocab_size=VOCAB, **quiet)
    with pytest.raises(DataError, match="--vocab-size=100 is too small for --num-sentinels=16: at least 309"):
        prepare([str(root)], str(tmp_path / "new"), vocab_size=100, num_sentinels=16, **quiet)
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        prepare([str(root)], str(tmp_path / "file"), **quiet)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds files that prepare did not write \(notes\.txt\)"):
        prepare([str(root)], str(tmp_path / "home"), **quiet)
    assert os.listdir(tmp_path / "home") == ["notes.txt"]

    # A finished directory is not replaced by other inputs unless asked; unchanged shards survive.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = snapshot(copy)
    more = tmp_path / "more"
    more.mkdir()
    (more / "z.txt").write_text("one more document")
    with pytest.raises(DataError, match=r"already prepared from other inputs: the inputs \(1 files added.*--overwrite"):
        prepare([str(root), str(more)], str(copy), **quiet)
    assert snapshot(copy) == before
    grown = prepare([str(root), str(more)], str(copy), overwrite=True, **quiet)
    assert grown["documents"] == manifest["documents"] + 1
    assert grown["shards"][:-1] == manifest["shards"][:-1]
    after = snapshot(copy)
    assert all(after[f"{s['name']}.tokens.npy"] == before[f"{s['name']}.tokens.npy"] for s in grown["shards"][:-1])
    assert f"{manifest['shards'][-1]['name']}.json" not in after  # the replaced shard is gone


# ---------------------------------------------------------------------- training from a prepared dir


def test_training_from_a_prepared_dir(prepared, tmp_path):
    out, manifest, _ = prepared
    store = TokenStore.open(str(out))
    n = store.num_documents
    for family, objective in FAMILIES:
        cfg = make_cfg(family, objective, path=str(out), eval_fraction=0.1, batch_size=4)
        wd = tmp_path / objective
        tok, train, evaluation = make_datasets(cfg, str(wd), log=lambda _: None)
        assert (wd / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
        assert train.num_documents + evaluation.num_documents == n
        batch = train.batches(5)
        assert set(batch) == KEYS[objective]
        halves = [train(5, i, 2) for i in range(2)]  # what two processes read
        for k in batch:
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), batch[k], err_msg=k)
        # A resumed run (new objects, straight to step 9) serves what the first served at step 9.
        _, resumed, resumed_eval = make_datasets(cfg, str(wd), log=lambda _: None)
        assert_same(resumed.batches(9), train.batches(9))
        assert_same(resumed_eval.batches(1), evaluation.batches(1))

    # Causal rows of one epoch hold every training document (with eos) exactly once, cut into
    # segments of at most seq_len whose positions restart at 0, and no held-out document.
    cfg = make_cfg(path=str(out), eval_fraction=0.1, batch_size=1)
    _, train, _ = make_datasets(cfg, str(tmp_path / "causal"), log=lambda _: None)
    epoch = make_cfg(path=str(out), eval_fraction=0.1, batch_size=train.rows_per_epoch)
    _, whole, _ = make_datasets(epoch, str(tmp_path / "causal"), log=lambda _: None)
    rows = whole.batches(0)
    seen = []
    for t, s, p in zip(rows["targets"], rows["segment_ids"], rows["positions"]):
        for k in range(1, s.max() + 1):
            at = np.flatnonzero(s == k)
            assert (np.diff(at) == 1).all()
            np.testing.assert_array_equal(p[at], np.arange(len(at)))
            seen.append(tuple(t[at]))
    train_ids, _ = split_documents(n, 0.1, cfg.train.seed)
    L = cfg.data.seq_len
    expected = [tuple(np.append(store.document(i), 1)[j : j + L])
                for i in train_ids for j in range(0, len(store.document(i)) + 1, L)]
    assert sorted(seen) == sorted(expected)
    assert whole.packing_efficiency == pytest.approx((rows["segment_ids"] > 0).mean())


def test_prepared_dir_mismatches_fail_before_touching_the_workdir(prepared, tmp_path, inputs):
    out, _, _ = prepared
    cfg = make_cfg(path=str(out))
    cfg.model.vocab_size = VOCAB - 1
    with pytest.raises(DataError, match=rf"{VOCAB} pieces, more than model.vocab_size={VOCAB - 1}"):
        make_datasets(cfg, str(tmp_path / "wd"), log=lambda _: None)
    assert not (tmp_path / "wd").exists()

    other = Tokenizer.train(inputs[1][:150], str(tmp_path / "other" / "tokenizer.model"), VOCAB, NUM_SENTINELS, seed=1)
    assert other.sha256 != Tokenizer.load(str(out / "tokenizer.model")).sha256
    with pytest.raises(DataError, match="is not the tokenizer .* was prepared with"):
        make_datasets(make_cfg(path=str(out)), str(tmp_path / "other"), log=lambda _: None)
    assert os.listdir(tmp_path / "other") == ["tokenizer.model"]


# ---------------------------------------------------------------------- supervised pairs


def test_prepared_pairs_train_as_the_json_lines_do(tmp_path):
    """``prepare --pairs``: (input, target) records and conversations (a pair per assistant
    turn) tokenized by 2 workers into several shards, then ``data.objective=supervised`` on the
    directory serves exactly the pairs, with exactly the train / eval split (by record: a
    conversation's pairs together), that the same JSON lines give read directly."""
    from t5x_lite.data import chat
    from test_data import CHATML

    docs = synthetic_corpus(120, seed=7)
    (tmp_path / "chat.json").write_text(json.dumps({"template": CHATML, "bos_token": "", "eos_token": "<|im_end|>"}))
    with open(tmp_path / "sft.jsonl", "w") as f:
        for i in range(60):
            if i % 3:
                f.write(json.dumps({"q": docs[i][:80], "a": docs[i + 60][:80]}) + "\n")
            else:  # a conversation of 1 + i % 2 answers
                talk = [{"role": "user", "content": docs[i][:50]}]
                for t in range(1 + i % 2):
                    talk += [{"role": "assistant", "content": docs[i + 60 + t][:60]}, {"role": "user", "content": "and?"}]
                f.write(json.dumps({"messages": talk[:-1]}) + "\n")
        f.write(json.dumps({"q": "no answer"}) + "\n")
    fields = dict(input_field="q", target_field="a", chat_template=str(tmp_path / "chat.json"))
    pairs = prepare_module.PairFields("q", "a", "messages", chat.load(fields["chat_template"]), "all")
    lines = []
    manifest = prepare([str(tmp_path / "sft.jsonl")], str(tmp_path / "prepared"), vocab_size=VOCAB,
                       num_sentinels=NUM_SENTINELS, workers=2, unit_bytes=2048, progress=False, log=lines.append,
                       pairs=pairs)
    assert len(manifest["shards"]) > 2 and manifest["documents"] == 2 * 70  # 40 pairs + 20 talks of 1 or 2 answers
    assert sum(manifest["pairs"]["records"]) == 60 and "without a text field 'a'" in lines[-1]

    def served(path, **data):
        cfg = make_cfg("decoder", "supervised", seq_len=256, batch_size=1, path=path, eval_fraction=0.25,
                       tokenizer=str(tmp_path / "prepared" / "tokenizer.model"), **data)
        log = []
        _, train, evaluation = make_datasets(cfg, str(tmp_path / f"run{len(os.listdir(tmp_path))}"), log=log.append)
        out = []
        for ds in (train, evaluation):
            seen = []
            for i in range(ds.rows_per_epoch):
                b = ds.batches(i)
                for k in range(1, b["segment_ids"][0].max() + 1):
                    at = b["segment_ids"][0] == k
                    scored = b["weights"][0][at] > 0
                    seen.append((tuple(b["targets"][0][at][~scored]), tuple(b["targets"][0][at][scored])))
            out.append(sorted(seen))
        return out, log

    (from_prepared, eval_prepared), log = served(str(tmp_path / "prepared"))
    (from_lines, eval_lines), _ = served(str(tmp_path / "sft.jsonl"), **fields)
    assert from_prepared == from_lines and eval_prepared == eval_lines and eval_lines
    assert len(from_lines) + len(eval_lines) == 70 and any("pairs prepared from fields 'q' / 'a'" in s for s in log)

    with pytest.raises(DataError, match="prepared as \\(input, target\\) pairs"):
        make_datasets(make_cfg("decoder", path=str(tmp_path / "prepared")), str(tmp_path / "bad"), log=print)
    # the command line: the same shards (named by what they hold) as the call above
    assert cli.main(["prepare", "--input", str(tmp_path / "sft.jsonl"), "--output", str(tmp_path / "cli"), "--pairs",
                     "--input-field", "q", "--target-field", "a", "--chat-template", fields["chat_template"],
                     "--tokenizer", str(tmp_path / "prepared" / "tokenizer.model"), "--workers", "1"]) == 0
    again = shards.read_json(str(tmp_path / "cli" / shards.MANIFEST))
    assert again["pairs"]["fields"] == manifest["pairs"]["fields"] and again["documents"] == manifest["documents"]
