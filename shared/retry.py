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
`Outage` is a Backoff for one dependency that also logs once per interval and marks the
service not ready until it is back.

A permanent failure of a whole batch may be one bad record's doing: `blames_input` says
whether the data could be at fault, and `bisect` then finds the records responsible, so the
good ones are stored and only the bad ones set aside, each with its error.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from shared.metrics import health

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
# Milvus 2.3 answers many a bad row with the catch-all code 65535; these messages name the
# data (a vector of the wrong length, NaN or infinity), not the moment.
_MILVUS_DATA_MESSAGES = ("should divide the dim", "not a number or infinity",
                         "exceeds max length", "invalid parameter")


def _milvus_data_error(error) -> bool:
    message = str(getattr(error, "message", "") or error)
    return error.code in _MILVUS_PERMANENT_CODES or any(
        fragment in message for fragment in _MILVUS_DATA_MESSAGES)


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
    return not (permanent or _milvus_data_error(error))


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


def blames_input(error: BaseException) -> bool:
    """A permanent failure the data in hand may have caused (a value Postgres or Milvus
    refuses, a message too large), rather than the system itself (a missing table, a
    permission, a bug that fails every record alike)."""
    if isinstance(error, Transient):
        return False
    if isinstance(error, Permanent):
        return True
    for judge in (_psycopg_blames, _kafka_blames, _milvus_blames):
        verdict = judge(error)
        if verdict is not None:
            return verdict
    # Plain Python errors on values (formatting, encoding, conversions); not AttributeError,
    # KeyError or NameError, which are bugs whatever the data.
    return isinstance(error, ValueError | TypeError | ArithmeticError)


def _psycopg_blames(error: BaseException) -> bool | None:
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(error, psycopg.Error):
        return None
    return isinstance(error, psycopg.DataError | psycopg.IntegrityError)


def _kafka_blames(error: BaseException) -> bool | None:
    try:
        from kafka import errors
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(error, errors.KafkaError):
        return None
    return isinstance(error, errors.MessageSizeTooLargeError | errors.InvalidRecordError
                      | errors.RecordListTooLargeError)


def _milvus_blames(error: BaseException) -> bool | None:
    try:
        from pymilvus.exceptions import MilvusException
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(error, MilvusException):
        return None
    name = type(error).__name__
    if name == "ConnectionConfigException":
        return False
    return name in _MILVUS_PERMANENT or _milvus_data_error(error)


class SystemicFailure(Permanent):
    """Every record of a batch failed alone: the failure is the system's, not the data's."""


def bisect(items: Sequence[T], attempt: Callable[[Sequence[T]], object],
           systemic_at: int = 8) -> list[tuple[T, BaseException]]:
    """`attempt(items)`; if it fails in a way that `blames_input`, split the batch in halves
    and try each, down to single items. Returns the items that failed alone, with their
    errors, in order; every other item went through an `attempt` that succeeded.

    A transient or systemic failure is raised as it is (nothing is set aside for it). So is
    one that every item of a batch of `systemic_at` or more shares: a bad value is rare, a
    broken system fails them all.
    """
    failed: list[tuple[T, BaseException]] = []
    todo = [list(items)]
    while todo:
        part = todo.pop()
        if not part:
            continue
        try:
            attempt(part)
        except Exception as error:
            if is_transient(error) or not blames_input(error):
                raise
            if len(part) == 1:
                failed.append((part[0], error))
            else:
                middle = len(part) // 2
                todo += [part[middle:], part[:middle]]  # the first half goes first
    if len(items) >= systemic_at and len(failed) == len(items):
        raise SystemicFailure(f"all {len(items)} records failed alone: "
                              f"{describe(failed[0][1])}") from failed[0][1]
    return failed


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


class Outage:
    """Failures of one dependency in a row: when to try again (`Backoff`), one log line per
    interval instead of one per retry, and readiness (/readyz) off until it is back."""

    def __init__(self, what: str, max_s: float = 30.0, base_s: float = 0.2,
                 log: logging.Logger | None = None, log_every_s: float = 30.0):
        self.what = what
        self.backoff = Backoff(base_s, max_s)
        self.log = log or logging.getLogger("cofeat.retry")
        self.log_every_s = log_every_s
        self.last_log = float("-inf")

    @property
    def failures(self) -> int:
        return self.backoff.failures

    def failed(self, error: BaseException) -> float:
        """Count a failure; returns the delay before the next try."""
        delay = self.backoff.failed()
        health.problem(self.what, f"{self.what} unavailable: {describe(error, 120)}")
        now = time.monotonic()
        if now - self.last_log >= self.log_every_s:
            self.log.warning("%s unavailable (%d failures so far): %s", self.what,
                             self.failures, describe(error))
            self.last_log = now
        return delay

    def ready(self) -> bool:
        return self.backoff.ready()

    def recovered(self) -> None:
        if self.failures:
            self.log.info("%s back after %d failures", self.what, self.failures)
            health.clear(self.what)
        self.backoff.succeeded()
        self.last_log = float("-inf")


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
