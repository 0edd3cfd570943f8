"""The shared retry policy: what is transient, how long it waits, when it gives up."""

from __future__ import annotations

import socket
import time

import psycopg
import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, MessageSizeTooLargeError
from pymilvus.exceptions import MilvusUnavailableException, ParamError

from shared import retry


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def real_errors(pg_admin_url: str) -> dict[str, BaseException]:
    """Exceptions as a real Postgres raises them."""
    found: dict[str, BaseException] = {}
    plain = pg_admin_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{closed_port()}/x", connect_timeout=2)
    except psycopg.Error as error:
        found["lost"] = error
    with psycopg.connect(plain, autocommit=True) as conn:
        for name, sql in (("data", "SELECT 'x'::int"), ("division", "SELECT 1/0"),
                          ("syntax", "SELEC 1")):
            try:
                conn.execute(sql)
            except psycopg.Error as error:
                found[name] = error
    return found


def test_postgres_errors_sorted(pg_admin_url):
    errors = real_errors(pg_admin_url)
    assert retry.is_transient(errors["lost"])
    for name in ("data", "division", "syntax"):
        assert not retry.is_transient(errors[name]), name


def test_broker_and_milvus_errors_sorted():
    assert retry.is_transient(KafkaTimeoutError())
    assert retry.is_transient(KafkaConnectionError())
    assert not retry.is_transient(MessageSizeTooLargeError())
    assert retry.is_transient(MilvusUnavailableException(message="down"))
    assert not retry.is_transient(ParamError(message="dim"))
    assert retry.is_transient(ConnectionResetError())
    assert not retry.is_transient(ValueError("unknown failures are not retried forever"))
    assert retry.is_transient(type("Blip", (retry.Transient,), {})())
    assert not retry.is_transient(type("Gone", (retry.Permanent, OSError), {})())


def test_call_retries_transient_until_it_works():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert retry.call(flaky, base_s=0.01, max_s=0.05,
                      on_retry=lambda error, delay: waits.append(delay)) == "ok"
    assert len(calls) == 3 and len(waits) == 2 and all(0 <= w <= 0.05 for w in waits)


def test_call_never_retries_permanent_and_honours_attempts():
    calls = []

    def bad():
        calls.append(1)
        raise ValueError("bad data")

    with pytest.raises(ValueError):
        retry.call(bad, base_s=0.01)
    assert len(calls) == 1

    def down():
        calls.append(1)
        raise TimeoutError

    with pytest.raises(TimeoutError):
        retry.call(down, base_s=0.001, max_s=0.002, attempts=4)
    assert len(calls) == 5


def test_stop_interrupts_the_wait():
    started = time.monotonic()
    with pytest.raises(retry.Stopped):
        retry.call(lambda: (_ for _ in ()).throw(TimeoutError()), base_s=30, max_s=60,
                   stopping=lambda: time.monotonic() - started > 0.2)
    assert time.monotonic() - started < 5


def test_backoff_grows_with_jitter_and_resets():
    backoff = retry.Backoff(base_s=0.1, max_s=1.0)
    delays = [backoff.failed() for _ in range(8)]
    assert delays[0] <= 0.1 and max(delays) <= 1.0 and delays[-1] >= 0.5
    assert not backoff.ready()
    backoff.succeeded()
    assert backoff.ready() and backoff.failures == 0
    assert retry.describe(ValueError("a\nb")) == "ValueError: a"


def test_bisect_finds_the_records_responsible():
    calls = []

    def write(part):
        calls.append(len(part))
        bad = [x for x in part if x % 10 == 3]
        if bad:
            raise ValueError(f"refused {bad[0]}")

    failed = retry.bisect(list(range(64)), write)
    assert [item for item, _ in failed] == [3, 13, 23, 33, 43, 53, 63]
    assert all(str(error) == f"refused {item}" for item, error in failed)
    assert len(calls) < 64  # far fewer tries than one per record

    assert retry.bisect([], write) == [] and retry.bisect([1, 2], write) == []


def test_bisect_does_not_blame_the_data_for_the_system(pg_admin_url):
    errors = real_errors(pg_admin_url)
    for error in (errors["lost"], errors["syntax"], AttributeError("a bug")):
        with pytest.raises(type(error)):
            retry.bisect([1, 2, 3], lambda part, error=error: (_ for _ in ()).throw(error))
    assert retry.blames_input(errors["data"]) and not retry.blames_input(errors["syntax"])
    assert retry.blames_input(MessageSizeTooLargeError()) and retry.blames_input(ParamError())
    # Every record of a large batch failing alone is a systemic failure.
    with pytest.raises(retry.SystemicFailure):
        retry.bisect(list(range(8)), lambda part: (_ for _ in ()).throw(ValueError("all")))
    assert len(retry.bisect(list(range(7)),
                            lambda part: (_ for _ in ()).throw(ValueError("all")))) == 7


def test_outage_logs_once_per_interval_and_says_not_ready(caplog):
    from shared.metrics import health

    outage = retry.Outage("thing", max_s=0.01, base_s=0.001, log_every_s=60)
    with caplog.at_level("WARNING", logger="cofeat.retry"):
        for _ in range(5):
            outage.failed(ConnectionResetError("reset"))
    assert [r.getMessage() for r in caplog.records].count(
        "thing unavailable (1 failures so far): ConnectionResetError: reset") == 1
    assert len(caplog.records) == 1
    assert not health.ok and "thing unavailable" in health.detail
    outage.recovered()
    assert health.ok and outage.failures == 0 and outage.ready()
