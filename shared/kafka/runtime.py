"""The consumer runtime every cofeat stream uses (ingest, the embedder's stream).

Modelled on Quix Streams' consumer: each record gets an outcome (an error while decoding one
becomes its reason, never the caller's exception), and partitions are paused, never slept
on, while the owner cannot take more. What it owns:

- Polling and decoding: `poll()` returns a `Batch` of decoded events and rejected records.
  A record the client library itself cannot decode (kafka-python raises from `poll()`) is
  stepped over, exactly that one, and rejected as `corrupt_record` with its coordinates.
- Offsets stored with the data: the owner stores `batch.offsets` in the same Postgres
  transaction as the data; on every assignment the runtime seeks to what Postgres holds.
- Rebalances with bounded callbacks: the stored offsets are asked for once, with a timeout;
  if Postgres does not answer, those partitions stay paused and the main loop asks again
  with backoff. Nothing in a callback sleeps or retries.
- Pause and resume: `hold()`/`release()` pause every assigned partition (backpressure, an
  outage) while the owner keeps calling `poll()`, so the group never evicts it;
  `idle(seconds)` is that wait for owners that must retry in place.
- Liveness (each poll beats `/healthz`) and readiness (not ready while joining or while
  partitions wait for their offsets).

`Pipeline` (shared/kafka/pipeline.py) runs an owner that stores batches (ingest) on top of
this; the embedder calls `poll`/`done` from its own loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import psycopg
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge

from shared import retry
from shared.db.connect import Reconnecting
from shared.db.store import load_offsets
from shared.events import InvalidEvent
from shared.kafka import positions
from shared.kafka.batch import Batch, Rejected
from shared.kafka.config import consumer_config
from shared.metrics import health
from shared.settings import Settings

log = logging.getLogger("cofeat.consumer")

# (record, newest acceptable ts in ms) -> event; raises InvalidEvent for a bad record.
Decode = Callable[[object, int], object]

RECORDS = Counter("cofeat_consumer_records_total", "Records consumed, by outcome and kind "
                  "(stored, dead_lettered, skipped)", ["group", "topic", "outcome", "kind"])
REBALANCES = Counter("cofeat_consumer_rebalances_total", "Partition assignments and "
                     "revocations", ["group", "event"])
PAUSED = Gauge("cofeat_consumer_paused_partitions", "Assigned partitions not fetched now "
               "(backpressure, an outage, offsets not loaded yet)", ["group"])
JOINING = "consumer"  # the readiness problem while not (re)joined and positioned


class StoredOffsets:
    """The next offsets a group stored with its data in Postgres, asked for on assignment.

    One attempt per call, with timeouts on connecting, on the statement and on a silent
    network: a rebalance callback must not wait on a database that is down.
    """

    def __init__(self, settings: Settings, group: str, timeout_s: float = 5.0):
        self.settings, self.group, self.timeout_s = settings, group, timeout_s
        self.db = Reconnecting(settings, **bounded(timeout_s))

    def load(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        wanted = list(partitions)
        try:
            stored = load_offsets(self.db.get(), self.group,
                                  [(tp.topic, tp.partition) for tp in wanted])
        except psycopg.Error:
            self.close()
            raise
        return {tp: stored[(tp.topic, tp.partition)] for tp in wanted
                if (tp.topic, tp.partition) in stored}

    def close(self) -> None:
        self.db.close()


def bounded(timeout_s: float) -> dict:
    """libpq options so that no call waits much longer than `timeout_s` on a server or a
    network that went away (a cut connection is noticed by TCP, not by Postgres)."""
    ms = int(timeout_s * 1000)
    return {"connect_timeout": max(1, int(timeout_s)), "options": f"-c statement_timeout={ms}",
            "keepalives": 1, "keepalives_idle": max(1, int(timeout_s)),
            "keepalives_interval": 1, "keepalives_count": 3, "tcp_user_timeout": ms}


class Placement:
    """Where assigned partitions start: the offsets stored with the data. One bounded try
    per call (it runs in rebalance callbacks); partitions it cannot place yet stay in
    `waiting`, paused by the consumer, until a later try succeeds."""

    def __init__(self, consumer: KafkaConsumer, offsets: StoredOffsets, retry_max_s: float):
        self.consumer, self.offsets = consumer, offsets
        self.waiting: set[TopicPartition] = set()
        self.outage = retry.Outage("database (stored offsets)", retry_max_s, log=log)

    def place(self, partitions: Iterable[TopicPartition]) -> None:
        self.waiting |= set(partitions)
        self.retry()

    def due(self) -> bool:
        return bool(self.waiting) and self.outage.ready()

    def retry(self) -> None:
        wanted = sorted(self.waiting)
        if not wanted:
            return
        try:
            stored = self.offsets.load(wanted)
        except Exception as error:  # noqa: BLE001 - a rebalance callback must never raise
            if not self.outage.failures:
                log.info("%s wait, paused, for their stored offsets", names(wanted))
            self.outage.failed(error)
            return
        self.outage.recovered()
        for tp in wanted:
            if tp in stored:
                self.consumer.seek(tp, stored[tp])
            else:
                self.consumer.seek_to_beginning(tp)
        self.waiting.clear()

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        self.waiting -= set(partitions)


class Consumer:
    """One group member over `decoders` ({topic: Decode}); see the module docstring."""

    def __init__(self, settings: Settings, group: str, decoders: Mapping[str, Decode],
                 offsets: StoredOffsets, max_records: int, retry_max_s: float = 30.0,
                 check_future: bool = True, fetch_max_wait_ms: int = 500):
        self.settings, self.group = settings, group
        self.decoders = dict(decoders)
        self.max_records = max_records
        self.skew_ms = (int(settings.max_future_skew.total_seconds() * 1000) if check_future
                        else None)
        self.consumer = KafkaConsumer(**consumer_config(
            settings, group, max_poll_records=max_records,
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
            fetch_max_wait_ms=fetch_max_wait_ms))
        self.generation = 0  # bumped by every revocation: older batches are void
        self.joined = False  # assigned at least once (possibly nothing)
        self.held = False  # the owner paused everything
        self.placement = Placement(self.consumer, offsets, retry_max_s)
        self.revoke_hooks: list[Callable[[float], None]] = []
        self.poll_failure = retry.Outage("kafka (poll)", 5.0, log=log)
        self.polling = False
        health.stall_s = settings.kafka_max_poll_interval_ms / 1000
        health.problem(JOINING, "joining the consumer group")

    def subscribe(self) -> None:
        self.consumer.subscribe(list(self.decoders), listener=_Listener(self))
        log.info("consuming %s as group %s", ", ".join(self.decoders), self.group)

    # -- polling -------------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> Batch:
        """The next batch (empty when nothing came, or while held). Never raises for a
        record."""
        self._place_waiting()
        records = self._poll(timeout_ms)
        if isinstance(records, Batch):
            return records
        return self._decode(records)

    def _poll(self, timeout_ms: int):
        health.beat()
        if not self.poll_failure.ready():
            timeout_ms = min(timeout_ms, 100)  # keep polling, but do not spin on the error
        self.polling = True
        try:
            records = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.max_records)
        except Exception as error:  # noqa: BLE001 - the client failed on a record
            return self._undecodable(error)
        finally:
            self.polling = False
        self.poll_failure.recovered()
        return records

    def _decode(self, records: dict) -> Batch:
        batch = Batch(self.generation)
        latest = (int(time.time() * 1000) + self.skew_ms) if self.skew_ms is not None else None
        rejected = batch.rejected
        for tp, part in records.items():
            if not part:
                continue
            decode = self.decoders[tp.topic]
            events = batch.events.setdefault(tp.topic, [])
            sources = batch.sources.setdefault(tp.topic, [])
            for record in part:
                try:
                    event = decode(record, latest)
                except InvalidEvent as error:
                    rejected.append(Rejected.of(record, error.reason))
                    continue
                except Exception as error:  # noqa: BLE001 - every record gets an outcome
                    log.warning("decoding %s[%d]@%d failed unexpectedly: %s", tp.topic,
                                tp.partition, record.offset, retry.describe(error))
                    rejected.append(Rejected.of(record, f"internal: {type(error).__name__}"))
                    continue
                events.append(event)
                sources.append(record)
            batch.first_offsets[tp] = part[0].offset
            batch.next_offsets[tp] = part[-1].offset + 1
        return batch

    def _undecodable(self, error: Exception) -> Batch | dict:
        """kafka-python raised from poll(). When it failed unpacking records (a corrupt
        batch, a header key that is not UTF-8), it left the partition's position on the
        first record it could not return: step past exactly that one and reject it with its
        coordinates. kafka-python decodes a record batch from its start, so a record that
        shares a batch with an undecodable one and comes after it cannot be read either: it
        is rejected the same way on the next poll, one record at a time."""
        tp, offset, behind = self._failing_record(error)
        if tp is None:
            self.poll_failure.failed(error)
            return {}
        where = "in a record batch the client cannot decode" if behind else "undecodable"
        log.warning("%s[%d]@%d is %s, stepping past it: %s", tp.topic, tp.partition, offset,
                    where, retry.describe(error))
        self.consumer.seek(tp, offset + 1)
        batch = Batch(self.generation)
        reason = (f"corrupt_record: {where}: " if behind else "corrupt_record: ") + \
            retry.describe(error)
        batch.rejected.append(Rejected(tp.topic, tp.partition, offset, None, None, [], reason))
        batch.first_offsets[tp], batch.next_offsets[tp] = offset, offset + 1
        return batch

    def _failing_record(self, error: Exception) -> tuple[TopicPartition | None, int, bool]:
        """(partition, the offset it stands on, whether the failure was in a record before
        that one), or (None, -1, False) when the error was no record's."""
        # kafka-python 3.0 keeps the records it was unpacking as _next_partition_records;
        # tests/shared/kafka/test_runtime.py pins this against a real broker. Only an
        # error raised while unpacking records counts: skipping a good record for a
        # network error would lose it.
        if not _raised_unpacking(error):
            return None, -1, False
        part = getattr(getattr(self.consumer, "_fetcher", None), "_next_partition_records",
                       None)
        tp = getattr(part, "topic_partition", None)
        if tp is None or tp not in self.consumer.assignment():
            return None, -1, False
        position = self.consumer.position(tp)
        unpacked_to = getattr(part, "next_fetch_offset", position)
        return tp, position, unpacked_to < position

    def done(self, batch: Batch, outcome_of_rejected: str = "dead_lettered") -> None:
        """The owner stored `batch` (and its offsets): count each record's outcome, and
        tell Kafka too, for lag tools (Postgres holds the truth)."""
        for topic, events in batch.events.items():
            if events:
                RECORDS.labels(self.group, topic, "stored", "").inc(len(events))
        for letter in batch.rejected:
            RECORDS.labels(self.group, letter.topic, outcome_of_rejected, letter.kind).inc()
        if batch.generation != self.generation:
            return  # those partitions may be another member's now
        offsets = {tp: OffsetAndMetadata(offset, "", -1)
                   for tp, offset in batch.next_offsets.items()}
        try:
            self.consumer.commit_async(offsets)
        except KafkaError as error:
            log.debug("kafka offset commit skipped: %s", error)

    # -- pausing -------------------------------------------------------------------------

    def hold(self) -> None:
        """Fetch nothing more (backpressure, an outage), but stay in the group."""
        if not self.held:
            self.held = True
            self._pause_state()

    def release(self) -> None:
        if self.held:
            self.held = False
            self._pause_state()

    def _pause_state(self) -> None:
        assigned = self.consumer.assignment()
        paused = assigned if self.held else (assigned & self.placement.waiting)
        if paused:
            self.consumer.pause(*paused)
        if assigned - paused:
            self.consumer.resume(*(assigned - paused))
        PAUSED.labels(self.group).set(len(paused))

    def idle(self, seconds: float, stopping: Callable[[], bool] = lambda: False) -> bool:
        """Wait `seconds` (a retry's backoff) while polling with every partition paused, so
        the group keeps this member. True if `stopping()` said so meanwhile."""
        if self.polling:  # called from inside poll() (a callback): must not poll again
            time.sleep(min(seconds, 0.05))
            return stopping()
        was_held = self.held
        self.hold()
        deadline = time.monotonic() + seconds
        try:
            while not stopping() and (left := deadline - time.monotonic()) > 0:
                self._place_waiting()
                records = self._poll(int(min(left, 1.0) * 1000) + 1)
                self._rewind(records)
        finally:
            if not was_held:
                self.release()
        return stopping()

    def _rewind(self, records) -> None:
        # Paused partitions return nothing; a partition assigned during the wait might.
        if isinstance(records, Batch):
            for tp, offset in records.first_offsets.items():
                self.consumer.seek(tp, offset)
            return
        for tp, part in records.items():
            if part:
                self.consumer.seek(tp, part[0].offset)

    # -- rebalances ----------------------------------------------------------------------

    def revoked(self, partitions: list[TopicPartition]) -> None:
        self.generation += 1
        health.problem(JOINING, "rebalancing")
        deadline = time.monotonic() + self.settings.kafka_rebalance_timeout_s
        for hook in self.revoke_hooks:
            hook(deadline)
        self.placement.forget(partitions)
        if partitions:  # kafka-python calls this before every join, the first included
            REBALANCES.labels(self.group, "revoked").inc()
            log.info("revoked %s", names(partitions))

    def assigned(self, partitions: list[TopicPartition]) -> None:
        self.joined = True
        REBALANCES.labels(self.group, "assigned").inc()
        self.placement.place(partitions)
        self._pause_state()
        self._ready_if_placed()
        log.info("assigned %s", names(partitions) or "nothing")

    def _place_waiting(self) -> None:
        if self.placement.due():
            self.placement.retry()
            self._pause_state()
            self._ready_if_placed()

    def _ready_if_placed(self) -> None:
        if self.joined and not self.placement.waiting:
            health.clear(JOINING)

    # -- where it stands -----------------------------------------------------------------

    def caught_up(self) -> bool:
        """Joined, placed, and every assigned partition read to its high watermark (joined
        with no partitions counts: more members than partitions)."""
        return (self.joined and not self.placement.waiting
                and positions.caught_up(self.consumer))

    def rewind_truncated(self) -> None:
        positions.rewind_truncated(self.consumer)

    def report_lag(self, gauge: Gauge) -> None:
        positions.report_lag(self.consumer, gauge)

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        finally:
            self.placement.offsets.close()
            # No loop of ours to watch any more (an embedder back to standby, say).
            health.last_beat = None
            health.clear(JOINING)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, consumer: Consumer):
        self.consumer = consumer

    def on_partitions_revoked(self, revoked) -> None:
        self.consumer.revoked(list(revoked))

    def on_partitions_assigned(self, assigned) -> None:
        self.consumer.assigned(list(assigned))


_UNPACKING = {"_unpack_records", "_maybe_uncompress", "_read_msg", "_parse_fetched_data"}


def _raised_unpacking(error: BaseException) -> bool:
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name in _UNPACKING:
            return True
        frame = frame.tb_next
    return False


def names(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions))
