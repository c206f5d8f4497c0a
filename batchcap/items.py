"""The data that flows through a run: items in, rows out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Row statuses. ``ok`` or the stage that failed.
OK = "ok"
FETCH_ERROR = "fetch_error"  # missing file, HTTP error, timeout, too large
DECODE_ERROR = "decode_error"  # not a readable image / audio file, corrupt, bomb, NaN samples
EMPTY = "empty"  # decodable but nothing to transcribe: silence, a clip too short
MODEL_ERROR = "model_error"  # the model failed on this item (e.g. out of memory even alone)
CRASHED = "crashed"  # the process died with this item in flight in two runs (see journal.py)
STATUSES = (OK, FETCH_ERROR, DECODE_ERROR, EMPTY, MODEL_ERROR, CRASHED)


def valid_text(text: str) -> str:
    """``text`` as valid Unicode, which every table format can hold. A file name that is not UTF-8 is read
    by Python with its bytes as lone surrogates (``caf\\udce9.wav``), and JSON may escape one (a cut emoji,
    ``"\\ud83d"``); Arrow and UTF-8 refuse both. They are written as escapes: ``caf\\xe9.wav``, ``\\ud83d``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(_escaped(c) if "\ud800" <= c <= "\udfff" else c for c in text)


def _escaped(surrogate: str) -> str:
    code = ord(surrogate)
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def valid_values(value: Any) -> Any:
    """``value`` with :func:`valid_text` applied to every string in it (lists and dicts included)."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, list):
        return [valid_values(v) for v in value]
    if isinstance(value, dict):
        return {valid_values(k): valid_values(v) for k, v in value.items()}
    return value


class ItemError(Exception):
    """A failure that belongs to one item: it becomes that item's row, the run goes on."""

    def __init__(self, status: str, message: str, http_status: int | None = None,
                 fields: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.http_status = http_status
        self.fields = fields or {}  # what is known of the item anyway (e.g. duration_s of a silent clip)


class FatalError(Exception):
    """A failure of the whole run (bad option, missing manifest, model that won't load)."""


@dataclass
class Item:
    """One input: a file, a URL, or bytes embedded in a manifest."""

    index: int  # position in input order (over all inputs)
    id: str  # stable id: the manifest's id column, else the path / URL (made unique)
    source: str  # path or URL as given (for embedded bytes: the embedded path or "<bytes>")
    data: bytes | None = None  # embedded bytes (Hugging Face datasets layout)
    references: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # carried manifest columns
    # Why no item could be formed from its input (e.g. "manifest line 7: not valid JSON"); the fetch
    # stage turns it into the item's fetch_error row.
    error: str | None = None
    language: str | None = None  # the recording's language when the manifest says (audio)


@dataclass
class Fetched:
    """Bytes of one item, or why there are none."""

    data: bytes | None
    http_status: int | None = None
    error: str | None = None
    status: str = OK

    @property
    def size(self) -> int:
        """Bytes held (for budgeting bytes in flight); never more than the fetcher's ``max_bytes``."""
        return len(self.data) if self.data is not None else 0
