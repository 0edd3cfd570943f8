"""Does a collection hold exactly what Postgres says? Missing, extra and stale ids, and
the repair.

The invariant: once the embedder is caught up, the collection behind the projects alias
holds exactly the live projects whose image has not failed, each at its current
`state_version` and embedded by the collection's model. `compare` walks Postgres in id
order and asks Milvus for the same id range, so memory stays bounded by one page.

A change in flight (stored by ingest, not yet reached by the stream) looks like drift for
a moment. `confirm` asks again about the suspects only: a project whose Postgres state
did not move between the two looks, yet Milvus still disagrees, is drift for real.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import psycopg
from kafka.errors import KafkaError

from services.embedder import collections as mv
from services.embedder import metrics, states
from services.embedder.writer import Target, Writer, Written
from shared.retry import describe
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")

MAX_KEY = 2**63 - 1


@dataclass
class Drift:
    missing: list[int] = field(default_factory=list)  # live in Postgres, no row
    extra: list[int] = field(default_factory=list)  # a row Postgres does not want
    stale: list[int] = field(default_factory=list)  # another state or another model
    seen: dict[int, int | None] = field(default_factory=dict)  # Postgres version looked at

    def __len__(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.stale)

    def ids(self) -> list[int]:
        return sorted({*self.missing, *self.extra, *self.stale})

    def summary(self) -> dict[str, int]:
        return {"missing": len(self.missing), "extra": len(self.extra),
                "stale": len(self.stale)}


def _diff(expected: dict[int, int | None], held: dict[int, tuple[int, int]],
          model_version: int, drift: Drift) -> None:
    """`expected` None: any row or none will do (see states.expected_page)."""
    for project_id, version in expected.items():
        row = held.get(project_id)
        if version is None:
            continue
        if row is None:
            drift.missing.append(project_id)
        elif row != (version, model_version):
            drift.stale.append(project_id)
        else:
            continue
        drift.seen[project_id] = version
    for project_id in held.keys() - expected.keys():
        drift.extra.append(project_id)
        drift.seen[project_id] = None


def compare(milvus: mv.Milvus, db: Callable[[], psycopg.Connection], name: str,
            model_version: int, page: int = 5000) -> Drift:
    """The whole collection against Postgres, one page of ids at a time."""
    drift, after = Drift(), -1
    while after < MAX_KEY:
        expected = dict(states.expected_page(db(), after, page))
        high = max(expected) if len(expected) == page else MAX_KEY
        _diff(expected, mv.rows_between(milvus, name, after + 1, high), model_version, drift)
        after = high
    return drift


def confirm(milvus: mv.Milvus, db: Callable[[], psycopg.Connection], name: str,
            model_version: int, suspects: Drift) -> Drift:
    """The suspects that still drift while their Postgres state stayed the same."""
    ids = suspects.ids()
    if not ids:
        return Drift()
    found = states.current(db(), ids)
    expected = {}
    for pid in ids:
        want = states.wanted(found.get(pid))
        if want is states.LEAVE:
            expected[pid] = None
        elif want is not None:
            expected[pid] = want.version
    held = _held(milvus, name, ids)
    drift = Drift()
    _diff(expected, held, model_version, drift)
    for kind in ("missing", "extra", "stale"):
        kept = [pid for pid in getattr(drift, kind)
                if suspects.seen.get(pid, -1) == drift.seen.get(pid)]
        setattr(drift, kind, kept)
    return drift


def _held(milvus: mv.Milvus, name: str, ids: list[int]) -> dict[int, tuple[int, int]]:
    found: dict[int, tuple[int, int]] = {}
    for start in range(0, len(ids), 1000):
        part = ids[start:start + 1000]
        found |= mv.rows_with_ids(milvus, name, part)
    return found


CONFIRM_AFTER_S = 2.0  # `check` from outside: long enough for a change in flight to land


class Progress(Protocol):
    """What the check needs of the stream (services/embedder/stream.py)."""

    def caught_up(self) -> bool: ...
    def end_offsets(self) -> dict[tuple[str, int], int] | None: ...
    def applied(self, marks: dict[tuple[str, int], int]) -> bool | None: ...


class Reconciler:
    """The running embedder's own check, every COFEAT_EMBED_RECONCILE_EVERY_S: one page of
    ids per loop turn (read Bounded: cheap, a recent write may look missing), then the
    suspects again, Strong, once the stream has written every event the broker held when
    the scan ended. A suspect whose Postgres state came from such an event is then in
    Milvus unless something lost it, so what still drifts is drift for real: counted and
    repaired. (Waiting a fixed moment instead counted the stream's own backlog as drift
    whenever it ran late.)"""

    def __init__(self, settings: Settings, milvus: mv.Milvus,
                 db: Callable[[], psycopg.Connection], writer: Writer,
                 live: Callable[[], Target | None], stream: Callable[[], Progress | None],
                 on_written: Callable[[dict, Written], None]):
        self.settings, self.milvus, self.db, self.writer = settings, milvus, db, writer
        self.live, self.stream, self.on_written = live, stream, on_written
        self.next_at = time.monotonic() + settings.embed_reconcile_every_s
        self.scan: _Scan | None = None
        self.last: Drift | None = None  # the last confirmed drift

    def step(self) -> None:
        target, stream = self.live(), self.stream()
        if not self.settings.embed_reconcile_every_s or target is None or stream is None:
            return
        if self.scan is None or self.scan.target != target:
            if time.monotonic() < self.next_at or not stream.caught_up():
                return
            self.scan = _Scan(target)
        if not self.scan.done:
            self.scan.page(self.milvus, self.db)
            if self.scan.done:
                self.scan.marks = _end_offsets(stream)
            return
        applied = stream.applied(self.scan.marks) if self.scan.marks is not None else None
        if applied is None:  # the broker did not answer, or partitions moved: later
            log.info("%s: check postponed (cannot tell what the stream has written)",
                     target.name)
            self.scan, self.next_at = None, time.monotonic() + CONFIRM_AFTER_S * 5
        elif applied:
            self._finish(target)

    def _finish(self, target: Target) -> None:
        drift = confirm(self.milvus, self.db, target.name, target.encoder.version,
                        self.scan.suspects)
        self.scan, self.last = None, drift
        self.next_at = time.monotonic() + self.settings.embed_reconcile_every_s
        for kind, count in drift.summary().items():
            metrics.DRIFT.labels(kind).set(count)
        if drift:
            # The ids let an operator read those projects' events in project_events.
            log.warning("%s drifted from Postgres: %s, e.g. %s; repairing", target.name,
                        drift.summary(), sample(drift))
            wanted = states.wanted_for(self.db(), drift.ids())
            self.on_written(wanted, self.writer.apply(wanted, [target]))
            metrics.DRIFT_REPAIRED.inc(len(drift))
        else:
            log.info("%s matches Postgres", target.name)


def _end_offsets(stream: Progress) -> dict[tuple[str, int], int] | None:
    try:
        return stream.end_offsets()
    except KafkaError as error:
        log.warning("end offsets unavailable (%s): the check waits for the next round",
                    describe(error))
        return None


class _Scan:
    def __init__(self, target: Target, page_size: int = 5000):
        self.target, self.page_size = target, page_size
        self.after, self.suspects = -1, Drift()
        self.done = False
        self.marks: dict[tuple[str, int], int] | None = None  # end offsets as it ended

    def page(self, milvus: mv.Milvus, db: Callable[[], psycopg.Connection]) -> None:
        expected = dict(states.expected_page(db(), self.after, self.page_size))
        high = max(expected) if len(expected) == self.page_size else MAX_KEY
        held = mv.rows_between(milvus, self.target.name, self.after + 1, high, "Bounded")
        _diff(expected, held, self.target.encoder.version, self.suspects)
        self.after = high
        if high == MAX_KEY:
            self.done = True


def check(milvus: mv.Milvus, db: Callable[[], psycopg.Connection], target: Target) -> Drift:
    """A whole comparison, then the suspects again after CONFIRM_AFTER_S (a running
    embedder may be writing the very changes the first look caught in flight)."""
    suspects = compare(milvus, db, target.name, target.encoder.version)
    if suspects:
        time.sleep(CONFIRM_AFTER_S)
    return confirm(milvus, db, target.name, target.encoder.version, suspects)


def sample(drift: Drift, size: int = 10) -> dict[str, list[int]]:
    return {kind: sorted(getattr(drift, kind))[:size] for kind in ("missing", "extra", "stale")}


def report(target: Target, drift: Drift, repaired: bool = False) -> dict:
    return {"collection": target.name, "model_version": target.encoder.version,
            **drift.summary(), "drift": len(drift), "repaired": repaired,
            "sample": sample(drift)}
