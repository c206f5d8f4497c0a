"""Turn command-line inputs (directories, files, manifests) into a stream of items.

Manifests are read lazily (CSV/TSV row by row, parquet batch by batch, JSONL line by line), so
a manifest of millions of rows never sits in memory as items.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import storage
from .items import FatalError, Item, valid_text, valid_values

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".csv", ".tsv", ".parquet", ".jsonl", ".ndjson")
# Containers FFmpeg reads are listed by their usual extension: phone recorders write .amr and .3gp,
# audiobooks .m4b, Apple tools .caf, screen and meeting recorders .mkv / .mka / .mov.
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".webm",
                    ".mp4", ".aiff", ".aif", ".au", ".mka", ".mkv", ".mov", ".3gp", ".amr", ".caf", ".m4b",
                    ".wv", ".w64", ".rf64", ".mp2", ".avi")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".heic", ".heif", ".gif", ".bmp",
                    ".tif", ".tiff")

ID_COLUMNS = ("id", "key", "uid", "image_id", "audio_id")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class InputSpec:
    """What to look for in the inputs of one kind of job."""

    extensions: tuple[str, ...]
    path_candidates: tuple[str, ...]
    reference_candidates: tuple[str, ...]
    path_column: str | None = None
    reference_columns: tuple[str, ...] = ()
    id_column: str | None = None
    reserved: tuple[str, ...] = ()  # output column names; carried columns that clash get an ``input_`` prefix
    language_column: str | None = None  # a column giving each item's language (audio)
    language_candidates: tuple[str, ...] = ()  # used when language_column is not given and one is present


def audio_spec(path_column: str | None = None, reference_columns: Sequence[str] = (),
               id_column: str | None = None, language_column: str | None = None) -> InputSpec:
    return InputSpec(
        extensions=AUDIO_EXTENSIONS,
        path_candidates=("path", "audio", "file", "filename", "file_name", "audio_path", "audio_filepath",
                         "url", "audio_url"),
        reference_candidates=("reference", "text", "transcript", "transcription", "sentence",
                              "normalized_text"),
        path_column=path_column, reference_columns=tuple(reference_columns), id_column=id_column,
        language_column=language_column, language_candidates=("language", "lang", "locale"))


def image_spec(path_column: str | None = None, reference_columns: Sequence[str] = (),
               id_column: str | None = None) -> InputSpec:
    return InputSpec(
        extensions=IMAGE_EXTENSIONS,
        path_candidates=("url", "image_url", "img_url", "path", "file", "filename", "file_name", "image",
                         "image_path", "img"),
        reference_candidates=("caption", "reference", "captions", "references", "text", "short_caption"),
        path_column=path_column, reference_columns=tuple(reference_columns), id_column=id_column)


def is_url(source: str) -> bool:
    head = source[:16].lower()
    return "://" in head or head.startswith("data:")


def is_manifest(path: str) -> bool:
    return path.lower().endswith(MANIFEST_EXTENSIONS) and os.path.isfile(path)


@dataclass
class InputStats:
    skipped_files: int = 0  # files in directories with other extensions
    manifests: int = 0
    files: int = 0
    repeated_ids: int = 0  # items whose id an earlier item has: numbered by position (``a#2``)
    unreadable_folders: list[str] = field(default_factory=list)  # folders a walk could not list: no rows
    skipped_extensions: dict[str, int] = field(default_factory=dict)  # skipped_files by extension

    def skip(self, path: str) -> None:
        """A file of another type in an input folder."""
        self.skipped_files += 1
        name = path.rsplit("/", 1)[-1]
        ext = os.path.splitext(name)[1].lower() or "(no extension)"
        self.skipped_extensions[ext] = self.skipped_extensions.get(ext, 0) + 1


def _make_valid(item: Item) -> None:
    """An item's text as valid Unicode (items.valid_text), so that its row can be written and found again
    by a resumed run. A local path keeps its surrogates: they are the file name's bytes, which open it."""
    item.id = valid_text(item.id)
    if is_url(item.source):
        item.source = _url_text(item.source)
    item.references = valid_values(item.references)
    item.extra = valid_values(item.extra)
    if item.language is not None:
        item.language = valid_text(item.language)


def _url_text(url: str) -> str:
    """A URL with a file name's non-UTF-8 bytes (lone surrogates) percent-encoded, as a browser sends them."""
    try:
        url.encode("utf-8")
        return url
    except UnicodeEncodeError:
        raw = url.encode("utf-8", "surrogateescape") if all(
            not "\ud800" <= c <= "\udfff" or "\udc80" <= c <= "\udcff" for c in url) else None
        if raw is None:
            return valid_text(url)
        return "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in raw)


@dataclass
class Inputs:
    """An iterable of items over several inputs; iterate once per run."""

    sources: Sequence[str]
    spec: InputSpec
    stats: InputStats = field(default_factory=InputStats)
    # files and folders the run itself writes (its output and what goes beside it): left out of folder and
    # prefix walks without a word, so that an output put in an input folder is not taken for an input
    exclude: Sequence[str] = ()
    _copies: dict[str, str] = field(default_factory=dict, init=False, repr=False)  # remote manifest -> local copy
    _copy_dir: str | None = field(default=None, init=False, repr=False)

    def check(self) -> None:
        """Fail the whole run early on inputs that cannot be read at all."""
        if not self.sources:
            raise FatalError("no input given")
        for src in self.sources:
            if storage.is_remote(src):
                if src in self.exclude:
                    raise FatalError(f"{src} is both an input and the run's output (or an object beside it): "
                                     "write the results to another object")
                if self._remote_kind(src) == "manifest":
                    self._remote_manifest(src, lambda copy: _peek_columns(copy, self.spec))
                continue
            if is_url(src):
                if urlsplit(src).path.lower().endswith(MANIFEST_EXTENSIONS):  # else fetched as one image
                    raise FatalError(f"{src} looks like a manifest: manifests are read from local files and object "
                                     "stores (s3://, gs://, az://, hf://); download it first")
                continue
            if not os.path.exists(src):
                raise FatalError(f"input not found: {src}")
            if os.path.isdir(src):
                try:
                    with os.scandir(src):
                        pass
                except OSError as exc:  # os.walk would skip it without a word: "nothing to do", exit 0
                    raise FatalError(f"cannot read the input folder {src}: {exc.strerror or exc}") from None
            if os.path.isfile(src) and self._is_own(src):
                raise FatalError(f"{src} is both an input and the run's output (or a file beside it): "
                                 "write the results to another file")
            if is_manifest(src):
                _peek_columns(src, self.spec)  # raises on unknown columns

    def estimate(self) -> int:
        """How many items there are, cheaply (directory walk, parquet metadata, line counts)."""
        total = 0
        seen = _Seen()
        for src in self.sources:
            if storage.is_remote(src):
                total += self._remote_estimate(src)
            elif is_url(src) or not os.path.exists(src):
                total += 1
            elif os.path.isdir(src):
                total += sum(1 for path in walk_files(src, seen, self._own_local())
                             if path.lower().endswith(self.spec.extensions))
            elif is_manifest(src) and src.lower().endswith(".parquet"):
                import pyarrow.parquet as pq

                total += pq.ParquetFile(src).metadata.num_rows
            elif is_manifest(src):
                with open(src, "rb") as f:
                    lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
                total += max(0, lines - (0 if src.lower().endswith((".jsonl", ".ndjson")) else 1))
            else:
                total += 1
        return total

    def __iter__(self) -> Iterator[Item]:
        seen: set[str] = set()
        walked = _Seen()  # folders and files reached through several links (or inputs) are read once
        index = 0
        for src in self.sources:
            for item in self._items(src, walked):
                _make_valid(item)
                given = item.id
                item.id = _free_name(given, seen, "#", str)
                if item.id != given:
                    self._repeated(given, item.id)
                item.index = index
                index += 1
                yield item

    def _repeated(self, given: str, numbered: str) -> None:
        self.stats.repeated_ids += 1
        if self.stats.repeated_ids == 1:
            log.warning("id %r is repeated: read as %r. Repeats are numbered in input order, and a resumed run "
                        "matches rows by id: if the inputs' order changes, it stops rather than take one "
                        "recording for another. Give every row its own id (the summary counts the repeats).",
                        given, numbered)

    def _items(self, src: str, walked: _Seen) -> Iterator[Item]:
        if storage.is_remote(src):
            yield from self._remote_items(src)
        elif is_url(src):
            yield Item(0, src, src)
        elif os.path.isdir(src):
            yield from self._walk(src, walked)
        elif is_manifest(src):
            self.stats.manifests += 1
            yield from _manifest_items(src, self.spec)
        else:
            if not walked.first(src):  # named twice, or also inside a folder given before it: read once
                log.info("%s is already an input; reading it once", src)
                return
            self.stats.files += 1
            yield Item(0, src, src)

    def _own_local(self) -> dict[str, set[str]]:
        """The local paths of ``exclude``: names per real folder (the files need not exist yet)."""
        own: dict[str, set[str]] = {}
        for path in self.exclude:
            if not storage.is_remote(path) and not is_url(path):
                path = os.path.abspath(path)
                own.setdefault(os.path.realpath(os.path.dirname(path)), set()).add(os.path.basename(path))
        return own

    def _is_own(self, path: str) -> bool:
        """Whether the local file ``path`` is one the run writes (``exclude``), by name or as the same file."""
        names = self._own_local().get(os.path.realpath(os.path.dirname(os.path.abspath(path))), set())
        if os.path.basename(path) in names:
            return True
        ident = _identity(path)
        return ident is not None and any(_identity(own) == ident for own in self.exclude
                                         if not storage.is_remote(own) and not is_url(own))

    def _walk(self, root: str, walked: _Seen) -> Iterator[Item]:
        for path in walk_files(root, walked, self._own_local(), self.stats.unreadable_folders):
            if not path.lower().endswith(self.spec.extensions):
                self.stats.skip(path)
                continue
            self.stats.files += 1
            yield Item(0, path, path)

    # --- object stores (s3://, gs://, az://, hf://: batchcap/storage.py) ---------------------------
    # A URL is a manifest (an object with a manifest extension), a prefix walked like a folder, or one
    # item. A manifest is copied to a local temporary file once per Inputs (streamed to disk, never held
    # in memory) and read by the same code as a local one; its relative paths resolve against its prefix.

    def _remote_kind(self, url: str) -> str:
        try:
            found = storage.info(url)
        except storage.StorageError as exc:
            raise FatalError(f"cannot read input: {exc.message}") from None
        if found is None:
            raise FatalError(f"input not found: {url}")
        if found.get("type") == "directory":
            return "prefix"
        return "manifest" if url.lower().endswith(MANIFEST_EXTENSIONS) else "object"

    def _remote_manifest(self, url: str, read: Any) -> Any:
        """``read(local copy)``, with the copy's path replaced by ``url`` in any FatalError."""
        copy = self._copies.get(url)
        if copy is None:
            if self._copy_dir is None:
                self._copy_dir = tempfile.mkdtemp(prefix="batchcap-manifests-")
                weakref.finalize(self, shutil.rmtree, self._copy_dir, True)
            copy = os.path.join(self._copy_dir, str(len(self._copies)), storage.basename(url))
            os.makedirs(os.path.dirname(copy))
            log.info("reading manifest %s", url)
            try:
                storage.download(url, copy)
            except storage.StorageError as exc:
                raise FatalError(f"cannot read manifest: {exc.message}") from None
            self._copies[url] = copy
        try:
            return read(copy)
        except FatalError as exc:
            raise FatalError(str(exc).replace(copy, url)) from None

    def _remote_estimate(self, url: str) -> int:
        kind = self._remote_kind(url)
        if kind == "prefix":
            return sum(1 for obj in storage.walk(url) if obj.lower().endswith(self.spec.extensions))
        if kind == "object":
            return 1
        return self._remote_manifest(url, lambda copy: Inputs([copy], self.spec).estimate())

    def _remote_items(self, url: str) -> Iterator[Item]:
        kind = self._remote_kind(url)
        if kind == "manifest":
            self.stats.manifests += 1
            copy = self._remote_manifest(url, lambda local: local)
            try:
                yield from _manifest_items(copy, self.spec, storage.parent(url))
            except FatalError as exc:  # e.g. a corrupt row group: name the URL, not the copy
                raise FatalError(str(exc).replace(copy, url)) from None
        elif kind == "prefix":
            try:
                own = {p.rstrip("/") for p in self.exclude if storage.is_remote(p)}
                for obj in storage.walk(url):
                    if obj in own or any(obj.startswith(p + "/") for p in own):
                        continue
                    if not obj.lower().endswith(self.spec.extensions):
                        self.stats.skip(obj)
                        continue
                    self.stats.files += 1
                    yield Item(0, obj, obj)
            except storage.StorageError as exc:
                raise FatalError(f"cannot list {url}: {exc.message}") from None
        else:
            self.stats.files += 1
            yield Item(0, url, url)


@dataclass
class _Seen:
    """(st_dev, st_ino) of the folders and files a walk has reached."""

    dirs: set[tuple[int, int]] = field(default_factory=set)
    files: set[tuple[int, int]] = field(default_factory=set)

    def first(self, path: str, folder: bool = False) -> bool:
        """Whether ``path``'s real file (or folder) is reached for the first time, noting it. A path that
        cannot be stat'ed (missing, a broken link) is always first: its row says what is wrong."""
        ident = _identity(path)
        if ident is None:
            return True
        seen = self.dirs if folder else self.files
        if ident in seen:
            return False
        seen.add(ident)
        return True


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: the identity of what the link points to
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk_files(root: str, seen: _Seen | None = None, exclude: dict[str, set[str]] | None = None,
               unreadable: list[str] | None = None) -> Iterator[str]:
    """Files under ``root`` (hidden ones skipped), sorted, following symlinks, each real folder visited once
    and each real file yielded once: a symlink loop (a link to a parent) ends instead of repeating the tree
    until the path is too long, and a file reached through two links is one item. A broken link is yielded
    (its row says the file is missing). ``exclude``: names of files and folders to leave out, per real
    folder path. A folder that cannot be listed (permissions, a stale mount) is a warning, and is added to
    ``unreadable``: its files can have no rows, and the run says so."""
    seen = seen if seen is not None else _Seen()
    if not seen.first(root, folder=True):
        return

    def failed(exc: OSError) -> None:
        if unreadable is not None:  # None: an estimate's walk, which says nothing
            folder = exc.filename if isinstance(exc.filename, str) else root
            log.warning("cannot read the folder %s (%s): its files get no rows", folder, exc.strerror or exc)
            unreadable.append(folder)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=failed):
        skip = exclude.get(os.path.realpath(dirpath), set()) if exclude else set()
        filenames = [name for name in filenames if name not in skip]
        kept = []
        for name in sorted(dirnames):
            if name.startswith(".") or name in skip:
                continue
            if not seen.first(os.path.join(dirpath, name), folder=True):
                log.debug("not walking %s again (reached through a link)", os.path.join(dirpath, name))
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not name.startswith(".") and seen.first(path):
                yield path


def _free_name(name: str, taken: set[str], sep: str = "_", fold: Callable[[str], str] = str.lower) -> str:
    """``name``, or ``name<sep>2``, ``name<sep>3``, ... whichever is not in ``taken`` (names as ``fold`` gives
    them: column names case-blind); added to ``taken``. Item ids: ``_free_name(id, seen, "#", str)``."""
    out, k = name, 2
    while fold(out) in taken:
        out, k = f"{name}{sep}{k}", k + 1
    taken.add(fold(out))
    return out


# --- manifests -------------------------------------------------------------------------------

def _find(columns: Sequence[str], wanted: str) -> str | None:
    by_lower = {c.lower(): c for c in columns}
    return wanted if wanted in columns else by_lower.get(wanted.lower())


@dataclass
class _Layout:
    path: str
    references: tuple[str, ...]
    id: str | None
    language: str | None
    carried: tuple[str, ...]
    renamed: dict[str, str]
    alternates: tuple[str, ...] = ()  # other media columns, read where a row's ``path`` cell is empty


def _layout(columns: Sequence[str], spec: InputSpec, manifest: str) -> _Layout:
    def pick(explicit: str | None, candidates: Sequence[str], what: str, option: str) -> str | None:
        if explicit:
            found = _find(columns, explicit)
            if found is None:
                raise FatalError(f"{manifest}: no column {explicit!r} ({option}); columns are: "
                                 f"{', '.join(columns)}")
            return found
        return next((c for c in (_find(columns, w) for w in candidates) if c), None)

    if not columns:
        raise FatalError(f"{manifest}: no columns (an empty file, a CSV without a header line, or a JSONL "
                         "file without a line that is a JSON object)")
    path = pick(spec.path_column, spec.path_candidates, "path", "--path-column")
    if path is None:
        raise FatalError(f"{manifest}: cannot tell which column holds the media (looked for "
                         f"{', '.join(spec.path_candidates)}); name it with --path-column. Columns are: "
                         f"{', '.join(columns)}")
    if spec.reference_columns:
        refs = tuple(pick(r, (), "reference", "--reference-column") or "" for r in spec.reference_columns)
    else:
        ref = pick(None, [c for c in spec.reference_candidates if c.lower() != path.lower()], "", "")
        refs = (ref,) if ref else ()
    id_col = pick(spec.id_column, ID_COLUMNS, "id", "--id-column")
    language = pick(spec.language_column, spec.language_candidates, "language", "--language-column")
    used = {path, *refs} | ({id_col} if id_col else set()) | ({language} if language else set())
    carried = tuple(c for c in columns if c not in used)
    # a carried column named like an output column gets an input_ prefix, and a number where even that
    # name is taken (a manifest with both status and input_status keeps both)
    taken = {c.lower() for c in carried} | set(spec.reserved)
    renamed = {}
    for c in carried:
        if c.lower() in spec.reserved:
            renamed[c] = _free_name(f"input_{c}", taken)
    # a manifest with both a path and a URL column (say) can have rows with only one of them; an explicit
    # --path-column names the only one
    alternates = () if spec.path_column else tuple(
        c for c in dict.fromkeys(_find(columns, w) for w in spec.path_candidates) if c and c != path)
    return _Layout(path, refs, id_col, language, carried, renamed, alternates)


def _unique_header(header: list[str], manifest: str, warn: bool = True) -> list[str]:
    """A CSV header whose repeated names get a number (``a``, ``a_2``): rows are dicts by column name, so a
    second ``a`` would otherwise replace the first one's values."""
    if len(set(header)) == len(header):
        return header
    taken = {c.lower() for c in header}
    seen: set[str] = set()
    out = []
    for c in header:
        out.append(_free_name(c, taken) if c in seen else c)
        seen.add(c)
    if warn:
        log.warning("manifest %s repeats column names; read as %s", manifest,
                    ", ".join(new for old, new in zip(header, out) if old != new))
    return out


def _peek_columns(manifest: str, spec: InputSpec) -> _Layout:
    return _layout(_read_columns(manifest), spec, manifest)


def _read_columns(manifest: str) -> list[str]:
    low = manifest.lower()
    try:
        if low.endswith(".parquet"):
            import pyarrow.parquet as pq
            return list(pq.ParquetFile(manifest).schema_arrow.names)
        if low.endswith((".jsonl", ".ndjson")):
            return _jsonl_columns(manifest)
        with _open_csv(manifest) as f:
            header = next(csv.reader(f, delimiter=_delimiter(manifest)), [])
        if any(_bad_byte(c) is not None for c in header):
            raise FatalError(f"cannot read manifest {manifest}: its header line is not valid UTF-8 "
                             "(save the manifest as UTF-8)")
        return _unique_header(header, manifest)
    except (OSError, ValueError, csv.Error) as exc:
        raise FatalError(f"cannot read manifest {manifest}: {exc}") from exc


# A manifest record: (line number, row, error). A row that cannot be read has row None and an error
# naming its line; it becomes that item's fetch_error row instead of ending the run.
_Record = tuple[int, dict[Any, Any] | None, str | None]


def _delimiter(manifest: str) -> str:
    """Tabs for .tsv; for .csv commas, or semicolons where the header has them and no comma (what a
    spreadsheet writes where the comma is the decimal mark)."""
    if manifest.lower().endswith(".tsv"):
        return "\t"
    try:
        with _open_csv(manifest) as f:
            header = f.readline()
    except OSError:
        return ","
    return ";" if ";" in header and "," not in header else ","


def _open_csv(manifest: str) -> Any:
    """A CSV manifest as text: UTF-8 (a BOM dropped), any line ending; bytes that are not UTF-8 are kept as
    lone surrogates (``surrogateescape``) so that the one row holding them can be told apart and refused."""
    return open(manifest, newline="", encoding="utf-8-sig", errors="surrogateescape")


def _bad_byte(value: str) -> int | None:
    """The first byte of ``value`` that was not UTF-8 (see :func:`_open_csv`), if any."""
    for ch in value:
        if "\udc80" <= ch <= "\udcff":
            return ord(ch) - 0xDC00
    return None


def _csv_records(manifest: str) -> Iterator[_Record]:
    with _open_csv(manifest) as f:
        # strict: a quote never closed is an error, not a field that swallows every later line as one row
        reader = csv.reader(f, delimiter=_delimiter(manifest), strict=True)
        header = next(reader, None)
        if header is None:
            return
        header = _unique_header(header, manifest, warn=False)  # the names _read_columns gave (and warned of)
        while True:
            line = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # e.g. a field larger than the csv module takes
                if "unexpected end of data" in str(exc):  # nothing after this line can be read as rows
                    raise FatalError(f"{manifest} line {line}: a quoted field is never closed (a stray quote?), "
                                     "so no row after it can be read; fix the manifest") from None
                yield line, None, f"not valid CSV: {exc}"
                continue
            if not values:  # a blank line, as csv.DictReader skips it
                continue
            bad = next(((col, b) for col, b in zip(header, (_bad_byte(v) for v in values)) if b is not None), None)
            if bad is None and len(values) > len(header):
                bad = next((("(extra field)", b) for b in map(_bad_byte, values[len(header):]) if b is not None),
                           None)
            if bad is not None:
                yield line, None, (f"not valid UTF-8 (byte 0x{bad[1]:02X} in column {bad[0]!r}); "
                                   "save the manifest as UTF-8")
                continue
            surplus = [v for v in values[len(header):] if v.strip()]
            if surplus:  # an unquoted comma in a cell: every cell after it is in the wrong column
                yield line, None, (f"{len(values)} fields where the header has {len(header)} (a comma inside a "
                                   "cell that is not quoted?); quote such cells")
                continue
            yield line, dict(zip(header, values)), None  # empty cells past the header (trailing commas) are nothing


def _jsonl_records(manifest: str) -> Iterator[_Record]:
    with open(manifest, "rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line, None, (f"not valid UTF-8 (byte 0x{raw[exc.start]:02X} at column {exc.start + 1}); "
                                   "save the manifest as UTF-8")
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line, None, f"not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            except ValueError as exc:  # e.g. an integer too long to convert
                yield line, None, f"not valid JSON ({exc})"
                continue
            if not isinstance(row, dict):
                yield line, None, f"not a JSON object (a {type(row).__name__})"
                continue
            yield line, row, None


def _jsonl_columns(manifest: str) -> list[str]:
    """Every key of a JSONL manifest's objects, in the order they first appear: a line may leave out
    keys another has (an id, a reference, a carried field that only some rows have)."""
    stat = os.stat(manifest)
    return list(_jsonl_keys(manifest, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _jsonl_keys(manifest: str, mtime_ns: int, size: int) -> tuple[str, ...]:  # one pass per file version
    keys: dict[str, None] = {}
    for _, row, _ in _jsonl_records(manifest):
        if row is not None:
            keys.update(dict.fromkeys(row))
    return tuple(keys)


def _parquet_records(manifest: str) -> Iterator[_Record]:
    import pyarrow.parquet as pq

    n = 0
    try:
        for batch in pq.ParquetFile(manifest).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield n, row, None
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these: a corrupt row group
        raise FatalError(f"cannot read manifest {manifest} after row {n}: {exc}") from exc


def _records(manifest: str) -> Iterator[_Record]:
    low = manifest.lower()
    if low.endswith(".parquet"):
        return _parquet_records(manifest)
    if low.endswith((".jsonl", ".ndjson")):
        return _jsonl_records(manifest)
    return _csv_records(manifest)


# the text field of a reference given as a record (COCO's ``sentences: [{raw, tokens, ...}]``)
REFERENCE_FIELDS = ("raw", "caption", "text", "sentence", "transcript", "transcription", "reference")


def _references(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    refs: list[str] = []
    for col in columns:
        value = row.get(col)
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, dict):
                v = _reference_field(v, col)
            if v is None or isinstance(v, float) and v != v:  # NaN from pandas-written files
                continue
            if str(v).strip():
                refs.append(str(v))
    return refs


def _reference_field(record: dict[str, Any], column: str) -> str | None:
    """The text of a reference record, by its field's name; a record without one stops the run (its repr
    was scored as the reference)."""
    for name in REFERENCE_FIELDS:
        if isinstance(record.get(name), str):
            return record[name]
    raise FatalError(f"reference column {column!r} holds records ({', '.join(map(str, record))}) without a text "
                     f"field ({', '.join(REFERENCE_FIELDS)}): give a column of text")


def _manifest_items(manifest: str, spec: InputSpec, base: str | None = None) -> Iterator[Item]:
    """``base``: where relative paths resolve (default: the manifest's folder; a remote manifest's prefix)."""
    layout = _peek_columns(manifest, spec)
    base = base or os.path.dirname(os.path.abspath(manifest))
    name = os.path.basename(manifest)
    warned = False
    for n, (line, row, error) in enumerate(_records(manifest)):
        if row is None:
            where = f"{name} line {line}"
            if not warned:
                log.warning("manifest %s: %s (the row is reported as fetch_error; further bad lines only in rows)",
                            where, error)
                warned = True
            extra = {layout.renamed.get(c, c): None for c in layout.carried}
            yield Item(0, where, where, extra=extra, error=f"manifest {where}: {error}")
            continue
        source, data, problem = "", None, None
        for column in (layout.path, *layout.alternates):  # a row without a path may have a URL, and so on
            source, data, problem = _media(row.get(column), f"{name}:{n}", base)
            if source or data is not None or problem:
                break
        if layout.id and row.get(layout.id) not in (None, ""):
            item_id = str(row[layout.id])
        else:
            item_id = source if data is None else f"{name}:{n}"
        extra = {layout.renamed.get(c, c): row.get(c) for c in layout.carried}
        yield Item(0, item_id or f"{name}:{n}", source, data=data,
                   references=_references(row, layout.references), extra=extra,
                   language=_text(row.get(layout.language)) if layout.language else None,
                   error=f"manifest {name}:{n}: {problem}" if problem else None)


def _media(value: Any, where: str, base: str) -> tuple[str, bytes | None, str | None]:
    """A manifest's media cell -> (source, embedded bytes, why it cannot be read): a path or URL (relative
    ones resolved against ``base``), bytes (a binary column, or the Hugging Face datasets layout
    ``{"bytes": ..., "path": ...}``); ("", None, None) for an empty cell."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return where, bytes(value), None
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None:
            return str(value.get("path") or where), bytes(data), None
        if value.get("path"):
            return _resolve(str(value["path"]), base), None, None
        if value.get("array") is not None:
            return "", None, ("the cell holds decoded samples ({array, sampling_rate}); batchcap reads encoded "
                              "media: give the file's bytes or its path")
        return "", None, None
    if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
        return "", None, None
    return _resolve(str(value).strip(), base), None, None


def _text(value: Any) -> str | None:
    """A cell as text; None for empty cells (None, NaN, blank)."""
    if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
        return None
    return str(value).strip()


def _resolve(source: str, base: str) -> str:
    if is_url(source) or os.path.isabs(source):
        return source
    if storage.is_remote(base):  # a relative key in a manifest in object storage
        return storage.resolve(base, source)
    return os.path.join(base, os.path.expanduser(source))
