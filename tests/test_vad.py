"""The splitter: speech regions -> windows of at most 24 s cut at pauses."""

from __future__ import annotations

import numpy as np
import pytest

from batchcap.vad import SAMPLE_RATE, EnergyVad, FrameScores, VadConfig, plan_windows, split_recording
from tests.conftest import tone

SR = SAMPLE_RATE


def tones_and_silences(pattern: list[tuple[str, float]], seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Audio from ("tone"|"silence", seconds) pieces; returns the samples and the tone spans (s)."""
    pieces, spans, t = [], [], 0.0
    rng = np.random.default_rng(seed)
    for i, (kind, seconds) in enumerate(pattern):
        n = int(seconds * SR)
        if kind == "tone":
            pieces.append(tone(seconds, freq=300 + 40 * (i % 7), seed=i))
            spans.append((t, t + seconds))
        else:
            pieces.append((1e-4 * rng.standard_normal(n)).astype(np.float32))  # a quiet room, not zeros
        t += seconds
    return np.concatenate(pieces), spans


def three_minutes() -> tuple[np.ndarray, list[tuple[float, float]]]:
    pattern: list[tuple[str, float]] = [("silence", 1.0)]
    for _ in range(24):  # 24 x (5.5 s tone + 1.8 s pause) + 1 s = 176.2 s
        pattern += [("tone", 5.5), ("silence", 1.8)]
    pattern.append(("silence", 3.0))
    return tones_and_silences(pattern)


def test_three_minute_file_is_cut_at_the_silences():
    samples, spans = three_minutes()
    assert 170 < len(samples) / SR < 190
    windows = split_recording(samples, EnergyVad())
    assert len(windows) >= 6
    for w in windows:
        # at most 24 s by default: Whisper's 30 s less room at the end, where it stops short
        assert 0 < w.duration_s <= 24.0
        # every window edge lies in a pause: never inside a tone
        for edge in (w.start_s, w.end_s):
            assert not any(a + 0.01 < edge < b - 0.01 for a, b in spans), (edge, w)
    # windows are in order, do not overlap, and together cover every tone completely
    assert all(a.end <= b.start for a, b in zip(windows, windows[1:]))
    for a, b in spans:
        assert any(w.start_s <= a and b <= w.end_s for w in windows), (a, b)
    # pauses are padded, not swallowed: the leading second of silence is mostly skipped
    assert windows[0].start_s >= 0.7
    # packed: each window holds several tones (3 x 7.3 s fit in 24 s)
    assert max(w.duration_s for w in windows) > 20


def test_speech_longer_than_a_window_is_cut_at_its_quietest_point():
    # 50 s of tone with a short dip (0.15 s, shorter than a pause) at 21 s
    samples = tone(50.0, seed=3)
    dip = slice(int(21.0 * SR), int(21.15 * SR))
    samples[dip] *= 0.05
    windows = split_recording(samples, EnergyVad())
    assert len(windows) == 3
    assert all(w.duration_s <= 24.0 for w in windows)
    assert 20.9 <= windows[0].end_s <= 21.25
    assert windows[0].end == windows[1].start  # a forced cut: the windows touch


def test_long_pauses_are_left_out_of_a_window_that_joins_the_speech_around_them():
    samples, spans = tones_and_silences([("tone", 3.0), ("silence", 6.0), ("tone", 3.0)])
    (window,) = split_recording(samples, EnergyVad(), VadConfig(max_merge_gap_s=3.0))
    (a0, b0), (a1, b1) = window.pieces  # the two tones and 0.2 s of the pause each side, joined
    assert a0 == 0 and 3.15 <= b0 / SR <= 3.25 and 8.75 <= a1 / SR <= 8.85 and b1 == len(samples)
    assert (window.start, window.end) == (a0, b1)
    assert window.duration_s == pytest.approx((b0 - a0 + b1 - a1) / SR) and window.duration_s < 6.6
    # more of the pause kept at a join on request
    (wide,) = split_recording(samples, EnergyVad(), VadConfig(max_merge_gap_s=3.0, join_pad_s=0.5))
    (_, wb0), (wa1, _) = wide.pieces
    assert 3.45 <= wb0 / SR <= 3.55 and 8.45 <= wa1 / SR <= 8.55
    heard = window.audio(samples)
    assert np.array_equal(heard, np.concatenate([samples[a0:b0], samples[a1:b1]]))
    # times of the window's audio in the recording: the second tone starts 3 s into the window
    assert window.recording_time(1.0) == pytest.approx(1.0)
    assert window.recording_time(b0 / SR) == pytest.approx(a1 / SR)  # a start at the join: the later piece
    assert window.recording_time(b0 / SR, end=True) == pytest.approx(b0 / SR)  # an end: the earlier one
    assert window.recording_time(b0 / SR + 2.0) == pytest.approx(a1 / SR + 2.0)
    assert window.recording_time(99.0) == pytest.approx(b1 / SR)  # past the end: the end
    assert window.joins_s == pytest.approx(((b0 - a0) / SR,))  # where the pieces meet in its audio
    # Whisper's times are 20 ms steps: a start 10 ms before the join is at it (the later piece), an end
    # 10 ms after it too (the earlier piece); 30 ms before, a start is still in the earlier piece
    join = (b0 - a0) / SR
    assert window.recording_time(join - 0.01) == pytest.approx(a1 / SR)
    assert window.recording_time(join + 0.01, end=True) == pytest.approx(b0 / SR)
    assert window.recording_time(join - 0.03) == pytest.approx(b0 / SR - 0.03)
    assert window.recording_time(join + 0.03, end=True) == pytest.approx(a1 / SR + 0.03)
    # a window with the pause in it when it is short enough; two windows when joining is off
    (whole,) = split_recording(samples, EnergyVad(), VadConfig(max_merge_gap_s=10.0))
    assert whole.pieces == () and whole.duration_s == pytest.approx(len(samples) / SR) and whole.joins_s == ()
    assert np.shares_memory(whole.audio(samples), samples)
    apart = split_recording(samples, EnergyVad(), VadConfig(max_merge_gap_s=3.0, join_pauses=False))
    assert [(w.start, w.end, w.pieces) for w in apart] == [(a0, b0, ()), (a1, b1, ())]  # 0.2 s either way
    extra = int(0.3 * SR)  # a join keeping 0.5 s of the pause either side, a window's own edge 0.2 s
    apart = split_recording(samples, EnergyVad(), VadConfig(max_merge_gap_s=3.0, join_pauses=False, join_pad_s=0.5))
    assert [(w.start, w.end) for w in apart] == [(a0, wb0 - extra), (wa1 + extra, b1)]


def test_joined_windows_stay_within_the_limit():
    pattern = [("silence", 0.5)]
    for _ in range(12):  # 12 x 4 s of speech, each after 5 s of quiet: 48 s heard, ~110 s long
        pattern += [("tone", 4.0), ("silence", 5.0)]
    samples, spans = tones_and_silences(pattern)
    windows = split_recording(samples, EnergyVad(), VadConfig(max_window_s=24.0))
    assert all(w.duration_s <= 24.0 for w in windows)
    # each window took as many tones as fit: 4 s of tone and 2 x 0.2 s of pause each
    assert [len(w.pieces) for w in windows] == [5, 5, 2]
    # every tone lies in one piece of one window, pieces in time order and apart
    pieces = [p for w in windows for p in w.spans]
    assert all(b < c for (_, b), (c, _) in zip(pieces, pieces[1:]))
    assert all(any(a / SR <= lo and hi <= b / SR for a, b in pieces) for lo, hi in spans)


def test_silence_and_clicks_give_no_windows():
    rng = np.random.default_rng(0)
    quiet = (1e-4 * rng.standard_normal(40 * SR)).astype(np.float32)
    assert split_recording(quiet, EnergyVad()) == []
    click = quiet.copy()
    click[10 * SR:10 * SR + 160] = 0.5  # 10 ms
    assert split_recording(click, EnergyVad()) == []


def test_plan_windows_from_scores():
    # 1 = speech, 10 ms frames: 2 s speech, 0.5 s pause, 2 s speech, 0.1 s pause, 1 s speech
    frames = np.concatenate([np.ones(200), np.zeros(50), np.ones(200), np.zeros(10), np.ones(100)]).astype(np.float32)
    scores = FrameScores(frames, 160, 0.5, 0.5)
    windows = plan_windows(scores, len(frames) * 160, VadConfig(max_window_s=4.0, pad_s=0.0))
    # the 0.1 s pause is bridged; the 0.5 s one is a cut because 2 + 0.5 + 3.1 > 4 s
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 2.0), (2.5, 5.6)]


def test_silero_vad_when_installed():
    pytest.importorskip("onnxruntime")
    from batchcap.vad import SileroVad, find_silero_model

    try:
        find_silero_model()
    except Exception:
        pytest.skip("faster-whisper (which ships the Silero model) is not installed")
    samples, spans = tones_and_silences([("silence", 1.0), ("tone", 2.0), ("silence", 1.0)])
    scores = SileroVad().score(samples)
    assert scores.hop == 512 and len(scores.scores) == -(-len(samples) // 512)
    assert np.all((scores.scores >= 0) & (scores.scores <= 1))


def test_windows_never_overlap_and_join_only_across_long_pauses():
    rng = np.random.default_rng(5)
    for trial in range(30):
        pattern: list[tuple[str, float]] = [("silence", 0.5)]
        while sum(seconds for _, seconds in pattern) < 120:
            pattern += [("tone", float(rng.choice([0.6, 2.0, 7.0, 19.0, 30.0]))),
                        ("silence", float(rng.choice([0.4, 0.8, 2.5, 3.5, 8.0])))]
        samples, spans = tones_and_silences(pattern, seed=trial)
        windows = split_recording(samples, EnergyVad())
        pieces = [p for w in windows for p in w.spans]
        assert all(b <= c for (_, b), (c, _) in zip(pieces, pieces[1:])), trial  # no sample heard twice
        assert all(w.duration_s <= 24.0 + 1e-9 for w in windows)
        for w in windows:  # a join leaves out a pause of over 3 s but for 0.5 s either side
            assert all(c - b >= 2.0 * SR for (_, b), (c, _) in zip(w.pieces, w.pieces[1:])), trial
        assert all(any(a / SR <= lo + 0.05 and hi - 0.05 <= b / SR for a, b in pieces)
                   for lo, hi in spans if hi - lo < 24), trial

