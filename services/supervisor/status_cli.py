"""`cofeat status`."""

from __future__ import annotations

import typer

from shared.settings import SettingsError, exit_on_settings_error, load_settings


def main(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show consumer lag per partition, latest model versions, failures, and the services."""
    from services.supervisor.status import collect, render, to_json
    from shared.db.engine import make_engine

    try:
        settings = load_settings()
        engine = make_engine(settings)
    except SettingsError as error:
        exit_on_settings_error(error)
    status = collect(settings, engine)
    typer.echo(to_json(status) if as_json else render(status))
