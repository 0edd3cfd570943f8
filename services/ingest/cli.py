"""`cofeat ingest`: Kafka interaction and project events into the Postgres store."""

from __future__ import annotations

import json

import typer


def main(
    drain: bool = typer.Option(False, "--drain",
                               help="Exit once every assigned partition is caught up."),
    group: str = typer.Option(None, help="Consumer group (default COFEAT_INGEST_GROUP)."),
) -> None:
    """Consume interaction and project events into the interaction store."""
    from services.ingest.consumer import Ingestor, install_signal_handlers
    from shared.startup import require_topics, start_service
    from shared.topics import all_topics

    settings, log = start_service("ingest", consumer_group_setting="ingest_group",
                                  **({"ingest_group": group} if group else {}))
    # Dead letters go to <topic>.dlq: without it every invalid event would stall the stream.
    require_topics(settings, all_topics(settings.topic_prefix))
    ingestor = Ingestor(settings, drain=drain)
    install_signal_handlers(ingestor)
    code = ingestor.run()
    log.info("summary %s", json.dumps({"stored": ingestor.stored_events,
                                       "dead_letters": ingestor.dead_letter_count}))
    raise SystemExit(code)
