"""`cofeat ingest`: Kafka interaction and project events into the Postgres store."""

from __future__ import annotations

import json
import sys

import typer

from shared.settings import SettingsError, exit_on_settings_error, load_settings


def main(
    drain: bool = typer.Option(False, "--drain",
                               help="Exit once every assigned partition is caught up."),
    group: str = typer.Option(None, help="Consumer group (default COFEAT_INGEST_GROUP)."),
) -> None:
    """Consume interaction and project events into the interaction store."""
    from services.ingest.consumer import Ingestor, install_signal_handlers
    from shared.db.engine import SchemaBehind, make_engine, require_current_schema
    from shared.logs import bind, setup_logging
    from shared.metrics import serve_metrics

    try:
        settings = load_settings(**({"ingest_group": group} if group else {}))
        log = setup_logging(settings, "ingest")
        engine = make_engine(settings)
        require_current_schema(engine)
        engine.dispose()
    except SettingsError as error:
        exit_on_settings_error(error)
    except SchemaBehind as error:
        print(f"cofeat: {error}", file=sys.stderr)
        raise SystemExit(3) from None
    bind(consumer_group=settings.ingest_group)
    serve_metrics(settings.metrics_port)
    ingestor = Ingestor(settings, drain=drain)
    install_signal_handlers(ingestor)
    code = ingestor.run()
    log.info("summary %s", json.dumps({"stored": ingestor.stored_events,
                                       "dead_letters": ingestor.dead_letters}))
    raise SystemExit(code)
