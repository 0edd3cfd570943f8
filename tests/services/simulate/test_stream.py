import json
from collections import Counter

import numpy as np
import pytest

from services.simulate.stream import (
    INVALID_KINDS,
    Encoder,
    FileSink,
    Pacer,
    corrupt,
    mix,
    publish,
    records,
)
from shared import events
from shared.topics import INTERACTIONS, PROJECTS


def parse(topic, value):
    return (events.parse_interaction if topic == INTERACTIONS else events.parse_project)(value)


@pytest.mark.parametrize("kind", INVALID_KINDS)
@pytest.mark.parametrize("topic", [INTERACTIONS, PROJECTS])
def test_each_corruption_fails_with_its_reason(kind, topic, tiny_records):
    valid = next(v for t, _k, v in tiny_records if t == topic)
    rng = np.random.default_rng(0)
    for _ in range(10):  # some corruptions pick among variants at random
        with pytest.raises(events.InvalidEvent) as failure:
            parse(topic, corrupt(valid, kind, rng))
        assert failure.value.kind == kind
        assert b"\n" not in corrupt(valid, kind, rng)  # one record per JSON line


def test_fractions_are_honoured(tiny_records):
    valid = tiny_records[:10_000]
    out = mix(valid, np.random.default_rng(1), invalid_fraction=0.1, duplicate_fraction=0.05)
    reasons, seen, replays = Counter(), {}, 0
    for topic, key, value in out:
        try:
            event = parse(topic, value)
        except events.InvalidEvent as error:
            reasons[error.kind] += 1
            continue
        if event.event_id in seen:
            assert seen[event.event_id] == (topic, key, value)  # same id, same value
            replays += 1
        seen[event.event_id] = (topic, key, value)
    assert len(seen) == len(valid)
    assert abs(sum(reasons.values()) / len(out) - 0.1) < 0.015
    assert abs(replays / len(valid) - 0.05) < 0.01
    assert set(reasons) == set(INVALID_KINDS)


def test_replays_follow_their_originals(tiny_records):
    out = mix(tiny_records[:5000], np.random.default_rng(2), 0.0, 0.2)
    first = {}
    for position, (_t, _k, value) in enumerate(out):
        first.setdefault(value, position)
    original = {value: i for i, (_t, _k, value) in enumerate(tiny_records[:5000])}
    # Relative order of first occurrences is the original order.
    ordered = sorted(first, key=first.get)
    assert [original[v] for v in ordered] == sorted(original.values())


def test_no_mixing_leaves_records_alone(tiny_records):
    assert mix(tiny_records[:100], np.random.default_rng(0), 0.0, 0.0) == tiny_records[:100]


def test_file_sink_writes_the_same_stream(tmp_path, tiny_world, tiny_chunks):
    encoder = Encoder(tiny_world, tmp_path / "images", "jpeg", prefix="x.")
    stream = list(records(tiny_world, tiny_chunks[:5], encoder, invalid_fraction=0.05,
                          duplicate_fraction=0.05))
    counts = publish(iter(stream), FileSink(tmp_path / "out"))
    for topic in ("x." + INTERACTIONS, "x." + PROJECTS):
        lines = (tmp_path / "out" / f"{topic}.jsonl").read_bytes().split(b"\n")[:-1]
        assert lines == [v for t, _k, v in stream if t == topic]
        assert counts[topic] == len(lines)
    first = json.loads((tmp_path / "out" / f"x.{PROJECTS}.jsonl").read_bytes().split(b"\n")[0])
    assert first["image_uri"].endswith(".jpg") and first["image_uri"].startswith("/")


def test_pacer_holds_the_rate():
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    pacer = Pacer(1000.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(640):
        pacer.tick()
    assert abs(now[0] - 0.64) < 0.001
    unlimited = Pacer(0.0, clock=lambda: 0.0, sleep=sleep)
    for _ in range(640):
        unlimited.tick()
    assert abs(now[0] - 0.64) < 0.001
