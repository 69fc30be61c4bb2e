"""The prepared-corpus format: memory-mappable token shards, document offsets, a JSON manifest.

A prepared directory::

    manifest.json             written last: format, tokenizer hash, counts, the list of shards
    tokenizer.model           the sentencepiece model the ids come from
    shard-<id>.tokens.npy     uint16 (vocab <= 65536) or uint32 [T]: the shard's documents back
                              to back, each followed by eos
    shard-<id>.docs.npy       int64 [D + 1]: document d is tokens[docs[d]:docs[d + 1]] (eos last)
    shard-<id>.json           the shard's record (its input, its counts), written after both arrays

Every file is written under a ``.tmp-*`` name, fsync'd, then renamed (and the directory fsync'd),
so a file under its final name is complete. A shard is done only once its record exists, and the
directory is a prepared corpus only once ``manifest.json`` exists: an interrupted run leaves at
worst ``.tmp-*`` files and shards without records, which the next run removes or redoes.

``TokenStore`` reads either such a directory (memory-mapped: opening costs the manifest and the
shard headers, not the tokens) or documents held in memory, behind one interface.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import tempfile
from typing import BinaryIO, Callable, Optional, Sequence

import numpy as np

from t5x_lite.data import DataError

FORMAT = "t5x_lite.prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
TMP_PREFIX = ".tmp-"
SHARD_PREFIX = "shard-"


# ---------------------------------------------------------------------- atomic files


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` all or nothing: ``write(f)`` into a temporary file next to it, fsync, rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def read_json(path: str):
    with open(path, "rb") as f:
        return json.loads(f.read())


def remove_temporaries(directory: str) -> int:
    """Delete the ``.tmp-*`` files an interrupted writer left in ``directory``; returns how many."""
    names = [n for n in os.listdir(directory) if n.startswith(TMP_PREFIX)]
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, name))
    return len(names)


# ---------------------------------------------------------------------- shards


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_paths(directory: str, name: str) -> dict[str, str]:
    base = os.path.join(directory, name)
    return {"tokens": base + ".tokens.npy", "docs": base + ".docs.npy", "record": base + ".json"}


def join_documents(ids: Sequence[Sequence[int]], eos_id: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ``(tokens [T], offsets int64 [D + 1])`` with eos after every document."""
    lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.full(int(offsets[-1]), eos_id, dtype)
    body = np.ones(len(tokens), bool)
    body[offsets[1:] - 1] = False
    tokens[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=int(len(tokens) - len(ids)))
    return tokens, offsets


def content_hash(tokens: np.ndarray, offsets: np.ndarray) -> str:
    """sha256 of a shard's stored bytes: tokens, then offsets."""
    h = hashlib.sha256(np.ascontiguousarray(tokens).view(np.uint8))
    h.update(np.ascontiguousarray(offsets, np.int64).view(np.uint8))
    return h.hexdigest()


def write_shard(directory: str, name: str, tokens: np.ndarray, offsets: np.ndarray, record: dict) -> dict:
    """Write one shard: its two arrays, then its record (the mark that the shard is whole)."""
    paths = shard_paths(directory, name)
    atomic_write(paths["tokens"], lambda f: np.save(f, tokens, allow_pickle=False))
    atomic_write(paths["docs"], lambda f: np.save(f, offsets, allow_pickle=False))
    record = dict(record, name=name, documents=int(len(offsets) - 1), tokens=int(len(tokens)),
                  dtype=str(tokens.dtype), sha256=content_hash(tokens, offsets))
    write_json(paths["record"], record)
    return record


def read_record(directory: str, name: str) -> Optional[dict]:
    """The record of shard ``name`` if the shard is whole (record present, arrays of the recorded
    sizes), else None."""
    paths = shard_paths(directory, name)
    try:
        record = read_json(paths["record"])
        tokens_shape = np.load(paths["tokens"], mmap_mode="r", allow_pickle=False).shape
        docs_shape = np.load(paths["docs"], mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError):
        return None
    if tokens_shape != (record.get("tokens"),) or docs_shape != (record.get("documents", -2) + 1,):
        return None
    return record


def write_manifest(directory: str, records: Sequence[dict], tokenizer, **info) -> dict:
    """Write ``manifest.json`` for the shards of ``records`` (in order): the mark that the
    directory is complete. ``info``: further JSON fields (inputs, field, skipped counts...)."""
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer": {"file": TOKENIZER, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "num_sentinels": len(tokenizer.sentinel_ids)},
        "dtype": str(token_dtype(tokenizer.vocab_size)),
        "documents": sum(r["documents"] for r in records),
        "tokens": sum(r["tokens"] for r in records),
        "bytes": sum(r["bytes"] for r in records),
        "shards": [{k: r[k] for k in ("name", "documents", "tokens", "bytes", "sha256")} for r in records],
        **info,
    }
    write_json(os.path.join(directory, MANIFEST), manifest)
    return manifest


def is_prepared(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST))


def looks_unfinished(directory: str) -> bool:
    """A directory a ``prepare`` started but did not finish (shards, no manifest)."""
    return os.path.isdir(directory) and not is_prepared(directory) and any(
        n.startswith(SHARD_PREFIX) for n in os.listdir(directory)
    )


# ---------------------------------------------------------------------- reading


class TokenStore:
    """Documents as token ids, each followed by eos, in one or more shards.

    shards: ``(tokens [T_s], offsets int64 [D_s + 1])`` pairs (memory-mapped or in memory).
    Documents are numbered 0..N-1 across shards in order.
    """

    def __init__(self, shards: Sequence[tuple[np.ndarray, np.ndarray]], eos_id: int, manifest: Optional[dict] = None):
        self._tokens = [t for t, _ in shards]
        self._offsets = [o for _, o in shards]
        counts = np.array([len(o) - 1 for o in self._offsets], np.int64)
        self._first_doc = np.concatenate([[0], np.cumsum(counts)])
        self.num_documents = int(self._first_doc[-1])
        self.num_tokens = int(sum(int(o[-1]) for o in self._offsets))
        self.eos_id = eos_id
        self.manifest = manifest or {}
        self.directory: Optional[str] = None  # set by ``open``

    def __reduce__(self):
        """Pickled as its directory when memory-mapped from one (a worker process maps it again:
        nothing is copied), else by value."""
        if self.directory is not None:
            return (TokenStore.open, (self.directory,))
        return (TokenStore, (list(zip(self._tokens, self._offsets)), self.eos_id, self.manifest))

    @classmethod
    def from_documents(cls, docs: Sequence[Sequence[int]], eos_id: int, dtype=np.int32) -> "TokenStore":
        """An in-memory store of token-id documents (given without eos)."""
        return cls([join_documents(docs, eos_id, dtype)], eos_id)

    @classmethod
    def open(cls, directory: str) -> "TokenStore":
        """Memory-map a prepared directory. Raises ``DataError`` if it is not one, or is damaged."""
        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            hint = ("an unfinished `t5x-lite prepare` (no manifest.json yet): rerun the same command to finish it"
                    if looks_unfinished(directory) else "run `t5x-lite prepare --input ... --output DIR` first")
            raise DataError(f"{directory} is not a prepared corpus: {hint}")
        try:
            manifest = read_json(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is unreadable ({e}); rerun `t5x-lite prepare` with --overwrite") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise DataError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest; rerun `t5x-lite prepare`")
        shards = []
        for entry in manifest["shards"]:
            paths = shard_paths(directory, entry["name"])
            try:
                tokens = np.load(paths["tokens"], mmap_mode="r", allow_pickle=False)
                offsets = np.load(paths["docs"], mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{directory}: shard {entry['name']} is missing or damaged ({e}); "
                                "rerun `t5x-lite prepare` with --overwrite") from None
            if len(tokens) != entry["tokens"] or len(offsets) != entry["documents"] + 1:
                raise DataError(f"{directory}: shard {entry['name']} does not match the manifest; "
                                "rerun `t5x-lite prepare` with --overwrite")
            shards.append((tokens, offsets))
        store = cls(shards, manifest["tokenizer"]["eos_id"], manifest)
        store.directory = directory
        return store

    def doc_lengths(self) -> np.ndarray:
        """int64 [N]: tokens of every document, eos included."""
        if not self._offsets:
            return np.zeros(0, np.int64)
        return np.concatenate([np.diff(np.asarray(o)) for o in self._offsets])

    def _locate(self, doc: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._first_doc, doc, side="right")) - 1
        return shard, int(self._offsets[shard][doc - self._first_doc[shard]])

    def document(self, doc: int) -> np.ndarray:
        """int32 [n]: the token ids of document ``doc``, without its eos."""
        shard, start = self._locate(doc)
        end = int(self._offsets[shard][doc - self._first_doc[shard] + 1])
        return np.asarray(self._tokens[shard][start : end - 1], np.int32)

    def read(self, docs: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """int32 [sum(hi - lo)]: ``document(docs[i]) + [eos]`` sliced ``[lo[i]:hi[i]]``, back to back.
        One gather per shard touched; only those tokens (and their offsets) are read."""
        docs, lo, hi = (np.asarray(a, np.int64) for a in (docs, lo, hi))
        out = np.empty(int((hi - lo).sum()), np.int32)
        out_start = np.cumsum(hi - lo) - (hi - lo)
        shard_of = np.searchsorted(self._first_doc, docs, side="right") - 1
        for shard in np.unique(shard_of):
            at = np.flatnonzero(shard_of == shard)
            first = np.asarray(self._offsets[shard][docs[at] - self._first_doc[shard]]) + lo[at]  # [k]
            n = hi[at] - lo[at]
            within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            out[np.repeat(out_start[at], n) + within] = self._tokens[shard][np.repeat(first, n) + within]
        return out
