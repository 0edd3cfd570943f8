"""Topic names: the public Kafka interface (see docs/events.md).

`COFEAT_TOPIC_PREFIX` lets several deployments (or test runs) share one cluster.
"""

from __future__ import annotations

INTERACTIONS = "cofeat.interactions"
PROJECTS = "cofeat.projects"
DLQ_SUFFIX = ".dlq"


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


def interactions(prefix: str = "") -> str:
    return prefix + INTERACTIONS


def projects(prefix: str = "") -> str:
    return prefix + PROJECTS


def source_topics(prefix: str = "") -> tuple[str, str]:
    return interactions(prefix), projects(prefix)


def all_topics(prefix: str = "") -> tuple[str, ...]:
    sources = source_topics(prefix)
    return sources + tuple(dlq_topic(t) for t in sources)
