"""`cofeat embed`: project images and users' factors into Milvus, swapped in by alias."""

from __future__ import annotations

import logging
import os
import sys

import typer

from shared.settings import SettingsError, exit_on_settings_error, load_settings


def main(
    drain: bool = typer.Option(
        False, "--drain",
        help="Do any pending backfill and alias swap, catch up on the stream, exit."),
) -> None:
    """Embed live projects with the promoted CNN into Milvus and keep them current."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: halves CPU/image
    from shared.db.engine import SchemaBehind, make_engine, require_current_schema
    from shared.logs import bind, setup_logging
    from shared.metrics import serve_metrics

    try:
        settings = load_settings()
        log = setup_logging(settings, "embed")
        settings.require_milvus_uri()
        engine = make_engine(settings)
        require_current_schema(engine)
        engine.dispose()
    except SettingsError as error:
        exit_on_settings_error(error)
    except SchemaBehind as error:
        print(f"cofeat: {error}", file=sys.stderr)
        raise SystemExit(3) from None
    from services.embedder.service import Embedder, install_signal_handlers  # torch: slow

    # pymilvus logs every failed RPC with a traceback; outages are logged once per interval.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    bind(consumer_group=settings.embed_group)
    serve_metrics(settings.metrics_port)
    embedder = Embedder(settings, drain=drain)
    install_signal_handlers(embedder)
    code = embedder.run()
    log.info("exit %d", code)
    raise SystemExit(code)
