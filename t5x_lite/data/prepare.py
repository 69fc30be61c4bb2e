"""``t5x-lite prepare``: tokenize a corpus once into a memory-mappable prepared directory.

    t5x-lite prepare --input 'corpus/*.jsonl.gz' --output data/c4 --vocab-size 32000

1. The inputs (files, directories, globs; text, JSON lines, gzip'd) are cut into units of about
   1/64 of their size (1 to 256 MiB; ``corpus.plan_units``). Each unit becomes one shard, named by
   a hash of its files' (path, size, mtime), byte range, the JSON field and the tokenizer.
2. Without ``--tokenizer`` a sentencepiece model is trained on a sample (the first documents of
   every unit, 32 MB in all) with the specials every family needs (pad, eos, unk, bos, ``<mask>``
   and ``--num-sentinels`` sentinels) and kept as ``DIR/tokenizer.model``; a later run reuses it.
3. Units are tokenized by ``--workers`` processes (a progress bar shows MB/s, documents and
   the ETA); each writes its shard atomically (see ``shards``), its record last.
4. ``manifest.json`` is written when every shard is whole.

Re-running with the same inputs and tokenizer finds the manifest's shards equal to the plan and
does nothing. A run that was interrupted (killed, Ctrl-C, a worker died, a ``--strict`` error)
left no manifest: the next run keeps every shard whose record exists and does only the rest.
Changing the inputs or the tokenizer of a finished directory needs ``--overwrite`` (shards of
unchanged units are kept even then), so nothing prepared is lost to a typo.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import queue as queue_lib
import sys
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from t5x_lite.data import DataError
from t5x_lite.data import shards as fmt
from t5x_lite.data.corpus import (
    PairFields,
    Segment,
    Skipped,
    estimated_bytes,
    fingerprint,
    plan_units,
    resolve,
    segment_pairs,
    unit_documents,
)
from t5x_lite.data.tokenizer import Tokenizer, min_vocab_size

SAMPLE_BYTES = 32 << 20  # text the tokenizer is trained on
DEFAULT_VOCAB = 32000
_BATCH_DOCS, _BATCH_BYTES = 512, 1 << 20  # documents per encode call / progress report


class PrepareInterrupted(RuntimeError):
    """The run stopped before the manifest (a worker died); what is done is kept for the rerun."""


# ---------------------------------------------------------------------- command line


def run_prepare_cli(args) -> int:
    try:
        pairs = None
        if args.pairs:
            from t5x_lite.data import chat

            template = chat.load(args.chat_template) if args.chat_template else None
            pairs = PairFields(args.input_field, args.target_field, args.messages_field, template, args.chat_turns)
        prepare(
            args.input, args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            num_sentinels=args.num_sentinels, workers=args.workers, field=args.field, strict=args.strict,
            overwrite=args.overwrite, pairs=pairs,
        )
    except PrepareInterrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- planning


def _check_output(output: str) -> None:
    """``output`` must be new, empty, or a directory only ``prepare`` has written to."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise DataError(f"--output {output!r} is a file; give a new or empty directory")
    if not os.path.isdir(output):
        return
    foreign = [n for n in sorted(os.listdir(output))
               if n not in (fmt.MANIFEST, fmt.TOKENIZER) and not n.startswith((fmt.SHARD_PREFIX, fmt.TMP_PREFIX))]
    if foreign:
        raise DataError(f"--output {output!r} holds files that prepare did not write ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); give a new or empty directory")


def _plan(inputs: Sequence[str], output: str, unit_bytes: Optional[int]) -> tuple[list[str], list]:
    if not inputs:
        raise DataError("give at least one --input (a file, a directory or a glob)")
    files = []
    for spec in inputs:
        found = resolve(spec, exclude=output)
        if not found:
            raise DataError(f"--input {spec!r} matches no file (give a file, a directory or a glob)")
        files.extend(found)
    files = sorted(set(files))
    return files, plan_units(files, unit_bytes)


def shard_name(unit: Sequence[Segment], field: str, tokenizer_sha256: str) -> str:
    """``shard-<hash>``: a hash of everything the shard's contents depend on."""
    key = json.dumps([fmt.FORMAT_VERSION, field, tokenizer_sha256, [list(vars(s).values()) for s in unit]])
    return fmt.SHARD_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:20]


def _existing_tokenizer(output: str, vocab_size: Optional[int]) -> Optional[Tokenizer]:
    """``output/tokenizer.model`` when present and of the asked vocab size."""
    path = os.path.join(output, fmt.TOKENIZER)
    if not os.path.isfile(path):
        return None
    tok = Tokenizer.load(path)
    return tok if vocab_size is None or tok.vocab_size == vocab_size else None


def _describe_change(manifest: dict, files: list[str], field: str, tok: Optional[Tokenizer]) -> str:
    old_sha = manifest["tokenizer"]["sha256"]
    changes = []
    if tok is None or tok.sha256 != old_sha:
        changes.append(f"the tokenizer (was {old_sha[:12]}, now {'a new one to train' if tok is None else tok.sha256[:12]})")
    if manifest.get("field") != field:
        changes.append(f"the field ({manifest.get('field')!r} -> {field!r})")
    old = {p: (s, m) for p, s, m in manifest.get("inputs", [])}
    new = {p: (s, m) for p, s, m in fingerprint(files)}
    added, removed = len(new.keys() - old.keys()), len(old.keys() - new.keys())
    changed = sum(old[p] != new[p] for p in new.keys() & old.keys())
    if added or removed or changed:
        changes.append(f"the inputs ({added} files added, {removed} removed, {changed} changed)")
    return ", ".join(changes) or "the plan"


# ---------------------------------------------------------------------- tokenizing


def unit_texts(unit, field: str, skipped: Skipped, pairs: Optional[PairFields] = None) -> Iterator[tuple[list, int]]:
    """``(texts of one input record, its bytes)`` over a unit: one document (``[]`` for a skipped
    or blank one), or with ``pairs`` the record's pairs flattened, input then target."""
    for seg in unit:
        if pairs is None:
            for text, nbytes in unit_documents([seg], field, skipped):
                yield ([text] if text else []), nbytes
        else:
            for record_pairs, nbytes in segment_pairs(seg, pairs, skipped):
                yield [text for pair in record_pairs for text in pair], nbytes


def _sample_texts(units: list, field: str, budget: int, pairs: Optional[PairFields] = None) -> Iterator[str]:
    """The first documents (inputs and targets) of every unit, about ``budget / len(units)``
    bytes from each."""
    share = max(1, budget // max(1, len(units)))
    for unit in units:
        taken = 0
        for texts, _ in unit_texts(unit, field, Skipped(), pairs):
            for text in texts:
                if text:
                    yield text
                    taken += len(text)
            if taken >= share:
                break


class _ShardBuilder:
    """A unit's documents as token ids: texts are encoded a batch at a time, and
    ``report(documents, input_bytes)`` is called after every batch."""

    def __init__(self, tokenizer: Tokenizer, report: Callable[[int, int], None]):
        self._tok, self._report = tokenizer, report
        self._dtype = fmt.token_dtype(tokenizer.vocab_size)
        self._texts: list[str] = []
        self._pending_bytes = 0
        self._tokens: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self.bytes = 0

    def add(self, texts: list, nbytes: int) -> None:
        """A record's documents (an input may be empty: a pair keeps it) and its input bytes."""
        self._texts.extend(texts)
        self._pending_bytes += nbytes
        if len(self._texts) >= _BATCH_DOCS or self._pending_bytes >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        ids = self._tok.encode_batch(self._texts) if self._texts else []
        tokens, offsets = fmt.join_documents(ids, self._tok.eos_id, self._dtype)
        self._tokens.append(tokens)
        self._lengths.append(np.diff(offsets))
        self._report(len(self._texts), self._pending_bytes)
        self.bytes += self._pending_bytes
        self._texts, self._pending_bytes = [], 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens [T], offsets int64 [D + 1])`` of everything added."""
        self.flush()
        lengths = np.concatenate(self._lengths)
        return np.concatenate(self._tokens), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _tokenize_unit(unit, directory: str, name: str, field: str, strict: bool, tokenizer: Tokenizer,
                   report: Callable[[int, int], None], pairs: Optional[PairFields] = None) -> dict:
    """Tokenize one unit into shard ``name`` of ``directory``; returns its record. With ``pairs``
    the shard's documents alternate inputs and targets, and the record counts the pairs of each
    input record that gave some (``pairs_per_record``; absent when each gave one)."""
    skipped = Skipped(strict)
    builder = _ShardBuilder(tokenizer, report)
    per_record = []
    for texts, nbytes in unit_texts(unit, field, skipped, pairs):
        builder.add(texts, nbytes)
        if pairs is not None and texts:
            per_record.append(len(texts) // 2)
    tokens, offsets = builder.arrays()
    record = {"segments": [vars(s) for s in unit], "field": field, "tokenizer_sha256": tokenizer.sha256,
              "bytes": builder.bytes, "skipped": skipped.as_dict()}
    if pairs is not None:
        record["records"] = len(per_record)
        if any(n != 1 for n in per_record):
            record["pairs_per_record"] = per_record
    return fmt.write_shard(directory, name, tokens, offsets, record)


_WORKER: dict = {}  # per worker process: its tokenizer and the progress queue


def _one_thread(tok):
    """A sentencepiece tokenizer set to encode on one thread: the processes are the parallelism
    (a WordPiece tokenizer is plain Python, one thread anyway)."""
    if isinstance(tok, Tokenizer):
        tok.num_threads = 1
    return tok


def _init_worker(tokenizer_path: str, progress_queue) -> None:
    _WORKER["tokenizer"] = _one_thread(Tokenizer.load(tokenizer_path))
    _WORKER["queue"] = progress_queue


def _worker_task(unit, directory, name, field, strict, pairs) -> dict:
    q = _WORKER["queue"]
    return _tokenize_unit(unit, directory, name, field, strict, _WORKER["tokenizer"],
                          lambda docs, nbytes: q.put((docs, nbytes)), pairs)


class _Progress:
    """A tqdm bar over input bytes (MB/s, ETA) with the documents done as a postfix."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.docs = 0
        self.bar = tqdm(total=total, unit="B", unit_scale=True, disable=not enabled, dynamic_ncols=True,
                        mininterval=0.5, desc="tokenizing", file=sys.stderr)

    def __call__(self, docs: int, nbytes: int) -> None:
        self.docs += docs
        self.bar.set_postfix(docs=self.docs, refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def _run_in_process(todo, directory, field, strict, tok, progress, pairs) -> dict[int, dict]:
    tok = _one_thread(tok)
    return {i: _tokenize_unit(unit, directory, name, field, strict, tok, progress, pairs)
            for i, (unit, name) in todo.items()}


def _run_in_pool(todo, directory, field, strict, progress, workers: int, pairs) -> dict[int, dict]:
    """Tokenize units in ``workers`` processes (forkserver: the parent's threads, JAX's included,
    are never forked), each loading ``directory/tokenizer.model``. The first error cancels what
    has not started."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    progress_queue = ctx.Queue()
    records = {}
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                  initargs=(os.path.join(directory, fmt.TOKENIZER), progress_queue))
    try:
        portable = None if pairs is None else pairs.portable()
        futures = {pool.submit(_worker_task, unit, directory, name, field, strict, portable): i
                   for i, (unit, name) in todo.items()}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
            _drain(progress_queue, progress)
            for future in done:
                records[futures[future]] = future.result()
    except cf.process.BrokenProcessPool:
        raise PrepareInterrupted(
            f"a tokenizer worker died (killed, or out of memory?) after {len(records)} of the {len(todo)} shards "
            "to do were written; they are kept: rerun the same command to finish"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    _drain(progress_queue, progress)
    return records


def _drain(progress_queue, progress) -> None:
    while True:
        try:
            progress(*progress_queue.get_nowait())
        except queue_lib.Empty:
            return


# ---------------------------------------------------------------------- the command


def prepare(
    inputs: Sequence[str],
    output: str,
    *,
    tokenizer: Optional[str] = None,
    vocab_size: Optional[int] = None,
    num_sentinels: int = 100,
    workers: Optional[int] = None,
    field: str = "text",
    strict: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    unit_bytes: Optional[int] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    pairs: Optional[PairFields] = None,
) -> dict:
    """Prepare ``inputs`` into ``output`` (see the module docstring); returns the manifest.

    tokenizer: a sentencepiece model to use; else ``output/tokenizer.model`` when present (and of
    ``vocab_size``), else one trained with ``vocab_size`` (default 32000) pieces. workers: processes
    (default: the CPU count). strict: raise on the first bad input instead of skipping it.
    pairs: JSON lines as supervised (input, target) pairs (``data.objective=supervised`` trains on
    the directory): documents alternate inputs and targets, and the manifest's ``pairs`` holds how
    they were read and which pairs are one record's (a conversation's: they split together).
    """
    if pairs is not None:
        field = "pairs:" + pairs.key()  # what shard names, records and the manifest say was read
    t0 = time.perf_counter()
    if tokenizer is not None and vocab_size is not None:
        raise DataError("give --tokenizer or --vocab-size, not both (a given tokenizer fixes the vocab)")
    if workers is not None and workers < 1:
        raise DataError(f"--workers={workers} must be >= 1")
    if tokenizer is None and vocab_size is not None and vocab_size < min_vocab_size(num_sentinels):
        raise DataError(f"--vocab-size={vocab_size} is too small for --num-sentinels={num_sentinels}: "
                        f"at least {min_vocab_size(num_sentinels)}")
    _check_output(output)
    files, units = _plan(inputs, output, unit_bytes)
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else _existing_tokenizer(output, vocab_size)

    if fmt.is_prepared(output):
        old = _previous_run(output, files, units, field, tok, overwrite)
        if old is not None:
            log(f"prepare: {output} is up to date ({old['documents']} documents, {old['tokens']} tokens): nothing to do")
            return old

    total_mb = sum(estimated_bytes(s) for u in units for s in u) / 1e6
    log(f"prepare: {len(files)} files, {total_mb:.1f} MB in {len(units)} units -> {output}")
    tok = _install_tokenizer(tok, units, output, field, vocab_size, num_sentinels, seed, log, pairs)
    fmt.remove_temporaries(output)

    names = [shard_name(u, field, tok.sha256) for u in units]
    records = {i: r for i, r in enumerate(fmt.read_record(output, n) for n in names) if r is not None}
    todo = {i: (u, n) for i, (u, n) in enumerate(zip(units, names)) if i not in records}
    workers = min(workers or os.cpu_count() or 1, max(1, len(todo)))
    if records:
        log(f"prepare: {len(records)} of {len(units)} shards are already whole and kept")
    t1 = time.perf_counter()
    records.update(_tokenize_units(todo, output, field, strict, tok, workers, progress, pairs))
    seconds = time.perf_counter() - t1

    skipped = Skipped()
    for r in records.values():
        skipped.merge(r["skipped"])
    if not sum(r["documents"] for r in records.values()):
        raise DataError("the inputs hold no non-blank document" + (f" (skipped: {skipped})" if skipped else ""))
    ordered = [records[i] for i in range(len(units))]
    info = {}
    if pairs is not None:
        info["pairs"] = {"fields": json.loads(pairs.key()), "records": [r["records"] for r in ordered],
                         "pairs_per_record": [r.get("pairs_per_record") for r in ordered]}
    manifest = fmt.write_manifest(output, ordered, tok, field=field, inputs=fingerprint(files),
                                  skipped=skipped.as_dict(), **info)
    _remove_orphans(output, set(names))
    done_mb = sum(records[i]["bytes"] for i in todo) / 1e6
    log(f"prepare: {manifest['documents']} documents, {manifest['tokens']} tokens, {manifest['bytes'] / 1e6:.1f} MB; "
        f"tokenized {done_mb:.1f} MB in {seconds:.1f}s ({done_mb / max(seconds, 1e-9):.2f} MB/s, "
        f"{workers} worker{'s' * (workers > 1)}); {time.perf_counter() - t0:.1f}s in all -> {output}/{fmt.MANIFEST}")
    if skipped:
        log(f"prepare: skipped {skipped}")
    return manifest


def _previous_run(output: str, files, units, field: str, tok: Optional[Tokenizer], overwrite: bool) -> Optional[dict]:
    """The manifest of a finished ``output`` when it holds exactly the planned shards (nothing to
    do). Otherwise raise, or with ``overwrite`` remove the manifest (the directory is unfinished
    until the new one) and return None."""
    path = os.path.join(output, fmt.MANIFEST)
    old = fmt.read_json(path)
    if tok is not None and [s["name"] for s in old["shards"]] == [shard_name(u, field, tok.sha256) for u in units]:
        return old
    if not overwrite:
        raise DataError(f"{output} is already prepared from other inputs: {_describe_change(old, files, field, tok)} "
                        "changed. Use a new --output, or --overwrite to replace it (unchanged shards are kept)")
    os.remove(path)
    return None


def _tokenize_units(todo: dict, output: str, field: str, strict: bool, tok: Tokenizer, workers: int,
                    progress: bool, pairs: Optional[PairFields] = None) -> dict[int, dict]:
    """Records of the shards written for ``todo`` ({index: (unit, name)}), in this process or a pool."""
    bar = _Progress(sum(estimated_bytes(s) for u, _ in todo.values() for s in u), progress)
    try:
        if workers == 1:
            return _run_in_process(todo, output, field, strict, tok, bar, pairs)
        return _run_in_pool(todo, output, field, strict, bar, workers, pairs)
    finally:
        bar.close()


def _install_tokenizer(tok, units, output, field, vocab_size, num_sentinels, seed, log, pairs=None) -> Tokenizer:
    """The tokenizer to use, saved as ``output/tokenizer.model``: ``tok``, or one trained now."""
    path = os.path.join(output, fmt.TOKENIZER)
    if tok is None:
        t0 = time.perf_counter()
        vocab_size = vocab_size or DEFAULT_VOCAB
        tok = Tokenizer.train(_sample_texts(units, field, SAMPLE_BYTES, pairs), path, vocab_size, num_sentinels,
                              seed=seed)
        log(f"prepare: trained a {vocab_size}-piece tokenizer ({num_sentinels} sentinels) on a sample "
            f"in {time.perf_counter() - t0:.1f}s -> {path}")
    elif not os.path.isfile(path) or Tokenizer.load(path).sha256 != tok.sha256:
        os.makedirs(output, exist_ok=True)
        tok.save(path)
    return tok


def _remove_orphans(directory: str, keep: set) -> None:
    """Delete shard files of units no longer in the plan (after the new manifest is written)."""
    for name in os.listdir(directory):
        if name.startswith(fmt.SHARD_PREFIX) and name.split(".", 1)[0] not in keep:
            os.remove(os.path.join(directory, name))
