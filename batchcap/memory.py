"""glibc malloc settings for long batch runs (Linux).

A run allocates and frees tensors of a few hundred kB to tens of MB on the model thread while
decode threads allocate audio and feature arrays. With glibc's defaults two things keep freed memory
in the process: every thread that allocates gets its own arena (up to 8 per core), and the mmap
threshold rises to the size of the largest block freed so far (up to 32 MB), after which big tensors
are carved from the arenas' heaps and their pages stay resident when freed, scattered between
live blocks. Fixing the threshold (blocks above it are mapped and unmapped, their pages returned
at once) and capping the arenas took the peak RSS of ``batchcap audio`` on the 563-clip English
benchmark (whisper-tiny.en, CPU) from 1.92 GB to the figure in the README's memory table.

Settings the user made through glibc's own environment variables (MALLOC_ARENA_MAX,
MALLOC_MMAP_THRESHOLD_) are left alone; BATCHCAP_MALLOC=0 turns this off.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD = 256 * 1024


@functools.cache
def tune_malloc() -> bool:
    """Apply the settings once per process; False where they do not apply (not glibc, turned off)."""
    if not sys.platform.startswith("linux") or os.environ.get("BATCHCAP_MALLOC", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = []
    if "MALLOC_ARENA_MAX" not in os.environ and mallopt(M_ARENA_MAX, ARENA_MAX) == 1:
        applied.append(f"arena_max={ARENA_MAX}")
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1:
        applied.append(f"mmap_threshold={MMAP_THRESHOLD}")
    log.debug("malloc: %s", ", ".join(applied) or "left as set")
    return bool(applied)
