"""Word-level timestamps for Whisper transcripts, by aligning the decoder's cross-attention to the audio.

A few of Whisper's cross-attention heads (the checkpoint's ``alignment_heads``) look at the audio
being spoken when the decoder reads each token. As openai-whisper's ``timing.py`` does, one
teacher-forced decoder pass over the clip's prompt, its text tokens and the end token gives those
heads' attention; per clip, it is restricted to the clip's audio, normalised (softmax over the
audio, z-score along the tokens, median filter along time), averaged over the heads, and dynamic
time warping finds the monotonic path of tokens through time: each token starts where the path
first reaches its row (20 ms per encoder position). Tokens are grouped into words (spaces, or
characters for languages written without them), punctuation joins its neighbouring word, and each
word gets its tokens' mean probability from the same pass.

``align_words`` does all clips of a batch in one decoder pass and one batched DTW.
``words_per_segment`` hands a clip's words to its segments (Whisper's timestamp segments), with
openai-whisper's fixes for a first or last word that swallowed a pause, times clamped into the
segment.
"""

from __future__ import annotations

import logging
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .common import cache_kwarg
from .whisper_timestamps import Segment, Word, split_timestamped

log = logging.getLogger(__name__)

SECONDS_PER_POSITION = 0.02  # one encoder position: 2 mel frames of 10 ms
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
# languages written without spaces between words: every token (or whole character) is a word
CHARACTER_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
# cells of the cost matrices one DTW group holds (clips are aligned together in groups this big)
DTW_GROUP_CELLS = 8_000_000


@dataclass
class WordTiming:
    """One word of a clip: ``word`` keeps the leading space the tokenizer gives it; times are seconds
    from the clip's start; ``token_index`` is where the word's own first token sits among the clip's
    text tokens (punctuation merged in front of it not counted), which places it in a segment."""

    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float
    token_index: int = field(default=0, repr=False)


# --- the pieces, each testable alone ----------------------------------------------------------------
def model_alignment_heads(model: Any) -> list[tuple[int, int]]:
    """``(layer, head)`` pairs of the decoder's cross-attention heads that follow the audio: the
    checkpoint's ``generation_config.alignment_heads``, else (as openai-whisper) every head of the
    second half of the decoder's layers."""
    config = model.config
    layers, per_layer = int(config.decoder_layers), int(config.decoder_attention_heads)
    gen = getattr(model, "generation_config", None)
    heads = getattr(gen, "alignment_heads", None) if gen is not None else None
    if heads:
        found = [(int(layer), int(head)) for layer, head in heads]
        fitting = [(layer, head) for layer, head in found if 0 <= layer < layers and 0 <= head < per_layer]
        if fitting:
            return fitting
        # e.g. a distilled checkpoint that kept its teacher's heads
        log.warning("the checkpoint's alignment heads do not fit its %d decoder layers: using the default", layers)
    return [(layer, head) for layer in range(layers // 2, layers) for head in range(per_layer)]


def median_filter(x: Any, width: int) -> Any:
    """Median over a window of ``width`` (odd) along the last dimension of torch tensor ``x``, the
    edges reflected; ``x`` unchanged when it is too short to reflect."""
    from torch.nn import functional

    if width <= 1:
        return x
    if width % 2 != 1:
        raise ValueError("the median filter's width must be odd")
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])  # reflect padding wants [batch, channels, length]
    padded = functional.pad(flat, (pad, pad), mode="reflect")
    return padded.unfold(-1, width, 1).sort(dim=-1).values[..., pad].reshape(shape)


def attention_matrix(logits: Any, medfilt_width: int = 7) -> Any:
    """The token-by-time matrix DTW follows, from the alignment heads' attention logits
    [heads, tokens, positions] of one clip (its positions only): softmax over the positions,
    z-score along the tokens, median filter along the positions, mean over the heads."""
    weights = logits.float().softmax(dim=-1)
    std, mean = _std_mean(weights)
    weights = (weights - mean) / std
    return median_filter(weights, medfilt_width).mean(dim=0)


def _std_mean(weights: Any) -> tuple[Any, Any]:
    import torch

    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    return std.clamp_min(1e-12), mean  # a constant column (one token) would divide by zero


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through ``cost`` [rows, columns] from (0, 0) to the last cell,
    moving right, down or diagonally: ``(row indices, column indices)`` along it."""
    return dtw_batch([cost])[0]


def dtw_batch(costs: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``dtw`` of several matrices of any shapes at once: they are padded into one array and filled
    one anti-diagonal at a time, every matrix together (a cell depends only on cells above and to
    its left, so padding never reaches a matrix's own cells). Ties go as in openai-whisper: the
    diagonal only when strictly cheapest, then up, then left."""
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))] * len(costs)
    order = [i for i in range(len(costs)) if costs[i].size]
    start = 0
    while start < len(order):  # groups of bounded size, so memory stays bounded
        end = start + 1
        rows, cols = costs[order[start]].shape
        while end < len(order):
            r, c = costs[order[end]].shape
            if (end - start + 1) * (max(rows, r) + 1) * (max(cols, c) + 1) > DTW_GROUP_CELLS:
                break
            rows, cols, end = max(rows, r), max(cols, c), end + 1
        group = [costs[i] for i in order[start:end]]
        for i, path in zip(order[start:end], _dtw_group(group, rows, cols)):
            out[i] = path
        start = end
    return out


def _dtw_group(costs: list[np.ndarray], rows: int, cols: int) -> list[tuple[np.ndarray, np.ndarray]]:
    n = len(costs)
    x = np.zeros((n, rows, cols), dtype=np.float64)
    for b, c in enumerate(costs):
        x[b, :c.shape[0], :c.shape[1]] = c
    total = np.full((n, rows + 1, cols + 1), np.inf, dtype=np.float64)
    total[:, 0, 0] = 0.0
    trace = np.full((n, rows + 1, cols + 1), -1, dtype=np.int8)
    for k in range(2, rows + cols + 1):  # cells (i, j) with i + j == k, i and j from 1
        i = np.arange(max(1, k - cols), min(rows, k - 1) + 1)
        j = k - i
        c0 = total[:, i - 1, j - 1]
        c1 = total[:, i - 1, j]
        c2 = total[:, i, j - 1]
        diagonal = (c0 < c1) & (c0 < c2)
        up = ~diagonal & (c1 < c0) & (c1 < c2)
        choice = np.where(diagonal, 0, np.where(up, 1, 2)).astype(np.int8)
        best = np.where(diagonal, c0, np.where(up, c1, c2))
        total[:, i, j] = x[:, i - 1, j - 1] + best
        trace[:, i, j] = choice
    return [_backtrace(trace[b], c.shape[0], c.shape[1]) for b, c in enumerate(costs)]


def _backtrace(trace: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    trace = trace[:rows + 1, :cols + 1].copy()
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = rows, cols
    path: list[tuple[int, int]] = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    indices = np.array(path[::-1], dtype=np.int64).reshape(-1, 2)
    return indices[:, 0], indices[:, 1]


def token_start_positions(text_indices: np.ndarray, time_indices: np.ndarray) -> np.ndarray:
    """Per row of the DTW path (token), the column (encoder position) where the path enters it."""
    jumps = np.diff(text_indices, prepend=-1) > 0
    return time_indices[jumps]


def split_words(tokens: Sequence[int], tokenizer: Any, *, eot_id: int, language: str | None = None
                ) -> tuple[list[str], list[list[int]]]:
    """openai-whisper's word split of ``tokens``: pieces that decode to whole characters, then, but
    for languages written without spaces, pieces joined into words at spaces and punctuation."""
    words, word_tokens = _split_on_unicode(tokens, tokenizer)
    if language in CHARACTER_LANGUAGES:
        return words, word_tokens
    out_words: list[str] = []
    out_tokens: list[list[int]] = []
    for piece, ids in zip(words, word_tokens):
        special = ids[0] == eot_id
        if special or piece.startswith(" ") or piece.strip() in string.punctuation or not out_words:
            out_words.append(piece)
            out_tokens.append(list(ids))
        else:
            out_words[-1] += piece
            out_tokens[-1].extend(ids)
    return out_words, out_tokens


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _split_on_unicode(tokens: Sequence[int], tokenizer: Any) -> tuple[list[str], list[list[int]]]:
    """Tokens grouped so that each group decodes to whole characters (a character's UTF-8 bytes may
    span tokens; a lone partial one decodes to U+FFFD)."""
    full = _decode(tokenizer, list(tokens))
    replacement = "\ufffd"
    words: list[str] = []
    word_tokens: list[list[int]] = []
    current: list[int] = []
    offset = 0
    for token in tokens:
        current.append(int(token))
        decoded = _decode(tokenizer, current)
        at = decoded.find(replacement)
        if at < 0 or (offset + at < len(full) and full[offset + at] == replacement):
            words.append(decoded)
            word_tokens.append(current)
            current = []
            offset += len(decoded)
    if current:  # an incomplete character at the very end
        words.append(_decode(tokenizer, current))
        word_tokens.append(current)
    return words, word_tokens


def merge_punctuations(words: list[WordTiming], prepended: str = PREPEND_PUNCTUATIONS,
                       appended: str = APPEND_PUNCTUATIONS) -> list[WordTiming]:
    """Punctuation joined to its word, as openai-whisper does: an opening mark (a word of its own
    that starts with a space) to the word after it, a closing one to the word before it (unless that
    ends with a space). Returns the words left (none empty); times stay the receiving word's."""
    words = [WordTiming(w.word, list(w.tokens), w.start, w.end, w.probability, w.token_index) for w in words]
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        previous, following = words[i], words[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        previous, following = words[i], words[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1
    return [w for w in words if w.word]


def _truncate_at_sentence_ends(words: list[WordTiming]) -> None:
    """openai-whisper's fix for DTW's habit of giving a pause to a sentence's end mark or to the
    word after it: those words are cut to twice the median word length (at most 1.4 s)."""
    durations = np.array([w.end - w.start for w in words])
    durations = durations[durations.nonzero()]
    if not len(durations):
        return
    max_duration = 2 * min(0.7, float(np.median(durations)))
    for k in range(1, len(words)):
        if words[k].end - words[k].start > max_duration:
            if words[k].word in SENTENCE_END_MARKS:
                words[k].end = words[k].start + max_duration
            elif words[k - 1].word in SENTENCE_END_MARKS:
                words[k].start = words[k].end - max_duration


def words_from_path(tokens: Sequence[int], probabilities: Sequence[float], text_indices: np.ndarray,
                    time_indices: np.ndarray, tokenizer: Any, *, eot_id: int, language: str | None = None,
                    merge: bool = True) -> list[WordTiming]:
    """A clip's words from the DTW path over its rows (text tokens, then the end token) and the
    text tokens' probabilities."""
    if not len(tokens):
        return []
    words, word_tokens = split_words(list(tokens) + [eot_id], tokenizer, eot_id=eot_id, language=language)
    if len(word_tokens) <= 1:
        return []
    starts = token_start_positions(text_indices, time_indices) * SECONDS_PER_POSITION
    boundaries = np.concatenate([[0], np.cumsum([len(t) for t in word_tokens[:-1]])]).astype(int)
    out = []
    for k in range(len(boundaries) - 1):
        a, b = int(boundaries[k]), int(boundaries[k + 1])
        out.append(WordTiming(words[k], word_tokens[k], round(float(starts[a]), 3), round(float(starts[b]), 3),
                              float(np.mean(probabilities[a:b])), a))
    _truncate_at_sentence_ends(out)
    for w in out:
        w.start, w.end = round(w.start, 3), round(w.end, 3)
    return merge_punctuations(out) if merge else out


# --- the model pass ---------------------------------------------------------------------------------
class _Capture:
    """Forward hooks keeping the alignment heads' cross-attention queries (and keys, when the pass
    projects them; else they are read from the cross-attention cache) of one decoder pass."""

    def __init__(self, decoder: Any, heads: list[tuple[int, int]], positions: int):
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)
        self.layers = by_layer
        self.positions = positions
        self.queries: dict[int, Any] = {}  # [batch, heads, tokens, head_dim], scaled
        self.keys: dict[int, Any] = {}  # [batch, heads, positions, head_dim]
        self._hooks: list[Any] = []
        for layer, wanted in by_layer.items():
            attn = decoder.layers[layer].encoder_attn
            scaling = float(getattr(attn, "scaling", attn.head_dim ** -0.5))
            self._hooks.append(attn.q_proj.register_forward_hook(
                self._keep(self.queries, layer, attn, wanted, None, scaling)))
            self._hooks.append(attn.k_proj.register_forward_hook(
                self._keep(self.keys, layer, attn, wanted, positions, 1.0)))

    @staticmethod
    def _keep(into: dict[int, Any], layer: int, attn: Any, wanted: list[int], positions: int | None,
              scaling: float) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            out = output if positions is None else output[:, :positions]
            out = out.reshape(*out.shape[:-1], attn.num_heads, attn.head_dim)[..., wanted, :].transpose(1, 2)
            into[layer] = out.float() * scaling if scaling != 1.0 else out
        return hook

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def keys_from_cache(self, cache: Any) -> None:
        """The keys of the layers whose projection did not run: the cross-attention cache's."""
        from .attention import TAIL_ATTR

        for layer, wanted in self.layers.items():
            if layer in self.keys:
                continue
            keys = cache.layers[layer].keys
            tail = getattr(keys, TAIL_ATTR, None)
            if keys.shape[2] < self.positions and tail is not None:  # the clips reach into the shared tail
                keys, _ = tail.full(keys, cache.layers[layer].values)
            self.keys[layer] = keys[:, wanted, :self.positions]

    def scores(self, rows: list[int]) -> Any:
        """Attention logits [clips, heads, tokens, positions] of the clips ``rows``, in float32."""
        import torch

        parts = [torch.matmul(self.queries[layer][rows], self.keys[layer][rows].float().transpose(-1, -2))
                 for layer in self.layers]
        return torch.cat(parts, dim=1)


def align_words(model: Any, states: Any, prompts: Sequence[Sequence[int]], text_tokens: Sequence[Sequence[int]],
                num_frames: Sequence[int], tokenizer: Any, *, alignment_heads: Sequence[Sequence[int]] | None = None,
                eot_id: int, no_timestamps_id: int, medfilt_width: int = 7,
                languages: Sequence[str | None] | None = None, cross_cache: Any = None,
                chunk_elements: int = 1 << 25, probabilities: bool = True) -> list[list[WordTiming]]:
    """Words with times of every clip of a batch.

    ``model``: a transformers ``WhisperForConditionalGeneration`` (any attention implementation: the
    alignment heads' weights are recomputed from their queries and keys, caught by forward hooks).
    ``states``: the clips' encoder output [n, 1500, d] (any dtype; the alignment runs in float32).
    ``prompts[i]``: the clip's decoder prompt ending in <|notimestamps|>; ``text_tokens[i]``: its text
    token ids (no timestamps, no special tokens); ``num_frames[i]``: the encoder positions its audio
    covers (``ceil(duration_s * 50)``): attention outside them is ignored. ``languages[i]``: the clip's
    language code (words are characters for zh, ja, th, lo, my, yue).

    One teacher-forced decoder pass for the whole batch, under the caller's autocast, if any.
    ``cross_cache``: the decoder's cross-attention cache of ``states`` (a ``DynamicCache`` with one row
    per clip, e.g. the one ``WhisperTranscriber._encode`` gives and greedy decoding filled), so the pass
    reads the encoder's keys and values instead of projecting all 1,500 positions again (most of its
    cost); an empty one is filled. ``chunk_elements`` bounds the attention logits held at once.
    ``probabilities`` False: words get NaN probabilities, without the vocabulary projection of every text
    token (times only: most of the pass's cost and memory on a CPU).
    """
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    n = len(prompts)
    if not (len(text_tokens) == len(num_frames) == n == states.shape[0]):
        raise ValueError("align_words needs one row of states, one prompt, one token list and one frame count "
                         "per clip")
    results: list[list[WordTiming]] = [[] for _ in range(n)]
    todo = [i for i in range(n) if len(text_tokens[i]) and int(num_frames[i]) > 0]
    if not todo:
        return results
    if cross_cache is not None:
        todo_rows = list(range(n))  # the cache holds every clip's row
    else:
        todo_rows = todo
    device = states.device
    heads = [(int(a), int(b)) for a, b in alignment_heads] if alignment_heads else model_alignment_heads(model)
    positions = min(states.shape[1], max(int(num_frames[i]) for i in todo))
    rows = [list(prompts[i]) + list(text_tokens[i]) + [eot_id] for i in todo_rows]
    width = max(len(r) for r in rows)
    padded = np.full((len(rows), width), eot_id, dtype=np.int64)  # the end token pads: the mask is causal
    for r, row in enumerate(rows):
        padded[r, :len(row)] = row
    ids = torch.from_numpy(padded).to(device)
    sub = states if len(todo_rows) == n else states.index_select(0, torch.tensor(todo_rows, device=device))
    decoder = model.get_decoder()
    capture = _Capture(decoder, heads, positions)
    kwargs: dict[str, Any] = {"use_cache": False}
    if cross_cache is not None:
        kwargs = {cache_kwarg(decoder): EncoderDecoderCache(DynamicCache(), cross_cache), "use_cache": True}
    try:
        with torch.no_grad():
            hidden = decoder(input_ids=ids, encoder_hidden_states=sub, **kwargs).last_hidden_state
    finally:
        capture.remove()
    if cross_cache is not None:
        capture.keys_from_cache(cross_cache)
    place = {i: r for r, i in enumerate(todo_rows)}
    if probabilities:
        token_probs = _token_probabilities(model, hidden, [place[i] for i in todo], [len(prompts[i]) for i in todo],
                                           [list(text_tokens[i]) for i in todo], no_timestamps_id, tokenizer, eot_id)
    else:
        token_probs = [[math.nan] * len(text_tokens[i]) for i in todo]
    del hidden
    costs = []
    per_row = len(heads) * width * positions
    step = max(1, chunk_elements // max(1, per_row))
    with torch.no_grad():
        for a in range(0, len(todo), step):
            chunk = todo[a:a + step]
            scores = capture.scores([place[i] for i in chunk])
            for c, i in enumerate(chunk):
                length = len(prompts[i]) + len(text_tokens[i]) + 1
                frames = min(int(num_frames[i]), positions)
                matrix = attention_matrix(scores[c, :, :length, :frames], medfilt_width)
                matrix = matrix[len(prompts[i]) - 1:length - 1]  # the rows reading each text token, then the end
                costs.append((-matrix).double().cpu().numpy())
    paths = dtw_batch(costs)
    for k, i in enumerate(todo):
        text_indices, time_indices = paths[k]
        language = languages[i] if languages is not None else None
        results[i] = words_from_path(text_tokens[i], token_probs[k], text_indices, time_indices, tokenizer,
                                     eot_id=eot_id, language=language)
    return results


def _token_probabilities(model: Any, hidden: Any, hidden_rows: list[int], prompt_lengths: list[int],
                         tokens: list[list[int]], no_timestamps_id: int, tokenizer: Any, eot_id: int,
                         chunk: int = 1024) -> list[list[float]]:
    """Each text token's probability given the ones before it, over the text vocabulary (special and
    timestamp tokens left out, as openai-whisper does), from the pass's hidden states."""
    import torch

    rows, cols, targets = [], [], []
    for r, p, t in zip(hidden_rows, prompt_lengths, tokens):
        rows += [r] * len(t)
        cols += list(range(p - 1, p - 1 + len(t)))
        targets += t
    device = hidden.device
    rows_t = torch.tensor(rows, device=device)
    cols_t = torch.tensor(cols, device=device)
    targets_t = torch.tensor(targets, device=device)
    vocab = model.proj_out.out_features
    not_text = torch.zeros(vocab, dtype=torch.bool, device=device)
    not_text[no_timestamps_id + 1:] = True
    specials = [i for i in [*getattr(tokenizer, "all_special_ids", []), eot_id, no_timestamps_id] if 0 <= i < vocab]
    not_text[specials] = True
    out = []
    with torch.no_grad():
        for a in range(0, len(rows), chunk):
            picked = hidden[rows_t[a:a + chunk], cols_t[a:a + chunk]]
            logits = model.proj_out(picked).float().masked_fill(not_text, float("-inf"))
            logprobs = logits.log_softmax(-1).gather(-1, targets_t[a:a + chunk, None])[:, 0]
            out.append(logprobs.exp())
    flat = torch.cat(out).tolist()
    result, k = [], 0
    for t in tokens:
        result.append(flat[k:k + len(t)])
        k += len(t)
    return result


# --- words into segments ----------------------------------------------------------------------------
def segment_tokens(generated: Sequence[int], *, timestamp_begin: int, special: Any,
                   decode: Any) -> list[list[int]]:
    """The text token ids of each segment of one clip's generated tokens, grouped as
    ``whisper_timestamps.parse_timestamped`` groups them (text between times; a segment whose text is
    blank dropped), so that entry k holds the tokens of its k-th segment."""
    return [ids for _, _, ids in split_timestamped(generated, timestamp_begin=timestamp_begin, special=special)
            if decode(ids).strip()]


MIN_WORD_S = 0.1  # a word aligned shorter than this is given up to a median word's length, inside its segment


def words_per_segment(words: Sequence[WordTiming], token_counts: Sequence[int], segments: Sequence[Segment], *,
                      offset_s: float = 0.0, last_speech_s: float = 0.0) -> list[list[Word]]:
    """A clip's words (from ``align_words``) handed to its segments: ``token_counts[k]`` text tokens
    of ``text_tokens`` belong to ``segments[k]`` (in order; the segments' times are absolute, the
    words' are from the clip's start, which is ``offset_s``). A word goes to the segment holding its
    own first token.

    openai-whisper's fix for a pause swallowed by the word after it applies: a segment's first word
    that ends over four median word lengths after the previous speech (``last_speech_s``, from the
    clip's start, for the first segment) and is itself too long starts at most twice the median word
    length (at most 1.4 s) before its end. Then every time is clamped into its segment and kept in
    order (a word starts no earlier than the previous one ends): this also does what openai-whisper's
    fixes for a first or last word reaching over half a second out of its segment do. A word left shorter
    than ``MIN_WORD_S`` gets up to a median word's length, before its end (else after its start) within its
    segment."""
    if len(token_counts) != len(segments):
        raise ValueError("one token count per segment")
    bounds = np.cumsum([0, *token_counts])
    groups: list[list[WordTiming]] = [[] for _ in segments]
    for w in words:
        k = int(np.searchsorted(bounds, w.token_index, side="right")) - 1
        if 0 <= k < len(segments):
            groups[k].append(w)
        elif segments:  # past the counted tokens: the last segment's
            groups[-1].append(w)
    durations = np.array([w.end - w.start for w in words])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = 2 * median
    last_speech = last_speech_s
    out: list[list[Word]] = []
    previous_end = 0.0
    for segment, group in zip(segments, groups):
        seg_start, seg_end = segment.start - offset_s, segment.end - offset_s
        times = [[w.start, w.end] for w in group]
        if times and len(durations):
            first = times[0]
            if first[1] - last_speech > median * 4 and (
                    first[1] - first[0] > longest or (len(times) > 1 and times[1][1] - first[0] > longest * 2)):
                if len(times) > 1 and times[1][1] - times[1][0] > longest:
                    boundary = max(times[1][1] / 2, times[1][1] - longest)
                    first[1] = times[1][0] = boundary
                first[0] = max(0.0, first[1] - longest)
        low, high = seg_start, seg_end
        if times and (times[-1][1] <= seg_start or times[0][0] >= seg_end):
            # the words lie wholly outside Whisper's segment (a segment written at 0-7 s of a window whose
            # speech is at 8-10 s): clamped, every word collapsed onto its end, a zero-length subtitle before
            # the speech. The alignment is kept instead; the segment then spans its words.
            low, high = times[0][0], times[-1][1]
        placed: list[Word] = []
        for w, (start, end) in zip(group, times):
            start = min(max(start, low, previous_end), high)
            end = min(max(end, start), high)
            if end - start < MIN_WORD_S and median:  # the path gave it a frame or none: a one-word turn's
                # subtitle was a zero-length cue at the word's end, never shown; it takes up to a median word
                start = max(low, previous_end, min(start, end - median))
                end = min(high, max(end, start + median))
            previous_end = end
            placed.append(Word(round(offset_s + start, 3), round(offset_s + end, 3), w.word,
                               round(float(w.probability), 4)))
        if placed:
            last_speech = placed[-1].end - offset_s
        out.append(placed)
    return out
