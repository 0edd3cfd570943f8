"""`cofeat ingest` against a real broker and a real Postgres."""

from __future__ import annotations

import json

from shared.kafka import dlq
from tests.helpers import (
    count,
    fetch_one,
    interaction,
    project,
    read_dlq,
    run_ingest,
)

# Every way the contract can be broken, with the reason kind the DLQ must carry.
INVALID_INTERACTIONS = [
    (b"\xff\xfe not utf-8", "not_utf8"),
    (b"{not json", "not_json"),
    (b"[1, 2]", "not_object"),
    (b'{"type": "view", "user_id": 1, "project_id": 2, "ts": 1750000000000}',
     "missing_field"),
    (b'{"event_id": 7, "type": "view", "user_id": 1, "project_id": 2, "ts": 1750000000000}',
     "wrong_type"),
    (b'{"event_id": "x1", "type": "view", "user_id": "1", "project_id": 2, '
     b'"ts": 1750000000000}', "wrong_type"),
    (b'{"event_id": "x2", "type": "view", "user_id": -1, "project_id": 2, '
     b'"ts": 1750000000000}', "id_out_of_range"),
    (b'{"event_id": "x3", "type": "view", "user_id": 1, "project_id": 9223372036854775808, '
     b'"ts": 1750000000000}', "id_out_of_range"),
    (b'{"event_id": "x4", "type": "like", "user_id": 1, "project_id": 2, '
     b'"ts": 1750000000000}', "unknown_type"),
    (b'{"event_id": "x5", "type": "view", "user_id": 1, "project_id": 2, "ts": "yesterday"}',
     "bad_ts"),
    (b'{"event_id": "x6", "type": "view", "user_id": 1, "project_id": 2, '
     b'"ts": "2025-06-01T10:00:00"}', "bad_ts"),
    (b'{"event_id": "x7", "type": "view", "user_id": 1, "project_id": 2, "ts": 1750000000}',
     "bad_ts"),
    (b'{"event_id": "", "type": "view", "user_id": 1, "project_id": 2, '
     b'"ts": 1750000000000}', "bad_event_id"),
    (b'{"event_id": "x8", "type": "view", "user_id": true, "project_id": 2, '
     b'"ts": 1750000000000}', "wrong_type"),
    (b'{"event_id": "x\\u0000", "type": "view", "user_id": 1, "project_id": 2, '
     b'"ts": 1750000000000}', "bad_text"),
    (None, "empty"),
]


def test_happy_path_duplicates_and_dead_letters(settings, producer, db_url, tmp_path):
    events = [interaction(n) for n in range(300)]
    producer.projects_([project(n) for n in range(20)])
    producer.projects_([project(3, "updated", ts=project(3).ts_ms + 5),
                        project(4, "deleted", ts=project(4).ts_ms + 5)])
    producer.interactions_(events[:150])
    for value, _ in INVALID_INTERACTIONS:
        producer.raw(producer.interactions, b"1", value)
    producer.raw(producer.interactions, b"99", json.dumps(  # key is not the user id
        {"event_id": "k", "type": "view", "user_id": 1, "project_id": 2,
         "ts": "2025-06-01T10:00:00Z"}).encode())
    producer.raw(producer.projects, b"1", b'{"event_id": "bad"}')
    producer.interactions_(events[150:])
    producer.interactions_(events[:40])  # replays
    producer.flush()

    assert run_ingest(settings, tmp_path / "ingest.log") == 0

    assert count(db_url, "SELECT count(*) FROM interactions WHERE type < 3") == 300
    assert count(db_url, "SELECT count(*) FROM interactions WHERE type = 3") == 20
    assert count(db_url, "SELECT count(*) FROM projects WHERE status = 'live'") == 19
    assert count(db_url, "SELECT count(*) FROM project_events") == 22
    assert count(db_url, "SELECT count(*) FROM projects WHERE image_uri LIKE '/images/%'") == 20

    letters = read_dlq(settings, producer.interactions, len(INVALID_INTERACTIONS) + 1)
    reasons = [dict(r.headers)[dlq.REASON].decode() for r in letters]
    expected = [kind for _, kind in INVALID_INTERACTIONS] + ["bad_key"]
    assert [r.split(":")[0] for r in reasons] == expected
    assert [r.value for r in letters[:len(INVALID_INTERACTIONS)]] == [
        v for v, _ in INVALID_INTERACTIONS]
    first = dict(letters[0].headers)
    assert first[dlq.SOURCE_TOPIC].decode() == producer.interactions
    assert fetch_one(settings, producer.interactions, int(first[dlq.SOURCE_PARTITION]),
                     int(first[dlq.SOURCE_OFFSET])) == INVALID_INTERACTIONS[0][0]
    project_letters = read_dlq(settings, producer.projects, 1)
    assert dict(project_letters[0].headers)[dlq.REASON].startswith(b"missing_field")

    # Offsets in Postgres cover every message, so a second run stores nothing new.
    stored = count(db_url, "SELECT sum(next_offset) FROM consumer_offsets")
    assert stored == 300 + 40 + len(INVALID_INTERACTIONS) + 1 + 23
    assert run_ingest(settings, tmp_path / "again.log") == 0
    assert count(db_url, "SELECT count(*) FROM interactions") == 320
    assert len(read_dlq(settings, producer.interactions, 100, timeout_s=5)) == len(letters)


def test_rfc3339_and_epoch_timestamps_are_the_same_instant(settings, producer, db_url,
                                                           tmp_path):
    producer.raw(producer.interactions, b"1", json.dumps(
        {"event_id": "a", "type": "appreciate", "user_id": 1, "project_id": 2,
         "ts": "2025-06-15T12:00:00.250+02:00", "extra": {"ignored": True}}).encode())
    producer.raw(producer.interactions, b"1", json.dumps(
        {"event_id": "b", "type": "comment", "user_id": 1, "project_id": 2,
         "ts": 1749981600250}).encode())
    producer.flush()
    assert run_ingest(settings, tmp_path / "ingest.log") == 0
    assert count(db_url, "SELECT count(DISTINCT ts) FROM interactions") == 1
    assert count(db_url, "SELECT count(*) FROM interactions WHERE ts = "
                         "'2025-06-15T10:00:00.25Z'") == 2
