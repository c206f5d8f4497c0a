"""The training data path (train/data.py): the download cache under concurrency and its error handling."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from batchcap.fetch import FetchConfig, Fetcher
from batchcap.items import Item
from batchcap.train.data import CachingFetcher


def _items(server, n_urls: int, size: int) -> list[tuple[Item, bytes]]:
    out = []
    for i in range(n_urls):
        body = bytes([i]) * size
        server.add(f"/blob/{i}", body, content_type="application/octet-stream")
        out.append((Item(i, f"u{i}", server.url(f"/blob/{i}")), body))
    return out


def test_concurrent_fetches_of_the_same_urls_all_succeed(http_server, tmp_path):
    """25 threads fetching the same URLs at once (the issue: 2 of 25 died on a shared temp name)."""
    items = _items(http_server, 3, 2 * 2**20)
    fetcher = Fetcher(FetchConfig(retries=0))
    cached = CachingFetcher(fetcher, str(tmp_path / "cache"))
    start = threading.Barrier(25)

    def work(k: int) -> bytes | None:
        item, _ = items[k % len(items)]
        start.wait()
        return cached.fetch(item).data

    try:
        for _ in range(3):  # three rounds: the first races on writing, the later ones read the cache
            with ThreadPoolExecutor(25) as pool:
                results = list(pool.map(work, range(25)))
            assert [r == items[k % len(items)][1] for k, r in enumerate(results)] == [True] * 25
    finally:
        fetcher.close()
    names = sorted(os.listdir(tmp_path / "cache"))
    assert len(names) == 3 and not any(n.endswith(".tmp") for n in names)


def test_cache_errors_are_not_fatal(http_server, tmp_path):
    """An entry the cache cannot write (a directory in its place) or read is fetched again, not fatal."""
    (item, body), = _items(http_server, 1, 1000)
    fetcher = Fetcher(FetchConfig(retries=0))
    cache = tmp_path / "cache"
    cached = CachingFetcher(fetcher, str(cache))
    path = cached.path(item.source)
    os.makedirs(os.path.join(path, "blocker"))  # a directory where the cache file goes: os.replace fails
    try:
        assert cached.fetch(item).data == body
        assert cached.fetch(item).data == body
        assert http_server.hits["/blob/0"] == 2  # not cached, fetched again
    finally:
        fetcher.close()


def test_the_split_keeps_each_picture_on_one_side_with_all_its_references():
    """Flickr8k's layout, a row per caption (five per picture): the split was by row, so every validation
    picture was also in training (the epoch chosen by validation CIDEr-D was the most over-fitted one), and
    each validation row was scored against one of its five references."""
    from batchcap.train.data import Example, split_examples

    examples = [Example(Item(0, f"{name}.jpg" + (f"#{k}" if k else ""), f"/photos/{name}.jpg",
                             references=[f"{name} caption {k}"]), name)
                for name in ("cat", "dog", "rocket", "tree", "boat") for k in range(5)]
    train, val = split_examples(examples, 0.4, seed=0)
    train_sources = {e.item.source for e in train}
    assert len(val) == 2 and not train_sources & {e.item.source for e in val}
    assert len(train) == 15 and len(train_sources) == 3
    for e in val:
        name = e.data
        assert e.item.references == [f"{name} caption {k}" for k in range(5)]
    # one row per source: the split by row of earlier versions (a seeded shuffle of as many keys)
    import random

    singles = [Example(Item(0, f"{i}.jpg", f"/photos/{i}.jpg", references=["x"]), i) for i in range(20)]
    order = list(range(20))
    random.Random(3).shuffle(order)
    assert [e.data for e in split_examples(singles, 0.2, seed=3)[1]] == sorted(order[:4])


def test_a_download_that_does_not_decode_is_fetched_again_next_run(http_server, tmp_path):
    """A CDN's "try again later" page served with status 200: the row is skipped, and its body was cached, so
    every later run (--overwrite too) skipped it from the cache without asking the server again."""
    from batchcap.images import decode_image
    from batchcap.inputs import image_spec
    from batchcap.train.data import load_examples

    http_server.add("/img/a.png", b"<html>try again later</html>", content_type="image/png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"url,caption\n{http_server.url('/img/a.png')},a red square\n")

    def load():
        return load_examples(str(manifest), image_spec(), lambda item, data: decode_image(data),
                             cache_dir=str(tmp_path / "cache"), workers=1)

    examples, report = load()
    assert not examples and report.n_skipped == 1
    from io import BytesIO

    from PIL import Image

    png = BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, "PNG")
    http_server.add("/img/a.png", png.getvalue(), content_type="image/png")  # the server is fixed
    examples, _ = load()
    assert len(examples) == 1 and http_server.hits["/img/a.png"] == 2


def test_embedded_pictures_are_told_apart_by_their_bytes_not_their_path_label():
    """A Hugging Face image column whose ``path`` label is "image.png" on every row: the split by source put
    all ten pictures on one side (no validation set, exit 0), or merged different pictures into one."""
    from batchcap.train.data import Example, split_examples

    examples = [Example(Item(0, f"m.parquet:{i}", "image.png", data=bytes([i]) * 64, references=[f"c{i}"]), i)
                for i in range(10)]
    train, val = split_examples(examples, 0.3, seed=0)
    assert len(train) == 7 and len(val) == 3
    assert all(len(e.item.references) == 1 for e in val)
