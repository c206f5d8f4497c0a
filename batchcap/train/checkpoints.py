"""The output directory of a fine-tune: the guard against training over an earlier run, crash-safe directory
swaps for checkpoints, and ``training.json``.

A checkpoint directory is replaced in three steps: the new one is written completely (and fsynced) under
``NAME.tmp``; the current one is renamed ``NAME.old``; ``NAME.tmp`` is renamed ``NAME``; ``NAME.old`` is
deleted. Whenever the process dies, ``NAME`` or ``NAME.old`` holds a complete checkpoint, and
:func:`recover_dir` (run before every resume) puts ``NAME.old`` back when ``NAME`` is missing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from typing import Any

from ..fsutil import atomic_write, fsync_dir, fsync_path
from ..items import FatalError

log = logging.getLogger(__name__)

INFO_FILE = "training.json"


def replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``; an interruption leaves the old one or the new one."""
    for root, _, names in os.walk(tmp_dir):
        for name in names:
            fsync_path(os.path.join(root, name))
    old = f"{final_dir}.old"
    if os.path.exists(final_dir):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final_dir, old)
    # else: a crash may have left the last good checkpoint in ``old``: it stays until the new one is in place
    os.replace(tmp_dir, final_dir)
    fsync_dir(os.path.dirname(os.path.abspath(final_dir)))
    if os.path.exists(old):
        shutil.rmtree(old)


def recover_dir(final_dir: str) -> bool:
    """Undo a swap that a crash cut between its two renames: ``final_dir.old`` back to ``final_dir``."""
    old = f"{final_dir}.old"
    if os.path.isdir(final_dir) or not os.path.isdir(old):
        return False
    log.warning("%s is missing but %s is there (a run stopped while saving a checkpoint): using it",
                final_dir, os.path.basename(old))
    os.replace(old, final_dir)
    return True


def fresh_dir(path: str) -> str:
    """``path`` emptied (a leftover of an interrupted save is removed) and created."""
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def prepare_out_dir(out_dir: str, *, resume: bool, overwrite: bool, markers: Sequence[str]) -> None:
    """Create ``out_dir``; refuse to train into one that holds an earlier run unless --resume or --overwrite."""
    if resume and overwrite:
        raise FatalError("--resume and --overwrite exclude each other")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FatalError(f"output {out_dir} exists and is not a directory")
    candidates = [m for name in markers for m in (name, f"{name}.old")]
    found = [m for m in candidates if os.path.exists(os.path.join(out_dir, m))]
    if found and overwrite:
        for marker in found:
            path = os.path.join(out_dir, marker)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif found and not resume:
        raise FatalError(f"{out_dir} already holds a training run ({', '.join(found)}): pass --resume to continue "
                         "it or --overwrite to start over")
    os.makedirs(out_dir, exist_ok=True)


def write_info(out_dir: str, info: dict[str, Any]) -> None:
    """``training.json``: what was trained on what, how, and the outcome (options as JSON-able values)."""
    atomic_write(os.path.join(out_dir, INFO_FILE), json.dumps(jsonable(info), indent=2))


def jsonable(value: Any) -> Any:
    """``value`` with whatever JSON cannot hold (dataclass values such as FetchConfig's, paths...) as text."""
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {k: jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [jsonable(v) for v in value]
        return str(value)
