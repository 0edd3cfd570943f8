"""`ImageReader`: an image_uri to bytes (policy, cache, fetch, retries) and to pixels.

Transient failures are retried in place with shared/retry.py's backoff, a few times
(COFEAT_IMAGE_FETCH_ATTEMPTS); what still fails is the caller's to record and retry later.
A host or bucket that keeps failing is left alone for a while (a `Backoff` per host): its
other images fail at once as unavailable instead of each waiting out its own timeouts, so
a dead CDN cannot hold the embedder's loop for minutes.

`fetch_many` runs fetches concurrently (COFEAT_IMAGE_FETCH_CONCURRENCY threads per process)
and yields results in order, at most a window ahead of the consumer, so memory stays bounded.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from PIL import Image
from prometheus_client import Counter, Histogram

from shared import retry
from shared.images.cache import ImageCache
from shared.images.decode import decode
from shared.images.errors import ImageError, Unavailable, Unreadable
from shared.images.http import HttpFetcher
from shared.images.local import read_file
from shared.images.policy import HttpUrl, LocalFile, Location, Policy, StoreObject
from shared.images.store import StoreFetcher

T = TypeVar("T")

FETCHES = Counter("cofeat_image_fetches_total", "Image reads by scheme and outcome",
                  ["scheme", "outcome"])
FETCH_SECONDS = Histogram("cofeat_image_fetch_seconds", "Remote image fetch time",
                          ["scheme"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                               1, 2.5, 5, 10, 30))
CACHE = Counter("cofeat_image_cache_total", "Image cache lookups", ["result"])


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int
    connect_s: float
    read_s: float
    total_s: float
    attempts: int
    concurrency: int
    retry_base_s: float = 0.2
    retry_max_s: float = 2.0

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(settings.image_max_bytes, settings.image_max_pixels,
                   settings.image_connect_timeout_s, settings.image_read_timeout_s,
                   settings.image_fetch_timeout_s, settings.image_fetch_attempts,
                   settings.image_fetch_concurrency)

    @classmethod
    def defaults(cls) -> Limits:
        """COFEAT_IMAGE_*'s defaults, whatever the environment says."""
        from shared.settings import Settings

        fields = Settings.model_fields
        return cls.from_settings(type("Defaults", (), {
            name: fields[name].default for name in fields if name.startswith("image_")}))


class ImageReader:
    def __init__(self, policy: Policy, limits: Limits | None = None, *,
                 cache: ImageCache | None = None, s3_endpoint_url: str | None = None,
                 outage_base_s: float = 1.0, outage_max_s: float = 60.0):
        limits = limits or Limits.defaults()
        self.policy, self.limits, self.cache = policy, limits, cache
        self.http = HttpFetcher(policy, connect_s=limits.connect_s, read_s=limits.read_s,
                                total_s=limits.total_s, max_bytes=limits.max_bytes)
        self.store = StoreFetcher(s3_endpoint_url=s3_endpoint_url, connect_s=limits.connect_s,
                                  read_s=limits.read_s, max_bytes=limits.max_bytes)
        self.outage_base_s, self.outage_max_s = outage_base_s, outage_max_s
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._lock = threading.Lock()
        self._outages: dict[str, retry.Backoff] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def __getstate__(self) -> dict:
        # Pickled into DataLoader workers: threads, locks and outage clocks stay here.
        state = self.__dict__.copy()
        for name in ("_lock", "_outages", "_pool", "_pool_pid"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    @classmethod
    def from_settings(cls, settings) -> ImageReader:
        cache = None
        if settings.image_cache_bytes:
            directory = settings.image_cache_dir or Path(settings.data_dir) / "cache" / "images"
            cache = ImageCache(directory, settings.image_cache_bytes)
        return cls(Policy.from_settings(settings), Limits.from_settings(settings),
                   cache=cache, s3_endpoint_url=settings.image_s3_endpoint_url)

    # -- one image ---------------------------------------------------------------------

    def allowed(self, uri: str) -> bool:
        """Whether the policy allows the location (no byte is read)."""
        try:
            self.policy.locate(uri)
        except ImageError:
            return False
        return True

    def read(self, uri: str) -> bytes:
        """The image's bytes, or an `ImageError` saying why not."""
        location = self.policy.locate(uri)
        if isinstance(location, LocalFile):
            return self._counted("file", lambda: read_file(location, self.policy,
                                                           self.limits.max_bytes))
        if self.cache is not None:
            data = self.cache.get(location.key)
            CACHE.labels("miss" if data is None else "hit").inc()
            if data is not None:
                return data
        data = self._remote(location)
        if self.cache is not None:
            self.cache.put(location.key, data)
        return data

    def open(self, uri: str, image_size: int | None = None) -> Image.Image:
        """Read and decode to RGB (see shared.images.decode)."""
        return decode(self.read(uri), image_size, self.limits.max_pixels)

    def decode(self, data: bytes, image_size: int | None = None) -> Image.Image:
        return decode(data, image_size, self.limits.max_pixels)

    def _remote(self, location: Location) -> bytes:
        scheme = "http" if isinstance(location, HttpUrl) else location.scheme
        fetch = self.http.fetch if isinstance(location, HttpUrl) else self.store.fetch
        outage = self._outage(_origin(location))
        if not outage.ready():
            FETCHES.labels(scheme, "skipped").inc()
            raise Unavailable(f"{_origin(location)} is failing; next try in "
                              f"{max(0.0, outage.due_at - time.monotonic()):.0f} s")
        started = time.monotonic()
        try:
            data = self._counted(scheme, lambda: retry.call(
                lambda: fetch(location), attempts=self.limits.attempts,
                base_s=self.limits.retry_base_s, max_s=self.limits.retry_max_s))
        except Unavailable:
            with self._lock:
                if outage.ready():  # the fetches in flight when it failed count once
                    outage.failed()
            raise
        with self._lock:
            outage.succeeded()
        FETCH_SECONDS.labels(scheme).observe(time.monotonic() - started)
        return data

    def _counted(self, scheme: str, action: Callable[[], bytes]) -> bytes:
        try:
            data = action()
        except ImageError as error:
            FETCHES.labels(scheme, "transient" if error.transient else "permanent").inc()
            raise
        FETCHES.labels(scheme, "ok").inc()
        return data

    def _outage(self, origin: str) -> retry.Backoff:
        with self._lock:
            if origin not in self._outages:
                self._outages[origin] = retry.Backoff(self.outage_base_s, self.outage_max_s)
            return self._outages[origin]

    # -- many images -------------------------------------------------------------------

    def fetch_many(self, uris: Iterable[str]) -> Iterator[bytes | ImageError]:
        """Each URI's bytes or its error, in order; fetched concurrently."""
        return self.map(self.read_or_error, uris)

    def map(self, action: Callable[[str], T], uris: Iterable[str]) -> Iterator[T]:
        """`action` over `uris` on the fetch threads, in order, a bounded window ahead."""
        return ordered(self._executor(), action, uris, 2 * self.limits.concurrency)

    def read_or_error(self, uri: str) -> bytes | ImageError:
        try:
            return self.read(uri)
        except ImageError as error:
            return error
        except Exception as error:  # a bug or a library's surprise: this image only
            return Unreadable(retry.describe(error))

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.limits.concurrency,
                                                thread_name_prefix="image-fetch")
                self._pool_pid = os.getpid()
            return self._pool

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def ordered(pool: ThreadPoolExecutor, action: Callable[..., T], values: Iterable,
            window: int) -> Iterator[T]:
    """pool.map in order, at most `window` ahead of the consumer (Executor.map submits
    everything first, which would hold every fetched image in memory at once)."""
    pending: deque = deque()
    for value in values:
        if len(pending) >= window:
            yield pending.popleft().result()
        pending.append(pool.submit(action, value))
    while pending:
        yield pending.popleft().result()


def _origin(location: Location) -> str:
    if isinstance(location, HttpUrl):
        return location.host
    assert isinstance(location, StoreObject)
    return f"{location.scheme}://{location.bucket}"


_local_files: ImageReader | None = None


def local_files() -> ImageReader:
    """Bounded reads of local files anywhere, for paths the caller chose itself (tests,
    tools, `embed_images` on a list of files); image_uris from events never come here."""
    global _local_files
    if _local_files is None:
        _local_files = ImageReader(Policy.local_files())
    return _local_files
