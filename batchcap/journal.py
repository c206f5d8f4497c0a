"""Crash-loop protection: which items were in flight when a run died, and how often.

A run appends ``+id`` when an item starts being decoded or predicted (the work that can take a
process down) and ``-id`` when that is over, to
``OUT.parts/inflight-<run>.log`` (flushed to the OS after each line, so ``kill -9`` and the OOM
killer lose nothing), and deletes the file when it ends by any Python path (done, error, Ctrl-C,
SIGTERM). A log still there when the next run starts belongs to a run that died (OOM, a segfault in
a decoder, ``kill -9``): the ids it holds without a ``-`` were in flight. Each such death is
counted per id in ``OUT.parts/suspects.json``, with the names of the logs counted, so a run that dies
between writing that file and removing the logs (a kill lands anywhere) does not count them twice.

The next run then keeps those items out of its batches and does each of them alone at the end,
so one poisonous file cannot take a batch (or the whole run) down with it, and a second death is
pinned on it. An item that was in flight in two runs that died gets a row ``status=crashed``
instead of being tried a third time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from typing import IO

from .fsutil import atomic_write
from .items import FatalError

log = logging.getLogger(__name__)

CRASH_LIMIT = 2  # deaths with an item in flight before it is given up on
SUSPECTS = "suspects.json"
SUSPECTS_FORMAT = "batchcap-suspects-2"


class Journal:
    def __init__(self, parts_dir: str):
        self.dir = parts_dir
        self.path = os.path.join(parts_dir, f"inflight-{uuid.uuid4().hex[:12]}.log")
        self.suspects: dict[str, int] = {}  # id -> deaths of earlier runs with it in flight
        self._file: IO[str] | None = None
        self._lock = threading.Lock()  # decode threads and the main thread write

    def open(self, reset: bool = False) -> None:
        """Count the deaths of earlier runs (``reset``: forget them, e.g. ``--retry-failed``)."""
        os.makedirs(self.dir, exist_ok=True)
        suspects_path = os.path.join(self.dir, SUSPECTS)
        counted: set[str] = set()  # logs of dead runs already counted (and not removed yet)
        if not reset:
            try:
                with open(suspects_path, encoding="utf-8") as f:
                    self.suspects, counted = _load_suspects(json.load(f))
            except FileNotFoundError:
                pass
            except (OSError, ValueError, AttributeError, TypeError) as exc:
                log.warning("ignoring an unreadable %s: %s", suspects_path, exc)
        dead = sorted(n for n in os.listdir(self.dir) if n.startswith("inflight-") and n.endswith(".log"))
        for name in dead:
            if name in counted:  # the run that counted it died before removing it
                continue
            in_flight = _replay(os.path.join(self.dir, name))
            if in_flight and not reset:
                log.warning("an earlier run died with %d item(s) in flight; they will be done one at a time",
                            len(in_flight))
                for item_id in in_flight:
                    self.suspects[item_id] = self.suspects.get(item_id, 0) + 1
        if dead or reset or counted:
            record = {"format": SUSPECTS_FORMAT, "deaths": self.suspects, "counted": dead}
            atomic_write(suspects_path, json.dumps(record))
            for name in dead:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.dir, name))
        try:
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise FatalError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def deaths(self, item_id: str) -> int:
        return self.suspects.get(item_id, 0)

    def enter(self, item_id: str) -> None:
        self._write("+" + json.dumps(item_id) + "\n")  # JSON: an id may hold any character, newlines too

    def leave(self, item_id: str) -> None:
        self._write("-" + json.dumps(item_id) + "\n")

    def _write(self, line: str) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.write(line)
                    self._file.flush()
                except OSError as exc:  # a full disk: the run goes on (its next part says so) unprotected
                    log.warning("cannot write %s (%s): crash-loop protection is off for the rest of this run",
                                self.path, exc.strerror or exc)
                    self._close()

    def close(self) -> None:
        """This run did not die: its log goes."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # what a full disk left in its buffer is of no use
                self._file.close()
            self._file = None
            with contextlib.suppress(OSError):
                os.remove(self.path)


def _load_suspects(data: object) -> tuple[dict[str, int], set[str]]:
    """(deaths per id, names of the logs counted) from ``suspects.json`` (also the older flat form)."""
    if isinstance(data, dict) and data.get("format") == SUSPECTS_FORMAT:
        return ({str(k): int(v) for k, v in data.get("deaths", {}).items()},
                {str(n) for n in data.get("counted", [])})
    if not isinstance(data, dict):
        raise ValueError("not an object")
    return {str(k): int(v) for k, v in data.items()}, set()


def _replay(path: str) -> set[str]:
    in_flight: set[str] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):  # cut short by the death
                    continue
                try:
                    sign, item_id = line[:1], str(json.loads(line[1:]))
                except ValueError:
                    continue
                if sign == "+":
                    in_flight.add(item_id)
                elif sign == "-":
                    in_flight.discard(item_id)
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
    return in_flight
