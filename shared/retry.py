"""One retry policy for every service: a transient failure waits and tries again, a permanent
one never does.

`is_transient` is the single place that sorts exceptions: lost connections, timeouts,
serialization failures and an unavailable broker or Milvus are transient; data and integrity
errors, messages too large and Milvus parameter or schema errors are permanent, and so is
anything unknown (retrying an unknown failure forever is how a stream stalls). Exceptions of
our own say which they are by deriving from `Transient` or `Permanent`.

Two ways to wait: `call` retries in place (refresh, image fetches: nothing else to do
meanwhile); `Backoff` only says when the next try is due, for loops that must keep polling
Kafka instead of sleeping (a consumer that sleeps past max.poll.interval.ms is evicted).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

T = TypeVar("T")


class Transient(Exception):
    """Worth retrying: the same call may succeed later."""


class Permanent(Exception):
    """Never worth retrying: the same call fails the same way."""


class Stopped(Exception):
    """A stop was requested while waiting to retry; the work in hand is abandoned."""


def _psycopg(error: BaseException) -> bool | None:
    try:
        import psycopg
        from psycopg import errors
    except ImportError:  # pragma: no cover - psycopg is a core dependency
        return None
    if not isinstance(error, psycopg.Error):
        return None
    if isinstance(error, errors.SerializationFailure | errors.DeadlockDetected
                  | errors.LockNotAvailable | errors.QueryCanceled
                  | errors.AdminShutdown | errors.CannotConnectNow
                  | errors.TooManyConnections):
        return True
    # OperationalError covers lost connections and servers going away; InterfaceError a
    # connection already closed under us.
    return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)


def _kafka(error: BaseException) -> bool | None:
    try:
        from kafka import errors
    except ImportError:  # pragma: no cover
        return None
    if isinstance(error, errors.MessageSizeTooLargeError):
        return False
    if isinstance(error, errors.KafkaError):
        return bool(error.retriable)
    return None


_MILVUS_PERMANENT = ("ParamError", "DataTypeNotMatchException", "DataNotMatchException",
                     "PrimaryKeyException", "SchemaNotReadyException", "FieldTypeException",
                     "FieldsTypeException", "AutoIDException", "PartitionKeyException",
                     "CannotInferSchemaException", "DataTypeNotSupportException",
                     "InvalidConsistencyLevel", "ConnectionConfigException")
# Server-side codes of Milvus 2.3+ that name a bad request rather than a bad moment.
_MILVUS_PERMANENT_CODES = {1100}  # ParameterInvalid


def _milvus(error: BaseException) -> bool | None:
    try:
        import grpc
        from pymilvus.exceptions import MilvusException
    except ImportError:  # pragma: no cover
        return None
    if isinstance(error, grpc.RpcError):
        code = error.code() if callable(getattr(error, "code", None)) else None
        return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                        grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    if not isinstance(error, MilvusException):
        return None
    permanent = type(error).__name__ in _MILVUS_PERMANENT
    return not (permanent or error.code in _MILVUS_PERMANENT_CODES)


def is_transient(error: BaseException) -> bool:
    if isinstance(error, Transient):
        return True
    if isinstance(error, Permanent):
        return False
    for judge in (_psycopg, _kafka, _milvus):
        verdict = judge(error)
        if verdict is not None:
            return verdict
    return isinstance(error, ConnectionError | TimeoutError)


def describe(error: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, short enough for a header or a log line."""
    text = (str(error).splitlines() or [""])[0][:limit]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def jittered(failures: int, base_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff (AWS architecture blog): uniform in [0, cap)."""
    cap = min(max_s, base_s * 2 ** min(failures, 30))
    return random.uniform(cap / 2, cap)


@dataclass
class Backoff:
    """When the next try is due after `failures` transient failures in a row."""

    base_s: float = 0.2
    max_s: float = 30.0
    failures: int = 0
    due_at: float = 0.0

    def failed(self) -> float:
        delay = jittered(self.failures, self.base_s, self.max_s)
        self.failures += 1
        self.due_at = time.monotonic() + delay
        return delay

    def ready(self) -> bool:
        return time.monotonic() >= self.due_at

    def succeeded(self) -> None:
        self.failures, self.due_at = 0, 0.0


def call(action: Callable[[], T], *, stopping: Callable[[], bool] = lambda: False,
         base_s: float = 0.2, max_s: float = 30.0, attempts: int | None = None,
         on_retry: Callable[[BaseException, float], None] | None = None) -> T:
    """Run `action`, retrying transient failures with jittered exponential backoff.

    A permanent failure, or the last of `attempts` (None: no limit), is raised as it is; a
    stop requested while waiting raises `Stopped`.
    """

    def sleep(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if stopping():
                raise Stopped
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            on_retry(state.outcome.exception(), state.upcoming_sleep)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        wait=tenacity.wait_random_exponential(multiplier=base_s, max=max_s),
        stop=tenacity.stop_after_attempt(attempts) if attempts else tenacity.stop_never,
        sleep=sleep, before_sleep=before_sleep, reraise=True)
    return retrying(action)
