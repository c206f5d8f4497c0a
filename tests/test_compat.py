"""setup.py promises Python 3.10: no module may use a 3.11-only API (ruff's py310 target does not check)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_requires() -> tuple[int, int]:
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        match = re.search(r'python_requires\s*=\s*">=\s*(\d+)\.(\d+)"', f.read())
    assert match, "setup.py has no python_requires"
    return int(match.group(1)), int(match.group(2))


def test_code_runs_on_the_oldest_python_setup_py_allows():
    pytest.importorskip("vermin")  # in the dev extra
    major, minor = _python_requires()
    folders = [os.path.join(ROOT, d) for d in ("batchcap", "tests", "scripts")]
    command = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", f"-t={major}.{minor}-",
               "--violations", "--no-tips", "--eval-annotations", "--no-parse-comments", *folders,
               os.path.join(ROOT, "setup.py")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
