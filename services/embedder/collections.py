"""Milvus side of the embedder: retried calls, collection lifecycle, alias swaps.

A collection is complete exactly when an alias points at it: the alias only moves after
the collection was filled, indexed, loaded and its row count checked. Any other collection
of ours is either being built by this process or left over (a crash, a replaced version);
leftovers of the version being built are dropped and refilled, others are dropped after
COFEAT_EMBED_DROP_GRACE_S, so queries that resolved the alias just before a swap finish.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

from pymilvus import MilvusClient

from services.embedder import metrics
from shared import milvus as contract
from shared import retry
from shared.retry import Stopped
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")
T = TypeVar("T")
SLOW_CALL_S = 5.0


def sleep_unless(stopping: Callable[[], bool], seconds: float) -> bool:
    """Sleep unless a stop is requested; True if it was. For waits without a consumer to
    keep in its group (a standby, before the stream starts)."""
    deadline = time.monotonic() + seconds
    while not stopping() and time.monotonic() < deadline:
        time.sleep(min(0.05, seconds))
    return stopping()


class Milvus:
    """Every Milvus call of the embedder: transient failures retried until acknowledged or
    asked to stop, permanent ones raised (shared/retry.py sorts them).

    `wait(seconds)` is how a retry waits (True: stop). The embedder passes its stream's
    `idle`, which keeps polling with the partitions paused: an outage longer than
    max.poll.interval.ms must not cost the consumer its group membership.
    """

    def __init__(self, settings: Settings, stopping: Callable[[], bool] = lambda: False,
                 wait: Callable[[float], bool] | None = None):
        self.settings, self.stopping = settings, stopping
        self.wait = wait or (lambda seconds: sleep_unless(self.stopping, seconds))
        self.outage = retry.Outage("milvus", settings.embed_retry_max_s, base_s=0.1, log=log)
        self.client: MilvusClient | None = None
        self.recoveries = 0  # outages ended so far

    def _connect(self) -> MilvusClient:
        if self.client is None:
            # dedicated: a fresh channel after an outage, not one stuck in gRPC's backoff.
            self.client = contract.connect(self.settings, dedicated=True)
        return self.client

    def call(self, action: Callable[[MilvusClient], T], what: str = "") -> T:
        while True:
            started = time.monotonic()
            try:
                result = action(self._connect())
                self.recoveries += bool(self.outage.failures)
                self.outage.recovered()
                if what and time.monotonic() - started > SLOW_CALL_S:
                    log.warning("slow Milvus call: %s took %.1f s", what,
                                time.monotonic() - started)
                return result
            except Exception as error:
                if not retry.is_transient(error):
                    raise
                metrics.MILVUS_ERRORS.inc()
                self.close()
                if self.wait(self.outage.failed(error)):
                    raise Stopped from None

    def close(self) -> None:
        if self.client is not None:
            # Closing a broken channel may fail; it is gone either way.
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None


# -- names ----------------------------------------------------------------------------


def version_of(settings: Settings, kind: str, name: str) -> int | None:
    match = re.fullmatch(re.escape(contract.collection_name(settings, kind, 0)[:-1])
                         + r"(\d+)(?:_\d+)?", name)
    return int(match.group(1)) if match else None


def ours(milvus: Milvus, settings: Settings, kind: str) -> list[str]:
    names = milvus.call(lambda c: c.list_collections())
    return [n for n in names if version_of(settings, kind, n) is not None]


def aliased(milvus: Milvus, name: str) -> bool:
    return milvus.call(lambda c: c.has_collection(name)
                       and bool(c.list_aliases(name)["aliases"]))


# -- building a collection ------------------------------------------------------------


def create_fresh(milvus: Milvus, name: str, schema) -> None:
    """An empty collection `name`; an unaliased leftover of the same name is dropped."""
    if milvus.call(lambda c: c.has_collection(name)):
        if aliased(milvus, name):
            raise RuntimeError(f"{name} is behind an alias; refusing to rebuild it")
        log.info("dropping incomplete %s left by an earlier run", name)
        drop(milvus, name)
    # Each retried action re-checks first: a call that timed out may have been applied.
    milvus.call(lambda c: c.has_collection(name) or c.create_collection(name, schema=schema))


def drop(milvus: Milvus, name: str) -> None:
    milvus.call(lambda c: c.has_collection(name) and c.drop_collection(name))


def upsert(milvus: Milvus, names: list[str], rows: list[dict],
           chunk: int) -> list[tuple[dict, BaseException]]:
    """Upsert into every collection; returns the rows Milvus refused for their data (found by
    splitting the refused calls, shared/retry.py `bisect`), each with its error."""
    refused: dict[int, tuple[dict, BaseException]] = {}
    key = "project_id" if rows and "project_id" in rows[0] else "user_id"
    for name in names:
        for start in range(0, len(rows), chunk):
            part = [r for r in rows[start:start + chunk] if r[key] not in refused]

            def write(part: list[dict], name: str = name) -> None:
                milvus.call(lambda c: c.upsert(name, part),
                            f"upsert of {len(part)} rows into {name}")

            for row, error in retry.bisect(part, write):
                refused[row[key]] = (row, error)
    if refused:
        log.warning("Milvus refused %d rows: %s", len(refused),
                    retry.describe(next(iter(refused.values()))[1]))
    return list(refused.values())


def delete(milvus: Milvus, names: list[str], ids: list[int]) -> None:
    if ids:
        for name in names:
            milvus.call(lambda c, name=name: c.delete(name, ids=ids),
                        f"delete of {len(ids)} ids from {name}")


QUERY_WINDOW = 16_384  # Milvus 2.3 answers at most this many rows per query


def _rows(milvus: Milvus, name: str, expr: str,
          consistency: str) -> dict[int, tuple[int, int]]:
    rows = milvus.call(lambda c: c.query(
        name, filter=expr, output_fields=[contract.STATE_VERSION, "model_version"],
        limit=QUERY_WINDOW, consistency_level=consistency))
    return {int(r[contract.PROJECT_KEY]): (int(r[contract.STATE_VERSION]),
                                           int(r["model_version"])) for r in rows}


def held_versions(milvus: Milvus, name: str, ids: list[int]) -> dict[int, int]:
    """{project_id: state_version} of the rows `name` holds among `ids`, read Eventually:
    only to skip rows already at the wanted state, and a stale answer cannot skip wrongly.
    State versions only grow, so a row that once held the version Postgres wants now was
    never changed since (changing it takes a newer state); a stale answer only costs an
    embed. Session consistency waited for Milvus' next time tick (0.2 s) after each write
    of ours: most of a stream batch's time, twice while a backfill runs."""
    if not ids:
        return {}
    rows = _rows(milvus, name, f"{contract.PROJECT_KEY} in {list(ids)}", "Eventually")
    return {pid: state for pid, (state, _) in rows.items()}


def rows_with_ids(milvus: Milvus, name: str, ids: list[int],
                  consistency: str = "Strong") -> dict[int, tuple[int, int]]:
    """{project_id: (state_version, model_version)}, read Strong unless told: a check must
    see every acknowledged write, whoever made it."""
    if not ids:
        return {}
    return _rows(milvus, name, f"{contract.PROJECT_KEY} in {list(ids)}", consistency)


def rows_between(milvus: Milvus, name: str, low: int, high: int,
                 consistency: str = "Strong") -> dict[int, tuple[int, int]]:
    """Like rows_with_ids, for low <= id <= high; a full window is split in two and each
    half asked again."""
    expr = f"{contract.PROJECT_KEY} >= {low} and {contract.PROJECT_KEY} <= {high}"
    rows = _rows(milvus, name, expr, consistency)
    if len(rows) >= QUERY_WINDOW and low < high:
        middle = low + (high - low) // 2
        return (rows_between(milvus, name, low, middle, consistency)
                | rows_between(milvus, name, middle + 1, high, consistency))
    return rows


def index_metric(milvus: Milvus, name: str) -> str | None:
    """The metric `name`'s vector index ranks by; None before it has one."""
    def metric(c: MilvusClient) -> str | None:
        indexes = c.list_indexes(name)
        return c.describe_index(name, indexes[0])["metric_type"] if indexes else None

    return milvus.call(metric)


def has_field(milvus: Milvus, name: str, field: str) -> bool:
    schema = milvus.call(lambda c: c.describe_collection(name))
    return any(f["name"] == field for f in schema["fields"])


def request_index_and_load(milvus: Milvus, settings: Settings, name: str,
                           metric: str = contract.METRIC) -> None:
    """Seal what was written, request HNSW and loading; `ready` says when it is done.

    No call here waits for Milvus to persist, index or load: a busy Milvus took minutes to
    flush 10,000 rows, and stream events waited behind it. `_async` skips only pymilvus's
    wait for the sealed segments to be persisted; the seal itself is acknowledged.
    """
    milvus.call(lambda c: c.flush(name, _async=True), f"seal of {name}")
    milvus.call(lambda c: c.list_indexes(name) or c.create_index(
        name, contract.index_params(settings, metric), sync=False))
    load(milvus, name)


def load(milvus: Milvus, name: str) -> None:
    milvus.call(lambda c: c.load_collection(name, _async=True))


def ensure_loading(milvus: Milvus, name: str) -> str:
    """Loaded, Loading or NotLoad; a collection left NotLoad (a restarted Milvus may forget
    a load: 2.3.5 resumes it itself, another server might not) is asked to load again."""
    state = milvus.call(lambda c: c.get_load_state(name))["state"]
    state = getattr(state, "name", str(state))
    if state == "NotLoad":
        log.warning("%s is not loaded (Milvus restarted?): loading it again", name)
        load(milvus, name)
    return state


def index_caught_up(milvus: Milvus, name: str) -> bool:
    """Persisted rows exist and none waits for the index. Sealed rows count only once
    persisted, so right after the seal this is False, not vacuously True."""
    def caught_up(c: MilvusClient) -> bool:
        index = c.describe_index(name, c.list_indexes(name)[0])
        return index["total_rows"] > 0 and index["pending_index_rows"] == 0

    return milvus.call(caught_up)


def count(milvus: Milvus, name: str) -> int:
    # Strong: every acknowledged write counts, or the check would race our own inserts.
    rows = milvus.call(lambda c: c.query(name, filter="", output_fields=["count(*)"],
                                         consistency_level="Strong"))
    return int(rows[0]["count(*)"])


def _target(client: MilvusClient, alias: str) -> str | None:
    # describe_alias on a missing alias logs an error with a traceback: look first.
    if alias not in client.list_aliases()["aliases"]:
        return None
    return client.describe_alias(alias)["collection_name"]


def alias_target(milvus: Milvus, alias: str) -> str | None:
    return milvus.call(lambda c: _target(c, alias))


def point_alias(milvus: Milvus, alias: str, name: str) -> str | None:
    """Move `alias` to `name` in one call; returns the collection it left."""
    old = alias_target(milvus, alias)

    def move(c: MilvusClient) -> None:
        current = _target(c, alias)  # again: a retry may follow an applied call
        if current is None:
            c.create_alias(name, alias)
        elif current != name:
            c.alter_alias(name, alias)

    if old != name:
        milvus.call(move)
        log.info("alias %s -> %s (was %s)", alias, name, old)
    return old if old != name else None


def drop_alias(milvus: Milvus, alias: str) -> str | None:
    old = alias_target(milvus, alias)
    if old is not None:
        milvus.call(lambda c: _target(c, alias) is None or c.drop_alias(alias))
        log.info("alias %s dropped (was on %s)", alias, old)
    return old


# -- retiring replaced collections ----------------------------------------------------


class Retirement:
    """Collections to drop once their grace period is over, unless an alias is on them."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.due: dict[str, float] = {}

    def schedule(self, name: str | None) -> None:
        if name and name not in self.due:
            self.due[name] = time.monotonic() + self.grace_s
            log.info("%s will be dropped in %.0f s", name, self.grace_s)

    def cancel(self, name: str) -> None:
        self.due.pop(name, None)

    def any_due(self) -> bool:
        now = time.monotonic()
        return any(deadline <= now for deadline in self.due.values())

    def drop_due(self, milvus: Milvus) -> list[str]:
        now, dropped = time.monotonic(), []
        for name, deadline in list(self.due.items()):
            if deadline > now:
                continue
            del self.due[name]
            # Dropping a collection silently drops its aliases: never drop a live one.
            if milvus.call(lambda c, n=name: c.has_collection(n)) and not aliased(milvus, name):
                drop(milvus, name)
                metrics.DROPS.inc()
                log.info("dropped replaced collection %s", name)
                dropped.append(name)
        return dropped


def schedule_leftovers(milvus: Milvus, settings: Settings, retirement: Retirement,
                       keep: set[str]) -> None:
    """At start-up: our unaliased collections, except those being built, go to retirement."""
    for kind in (contract.PROJECTS, contract.USERS):
        for name in ours(milvus, settings, kind):
            if name not in keep and not aliased(milvus, name):
                retirement.schedule(name)
