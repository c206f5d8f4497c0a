"""Runs that die, are stopped or hit a bug: crash-loop protection, SIGTERM, one-line errors, exit codes,
and the same rows whatever the thread counts."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from PIL import Image

from batchcap.output import read_table
from tests.conftest import write_audio
from tests.helpers import rows_of, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _as_from_a_shell() -> None:
    """In the child before exec: SIGINT and SIGTERM at their defaults and not blocked, as a terminal's shell
    starts a command. A child inherits ignored and blocked signals from its parent, and in some full test
    runs the ones started here ignored both Ctrl-Cs (an earlier test or library left this process's
    SIGINT so), which is about the test process, not about batchcap."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def _start(cmd: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_shell)  # noqa: PLW1509 - only signal calls run before exec


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before {what}: {out[-1500:]} {err[-1500:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[int, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def _journals(out: str) -> set[str]:
    folder = out + ".parts"
    return {n for n in os.listdir(folder) if n.startswith("inflight-")} if os.path.isdir(folder) else set()


def _decoding(out: str, item_id: str, old: set[str]) -> bool:
    """Whether this run's crash journal (not one of the ``old`` ones of dead runs) says ``item_id`` is
    being decoded or predicted right now."""
    folder = out + ".parts"
    for name in _journals(out) - old:
        if name:
            lines = open(os.path.join(folder, name), encoding="utf-8").read().splitlines()
            state = [line[0] for line in lines if line[1:] == json.dumps(item_id)]
            if state and state[-1] == "+":
                return True
    return False


def test_item_in_flight_when_two_runs_died_gets_a_crashed_row(tiny_whisper_en, tmp_path):
    """A poisonous item (here: 3 hours of audio in a small FLAC, whose decoding the test kills as the OOM
    killer would) is done alone after the first death and given up on after the second; every other item
    gets its row and the third run finishes."""
    import numpy as np
    import soundfile as sf

    clips = [write_audio(tmp_path / f"c{i}.wav", 0.5 + 0.1 * i, freq=300 + 40 * i) for i in range(5)]
    poison = str(tmp_path / "hours.flac")
    sf.write(poison, np.zeros(3 * 3600 * 4000, np.int16), 4000, subtype="PCM_16")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "\n".join(clips[:2] + [poison] + clips[2:]) + "\n")
    out = str(tmp_path / "out.parquet")
    cmd = [sys.executable, "-m", "batchcap.cli", "audio", str(manifest), "-o", out, "--model", tiny_whisper_en,
           "--batch-size", "2", "--workers", "2"]

    for run in (1, 2):  # the run dies (SIGKILL, as the OOM killer does) while the poisonous item decodes
        old = _journals(out)
        proc = _start(cmd)
        _wait_for(lambda old=old: _decoding(out, poison, old), proc, f"run {run} decoding the item")
        _kill(proc)
        assert not os.path.exists(out)
    suspects = json.loads(open(out + ".parts/suspects.json").read())["deaths"] if os.path.exists(
        out + ".parts/suspects.json") else {}
    # only what was being decoded or predicted then: at most 2 decode threads + a batch of 2, not the read-ahead
    assert suspects.get(poison) == 1 and len(suspects) <= 4

    proc = _start(cmd)
    out_text, err_text = proc.communicate(timeout=240)
    assert proc.returncode == 3, out_text + err_text  # a crashed row is a failure of this run
    rows = rows_of(out)
    assert [r["source"] for r in rows] == clips[:2] + [poison] + clips[2:]  # one row each, input order
    by_source = {r["source"]: r for r in rows}
    assert by_source[poison]["status"] == "crashed"
    assert "died 2 times while this item was being decoded" in by_source[poison]["error"]
    assert all(by_source[c]["status"] == "ok" for c in clips)
    assert not os.path.exists(out + ".parts")

    # --retry-failed forgives it: tried once more (refused from its header this time)
    code, output = run_cli("audio", str(manifest), "-o", out, "--model", tiny_whisper_en, "--retry-failed",
                           "--max-duration", "60")
    assert code == 3, output
    assert {r["source"]: r["status"] for r in rows_of(out)}[poison] == "decode_error"


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30 + i, 24), (i * 9 % 256, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def _stopped_mid_run(tiny_captioner, http_server, tmp_path) -> tuple[list[str], list[str], str, str, Any]:
    """An images run held open by a slow last URL, its earlier rows done and buffered (not flushed yet):
    (command, paths, slow URL, output, the process)."""
    folder = tmp_path / "img"
    folder.mkdir()
    paths = []
    for i in range(12):
        (folder / f"{i:02d}.png").write_bytes(_png(i))
        paths.append(str(folder / f"{i:02d}.png"))
    http_server.add("/late.png", _png(99), "image/png")
    manifest = tmp_path / "m.csv"
    slow = http_server.url("/slow?delay=6&body=x")  # holds the run open while it is stopped
    manifest.write_text("url\n" + "\n".join(paths + [slow]) + "\n")
    out = str(tmp_path / "out.parquet")
    cmd = [sys.executable, "-m", "batchcap.cli", "images", str(manifest), "-o", out, "--model", tiny_captioner,
           "--batch-size", "2", "--workers", "2", "--flush-every", "1000", "--retries", "0"]
    proc = _start(cmd)
    _wait_for(lambda: http_server.hits["/slow"] >= 1, proc, "the last item was requested")
    time.sleep(1.0)  # the windows before it are done meanwhile: their rows sit in the buffer (no flush yet)
    return cmd, paths, slow, out, proc


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGHUP, 129, "hung up (SIGHUP)")])
def test_sigterm_flushes_buffered_rows_exits_143_and_the_rerun_resumes(tiny_captioner, http_server, tmp_path, sig,
                                                                        code, said):
    """SIGTERM, and SIGHUP (the terminal or ssh session closed, which killed the run like kill -9: the
    buffered rows were lost, and the items in flight counted against crash-loop protection)."""
    expected_code = code
    cmd, paths, slow, out, proc = _stopped_mid_run(tiny_captioner, http_server, tmp_path)
    code, output = _kill(proc, sig)
    assert code == expected_code, output
    assert said in output and "Traceback" not in output
    parts = [p for p in os.listdir(out + ".parts") if p.endswith(".parquet")]
    saved = sum(len(read_table(os.path.join(out + ".parts", p))) for p in parts)
    assert saved >= 2  # the buffer was flushed on the way out
    assert not os.path.exists(out + ".lock") or open(out + ".lock").read().strip() != str(proc.pid)

    code, output = run_cli(*cmd[3:])
    assert code == 3, output  # the slow URL answers text, not an image: a failed row of this run
    rows = rows_of(out)
    assert [r["source"] for r in rows] == paths + [slow]
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["skipped_already_done"] == saved and summary["processed_this_run"] == 13 - saved


def test_ctrl_c_does_not_wait_for_a_download_under_way(tiny_whisper, http_server, tmp_path):
    # a URL dripping its body (one byte every 0.2 s: never a read timeout) when the run is interrupted: the
    # run used to print its error line and then wait at exit for that download (up to --fetch-deadline)
    write_audio(tmp_path / "a.wav", 1.0)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{tmp_path / 'a.wav'}\n{http_server.url('/drip?bytes=150&interval=0.2')}\n")
    out = str(tmp_path / "out.parquet")
    cmd = [sys.executable, "-m", "batchcap.cli", "audio", str(manifest), "-o", out, "--model", tiny_whisper,
           "--fetch-deadline", "600"]
    proc = _start(cmd)
    _wait_for(lambda: http_server.hits["/drip"] >= 1, proc, "the URL was requested")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        out_text, err_text = proc.communicate(timeout=12)  # the drip alone lasts 30 s
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the interrupted run waited for its download")
    assert proc.returncode == 130, out_text + err_text
    assert "interrupted" in err_text and "Traceback" not in err_text


def test_unexpected_error_is_one_line_and_leaves_no_temp(tiny_captioner, tmp_path, monkeypatch):
    from batchcap import output

    folder = tmp_path / "img"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(1))

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output.ResultStore, "finalize", disk_full)
    code, text = run_cli("images", str(folder), "-o", str(tmp_path / "out.parquet"), "--model", tiny_captioner)
    assert code == 1
    assert text.strip().splitlines()[-1].startswith("Error: OSError: [Errno 28] No space left on device")
    assert "Traceback" not in text


def test_exit_code_counts_only_failures_of_this_run(tiny_whisper_en, tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    write_audio(folder / "speech.wav", 0.8)
    import numpy as np
    import soundfile as sf

    sf.write(str(folder / "silence.wav"), np.zeros(12800, np.float32), 16000)
    out = str(tmp_path / "out.parquet")
    code, text = run_cli("audio", str(folder), "-o", out, "--model", tiny_whisper_en)
    assert code == 0, text  # silence is an answer (status empty), not a failure
    assert sorted(r["status"] for r in rows_of(out)) == ["empty", "ok"]

    (folder / "corrupt.wav").write_bytes(b"RIFF" + b"\x00" * 60)
    code, text = run_cli("audio", str(folder), "-o", out, "--model", tiny_whisper_en)
    assert code == 3, text  # this run wrote a failed row
    code, text = run_cli("audio", str(folder), "-o", out, "--model", tiny_whisper_en)
    assert code == 0, text  # nothing failed in this run (the corrupt row is an earlier run's)
    assert "1 decode_error" in text


def test_same_rows_whatever_the_thread_counts(tiny_whisper, tmp_path):
    """Batches are formed from the input alone, so two runs with different worker counts give the same
    text on every row (a clip's transcript depends on its batch partners: padding, precision)."""
    folder = tmp_path / "a"
    folder.mkdir()
    for i in range(14):
        write_audio(folder / f"{i:02d}.wav", 0.3 + ((i * 7) % 11) * 0.17, freq=180 + 37 * i)
    outs = []
    for workers, fetchers in ((1, 1), (4, 7)):
        out = str(tmp_path / f"out-{workers}.parquet")
        code, text = run_cli("audio", str(folder), "-o", out, "--model", tiny_whisper, "--batch-size", "3",
                             "--workers", str(workers), "--fetch-workers", str(fetchers))
        assert code == 0, text
        outs.append([(r["id"], r["text"], r["language"]) for r in rows_of(out)])
    assert outs[0] == outs[1]


def test_a_death_is_counted_once_when_the_run_counting_it_dies_too(tmp_path, monkeypatch):
    """A run that dies (a second kill) after writing suspects.json but before removing the dead run's log
    must not have that death counted again by the next run: innocent items in flight during one kill
    would get a crashed row (the SIGKILL soak found 12 of 200)."""
    from batchcap import journal as journal_module
    from batchcap.journal import Journal

    parts = tmp_path / "o.parquet.parts"
    parts.mkdir()
    (parts / "inflight-dead.log").write_text('+"a.wav"\n+"b.wav"\n-"b.wav"\n+"c.wav"\n')

    class Killed(BaseException):
        pass

    def killed(path):
        raise Killed(path)

    with monkeypatch.context() as patch:
        patch.setattr(journal_module.os, "remove", killed)
        with pytest.raises(Killed):
            Journal(str(parts)).open()
    assert (parts / "inflight-dead.log").exists()

    second = Journal(str(parts))
    second.open()
    second.close()
    assert (second.deaths("a.wav"), second.deaths("b.wav"), second.deaths("c.wav")) == (1, 0, 1)
    assert sorted(os.listdir(parts)) == ["suspects.json"]
    third = Journal(str(parts))
    third.open()  # the record of counted logs is dropped once they are gone; the deaths stay
    third.close()
    assert third.deaths("a.wav") == 1
    assert json.loads((parts / "suspects.json").read_text())["counted"] == []


def test_suspects_written_by_an_older_version_are_read(tmp_path):
    from batchcap.journal import Journal

    parts = tmp_path / "o.parquet.parts"
    parts.mkdir()
    (parts / "suspects.json").write_text(json.dumps({"a.wav": 1, "format": 2}))
    journal = Journal(str(parts))
    journal.open()
    journal.close()
    assert journal.deaths("a.wav") == 1 and journal.deaths("format") == 2


def test_a_full_disk_under_the_journal_is_said_with_its_path(tmp_path, monkeypatch, caplog):
    """A full disk met writing the journal: "Error: OSError: [Errno 28] ..." without a path, and an empty
    journal left (read by the next run as a dead run's). Opening it now says which file; a write that fails
    later drops the journal with a warning, and the run's next part says what is full."""
    import builtins
    import errno

    from batchcap.items import FatalError
    from batchcap.journal import Journal

    parts = tmp_path / "o.parquet.parts"
    real_open = builtins.open

    def full(path, *args, **kwargs):
        if "inflight-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)

    journal = Journal(str(parts))
    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", full)
        with pytest.raises(FatalError, match=rf"cannot write {parts}/inflight-\w+\.log: No space left on device"):
            journal.open()

    class Full:
        def write(self, line):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    journal = Journal(str(parts))
    journal.open()
    journal._file = Full()
    journal.enter("a.wav")
    journal.enter("b.wav")  # no second warning, no error
    journal.close()
    assert caplog.text.count("crash-loop protection is off for the rest of this run") == 1
    assert [n for n in os.listdir(parts) if n.startswith("inflight-")] == []


def test_each_row_of_an_item_done_alone_is_kept_at_once(tmp_path):
    """Items in flight when a run died are done one at a time; each one's row is written before the next
    starts, so a run killed again there does not lose them (the SIGKILL soak: 8 runs in a row made no
    progress, and the first isolated item, killed twice, got a crashed row)."""
    import pyarrow as pa

    from batchcap.items import Item
    from batchcap.job import Job, JobOptions
    from batchcap.output import ResultStore
    from batchcap.runner import run_job

    out = str(tmp_path / "o.parquet")
    parts = out + ".parts"
    os.makedirs(parts)
    with open(os.path.join(parts, "inflight-dead.log"), "w") as f:  # a run died with a, b, c in flight
        f.write('+"a"\n+"b"\n+"c"\n')
    written_before: dict[str, list[str]] = {}

    class Pre:
        def setup(self):
            pass

        def load(self, item, data):
            return item.id

        def size(self, value):
            return 0.0

    class Predictor:
        def predict(self, batch):
            for item_id in batch:  # what a kill at this moment would leave
                written_before[item_id] = sorted(
                    i for _, p in ResultStore(out)._part_files() for i in pa.parquet.read_table(p)["id"].to_pylist())
            return batch

    class Scorer:
        kind, reserved_columns = "test", ("id", "status", "text")

        def row(self, item, loaded, prediction, error):
            return {"id": item.id, "status": error.status if error else "ok", "text": prediction}

        def observe(self, row):
            pass

        def finalize_table(self, table):
            return table

        def summarize(self, table, wall):
            return {}

    import pyarrow.parquet  # noqa: F401

    items = [Item(i, name, name, data=b"x") for i, name in enumerate("abcdef")]
    job = Job(Pre(), Scorer(), Predictor, group=1)
    run_job(items, job, out, JobOptions(batch_size=4, workers=1, fetch_workers=1), predictor=Predictor())
    assert "a" in written_before["b"] and {"a", "b"} <= set(written_before["c"])
    assert [r["id"] for r in rows_of(out)] == list("abcdef")


def test_a_second_ctrl_c_while_stopping_prints_no_traceback(tiny_whisper, http_server, tmp_path):
    # an impatient user presses Ctrl-C twice; the run is already on its way out after the first
    write_audio(tmp_path / "a.wav", 1.0)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{tmp_path / 'a.wav'}\n{http_server.url('/drip?bytes=150&interval=0.2')}\n")
    cmd = [sys.executable, "-m", "batchcap.cli", "audio", str(manifest), "-o", str(tmp_path / "out.parquet"),
           "--model", tiny_whisper, "--fetch-deadline", "600"]
    proc = _start(cmd)
    _wait_for(lambda: http_server.hits["/drip"] >= 1, proc, "the URL was requested")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    assert proc.poll() is None, "the run exited before the second Ctrl-C"
    proc.send_signal(signal.SIGINT)
    try:
        out_text, err_text = proc.communicate(timeout=12)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the twice-interrupted run did not exit")
    # the first Ctrl-C starts the orderly exit; the second ends the process at once (SIGINT's default
    # action, which a shell reports as 130 too): either way, no traceback
    assert proc.returncode in (130, -signal.SIGINT), out_text + err_text
    assert "Traceback" not in err_text, err_text[-2000:]


def test_sigterm_inside_a_finalizer_still_stops_the_run():
    """A signal handler runs wherever the main thread is; raised inside an object's ``__del__`` (a GC
    finalizer, e.g. the regex module's), ``Terminated`` was printed as "Exception ignored" and dropped, and
    the run went on to its end with exit 0. Now the handler tries again once out of the finalizer."""
    from batchcap.cli_common import EXIT_TERMINATED, CommandError, guarded_run

    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before __del__ returns

    finished = False
    with pytest.raises(CommandError) as caught:
        with guarded_run("rerun to resume"):
            Finalized()  # collected at once
            time.sleep(2)
            finished = True
    assert caught.value.exit_code == EXIT_TERMINATED and not finished


def test_ctrl_c_before_the_run_starts_exits_130(monkeypatch, tmp_path):
    """Ctrl-C while a command imports its libraries (before its guarded run) was click's "Aborted!", exit 1."""
    import batchcap.cli as cli

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "setup_logging", interrupted)
    code, output = run_cli("audio", write_audio(tmp_path / "a.wav", 0.5), "-o", tmp_path / "o.parquet")
    assert code == 130
    assert "Error: interrupted" in output and "Aborted" not in output


def test_a_stop_whose_error_line_cannot_be_written_keeps_its_exit_code(tiny_captioner, http_server, tmp_path):
    """``batchcap ... 2>&1 | tee log`` stopped by a scheduler that signals the whole job: tee goes first, the
    one "Error: terminated" line met a closed pipe, and the exit code became 1 ("fatal") instead of 143."""
    *_, proc = _stopped_mid_run(tiny_captioner, http_server, tmp_path)
    proc.stdout.close()
    proc.stderr.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143


def test_a_reader_that_stops_reading_does_not_turn_a_finished_run_into_a_failure(tiny_whisper_en, tmp_path):
    """``batchcap audio ... | head -0``: the table and summary were written, and the process exited 1 without
    a word (the summary lines met a closed pipe). The run's own code now, and this run's statuses in the
    summary for a monitor that reads it rather than the exit code."""
    from tests.conftest import write_audio

    clip = str(write_audio(tmp_path / "a.wav", 1.0))
    out = str(tmp_path / "out.parquet")
    proc = _start([sys.executable, "-m", "batchcap.cli", "audio", clip, "-o", out, "--model", tiny_whisper_en,
                   "--max-new-tokens", "2"])
    proc.stdout.close()  # the reader went away before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=240) == 0, err
    assert "Traceback" not in err and "Error" not in err
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["status_counts_this_run"] == {"ok": 1} == summary["status_counts"]
