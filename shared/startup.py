"""What a long-running service does before its loop: settings, logs, a current schema,
/metrics. Bad settings exit 2 with one line; a schema behind the code exits 3."""

from __future__ import annotations

import logging
import sys

from shared.db.engine import SchemaBehind, make_engine, require_current_schema
from shared.logs import bind, setup_logging
from shared.metrics import serve_metrics
from shared.settings import Settings, SettingsError, exit_on_settings_error, load_settings


def start_service(name: str, *, consumer_group_setting: str | None = None,
                  needs_milvus: bool = False, **overrides) -> tuple[Settings, logging.Logger]:
    try:
        settings = load_settings(**overrides)
        log = setup_logging(settings, name)
        if needs_milvus:
            settings.require_milvus_uri()
        engine = make_engine(settings)
        require_current_schema(engine)
        engine.dispose()
    except SettingsError as error:
        exit_on_settings_error(error)
    except SchemaBehind as error:
        print(f"cofeat: {error}", file=sys.stderr)
        raise SystemExit(3) from None
    if consumer_group_setting:
        bind(consumer_group=getattr(settings, consumer_group_setting))
    serve_metrics(settings.metrics_port)
    return settings, log


def require_topics(settings: Settings, names: tuple[str, ...]) -> None:
    """Exit 2 with one line when a topic the service needs does not exist, or when no
    broker answers: a clear error at start-up, not a hang."""
    from kafka.errors import KafkaError

    from shared.kafka.admin import missing_topics

    try:
        missing = missing_topics(settings, names)
    except KafkaError as error:
        print(f"cofeat: no Kafka broker answers at {settings.require_kafka_bootstrap()}: "
              f"{type(error).__name__}", file=sys.stderr)
        raise SystemExit(2) from None
    if missing:
        what = (f"topic {missing[0]} does not exist" if len(missing) == 1
                else f"topics {', '.join(missing)} do not exist")
        print(f"cofeat: {what} on {settings.require_kafka_bootstrap()}: create "
              f"{'it' if len(missing) == 1 else 'them'} (`cofeat dev up` creates every topic; "
              "see docs/operations.md)", file=sys.stderr)
        raise SystemExit(2)
