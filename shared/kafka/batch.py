"""What one poll of the consumer runtime hands its owner: decoded events, rejected records,
and the offsets the batch covers."""

from __future__ import annotations

from dataclasses import dataclass, field

from kafka import TopicPartition


@dataclass(eq=False, slots=True)
class Rejected:
    """A record that will not be stored, and why (`<kind>: <detail>`, docs/events.md).

    `key`, `value` and `headers` are the record's own, as far as the client could read them
    (nothing of a record it could not decode at all).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    reason: str

    @classmethod
    def of(cls, record, reason: str) -> Rejected:
        return cls(record.topic, record.partition, record.offset, record.key, record.value,
                   list(record.headers or []), reason)

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass(eq=False)
class Batch:
    """Per topic, the decoded `events` and their `sources` (the ConsumerRecords, same index);
    `rejected` records in poll order; and per partition the first offset the batch holds and
    the next offset after it. A batch belongs to one assignment `generation`: after a
    rebalance its partitions may be someone else's."""

    generation: int
    events: dict[str, list] = field(default_factory=dict)
    sources: dict[str, list] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)
    first_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    dead_lettered: int = 0  # rejected records already published, for a store that retries

    def __len__(self) -> int:
        return sum(map(len, self.events.values())) + len(self.rejected)

    def __bool__(self) -> bool:
        return bool(self.next_offsets)

    @property
    def offsets(self) -> dict[tuple[str, int], int]:
        """{(topic, partition): next offset}, as the stores keep them."""
        return {(tp.topic, tp.partition): offset for tp, offset in self.next_offsets.items()}

    def of(self, topic: str) -> list:
        return self.events.get(topic, [])

    def set_aside(self, topic: str, failed: dict[int, str]) -> None:
        """Move the events at these indexes of `topic` to `rejected`, each with its reason."""
        if not failed:
            return
        events, sources = self.events[topic], self.sources[topic]
        self.rejected += [Rejected.of(sources[i], reason) for i, reason in sorted(failed.items())]
        self.events[topic] = [e for i, e in enumerate(events) if i not in failed]
        self.sources[topic] = [r for i, r in enumerate(sources) if i not in failed]
