"""Topic names: the public Kafka interface (see docs/events.md)."""

INTERACTIONS = "cofeat.interactions"
PROJECTS = "cofeat.projects"
DLQ_SUFFIX = ".dlq"

SOURCE_TOPICS = (INTERACTIONS, PROJECTS)


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


ALL_TOPICS = SOURCE_TOPICS + tuple(dlq_topic(t) for t in SOURCE_TOPICS)
