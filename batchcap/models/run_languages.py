"""The languages of a run: an unsure language detection leans on the languages its run speaks.

A clip of a second or two is often detected in the wrong language: whisper-base takes about one
short Italian or Russian prompt in four for English, Spanish, Polish... with a probability below
0.8, while the longer clips of the same run are detected surely. A wrong language costs the whole
transcript (Whisper then writes a translation, or a transliteration, in that language).

So the detector's probabilities of an unsure clip are weighed by what the run has heard: each
language's count among the run's recent sure detections, plus one (add-one smoothing, so a
language the run has not heard keeps a chance and, before anything is heard, every language weighs
the same). The clip takes the language of ``p(language | clip) x (count + 1)``. A sure detection
(at least ``sure``) is never changed: a Spanish call in an Italian archive, detected surely, stays
Spanish. (The transcriber detects a clip on its live window first, and that window is now and then
sure of a wrong language: a clip sure there of a language the run's counts would overturn is
detected again on the full window, whose answer is then final if sure; see
``WhisperTranscriber._settle_languages``.) The counts are over the last ``memory`` sure
detections, so a manifest sorted by language moves on to the next language after a few of its
clips.

This depends on what came before in the run (the order of the batches): the same clip can take
another language in a run of other material, which is the point. Runs that must not depend on it
switch it off (``--no-run-languages``) or give the languages (``--language``, a language column).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence


class RunLanguages:
    """Counts of a run's sure language detections, and the choice they give an unsure one."""

    def __init__(self, sure: float, memory: int = 256):
        self.sure = sure
        self._recent: deque[str] = deque(maxlen=max(1, memory))
        self._counts: Counter[str] = Counter()

    def observe(self, language: str, probability: float | None) -> None:
        """Count a detection of ``language`` made with ``probability``, if it is sure."""
        if probability is None or probability < self.sure:
            return
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        self._recent.append(language)
        self._counts[language] += 1

    def forget(self) -> None:
        """Forget every detection counted so far (a new run)."""
        self._recent.clear()
        self._counts.clear()

    def heard(self) -> dict[str, int]:
        """The sure detections counted now, by language."""
        return dict(self._counts)

    def choose(self, languages: Sequence[str], probabilities: Sequence[float]) -> int:
        """The index in ``languages`` of an unsure clip's language, given the detector's
        ``probabilities`` of each: the most likely once weighed by the run's counts."""
        if not languages:
            raise ValueError("no candidate languages")
        weights = [p * (self._counts.get(lang, 0) + 1) for lang, p in zip(languages, probabilities)]
        return max(range(len(weights)), key=weights.__getitem__)
