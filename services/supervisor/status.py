"""`cofeat status`: lag per partition, latest versions, parked failures, the children."""

from __future__ import annotations

import json

from kafka import TopicPartition
from sqlalchemy import text

from shared import topics
from shared.artifacts import read_json
from shared.kafka.offsets import highwaters
from shared.settings import Settings

_OFFSETS = "SELECT group_id, topic, partition, next_offset FROM consumer_offsets " \
           "WHERE topic LIKE :prefix ORDER BY group_id, topic, partition"
_VERSIONS = "SELECT DISTINCT ON (kind, status) kind, id, status, created_at, metrics " \
            "FROM model_versions ORDER BY kind, status, id DESC"


def lag_rows(settings: Settings, engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(text(_OFFSETS),
                            {"prefix": settings.topic_prefix.replace("_", r"\_") + "%"}).all()
    tps = sorted({TopicPartition(r.topic, r.partition) for r in rows})
    ends = highwaters(settings, tps) if rows else {}
    return [{"group": r.group_id, "topic": r.topic, "partition": r.partition,
             "next_offset": r.next_offset,
             "lag": (ends[TopicPartition(r.topic, r.partition)] - r.next_offset)
             if TopicPartition(r.topic, r.partition) in ends else None} for r in rows]


def version_rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(_VERSIONS))]


def parked_failures(engine, max_attempts: int) -> int | None:
    """Failures that used up their retries (fewer attempts: still being retried)."""
    with engine.connect() as conn:
        exists = conn.execute(text("SELECT to_regclass('embed_failures')")).scalar()
        return conn.execute(text("SELECT count(*) FROM embed_failures WHERE attempts >= :n"),
                            {"n": max_attempts}).scalar() if exists else None


def collect(settings: Settings, engine) -> dict:
    from services.supervisor.supervisor import state_path

    path = state_path(settings.data_dir)
    return {"topics": list(topics.source_topics(settings.topic_prefix)),
            "lag": lag_rows(settings, engine),
            "versions": version_rows(engine),
            "embed_failures_parked": parked_failures(engine, settings.embed_max_attempts),
            "supervisor": read_json(path) if path.exists() else None}


def render(status: dict) -> str:
    lines = ["consumer lag:"]
    for row in status["lag"]:
        lag = "?" if row["lag"] is None else f"{row['lag']:,}"
        lines.append(f"  {row['group']:<16} {row['topic']}[{row['partition']}] "
                     f"next {row['next_offset']:,} lag {lag}")
    lines.append("model versions (latest per kind and status):")
    for row in status["versions"]:
        lines.append(f"  {row['kind']:<8} v{row['id']:<5} {row['status']:<10} "
                     f"{row['created_at']:%Y-%m-%d %H:%M:%S}")
    lines.append(f"embed failures parked: {status['embed_failures_parked']}")
    supervisor = status["supervisor"]
    if supervisor:
        lines.append(f"cofeat run (pid {supervisor['pid']}, "
                     f"{'stopped' if supervisor['stopped'] else 'running'}):")
        for child in supervisor["children"]:
            state = "up" if child["running"] else "down"
            lines.append(f"  {child['name']:<10} {state:<5} pid {child['pid']} restarts "
                         f"{child['restarts']} last exit {child['last_exit']} "
                         f"{child['last_error'][:80]}")
    return "\n".join(lines)


def to_json(status: dict) -> str:
    return json.dumps(status, indent=2, default=str)
