"""From behaviour chunks to contract-conforming Kafka records, then to Kafka or files.

Records are (topic, key, value) with values from shared.events encoders. Malformed records
(every kind the ingest service must reject) and replays of valid ones can be mixed in.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from services.simulate.behaviour import PROJECT_KINDS, Chunk
from services.simulate.render import image_file
from services.simulate.world import World
from shared import events, topics

INTERACTION_TYPES = (events.InteractionType.view, events.InteractionType.appreciate,
                     events.InteractionType.comment)
# Each name is also the `kind` shared.events.InvalidEvent reports for it.
INVALID_KINDS = ("not_utf8", "not_json", "not_object", "missing_field", "wrong_type",
                 "id_out_of_range", "unknown_type", "bad_ts", "bad_event_id")

Record = tuple[str, bytes, bytes]


class Encoder:
    """Turns chunks into records in simulated-time order, numbering events as it goes."""

    def __init__(self, world: World, images_dir: Path, fmt: str, prefix: str = "",
                 image_base_url: str | None = None):
        self.world = world
        self.images_dir = Path(images_dir).resolve()
        self.fmt = fmt
        # Set: image_uris are this URL + the file's path under images_dir (a CDN's view).
        self.image_base_url = image_base_url.rstrip("/") if image_base_url else None
        self.interactions_topic = topics.interactions(prefix)
        self.projects_topic = topics.projects(prefix)
        self.tag = f"sim{world.config.seed}"
        self.next_interaction = 0
        self.next_project_event = 0

    def records(self, chunk: Chunk) -> list[Record]:
        projects = self._project_records(chunk)
        interactions = self._interaction_records(chunk)
        # Merge by time; on equal times a project event goes first.
        ts = np.concatenate([chunk.project_ts, chunk.ts])
        side = np.concatenate([np.zeros(len(projects)), np.ones(len(interactions))])
        both = projects + interactions
        return [both[i] for i in np.lexsort((side, ts))]

    def _interaction_records(self, chunk: Chunk) -> list[Record]:
        start, topic, tag = self.next_interaction, self.interactions_topic, self.tag
        self.next_interaction += len(chunk.ts)
        out = []
        for n, ts, user, project, kind in zip(
                range(start, self.next_interaction), chunk.ts.tolist(),
                (chunk.user + 1).tolist(), (chunk.project + 1).tolist(),
                chunk.kind.tolist(), strict=True):
            event = events.Interaction(f"{tag}-i{n}", INTERACTION_TYPES[kind], user, project, ts)
            out.append((topic, events.interaction_key(event), events.interaction_value(event)))
        return out

    def image_uri(self, project_id: int) -> str:
        path = image_file(self.images_dir, project_id, self.fmt)
        if self.image_base_url is None:
            return str(path)
        return f"{self.image_base_url}/{path.relative_to(self.images_dir).as_posix()}"

    def _project_records(self, chunk: Chunk) -> list[Record]:
        start, topic, tag = self.next_project_event, self.projects_topic, self.tag
        self.next_project_event += len(chunk.project_ts)
        owners = self.world.owner[chunk.project_index] + 1
        out = []
        for n, ts, index, owner, kind in zip(
                range(start, self.next_project_event), chunk.project_ts.tolist(),
                chunk.project_index.tolist(), owners.tolist(), chunk.project_kind.tolist(),
                strict=True):
            uri = self.image_uri(index + 1)
            event = events.ProjectEvent(f"{tag}-p{n}", PROJECT_KINDS[kind], index + 1, owner,
                                        uri, ts)
            out.append((topic, events.project_key(event), events.project_value(event)))
        return out


# -- malformed events ---------------------------------------------------------------------

def corrupt(value: bytes, kind: str, rng) -> bytes:
    """A copy of a valid value broken in exactly one way, the one named by `kind`."""
    if kind == "not_utf8":
        return b"\xff\xfe" + value[2:]
    if kind == "not_json":
        return value[: max(1, len(value) // 2)]
    if kind == "not_object":
        return json.dumps([json.loads(value)]).encode()
    fields = json.loads(value)
    fields["event_id"] = fields["event_id"] + "-bad"  # never collides with a valid event
    id_name = "user_id" if "user_id" in fields else "project_id"
    if kind == "missing_field":
        del fields[rng.choice(sorted(fields))]
    elif kind == "wrong_type":
        fields[id_name] = str(fields[id_name])
    elif kind == "id_out_of_range":
        fields[id_name] = -fields[id_name] - 1 if rng.random() < 0.5 else 2**63 + fields[id_name]
    elif kind == "unknown_type":
        fields["type"] = "like"
    elif kind == "bad_ts":
        # Seconds instead of milliseconds, or text that is not RFC 3339.
        fields["ts"] = fields["ts"] // 1000 if rng.random() < 0.5 else "yesterday"
    elif kind == "bad_event_id":
        fields["event_id"] = "" if rng.random() < 0.5 else "x" * (events.MAX_EVENT_ID_LEN + 1)
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return json.dumps(fields, separators=(",", ":")).encode()


def mix(records: list[Record], rng, invalid_fraction: float,
        duplicate_fraction: float) -> list[Record]:
    """Insert malformed records (about `invalid_fraction` of the output) at random places and
    replay about `duplicate_fraction` of the valid records a little later."""
    n = len(records)
    if n == 0 or (invalid_fraction <= 0 and duplicate_fraction <= 0):
        return records
    position = np.arange(n, dtype=np.float64)
    replayed = np.flatnonzero(rng.random(n) < duplicate_fraction)
    # A replay comes after its original, so it never precedes a project's publication.
    replay_at = replayed + rng.uniform(0.5, 200.0, len(replayed))
    extra = rng.binomial(n + len(replayed), invalid_fraction / max(1e-9, 1 - invalid_fraction))
    sources = rng.integers(0, n, extra)
    kinds = rng.integers(0, len(INVALID_KINDS), extra)
    invalid = [(records[s][0], records[s][1], corrupt(records[s][2], INVALID_KINDS[k], rng))
               for s, k in zip(sources.tolist(), kinds.tolist(), strict=True)]
    everything = records + [records[i] for i in replayed.tolist()] + invalid
    keys = np.concatenate([position, replay_at, rng.uniform(0, n, extra)])
    return [everything[i] for i in np.argsort(keys, kind="stable")]


# -- sinks ----------------------------------------------------------------------------------

class FileSink:
    """One JSON-lines file per topic; each line is a record's value, byte for byte.

    Keys are not written: for valid events they are the value's user_id (interactions) or
    project_id (projects)."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.files: dict[str, object] = {}

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        handle = self.files.get(topic)
        if handle is None:
            handle = self.files[topic] = open(self.out_dir / f"{topic}.jsonl", "wb")  # noqa: SIM115
        handle.write(value + b"\n")

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


class KafkaSink:
    def __init__(self, settings, **overrides):
        from kafka import KafkaProducer

        from shared.kafka.config import producer_config

        config = producer_config(settings, linger_ms=20, batch_size=256 * 1024) | overrides
        self.producer = KafkaProducer(**config)
        self.errors: list[BaseException] = []

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self.producer.send(topic, key=key, value=value).add_errback(self.errors.append)

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} records failed: {self.errors[0]!r}")


class Pacer:
    """Sleeps so that records leave at `rate` per second on average (0: no limit)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self.start = clock()
        self.sent = 0

    def tick(self) -> None:
        self.sent += 1
        if self.rate > 0 and self.sent % 64 == 0:
            ahead = self.sent / self.rate - (self.clock() - self.start)
            if ahead > 0:
                self.sleep(ahead)


def records(world: World, chunks: Iterable[Chunk], encoder: Encoder, *,
            invalid_fraction: float = 0.0, duplicate_fraction: float = 0.0) -> Iterator[Record]:
    for chunk in chunks:
        rng = np.random.default_rng([world.config.seed, 4, chunk.index])
        yield from mix(encoder.records(chunk), rng, invalid_fraction, duplicate_fraction)


def publish(stream: Iterable[Record], sink, rate: float = 0.0, progress=None) -> Counter:
    """Send every record; returns counts per topic."""
    pacer, counts = Pacer(rate), Counter()
    try:
        for topic, key, value in stream:
            sink.send(topic, key, value)
            counts[topic] += 1
            pacer.tick()
            if progress and pacer.sent % 10_000 == 0:
                progress(10_000)
    finally:
        sink.close()
    return counts
