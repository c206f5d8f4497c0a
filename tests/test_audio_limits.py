"""--max-duration: hours of near-silence compress to a small FLAC or Opus file; the cap is checked from
the header before decoding and enforced while decoding (libsndfile blocks, PyAV frames)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf

from batchcap.audio import BLOCK_FRAMES, decode_audio
from batchcap.items import DECODE_ERROR, ItemError
from tests.conftest import write_audio
from tests.helpers import rows_of, run_cli

RATE = 4000


def long_flac(hours: float = 3.0) -> bytes:
    """``hours`` of digital silence and one second of tone, as FLAC (a few hundred KB), written in blocks."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=RATE, channels=1, format="FLAC", subtype="PCM_16") as f:
        minute = np.zeros(RATE * 60, np.int16)
        for _ in range(int(hours * 60)):
            f.write(minute)
        f.write((np.sin(np.arange(RATE) / 3) * 8000).astype(np.int16))
    return buf.getvalue()


def without_length(flac: bytes) -> bytes:
    """The same FLAC with STREAMINFO's total-samples field 0 ("unknown"), as streamed encoders write it."""
    data = bytearray(flac)
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # the first metadata block is STREAMINFO
    streaminfo = 8
    data[streaminfo + 13] &= 0xF0  # total samples: the low 4 bits of byte 13 and bytes 14-17
    data[streaminfo + 14:streaminfo + 18] = b"\0\0\0\0"
    return bytes(data)


def opus_mkv(seconds: int, declared_ms: float | None = None) -> bytes:
    """Opus in Matroska (read through PyAV, not libsndfile): ``seconds`` of silence ending in a tone;
    ``declared_ms`` overwrites the Duration the container declares (and hides the track's DURATION tag)."""
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    rate = 16000
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("libopus", rate=rate)
        stream.layout = "mono"
        for second in range(seconds):
            samples = np.zeros((1, rate), np.int16)
            if second == seconds - 1:
                samples[0] = (np.sin(np.arange(rate) / 3) * 8000).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, second * rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = bytearray(buf.getvalue())
    if declared_ms is not None:
        at = data.find(b"\x44\x89\x88")  # Segment Info / Duration, an 8-byte float (ms)
        assert at > 0
        data[at + 3:at + 11] = struct.pack(">d", declared_ms)
        data = data.replace(b"DURATION", b"XURATION")  # the tag FFmpeg's muxer writes per track: unread
    return bytes(data)


@pytest.fixture(scope="module")
def flac_3h() -> bytes:
    return long_flac(3.0)


def test_long_flac_is_refused_from_its_header(flac_3h):
    assert len(flac_3h) < 2_000_000  # 3 hours in a small file: the reason for the cap
    with pytest.raises(ItemError) as err:
        decode_audio(flac_3h, max_duration_s=60)
    assert err.value.status == DECODE_ERROR
    assert "longer than --max-duration (60 s)" in err.value.message and "3.0 h" in err.value.message
    assert err.value.fields["decoded_s"] == 0  # nothing decoded
    assert err.value.fields["duration_s"] == pytest.approx(3 * 3600 + 1)


def test_flac_without_a_length_stops_at_the_cap_while_decoding(flac_3h):
    data = without_length(flac_3h)
    assert sf.info(io.BytesIO(data)).frames > 2**62  # libsndfile: length unknown
    with pytest.raises(ItemError) as err:
        decode_audio(data, max_duration_s=60)
    assert err.value.status == DECODE_ERROR and "longer than --max-duration (60 s)" in err.value.message
    decoded = err.value.fields["decoded_s"]
    assert 60 < decoded <= 60 + BLOCK_FRAMES / RATE  # the cap plus at most one block, never the 3 hours


def test_under_the_cap_decodes():
    samples = decode_audio(long_flac(2 / 60), max_duration_s=180)  # 2 min of silence + 1 s of tone
    assert len(samples) == pytest.approx(121 * 16000, abs=4)


def test_opus_through_pyav_with_a_lying_container_duration():
    data = opus_mkv(100, declared_ms=1000.0)  # says 1 s, holds 100 s
    with pytest.raises(sf.LibsndfileError):
        sf.info(io.BytesIO(data))  # not libsndfile's: the PyAV path decodes it
    with pytest.raises(ItemError) as err:
        decode_audio(data, max_duration_s=30)
    assert err.value.status == DECODE_ERROR and "longer than --max-duration (30 s)" in err.value.message
    assert 30 < err.value.fields["decoded_s"] <= 30.1  # stopped within one Opus frame of the cap
    assert len(decode_audio(data, max_duration_s=200)) == pytest.approx(100 * 16000, rel=0.01)


def test_opus_through_pyav_refused_from_the_container_duration():
    with pytest.raises(ItemError) as err:
        decode_audio(opus_mkv(40), max_duration_s=30)
    assert "40.0 s long" in err.value.message and err.value.fields["decoded_s"] == 0


def test_cli_max_duration_makes_a_decode_error_row(tiny_whisper, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "long.flac").write_bytes(long_flac(0.5))  # 30 min
    write_audio(folder / "short.wav", 1.0)
    out = tmp_path / "out.parquet"
    code, output = run_cli("audio", folder, "--model", tiny_whisper, "-o", out, "--device", "cpu",
                           "--max-duration", "600", "-q")
    assert code == 3, output
    rows = {r["source"].rsplit("/", 1)[-1]: r for r in rows_of(out)}
    assert rows["short.wav"]["status"] == "ok"
    assert rows["long.flac"]["status"] == DECODE_ERROR
    assert "longer than --max-duration (10.0 min)" in rows["long.flac"]["error"]
    assert rows["long.flac"]["duration_s"] == pytest.approx(1801)
    # the same cap written with a unit, or as H:MM:SS; a duration that is not one is a usage error
    for cap in ("10m", "0:10:00"):
        code, output = run_cli("audio", folder, "--model", tiny_whisper, "-o", tmp_path / f"o{cap[-1]}.csv",
                               "--device", "cpu", "--max-duration", cap, "-q")
        assert code == 3 and "longer than --max-duration (10.0 min)" in rows_of(tmp_path / f"o{cap[-1]}.csv")[0][
            "error"], output
    code, output = run_cli("audio", folder, "--model", tiny_whisper, "--max-duration", "ten minutes")
    assert code == 2 and "is not a duration" in output


def test_parse_duration():
    from batchcap.cli_options import parse_duration

    assert [parse_duration(t) for t in ("14400", "90s", "30min", "11h", "1.5h", "1:30:00", "90:00")] == [
        14400, 90, 1800, 39600, 5400, 5400, 5400]
    assert parse_duration("none") is None and parse_duration("0") is None
    for bad in ("abc", "-5", "1:-2", "nan", "inf", "5x", "1:2:3:4", ""):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)


def test_an_array_sized_from_a_header_that_overstated_is_given_back():
    """Samples are gathered into an array sized from the header's frame count; where far fewer came, the
    result is a copy of what there is, not a view keeping the whole announced array alive."""
    from batchcap.audio import _Samples

    collected = _Samples(16000, 16000, expected_frames=16000 * 3600)  # an hour announced
    collected.add(np.ones(16000, np.float32))
    samples = collected.finish()
    assert len(samples) == 16000 and samples.base is None
    whole = _Samples(16000, 16000, expected_frames=16000)
    whole.add(np.ones(16000, np.float32))
    assert whole.finish().base is not None  # as announced: no copy
