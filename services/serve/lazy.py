"""A Milvus connection made on first use, so `cofeat serve` starts while Milvus is down.

MilvusClient connects in its constructor and raises when Milvus does not answer. Built
that way at start-up, a Milvus outage would crash serve, and its restarts would back off
long after Milvus is back. Instead serve comes up alive, /readyz says Milvus does not
answer, queries get 503, and the first call after Milvus is back connects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException


class LazyMilvus:
    """Stands in for a MilvusClient (attribute access connects, then forwards). One
    connection attempt at a time: calls meanwhile fail at once instead of queueing up
    worker threads behind a connect timeout."""

    def __init__(self, connect: Callable[[], MilvusClient]) -> None:
        self._connect = connect
        self._client: MilvusClient | None = None
        self._connecting = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.client(), name)

    def client(self) -> MilvusClient:
        client = self._client
        if client is not None:
            return client
        if not self._connecting.acquire(blocking=False):
            raise MilvusException(message="not connected yet: another call is connecting")
        try:
            if self._client is None:
                self._client = self._connect()
            return self._client
        finally:
            self._connecting.release()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
