"""The output store through real runs of the CLI (tiny models): resume keeps every type as written,
parts of several runs merge newest-last, write errors are one line, the lock is not fooled."""

from __future__ import annotations

import csv
import io
import json
import os
import uuid

import pytest
from PIL import Image

from batchcap import output as output_module
from tests.helpers import rows_of, run_cli


def _image(path, shade: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48 + shade % 7, 32), (shade % 256, 90, 200)).save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return str(path)


def _csv_rows(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _leftovers(folder) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if n.endswith(".tmp")]


def test_csv_resume_keeps_lists_and_text_columns(tiny_captioner, tmp_path):
    """An images run into CSV with references (a list column) and a carried `007`, resumed twice."""
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [(_image(folder / f"{i}.png", 40 * i), f"a cup number {i}", f"{i:03d}") for i in range(3)]
    manifest = tmp_path / "m.csv"

    def write_manifest(entries):
        with open(manifest, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "caption", "code"])
            w.writerows(entries)

    write_manifest(rows)
    out = tmp_path / "o.csv"
    common = ["images", str(manifest), "-o", str(out), "--model", tiny_captioner, "--max-new-tokens", "3",
              "--quiet", "--flush-every", "1"]
    code, output = run_cli(*common)
    assert code == 0, output
    first = _csv_rows(out)
    assert [r["code"] for r in first] == ["000", "001", "002"]

    # a new input: the resume merges the CSV written above with this run's parquet part
    rows.append((_image(folder / "3.png", 200), "a cup number 3", "007"))
    write_manifest(rows)
    code, output = run_cli(*common)
    assert code == 0, output
    second = _csv_rows(out)
    assert [r["code"] for r in second] == ["000", "001", "002", "007"]
    for old, new in zip(first, second):  # the old rows are written back exactly as they were
        assert {k: new[k] for k in ("id", "source", "caption", "references", "code", "status")} == \
               {k: old[k] for k in ("id", "source", "caption", "references", "code", "status")}
    table = rows_of(out)
    assert [r["references"] for r in table] == [[c] for _, c, _ in rows]
    assert [r["code"] for r in table] == ["000", "001", "002", "007"]
    assert all(isinstance(r["cider_d"], float) for r in table)

    code, output = run_cli(*common)  # nothing left to do: the file is read back and written again as it was
    assert code == 0, output
    assert _csv_rows(out) == second


def test_mixed_type_carried_column_across_flushes(tiny_captioner, tmp_path):
    """A JSONL manifest whose carried column is null in the first part, int in another, text in a third."""
    folder = tmp_path / "in"
    folder.mkdir()
    values = [None, 7, 8, "x7", None, 9]
    manifest = tmp_path / "m.jsonl"
    with open(manifest, "w") as f:
        for i, value in enumerate(values):
            f.write(json.dumps({"path": _image(folder / f"{i}.png", 30 * i), "tag": value}) + "\n")
    out = tmp_path / "o.parquet"
    code, output = run_cli("images", str(manifest), "-o", str(out), "--model", tiny_captioner, "--quiet",
                           "--max-new-tokens", "2", "--batch-size", "1", "--flush-every", "1", "--workers", "1")
    assert code == 0, output
    got = rows_of(out)
    assert [r["tag"] for r in got] == [None, "7", "8", "x7", None, "9"]  # text: no value lost


def test_retry_failed_row_wins_over_an_older_runs_parts(tiny_captioner, tmp_path, monkeypatch):
    """Parts of an interrupted run and of the --retry-failed run that follows: the newer row is kept,
    whatever the runs' random ids are."""
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [str(folder / f"{i}.png") for i in range(4)]
    for i, p in enumerate(paths[:3]):
        _image(folder / os.path.basename(p), 50 * i)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "\n".join(paths) + "\n")  # 3.png is missing at first
    out = tmp_path / "o.parquet"
    common = ["images", str(manifest), "-o", str(out), "--model", tiny_captioner, "--quiet",
              "--max-new-tokens", "2", "--batch-size", "1", "--flush-every", "1"]

    def run_id(hex_digit: str):
        return lambda: uuid.UUID(hex_digit * 32)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt  # the run ends before its merge: its parts stay

    monkeypatch.setattr(output_module.uuid, "uuid4", run_id("f"))
    monkeypatch.setattr(output_module.ResultStore, "finalize", interrupted)
    code, output = run_cli(*common)
    assert code == 130, output
    monkeypatch.undo()
    _image(folder / "3.png", 99)  # the missing file is there now

    monkeypatch.setattr(output_module.uuid, "uuid4", run_id("0"))
    code, output = run_cli(*common, "--retry-failed")
    assert code == 0, output
    got = rows_of(out)
    assert [r["status"] for r in got] == ["ok"] * 4
    assert [os.path.basename(r["source"]) for r in got] == ["0.png", "1.png", "2.png", "3.png"]


def test_final_file_write_error_is_one_line_without_temp_files(tiny_captioner, tmp_path, monkeypatch):
    """The final file's name is fine, its temporary name is too long: a real ENAMETOOLONG at the merge.
    (Such a name is refused before the run since; the check is turned off here to reach the merge.)"""
    monkeypatch.setattr("batchcap.output._check_sibling_names", lambda path: None)
    folder = tmp_path / "in"
    folder.mkdir()
    _image(folder / "a.png", 10)
    out = tmp_path / ("x" * 237 + ".parquet")  # 245 characters: lock and parts fit, the temp name does not
    code, output = run_cli("images", str(folder), "-o", str(out), "--model", tiny_captioner, "--quiet",
                           "--max-new-tokens", "2")
    assert code == 1, output
    lines = output.strip().splitlines()
    assert lines == [f"Error: cannot write {out}: File name too long"]
    assert not os.path.exists(out) and _leftovers(tmp_path) == []
    assert os.listdir(str(out) + ".parts")  # the rows done are kept for a later run


def test_lock_file_symlink_is_not_followed(tiny_captioner, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _image(folder / "a.png", 10)
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch\n")
    out = tmp_path / "o.parquet"
    os.symlink(victim, str(out) + ".lock")
    code, output = run_cli("images", str(folder), "-o", str(out), "--model", tiny_captioner, "--quiet")
    assert code == 1 and output.strip().splitlines() == [
        f"Error: {out}.lock is a symbolic link; remove it (batchcap writes a plain lock file there)"]
    assert victim.read_text() == "do not touch\n" and not os.path.exists(out)


@pytest.fixture()
def disk_limit():
    """preexec_fn for a subprocess whose files may not grow past 1 KiB (EFBIG, as on a full disk)."""
    import resource
    import signal

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    return limit


def test_disk_full_is_one_line_and_the_rerun_resumes(tiny_captioner, tmp_path, disk_limit):
    import subprocess
    import sys

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        _image(folder / f"{i}.png", 60 * i)
    out = tmp_path / "o.parquet"
    cmd = [sys.executable, "-m", "batchcap.cli", "images", str(folder), "-o", str(out), "--model", tiny_captioner,
           "--quiet", "--max-new-tokens", "2"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, HF_HUB_OFFLINE="1")
    full = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, preexec_fn=disk_limit)
    assert full.returncode == 1, full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot write ") and lines[0].endswith(
        ": File too large"), full.stderr
    assert _leftovers(tmp_path) == [] and not os.path.exists(out)
    code, output = run_cli(*cmd[3:])  # room again: the same command resumes
    assert code == 0, output
    assert len(rows_of(out)) == 3


def test_summary_is_written_while_the_lock_is_held(tiny_captioner, tmp_path, monkeypatch):
    """A second run starting right after the first's final file must not slip in before the first writes its
    summary (it would then find a stale summary, and have its own overwritten by the older run's)."""
    from batchcap import runner
    from batchcap.items import FatalError

    folder = tmp_path / "in"
    folder.mkdir()
    _image(folder / "a.png", 10)
    out = tmp_path / "o.parquet"
    seen: list[str] = []
    write_summary = runner.write_summary

    def second_run_starts_now(path, summary):
        other = output_module.ResultStore(str(out))
        try:
            other.open()
        except FatalError as exc:
            seen.append(str(exc))
        else:
            other.close()
            seen.append("the second run got the lock")
        return write_summary(path, summary)

    monkeypatch.setattr(runner, "write_summary", second_run_starts_now)
    code, text = run_cli("images", str(folder), "-o", str(out), "--model", tiny_captioner, "--max-new-tokens", "3")
    assert code == 0, text
    assert len(seen) == 1 and "another batchcap run" in seen[0], seen
    assert json.load(open(tmp_path / "o.summary.json"))["rows"] == 1
