"""`cofeat migrate`: apply Alembic migrations to the store."""

from __future__ import annotations

import typer

from shared.db.engine import current_revision, head_revision, make_engine, safe_url, upgrade
from shared.settings import SettingsError, exit_on_settings_error, load_settings


def main() -> None:
    """Apply database migrations up to the code's schema version."""
    try:
        settings = load_settings()
        engine = make_engine(settings)
    except SettingsError as error:
        exit_on_settings_error(error)
    before = current_revision(engine)
    upgrade(engine, settings)
    typer.echo(f"migrated {safe_url(str(engine.url.render_as_string(False)))}: "
               f"{before or 'empty'} -> {head_revision()}")
