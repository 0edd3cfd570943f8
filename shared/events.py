"""The event contract (docs/events.md): parsing and validation of both topics' values.

`parse_interaction` and `parse_project` turn raw Kafka bytes into typed events or raise
`InvalidEvent` with a short, stable reason that goes into the dead-letter headers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum

MAX_ID = 2**63
MAX_EVENT_ID_LEN = 64
# Timestamps outside this window are typos or unit mistakes (seconds for milliseconds).
MIN_TS_MS = 946_684_800_000  # 2000-01-01
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01


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


@dataclass(frozen=True, slots=True)
class Interaction:
    event_id: str
    type: InteractionType
    user_id: int
    project_id: int
    ts_ms: int


@dataclass(frozen=True, slots=True)
class ProjectEvent:
    event_id: str
    type: str
    project_id: int
    owner_id: int
    image_uri: str
    ts_ms: int


def _decode(raw: bytes | None) -> dict:
    if raw is None:
        raise InvalidEvent("empty", "no value")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidEvent("not_utf8", f"byte {error.start}") from None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise InvalidEvent("not_json", str(error).split(":")[0]) from None
    if not isinstance(value, dict):
        raise InvalidEvent("not_object", type(value).__name__)
    return value


def _field(value: dict, name: str):
    if name not in value:
        raise InvalidEvent("missing_field", name)
    return value[name]


def _text(value: str, name: str) -> str:
    # JSON allows "\u0000" and lone surrogates; Postgres text and UTF-8 do not.
    if "\x00" in value:
        raise InvalidEvent("bad_text", f"{name} contains NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent("bad_text", f"{name} is not valid Unicode") from None
    return value


def _event_id(value: dict) -> str:
    event_id = _field(value, "event_id")
    if not isinstance(event_id, str):
        raise InvalidEvent("wrong_type", "event_id must be a string")
    if not 1 <= len(event_id) <= MAX_EVENT_ID_LEN:
        raise InvalidEvent("bad_event_id", f"length {len(event_id)} not in 1..64")
    return _text(event_id, "event_id")


def _id(value: dict, name: str) -> int:
    number = _field(value, name)
    # bool is an int subclass in Python; JSON true is not an id.
    if not isinstance(number, int) or isinstance(number, bool):
        raise InvalidEvent("wrong_type", f"{name} must be an integer")
    if not 0 <= number < MAX_ID:
        raise InvalidEvent("id_out_of_range", f"{name} not in [0, 2^63)")
    return number


def parse_ts(ts) -> int:
    """RFC 3339 string or epoch milliseconds to epoch milliseconds."""
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
    return ts_ms


def _parse_rfc3339(text: str) -> int:
    # RFC 3339 requires a date, a time and an offset; fromisoformat alone accepts less.
    if len(text) < 20 or text[10] not in "Tt ":
        raise InvalidEvent("bad_ts", "not RFC 3339")
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise InvalidEvent("bad_ts", "not RFC 3339") from None
    if moment.tzinfo is None:
        raise InvalidEvent("bad_ts", "RFC 3339 needs an offset or Z")
    return int(moment.timestamp() * 1000)


def _choice(value: dict, allowed) -> str:
    kind = _field(value, "type")
    if not isinstance(kind, str):
        raise InvalidEvent("wrong_type", "type must be a string")
    if kind not in allowed:
        raise InvalidEvent("unknown_type", kind[:40])
    return kind


def parse_interaction(raw: bytes | None) -> Interaction:
    value = _decode(raw)
    event_id = _event_id(value)
    kind = _choice(value, INTERACTION_TYPES)
    return Interaction(event_id, INTERACTION_TYPES[kind], _id(value, "user_id"),
                       _id(value, "project_id"), parse_ts(_field(value, "ts")))


def parse_project(raw: bytes | None) -> ProjectEvent:
    value = _decode(raw)
    event_id = _event_id(value)
    kind = _choice(value, PROJECT_TYPES)
    project_id = _id(value, "project_id")
    owner_id = _id(value, "owner_id")
    image_uri = _field(value, "image_uri")
    if not isinstance(image_uri, str) or not image_uri:
        raise InvalidEvent("wrong_type", "image_uri must be a non-empty string")
    _text(image_uri, "image_uri")
    return ProjectEvent(event_id, kind, project_id, owner_id, image_uri,
                        parse_ts(_field(value, "ts")))


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

