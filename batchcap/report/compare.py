"""Two results side by side (e.g. before and after ``train audio``): figures, and the rows that differ."""

from __future__ import annotations

from typing import Any

from .align import Scores, align
from .audio import player_for
from .data import OK, Result, is_url, ordered_status_counts
from .images import SCORE_COLUMNS, Thumbnails, corpus_scores, run_max_pixels, scored_rows


def _index(result: Result) -> dict[str, int]:
    return {row_id: i for i, row_id in enumerate(result.col("id")) if row_id is not None}


def compare_audio(a: Result, sa: Scores, b: Result, sb: Scores, *, rows: int, report_dir: str) -> dict[str, Any]:
    ia, ib = _index(a), _index(b)
    both = [(ia[k], ib[k]) for k in ia if k in ib]
    wer_a, cer_a, n_a = sa.corpus()
    wer_b, cer_b, n_b = sb.corpus()
    matched_scored = [(i, j) for i, j in both if sa.scored[i] and sb.scored[j]]
    mw_a, mc_a, _ = sa.corpus([i for i, _ in matched_scored])
    mw_b, mc_b, _ = sb.corpus([j for _, j in matched_scored])
    figures = [
        ("WER (all scored rows)", _pct(wer_a), _pct(wer_b), _delta_pct(wer_a, wer_b)),
        ("CER (all scored rows)", _pct(cer_a), _pct(cer_b), _delta_pct(cer_a, cer_b)),
        ("scored rows", f"{n_a:,}", f"{n_b:,}", ""),
        (f"WER on the {len(matched_scored):,} rows both scored", _pct(mw_a), _pct(mw_b), _delta_pct(mw_a, mw_b)),
        (f"CER on the {len(matched_scored):,} rows both scored", _pct(mc_a), _pct(mc_b), _delta_pct(mc_a, mc_b)),
    ]
    figures += _common_figures(a, b)
    text_a, text_b = a.col("text"), b.col("text")
    differ = [(i, j) for i, j in both if (text_a[i] or "") != (text_b[j] or "")
              or a.columns["status"][i] != b.columns["status"][j]]

    def change(pair: tuple[int, int]) -> tuple[int, int]:
        i, j = pair
        ea = sa.word_errors[i] if sa.scored[i] else 0
        eb = sb.word_errors[j] if sb.scored[j] else 0
        return (-abs(eb - ea), i)

    better = sum(1 for i, j in differ if sa.scored[i] and sb.scored[j] and sb.word_errors[j] < sa.word_errors[i])
    worse = sum(1 for i, j in differ if sa.scored[i] and sb.scored[j] and sb.word_errors[j] > sa.word_errors[i])
    shown = sorted(differ, key=change)[:rows]
    detail = []
    for i, j in shown:
        ref_a = sa.ref_norm[i] if sa.scored[i] else None
        detail.append({
            "id": a.col("id")[i], "source": a.col("source")[i],
            "player": player_for(a.col("source")[i], a.base_dir, report_dir),
            "reference": a.col("reference")[i] or b.col("reference")[j],
            "a": _side(a, sa, i), "b": _side(b, sb, j),
            # without references: how B's words differ from A's
            "ab_tokens": None if ref_a is not None else align(*_same_form(sa, a, i, sb, b, j)),
        })
    return {
        "figures": figures,
        "matched": len(both), "only_a": len(ia) - len(both), "only_b": len(ib) - len(both),
        "differ": len(differ), "better": better, "worse": worse, "detail": detail,
    }


def _same_form(sa: Scores, a: Result, i: int, sb: Scores, b: Result, j: int) -> tuple[str, str]:
    """A's and B's texts in one form: both normalized where both sides were scored, else both as written
    (A's raw "Hello," against B's normalized "hello" was drawn as a substitution)."""
    if sa.hyp_norm[i] is not None and sb.hyp_norm[j] is not None:
        return sa.hyp_norm[i], sb.hyp_norm[j]
    return str(a.col("text")[i] or ""), str(b.col("text")[j] or "")


def _side(result: Result, scores: Scores, i: int) -> dict[str, Any]:
    return {
        "text": result.col("text")[i], "status": result.col("status")[i], "error": result.col("error")[i],
        "wer": scores.wer(i), "errors": scores.word_errors[i] if scores.scored[i] else None,
        "tokens": align(scores.ref_norm[i] or "", scores.hyp_norm[i] or "") if scores.scored[i] else [],
        "decode": result.col("decode")[i] if "decode" in result.columns else None,
    }


def compare_images(a: Result, b: Result, *, rows: int, report_dir: str) -> dict[str, Any]:
    ia, ib = _index(a), _index(b)
    both = [(ia[k], ib[k]) for k in ia if k in ib]
    ca, cb = corpus_scores(a), corpus_scores(b)
    figures = []
    for name, label in SCORE_COLUMNS:
        va, vb = ca.get(name), cb.get(name)
        figures.append((label, _num(va), _num(vb), "" if va is None or vb is None else f"{vb - va:+.4f}"))
    figures.append(("scored rows", f"{ca.get('scored_rows', 0):,}", f"{cb.get('scored_rows', 0):,}", ""))
    scored_a, scored_b = set(scored_rows(a)), set(scored_rows(b))
    matched = [(i, j) for i, j in both if i in scored_a and j in scored_b]
    if not len(matched) == len(scored_a) == len(scored_b):
        # different rows scored on each side: the figures over the rows both scored compare like with like
        ma, mb = corpus_scores(a, [i for i, _ in matched]), corpus_scores(b, [j for _, j in matched])
        for name, label in SCORE_COLUMNS:
            va, vb = ma.get(name), mb.get(name)
            figures.append((f"{label} on the {len(matched):,} rows both scored", _num(va), _num(vb),
                            "" if va is None or vb is None else f"{vb - va:+.4f}"))
    figures += _common_figures(a, b)
    cap_a, cap_b = a.col("caption"), b.col("caption")
    cid_a, cid_b = a.col("cider_d"), b.col("cider_d")
    differ = [(i, j) for i, j in both if (cap_a[i] or "") != (cap_b[j] or "")
              or a.columns["status"][i] != b.columns["status"][j]]

    def change(pair: tuple[int, int]) -> tuple[float, int]:
        i, j = pair
        va = cid_a[i] if isinstance(cid_a[i], (int, float)) else 0.0
        vb = cid_b[j] if isinstance(cid_b[j], (int, float)) else 0.0
        return (-abs(vb - va), i)

    thumbs = Thumbnails(a.base_dir, max_pixels=run_max_pixels(a))
    detail = []
    for i, j in sorted(differ, key=change)[:rows]:
        source = a.col("source")[i]
        detail.append({
            "id": a.col("id")[i], "source": source, "source_url": str(source) if is_url(source) else None,
            "thumb": thumbs.of(source, a.col("id")[i]),
            "references": (a.col("references")[i] or b.col("references")[j] or [])[:5],
            "a": {"caption": cap_a[i], "status": a.col("status")[i], "error": a.col("error")[i],
                  "scores": [(label, a.col(name)[i]) for name, label in SCORE_COLUMNS if name in a.columns]},
            "b": {"caption": cap_b[j], "status": b.col("status")[j], "error": b.col("error")[j],
                  "scores": [(label, b.col(name)[j]) for name, label in SCORE_COLUMNS if name in b.columns]},
            "tokens": align(" ".join(str(cap_a[i] or "").split()), " ".join(str(cap_b[j] or "").split())),
        })
    return {"figures": figures, "matched": len(both), "only_a": len(ia) - len(both), "only_b": len(ib) - len(both),
            "differ": len(differ), "better": None, "worse": None, "detail": detail}


def _common_figures(a: Result, b: Result) -> list[tuple[str, str, str, str]]:
    out = [("rows", f"{a.num_rows:,}", f"{b.num_rows:,}", f"{b.num_rows - a.num_rows:+,}")]
    sa, sb = dict(ordered_status_counts(a.col("status"))), dict(ordered_status_counts(b.col("status")))
    for status in list(dict.fromkeys([*sa, *sb])):
        na, nb = sa.get(status, 0), sb.get(status, 0)
        out.append((f"rows {status}", f"{na:,}", f"{nb:,}", f"{nb - na:+,}" if status != OK or na != nb else ""))
    return out


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _delta_pct(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{100 * (b - a):+.2f} pts"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"
