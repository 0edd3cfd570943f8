"""The local cache of remote images: content-addressed, LRU by bytes, shared by processes."""

from __future__ import annotations

import multiprocessing

from shared.images import ImageReader
from shared.images.cache import ImageCache
from shared.settings import Settings


def test_lru_by_bytes_and_content_addressed(tmp_path):
    cache = ImageCache(tmp_path / "c", max_bytes=3000)
    cache.put("a", b"A" * 1000)
    cache.put("b", b"B" * 1000)
    cache.put("same-as-a", b"A" * 1000)  # one blob for both
    assert cache.size() == 2000 and len(list((tmp_path / "c" / "blobs").rglob("*"))) == 4
    assert cache.get("a") == b"A" * 1000  # a is now the most recently used
    cache.put("c", b"C" * 1000)
    cache.put("d", b"D" * 1000)  # over 3000: b, the least recently used, goes
    assert cache.get("b") is None and cache.get("a") == b"A" * 1000
    assert cache.get("c") and cache.get("d") and cache.size() <= 3000
    cache.put("huge", b"H" * 5000)  # larger than the whole cache: not kept
    assert cache.get("huge") is None and cache.size() <= 3000


def test_a_torn_or_tampered_blob_is_a_miss(tmp_path):
    cache = ImageCache(tmp_path / "c", max_bytes=10_000)
    cache.put("k", b"image bytes")
    blob = next(p for p in (tmp_path / "c" / "blobs").rglob("*") if p.is_file())
    blob.write_bytes(b"something else")
    assert cache.get("k") is None
    assert not blob.exists()  # forgotten, to be fetched again
    cache.put("k", b"image bytes")
    assert cache.get("k") == b"image bytes"


def _fill(directory: str, start: int) -> None:
    cache = ImageCache(directory, max_bytes=50_000)
    for n in range(start, start + 40):
        cache.put(f"key-{n}", n.to_bytes(4, "big") * 250)  # 1000 bytes each


def test_processes_share_one_cache_within_its_bound(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_fill, args=(str(tmp_path / "c"), n * 40))
               for n in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    cache = ImageCache(tmp_path / "c", max_bytes=50_000)
    blobs = [p for p in (tmp_path / "c" / "blobs").rglob("*") if p.is_file()]
    assert cache.size() == 1000 * len(blobs) <= 50_000
    assert sum(cache.get(f"key-{n}") is not None for n in range(120)) == len(blobs)


def test_a_second_read_of_a_remote_image_is_not_fetched_again(image_server, tmp_path):
    image_server.reset()
    reader = ImageReader.from_settings(Settings(data_dir=tmp_path, image_hosts="127.0.0.1"))
    url = image_server.url("files/ok.png")
    first = reader.read(url)
    assert reader.read(url) == first and reader.cache.hits == 1
    assert image_server.requests("files/ok.png") == 1
    assert (tmp_path / "cache" / "images" / "index.sqlite").exists()  # COFEAT_DATA_DIR's
    # Another process (a DataLoader worker, the embedder) finds it in the same directory.
    again = ImageReader.from_settings(Settings(data_dir=tmp_path, image_hosts="127.0.0.1"))
    assert again.read(url) == first and image_server.requests("files/ok.png") == 1
    # Failures are never cached.
    for _ in range(2):
        assert again.read_or_error(image_server.url("status/404")).reason == "not found: HTTP 404"
    assert image_server.requests("status/404") == 2
