"""batchcap audio end to end: real files, a tiny real Whisper, the CLI as users run it."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from batchcap import transcribe
from batchcap.audio import decode_audio
from batchcap.items import DECODE_ERROR, EMPTY, ItemError
from batchcap.metrics import get_normalizer, load_english_spelling, wer_counts
from batchcap.models.common import cache_kwarg
from tests.conftest import tone, write_audio
from tests.helpers import rows_of, run_cli  # noqa: F401

# --- decoding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_decode_resamples_any_rate_to_16k_mono(tmp_path, rate):
    path = write_audio(tmp_path / "a.wav", 2.0, rate=rate, channels=2)
    samples = decode_audio(open(path, "rb").read())
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 32000) <= 2
    # the 440 Hz tone survives resampling: its spectrum peaks at 440 Hz
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 16000 / len(samples) - 440) < 2


@pytest.mark.parametrize("fmt,subtype", [("flac", None), ("ogg", "VORBIS"), ("wav", "PCM_16"), ("mp3", None)])
def test_decode_formats(tmp_path, fmt, subtype):
    path = tmp_path / f"a.{fmt}"
    try:
        sf.write(str(path), tone(1.0, 44100), 44100, subtype=subtype, format=fmt.upper())
    except (sf.LibsndfileError, ValueError, TypeError) as exc:
        pytest.skip(f"this libsndfile cannot write {fmt}: {exc}")
    samples = decode_audio(path.read_bytes())
    assert abs(len(samples) / 16000 - 1.0) < 0.1


def test_decode_m4a_through_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "a.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=44100)
        samples = (tone(1.5, 44100) * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 44100
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    decoded = decode_audio(path.read_bytes())
    assert 1.3 < len(decoded) / 16000 < 1.7


def _encode_with_pyav(path, container_format: str, codec: str, rate: int, seconds: float = 1.5) -> None:
    import av

    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        samples = (tone(seconds, rate) * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_folder_walk_reads_phone_audiobook_and_video_containers(tmp_path):
    """.amr/.3gp (phone recorders), .m4b (audiobooks), .caf, .wv, .w64/.rf64, .mp2, .avi and .mka/.mkv/.mov are
    picked up and decoded."""
    pytest.importorskip("av")
    from batchcap.inputs import Inputs, audio_spec

    made = {
        "a.mka": ("matroska", "libopus", 48000), "b.mkv": ("matroska", "aac", 44100),
        "c.mov": ("mov", "aac", 44100), "d.3gp": ("3gp", "aac", 16000), "e.caf": ("caf", "alac", 44100),
        "f.m4b": ("ipod", "aac", 44100), "g.wv": ("wv", "wavpack", 44100),
        "i.mp2": ("mp2", "mp2", 44100), "j.avi": ("avi", "pcm_s16le", 16000),
    }
    for name, (container_format, codec, rate) in made.items():
        _encode_with_pyav(tmp_path / name, container_format, codec, rate)
    # Sony Wave64 and RF64 (files over 4 GB), which libsndfile reads: skipped as "other types" before
    sf.write(str(tmp_path / "k.w64"), tone(1.5), 16000, format="W64")
    sf.write(str(tmp_path / "l.rf64"), tone(1.5), 16000, format="RF64")
    made.update({"k.w64": None, "l.rf64": None})
    # AMR-NB has no encoder in PyAV's FFmpeg: 75 frames of 20 ms written by hand (mode 12.2k: 0x3C + 31 bytes)
    rng = np.random.default_rng(0)
    (tmp_path / "h.AMR").write_bytes(b"#!AMR\n" + b"".join(
        b"\x3c" + rng.integers(0, 256, 31, dtype=np.uint8).tobytes() for _ in range(75)))
    (tmp_path / "notes.txt").write_text("not audio")

    inputs = Inputs([str(tmp_path)], audio_spec())
    found = sorted(os.path.basename(item.source) for item in inputs)
    assert found == sorted([*made, "h.AMR"])
    assert inputs.stats.skipped_files == 1
    for name in found:
        seconds = len(decode_audio((tmp_path / name).read_bytes())) / 16000
        assert 1.4 < seconds < 1.7, (name, seconds)


@pytest.mark.parametrize("container", ["wav", "mka"])
def test_channels_in_antiphase_do_not_cancel(tmp_path, container):
    """left = -right (a phase-inverted microphone) averages to silence; the loudest channel is taken instead,
    through libsndfile (wav) and FFmpeg (mka) alike. Ordinary stereo is still the mean of its channels."""
    left = tone(2.0, 16000)
    path = tmp_path / f"a.{container}"
    if container == "wav":
        sf.write(str(path), np.stack([left, -left], axis=1), 16000)
    else:
        import av

        with av.open(str(path), "w", format="matroska") as out:
            stream = out.add_stream("pcm_s16le", rate=16000, layout="stereo")
            packed = (np.stack([left, -left], axis=1) * 32767).astype(np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(packed, format="s16", layout="stereo")
            frame.sample_rate = 16000
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                out.mux(packet)
    samples = decode_audio(path.read_bytes())
    assert len(samples) == len(left)
    assert np.sqrt(np.mean(samples ** 2)) == pytest.approx(np.sqrt(np.mean(left ** 2)), rel=0.01)
    sf.write(str(tmp_path / "b.wav"), np.stack([left, 0.5 * left], axis=1), 16000)
    np.testing.assert_allclose(decode_audio((tmp_path / "b.wav").read_bytes()), 0.75 * left, atol=1e-4)


@pytest.mark.parametrize("common", ["hum", "noise", "voice"])
def test_antiphase_channels_with_something_in_common_do_not_cancel(tmp_path, common):
    """A miswired microphone plus what both channels carry in phase (a hum, room noise, a guest's voice):
    the mean kept only the common part, the speech cancelled (an ok row with "" or "."). Two independent
    channels (a call's agent and customer) are still mixed."""
    speech = tone(2.0, 16000, freq=440)
    n = len(speech)
    shared = {"hum": 0.1 * np.sin(2 * np.pi * 50 * np.arange(n) / 16000),
              "noise": 0.05 * np.random.default_rng(0).standard_normal(n),
              "voice": 0.3 * tone(2.0, 16000, freq=700)}[common].astype(np.float32)
    sf.write(str(tmp_path / "a.wav"), np.stack([speech + shared, -speech + shared], axis=1), 16000, subtype="FLOAT")
    samples = decode_audio((tmp_path / "a.wav").read_bytes())
    assert np.dot(samples, speech) / np.dot(speech, speech) == pytest.approx(1.0, abs=0.05)  # the speech is there
    other = tone(2.0, 16000, freq=900)
    sf.write(str(tmp_path / "b.wav"), np.stack([speech, other], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(decode_audio((tmp_path / "b.wav").read_bytes()), (speech + other) / 2, atol=1e-5)


def test_a_dc_offset_is_removed_and_offset_silence_is_silent(tmp_path):
    rng = np.random.default_rng(0)
    sf.write(str(tmp_path / "hum.wav"), (0.2 + 1e-5 * rng.standard_normal(32000)).astype(np.float32), 16000,
             subtype="FLOAT")
    with pytest.raises(ItemError) as err:
        decode_audio((tmp_path / "hum.wav").read_bytes())
    assert err.value.status == EMPTY and "silent" in err.value.message
    voice = tone(2.0, 16000)
    sf.write(str(tmp_path / "offset.wav"), voice + 0.25, 16000, subtype="FLOAT")
    samples = decode_audio((tmp_path / "offset.wav").read_bytes())
    assert abs(float(samples.mean())) < 1e-4
    np.testing.assert_allclose(samples, voice - voice.mean(), atol=1e-5)


@pytest.mark.parametrize("data,status,words", [
    (b"", DECODE_ERROR, "empty file"),
    (b"RIFF\x00\x00garbage-that-is-not-audio" * 10, DECODE_ERROR, "not a readable audio file"),
    (b"<html><body>Not found</body></html>", DECODE_ERROR, "not a readable audio file"),
    # MPEG frame syncs with nothing decodable: libsndfile says "File does not exist", of bytes in memory
    (b"\xff\xfb\x90\x00" * 2000, DECODE_ERROR, "not a readable audio file (MPEG data that does not decode)"),
])
def test_decode_rejects_non_audio(data, status, words):
    with pytest.raises(ItemError) as err:
        decode_audio(data)
    assert err.value.status == status and words in err.value.message
    assert " at 0x" not in err.value.message  # same input, same message: no object addresses
    assert "does not exist" not in err.value.message


def test_decode_rejects_silence_short_clips_and_nan(tmp_path):
    silent = tmp_path / "silence.wav"
    sf.write(str(silent), np.zeros(20 * 16000, np.float32), 16000)
    with pytest.raises(ItemError) as err:
        decode_audio(silent.read_bytes())
    assert err.value.status == EMPTY and "silent" in err.value.message and err.value.fields["duration_s"] == 20.0

    short = write_audio(tmp_path / "short.wav", 0.01)
    with pytest.raises(ItemError) as err:
        decode_audio(open(short, "rb").read())
    assert err.value.status == EMPTY and "10 ms" in err.value.message

    nan = tone(1.0)
    nan[100:110] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(str(path), nan, 16000, subtype="FLOAT")
    with pytest.raises(ItemError) as err:
        decode_audio(path.read_bytes())
    assert err.value.status == DECODE_ERROR and "10 NaN" in err.value.message
    # +inf and -inf in two channels (the downmix and the check meet inf - inf): a row, no numpy warning
    both = np.zeros((16000, 2), np.float32)
    both[10, 0], both[11, 1] = np.inf, -np.inf
    sf.write(str(path), both, 16000, subtype="FLOAT")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ItemError) as err:
            decode_audio(path.read_bytes())
    assert err.value.status == DECODE_ERROR and "NaN or infinite samples" in err.value.message


# --- the command ----------------------------------------------------------------------------------

@pytest.fixture()
def clips(tmp_path):
    """A folder of real recordings at several rates and formats, plus a file that is not audio."""
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    write_audio(folder / "a.wav", 1.0, rate=8000)
    write_audio(folder / "b.flac", 2.5, rate=48000, channels=2, freq=300)
    write_audio(folder / "sub" / "c.wav", 4.0, rate=22050, freq=800)
    (folder / "notes.txt").write_text("not audio")
    return folder


def test_directory_to_parquet_cli(tiny_whisper, clips, tmp_path):
    out = tmp_path / "out.parquet"
    code, output = run_cli("audio", str(clips), "-o", str(out), "--model", tiny_whisper, "--batch-size", "2")
    assert code == 0, output
    rows = rows_of(out)
    assert [os.path.relpath(r["source"], clips) for r in rows] == ["a.wav", "b.flac", "sub/c.wav"]
    assert all(r["status"] == "ok" and r["error"] is None and isinstance(r["text"], str) for r in rows)
    assert [r["duration_s"] for r in rows] == [1.0, 2.5, 4.0]
    assert all(r["model"] == tiny_whisper and r["language"] in ("en", "de", "fr", "es") for r in rows)
    assert f"wrote 3 rows to {out} (3 ok)" in output
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["status_counts"] == {"ok": 3} and summary["skipped_files"] == 1
    assert summary["audio_hours"] == pytest.approx(7.5 / 3600, abs=1e-4)


def test_english_only_model_and_csv_output(tiny_whisper_en, clips, tmp_path):
    out = tmp_path / "out.csv"
    code, output = run_cli("audio", str(clips / "a.wav"), str(clips / "sub"), "-o", str(out),
                           "--model", tiny_whisper_en)
    assert code == 0, output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"] and {r["language"] for r in rows} == {"en"}
    code, output = run_cli("audio", str(clips), "-o", str(tmp_path / "x.csv"), "--model", tiny_whisper_en,
                           "--language", "de")
    assert code == 1 and "English-only" in output


def _manifest_rows(clips):
    return [
        {"file": "clips/a.wav", "transcript": "hello world", "speaker": "s1", "id": "u1"},
        {"file": "clips/b.flac", "transcript": "the colour red", "speaker": "s2", "id": "u2"},
        {"file": "clips/missing.wav", "transcript": "gone", "speaker": "s3", "id": "u3"},
    ]


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet", "jsonl"])
def test_manifests_carry_columns_and_score(tiny_whisper, clips, tmp_path, kind):
    rows = _manifest_rows(clips)
    manifest = tmp_path / f"m.{kind}"
    if kind in ("csv", "tsv"):
        with open(manifest, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if kind == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), manifest)
    else:
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.parquet"
    code, output = run_cli("audio", str(manifest), "-o", str(out), "--model", tiny_whisper)
    assert code == 3, output  # one missing file: rows written, exit says some failed
    got = rows_of(out)
    assert [r["id"] for r in got] == ["u1", "u2", "u3"]
    assert [r["speaker"] for r in got] == ["s1", "s2", "s3"]  # carried unchanged
    assert [r["status"] for r in got] == ["ok", "ok", "fetch_error"]
    assert "file not found" in got[2]["error"] and got[2]["source"].endswith("clips/missing.wav")
    assert [r["reference"] for r in got] == ["hello world", "the colour red", "gone"]
    # row WER is the normalized edit distance; the corpus WER sums edits, it is not a mean of rows
    spelling = load_english_spelling(tiny_whisper)
    errors = words = 0
    for r in got[:2]:
        norm = get_normalizer("auto", r["language"], spelling)
        e, n = wer_counts(norm(r["reference"]), norm(r["text"]))
        assert r["wer"] == pytest.approx(e / n)
        errors, words = errors + e, words + n
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["wer"] == pytest.approx(errors / words, abs=1e-5) and summary["scored_rows"] == 2
    assert summary["status_counts"] == {"fetch_error": 1, "ok": 2}


def test_parquet_with_embedded_audio_bytes(tiny_whisper, clips, tmp_path):
    table = pa.table({"audio": [{"bytes": (clips / "a.wav").read_bytes(), "path": "a.wav"},
                                {"bytes": b"not audio at all", "path": "broken.wav"}],
                      "sentence": ["one", "two"]})
    manifest = tmp_path / "hf.parquet"
    pq.write_table(table, manifest)
    result = transcribe(str(manifest), str(tmp_path / "out.parquet"), model=tiny_whisper, quiet=True)
    got = rows_of(result.output)
    assert [r["source"] for r in got] == ["a.wav", "broken.wav"]
    assert [r["status"] for r in got] == ["ok", "decode_error"] and got[0]["reference"] == "one"
    assert result.failed == 1


def test_bad_inputs_each_get_a_row(tiny_whisper, tmp_path, http_server):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.wav").write_bytes(b"")
    (folder / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(2000))  # fixed: random bytes can parse as MP3
    (folder / "page.mp3").write_text("<html>hello</html>")
    sf.write(str(folder / "silence.wav"), np.zeros(20 * 16000, np.float32), 16000)
    write_audio(folder / "tiny.wav", 0.01)
    nan = tone(1.0)
    nan[5] = np.nan
    sf.write(str(folder / "nan.wav"), nan, 16000, subtype="FLOAT")
    write_audio(folder / "good.wav", 1.0)
    http_server.add("/ok.wav", (folder / "good.wav").read_bytes(), content_type="audio/wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "\n".join([http_server.url("/ok.wav"), http_server.url("/status/404")]) + "\n")
    out = tmp_path / "out.parquet"
    code, output = run_cli("audio", str(folder), str(manifest), "-o", str(out), "--model", tiny_whisper,
                           "--retries", "0")
    assert code == 3, output
    by_name = {os.path.basename(r["source"]): r for r in rows_of(out)}
    assert len(by_name) == 9
    expect = {"empty.wav": ("decode_error", "empty file"), "corrupt.wav": ("decode_error", "not a readable"),
              "page.mp3": ("decode_error", "not a readable"), "silence.wav": ("empty", "silent"),
              "tiny.wav": ("empty", "10 ms"), "nan.wav": ("decode_error", "NaN"), "good.wav": ("ok", None),
              "ok.wav": ("ok", None), "404": ("fetch_error", "404")}
    for name, (status, words) in expect.items():
        row = by_name[name]
        assert row["status"] == status, (name, row)
        assert (row["error"] is None) if words is None else (words in row["error"]), (name, row)
    assert "http_status" not in by_name["404"]  # audio rows carry the HTTP status in the error text
    assert "9 rows" in output and "2 ok" in output


def test_long_recording_is_transcribed_in_full(tiny_whisper, tmp_path):
    """With --long-form sequential, a 45 s recording goes through transformers' long-form decoding over
    all its frames, not a cut at 30 s (the batched default is tested in test_longform.py)."""
    from batchcap.asr import AudioOptions, load_transcriber

    write_audio(tmp_path / "long.wav", 45.0)
    write_audio(tmp_path / "short.wav", 2.0)
    transcriber = load_transcriber(AudioOptions(model=tiny_whisper))
    seen: list[tuple] = []
    generate, live = transcriber.model.generate, transcriber.live_encoder

    def recording_generate(*args, **kwargs):
        feats = kwargs.get("input_features")
        seen.append(tuple(feats.shape) if feats is not None else ("encoder", kwargs["encoder_outputs"][0].shape[1]))
        return generate(*args, **kwargs)

    class RecordingLive:
        cross_attention_cache = live.cross_attention_cache

        def __call__(self, features, pad_values):
            seen.append(("live", features.shape[-1]))
            return live(features, pad_values)

    transcriber.model.generate = recording_generate  # sequential long-form: Whisper's generate
    short = transcriber._generate  # clips up to 30 s

    def recording_short(**kwargs):
        seen.append(("encoder", kwargs["encoder_outputs"][0].shape[1]))
        return short(**kwargs)
    transcriber._generate = recording_short
    transcriber.live_encoder = RecordingLive()
    result = transcribe([str(tmp_path)], str(tmp_path / "out.parquet"), transcriber=transcriber, quiet=True,
                        long_form="sequential")
    rows = rows_of(result.output)
    assert [r["duration_s"] for r in rows] == [45.0, 2.0] and {r["status"] for r in rows} == {"ok"}
    assert all(0 <= s["start"] <= s["end"] <= 45.0 for s in rows[0]["segments"])
    assert (1, 80, 4500) in seen  # all 45 s of features reach long-form generate
    # the 2 s clip: its encoder computes 2 s + 1 s margin = 300 frames; the decoder sees all 1,500 positions
    assert ("live", 300) in seen and ("encoder", 1500) in seen


def test_full_window_option(tiny_whisper, clips, tmp_path):
    from batchcap.asr import AudioOptions, load_transcriber

    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, full_window=True))
    assert transcriber.prepare(tone(2.0)).features.shape == (80, 3000)
    code, output = run_cli("audio", str(clips), "-o", str(tmp_path / "o.parquet"), "--model", tiny_whisper,
                           "--full-window")
    assert code == 0, output
    assert {r["status"] for r in rows_of(tmp_path / "o.parquet")} == {"ok"}
    code, output = run_cli("audio", str(clips), "--model", tiny_whisper, "--window-margin", "0")
    assert code == 2 and "--window-margin" in output


def test_live_window_features_match_full_window_features(tiny_whisper):
    """The live window's frames equal the first frames of Whisper's 30 s features, and its padding
    value is what Whisper computes for zero samples."""
    from batchcap.asr import AudioOptions, load_transcriber

    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, window_margin_s=1.0))
    samples = tone(3.2)
    prepared = transcriber.prepare(samples)
    full = transcriber.feature_extractor(samples, sampling_rate=16000, return_tensors="np").input_features[0]
    assert prepared.features.shape == (80, 450)  # 3.2 s + 1 s, rounded up to half seconds
    np.testing.assert_allclose(prepared.features, full[:, :450], atol=1e-5)
    assert prepared.pad_value == pytest.approx(float(full[0, -1]), abs=1e-6)
    from batchcap.models.whisper import Prepared

    padded = transcriber._pad_stack([prepared, Prepared(full, 30.0, False, float(full.min()))]).numpy()[0]
    np.testing.assert_allclose(padded[:, 450:], full[:, 450:], atol=1e-5)


def _stock_encoder(transcriber, features):
    import torch

    with torch.inference_mode():
        return transcriber.model.get_encoder()(torch.as_tensor(features)).last_hidden_state


def test_live_window_encoder_is_whispers_encoder(tiny_whisper):
    """Over the whole window the live encoder computes exactly what transformers' encoder does; its
    cached silent window is the encoder's output for a window of padding."""
    import torch

    from batchcap.asr import AudioOptions, load_transcriber

    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, dtype="float32"))
    live = transcriber.live_encoder
    samples = tone(5.0)
    full = transcriber.feature_extractor(samples, sampling_rate=16000, return_tensors="np").input_features
    pad_value = float(full.min())
    with torch.inference_mode():
        whole = live(torch.from_numpy(full), [pad_value])
        silence = live.silence(pad_value).states
    torch.testing.assert_close(whole, _stock_encoder(transcriber, full), atol=1e-5, rtol=1e-5)
    flat = np.full((1, 80, 3000), live.key(pad_value), dtype=np.float32)
    torch.testing.assert_close(silence, _stock_encoder(transcriber, flat)[0], atol=1e-5, rtol=1e-5)


def test_live_window_takes_the_tail_from_the_cache(tiny_whisper):
    import torch

    from batchcap.asr import AudioOptions, load_transcriber

    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, dtype="float32"))
    live = transcriber.live_encoder
    quiet, loud = transcriber.prepare(tone(2.0, amp=0.01)), transcriber.prepare(tone(1.0, amp=0.9))
    assert live.key(quiet.pad_value) != live.key(loud.pad_value)  # the floor follows the clip's loudness
    with torch.inference_mode():
        features = transcriber._pad_stack([quiet, loud])
        states = live(features, [quiet.pad_value, loud.pad_value])
    length = features.shape[-1] // 2
    assert states.shape == (2, 1500, transcriber.model.config.d_model)
    torch.testing.assert_close(states[0, length:], live.silence(quiet.pad_value).states[length:])
    torch.testing.assert_close(states[1, length:], live.silence(loud.pad_value).states[length:])
    # the live positions see the clip: they differ from the silent window's
    assert not torch.allclose(states[0, :length], live.silence(quiet.pad_value).states[:length], atol=1e-3)
    assert torch.isfinite(states).all()
    assert len(live._cache) == 2
    for value in np.linspace(-1.5, 0.5, 30):
        live.silence(float(value))
    assert len(live._cache) == live.max_cached


def test_the_cached_silent_windows_keep_half_precision_keys(tiny_whisper):
    """A run holds a cached window per loudness level; in float32 their keys and values (the bulk) are kept in
    float16, and the live encoder and the cross-attention cache give what full-precision ones give."""
    import torch

    from batchcap.asr import AudioOptions, load_transcriber

    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, dtype="float32"))
    live = transcriber.live_encoder
    batch = [transcriber.prepare(tone(2.0, amp=0.01)), transcriber.prepare(tone(1.0, amp=0.9))]
    results = {}
    with torch.inference_mode():
        for compact in (True, False):
            live.compact = compact
            live._cache.clear()
            states, cross = transcriber._encode(batch, False)
            silences = list(live._cache.values())
            assert len(silences) == 2
            held = [t for s in silences for t in (*s.keys, *s.values, *(x for kv in s.cross for x in kv))]
            assert {t.dtype for t in held} == {torch.float16 if compact else torch.float32}
            assert all(s.states.dtype == torch.float32 for s in silences)
            results[compact] = (states, cross)
    assert results[True][0].dtype == torch.float32
    torch.testing.assert_close(results[True][0], results[False][0], atol=2e-3, rtol=2e-3)
    from batchcap.models.attention import _whole_layers

    for (k1, v1), (k0, v0) in zip(*(list(_whole_layers(results[c][1])) for c in (True, False))):
        assert k1.dtype == v1.dtype == torch.float32
        torch.testing.assert_close(k1, k0, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(v1, v0, atol=2e-3, rtol=2e-3)


def test_full_windows_are_encoded_a_few_at_a_time_on_the_cpu(tiny_whisper):
    """A batch of full windows (second detections, suspects, --full-window) is encoded CPU_FULL_WINDOWS clips
    at a time: the feed-forward activations of 16 windows at once made an Italian run's peak. Same states."""
    import torch

    from batchcap.asr import AudioOptions, load_transcriber
    from batchcap.models import whisper as w

    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, dtype="float32"))
    batch = [transcriber.prepare(tone(1.0 + k / 4, freq=200 + 50 * k)) for k in range(6)]
    sizes: list[int] = []
    encoder = transcriber.model.get_encoder()
    handle = encoder.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            states, _ = transcriber._encode(batch, True)
            whole = encoder(transcriber._pad_stack(batch, w.WINDOW_FRAMES)).last_hidden_state
    finally:
        handle.remove()
    assert sizes == [w.CPU_FULL_WINDOWS, 6 - w.CPU_FULL_WINDOWS, 6]
    torch.testing.assert_close(states, whole, atol=1e-5, rtol=1e-5)


def test_cross_attention_cache_projects_only_the_live_positions(tiny_whisper_en):
    """generate with the prefilled cross-attention cache gives the tokens it gives without it, and the
    decoder projects only the live positions of each batch (the silent tail's are cached)."""
    import torch

    from batchcap.asr import AudioOptions, load_transcriber

    # English-only: a multilingual model's generate would first detect the language, without the cache
    transcriber = load_transcriber(AudioOptions(model=tiny_whisper_en, dtype="float32"))
    batch = [transcriber.prepare(tone(s, freq=f, amp=a)) for s, f, a in ((1.0, 300, 0.3), (2.5, 600, 0.05))]
    projected: list[int] = []
    layer = transcriber.model.get_decoder().layers[0].encoder_attn.k_proj
    handle = layer.register_forward_hook(lambda module, args, output: projected.append(args[0].shape[1]))
    try:
        with torch.inference_mode():
            from transformers.modeling_outputs import BaseModelOutput

            states, cross = transcriber._encode(batch, False)
            encoded, cache = BaseModelOutput(last_hidden_state=states), transcriber._cache(cross)
            with_cache = transcriber.model.generate(encoder_outputs=encoded, max_new_tokens=8,
                                                    **{cache_kwarg(transcriber.model): cache})
            # the two silent windows (two loudness levels) once each, then the live 2.5 s + 1 s = 175 positions
            assert projected == [1500, 1500, 175]
            projected.clear()
            without = transcriber.model.generate(encoder_outputs=encoded, max_new_tokens=8)
            assert projected == [1500]  # transformers projects all 1,500 positions of every clip
    finally:
        handle.remove()
    assert with_cache.tolist() == without.tolist()


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_step_attention_equals_sdpa(mask):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from batchcap.models.attention import _step_attention

    gen = torch.Generator().manual_seed(0)
    module = torch.nn.Module().eval()
    module.is_causal = False
    query = torch.randn(2, 3, 1, 8, generator=gen)
    key, value = torch.randn(2, 3, 20, 8, generator=gen), torch.randn(2, 3, 20, 8, generator=gen)
    attention_mask = None
    if mask == "bool":
        attention_mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
        attention_mask[0, ..., 15:] = False
    elif mask == "float":
        attention_mask = torch.zeros(2, 1, 1, 20)
        attention_mask[1, ..., :4] = torch.finfo(torch.float32).min
    for scaling in (None, 1.0, 0.3):
        ours, _ = _step_attention(module, query, key, value, attention_mask, scaling=scaling)
        stock, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)
        torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_step_attention_gives_sdpa_transcripts(tiny_whisper, tmp_path):
    """On the CPU one-token decoding steps skip SDPA's kernel; transcripts stay SDPA's, long-form too."""
    from batchcap.asr import AudioOptions, load_transcriber
    from batchcap.models.attention import NAME

    (tmp_path / "in").mkdir()
    for i, seconds in enumerate((0.6, 1.7, 4.2, 9.0, 45.0)):
        write_audio(tmp_path / "in" / f"{i}.wav", seconds, freq=200 + 150 * i)
    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, dtype="float32", max_new_tokens=12))
    assert transcriber.model.config._attn_implementation == NAME
    # the random tiny model writes mostly timestamp-like tokens, which are not text: compare the tokens
    tokens: list[list[list[int]]] = []

    def recording(generate):
        def record(*args, **kwargs):
            out = generate(*args, **kwargs)
            seqs = out["sequences"] if isinstance(out, dict) else getattr(out, "sequences", out)
            tokens.append(seqs.tolist())
            return out
        return record
    transcriber.model.generate = recording(transcriber.model.generate)  # sequential long-form
    transcriber._generate = recording(transcriber._generate)  # clips up to 30 s
    ours = rows_of(transcribe([str(tmp_path / "in")], str(tmp_path / "a.parquet"), transcriber=transcriber,
                              quiet=True).output)
    ours_tokens, tokens[:] = list(tokens), []
    transcriber.model.set_attn_implementation("sdpa")
    stock = rows_of(transcribe([str(tmp_path / "in")], str(tmp_path / "b.parquet"), transcriber=transcriber,
                               quiet=True).output)
    assert [r["status"] for r in ours] == ["ok"] * 5
    assert [r["text"] for r in ours] == [r["text"] for r in stock]
    assert [r["segments"] for r in ours] == [r["segments"] for r in stock]
    assert ours_tokens == tokens and tokens


def test_fatal_errors_are_one_line(tiny_whisper, tmp_path, clips):
    code, output = run_cli("audio", str(tmp_path / "nope.csv"), "--model", tiny_whisper)
    assert code == 1 and output.strip().splitlines() == [f"Error: input not found: {tmp_path / 'nope.csv'}"]
    bad = tmp_path / "m.csv"
    bad.write_text("foo,bar\n1,2\n")
    code, output = run_cli("audio", str(bad), "-o", str(tmp_path / "o.parquet"), "--model", tiny_whisper)
    assert code == 1 and "--path-column" in output and "Traceback" not in output
    code, output = run_cli("audio", str(bad), "--path-column", "nope", "--model", tiny_whisper)
    assert code == 1 and "no column 'nope'" in output
    code, output = run_cli("audio", str(clips), "-o", str(tmp_path / "o.parquet"), "--model", "some-org/no-such-model")
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1 and "--model /path/to/a/local/model/dir" in errors[0]
    assert "Traceback" not in output and output.strip().splitlines()[-1] == errors[0]
    code, output = run_cli("audio", str(clips), "-o", str(tmp_path / "o.txt"), "--model", tiny_whisper)
    assert code == 1 and ".parquet or .csv" in output
    code, output = run_cli("audio", str(clips), "--batch-size", "0")
    assert code == 2
    # -o "" (an unset variable in a cron line): a usage error, not ./transcripts.parquet
    for args in (["-o", ""], ["--output="], ["-o", "  "]):
        code, output = run_cli("images" if args[0] == "--output=" else "audio", str(clips), *args)
        assert code == 2 and "is empty" in output, output
    assert not (tmp_path / "transcripts.parquet").exists() and not os.path.exists("transcripts.parquet.lock")


def test_lock_refuses_a_second_run(tiny_whisper, clips, tmp_path):
    from batchcap.output import ResultStore

    out = tmp_path / "out.parquet"
    with ResultStore(str(out)):
        code, output = run_cli("audio", str(clips), "-o", str(out), "--model", tiny_whisper)
    assert code == 1 and "another batchcap run" in output and f"pid {os.getpid()}" in output
    code, output = run_cli("audio", str(clips), "-o", str(out), "--model", tiny_whisper)
    assert code == 0, output


def test_a_held_lock_stops_the_run_before_the_model_loads(clips, tmp_path):
    """The lock is a whole-run error found before the (slow) model load: with a model that does not exist,
    the lock's line comes out, not the model's; once the lock is free, the model's."""
    from batchcap.output import ResultStore

    out = tmp_path / "out.parquet"
    missing_model = str(tmp_path / "no-such-model")
    with ResultStore(str(out)):
        code, output = run_cli("audio", str(clips), "-o", str(out), "--model", missing_model)
        assert code == 1 and "another batchcap run" in output and "no-such-model" not in output, output
    code, output = run_cli("audio", str(clips), "-o", str(out), "--model", missing_model)
    assert code == 1 and "no-such-model" in output and "another batchcap run" not in output, output


def test_rerun_skips_done_items_and_picks_up_new_ones(tiny_whisper, clips, tmp_path):
    out = tmp_path / "out.parquet"
    assert run_cli("audio", str(clips), "-o", str(out), "--model", tiny_whisper)[0] == 0
    first = rows_of(out)
    write_audio(clips / "a2.wav", 1.5)
    code, output = run_cli("audio", str(clips), "-o", str(out), "--model", tiny_whisper)
    assert code == 0 and "1 processed, 3 already done" in output
    second = rows_of(out)
    assert [os.path.basename(r["source"]) for r in second] == ["a.wav", "a2.wav", "b.flac", "c.wav"]
    assert [r for r in second if r["id"] != str(clips / "a2.wav")] == first
    code, output = run_cli("audio", str(clips), "-o", str(out), "--model", tiny_whisper, "--overwrite")
    assert code == 0 and "4 processed, 0 already done" in output


def test_retry_failed_redoes_only_failed_rows(tiny_whisper, clips, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{clips / 'a.wav'}\n{tmp_path / 'later.wav'}\n")
    out = tmp_path / "out.parquet"
    assert run_cli("audio", str(manifest), "-o", str(out), "--model", tiny_whisper)[0] == 3
    write_audio(tmp_path / "later.wav", 1.0)
    code, output = run_cli("audio", str(manifest), "-o", str(out), "--model", tiny_whisper)
    # plain rerun: failed rows are kept; this run failed nothing, so it exits 0 (cron stays quiet)
    assert code == 0 and "0 processed, 2 already done" in output and "1 fetch_error" in output
    code, output = run_cli("audio", str(manifest), "-o", str(out), "--model", tiny_whisper, "--retry-failed")
    assert code == 0 and "1 processed, 1 already done" in output
    assert [r["status"] for r in rows_of(out)] == ["ok", "ok"]


def test_progress_total_and_cron_log_lines(tiny_whisper, clips, tmp_path, caplog):
    from batchcap.inputs import Inputs, audio_spec

    assert Inputs([str(clips), str(clips / "a.wav")], audio_spec()).estimate() == 4
    import logging

    from batchcap.progress import Progress

    progress = Progress("audio", total=4, bar=False, log_every=0)
    with caplog.at_level(logging.INFO, logger="batchcap"):
        progress.update(status="ok")
        progress.update(status="fetch_error")
        progress.update(status="empty")  # silence is an answer, not a failure
    assert "audio: 2 processed (1 failed), 0 already done of ~4" in caplog.text
    assert "audio: 3 processed (1 failed), 0 already done of ~4" in caplog.text


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("steps", [1, 3, 40])
def test_shared_tail_attention_equals_sdpa_over_whole_keys(groups, steps, monkeypatch):
    """Cross-attention over per-row live keys + a tail shared by each group of rows gives SDPA's
    result over the materialised keys, for one-token steps, the prompt's first step, and a whole
    transcript at once (taken a few positions at a time: the scores cap is set below one slice)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from batchcap.models import attention
    from batchcap.models.attention import SharedTail, _step_attention, attach_shared_tail

    monkeypatch.setattr(attention, "SCORES_PER_CALL", 5 * 3 * 37 * 6)  # 6 positions per slice
    calls = []
    inner = attention._split_attention

    def counted(query, *args):
        calls.append(query.shape[2])
        return inner(query, *args)
    monkeypatch.setattr(attention, "_split_attention", counted)

    gen = torch.Generator().manual_seed(groups * 10 + steps)
    module = torch.nn.Module().eval()
    module.is_causal = False
    rows, heads, live, span, dim = 5, 3, 7, 30, 8
    query = torch.randn(rows, heads, steps, dim, generator=gen)
    key, value = torch.randn(rows, heads, live, dim, generator=gen), torch.randn(rows, heads, live, dim, generator=gen)
    tail_keys = [torch.randn(heads, span, dim, generator=gen) for _ in range(groups)]
    tail_values = [torch.randn(heads, span, dim, generator=gen) for _ in range(groups)]
    group_of = [0] * rows if groups == 1 else [0, 2, 1, 0, 2]
    index = [None] if groups == 1 else [torch.tensor([r for r in range(rows) if group_of[r] == g])
                                        for g in range(groups)]
    whole_key = torch.cat([key, torch.stack([tail_keys[g] for g in group_of])], dim=2)
    whole_value = torch.cat([value, torch.stack([tail_values[g] for g in group_of])], dim=2)
    tail = SharedTail(tail_keys, tail_values, index)
    attach_shared_tail(key, tail)
    for scaling in (1.0, 0.3):
        ours, _ = _step_attention(module, query, key, value, None, scaling=scaling)
        stock, _ = sdpa_attention_forward(module, query, whole_key, whole_value, None, scaling=scaling)
        torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
    full_key, full_value = tail.full(key, value)  # the fallback (a mask given) materialises the same keys
    assert torch.equal(full_key, whole_key) and torch.equal(full_value, whole_value)
    if steps == 40:  # per call: the whole query, then its slices of at most 6 positions
        assert calls[:8] == [40, 6, 6, 6, 6, 6, 6, 4]


def test_cross_attention_cache_holds_the_silent_tail_once(tiny_whisper_en):
    """The greedy cross-attention cache holds each clip's live positions and, per silent window, one
    tail shared by the clips padded with it: a quarter of the memory of copying it per clip here."""
    import torch

    from batchcap.asr import AudioOptions, load_transcriber
    from batchcap.models.attention import TAIL_ATTR

    transcriber = load_transcriber(AudioOptions(model=tiny_whisper_en, dtype="float32"))
    batch = [transcriber.prepare(tone(s, freq=f, amp=a))
             for s, f, a in ((1.0, 300, 0.3), (2.5, 600, 0.05), (1.5, 500, 0.3), (2.0, 400, 0.3))]
    with torch.inference_mode():
        _, cross = transcriber._encode(batch, False)  # the live window's cross-attention cache
    layers = cross.layers
    assert len(layers) == transcriber.model.config.decoder_layers
    live = 175  # 2.5 s + 1 s margin, 50 positions a second
    held = 0
    for layer in layers:
        assert layer.keys.shape[2] == live and layer.values.shape[2] == live
        tail = getattr(layer.keys, TAIL_ATTR)
        assert len(tail.keys) == 2  # two loudness levels: two silent windows
        assert sorted(len(i) for i in tail.index) == [1, 3]
        assert all(k.shape[1] == 1500 - live for k in tail.keys)
        held += layer.keys.nbytes + layer.values.nbytes
    copied = 2 * len(layers) * layers[0].keys[:, :, :1].nbytes * 1500  # every clip's 1,500 keys and values
    assert held < copied / 4


def test_matmul_weights_cast_once_for_autocast(tiny_whisper_en):
    """In bfloat16 autocast the linear and convolution weights are stored in bfloat16 (embeddings and
    norms stay float32, nothing requires gradients) and the model computes exactly what autocast
    gives with float32 weights: the same encoder states and the same logits."""
    import torch
    from transformers import WhisperForConditionalGeneration

    from batchcap.models.common import cast_matmul_weights

    stock = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_en).eval()
    cast = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_en).eval()
    total = sum(p.numel() for p in cast.parameters())
    assert 0 < cast_matmul_weights(cast, torch.bfloat16) < total
    assert cast.proj_out.weight.dtype == torch.bfloat16 and cast.model.encoder.conv1.weight.dtype == torch.bfloat16
    # the token embedding the output projection shared stays float32: its lookup is unchanged
    assert cast.model.decoder.embed_tokens.weight.dtype == torch.float32
    assert cast.model.encoder.layer_norm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in cast.parameters())
    features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = cast.get_encoder()(features).last_hidden_state
        theirs = stock.get_encoder()(features).last_hidden_state
        tokens = torch.tensor([[1, 5, 9, 2], [3, 3, 7, 4]])
        our_logits = cast(encoder_outputs=(ours,), decoder_input_ids=tokens).logits
        their_logits = stock(encoder_outputs=(theirs,), decoder_input_ids=tokens).logits
    assert torch.equal(ours, theirs)
    assert torch.equal(our_logits, their_logits)


def test_malloc_settings_return_big_blocks_to_the_system():
    """After tune_malloc the mmap threshold is fixed at 16 MB: a freed 20 MB block is unmapped at once, even
    after a bigger block raised glibc's dynamic threshold (which keeps such blocks resident in the heap by
    default); a 1 MB block comes from the heap (its pages go back with release_free_heap after a batch)."""
    import subprocess
    import sys

    code = r"""
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
if sys.argv[1] == "tuned":
    from batchcap.memory import tune_malloc
    assert tune_malloc()
libc.free(libc.malloc(24 << 20))  # raises the default dynamic threshold to 24 MB
counts = []
for size in (20 << 20, 1 << 20):
    before = libc.mallinfo2().hblks  # blocks served by mmap
    block = libc.malloc(size)
    counts.append(str(libc.mallinfo2().hblks - before))
    libc.free(block)
print(",".join(counts))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    counts = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                                   env=env).stdout.strip() for mode in ("default", "tuned")}
    assert counts == {"default": "0,0", "tuned": "1,0"}


def test_a_wav_whose_data_size_was_never_written_is_read_to_the_end():
    # a recorder that died before closing leaves the data chunk's size at 0: libsndfile reads no samples,
    # so the row was "empty" and the run exited 0 with the recording lost; FFmpeg reads to the end
    import io
    import struct

    buffer = io.BytesIO()
    sf.write(buffer, tone(1.0), 16000, format="WAV", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    at = data.find(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 0)
    assert len(decode_audio(bytes(data))) == 16000
    empty = io.BytesIO()
    sf.write(empty, np.zeros(0, np.float32), 16000, format="WAV", subtype="PCM_16")
    with pytest.raises(ItemError) as err:
        decode_audio(empty.getvalue())
    assert err.value.status == EMPTY and "no audio samples" in err.value.message


def _pyav_bytes(container_format: str, codec: str, rate: int, tracks: list[tuple[np.ndarray, str]],
                frame_size: int = 1024, start_s: float = 0.0) -> bytes:
    """Float tracks (samples, "mono" / "stereo") encoded by FFmpeg into one file, frame by frame, the
    first timestamp at ``start_s``."""
    import fractions

    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as container:
        streams = []
        for samples, layout in tracks:
            stream = container.add_stream(codec, rate=rate)
            stream.layout = layout
            streams.append((stream, samples, 2 if layout == "stereo" else 1))
        for stream, samples, channels in streams:
            for i in range(0, len(samples), frame_size):
                chunk = np.pad(samples[i:i + frame_size], (0, max(0, i + frame_size - len(samples))))
                frame = av.AudioFrame.from_ndarray(np.tile(chunk, (channels, 1)).astype(np.float32), format="fltp",
                                                   layout="stereo" if channels == 2 else "mono")
                frame.sample_rate, frame.pts = rate, int(start_s * rate) + i
                frame.time_base = fractions.Fraction(1, rate)
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
    return buf.getvalue()


def _mp3(seconds: float) -> bytes:
    return _pyav_bytes("mp3", "libmp3lame", 16000, [(tone(seconds, 16000), "mono")], frame_size=1152)


def _aac(container_format: str, tracks: list[tuple[np.ndarray, str]], rate: int = 48000) -> bytes:
    """AAC tracks (samples, "mono" / "stereo") in one container."""
    return _pyav_bytes(container_format, "aac", rate, tracks)


def _opus_webm(seconds: float, start_s: float = 0.0, container_format: str = "webm") -> bytes:
    return _pyav_bytes(container_format, "libopus", 48000, [(tone(seconds, 48000), "mono")], frame_size=960,
                       start_s=start_s)


def test_a_little_damage_in_an_mp3_is_skipped_and_much_is_a_decode_error():
    # 2000 bad bytes in 20 s of MP3 failed the whole file (FFmpeg stopped at the first bad packet)
    data = bytearray(_mp3(20.0))
    rng = np.random.default_rng(0)
    middle = len(data) // 2
    data[middle:middle + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    assert 18.5 < len(decode_audio(bytes(data))) / 16000 < 20.1
    start, stop = len(data) // 20, len(data) // 20 + len(data) * 3 // 10  # 30 % of the file
    data[start:stop] = rng.integers(0, 256, stop - start, dtype=np.uint8).tobytes()
    with pytest.raises(ItemError) as err:
        decode_audio(bytes(data))
    assert err.value.status == DECODE_ERROR and "damaged audio" in err.value.message


def test_joined_mp3_files_are_read_to_the_end():
    """``cat part1.mp3 part2.mp3``: libsndfile's MPEG reader stopped at the first part's frame count (its
    LAME header), so the second part was dropped from an ``ok`` row; MP3 goes through FFmpeg now."""
    first, second = _mp3(3.0), _mp3(2.0)
    assert abs(len(decode_audio(first)) / 16000 - 3.0) < 0.15
    assert abs(len(decode_audio(first + second)) / 16000 - 5.0) < 0.3


def test_high_sample_rates_decode_in_the_memory_of_16k():
    """10 s at 384 kHz: the source-rate samples (15 MB here; 1.6 GB for a 1.5 MB FLAC of 10 minutes at
    655 kHz) were held whole before resampling. Blocks are resampled as they are read now, to the same
    samples as one whole-array resampling gives."""
    import tracemalloc

    import soxr

    rate, seconds = 384_000, 10
    signal = (np.sin(2 * np.pi * 440 * np.arange(rate * seconds) / rate) * 16000).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, signal, rate, format="FLAC", subtype="PCM_16")
    tracemalloc.start()
    try:
        decoded = decode_audio(buf.getvalue())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * rate * seconds / 4, peak  # under a quarter of the source-rate float32 samples (15.4 MB)
    whole = soxr.resample(signal.astype(np.float32) / 32768, rate, 16000, quality="HQ")
    np.testing.assert_array_equal(decoded, whole)


def _float_wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_float_samples_beyond_full_scale_are_brought_within_it():
    """A corrupt sample (3e38, finite) made the log-mel inf / NaN: a ``model_error`` that failed its whole
    batch. Integer samples stored as float (x 32767) came out an ``ok`` row with no text. The first is clipped
    (only the samples around it change), the second divided by its level."""
    clean = tone(2.0) * 0.5
    reference = decode_audio(_float_wav(clean))
    spiked = clean.copy()
    spiked[8000] = 3e38
    decoded = decode_audio(_float_wav(spiked))
    assert np.isfinite(decoded).all() and np.abs(decoded).max() < 1.2
    changed = np.flatnonzero(np.abs(decoded - reference) > 1e-4)
    assert len(changed) and changed.min() > 7900 and changed.max() < 8100, changed
    scaled = decode_audio(_float_wav(clean * 32767))
    assert np.abs(scaled).max() < 1.2
    assert 0.95 < np.abs(scaled).max() < 1.05  # the tone, at full scale rather than at 32767 times it
    ratio = np.dot(scaled, reference) / np.dot(reference, reference)
    np.testing.assert_allclose(scaled, np.clip(reference * ratio, -1, 1), atol=0.01)  # the top 0.1 % clipped


def test_a_corrupt_sample_fails_neither_its_row_nor_its_batch(tiny_whisper, tmp_path, caplog):
    folder = tmp_path / "calls"
    folder.mkdir()
    clean = tone(2.0) * 0.5
    spiked = clean.copy()
    spiked[8000] = 3e38
    (folder / "a.wav").write_bytes(_float_wav(clean))
    (folder / "b.wav").write_bytes(_float_wav(spiked))
    code, output = run_cli("audio", folder, "-o", tmp_path / "out.parquet", "--model", tiny_whisper,
                           "--max-new-tokens", "4")
    assert code == 0, output
    assert [r["status"] for r in rows_of(tmp_path / "out.parquet")] == ["ok", "ok"]
    assert "one at a time" not in output


def test_a_silent_track_beside_a_spoken_one_and_a_layout_change_midway():
    """A meeting recorder's MP4: system audio (silent) on track 1, the microphone on track 2: the row was
    ``empty`` ("audio is silent"); the first track that is not silent is read now. An ADTS stream going from
    mono to stereo midway (joined AAC files, a broadcast's ad break) was a decode_error ("Frame does not
    match AudioResampler setup"): each stretch gets its own resampler now."""
    pytest.importorskip("av")
    signal = tone(2.0, 48000) * 0.5
    decoded = decode_audio(_aac("mp4", [(np.zeros_like(signal), "mono"), (signal, "stereo")]))
    assert abs(len(decoded) / 16000 - 2.0) < 0.1 and np.abs(decoded).max() > 0.1
    with pytest.raises(ItemError, match="audio is silent in all 2 audio tracks"):
        decode_audio(_aac("mp4", [(np.zeros_like(signal), "mono"), (np.zeros_like(signal), "mono")]))
    joined = _aac("adts", [(signal, "mono")]) + _aac("adts", [(signal, "stereo")])
    assert abs(len(decode_audio(joined)) / 16000 - 4.0) < 0.15


def test_mp3_and_webm_cut_short_are_decode_errors_like_flac():
    """The first half of an MP3 (with its Xing frame count) or a WebM (a partial download) was an ``ok`` row
    transcribed from the fragment, where the same cut FLAC is a decode_error: their headers announce the
    whole length, and a file holding under 90 % of it is a decode_error now."""
    pytest.importorskip("av")
    for data in (_mp3(6.0), _opus_webm(6.0)):
        assert abs(len(decode_audio(data)) / 16000 - 6.0) < 0.15
        with pytest.raises(ItemError, match=r"truncated audio: the file holds [23]\.\d s of the 6\.\d s its header"):
            decode_audio(data[:len(data) // 2])


def test_a_segment_whose_timestamps_start_late_is_its_own_length():
    """ffmpeg's segment muxer keeps a long recording's timestamps: a 5 s WebM starting at 4.5 h was refused
    as "recording is 4.5 h long" (Matroska declares the end time)."""
    pytest.importorskip("av")
    for fmt in ("webm", "matroska"):
        assert abs(len(decode_audio(_opus_webm(5.0, start_s=4.5 * 3600, container_format=fmt))) / 16000 - 5.0) < 0.1


def test_a_complete_matroska_file_whose_audio_is_shorter_than_its_video_is_whole():
    """A screen recording: 40 s of video (here a second, longer audio track), 10 s of audio. Matroska's
    segment duration is its longest track's: the audio was refused as "truncated audio"; each track's own
    DURATION tag is its length. A silent first track beside a shorter spoken one is transcribed too."""
    signal = tone(10.0, 48000) * 0.5
    longer = tone(40.0, 48000, freq=300) * 0.5
    decoded = decode_audio(_aac("matroska", [(signal, "mono"), (longer, "mono")]))
    assert abs(len(decoded) / 16000 - 10.0) < 0.15
    spoken_second = decode_audio(_aac("matroska", [(np.zeros(20 * 48000, np.float32), "mono"), (signal, "mono")]))
    assert abs(len(spoken_second) / 16000 - 10.0) < 0.15 and np.abs(spoken_second).max() > 0.1


def test_lossy_overshoot_is_left_as_it_was_and_a_scaled_second_track_is_scaled():
    """A loud master decodes to peaks of 1.1-1.5 (codec overshoot): it was taken for integer-scaled floats,
    decoded three times and divided by its level; it is left as it was now. Integer-scaled float samples on
    a second track (after a silent first) were re-read from the first track: zeros, and a row saying "you"."""
    loud = np.clip(tone(4.0, 48000, amp=1.0) * 1.5, -1, 1)
    data = _aac("matroska", [(loud, "mono")])
    import av

    with av.open(io.BytesIO(data)) as container:
        raw = np.concatenate([f.to_ndarray().ravel() for f in container.decode(audio=0)])
    assert np.abs(raw).max() > 1.0  # the codec's overshoot
    assert np.abs(decode_audio(data)).max() > 1.0  # not scaled, not clipped
    scaled = _pyav_bytes("matroska", "pcm_f32le", 16000,
                         [(np.zeros(32000, np.float32), "mono"), (tone(2.0) * 20000, "mono")])
    samples = decode_audio(scaled)
    assert 0.9 < np.abs(samples).max() <= 1.0 + 1e-6  # the second track, brought within full scale
