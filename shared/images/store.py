"""Object stores through fsspec: s3:// with s3fs, and any other scheme whose fsspec
filesystem is installed (gs:// with gcsfs, az:// with adlfs, ...).

One ranged GET of at most COFEAT_IMAGE_MAX_BYTES + 1 bytes per image: the size limit is
enforced by the request itself, in one round trip. s3fs's own retries are turned down to
one try, so shared/retry.py is the only retry policy.
"""

from __future__ import annotations

import asyncio

from shared.images.errors import Denied, ImageError, NotFound, TooLarge, Unavailable, Unreadable
from shared.images.policy import StoreObject
from shared.retry import describe


class StoreFetcher:
    def __init__(self, *, s3_endpoint_url: str | None, connect_s: float, read_s: float,
                 max_bytes: int):
        self.max_bytes = max_bytes
        self.options = {"s3": {
            "endpoint_url": s3_endpoint_url,
            "config_kwargs": {"connect_timeout": connect_s, "read_timeout": read_s,
                              "retries": {"max_attempts": 1, "mode": "standard"}}}}

    def filesystem(self, scheme: str):
        import fsspec

        try:
            # fsspec keeps one instance per arguments and process (it resets after a fork).
            fs = fsspec.filesystem(scheme, **self.options.get(scheme, {}))
        except (ImportError, ValueError) as error:
            raise Unreadable(f"no filesystem for {scheme}:// ({describe(error, 120)})") from None
        if hasattr(fs, "retries"):
            fs.retries = 1  # s3fs's own loop (a class attribute, not an argument): one try
        return fs

    def fetch(self, location: StoreObject) -> bytes:
        fs = self.filesystem(location.scheme)
        try:
            data = fs.cat_file(f"{location.bucket}/{location.key_path}", start=0,
                               end=self.max_bytes + 1)
        except Exception as error:
            raise store_error(error) from None
        if len(data) > self.max_bytes:
            raise TooLarge(self.max_bytes)
        return data


def store_error(error: Exception) -> Exception:
    if isinstance(error, ImageError):
        return error
    if isinstance(error, FileNotFoundError | IsADirectoryError):
        return NotFound()
    if isinstance(error, PermissionError):
        return Denied()
    status = _status(error)
    if status is not None:
        if status in (404, 410):
            return NotFound(f"HTTP {status}")
        if status in (401, 403):
            return Denied(f"HTTP {status}")
        if status in (408, 429) or status >= 500:
            return Unavailable(f"HTTP {status}")
        return Unreadable(f"HTTP {status}")
    if _transport(error):
        return Unavailable(describe(error, 160))
    return Unreadable(describe(error, 160))


def _status(error: BaseException) -> int | None:
    for cause in (error, error.__cause__):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


def _transport(error: BaseException) -> bool:
    """Lost connections, timeouts, missing credentials (an operator fixes those, and then
    every image must still be there to retry, not parked)."""
    if isinstance(error, TimeoutError | ConnectionError | asyncio.TimeoutError):
        return True
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # pragma: no cover - s3fs brings botocore
        return False
    if isinstance(error, BotoCoreError):
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return False
    return isinstance(error, aiohttp.ClientError)
