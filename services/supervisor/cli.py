"""`cofeat run`: start the services named in settings and keep them running."""

from __future__ import annotations

import sys

import typer

from shared.settings import SettingsError, exit_on_settings_error, load_settings


def main(
    services: str = typer.Option(None, help="Comma-separated (default COFEAT_RUN_SERVICES)."),
) -> None:
    """Run the services as one supervised process tree (restarts crashed ones)."""
    from services.supervisor.children import embed_threads, plan
    from services.supervisor.supervisor import Supervisor, install_signal_handlers, state_path
    from shared.logs import setup_logging
    from shared.metrics import serve_metrics

    try:
        settings = load_settings()
        names = [s.strip() for s in (services or settings.run_services).split(",") if s.strip()]
        children = plan(names, settings.run_ingest_replicas, settings.data_dir / "run" / "logs",
                        settings.metrics_port, embed_threads(names, settings))
    except SettingsError as error:
        exit_on_settings_error(error)
    except ValueError as error:
        print(f"cofeat: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings, "run")
    serve_metrics(settings.metrics_port)
    supervisor = Supervisor(children, state_path(settings.data_dir))
    install_signal_handlers(supervisor)
    raise SystemExit(supervisor.run())
