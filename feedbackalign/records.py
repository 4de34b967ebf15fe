"""Reading upstream records: JSON Lines (plain or gzip), JSON arrays, Parquet and hub rows, each as a `Record`
that knows its file and number, so every malformed field fails with one `DataError` naming file, record and field.
"""

from __future__ import annotations

import gzip
import json
import math
import warnings
import zlib
from pathlib import Path
from typing import Iterator, Optional

from feedbackalign.errors import DataError
from feedbackalign.feedback import ROLES


class SkippedRecordsWarning(UserWarning):
    """Upstream records left out by a documented rule (one warning per rule, with the count)."""


# ---------------------------------------------------------------- records and their errors


class Record:
    """One upstream record and where it came from, so every error names the file, the record and the field."""

    def __init__(self, data, origin: str, number: int, unit: str):
        self.origin, self.number, self.unit = origin, number, unit
        if not isinstance(data, dict):
            raise DataError(f"{self.where}: expected a JSON object, got {type(data).__name__}: one record per line")
        self.data = data

    @property
    def where(self) -> str:
        return f"{self.origin}, {self.unit} {self.number}"

    @property
    def source(self) -> str:
        return f"{self.origin}:{self.number}"

    def fail(self, field: str, problem: str) -> DataError:
        return DataError(f"{self.where}: field '{field}' {problem}")


def get_field(rec: Record, obj: dict, key: str, types, what: str, path: str = "", optional: bool = False):
    """obj[key] checked against `types`; a missing or wrong-typed value raises naming record and field."""
    path = path or key
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return None
        raise rec.fail(path, f"is missing: add {what}")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise rec.fail(path, f"should be {what}, got {type(value).__name__} {short_repr(value)}")
    return value


def short_repr(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def text_field(rec: Record, obj: dict, key: str, path: str = "", optional: bool = False) -> Optional[str]:
    return get_field(rec, obj, key, str, "a string", path, optional)


def number_field(rec: Record, obj: dict, key: str, path: str = "", optional: bool = False) -> Optional[float]:
    """A finite number (int or float, not bool); NaN or inf raises."""
    value = get_field(rec, obj, key, (int, float), "a number", path, optional)
    if value is not None and not math.isfinite(value):
        raise rec.fail(path or key, f"is {value}: scores must be finite numbers")
    return None if value is None else float(value)


def nonempty_text(rec: Record, path: str, text: str) -> str:
    if not text.strip():
        raise rec.fail(path, "is empty: every prompt and response needs text")
    return text


def turns_field(rec: Record, obj: dict, key: str) -> list[dict]:
    """A chat as a list of {"role", "content"} turns (roles system/user/assistant)."""
    turns = get_field(rec, obj, key, list, "a list of {role, content} turns")
    if not turns:
        raise rec.fail(key, "is an empty list: give at least one turn")
    out = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise rec.fail(where, f"should be a {{role, content}} object, got {type(turn).__name__}")
        role = text_field(rec, turn, "role", f"{where}.role")
        if role not in ROLES:
            raise rec.fail(f"{where}.role", f"is '{role}': use one of {', '.join(ROLES)}")
        out.append({"role": role, "content": text_field(rec, turn, "content", f"{where}.content")})
    return out


class Skips:
    """Counts records skipped by each rule and warns once per rule (count + first place)."""

    def __init__(self, name: str):
        self.name, self.counts, self.first = name, {}, {}

    def __call__(self, rule: str, where: str) -> None:
        self.counts[rule] = self.counts.get(rule, 0) + 1
        self.first.setdefault(rule, where)

    def warn(self) -> None:
        for rule, n in self.counts.items():
            warnings.warn(f"{self.name}: skipped {n} {rule} (first: {self.first[rule]})", SkippedRecordsWarning, 3)


# ---------------------------------------------------------------- reading files and the hub


def read_file(path: Path) -> Iterator[Record]:
    """Records of one local file: JSON Lines (.jsonl, .jsonl.gz, or a .json holding one object per line),
    a JSON array (a .json starting with '['), or Parquet. Numbers are 1-based lines / items / rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file: check the path (and data_dir)")
    if path.name.endswith(".parquet"):
        return _parquet_records(path)
    if path.name.endswith(".json") and _first_byte(path) == b"[":
        return _array_records(path)
    return _line_records(path)


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _first_byte(path: Path) -> bytes:
    try:
        with _open(path) as f:
            return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot be read ({e}): re-download or re-compress the file") from None


def _json(raw: bytes, where: str, whole_file: bool = False):
    """Strict UTF-8 + JSON; either failure is one DataError (for a whole file, naming the line)."""
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        place = f"{where}, line {line}" if whole_file else where
        raise DataError(f"{place}: not valid UTF-8 (byte {raw[e.start]:#04x}): re-save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        place = f"{where}, line {e.lineno}" if whole_file else where
        raise DataError(f"{place}: malformed JSON ({e.msg} at column {e.colno}): fix or remove it") from None


def _line_records(path: Path) -> Iterator[Record]:
    number = 0
    try:
        with _open(path) as f:
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    yield Record(_json(raw, f"{path}, line {number}"), str(path), number, "line")
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot be read after line {number} ({e}): re-download the file") from None


def _array_records(path: Path) -> Iterator[Record]:
    with _open(path) as f:
        items = _json(f.read(), str(path), whole_file=True)
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of records or one JSON object per line")
    for number, item in enumerate(items, 1):
        yield Record(item, str(path), number, "record")


def _parquet_records(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}): re-download it") from None
    for number, row in enumerate(rows, 1):
        yield Record(row, str(path), number, "row")


def hub_dataset(hub_id: str, label: str | None = None, **kwargs):
    """`datasets.load_dataset(hub_id, **kwargs)` (a hub id or a local copy of a hub repository); any failure,
    offline included, is one DataError naming `label` (default: the hub id)."""
    try:
        import datasets

        return datasets.load_dataset(hub_id, **kwargs)
    except Exception as e:  # offline, unknown id, config or split, network: all end in one clear line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        details = ", ".join(f"{label} {kwargs[key]}" for key, label in (("name", "config"), ("split", "split"))
                            if kwargs.get(key))
        what = f"{label or hub_id} ({details})" if details else label or hub_id
        raise DataError(f"could not load {what} from the Hugging Face hub: {reason}. Offline? Download the "
                        f"upstream files and pass data_dir (layout: docs/data_formats.md)") from None


def row_records(rows, origin: str) -> Iterator[Record]:
    """Hub rows as Records (numbered from 1) for the same parsers as local files."""
    for number, row in enumerate(rows, 1):
        yield Record(row, origin, number, "row")


def hub_records(hub_id: str, split: str, **kwargs) -> Iterator[Record]:
    """Rows of a hub dataset's split via `datasets.load_dataset`, as Records."""
    return row_records(hub_dataset(hub_id, split=split, **kwargs), f"{hub_id}[{split}]")
