"""The writer's merge: one row per id (the newest), input order, rows of vanished inputs kept."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from batchcap.items import FatalError
from batchcap.output import ORDER, ResultStore, merge_rows, read_table


def test_merge_keeps_newest_row_per_id_in_input_order():
    table = pa.table({
        "id": ["b", "a", "gone1", "b", "c", "gone2"],
        "status": ["fetch_error", "ok", "ok", "ok", "ok", "ok"],
        ORDER: [1, 0, 7, 1, 2, 9],
    })
    merged = merge_rows(table, {"a": 0, "b": 1, "c": 2})
    assert merged.column("id").to_pylist() == ["a", "b", "c", "gone1", "gone2"]
    assert merged.column("status").to_pylist() == ["ok", "ok", "ok", "ok", "ok"]  # b: the later row won
    assert ORDER not in merged.column_names


def test_store_parts_finalize_and_resume(tmp_path):
    out = str(tmp_path / "o.csv")
    with ResultStore(out, flush_rows=2) as store:
        for i in range(5):
            store.add({"id": f"{i:03d}", "text": f"t{i}", "status": "ok", ORDER: i})
        assert len([p for p in os.listdir(out + ".parts") if p.endswith(".parquet")]) == 2  # 2 flushed parts
    with ResultStore(out) as store:  # a crashed run's parts are read back as done
        assert store.done == {f"{i:03d}" for i in range(5)}
        store.finalize({f"{i:03d}": 4 - i for i in range(5)})
    table = read_table(out)
    assert table.column("id").to_pylist() == ["004", "003", "002", "001", "000"]  # text ids stay text
    assert not os.path.exists(out + ".parts")


def test_bad_output_name_and_missing_folder(tmp_path):
    with pytest.raises(FatalError, match=".parquet or .csv"):
        ResultStore(str(tmp_path / "o.json"))
    with pytest.raises(FatalError, match="does not exist"):
        ResultStore(str(tmp_path / "nope" / "o.parquet")).open()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FatalError, match="output folder is not a folder: "):
        ResultStore(str(tmp_path / "file" / "o.parquet")).open()


def test_a_bad_output_folder_fails_before_the_model_loads(tmp_path):
    from tests.helpers import run_cli

    (tmp_path / "a.wav").write_bytes(b"")
    code, output = run_cli("audio", tmp_path / "a.wav", "-o", tmp_path / "nope" / "o.parquet",
                           "--model", tmp_path / "no-such-model")
    assert code == 1 and output.strip().splitlines()[-1] == f"Error: output folder does not exist: {tmp_path / 'nope'}"


def test_an_output_name_too_long_for_its_side_files_stops_before_the_run(tmp_path, tiny_whisper):
    # out.csv and out.csv.lock fit in 255 bytes, out.summary.json's temporary name does not: refused up
    # front (before, the whole run was transcribed and then failed at the summary, on every rerun)
    name = "b" * 232 + ".csv"
    with pytest.raises(FatalError, match="output name too long"):
        ResultStore(str(tmp_path / name)).open()
    assert os.listdir(tmp_path) == []
    shorter = ResultStore(str(tmp_path / ("b" * 200 + ".csv")))
    shorter.open()  # fine
    shorter.close()
    from tests.helpers import run_cli

    (tmp_path / "in").mkdir()
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "in" / "a.wav", np.zeros(1600, np.float32), 16000)
    code, output = run_cli("audio", tmp_path / "in", "-o", tmp_path / name, "--model", tiny_whisper)
    assert code == 1 and "output name too long" in output and "Traceback" not in output
    assert not (tmp_path / (name + ".parts")).exists()


def _rows(ids, status="ok", **extra):
    return [{"id": i, "status": status, **{k: v[n] if isinstance(v, list) else v for k, v in extra.items()},
             ORDER: n} for n, i in enumerate(ids)]


def test_csv_round_trip_keeps_every_type(tmp_path):
    """Text that looks like a number, empty text vs null, lists, structs, floats, bools, ints."""
    out = str(tmp_path / "o.csv")
    rows = [
        {"id": "007", "status": "ok", "code": "007", "note": "", "refs": ["a, \"b\"", "c"], "meta": {"k": 1},
         "score": 0.1, "flag": True, "n": 2**60, ORDER: 0},
        {"id": "1e3", "status": "ok", "code": "1e3", "note": None, "refs": None, "meta": None,
         "score": float("inf"), "flag": None, "n": None, ORDER: 1},
    ]
    with ResultStore(out) as store:
        for row in rows:
            store.add(dict(row))
        store.finalize({"007": 0, "1e3": 1})
    assert os.path.exists(tmp_path / "o.schema.json")
    want = [{k: v for k, v in r.items() if k != ORDER} for r in rows]
    assert read_table(out).to_pylist() == want
    with ResultStore(out) as store:  # a rerun with nothing new writes the same table back
        assert store.done == {"007", "1e3"}
        again = store.finalize({"007": 0, "1e3": 1})
    assert again.to_pylist() == want and read_table(out).to_pylist() == want


def test_parts_that_disagree_on_types_merge_into_one_schema(tmp_path):
    out = str(tmp_path / "o.parquet")
    with ResultStore(out, flush_rows=1) as store:
        for n, (value, score) in enumerate([(None, 1), (3, 2), ("x", 2.5), ([1, 2], None), (True, 4)]):
            store.add({"id": f"r{n}", "status": "ok", "carried": value, "score": score, ORDER: n})
        table = store.finalize({f"r{n}": n for n in range(5)})
    assert table.column("carried").to_pylist() == [None, "3", "x", "[1, 2]", "true"]
    assert table.column("score").to_pylist() == [1.0, 2.0, 2.5, None, 4.0]
    assert read_table(out).column("carried").to_pylist() == [None, "3", "x", "[1, 2]", "true"]


def test_parts_of_older_versions_are_read_before_new_ones(tmp_path):
    out = str(tmp_path / "o.parquet")
    os.makedirs(out + ".parts")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "status": ["fetch_error"], ORDER: [0]}),
                   out + ".parts/part-ffffffff-000000.parquet")  # a part named by batchcap before
    with ResultStore(out, retry_failed=True) as store:
        assert store.done == set()
        store.add({"id": "a", "status": "ok", ORDER: 0})
        store.flush()
        assert sorted(os.listdir(out + ".parts"))[0].startswith("part-0000000000-")
        table = store.finalize({"a": 0})
    assert table.column("status").to_pylist() == ["ok"]


def test_part_sequence_continues_across_runs(tmp_path):
    out = str(tmp_path / "o.parquet")
    for run in range(3):
        with ResultStore(out, flush_rows=1) as store:
            store.add({"id": f"x{run}", "status": "ok", ORDER: run})
            store.add({"id": "same", "status": f"s{run}", ORDER: 9})
    names = sorted(os.listdir(out + ".parts"))
    assert [int(n.split("-")[1]) for n in names] == list(range(6))
    with ResultStore(out) as store:
        table = store.finalize({})
    assert dict(zip(table.column("id").to_pylist(), table.column("status").to_pylist()))["same"] == "s2"


def test_resume_reads_only_the_id_and_status_columns(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    out = str(tmp_path / "o.parquet")
    with ResultStore(out, flush_rows=2) as store:
        for row in _rows(["a", "b", "c"], text="long text"):
            store.add(row)
        store.finalize({})
    with ResultStore(out, flush_rows=2) as store:
        store.add({"id": "d", "status": "model_error", "text": None, ORDER: 3})
    seen = []
    real_table, real_file = pq.read_table, pq.ParquetFile.read

    def spy_table(path, *args, columns=None, **kwargs):
        seen.append(columns)
        return real_table(path, *args, columns=columns, **kwargs)

    def spy_file(self, columns=None, *args, **kwargs):
        seen.append(columns)
        return real_file(self, columns, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy_table)
    monkeypatch.setattr(pq.ParquetFile, "read", spy_file)
    with ResultStore(out, retry_failed=True) as store:
        assert store.done == {"a", "b", "c"}
    assert seen == [["id", "status"], ["id", "status"]]


def test_a_symlink_or_hard_link_at_the_lock_path_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = str(tmp_path / "o.parquet")
    os.symlink(victim, out + ".lock")
    with pytest.raises(FatalError, match="is a symbolic link"):
        ResultStore(out).open()
    os.remove(out + ".lock")
    os.link(victim, out + ".lock")
    with pytest.raises(FatalError, match="hard link"):
        ResultStore(out).open()
    assert victim.read_text() == "precious" and not os.path.exists(out + ".parts")


def test_a_run_that_locks_a_removed_lock_file_tries_the_new_one(tmp_path, monkeypatch):
    """A ends and removes its lock file while B, which opened that file, waits to lock it; C starts and
    creates a new one. B must not believe it holds the lock: it finds C's lock on the file now there."""
    import fcntl

    out = str(tmp_path / "o.parquet")
    first, third = ResultStore(out), ResultStore(out)
    first.open()
    real = fcntl.flock
    raced: list[int] = []

    def racing(fd, op):
        if not raced and op & fcntl.LOCK_EX:
            raced.append(fd)
            first.close()
            third.open()
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", racing)
    with pytest.raises(FatalError, match=f"another batchcap run \\(pid {os.getpid()}\\)"):
        ResultStore(out).open()
    assert raced
    third.close()
    assert not os.path.exists(out + ".lock")


def test_a_second_process_cannot_open_the_store(tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "o.parquet")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; from batchcap.output import ResultStore; s = ResultStore(sys.argv[1]); s.open(); "
            "print('locked', flush=True); sys.stdin.read(); s.close()")
    holder = subprocess.Popen([sys.executable, "-c", code, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=root), text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FatalError, match=f"another batchcap run \\(pid {holder.pid}\\)"):
            ResultStore(out).open()
    finally:
        holder.stdin.close()
        holder.wait(30)
    with ResultStore(out) as store:
        store.add({"id": "a", "status": "ok", ORDER: 0})
        store.finalize({})


def test_flush_called_again_while_flushing_writes_each_row_once(tmp_path, monkeypatch):
    """A SIGTERM handler that flushes while a flush is writing its part."""
    import pyarrow.parquet as pq

    out = str(tmp_path / "o.parquet")
    store = ResultStore(out, flush_rows=100)
    store.flush()  # not open yet: nothing happens
    store.open()
    for row in _rows(["a", "b"]):
        store.add(row)
    real = pq.write_table
    nested: list[int] = []

    def interrupted(table, where, *args, **kwargs):
        if not nested:
            nested.append(1)
            store.flush()
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", interrupted)
    store.flush()
    store.add({"id": "c", "status": "ok", ORDER: 2})
    store.flush()
    parts = [read_table(os.path.join(out + ".parts", n)) for n in sorted(os.listdir(out + ".parts"))]
    assert [t.column("id").to_pylist() for t in parts] == [["a", "b"], ["c"]]
    table = store.finalize({"a": 0, "b": 1, "c": 2})
    store.close()
    assert nested and table.column("id").to_pylist() == ["a", "b", "c"]


def test_a_failed_flush_keeps_its_rows_and_says_why(tmp_path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    out = str(tmp_path / "o.parquet")
    real = pq.write_table
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def full(table, where, *args, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1")  # half a file, as a full disk leaves it
        if failures:
            raise failures.pop()
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", full)
    with ResultStore(out, flush_rows=2) as store:
        store.add({"id": "a", "status": "ok", ORDER: 0})
        with pytest.raises(FatalError) as info:
            store.add({"id": "b", "status": "ok", ORDER: 1})
        message = str(info.value)
        assert message.startswith(f"cannot write {out}.parts/part-0000000000-")
        assert message.endswith(".parquet: No space left on device")
        assert [n for n in os.listdir(out + ".parts")] == []  # the temp file is gone
        table = store.finalize({"a": 0, "b": 1})
    assert table.column("id").to_pylist() == ["a", "b"]
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_counts_of_this_run_and_of_the_whole_table(tmp_path):
    out = str(tmp_path / "o.parquet")
    with ResultStore(out) as store:
        for row in _rows(["a", "b"], status="fetch_error") + _rows(["c"], status="empty"):
            store.add(row)
        store.finalize({})
    with ResultStore(out, retry_failed=True) as store:
        assert store.done == set()
        store.add({"id": "a", "status": "ok", ORDER: 0})
        store.finalize({})
        counts = store.summary_counts()
    assert counts == {"status_counts": {"empty": 1, "fetch_error": 1, "ok": 1},
                      "status_counts_this_run": {"ok": 1}, "processed_this_run": 1}


def test_overwrite_removes_the_csv_schema(tmp_path):
    out = str(tmp_path / "o.csv")
    with ResultStore(out) as store:
        store.add({"id": "a", "status": "ok", "x": "007", ORDER: 0})
        store.finalize({})
    with ResultStore(out, overwrite=True) as store:
        assert store.done == set() and not os.path.exists(tmp_path / "o.schema.json")
        store.add({"id": "a", "status": "ok", "x": 7, ORDER: 0})
        store.finalize({})
    assert read_table(out).column("x").to_pylist() == [7]


def test_values_arrow_cannot_hold_become_text_instead_of_failing_the_flush(tmp_path):
    out = str(tmp_path / "o.parquet")
    with ResultStore(out, flush_rows=2) as store:
        store.add({"id": "a", "status": "ok", "big": 2**70, "obj": object, ORDER: 0})
        store.add({"id": "b", "status": "ok", "big": 1, "obj": None, ORDER: 1})
        table = store.finalize({"a": 0, "b": 1})
    assert table.column("big").to_pylist() == [str(2**70), "1"]
    assert table.column("obj").to_pylist() == [str(object), None]


def test_a_csv_written_without_a_schema_resumes_with_the_types_of_the_new_parts(tmp_path):
    """A CSV output of an older batchcap (no .schema.json) used to fail every resume (list vs text)."""
    out = str(tmp_path / "o.csv")
    with ResultStore(out) as store:
        store.add({"id": "a", "status": "ok", "references": ["x", "y"], "code": "007", ORDER: 0})
        store.finalize({"a": 0})
    os.remove(tmp_path / "o.schema.json")
    with ResultStore(out) as store:
        store.add({"id": "b", "status": "ok", "references": ["z"], "code": "008", ORDER: 1})
        table = store.finalize({"a": 0, "b": 1})
    assert table.column("references").to_pylist() == [["x", "y"], ["z"]]
    assert table.column("code").to_pylist() == ["007", "008"]
    assert read_table(out).column("code").to_pylist() == ["007", "008"]


def test_temp_files_of_a_run_killed_while_writing_the_final_file_are_removed(tmp_path):
    out = str(tmp_path / "o.csv")
    stale = [tmp_path / ".o.csv.k3j4h5g6.tmp", tmp_path / ".o.schema.json.a1b2c3d4.tmp"]
    kept = [tmp_path / ".o.summary.json.a1b2c3d4.tmp", tmp_path / ".other.csv.a1b2c3d4.tmp"]
    for path in stale + kept:
        path.write_text("half")
    with ResultStore(out):
        pass
    assert [p.exists() for p in stale + kept] == [False, False, True, True]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_new_files_the_umask_mode(tmp_path, umask):
    """Files batchcap writes get what any new file gets (0666 less the umask), not mkstemp's 0600: others
    may read a result table where the umask lets them. Replacing a file keeps that rule too."""
    import stat

    from batchcap.fsutil import atomic_write

    old = os.umask(umask)
    try:
        target = tmp_path / "out.csv"
        atomic_write(str(target), "id\n1\n")
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask
        atomic_write(str(target), b"id\n2\n")
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask
        assert target.read_text() == "id\n2\n"
        assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    finally:
        os.umask(old)


def test_a_parts_folder_removed_during_the_run_stops_it(tmp_path):
    """Someone removes the output's folder while a run writes: the store recreated it without a word and
    the final table lacked the rows of the removed parts (192 of 200, exit 0). Now the run stops, saying so;
    rows added after finalize (which removes the parts itself) still start a folder afresh."""
    import shutil

    from batchcap.items import FatalError
    from batchcap.output import ResultStore

    out = tmp_path / "out" / "o.parquet"
    out.parent.mkdir()

    def row(i: int) -> dict:
        return {"id": f"r{i}", "status": "ok", "text": f"t{i}"}

    store = ResultStore(str(out), flush_rows=2)
    store.open()
    for i in range(4):
        store.add(row(i))  # two parts written
    shutil.rmtree(store.parts_dir)
    store.add(row(4))
    with pytest.raises(FatalError, match="was removed while the run was writing to it"):
        store.add(row(5))
    with pytest.raises(FatalError, match="was removed"):  # closing tries the rows once more, and says so again
        store.close()
    assert not os.path.exists(store.lock_path)  # the lock is released all the same

    resumed = ResultStore(str(out), flush_rows=2)  # a resumed run whose earlier parts vanish before its end
    resumed.open()
    resumed.add(row(6))
    resumed.add(row(7))
    shutil.rmtree(resumed.parts_dir)
    with pytest.raises(FatalError, match="was removed while the run was writing to it"):
        resumed.finalize()
    resumed.close()

    fresh = ResultStore(str(tmp_path / "out" / "p.parquet"), flush_rows=2)
    fresh.open()
    fresh.add(row(0))
    fresh.finalize()
    fresh.add(row(1))
    fresh.add(row(2))  # after finalize: a new parts folder, no error
    assert os.path.isdir(fresh.parts_dir)
    fresh.close()
