"""Batched long-form through the real pipeline with a tiny Whisper: windows, batches, order, subtitles,
resume, and flat feature memory on a 2-hour file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from batchcap import longform
from batchcap.asr import AudioOptions, load_transcriber, transcribe
from tests.conftest import write_audio
from tests.helpers import rows_of, run_cli
from tests.test_subtitles import parse_srt, parse_vtt
from tests.test_vad import tones_and_silences

SR = 16_000


def long_file(path, minutes: float, seed: int = 0) -> tuple[str, list[tuple[float, float]]]:
    pattern: list[tuple[str, float]] = [("silence", 0.5)]
    total = 0.5
    while total < minutes * 60 - 8:
        pattern += [("tone", 5.0), ("silence", 1.5)]
        total += 6.5
    samples, spans = tones_and_silences(pattern, seed=seed)
    sf.write(str(path), samples, SR, subtype="PCM_16")
    return str(path), spans


def count_batches(transcriber):
    """Wrap transcribe() to record, per model batch, how many units it had and their durations. The
    random tiny model often says nothing on tones: each unit then gets the text "u<seconds>" over its
    whole span, so that stitching has something to put in order."""
    from batchcap.models.whisper_timestamps import whole_clip

    seen: list[list[float]] = []
    inner = transcriber.transcribe

    def recording(batch):
        seen.append([p.duration_s for p in batch])
        results = inner(batch)
        for p, r in zip(batch, results):
            if not r["text"]:
                r["text"] = f"u{p.duration_s:.2f}"
                r["segments"] = whole_clip(r["text"], p.duration_s)
        return results
    transcriber.transcribe = recording
    return seen


def test_long_files_are_windowed_batched_and_stitched(tiny_whisper, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    a, spans_a = long_file(inputs / "a.wav", 3.0)
    b, _ = long_file(inputs / "b.wav", 1.5, seed=1)
    write_audio(inputs / "c.wav", 2.0)
    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, timestamps=False))  # one segment per window
    seen = count_batches(transcriber)
    result = transcribe([str(inputs)], str(tmp_path / "out.parquet"), transcriber=transcriber, quiet=True,
                        batch_size=4)
    rows = rows_of(result.output)
    assert [os.path.basename(r["id"]) for r in rows] == ["a.wav", "b.wav", "c.wav"]  # input order
    assert [r["status"] for r in rows] == ["ok"] * 3
    # every model batch holds at most 4 units, all windows of at most 30 s; windows of the two long
    # files and the short clip were batched together (3 + 1 minutes of tones need more than 10 windows)
    assert all(len(batch) <= 4 and max(batch) <= 30.0 for batch in seen)
    assert sum(len(batch) for batch in seen) >= 10 and len(seen) >= 3
    assert any(2.0 in batch and len(batch) > 1 for batch in seen)  # the clip shares a batch with windows
    for row in rows[:2]:
        segs = row["segments"]
        assert segs and all(s["start"] < s["end"] for s in segs)
        assert all(x["end"] <= y["start"] for x, y in zip(segs, segs[1:]))  # in time order, no overlap
        assert 0 <= segs[0]["start"] and segs[-1]["end"] <= row["duration_s"]
    # without timestamp tokens each window is one segment: every tone lies inside one of them
    segs_a = rows[0]["segments"]
    assert all(any(s["start"] <= lo and hi <= s["end"] for s in segs_a) for lo, hi in spans_a)
    assert all(s["end"] - s["start"] <= 30.0 for s in segs_a)
    assert rows[0]["text"] == " ".join(s["text"] for s in segs_a)
    assert rows[2]["segments"] == [{"start": 0.0, "end": 2.0, "text": rows[2]["text"]}]


def test_two_hour_file_keeps_only_a_few_windows_of_features(tiny_whisper, tmp_path):
    # 2 hours: a 1 s tone every 30 s (so that the tiny model's time stays small); the pauses are left out,
    # 17 tones joined per window of at most 24 s (each heard with 0.2 s of pause either side): 15 windows,
    # in 4 sub-batches of 4
    samples, _ = tones_and_silences([("silence", 14.5)] + [("tone", 1.0), ("silence", 29.0)] * 240)
    path = str(tmp_path / "two-hours.wav")
    sf.write(path, samples, SR, subtype="PCM_16")
    del samples
    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, max_new_tokens=2))
    count_batches(transcriber)
    longform.FEATURES.reset()
    result = transcribe([path], str(tmp_path / "out.parquet"), transcriber=transcriber, quiet=True, batch_size=4)
    (row,) = rows_of(result.output)
    assert row["status"] == "ok" and row["duration_s"] > 7100
    assert longform.FEATURES.made == 15
    assert longform.FEATURES.peak <= 2 * 4  # the sub-batch running and the one being prepared
    assert longform.FEATURES.alive == 0
    segments = row["segments"]
    # a segment in every window, the last one's included (it starts at the 239th tone, 7154 s); a segment
    # over joined tones is cut by its words, so it need not reach the last tone itself
    assert len(segments) >= 15 and segments[-1]["end"] > 7154 and segments[0]["start"] >= 14.0
    assert all(x["end"] <= y["start"] for x, y in zip(segments, segments[1:]))


def test_write_subtitles_resume_keeps_them_overwrite_redoes(tiny_whisper, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    long_file(inputs / "talk.wav", 1.0)
    write_audio(inputs / "short.wav", 1.5)
    model_args = ["--model", tiny_whisper]
    out = tmp_path / "out.parquet"
    code, text = run_cli("audio", inputs, "-o", out, *model_args, "--write", "srt,vtt", "-q")
    assert code == 0, text
    subs = tmp_path / "out.subtitles"
    names = sorted(os.listdir(subs))
    assert len(names) == 4 and all(n.split("~")[0] in ("talk", "short") for n in names)
    srt_path = next(subs / n for n in names if n.startswith("talk") and n.endswith(".srt"))
    cues = parse_srt(srt_path.read_text())
    assert [c[0] for c in cues] == list(range(1, len(cues) + 1))
    assert all(c[1] <= c[2] for c in cues) and [c[1] for c in cues] == sorted(c[1] for c in cues)
    vtt = next(subs / n for n in names if n.startswith("talk") and n.endswith(".vtt"))
    assert parse_vtt(vtt.read_text()) == [(a, b, t) for _, a, b, t in cues]
    # a rerun resumes: nothing to do, the files stay as they are (even edited by hand)
    srt_path.write_text("kept\n")
    code, text = run_cli("audio", inputs, "-o", out, *model_args, "--write", "srt,vtt", "-q")
    assert code == 0 and srt_path.read_text() == "kept\n"
    # a file removed meanwhile is written again from the table; txt added on a rerun is written for all
    os.unlink(vtt)
    code, text = run_cli("audio", inputs, "-o", out, *model_args, "--write", "srt,vtt,txt", "-q")
    assert vtt.exists() and len(os.listdir(subs)) == 6 and srt_path.read_text() == "kept\n"
    code, text = run_cli("audio", inputs, "-o", out, *model_args, "--write", "srt", "--overwrite", "-q")
    assert code == 0 and srt_path.read_text() != "kept\n"
    # export from the finished table gives the same SRT
    code, text = run_cli("export", out, "--format", "srt", "-o", tmp_path / "exported")
    assert code == 0, text
    assert (tmp_path / "exported" / srt_path.name).read_text() == srt_path.read_text()


def test_a_silent_recording_gets_its_empty_subtitle_files_too(tiny_whisper, tmp_path):
    """One file per recording: a digitally silent one (status empty) got none, where one that Whisper heard
    nothing in got empty files; batch consumers then missed files. Both get them now, from the run and export."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_audio(inputs / "talk.wav", 1.5)
    sf.write(inputs / "silent.wav", np.zeros(32000, dtype=np.float32), 16000)
    out = tmp_path / "out.parquet"
    code, text = run_cli("audio", inputs, "-o", out, "--model", tiny_whisper, "--write", "srt,vtt,txt", "-q")
    assert code == 0, text
    assert {r["id"].rsplit("/", 1)[1]: r["status"] for r in rows_of(out)} == {"talk.wav": "ok", "silent.wav": "empty"}
    silent = sorted(n for n in os.listdir(tmp_path / "out.subtitles") if n.startswith("silent"))
    assert [n.rsplit(".", 1)[1] for n in silent] == ["srt", "txt", "vtt"]
    vtt = (tmp_path / "out.subtitles" / silent[2]).read_text()
    assert vtt.startswith("WEBVTT") and "-->" not in vtt
    code, text = run_cli("export", out, "--format", "srt", "-o", tmp_path / "exported")
    assert code == 0 and any(n.startswith("silent") for n in os.listdir(tmp_path / "exported")), text


def test_sequential_long_form_and_no_speech(tiny_whisper, tmp_path):
    path, _ = long_file(tmp_path / "a.wav", 0.75)
    quiet = tmp_path / "hum.wav"
    rng = np.random.default_rng(0)
    hum = (0.01 * rng.standard_normal(40 * SR)).astype(np.float32)
    sf.write(str(quiet), hum, SR)
    transcriber = load_transcriber(AudioOptions(model=tiny_whisper))
    result = transcribe([path, str(quiet)], str(tmp_path / "seq.parquet"), transcriber=transcriber, quiet=True,
                        long_form="sequential")
    rows = rows_of(result.output)
    assert rows[0]["status"] == "ok" and all(s["end"] <= rows[0]["duration_s"] for s in rows[0]["segments"])
    # steady noise without pauses is speech for the energy VAD only if it is loud; this hum is a quiet floor
    result = transcribe([str(quiet)], str(tmp_path / "b.parquet"), transcriber=transcriber, quiet=True)
    (row,) = rows_of(result.output)
    assert row["status"] in ("ok", "empty")
    code, text = run_cli("audio", path, "-o", tmp_path / "x.parquet", "--model", tiny_whisper, "--write", "doc")
    assert code == 1 and "unknown subtitle format 'doc'" in text


def test_sequential_features_are_the_extractors_a_chunk_at_a_time(tiny_whisper, monkeypatch):
    """--long-form sequential needs a recording's whole log-mel: the extractor's STFT of an hour raised peak
    RSS by 1.8 GB. Taken a minute of frames at a time, the values are the same and no STFT sees more."""
    import torch
    from transformers import WhisperFeatureExtractor

    from batchcap.models import whisper

    extractor = WhisperFeatureExtractor.from_pretrained(tiny_whisper)
    rng = np.random.default_rng(0)
    for length in (SR * 31 + 17, SR * 40 + 39, SR * 95 + 150):  # the last frame's span past the end, or not
        samples = (0.1 * rng.standard_normal(length) * np.sin(np.arange(length) / 3000)).astype(np.float32)
        stock = extractor(samples, sampling_rate=SR, truncation=False, padding="longest",
                          return_tensors="np").input_features[0]
        for chunk in (whisper.LONG_CHUNK_FRAMES, 777):
            np.testing.assert_allclose(whisper.long_log_mel(extractor, samples, chunk), stock, rtol=0, atol=1e-6)

    seen: list[int] = []
    stft = torch.stft
    monkeypatch.setattr(torch, "stft", lambda signal, *a, **k: seen.append(signal.shape[-1]) or stft(signal, *a, **k))
    samples = (0.1 * rng.standard_normal(SR * 150)).astype(np.float32)
    prepared = whisper.WhisperFeatures(tiny_whisper).prepare(samples)
    assert prepared.long_form and prepared.features.shape[-1] == 150 * 100
    bound = (whisper.LONG_CHUNK_FRAMES - 1) * extractor.hop_length + extractor.n_fft
    assert len(seen) == 3 and max(seen) <= bound, seen  # 15,000 frames in 3 STFTs of at most a minute


def test_unsure_windows_follow_their_recordings_language(tiny_whisper, tmp_path):
    # a call: two long utterances, then two short ones, each after a pause: a window each for the long
    # ones, one window for the two short ones joined (less than 4 s heard)
    samples, _ = tones_and_silences([("silence", 0.5), ("tone", 22.0), ("silence", 4.0), ("tone", 22.0),
                                     ("silence", 4.0), ("tone", 1.5), ("silence", 4.0), ("tone", 1.5),
                                     ("silence", 0.5)])
    path = str(tmp_path / "call.wav")
    sf.write(path, samples, SR, subtype="PCM_16")

    def run(sure_language):
        """Transcribe the call; the first sub-batch's windows are reported as surely in ``sure_language``
        (the tiny random model is never sure), as a real model is of long utterances."""
        transcriber = load_transcriber(AudioOptions(model=tiny_whisper, max_new_tokens=4))
        calls: list = []
        inner = transcriber.transcribe

        def recording(batch):
            results = inner(batch)
            if sure_language and not calls:
                for r in results:
                    r["language"], r["language_prob"] = sure_language, 0.99
            calls.append([(round(p.duration_s), p.language_prior, r["language"]) for p, r in zip(batch, results)])
            return results
        transcriber.transcribe = recording
        result = transcribe([path], str(tmp_path / "out.parquet"), transcriber=transcriber, quiet=True,
                            batch_size=2, overwrite=True)
        return calls, rows_of(result.output)[0]

    calls, _ = run(None)
    # longest first: the long windows, then the short ones; no window was sure, so there is no prior
    assert [[d for d, _, _ in c] for c in calls] == [[22, 22], [4]]
    assert all(prior is None for c in calls for _, prior, _ in c)
    alone = [language for _, _, language in calls[1]]  # the short windows' own (full-window) detections
    sure = next(c for c in ("fr", "es", "de", "en") if c not in alone)
    calls, row = run(sure)
    assert [(prior, language) for _, prior, language in calls[1]] == [(sure, sure)]
    assert row["language"] == sure and row["status"] == "ok"


def test_segments_of_a_joined_window_land_on_its_pieces_in_the_recording(tiny_whisper, tmp_path):
    # 36 s: speech, 8 s of quiet, speech, 8 s of quiet, speech: one window of three joined pieces
    samples, spans = tones_and_silences([("silence", 1.0), ("tone", 5.0), ("silence", 8.0), ("tone", 6.0),
                                         ("silence", 8.0), ("tone", 7.0), ("silence", 1.0)])
    path = str(tmp_path / "gaps.wav")
    sf.write(path, samples, SR, subtype="PCM_16")
    from batchcap.models.whisper_timestamps import Segment

    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, max_new_tokens=4))
    inner = transcriber.transcribe
    heard: list = []

    def one_segment_per_tone(batch):  # as if the model had said each tone as a segment of its own
        results = inner(batch)
        for p, r in zip(batch, results):
            heard.append(p.duration_s)
            at, r["segments"] = 0.0, []
            for k, (lo, hi) in enumerate(spans):  # each tone heard with 0.2 s of the pause either side
                r["segments"].append(Segment(round(at + 0.2, 3), round(at + 0.2 + hi - lo, 3), f"t{k}"))
                at += 0.2 + hi - lo + 0.2
            r["text"] = " ".join(s.text for s in r["segments"])
        return results
    transcriber.transcribe = one_segment_per_tone
    result = transcribe([path], str(tmp_path / "out.parquet"), transcriber=transcriber, quiet=True)
    (row,) = rows_of(result.output)
    assert heard == [pytest.approx(18.0 + 1.2, abs=0.05)]  # one window: the tones, not the pauses
    assert [s["text"] for s in row["segments"]] == ["t0", "t1", "t2"]
    for s, (lo, hi) in zip(row["segments"], spans):  # each segment on its tone, in the recording's time
        assert s["start"] == pytest.approx(lo, abs=0.05) and s["end"] == pytest.approx(hi, abs=0.05)


@pytest.mark.parametrize("word_timestamps", [False, True])
def test_a_segment_over_a_left_out_pause_is_cut_at_the_join(tiny_whisper, tmp_path, word_timestamps):
    # three tones 8 s apart: one window of three pieces. The model (made to) write one segment over all, as
    # Whisper sometimes does; in the recording no segment may cover a left-out pause
    samples, spans = tones_and_silences([("silence", 1.0), ("tone", 5.0), ("silence", 8.0), ("tone", 6.0),
                                         ("silence", 8.0), ("tone", 7.0), ("silence", 1.0)])
    path = str(tmp_path / "gap.wav")
    sf.write(path, samples, SR, subtype="PCM_16")
    from batchcap.models import guard as g
    from batchcap.models.whisper_timestamps import Segment

    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, max_new_tokens=4,
                                                word_timestamps=word_timestamps))
    said = "one two three four five six seven eight"
    text_ids = transcriber.tokenizer.encode(" " + said, add_special_tokens=False)
    joins: list = []

    def one_segment(states, cross, languages, no_speech, durations, label):
        out = []
        for d in durations:
            last = transcriber.timestamp_begin + round(d / 0.02)
            out.append(g.Attempt(said, len(text_ids), -0.1, 0.0, label, segments=[Segment(0.0, round(d, 2), said)],
                                 ids=[transcriber.timestamp_begin, *text_ids, last]))
        return out
    transcriber._decode = one_segment
    inner = transcriber.transcribe

    def recording(batch):
        joins.extend(p.joins for p in batch)
        assert all(p.speech_window for p in batch)  # VAD windows: speech to their end (a gap is decoded again)
        return inner(batch)
    transcriber.transcribe = recording
    result = transcribe([path], str(tmp_path / "out.parquet"), transcriber=transcriber, quiet=True)
    (row,) = rows_of(result.output)
    assert len(joins) == 1 and len(joins[0]) == 2  # one window, two joins
    segments = row["segments"]
    assert " ".join(s["text"] for s in segments) == said  # every word kept, in order
    pauses = [(a[1] + 0.5, b[0] - 0.5) for a, b in zip(spans, spans[1:])]  # what the window left out
    for s in segments:
        for pause in pauses:
            assert s["end"] <= pause[0] + 0.01 or s["start"] >= pause[1] - 0.01, (s, pause)  # on one side
        assert (s.get("words") is not None) == word_timestamps
        for w in s.get("words") or []:
            assert s["start"] <= w["start"] <= w["end"] <= s["end"]
    assert segments[0]["start"] < pauses[0][0] and segments[-1]["end"] > pauses[-1][1]


def test_a_long_rows_scores_come_from_its_windows(tiny_whisper, tmp_path):
    from batchcap.models import guard as g
    # a long row has the guard's columns as a clip's row has, taken from its windows' (which the test sees)
    path, _ = long_file(tmp_path / "a.wav", 1.5)
    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, max_new_tokens=6))
    windows: list[tuple[float, dict]] = []
    inner = transcriber.transcribe

    def recording(batch):
        results = inner(batch)
        for k, (p, r) in enumerate(zip(batch, results)):
            r["text"] = r["text"] or f"w{k}"  # the tiny model often says nothing on tones
            r["decode"] = g.GREEDY
            if k == 0 and len(windows) == 0:
                r["text"] = ""  # ... except the first window: it adds nothing to the text's scores
                r["decode"] = g.NO_SPEECH  # nor to the row's decode (it made a recording of speech "no_speech")
            windows.append((p.duration_s, dict(r)))
        return results
    transcriber.transcribe = recording
    result = transcribe([path], str(tmp_path / "out.parquet"), transcriber=transcriber, quiet=True, batch_size=4)
    (row,) = rows_of(result.output)
    assert row["status"] == "ok" and len(windows) >= 4
    spoken = [r for _, r in windows if r["text"]]
    assert len(spoken) == len(windows) - 1
    weights = [r["tokens"] + 1 for r in spoken]
    assert row["avg_logprob"] == pytest.approx(
        sum(w * r["avg_logprob"] for w, r in zip(weights, spoken)) / sum(weights), abs=1e-4)
    assert row["compression_ratio"] == max(r["compression_ratio"] for r in spoken)
    assert row["no_speech_prob"] == min(r["no_speech_prob"] for _, r in windows)
    assert row["decode"] == g.GREEDY
    mine = [(s, r["language_prob"]) for s, r in windows if r["language"] == row["language"]]
    assert row["language_prob"] == pytest.approx(sum(s * p for s, p in mine) / sum(s for s, _ in mine), abs=1e-4)
    # given a language, nothing is detected: no probability
    given = load_transcriber(AudioOptions(model=tiny_whisper, max_new_tokens=6, language="en"))
    result = transcribe([path], str(tmp_path / "given.parquet"), transcriber=given, quiet=True, batch_size=4)
    (row,) = rows_of(result.output)
    assert row["language"] == "en" and row["language_prob"] is None and row["avg_logprob"] is not None


def test_sequential_long_form_drops_segments_over_digital_silence():
    """Whisper writes "you" into an empty 30 s window and its no-speech check keeps a confident one: 10 minutes
    of silence came back as 20 "you" segments under --long-form sequential. A segment over nothing but the
    recording's floor is dropped; one over sound stays, however little of its span the sound fills."""
    import numpy as np

    from batchcap.models.whisper import _without_silent_segments
    from batchcap.models.whisper_timestamps import Segment

    floor = -0.5
    features = np.full((80, 1000), floor, dtype=np.float32)  # 10 s
    features[:, 850:900] = 0.7  # a word at 8.5-9 s
    segments = [Segment(0.0, 5.0, " you"), Segment(5.0, 8.0, " you"), Segment(8.0, 10.0, " hello")]
    text, kept = _without_silent_segments(segments, features, floor)
    assert (text, [s.text for s in kept]) == (" hello", [" hello"])
    assert _without_silent_segments([Segment(0.0, 10.0, " all")], features, floor)[1] == [Segment(0.0, 10.0, " all")]


def test_windows_and_segments_without_a_word_are_no_transcript(tiny_whisper, tmp_path):
    """A podcast's music outro: Whisper wrote "." and ". ." segments over it, which became subtitle cues
    showing a lone dot for seconds, and its window's "unresolved" became the whole row's."""
    from batchcap.models import guard as g
    from batchcap.models.whisper_timestamps import Segment

    path, _ = long_file(tmp_path / "a.wav", 1.5)
    transcriber = load_transcriber(AudioOptions(model=tiny_whisper, max_new_tokens=6))
    inner = transcriber.transcribe
    seen: list[int] = []

    def recording(batch):
        results = inner(batch)
        for r in results:
            k = len(seen)
            seen.append(k)
            if k == 0:  # the outro: no word, and unresolved
                r["text"], r["decode"] = ". .", g.UNRESOLVED
                r["segments"] = [Segment(0.0, 2.0, "."), Segment(2.0, 4.0, ". .")]
            else:  # speech, with a stray "." segment of its own
                r["text"], r["decode"] = f"word{k} .", g.GREEDY
                r["segments"] = [Segment(0.0, 1.0, f"word{k}"), Segment(1.0, 2.0, ".")]
        return results
    transcriber.transcribe = recording
    result = transcribe([path], str(tmp_path / "out.parquet"), transcriber=transcriber, quiet=True, batch_size=4,
                        write="srt")
    (row,) = rows_of(result.output)
    assert len(seen) >= 3
    assert row["decode"] == g.GREEDY
    assert sorted(s["text"] for s in row["segments"]) == sorted(f"word{k}" for k in range(1, len(seen)))
    assert "." not in row["text"] and sorted(row["text"].split()) == sorted(s["text"] for s in row["segments"])
    srt = next((tmp_path / "out.subtitles").iterdir()).read_text()
    assert "\n.\n" not in srt and ". ." not in srt
