"""Where documents come from: the built-in standard-library corpus or files on disk.

A *document* is one ``str``. Text files (``.txt``, ``.md``, anything not JSON; ``.gz`` too) hold one
document each; JSON-lines files (``.jsonl``/``.json``, ``.gz`` too) hold one document per line,
taken from a configurable field.

Files are read in *units* of work (``plan_units``): whole files, grouped while small, and large
uncompressed JSON-lines files cut into byte ranges at line starts, so that parallel readers
share the work evenly and a unit can be redone on its own. Problems (a file that is not UTF-8 or
cannot be read, a blank document, a JSON line that is not an object or lacks the field) are
skipped and counted in a ``Skipped``, or raised as one ``DataError`` when it is strict.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import glob
import gzip
import hashlib
import inspect
import json
import os
import sys
import sysconfig
import warnings
import zlib
from typing import Iterable, Iterator, Optional, Sequence

from t5x_lite.data import DataError

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
_MIN_DOCSTRING_CHARS = 40
_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
MIN_UNIT_BYTES, MAX_UNIT_BYTES = 1 << 20, 256 << 20  # input bytes per unit of work (one shard)
_STATEMENT_NODES = (ast.stmt, ast.excepthandler, ast.match_case)


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
    """Cleaned docstrings of a module, its classes and functions, breadth first (``ast.walk``
    order). Only statements are visited: no expression holds a def or a class."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old stdlib modules
        tree = ast.parse(source)
    queue = collections.deque([tree])
    while queue:
        node = queue.popleft()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield inspect.cleandoc(doc).strip()
        for name in node._fields:  # statement lists (body, handlers, orelse, ...) in field order
            value = getattr(node, name, None)
            if isinstance(value, list) and value and isinstance(value[0], _STATEMENT_NODES):
                queue.extend(value)


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


def _signature(node) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases + node.keywords)
        return f"class {node.name}({bases})" if bases else f"class {node.name}"
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}"


def stdlib_pairs() -> list[str]:
    """The default corpus of ``data.objective=supervised``: (signature, summary) pairs of the
    running Python's standard library, flattened as ``read_pairs`` returns them. The input is a
    function's or class's module and signature (``json.decoder: def raw_decode(self, s, idx=0)``),
    the target its docstring's first paragraph (at least 40 characters). Deterministic for a
    given Python build; repeats dropped."""
    out: list[str] = []
    seen: set[tuple] = set()
    root = sysconfig.get_paths()["stdlib"]
    for path in _stdlib_files():
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        try:
            with open(path, "rb") as f, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(f.read())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            summary = doc.strip().split("\n\n")[0].strip() if doc else ""
            pair = (f"{module}: {_signature(node)}", summary)
            if len(summary) >= _MIN_DOCSTRING_CHARS and pair not in seen:
                seen.add(pair)
                out += pair
    return out


# ------------------------------------------------------------------ files and units


def resolve(spec: str, exclude: Optional[str] = None) -> list[str]:
    """The files named by ``spec``: a file, a directory (recursively, hidden entries skipped) or a
    glob (``**`` recursive); sorted, without those under ``exclude``."""
    if os.path.isfile(spec):
        roots = [spec]
    elif os.path.isdir(spec):
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
    if exclude is not None:
        inside = os.path.join(os.path.abspath(exclude), "")
        files = [f for f in files if not os.path.abspath(f).startswith(inside)]
    return sorted(set(files))


def is_jsonl(path: str) -> bool:
    return path.endswith(_JSON_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of a file (the whole file when compressed or not JSON-lines). A JSON-lines
    segment holds the lines that *start* inside it. ``size``/``mtime_ns`` identify the file's version."""

    path: str
    start: int
    end: int
    size: int
    mtime_ns: int


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _file_size(path: str) -> int:
    return _stat(path).st_size


def _segments_of(path: str, unit_bytes: int) -> list[Segment]:
    st = _stat(path)
    cuts = [0, st.st_size]
    if is_jsonl(path) and not path.endswith(".gz") and st.st_size > unit_bytes:
        cuts = list(range(0, st.st_size, unit_bytes)) + [st.st_size]
    return [Segment(os.path.abspath(path), a, b, st.st_size, st.st_mtime_ns) for a, b in zip(cuts[:-1], cuts[1:])]


def unit_size(total_bytes: int) -> int:
    """Bytes per unit for inputs of ``total_bytes``: a power of two near 1/64 of them, within
    [1 MiB, 256 MiB], so that up to 64 workers share the work (it depends only on the inputs)."""
    target = max(1, total_bytes // 64)
    return min(max(1 << (target.bit_length() - 1), MIN_UNIT_BYTES), MAX_UNIT_BYTES)


def plan_units(files: Iterable[str], unit_bytes: Optional[int] = None) -> list[tuple[Segment, ...]]:
    """Cut ``files`` into units of about ``unit_bytes`` input bytes (default ``unit_size`` of
    their total): consecutive small files are grouped, large uncompressed JSON-lines files split;
    compressed files stay whole."""
    files = list(files)
    if unit_bytes is None:
        unit_bytes = unit_size(sum(_file_size(f) for f in files))
    units, current, size = [], [], 0
    for path in files:
        for seg in _segments_of(path, unit_bytes):
            if current and size + (seg.end - seg.start) > unit_bytes:
                units.append(tuple(current))
                current, size = [], 0
            current.append(seg)
            size += seg.end - seg.start
    if current:
        units.append(tuple(current))
    return units


def estimated_bytes(seg: Segment) -> int:
    """Uncompressed bytes of a segment (a gzip file's size from its trailer, mod 4 GiB)."""
    if not seg.path.endswith(".gz"):
        return seg.end - seg.start
    try:
        with open(seg.path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
    except OSError:
        return seg.size
    return isize if isize >= seg.size else 4 * seg.size


def fingerprint(files: Iterable[str]) -> list:
    """(path, size, mtime_ns) of each file: what identifies this version of the inputs."""
    out = []
    for path in files:
        st = os.stat(path)
        out.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return out


# ------------------------------------------------------------------ reading with skip counts


class Skipped:
    """Counts of skipped inputs by reason, with the first place each happened.

    strict: raise ``DataError`` at the first problem instead of counting it.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, reason: str, where: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason} (drop --strict to skip and count such inputs)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def merge(self, other: dict) -> None:
        """Add counts from ``as_dict()`` of another counter."""
        for reason, n in other.get("counts", {}).items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            self.first.setdefault(reason, other["first"][reason])

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "first": dict(self.first)}

    def __bool__(self) -> bool:
        return bool(self.counts)

    def __str__(self) -> str:
        return "; ".join(f"{n} {reason} (first: {self.first[reason]})" for reason, n in sorted(self.counts.items()))


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _json_object(line: bytes, where: str, skipped: Skipped) -> Optional[dict]:
    """One JSON line's object, or None (skipped)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        skipped.add("lines not UTF-8", where)
        return None
    except json.JSONDecodeError as e:
        skipped.add("lines not JSON", f"{where} ({e.msg})")
        return None
    if not isinstance(record, dict):
        skipped.add("JSON lines not an object", f"{where} (a {type(record).__name__})")
        return None
    return record


def _record_fields(record: dict, fields: Sequence[str], where: str, skipped: Skipped,
                   hint: str = "--field or data.field") -> Optional[list[str]]:
    """The texts of ``fields`` in one JSON record, or None (skipped, once) when one is missing."""
    for field in fields:
        text = record.get(field)
        if not isinstance(text, str):
            got = f"fields present: {sorted(record)}" if field not in record else f"it holds a {type(text).__name__}"
            skipped.add(f"JSON lines without a text field {field!r}", f"{where} ({got}; name the field with {hint})")
            return None
    return [record[field] for field in fields]


def _jsonl_record(line: bytes, field: str, where: str, skipped: Skipped) -> Optional[str]:
    """The text of one JSON line, or None (skipped) when it has none."""
    record = _json_object(line, where, skipped)
    texts = None if record is None else _record_fields(record, (field,), where, skipped)
    return None if texts is None else texts[0]


def _jsonl_lines(seg: Segment, f) -> Iterator[tuple[bytes, str]]:
    """(line, location) of the lines starting in ``seg``: ``path:line`` in a segment that starts
    the file (compressed files are one such segment), else ``path@byte offset``."""
    whole = seg.path.endswith(".gz")
    pos = seg.start
    if pos > 0:
        f.seek(pos - 1)
        f.readline()  # finish the line that started before the segment
        pos = f.tell()
    lineno = 0
    while whole or pos < seg.end:
        line = f.readline()
        if not line:
            return
        lineno += 1
        yield line, (f"{seg.path}:{lineno}" if seg.start == 0 else f"{seg.path}@byte{pos}")
        pos += len(line)


def segment_documents(seg: Segment, field: str, skipped: Skipped) -> Iterator[tuple[str, int]]:
    """``(document, input bytes consumed)`` of one segment. Skipped inputs (counted in ``skipped``)
    and blank JSON lines yield ``("", bytes)``, so that progress still counts their bytes."""
    try:
        with _open_binary(seg.path) as f:
            if is_jsonl(seg.path):
                for line, where in _jsonl_lines(seg, f):
                    text = _jsonl_record(line, field, where, skipped) if line.strip() else None
                    if text is not None and not text.strip():
                        skipped.add("blank documents", where)
                        text = None
                    yield text or "", len(line)
                return
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        skipped.add("unreadable files", f"{seg.path} ({e})")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        skipped.add("files not UTF-8", f"{seg.path} (byte {e.start})")
        return
    if not text.strip():
        skipped.add("blank documents", seg.path)
        text = ""
    yield text, len(data)


def unit_documents(unit: Iterable[Segment], field: str, skipped: Skipped) -> Iterator[tuple[str, int]]:
    """``segment_documents`` over a unit's segments."""
    for seg in unit:
        yield from segment_documents(seg, field, skipped)


def read_documents(
    spec: str, field: str = "text", max_docs: Optional[int] = None, skipped: Optional[Skipped] = None
) -> list[str]:
    """Documents from ``spec`` (a file, a directory searched recursively, or a glob).

    ``.jsonl``/``.json``(``.gz``): one document per line from ``field``. Anything else
    (``.txt``, ``.txt.gz``, ...): the whole file is one document. Problem inputs are counted in
    ``skipped`` (strict: raised); at most ``max_docs`` documents are returned. Raises
    ``DataError`` when nothing matches.
    """
    files = resolve(spec)
    if not files:
        raise DataError(f"data.path={spec!r} matches no file (give a file, a directory or a glob)")
    skipped = skipped if skipped is not None else Skipped()
    docs: list[str] = []
    for unit in plan_units(files):
        for doc, _ in unit_documents(unit, field, skipped):
            if max_docs is not None and len(docs) >= max_docs:
                return docs
            if doc:
                docs.append(doc)
    return docs


@dataclasses.dataclass(frozen=True)
class PairFields:
    """How JSON records become supervised (input, target) pairs: two text fields, or a
    conversation in ``messages_field`` rendered by ``chat`` (a ``data.chat`` template), a pair per
    assistant turn (``turns="last"``: the final one)."""

    input_field: str = "input"
    target_field: str = "target"
    messages_field: str = "messages"
    chat: Optional[dict] = dataclasses.field(default=None, compare=False)
    turns: str = "all"

    @classmethod
    def of(cls, data_cfg, chat: Optional[dict] = None) -> "PairFields":
        return cls(data_cfg.input_field, data_cfg.target_field, data_cfg.messages_field, chat, data_cfg.chat_turns)

    def key(self) -> str:
        """What the pairs depend on besides the inputs (a prepared shard's name hashes it)."""
        template = hashlib.sha256(self.chat["template"].encode()).hexdigest()[:16] if self.chat else None
        return json.dumps(["pairs", self.input_field, self.target_field, self.messages_field, template, self.turns])

    def portable(self) -> "PairFields":
        """A copy to send to another process (without the compiled template ``data.chat`` caches)."""
        chat = None if self.chat is None else {k: v for k, v in self.chat.items() if not k.startswith("_")}
        return dataclasses.replace(self, chat=chat)

    def of_record(self, record: dict, where: str, skipped: Skipped) -> list[tuple[str, str]]:
        """The pairs of one JSON record (skipped ones counted)."""
        from t5x_lite.data import chat as chat_module

        if self.messages_field in record:
            if self.chat is None:
                skipped.add(f"conversations ({self.messages_field!r}) without data.chat_template", where)
                return []
            try:
                pairs = chat_module.as_pairs(self.chat, record[self.messages_field], self.turns)
            except ValueError as e:
                skipped.add(str(e), where)
                return []
        else:
            texts = _record_fields(record, (self.input_field, self.target_field), where, skipped,
                                   "data.input_field / data.target_field")
            if texts is None:
                return []
            pairs = [tuple(texts)]
        kept = []
        for pair in pairs:
            if not pair[1].strip():
                skipped.add("pairs with a blank target", where)
            else:
                kept.append(pair)
        return kept


def segment_pairs(seg: Segment, fields: PairFields, skipped: Skipped) -> Iterator[tuple[list, int]]:
    """``(pairs of a record, input bytes consumed)`` per line of one segment of a JSON-lines file
    (a line that gives none, ``[]``); any other file is skipped whole."""
    if not is_jsonl(seg.path):
        skipped.add("files not JSON lines (supervised pairs)", seg.path)
        return
    try:
        with _open_binary(seg.path) as f:
            for line, where in _jsonl_lines(seg, f):
                record = _json_object(line, where, skipped) if line.strip() else None
                yield ([] if record is None else fields.of_record(record, where, skipped)), len(line)
    except (OSError, EOFError, zlib.error) as e:
        skipped.add("unreadable files", f"{seg.path} ({e})")


def read_pairs(spec: str, fields: PairFields, max_pairs: Optional[int] = None, skipped: Optional[Skipped] = None,
               groups: Optional[list] = None) -> list[str]:
    """(input, target) pairs from the JSON lines of ``spec``, flattened: ``[input 0, target 0,
    input 1, ...]`` (``PairFields``: a pair needs both fields as strings and a non-blank target,
    an input may be empty, or a conversation its template renders); other lines and
    non-JSON-lines files are counted in ``skipped``. ``groups``, if given, gets each pair's
    record number (a conversation's pairs share one)."""
    files = resolve(spec)
    if not files:
        raise DataError(f"data.path={spec!r} matches no file (give a file, a directory or a glob)")
    skipped = skipped if skipped is not None else Skipped()
    out: list[str] = []
    record_number = 0
    for path in files:
        st = _stat(path)
        for pairs, _ in segment_pairs(Segment(path, 0, st.st_size, st.st_size, st.st_mtime_ns), fields, skipped):
            for pair in pairs:
                if max_pairs is not None and len(out) >= 2 * max_pairs:
                    return out
                out += pair
                if groups is not None:
                    groups.append(record_number)
            record_number += bool(pairs)
    return out


def load_documents(data_cfg, skipped: Optional[Skipped] = None, groups: Optional[list] = None) -> list[str]:
    """The corpus a ``DataConfig`` names: the stdlib docstrings when ``path`` is None, else
    ``read_documents(path, field, max_docs)`` (objective supervised: ``read_pairs``, inputs and
    targets alternating; ``groups`` then gets each pair's record, as ``read_pairs``). Raises
    ``DataError`` if no non-blank document is left."""
    skipped = skipped if skipped is not None else Skipped()
    if data_cfg.objective == "supervised" and data_cfg.path is None:
        docs = stdlib_pairs()
        docs = docs[: 2 * data_cfg.max_docs] if data_cfg.max_docs is not None else docs
        if groups is not None:
            groups.extend(range(len(docs) // 2))
        return docs
    if data_cfg.objective == "supervised":
        from t5x_lite.data import chat

        template = chat.load(data_cfg.chat_template) if data_cfg.chat_template else None
        docs = read_pairs(data_cfg.path, PairFields.of(data_cfg, template), data_cfg.max_docs, skipped, groups)
        if not docs:
            raise DataError(f"data.path={data_cfg.path!r} holds no (input, target) pair with the fields "
                            f"{data_cfg.input_field!r} and {data_cfg.target_field!r}" +
                            (f" (skipped: {skipped})" if skipped else ""))
        return docs
    if data_cfg.path is None:
        docs = [d for d in stdlib_docstrings() if d.strip()]
        if data_cfg.max_docs is not None:
            docs = docs[: data_cfg.max_docs]
        where = "the standard-library docstring corpus"
    else:
        docs = read_documents(data_cfg.path, data_cfg.field, data_cfg.max_docs, skipped)
        where = f"data.path={data_cfg.path!r}"
    if not docs:
        extra = f" (skipped: {skipped})" if skipped else ""
        raise DataError(f"the corpus is empty: {where} holds no non-blank document{extra}")
    return docs


def source_key(data_cfg) -> str:
    """A hash that changes when the documents ``load_documents(data_cfg)`` returns may change:
    the files' sizes and modification times (the stdlib's for the default corpus), the field
    and ``max_docs``. Costs a ``stat`` per file, no reading. Raises ``DataError`` if ``path``
    matches no file."""
    if data_cfg.path is None:
        files, origin = _stdlib_files(), ["stdlib", sys.version, data_cfg.objective == "supervised"]
    else:
        files, origin = resolve(data_cfg.path), ["path", data_cfg.field]
        if data_cfg.chat_template and not os.path.isfile(data_cfg.chat_template):
            raise DataError(f"data.chat_template={data_cfg.chat_template!r} does not exist")
        if data_cfg.objective == "supervised":
            origin = ["pairs", data_cfg.input_field, data_cfg.target_field, data_cfg.messages_field,
                      fingerprint([data_cfg.chat_template]) if data_cfg.chat_template else None]
            if data_cfg.chat_template and data_cfg.chat_turns != "last":  # (keys of earlier caches unchanged)
                origin.append(data_cfg.chat_turns)
        if not files:
            raise DataError(f"data.path={data_cfg.path!r} matches no file (give a file, a directory or a glob)")
    text = json.dumps([origin, data_cfg.max_docs, fingerprint(files)])
    return hashlib.sha256(text.encode()).hexdigest()
