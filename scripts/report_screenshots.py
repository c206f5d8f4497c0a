"""Screenshots of batchcap reports in a real browser (Debian's chromium, headless): look at what a person sees.

    apt-get install -y chromium
    python scripts/report_screenshots.py --audio transcripts.parquet [--audio-b after.parquet] --images-demo \
        --out docs/

--audio RESULT        an audio result table (with references, for the WER figures and alignments)
--audio-b RESULT_B    a second one to compare with the first (e.g. another model on the same manifest)
--images-demo         train the tests' tiny ViT + GPT-2 captioner on coloured shapes (about a minute on a CPU),
                      caption held-out shapes plus a broken and a missing file, and report on that run; its
                      training report is shot too
--images RESULT       an images result table instead of the demo

Writes each report (HTML) to --work and a screenshot per report to --out (report-audio.png,
report-compare.png, report-images.png, report-training.png), cropped to the top of the page and stored
as a 256-colour PNG so the files stay small enough to commit. It also prints build time and size of
each report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WINDOW = (1400, 2000)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium: apt-get install -y chromium")


def screenshot(html: str, png: str, *, height: int, window: tuple[int, int] = WINDOW) -> None:
    """A headless-chromium shot of ``html`` (window ``window``), cropped to ``height`` px, 256 colours."""
    from PIL import Image

    raw = png + ".raw.png"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars",
               f"--window-size={window[0]},{window[1]}", f"--screenshot={raw}", "file://" + os.path.abspath(html)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    with Image.open(raw) as image:
        image = image.convert("RGB").crop((0, 0, image.width, min(height, image.height)))
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    os.remove(raw)
    print(f"screenshot {png}: {os.path.getsize(png) / 1024:.0f} kB")


def check_grid_script(html: str) -> None:
    """Run the page's script in chromium: click the first failure filter, sort by CIDEr-D high first, and
    read the resulting DOM back (--dump-dom): only that status is visible, ok cards sorted."""
    import re

    with open(html, encoding="utf-8") as f:
        page = f.read()
    probe = """<script>
    var b = document.querySelectorAll('[data-filter]'); b[b.length - 1].click();
    var shown = b[b.length - 1].getAttribute('data-filter');
    document.body.setAttribute('data-probe-filter', shown);
    var s = document.getElementById('sort'); if (s) { s.value = '-cider_d'; s.dispatchEvent(new Event('change')); }
    </script></body>"""
    probe_html = html + ".probe.html"
    with open(probe_html, "w", encoding="utf-8") as f:
        f.write(page.replace("</body>", probe, 1))
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={profile}", "--dump-dom", "file://" + os.path.abspath(probe_html)],
                             check=True, capture_output=True, text=True, timeout=120).stdout
    os.remove(probe_html)
    status = re.search(r'data-probe-filter="([^"]+)"', dom).group(1)
    cards = re.findall(r'<div class="thumb" data-status="([^"]+)"[^>]*?(?:data-cider_d="([^"]*)")?[^>]*>', dom)
    hidden = re.findall(r'<div class="thumb" data-status="([^"]+)"[^>]*style="display: none;"', dom)
    visible = len(cards) - len(hidden)
    assert all(s != status for s in hidden), "a card of the chosen status is hidden"
    assert visible == sum(1 for s, _ in cards if s == status), (visible, status)
    scores = [float(v) for s, v in cards if s == "ok" and v]
    assert scores == sorted(scores, reverse=True), "ok cards are not sorted by CIDEr-D, high first"
    print(f"grid script in chromium: filter {status!r} shows {visible} of {len(cards)} cards; sort ok")


def build(result: str, html: str, **kwargs: object) -> str:
    from batchcap.report import build_report

    started = time.perf_counter()
    build_report(result, html, **kwargs)
    print(f"report {html}: {os.path.getsize(html) / 1024:.0f} kB in {time.perf_counter() - started:.1f} s")
    return html


def images_demo(work: str) -> tuple[str, str]:
    """Train the tiny captioner on shapes, caption held-out ones; (result table, training output dir)."""
    import csv

    from batchcap.cli import main
    from tests.test_train_images import make_pair, make_shapes

    root = os.path.join(work, "shapes")
    train = make_shapes(os.path.join(root, "train"), 180, seed=0)
    test = make_shapes(os.path.join(root, "test"), 27, seed=1)
    with open(os.path.join(root, "test", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    with open(test, "a", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["broken.png", "a red circle"])
        writer.writerow(["missing.png", "a blue square"])
    enc, dec = make_pair(os.path.join(root, "pair"))
    model = os.path.join(root, "model")
    args = ["train", "images", train, "-o", model, "--encoder", enc, "--decoder", dec, "--unfreeze-last", "2",
            "--epochs", "10", "--lr", "3e-3", "--batch-size", "8", "--val-fraction", "0.15", "--device", "cpu", "-q"]
    main(args, standalone_mode=False)
    out = os.path.join(root, "captions.parquet")
    try:
        main(["images", test, "-o", out, "--model", model, "--device", "cpu", "-q", "--overwrite"],
             standalone_mode=False)
    except SystemExit:
        pass  # exit code 3: some rows failed, as intended
    return out, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio")
    parser.add_argument("--audio-b")
    parser.add_argument("--images")
    parser.add_argument("--images-demo", action="store_true")
    parser.add_argument("--group-by", action="append", default=[])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--work", default=None, help="where the HTML reports go [default: a temp folder]")
    parser.add_argument("--height", type=int, default=1500, help="crop the screenshots to this many px")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="batchcap-report-")
    os.makedirs(work, exist_ok=True)
    if args.audio:
        html = build(args.audio, os.path.join(work, "audio.html"), group_by=args.group_by)
        screenshot(html, os.path.join(args.out, "report-audio.png"), height=args.height)
        if args.audio_b:
            html = build(args.audio, os.path.join(work, "compare.html"), compare=args.audio_b, rows=20)
            screenshot(html, os.path.join(args.out, "report-compare.png"), height=args.height)
    images, model = args.images, None
    if args.images_demo:
        images, model = images_demo(work)
    if images:
        html = build(images, os.path.join(work, "images.html"), rows=24)
        check_grid_script(html)
        screenshot(html, os.path.join(args.out, "report-images.png"), height=args.height)
    if model:
        screenshot(os.path.join(model, "report.html"), os.path.join(args.out, "report-training.png"),
                   height=args.height)
    print(f"reports in {work}")


if __name__ == "__main__":
    main()
