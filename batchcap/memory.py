"""glibc malloc settings for long batch runs (Linux).

A run allocates and frees tensors of a few hundred kB to tens of MB on the model thread while
decode threads allocate audio and feature arrays. With glibc's defaults two things keep freed memory
in the process: every thread that allocates gets its own arena (up to 8 per core), and the mmap
threshold rises to the size of the largest block freed so far (up to 32 MB), after which big tensors
are carved from the arenas' heaps and their pages stay resident when freed, scattered between
live blocks. Capping the arenas, and giving the heaps' free pages back after every model batch
(``release_free_heap``), keep that in check. The mmap threshold is fixed at 16 MB: blocks above it
are mapped and unmapped (their pages returned at once, zeroed again on the next use), blocks below
it come from the heaps. An earlier round fixed it at 256 kB, with no trimming: every tensor of a
decoding step was then mapped, faulted in and unmapped, and the kernel's share of the run was 35 s
of a 75 s run (whisper-tiny.en, the 563-clip English benchmark, 2 cores); at 16 MB, with the
heaps trimmed after each batch, 14 s, the run 1.1-1.2x faster at about the same peak RSS (the
README's memory table). Trimming inside a batch as well (every 0.25 s, or whenever RSS had grown by
64 MB) lowered that peak by ~90 MB but made the run 5-7 % slower: not done. The caches of compiled
oneDNN kernels behind bf16 matmuls are capped here too (``limit_onednn_cache``).

Settings the user made through glibc's own environment variables (MALLOC_ARENA_MAX,
MALLOC_MMAP_THRESHOLD_) are left alone; BATCHCAP_MALLOC=0 turns this off.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Collection
from typing import Any

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD = 16 * 1024 * 1024


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


def torch_huge_pages() -> bool:
    """Ask PyTorch to back its CPU tensors of 2 MB and more with transparent huge pages
    (``THP_MEM_ALLOC_ENABLE=1``: PyTorch then ``madvise(MADV_HUGEPAGE)``s them). Called by the CLI before
    anything imports torch, since PyTorch reads the variable once. The encoder's activations and the
    decoder's caches are tensors of tens of MB, allocated and freed every batch; above the mmap threshold
    each is mapped afresh, and faulting it in 4 kB pages is kernel time: on a 2-core AMD EPYC (Zen 3, AVX2)
    VM, 140 English clips with whisper-tiny.en took 10.4 s of system time in a 38-40 s run, and 5.7-6.2 s in
    a 35.5-36.3 s run with huge pages, at the same peak RSS (1.16 GB). False where it does not apply: not
    Linux, turned off (``BATCHCAP_MALLOC=0``), set by the user already, or torch imported already."""
    if not sys.platform.startswith("linux") or os.environ.get("BATCHCAP_MALLOC", "1") == "0":
        return False
    if "THP_MEM_ALLOC_ENABLE" in os.environ or "torch" in sys.modules:
        return False
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return True


@functools.cache
def _malloc_trim() -> Any:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def release_free_heap() -> bool:
    """Give the free pages inside malloc's heaps back to the kernel (glibc's ``malloc_trim``); called
    after each model batch. A batch frees thousands of blocks under the mmap threshold, scattered
    between live ones, and glibc keeps their pages: whisper-tiny.en on the 563 English clips ended
    with ~190 MB of free heap resident. Trimming after each batch took that run's peak RSS from
    1,250-1,275 to 1,117-1,124 MB (with the 256 kB mmap threshold of an earlier round) at no measurable
    cost, a few ms per batch. False where it does not apply."""
    if not sys.platform.startswith("linux") or os.environ.get("BATCHCAP_MALLOC", "1") == "0":
        return False
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def decoded_nbytes(value: Any, _seen: set[int] | None = None, _depth: int = 0) -> int:
    """The bytes an item's decoded value holds: its NumPy arrays and torch tensors (each buffer counted
    once, views included), byte strings, and what dataclasses, dicts, lists and tuples hold of those.
    Used by the local engine's budget of decoded bytes in flight; other objects count nothing."""
    seen = set() if _seen is None else _seen
    if value is None or _depth > 8 or isinstance(value, (bool, int, float, complex)):
        return 0
    if isinstance(value, (bytes, bytearray)):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return len(value)
    if isinstance(value, memoryview):
        return decoded_nbytes(value.obj, seen, _depth + 1) if value.obj is not None else value.nbytes
    if isinstance(value, str):
        return 0  # a language code, a path: not what a budget of decoded data is about
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        base = value
        while isinstance(base.base, np.ndarray):
            base = base.base
        if id(base) in seen:
            return 0
        seen.add(id(base))
        if base.base is not None and not isinstance(base.base, np.ndarray):  # a view of a buffer we can measure
            return max(base.nbytes, decoded_nbytes(base.base, seen, _depth + 1))
        return int(base.nbytes)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = storage.data_ptr() or id(storage)
        if key in seen:
            return 0
        seen.add(key)
        return int(storage.nbytes())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(decoded_nbytes(getattr(value, f.name), seen, _depth + 1) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(decoded_nbytes(v, seen, _depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(decoded_nbytes(v, seen, _depth + 1) for v in value)
    return 0


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim the range's pages now (file pages are dropped, read again on use)
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def mapped_checkpoint_ranges() -> list[tuple[int, int, str]]:
    """(start, end, path) of every memory mapping of a checkpoint file in this process (Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n").endswith(CHECKPOINT_SUFFIXES):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end, fields[5].rstrip("\n")))
    except OSError:
        return []
    return ranges


def release_checkpoint_pages(keep: Collection[str] = ()) -> int:
    """Ask the kernel to drop the resident pages of memory-mapped checkpoint files (but those of the
    paths in ``keep``: mapped before this model loaded); returns the bytes of mappings advised (0 where
    this does not apply).

    transformers maps safetensors checkpoints and reads every weight once while loading. A model whose
    matmul weights were then cast to bfloat16 (``cast_matmul_weights``) reads the float32 mapping only
    for what stays float32 (norms, positional and token embedding rows), yet all of its pages stay
    resident: 144 MB of RSS for whisper-tiny.en, 290 MB for whisper-base. MADV_PAGEOUT reclaims them
    without changing what the mapping holds: a page is read back from the file when touched again,
    and a page written in memory (copy-on-write) is kept or swapped, never lost.
    """
    if not sys.platform.startswith("linux") or os.environ.get("BATCHCAP_MALLOC", "1") == "0":
        return 0
    try:
        madvise = ctypes.CDLL("libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, end, path in mapped_checkpoint_ranges():
        if path in keep:
            continue
        if madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
        else:
            log.debug("madvise(MADV_PAGEOUT) on %s failed: errno %d", path, ctypes.get_errno())
    return advised


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 64
IDEEP_CACHE_ENV = "LRU_CACHE_CAPACITY"
IDEEP_CACHE_CAPACITY = 64


def limit_onednn_cache() -> bool:
    """Cap the two caches of compiled matmul kernels behind PyTorch's CPU bf16 matmuls (each 1,024
    entries by default) unless the user set them; False where both are left alone.

    On a CPU with native bfloat16 every matmul shape (clips x positions x layer) gets its own oneDNN
    kernel, and live windows come in many lengths, so a long run kept hundreds of them:

    * oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``): the kernels;
    * ideep's cache of primitive descriptors (``LRU_CACHE_CAPACITY``; ideep is PyTorch's layer over
      oneDNN, through which ``torch.matmul``/``bmm`` reach it): a descriptor per shape, with its
      kernel's blocking plan, ~150 kB each. With only oneDNN's capped, whisper-base held ~250 MB more
      after its first three batches of the English benchmark than with this one capped too.

    Both are read when the first kernel is built, so this must run before the model's first matmul
    (the transcriber calls it while loading).
    """
    if os.environ.get("BATCHCAP_MALLOC", "1") == "0":
        return False
    applied = False
    for env, capacity in ((ONEDNN_CACHE_ENV, ONEDNN_CACHE_CAPACITY), (IDEEP_CACHE_ENV, IDEEP_CACHE_CAPACITY)):
        if env not in os.environ:
            os.environ[env] = str(capacity)
            applied = True
    return applied
