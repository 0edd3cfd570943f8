"""A consumer runtime loop for owners that store batches (ingest).

While one batch is being stored, in a thread of its own (Postgres and the broker do the
waiting there), the next one is polled and decoded. At most `depth` batches are in hand;
beyond that (backpressure), and while storing fails (an outage), every partition is paused
and polling goes on, so the group never evicts this member.

A transient failure keeps the batch and stores it again after jittered backoff. Permanent
failures of records are the store's to sort out (it sets the responsible records aside,
see shared/retry.py `bisect`); anything else that comes out of it is a failure of the
system itself and stops the loop: `run` raises it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import psycopg
from kafka.errors import KafkaError
from prometheus_client import Gauge

from shared import retry
from shared.kafka.batch import Batch
from shared.kafka.dlq import Unavailable
from shared.kafka.runtime import Consumer

log = logging.getLogger("cofeat.consumer")

SHORT_POLL_MS = 20  # while a batch is being stored: come back soon to hand it the next
# Each of the store thread's round trips to Postgres ends by taking the GIL back from the
# polling thread, which decodes records in pure Python: at the default 5 ms switch
# interval a batch's few round trips cost tens of ms of waiting. 1 ms: ingest ~14% faster.
SWITCH_INTERVAL_S = 0.001


def dependency(error: BaseException) -> str:
    """What an outage is of, in the log and in /readyz."""
    if isinstance(error, psycopg.Error):
        return "database"
    if isinstance(error, KafkaError | Unavailable):
        return "dead-letter topic"
    return "store"


class Pipeline:
    def __init__(self, consumer: Consumer, store: Callable[[Batch], object], *,
                 poll_timeout_ms: int, retry_max_s: float, depth: int = 2,
                 on_stored: Callable[[Batch, object], None] = lambda batch, result: None,
                 on_failed: Callable[[BaseException], None] = lambda error: None,
                 lag: Gauge | None = None):
        self.consumer, self.store = consumer, store
        self.poll_timeout_ms, self.retry_max_s, self.depth = poll_timeout_ms, retry_max_s, depth
        self.on_stored, self.on_failed, self.lag = on_stored, on_failed, lag
        self.waiting: deque[Batch] = deque()
        self.writing: tuple[Future, Batch] | None = None
        self.outages: dict[str, retry.Outage] = {}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="store")
        consumer.revoke_hooks.append(self._revoked)

    def run(self, stopping: Callable[[], bool], drain: bool = False) -> None:
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, SWITCH_INTERVAL_S))
        try:
            while not stopping():
                self._collect()
                self._submit()
                busy = len(self.waiting) + (self.writing is not None) >= self.depth
                if busy or self.failing:
                    self.consumer.hold()
                else:
                    self.consumer.release()
                pending = self.writing is not None or self.waiting
                batch = self.consumer.poll(SHORT_POLL_MS if pending else self.poll_timeout_ms)
                if batch:
                    self.waiting.append(batch)
                self.consumer.rewind_truncated()
                if self.lag is not None:
                    self.consumer.report_lag(self.lag)
                if drain and not pending and not batch and self.consumer.caught_up():
                    log.info("caught up on every assigned partition; draining done")
                    break
        finally:
            self._finish()
            sys.setswitchinterval(switch_interval)

    @property
    def failing(self) -> bool:
        return any(outage.failures for outage in self.outages.values())

    def _submit(self) -> None:
        while self.waiting and self.waiting[0].generation != self.consumer.generation:
            self.waiting.popleft()  # polled before a rebalance: positions were reset since
        if self.writing is None and self.waiting and all(
                outage.ready() for outage in self.outages.values()):
            batch = self.waiting.popleft()
            self.writing = (self.executor.submit(self.store, batch), batch)

    def _collect(self, wait_s: float = 0.0) -> None:
        if self.writing is None:
            return
        future, batch = self.writing
        try:
            result = future.result(timeout=wait_s)
        except FutureTimeout:
            return
        except Exception as error:  # noqa: BLE001 - sorted just below
            self.writing = None
            self._failed(batch, error)
            return
        self.writing = None
        for outage in self.outages.values():
            outage.recovered()
        self.consumer.done(batch)
        self.on_stored(batch, result)

    def _failed(self, batch: Batch, error: BaseException) -> None:
        self.on_failed(error)
        if not retry.is_transient(error):
            raise error
        what = dependency(error)
        outage = self.outages.setdefault(what, retry.Outage(what, self.retry_max_s, log=log))
        outage.failed(error)
        if batch.generation == self.consumer.generation:
            self.waiting.appendleft(batch)  # stored again once the backoff is over

    def _revoked(self, deadline: float) -> None:
        """A rebalance: the batch being stored may finish (bounded by the deadline); the
        others are dropped, as the new assignment seeks to the stored offsets."""
        if self.writing is not None:
            future, _ = self.writing
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        self.waiting.clear()

    def _finish(self) -> None:
        """On the way out: let the batch being stored finish, drop the rest."""
        self.waiting.clear()
        if self.writing is not None:
            with contextlib.suppress(Exception):
                self._collect(wait_s=60.0)
        self.executor.shutdown(wait=True)
