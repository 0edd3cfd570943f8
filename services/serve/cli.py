"""`cofeat serve`: the HTTP query API (services/serve/app.py) under uvicorn."""

from __future__ import annotations

import typer

from shared.settings import SettingsError, exit_on_settings_error, load_settings


def main(host: str = typer.Option(None, help="default: COFEAT_SERVE_HOST (0.0.0.0)"),
         port: int = typer.Option(None, min=1, max=65535,
                                  help="default: COFEAT_SERVE_PORT (8080)")) -> None:
    """Serve similar projects and recommendations over HTTP (/docs, /metrics)."""
    try:
        settings = load_settings()
        settings.require_milvus_uri()
    except SettingsError as error:
        exit_on_settings_error(error)
    import uvicorn

    from services.serve.app import create_app
    from shared.logs import setup_logging

    log = setup_logging(settings, "serve")
    host, port = host or settings.serve_host, port or settings.serve_port
    log.info("serving on %s:%d", host, port)
    # log_config=None: keep cofeat's JSON logging; uvicorn's access log would duplicate
    # what /metrics counts.
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None,
                access_log=False, timeout_graceful_shutdown=5)
