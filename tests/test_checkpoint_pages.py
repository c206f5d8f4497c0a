"""Memory after loading a model cast to bfloat16 for autocast: its float32 checkpoint's pages are not
kept resident, and the caches of compiled oneDNN kernels are capped (unless the user set them); the CLI
asks PyTorch for huge pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import write_audio

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT and /proc are Linux's")

# what every script below starts with: the resident kB of one mapped file, from /proc/self/smaps
PRELUDE = r"""
import json, os, sys
from batchcap.memory import mapped_checkpoint_ranges
from batchcap.models.whisper import WhisperTranscriber

def resident_kb(path):
    total, inside = 0, False
    with open("/proc/self/smaps") as handle:
        for line in handle:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                inside = len(fields) == 6 and fields[5] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total
"""

CODE = PRELUDE + r"""
from batchcap.audio import decode_audio

model, clip = sys.argv[1], sys.argv[2]
tr = WhisperTranscriber(model, dtype="bfloat16", language="en")
paths = sorted({p for _, _, p in mapped_checkpoint_ranges()})
after_load = {p: resident_kb(p) for p in paths}
samples = decode_audio(open(clip, "rb").read())
result = tr.transcribe([tr.prepare(samples)])[0]
cache = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
print(json.dumps({"onednn_cache": cache, "ideep_cache": os.environ.get("LRU_CACHE_CAPACITY"),
                  "paths": paths, "sizes_kb": [os.path.getsize(p) // 1024 for p in paths],
                  "resident_kb": [after_load[p] for p in paths], "text": result["text"],
                  "segments": [repr(s) for s in result["segments"]]}))
"""


def _script(code: str, *args: str, **env_extra: str) -> dict:
    """Run ``code`` in a fresh Python (no oneDNN setting inherited) and read the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         timeout=240, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run(model: str, clip: str, release: bool, **extra: str) -> dict:
    return _script(CODE, model, clip, **extra, BATCHCAP_MALLOC="1" if release else "0")


def test_checkpoint_pages_released_after_the_bf16_cast(tiny_whisper_en, tmp_path):
    clip = write_audio(tmp_path / "clip.wav", 2.0)
    kept = _run(tiny_whisper_en, clip, release=False)
    released = _run(tiny_whisper_en, clip, release=True)
    assert kept["paths"] and kept["paths"] == released["paths"]  # the checkpoint is memory-mapped
    size = sum(kept["sizes_kb"])
    # loading read every weight: without the release most of the file stays resident
    assert sum(kept["resident_kb"]) > size * 0.5
    # what stays: pages written while loading (copy-on-write, e.g. initialised positional embeddings);
    # the tiny model's weights are small next to them, a real checkpoint's are not (README: memory)
    assert sum(released["resident_kb"]) < sum(kept["resident_kb"]) * 0.4
    # pages read back on use hold what they held: the same transcript, the same times
    assert released["text"] == kept["text"] and released["segments"] == kept["segments"]


def test_onednn_cache_capped_unless_the_user_set_it(tiny_whisper_en, tmp_path):
    from batchcap.memory import IDEEP_CACHE_CAPACITY, ONEDNN_CACHE_CAPACITY

    clip = write_audio(tmp_path / "clip.wav", 1.0)
    capped = _run(tiny_whisper_en, clip, release=True)
    assert capped["onednn_cache"] == str(ONEDNN_CACHE_CAPACITY)
    assert capped["ideep_cache"] == str(IDEEP_CACHE_CAPACITY)
    left = _run(tiny_whisper_en, clip, release=False)  # BATCHCAP_MALLOC=0: left alone
    assert left["onednn_cache"] is None and left["ideep_cache"] is None
    users = _run(tiny_whisper_en, clip, release=True, ONEDNN_PRIMITIVE_CACHE_CAPACITY="7", LRU_CACHE_CAPACITY="9")
    assert users["onednn_cache"] == "7" and users["ideep_cache"] == "9"


SHAPES = r"""
import ctypes, json
import torch
from batchcap.memory import limit_onednn_cache

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2

def in_use():
    info = mallinfo2()
    return info.uordblks + info.hblkhd

limit_onednn_cache()  # what the transcriber does while loading (a no-op with BATCHCAP_MALLOC=0)
weight = torch.randn(8, 64, 64).bfloat16()
with torch.inference_mode():
    torch.matmul(torch.randn(8, 5, 64).bfloat16(), weight)
    before = in_use()
    for rows in range(10, 310):  # 300 shapes, as live windows of 300 lengths give
        torch.matmul(torch.randn(8, rows, 64).bfloat16(), weight)
print(json.dumps({"grew": in_use() - before}))
"""


def test_kernels_of_many_matmul_shapes_are_not_all_kept():
    """A bf16 matmul of each new shape leaves a compiled kernel and its descriptor in PyTorch's CPU caches;
    capped, 300 shapes leave a fraction of what the default 1,024-entry caches keep."""
    capped = _script(SHAPES, BATCHCAP_MALLOC="1")
    default = _script(SHAPES, BATCHCAP_MALLOC="0")
    if default["grew"] < 20 << 20:  # bf16 matmuls that do not go through oneDNN's compiled kernels
        pytest.skip(f"bf16 matmuls kept {default['grew'] >> 20} MB uncapped: no oneDNN kernel cache to cap here")
    assert capped["grew"] < default["grew"] * 0.4, (capped, default)


OTHER = PRELUDE + r"""
import torch
from transformers import WhisperForConditionalGeneration

other = WhisperForConditionalGeneration.from_pretrained(sys.argv[1])  # float32, weights in the file mapping
with torch.inference_mode():
    total = sum(float(p.sum()) for p in other.parameters())  # every weight read
(path,) = {p for _, _, p in mapped_checkpoint_ranges()}
before = resident_kb(path)
tr = WhisperTranscriber(sys.argv[2], dtype="bfloat16", language="en")
print(json.dumps({"before": before, "after": resident_kb(path)}))
"""


def test_another_models_checkpoint_pages_are_left_alone(tiny_whisper, tiny_whisper_en):
    seen = _script(OTHER, tiny_whisper, tiny_whisper_en)
    assert seen["before"] > 0 and seen["after"] >= seen["before"] * 0.9


TRIM = r"""
import json, sys
from batchcap import memory

def rss_kb():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))

memory.tune_malloc()  # as a run does: blocks under the mmap threshold (16 MB) come from malloc's heaps
blocks = [bytearray(100_000) for _ in range(3000)]  # 300 MB of heap blocks, every page written
kept = blocks[::20]  # a few stay alive between the freed ones: the heap cannot shrink from its top
del blocks
before = rss_kb()
applied = memory.release_free_heap()
print(json.dumps({"applied": applied, "before": before, "after": rss_kb(), "kept": len(kept)}))
"""


def test_free_heap_pages_are_given_back_after_a_batch(tiny_whisper_en, tmp_path, monkeypatch):
    # the free pages of malloc's heaps go back to the kernel when asked (glibc keeps them otherwise)
    released = _script(TRIM, BATCHCAP_MALLOC="1")
    assert released["applied"] and released["before"] - released["after"] > 200_000  # kB
    kept = _script(TRIM, BATCHCAP_MALLOC="0")
    assert not kept["applied"] and kept["before"] - kept["after"] < 50_000
    # ... and a run asks after every model batch
    from batchcap import stages, transcribe

    calls = []
    monkeypatch.setattr(stages, "release_free_heap", lambda: calls.append(1))
    clips = [write_audio(tmp_path / f"c{i}.wav", 1.0 + i / 4) for i in range(5)]
    result = transcribe(clips, str(tmp_path / "out.parquet"), model=tiny_whisper_en, batch_size=2, quiet=True,
                        max_new_tokens=2)
    assert result.summary["status_counts"] == {"ok": 5} and len(calls) == 3


HUGE = r"""
import json, os, sys
from batchcap.cli import main
try:
    main(["--version"], standalone_mode=False)
except SystemExit:
    pass
import torch
big = torch.empty(64 << 20, dtype=torch.uint8)
big.fill_(1)
with open("/proc/self/smaps_rollup") as handle:
    huge = next(int(line.split()[1]) for line in handle if line.startswith("AnonHugePages:"))
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge_kb": huge}))
"""


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
            text = handle.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


@pytest.mark.parametrize("setting, env", [({}, "1"), ({"BATCHCAP_MALLOC": "0"}, None),
                                          ({"THP_MEM_ALLOC_ENABLE": "0"}, "0")])
def test_the_cli_asks_torch_for_huge_pages_unless_told_otherwise(setting, env):
    clean = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "BATCHCAP_MALLOC")}
    out = subprocess.run([sys.executable, "-c", HUGE], env={**clean, **setting}, capture_output=True, text=True,
                         check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["env"] == env
    if _thp_mode() == "madvise":  # huge pages only where asked for ("always": everywhere; "never": nowhere)
        assert (got["huge_kb"] >= 32 * 1024) == (env == "1")
