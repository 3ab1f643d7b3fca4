"""JSONL/JSON input and output shared by every stage.

Reading is strict: a malformed line, a non-object line, a record missing a required field or an empty
file is a :class:`~w2s_jax.core.errors.UserError` naming ``path:line`` (and the field). A UTF-8 byte order
mark at the start of a file is accepted.

One rule for the format, reading and writing alike: a path ending in ``.json`` holds one JSON list of
objects, any other path holds JSONL (one object per line). Streamed outputs (:class:`JsonlAppender`)
are JSONL only; their commands refuse a ``.json`` output before doing any work
(:func:`check_streamable`).

Writing is atomic: records go to a temporary file in the destination directory that is then
``os.replace``-d over the destination, so a failed or killed run never leaves a partial output file;
the file gets the mode the process umask gives a new file. A write that fails (disk full, read-only
file system, a parent that is a file) is a UserError naming the path. Streaming generation uses
:class:`JsonlAppender` (flush + fsync per record) and resumes with :func:`read_done_ids`, which drops a
final partial line left by a killed process, after checking that everything before it is valid (a
file that is not a valid output is refused unchanged).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError

__all__ = [
    "read_jsonl",
    "write_jsonl_atomic",
    "write_json_atomic",
    "JsonlAppender",
    "read_done_ids",
    "check_unique_ids",
    "check_streamable",
    "scan_stream",
    "write_text_atomic",
]


def _check_record(obj: Any, where: str, required: Sequence[str]) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in required:
        if field not in obj:
            raise UserError(f"{where}: record is missing required field `{field}`")
    return obj


def read_jsonl(
    path: str | os.PathLike, required: Sequence[str] = (), allow_empty: bool = False
) -> list[dict]:
    """Read a ``.jsonl`` file (one object per line) or a ``.json`` file (a list of objects).

    Blank lines are skipped. Errors name ``path:line`` (1-based; for ``.json``, ``path[item]``).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    records: list[dict] = []
    if p.suffix.lower() == ".json":
        try:
            with p.open(encoding="utf-8-sig") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{e.lineno}: malformed JSON: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{p}: not UTF-8 text: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]  # {"data": [...]} as some releases ship
        if not isinstance(data, list):
            raise UserError(f"{p}: expected a JSON list of objects, got {type(data).__name__}")
        for i, obj in enumerate(data):
            records.append(_check_record(obj, f"{p}[{i}]", required))
    else:
        with p.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{p}:{lineno}: not UTF-8 text: {e}") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{p}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})"
                    ) from None
                records.append(_check_record(obj, f"{p}:{lineno}", required))
    if not records and not allow_empty:
        raise UserError(f"{p}: file has no records")
    return records


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _write_error(p: Path, e: OSError) -> UserError:
    return UserError(f"{p}: cannot write: {e.strerror or e}")


def _make_parent(p: Path) -> None:
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{p}: cannot write: a parent of it is a file, not a directory") from None
    except OSError as e:
        raise _write_error(p.parent, e) from None


def _atomic_write_text(path: str | os.PathLike, write_fn) -> None:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected a file path")
    _make_parent(p)
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(p, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _write_error(p, e) from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (same guarantees as :func:`write_jsonl_atomic`)."""
    _atomic_write_text(path, lambda f: f.write(text))


def is_json_array_path(path: str | os.PathLike) -> bool:
    """True when ``path`` names a JSON-list file (suffix ``.json``), False for JSONL."""
    return Path(path).suffix.lower() == ".json"


def check_streamable(path: str | os.PathLike, flag: str = "--output") -> None:
    """Refuse a ``.json`` path for an output that is streamed as JSONL (before any work is done)."""
    if is_json_array_path(path):
        raise UserError(f"{flag} {path}: this output is streamed as JSONL, one record per line; name it .jsonl "
                        "(a .json file is read as one JSON list)")


def _dumps(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write ``records`` one per line to ``path`` atomically (temp file in the same dir + ``os.replace``);
    a ``.json`` path gets one JSON list instead (one record per line inside it), as :func:`read_jsonl`
    reads it."""
    as_list = is_json_array_path(path)

    def write(f):
        if as_list:
            f.write("[\n")
        for i, r in enumerate(records):
            if as_list and i:
                f.write(",\n")
            f.write(_dumps(r))
            if not as_list:
                f.write("\n")
        if as_list:
            f.write("\n]\n")

    _atomic_write_text(path, write)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""

    def write(f):
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")

    _atomic_write_text(path, write)


def _repair_tail(p: Path) -> None:
    """Make ``p`` end at a line boundary: a final partial line (no newline) that does not parse as a
    JSON object is truncated away; one that does parse gets its newline."""
    size = p.stat().st_size
    if size == 0:
        return
    with p.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # find the start of the last line
        chunk = 1 << 16
        pos = size
        start = 0
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step)
            k = buf.rfind(b"\n")
            if k >= 0:
                start = pos + k + 1
                break
        f.seek(start)
        tail = f.read()
        try:
            ok = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if ok:
            f.seek(size)
            f.write(b"\n")
        else:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def scan_stream(path: str | os.PathLike, required: Sequence[str] = ("id",)) -> list[dict]:
    """The records of a streamed JSONL output, checked without changing the file: every line must be a
    JSON object with the ``required`` fields, except a final line without its newline (a process killed
    mid-write), which is ignored here. Anything else is a UserError naming ``path:line``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: not a file")
    check_streamable(p)
    out: list[dict] = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            last = not raw.endswith(b"\n")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if last and raw.lstrip().startswith(b"{"):  # a record cut short by a kill
                    break
                raise UserError(f"{p}:{lineno}: not a valid output line ({e}); refusing to change this file "
                                "(choose another output)") from None
            if last and not isinstance(obj, dict):
                break
            try:
                out.append(_check_record(obj, f"{p}:{lineno}", required))
            except UserError as e:
                raise UserError(f"{e}; refusing to change this file (choose another output)") from None
    return out


def read_done_ids(path: str | os.PathLike, key: str = "id") -> set:
    """Ids already written to a (possibly partial) streaming output file; empty set if absent.

    A final line without its newline (a process killed mid-write) is truncated away from the file
    (or completed, when it is a whole JSON object). Any other malformed line is an error.
    """
    p = Path(path)
    if not p.exists():
        return set()
    scan_stream(p, (key,))  # validate first: a file that is not an output is left as it is
    _repair_tail(p)
    done: set = set()
    for r in read_jsonl(p, required=(key,), allow_empty=True):
        done.add(r[key])
    return done


class JsonlAppender:
    """Append records one by one to a JSONL file, flushed and fsync-ed after each record.

    Usage::

        done = read_done_ids(out)
        with JsonlAppender(out) as app:
            for rec in work:
                if rec["id"] not in done:
                    app.write(result_for(rec))
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = None
        self.count = 0

    def __enter__(self) -> JsonlAppender:
        check_streamable(self.path)
        _make_parent(self.path)
        try:
            if self.path.exists():
                scan_stream(self.path, ())
                _repair_tail(self.path)
            self._f = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise _write_error(self.path, e) from None
        return self

    def write(self, record: dict) -> None:
        if self._f is None:
            raise RuntimeError("JsonlAppender used outside its `with` block")
        # one write call per record: a kill leaves at most one partial final line
        try:
            self._f.write(_dumps(record) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            raise _write_error(self.path, e) from None
        self.count += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __exit__(self, *exc) -> None:
        self.close()


def check_unique_ids(records: Sequence[dict], path: str | os.PathLike, key: str = "id") -> None:
    """Raise a UserError naming the first duplicate ``key`` value (and both record positions)."""
    seen: dict[Any, int] = {}
    for i, r in enumerate(records):
        if key not in r:
            raise UserError(f"{path}: record {i + 1} is missing `{key}`")
        v = r[key]
        try:
            hash(v)
        except TypeError:
            raise UserError(f"{path}: record {i + 1} has an unhashable `{key}`: {v!r}") from None
        if v in seen:
            raise UserError(f"{path}: duplicate {key} {v!r} (records {seen[v] + 1} and {i + 1})")
        seen[v] = i
