"""Where documents come from: the built-in standard-library corpus or files on disk.

A *document* is one ``str``. Text files hold one document each; JSON-lines files hold one
document per line, taken from a configurable field.
"""

from __future__ import annotations

import ast
import glob
import gzip
import inspect
import json
import os
import sysconfig
import warnings
from typing import Iterator, Optional

from t5x_lite.data import DataError

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
_MIN_DOCSTRING_CHARS = 40
_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


# ------------------------------------------------------------------ built-in corpus


def _stdlib_files() -> list[str]:
    """Sorted paths of the standard library's ``.py`` files, minus tests and vendored tools."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(out)


def _docstrings_of(source: bytes) -> Iterator[str]:
    """Cleaned docstrings of a module, its classes and functions (``ast.walk`` order)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old stdlib modules
        tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield inspect.cleandoc(doc).strip()


def stdlib_docstrings() -> list[str]:
    """The default corpus: docstrings of the running Python's standard library.

    Exists on every machine without a download. Module, class and function docstrings are
    ``inspect.cleandoc``'d; ones shorter than 40 characters and exact repeats are dropped.
    Files are visited in sorted order, so the result is deterministic for a given Python build.
    """
    docs: list[str] = []
    seen: set[str] = set()
    for path in _stdlib_files():
        try:
            with open(path, "rb") as f:
                found = list(_docstrings_of(f.read()))
        except (SyntaxError, ValueError, OSError):
            continue
        for doc in found:
            if len(doc) >= _MIN_DOCSTRING_CHARS and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


# ------------------------------------------------------------------ files on disk


def _resolve(spec: str) -> list[str]:
    """The files named by ``spec``: a file, a directory (recursively) or a glob; sorted."""
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        roots = [spec]
    else:
        roots = sorted(glob.glob(spec, recursive=True))
    files = []
    for root in roots:
        if os.path.isfile(root):
            files.append(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(set(files))


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _jsonl_documents(path: str, field: str) -> Iterator[str]:
    """One document per non-blank line of a JSON-lines file, from ``field``."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not a JSON object per line ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if field not in record:
                raise DataError(
                    f"{path}:{lineno}: field {field!r} is missing; fields present: {sorted(record)}; "
                    "set data.field to the one holding the text"
                )
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {field!r} holds a {type(text).__name__}, not text")
            yield text


def _file_documents(path: str, field: str) -> Iterator[str]:
    if path.endswith(_JSON_SUFFIXES):
        yield from _jsonl_documents(path, field)
    else:
        with _open_text(path) as f:
            yield f.read()


def read_documents(spec: str, field: str = "text", max_docs: Optional[int] = None) -> list[str]:
    """Documents from ``spec`` (a file, a directory searched recursively, or a glob).

    ``.jsonl``/``.json``(``.gz``): one document per line from ``field``. Anything else
    (``.txt``, ``.txt.gz``, ...): the whole file is one document. Whitespace-only documents
    are skipped; at most ``max_docs`` are returned. Raises ``DataError`` when nothing matches.
    """
    files = _resolve(spec)
    if not files:
        raise DataError(f"data.path={spec!r} matches no file (give a file, a directory or a glob)")
    docs: list[str] = []
    for path in files:
        for doc in _file_documents(path, field):
            if max_docs is not None and len(docs) >= max_docs:
                return docs
            if doc.strip():
                docs.append(doc)
    return docs


def load_documents(data_cfg) -> list[str]:
    """The corpus a ``DataConfig`` names: the stdlib docstrings when ``path`` is None, else
    ``read_documents(path, field, max_docs)``. Raises ``DataError`` if no non-blank document is left."""
    if data_cfg.path is None:
        docs = [d for d in stdlib_docstrings() if d.strip()]
        if data_cfg.max_docs is not None:
            docs = docs[: data_cfg.max_docs]
        where = "the standard-library docstring corpus"
    else:
        docs = read_documents(data_cfg.path, data_cfg.field, data_cfg.max_docs)
        where = f"data.path={data_cfg.path!r}"
    if not docs:
        raise DataError(f"the corpus is empty: {where} holds no non-blank document")
    return docs
