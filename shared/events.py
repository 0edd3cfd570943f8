"""The event contract (docs/events.md), declared once: both topics' values as msgspec types.

`InteractionMessage` and `ProjectMessage` are the wire format. The JSON Schema producers get
(`docs/events.schema.json`, written by `python -m shared.events`) is generated from them,
and the parser decodes with them, so the two cannot drift apart. What a type cannot say (a
timestamp window, NUL characters, the key, the clock) is checked right after decoding.

`parse_interaction` and `parse_project` turn raw bytes into typed events or raise
`InvalidEvent` with a short, stable reason for the dead-letter headers; `interaction_record`
and `project_record` also check the Kafka key. Given the newest acceptable ts (the
consumer's clock plus COFEAT_MAX_FUTURE_SKEW), all of them reject events from the future.
Nothing else escapes them: any other exception while decoding is a bug, which the caller
reports as `internal: <type>`.
"""

from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime
from enum import IntEnum
from typing import Annotated, Literal

import msgspec

MAX_ID = 2**63
MAX_EVENT_ID_LEN = 64
MAX_IMAGE_URI_LEN = 4096
# Timestamps outside this window are typos or unit mistakes (seconds for milliseconds).
MIN_TS_MS = 946_684_800_000  # 2000-01-01
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01
# Ownership rows are derived from `published` events with this prefix (store.py); producers'
# interaction ids may not start with it, so the two can never collide.
OWN_PREFIX = "own:"
KEY_RULE = "key must be the id as decimal text"


class InteractionType(IntEnum):
    """Stored as smallint; `own` is derived from project events (the paper's ownership)."""

    view = 0
    appreciate = 1
    comment = 2
    own = 3


INTERACTION_TYPES = {"view": InteractionType.view, "appreciate": InteractionType.appreciate,
                     "comment": InteractionType.comment}
PROJECT_TYPES = ("published", "updated", "deleted")


class InvalidEvent(ValueError):
    """The value breaks the contract; `reason` is `<kind>: <detail>`, one line."""

    def __init__(self, kind: str, detail: str = ""):
        self.kind = kind
        self.reason = f"{kind}: {detail}" if detail else kind
        super().__init__(self.reason)


# -- the wire format ----------------------------------------------------------------------

Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID - 1)]
EventId = Annotated[str, msgspec.Meta(
    min_length=1, max_length=MAX_EVENT_ID_LEN,
    description="globally unique; a replay with the same id is stored once")]
# Integral floats (1.75e12) are integers in JSON Schema, so the parser takes them too.
Ts = int | float | str


class InteractionMessage(msgspec.Struct, frozen=True, gc=False):
    """A value on `cofeat.interactions`; the key is `user_id` as decimal text."""

    event_id: EventId
    type: Literal["view", "appreciate", "comment"]
    user_id: Id
    project_id: Id
    ts: Ts


class ProjectMessage(msgspec.Struct, frozen=True, gc=False):
    """A value on `cofeat.projects`; the key is `project_id` as decimal text."""

    event_id: EventId
    type: Literal["published", "updated", "deleted"]
    project_id: Id
    owner_id: Annotated[int, msgspec.Meta(ge=0, le=MAX_ID - 1,
                                          description="the owner is a user")]
    image_uri: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_IMAGE_URI_LEN,
                                           description="a file path or file:// URI")]
    ts: Ts


_interactions = msgspec.json.Decoder(InteractionMessage)
_projects = msgspec.json.Decoder(ProjectMessage)


# -- what the services use ---------------------------------------------------------------

class Interaction(msgspec.Struct, frozen=True, gc=False):
    event_id: str
    type: InteractionType
    user_id: int
    project_id: int
    ts_ms: int


class ProjectEvent(msgspec.Struct, frozen=True, gc=False):
    event_id: str
    type: str
    project_id: int
    owner_id: int
    image_uri: str
    ts_ms: int


def parse_interaction(raw: bytes | None, latest_ms: int | None = None) -> Interaction:
    # The hot path of ingest: checks are inlined for the common, valid event.
    message = _decode(_interactions, raw)
    event_id = message.event_id
    if "\x00" in event_id:
        raise InvalidEvent("bad_text", "event_id contains NUL")
    if event_id.startswith(OWN_PREFIX):
        raise InvalidEvent("bad_event_id", f"the prefix {OWN_PREFIX} is reserved")
    ts = message.ts
    if (type(ts) is not int or not MIN_TS_MS <= ts < MAX_TS_MS
            or (latest_ms is not None and ts > latest_ms)):
        ts = parse_ts(ts, latest_ms)
    return Interaction(event_id, INTERACTION_TYPES[message.type], message.user_id,
                       message.project_id, ts)


def parse_project(raw: bytes | None, latest_ms: int | None = None) -> ProjectEvent:
    message = _decode(_projects, raw)
    return ProjectEvent(_text(message.event_id, "event_id"), message.type,
                        message.project_id, message.owner_id,
                        _text(message.image_uri, "image_uri"),
                        parse_ts(message.ts, latest_ms))


def interaction_record(key: bytes | None, value: bytes | None,
                       latest_ms: int | None = None) -> Interaction:
    """A Kafka record of `cofeat.interactions`: value, then key. `latest_ms` is the newest ts
    accepted (None: no future check)."""
    event = parse_interaction(value, latest_ms)
    if key != str(event.user_id).encode():
        raise InvalidEvent("bad_key", KEY_RULE)
    return event


def project_record(key: bytes | None, value: bytes | None,
                   latest_ms: int | None = None) -> ProjectEvent:
    event = parse_project(value, latest_ms)
    if key != str(event.project_id).encode():
        raise InvalidEvent("bad_key", KEY_RULE)
    return event


def parse_ts(ts, latest_ms: int | None = None) -> int:
    """RFC 3339 string or epoch milliseconds to epoch milliseconds. A ts after `latest_ms`
    (the consumer's clock plus COFEAT_MAX_FUTURE_SKEW) is `bad_ts: future`."""
    if isinstance(ts, bool):
        raise InvalidEvent("bad_ts", "boolean")
    if isinstance(ts, int | float):
        if isinstance(ts, float) and (not math.isfinite(ts) or ts != int(ts)):
            raise InvalidEvent("bad_ts", "epoch milliseconds must be an integer")
        ts_ms = int(ts)
    elif isinstance(ts, str):
        ts_ms = _parse_rfc3339(ts)
    else:
        raise InvalidEvent("bad_ts", f"{type(ts).__name__} is neither string nor number")
    if not MIN_TS_MS <= ts_ms < MAX_TS_MS:
        raise InvalidEvent("bad_ts", "outside 2000-01-01..2100-01-01")
    if latest_ms is not None and ts_ms > latest_ms:
        # A producer clock running ahead would freeze a project's state (newest ts wins).
        raise InvalidEvent("bad_ts", "future: further ahead of the consumer's clock than "
                           "COFEAT_MAX_FUTURE_SKEW")
    return ts_ms


def _parse_rfc3339(text: str) -> int:
    # RFC 3339 requires a date, a time and an offset; fromisoformat alone accepts less.
    if len(text) < 20 or len(text) > 40 or text[10] not in "Tt ":
        raise InvalidEvent("bad_ts", "not RFC 3339")
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise InvalidEvent("bad_ts", "not RFC 3339") from None
    if moment.tzinfo is None:
        raise InvalidEvent("bad_ts", "RFC 3339 needs an offset or Z")
    return int(moment.timestamp() * 1000)


def _text(value: str, name: str) -> str:
    # JSON allows "\u0000"; Postgres text does not. (Lone surrogates fail to decode.)
    if "\x00" in value:
        raise InvalidEvent("bad_text", f"{name} contains NUL")
    return value


# -- decoding errors to reasons -------------------------------------------------------------

_FIELD_KIND = {"ts": "bad_ts", "event_id": "bad_event_id", "user_id": "id_out_of_range",
               "project_id": "id_out_of_range", "owner_id": "id_out_of_range",
               "image_uri": "bad_text", "type": "unknown_type"}


def _decode(decoder: msgspec.json.Decoder, raw: bytes | None):
    if raw is None:
        raise InvalidEvent("empty", "no value")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as error:
        raise _invalid(str(error)) from None
    except msgspec.DecodeError as error:
        raise _undecodable(raw, str(error)) from None
    except RecursionError:
        # A value nested thousands of levels deep (even in an ignored field).
        raise InvalidEvent("not_json", "nested too deeply") from None


def _invalid(message: str) -> InvalidEvent:
    """msgspec's validation message (`Expected `int` >= 0 - at `$.user_id``) to a reason."""
    text, _, path = message.partition(" - at `$.")
    field = path.rstrip("`")
    if not field:
        if text.startswith("Object missing required field"):
            return InvalidEvent("missing_field", text.rsplit("`", 2)[-2])
        if text.startswith("Expected `object`, got"):
            return InvalidEvent("not_object", text.rsplit("`", 2)[-2])
        return InvalidEvent("wrong_type", text[:100])
    if field == "ts":
        return InvalidEvent("bad_ts", text[:100])
    if ", got `" in text or (field == "image_uri" and ">= 1" in text):
        return InvalidEvent("wrong_type", f"{field}: {text[:80]}")  # not the value: its type
    if field == "type" and text.startswith("Invalid enum value"):
        return InvalidEvent("unknown_type", text.removeprefix("Invalid enum value ")[:40])
    return InvalidEvent(_FIELD_KIND.get(field, "wrong_type"), f"{field}: {text[:80]}")


def _undecodable(raw: bytes, message: str) -> InvalidEvent:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return InvalidEvent("not_utf8", f"byte {error.start}")
    if "surrogate" in message:
        return InvalidEvent("bad_text", "not valid Unicode")
    return InvalidEvent("not_json", message.removeprefix("JSON is malformed: ")[:100])


# -- producing side: used by the simulator, the demo and tests ----------------------------

def format_ts(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds")


def interaction_value(event: Interaction, rfc3339: bool = False) -> bytes:
    return json.dumps({
        "event_id": event.event_id, "type": event.type.name, "user_id": event.user_id,
        "project_id": event.project_id,
        "ts": format_ts(event.ts_ms) if rfc3339 else event.ts_ms,
    }, separators=(",", ":")).encode()


def project_value(event: ProjectEvent) -> bytes:
    return json.dumps({
        "event_id": event.event_id, "type": event.type, "project_id": event.project_id,
        "owner_id": event.owner_id, "image_uri": event.image_uri, "ts": event.ts_ms,
    }, separators=(",", ":")).encode()


def interaction_key(event: Interaction) -> bytes:
    return str(event.user_id).encode()


def project_key(event: ProjectEvent) -> bytes:
    return str(event.project_id).encode()


# -- the JSON Schema for producers ---------------------------------------------------------

_TS_SCHEMA = {
    "description": "epoch milliseconds, or RFC 3339 with an offset; between 2000-01-01 and "
                   "2100-01-01, and at most COFEAT_MAX_FUTURE_SKEW (5 minutes by default) "
                   "ahead of the ingesting clock",
    "anyOf": [{"type": "integer", "minimum": MIN_TS_MS, "maximum": MAX_TS_MS - 1},
              {"type": "string", "format": "date-time"}],
}


def json_schema() -> dict:
    """Both topics' value schemas (JSON Schema 2020-12), as written to docs/."""
    (interaction, project), components = msgspec.json.schema_components(
        [InteractionMessage, ProjectMessage], ref_template="#/$defs/{name}")
    for definition in components.values():
        definition["properties"]["ts"] = _TS_SCHEMA
        definition["properties"]["event_id"]["pattern"] = "^[^\\u0000]*$"
    components["InteractionMessage"]["properties"]["event_id"]["not"] = {
        "pattern": f"^{OWN_PREFIX}"}
    components["ProjectMessage"]["properties"]["image_uri"]["pattern"] = "^[^\\u0000]*$"
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cofeat.invalid/events.schema.json",
        "title": "cofeat events",
        "description": "Values of cofeat.interactions (#/$defs/InteractionMessage) and "
                       "cofeat.projects (#/$defs/ProjectMessage), docs/events.md. Generated "
                       "from shared/events.py by `python -m shared.events`.",
        "anyOf": [interaction, project],
        "$defs": components,
    }


if __name__ == "__main__":
    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
