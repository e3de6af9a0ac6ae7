"""How audit records travel and what text the stores take: the data-only JSON of the spool, the journal and the
writer's pipe (never pickle), and the cleaning that lets DuckDB and PostgreSQL hold any client's text."""

from __future__ import annotations

import datetime as dt
import json
import re

from .rows import COLUMNS, END_COLUMNS, JSON_COLUMNS, EndInterception, Insert

_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _escape_surrogate(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}"


def clean_text(v: str) -> str:
    """Text DuckDB can store: lone surrogates (hostile JSON, header bytes decoded with surrogateescape) are
    written as visible escapes (\\xff for an undecodable byte, \\ud800 for a lone surrogate); a NUL, which
    PostgreSQL's text refuses, as \\x00."""
    if "\x00" in v:
        v = v.replace("\x00", "\\x00")
    if v.isascii():
        return v
    try:
        v.encode("utf-8")
        return v
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape_surrogate, v)


def scrub(obj):
    if isinstance(obj, str):
        return clean_text(obj)
    if isinstance(obj, list):
        return [scrub(x) for x in obj]
    if isinstance(obj, dict):
        return {clean_text(k) if isinstance(k, str) else k: scrub(v) for k, v in obj.items()}
    return obj


def clean_json(text: str) -> str:
    """JSON text DuckDB accepts: \\ud800-style escapes of lone surrogates become escaped text."""
    text = clean_text(text)
    if not _JSON_SURROGATE_ESCAPE.search(text):
        return text
    try:
        return json.dumps(scrub(json.loads(text)), ensure_ascii=False)
    except (ValueError, RecursionError):
        return json.dumps({"unparseable": clean_text(text)})


def _clean_values(cols: tuple[str, ...], values) -> list:
    out = list(values)
    for n, v in enumerate(out):
        if isinstance(v, str):
            out[n] = clean_json(v) if cols[n] in JSON_COLUMNS else clean_text(v)
    return out


def _clean_row(table: str, row: tuple) -> list:
    return _clean_values(COLUMNS[table], row)


# --- the spool's data-only format: one JSON array per batch, one line each ------------------------------


def _datetime(v):
    """json.dumps calls this only for what JSON cannot hold itself: the rows' timestamps."""
    if isinstance(v, dt.datetime):
        return {"$t": v.isoformat()}
    raise TypeError(f"{type(v).__name__} is not a record value")


def _unvalue(v):
    return dt.datetime.fromisoformat(v["$t"]) if isinstance(v, dict) else v


def _encode(rec) -> list:
    if isinstance(rec, Insert):
        return ["i", rec.table, rec.row]
    return ["e", rec.id, rec.values]


def encode_batch(batch: list) -> bytes:
    return json.dumps([_encode(r) for r in batch], separators=(",", ":"), default=_datetime).encode()


def decode_batch(line: bytes) -> list:
    return decode_records(json.loads(line))


def decode_records(entries: list) -> list:
    out = []
    for kind, key, values in entries:
        vals = tuple(_unvalue(v) for v in values)
        if kind == "i":
            if key not in COLUMNS:
                raise KeyError(key)
            # A spool written before a migration appended columns lacks their values (NULL, like the migration).
            out.append(Insert(key, vals + (None,) * (len(COLUMNS[key]) - len(vals))))
        else:  # a spool from before a column was added to END_COLUMNS lacks its value
            out.append(EndInterception(key, vals + (None,) * (len(END_COLUMNS) - len(vals))))
    return out
