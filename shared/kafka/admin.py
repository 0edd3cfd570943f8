"""Topic creation: idempotent, so every service and `cofeat dev up` can call it."""

from __future__ import annotations

import contextlib
import logging

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from shared import topics
from shared.kafka.config import client_config
from shared.settings import Settings

log = logging.getLogger(__name__)


def missing_topics(settings: Settings, names: tuple[str, ...]) -> list[str]:
    """Those of `names` the cluster does not have (a producer would wait for them)."""
    admin = KafkaAdminClient(**client_config(settings))
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    return [n for n in names if n not in existing]


def ensure_topics(settings: Settings, names: tuple[str, ...] | None = None) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created."""
    names = names or topics.all_topics(settings.topic_prefix)
    admin = KafkaAdminClient(**client_config(settings))
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            new = [NewTopic(n, settings.kafka_partitions, settings.kafka_replication_factor)
                   for n in missing]
            # Another process may win the race; that is fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
            log.info("created topics %s", missing)
        return missing
    finally:
        admin.close()
