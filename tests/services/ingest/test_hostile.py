"""Hostile producers against `cofeat ingest`, real broker and Postgres: every record ends
stored or in `<topic>.dlq` with a reason, and the stream goes on behind each of them."""

from __future__ import annotations

import json
import subprocess
import time

import psycopg

from shared import topics
from shared.events import interaction_value
from shared.kafka import dlq
from shared.kafka.admin import ensure_topics
from tests.helpers import (
    RawHeaderKey,
    cofeat,
    count,
    interaction,
    project,
    read_dlq,
    run_ingest,
    settings_env,
)
from tests.services.ingest.test_ingest import INVALID_INTERACTIONS


def value(n: int, **fields) -> bytes:
    event = {"event_id": f"h{n}", "type": "view", "user_id": 1, "project_id": n,
             "ts": 1_750_000_000_000 + n}
    event.update(fields)
    return json.dumps(event).encode()


def test_every_hostile_record_gets_an_outcome(settings, producer, db_url, tmp_path):
    it, pt = producer.interactions, producer.projects
    now = int(time.time() * 1000)
    huge = b'{"event_id": "big", "padding": "' + b"x" * (1 << 20) + b'"'  # 1 MiB, no JSON
    deep = value(1)[:-1] + b', "deep": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"  # ~10 KB
    # (what is sent, the reason kind its dead letter must carry); one partition, in order.
    hostile = [
        (lambda: producer.unchecked(it, b"1", deep), "not_json"),
        (lambda: producer.unchecked(it, None, None), "empty"),
        (lambda: producer.unchecked(it, b"1", b"not json", [("trace", None), ("ok", b"1")]),
         "not_json"),
        (lambda: producer.unchecked(it, b"1", value(2), [(RawHeaderKey(b"\xff\xfe"), b"v")]),
         "corrupt_record"),
        (lambda: producer.unchecked(it, b"1", huge), "not_json"),
        (lambda: producer.unchecked(it, b"1" * 200_000, value(3)), "bad_key"),
        (lambda: producer.unchecked(it, b"1", value(4, ts=now + 3_600_000)), "bad_ts"),
        (lambda: producer.unchecked(it, b"1", value(5, event_id="own:p7-published")),
         "bad_event_id"),
        (lambda: producer.unchecked(it, b"1", b"not json either",
                                    [(dlq.REASON, b"forged"), (dlq.SOURCE_OFFSET, b"0")]),
         "not_json"),
        (lambda: producer.unchecked(it, b"1", value(6, user_id=2**64)), "id_out_of_range"),
    ]
    good = iter(interaction(n, user=1) for n in range(1000))
    producer.unchecked(it, b"1", interaction_value(next(good)))
    for send, _ in hostile:
        send()
        for _ in range(3):  # the stream goes on behind each bad record
            producer.unchecked(it, b"1", interaction_value(next(good)))
    producer.flush()
    # A project published an hour ahead of the clock, then deleted: the delete must win.
    late = project(7, "published", ts=now + 3_600_000)
    producer.projects_([late, project(7, "deleted", ts=now)])
    producer.flush()

    assert run_ingest(settings, tmp_path / "ingest.log") == 0

    sent = 1 + len(hostile) * 4
    stored = count(db_url, "SELECT count(*) FROM interactions WHERE type < 3")
    letters = sorted(read_dlq(settings, it, len(hostile)),  # DLQ partitions follow the key
                     key=lambda r: int(dict(r.headers)[dlq.SOURCE_OFFSET]))
    assert stored + len(letters) == sent, (stored, len(letters))
    assert [dict(r.headers)[dlq.REASON].decode().split(":")[0] for r in letters] == [
        kind for _, kind in hostile]
    by_kind = {dict(r.headers)[dlq.REASON].decode().split(":")[0]: r for r in letters}
    for letter in letters:
        headers = dict(letter.headers)
        assert headers[dlq.SOURCE_TOPIC].decode() == it
        assert int(headers[dlq.SOURCE_PARTITION]) == 0
    # Each bad record's own offset: the first, then every fourth.
    assert [int(dict(r.headers)[dlq.SOURCE_OFFSET]) for r in letters] == list(
        range(1, sent, 4))

    # Null key and value: an empty value; null header values: empty bytes.
    assert by_kind["empty"].value == b"" and by_kind["empty"].key is None
    nulls = [r for r in letters if ("trace", b"") in r.headers]
    assert len(nulls) == 1 and ("ok", b"1") in nulls[0].headers
    # The undecodable record: its coordinates and the client's error, nothing else.
    corrupt = dict(by_kind["corrupt_record"].headers)
    assert b"CorruptRecordError" in corrupt[dlq.REASON]
    # 1 MiB dead letter: cut to fit, flagged, reason and coordinates kept.
    big = [r for r in letters if dlq.TRUNCATED in dict(r.headers) and r.key == b"1"]
    assert len(big) == 1 and len(big[0].value) < settings.dlq_max_bytes
    assert big[0].value == huge[:len(big[0].value)]
    assert dict(big[0].headers)[dlq.TRUNCATED] == f"value={len(huge)}".encode()
    assert by_kind["bad_key"].key == b"1" * 200_000  # fits: kept whole
    # A producer cannot forge our headers.
    forged = [r for r in letters if r.value == b"not json either"][0]
    assert dict(forged.headers)[dlq.REASON].startswith(b"not_json")
    assert [k for k, _ in forged.headers].count(dlq.REASON) == 1

    # The future publish was dead-lettered, so the delete is the project's newest state.
    assert count(db_url, "SELECT count(*) FROM projects WHERE project_id = 1007 "
                         "AND status = 'deleted'") == 1
    project_letters = read_dlq(settings, pt, 1)
    assert dict(project_letters[0].headers)[dlq.REASON].startswith(b"bad_ts: future")
    # Every record is behind the stored offsets.
    with psycopg.connect(db_url) as conn:
        stored_offsets = dict(conn.execute(
            "SELECT topic, sum(next_offset) FROM consumer_offsets GROUP BY topic").fetchall())
    assert stored_offsets == {it: sent, pt: 2}
    log = (tmp_path / "ingest.log").read_text()
    assert "Traceback" not in log


def test_ownership_rows_never_collide_with_producer_ids(settings, producer, db_url, tmp_path):
    producer.projects_([project(1)])
    producer.raw(producer.interactions, b"1", json.dumps(
        {"event_id": "own:p1-published", "type": "view", "user_id": 1, "project_id": 1001,
         "ts": 1_750_000_000_000}).encode())
    producer.flush()
    assert run_ingest(settings, tmp_path / "ingest.log") == 0
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT event_id, type FROM interactions").fetchall()
    assert rows == [("own:p1-published", 3)]
    letters = read_dlq(settings, producer.interactions, 1)
    assert dict(letters[0].headers)[dlq.REASON].startswith(b"bad_event_id")


def test_a_store_refusing_some_records_stores_the_rest(settings, producer, db_url, tmp_path):
    # A constraint the data breaks (as a later table or migration might add): the batch is
    # split until the records responsible are found.
    with psycopg.connect(db_url) as conn:
        conn.execute("ALTER TABLE interactions ADD CONSTRAINT not_13 CHECK (project_id <> 13)")
    events = [interaction(n, project=13 if n in (7, 250, 251) else 20) for n in range(400)]
    producer.interactions_(events)
    for value_, _ in INVALID_INTERACTIONS[:3]:
        producer.raw(producer.interactions, b"1", value_)
    producer.flush()
    assert run_ingest(settings, tmp_path / "ingest.log", timeout=180) == 0
    assert count(db_url, "SELECT count(*) FROM interactions") == 397
    letters = read_dlq(settings, producer.interactions, 6)
    reasons = sorted(dict(r.headers)[dlq.REASON].decode() for r in letters)
    rejected = [r for r in reasons if r.startswith("store_rejected")]
    assert len(rejected) == 3 and all("CheckViolation" in r for r in rejected), reasons
    assert len(letters) == 6
    assert count(db_url, "SELECT sum(next_offset) FROM consumer_offsets") == 403


def test_a_missing_dead_letter_topic_is_an_error_at_start_up(settings, tmp_path):
    ensure_topics(settings, topics.source_topics(settings.topic_prefix))
    started = time.monotonic()
    result = subprocess.run(cofeat("ingest"), env=settings_env(settings),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("cofeat:")]
    assert len(errors) == 1 and ".dlq do not exist" in errors[0], result.stderr
    assert time.monotonic() - started < 30


def test_a_store_that_cannot_work_stops_with_an_error(settings, producer, db_url, tmp_path):
    # Not the data's fault (a permission, a table gone): no record is dead-lettered for it.
    producer.interactions_([interaction(n) for n in range(50)])
    producer.flush()
    with psycopg.connect(db_url) as conn:
        conn.execute("ALTER TABLE interactions RENAME TO gone")
    assert run_ingest(settings, tmp_path / "ingest.log") == 1
    assert "retrying cannot fix" in (tmp_path / "ingest.log").read_text()
    assert read_dlq(settings, producer.interactions, 1, timeout_s=4) == []
    assert count(db_url, "SELECT count(*) FROM consumer_offsets") == 0

