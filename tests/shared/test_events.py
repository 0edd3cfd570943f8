"""The event contract: hostile values get their reason kinds, and the JSON Schema written for
producers is the one the parser decodes with."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest

from shared import events

DOCS_SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "events.schema.json"
T = 1_750_000_000_000


def interaction(**fields) -> bytes:
    value = {"event_id": "e1", "type": "view", "user_id": 1, "project_id": 2, "ts": T}
    value.update(fields)
    return json.dumps({k: v for k, v in value.items() if v is not ...}).encode()


def project(**fields) -> bytes:
    value = {"event_id": "p1", "type": "published", "project_id": 2, "owner_id": 1,
             "image_uri": "/images/2.png", "ts": T}
    value.update(fields)
    return json.dumps({k: v for k, v in value.items() if v is not ...}).encode()


NOW = int(time.time() * 1000)
LATEST = NOW + 300_000  # the default skew of five minutes

HOSTILE_INTERACTIONS = [
    (None, "empty"),
    (b"", "not_json"),
    (b"\xff\xfe not utf-8", "not_utf8"),
    (b'{"event_id": "\xed\xa0\x80"}', "not_utf8"),  # an encoded surrogate
    (b"{not json", "not_json"),
    (b'{"event_id": "e1"', "not_json"),  # truncated
    (interaction() + b" trailing", "not_json"),
    (b"\xef\xbb\xbf" + interaction(), "not_json"),  # a byte-order mark
    (b"[1, 2]", "not_object"),
    (b"null", "not_object"),
    (b'"a string"', "not_object"),
    (interaction(event_id=...), "missing_field"),
    (interaction(ts=...), "missing_field"),
    (interaction(event_id=7), "wrong_type"),
    (interaction(event_id=None), "wrong_type"),
    (interaction(user_id="1"), "wrong_type"),
    (interaction(user_id=True), "wrong_type"),
    (interaction(user_id=1.5), "wrong_type"),
    (interaction(user_id={"nested": [1]}), "wrong_type"),
    (interaction(type=7), "wrong_type"),
    (interaction(user_id=-1), "id_out_of_range"),
    (interaction(project_id=2**63), "id_out_of_range"),
    (interaction(project_id=10**30), "id_out_of_range"),
    (interaction(type="like"), "unknown_type"),
    (interaction(type="x" * 10_000), "unknown_type"),
    (interaction(ts="yesterday"), "bad_ts"),
    (interaction(ts="2025-06-01T10:00:00"), "bad_ts"),
    (interaction(ts="2025-06-01T10:00:00Z" + " " * 100), "bad_ts"),
    (interaction(ts=1_750_000_000), "bad_ts"),  # seconds, not milliseconds
    (interaction(ts=1.5), "bad_ts"),
    (interaction(ts=None), "bad_ts"),
    (interaction(ts=[T]), "bad_ts"),
    (interaction(ts=True), "bad_ts"),
    (b'{"event_id": "e", "type": "view", "user_id": 1, "project_id": 2, "ts": 1e400}',
     "bad_ts"),
    (interaction(ts=NOW + 3_600_000), "bad_ts"),  # an hour ahead
    (interaction(event_id=""), "bad_event_id"),
    (interaction(event_id="x" * 65), "bad_event_id"),
    (interaction(event_id="own:p1"), "bad_event_id"),  # would collide with ownership rows
    (interaction(event_id="x\x00"), "bad_text"),
    (b'{"event_id": "x\\ud800", "type": "view", "user_id": 1, "project_id": 2, "ts": 1}',
     "bad_text"),
    # Nested thousands of levels deep in an ignored field: a RecursionError before.
    (interaction()[:-1] + b', "deep": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "not_json"),
    (interaction()[:-1] + b', "deep": ' + b'{"a":' * 5_000 + b"1" + b"}" * 5_000 + b"}",
     "not_json"),
]

HOSTILE_PROJECTS = [
    (project(image_uri=""), "wrong_type"),
    (project(image_uri=7), "wrong_type"),
    (project(image_uri="/a\x00b"), "bad_text"),
    (project(image_uri="/" + "a" * 5000), "bad_text"),
    (project(owner_id=-5), "id_out_of_range"),
    (project(type="archived"), "unknown_type"),
    (project(owner_id=...), "missing_field"),
    (project(ts=NOW + 3_600_000), "bad_ts"),
]


@pytest.mark.parametrize("value, kind", HOSTILE_INTERACTIONS)
def test_hostile_interactions_get_their_reason(value, kind):
    with pytest.raises(events.InvalidEvent) as raised:
        events.parse_interaction(value, LATEST)
    assert raised.value.kind == kind, raised.value.reason
    assert "\n" not in raised.value.reason and len(raised.value.reason) < 200


@pytest.mark.parametrize("value, kind", HOSTILE_PROJECTS)
def test_hostile_projects_get_their_reason(value, kind):
    with pytest.raises(events.InvalidEvent) as raised:
        events.parse_project(value, LATEST)
    assert raised.value.kind == kind, raised.value.reason


def test_valid_values_and_the_key():
    event = events.interaction_record(b"1", interaction(ts="2025-06-15T12:00:00.250+02:00",
                                                        extra={"ignored": [1, 2]}), LATEST)
    assert (event.user_id, event.ts_ms) == (1, 1_749_981_600_250)
    assert events.parse_interaction(interaction(ts=float(T))).ts_ms == T  # integral float
    assert events.parse_interaction(interaction(ts=NOW + 60_000), LATEST).ts_ms == NOW + 60_000
    # Without a clock, no future check (tests and the simulator's files).
    assert events.parse_interaction(interaction(ts=NOW + 3_600_000)).ts_ms == NOW + 3_600_000
    assert events.project_record(b"2", project(), LATEST).image_uri == "/images/2.png"
    # Huge but valid: the unknown field is skipped, the event stored.
    blob = interaction()[:-1] + b', "blob": "' + b"x" * 5_000_000 + b'"}'
    assert events.parse_interaction(blob, LATEST).event_id == "e1"
    # Duplicate keys: the last one counts, as in every JSON parser the platform may use.
    assert events.parse_interaction(interaction()[:-1] + b', "user_id": 9}').user_id == 9
    for key in (None, b"01", b"2 ", b"-1", b"\xff", b"1" * 100_000):
        with pytest.raises(events.InvalidEvent, match="bad_key"):
            events.interaction_record(key, interaction(user_id=2), LATEST)


def test_the_schema_in_docs_is_the_one_the_parser_uses():
    written = json.loads(DOCS_SCHEMA.read_text())
    assert written == events.json_schema(), "run `python -m shared.events > " \
                                            "docs/events.schema.json`"
    jsonschema.Draft202012Validator.check_schema(written)


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = events.json_schema()
    return jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{name}"},
                                           format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("value, kind", [
    (value, kind) for value, kind in HOSTILE_INTERACTIONS
    # What a schema cannot see: bytes that are no JSON, the clock, the key.
    if kind not in ("empty", "not_utf8", "not_json", "bad_text") and b"1e400" not in value
    and value != interaction(ts=NOW + 3_600_000)])
def test_the_schema_rejects_what_the_parser_rejects(value, kind):
    assert not _validator("InteractionMessage").is_valid(json.loads(value)), kind


def test_the_schema_accepts_what_the_parser_accepts():
    for value in (interaction(), interaction(ts="2025-06-15T12:00:00.250+02:00"),
                  interaction(ts=float(T)), interaction(extra={"any": "thing"})):
        events.parse_interaction(value)
        assert _validator("InteractionMessage").is_valid(json.loads(value))
    assert _validator("ProjectMessage").is_valid(json.loads(project()))
    assert not _validator("ProjectMessage").is_valid(json.loads(project(image_uri="")))
