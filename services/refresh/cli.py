"""`cofeat refresh ...`: the factor refresh (and, later, the CNN) as a one-shot or a loop."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import typer

from shared.settings import Settings, SettingsError, exit_on_settings_error, load_settings

app = typer.Typer(add_completion=False)
log = logging.getLogger("cofeat.refresh")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float:
    """'90s', '10m', '1.5h', '1d' or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match[1]) <= 0:
        raise typer.BadParameter(f"{text!r} is not an interval like 10m, 90s or 1h")
    return float(match[1]) * _UNITS[match[2] or "s"]


def start_service(name: str) -> Settings:
    """Settings, logging and /metrics for a refresh command; exits on bad settings."""
    from shared.metrics import serve_metrics

    try:
        settings = load_settings()
    except SettingsError as error:
        exit_on_settings_error(error)
    from shared.logs import setup_logging

    setup_logging(settings, name)
    serve_metrics(settings.metrics_port)
    return settings


def run_factors_once(settings: Settings, full: bool = False):
    """One factor refresh (import kept here so `cofeat --help` stays fast)."""
    from services.refresh.factors.service import run_factors_once as run

    return run(settings, full=full)


def repeat(every_s: float, step: Callable[[], object]) -> None:
    """Run `step` every `every_s` seconds, measured start to start; a failed run is logged
    and the loop goes on (the database may be back by the next tick)."""
    from shared.metrics import health

    while True:
        started = time.monotonic()
        try:
            step()
            health.set(True, "ok")
        except Exception as error:
            log.exception("refresh run failed; retrying at the next interval")
            health.set(False, f"last refresh failed: {type(error).__name__}")
        time.sleep(max(0.0, every_s - (time.monotonic() - started)))


def _check_schema(settings: Settings) -> None:
    from shared.db.engine import SchemaBehind, make_engine, require_current_schema

    try:
        settings.require_database_url()
    except SettingsError as error:
        exit_on_settings_error(error)
    engine = make_engine(settings)
    try:
        require_current_schema(engine)
    except SchemaBehind as error:
        typer.echo(f"cofeat: {error}", err=True)
        raise typer.Exit(3) from None
    finally:
        engine.dispose()


@app.callback(invoke_without_command=True)
def refresh_group(
        ctx: typer.Context,
        once: bool = typer.Option(False, "--once", help="Factors, then the CNN, once."),
        every: str = typer.Option(None, "--every", help="Factors then CNN in a loop, e.g. 10m."),
) -> None:
    """Factorize interactions and train the CNN (`--once`/`--every`: both, in that order)."""
    if ctx.invoked_subcommand is not None:
        if once or every:
            raise typer.BadParameter("--once/--every go after the subcommand here")
        return
    if once == (every is not None):
        typer.echo(ctx.get_help())
        raise typer.Exit(0 if not once and every is None else 2)
    interval = parse_interval(every) if every else None
    settings = start_service("refresh")
    _check_schema(settings)
    if once:
        _both(settings)
        return
    repeat(interval, lambda: _both(settings))


def _both(settings: Settings) -> None:
    factors = run_factors_once(settings)
    typer.echo(f"factors: {factors.status} version={factors.version_id} ({factors.reason})")
    cnn = run_cnn_once(settings)
    typer.echo(f"cnn: {cnn.status} version={cnn.version_id} ({cnn.reason})")


def run_cnn_once(settings: Settings, full: bool = False):
    from services.refresh.cnn.service import run_cnn_once as run

    return run(settings, full=full)


@app.command("cnn")
def cnn_command(
        once: bool = typer.Option(False, "--once", help="Train or refresh once and exit."),
        every: str = typer.Option(None, "--every", help="Refresh in a loop, e.g. 1h."),
        full: bool = typer.Option(False, "--full", help="Retrain from scratch."),
) -> None:
    """Train the CNN to predict latent factors from images (fine-tunes the live model)."""
    if once == (every is not None):
        raise typer.BadParameter("give exactly one of --once and --every")
    interval = parse_interval(every) if every else None
    settings = start_service("refresh-cnn")
    _check_schema(settings)
    if once:
        result = run_cnn_once(settings, full=full)
        typer.echo(f"cnn: {result.status} version={result.version_id} "
                   f"mode={result.mode} ({result.reason})")
        return
    repeat(interval, lambda: run_cnn_once(settings, full=full))


@app.command("factors")
def factors_command(
        once: bool = typer.Option(False, "--once", help="Run one refresh and exit."),
        every: str = typer.Option(None, "--every", help="Refresh in a loop, e.g. 10m."),
        full: bool = typer.Option(False, "--full", help="Full refit instead of incremental."),
) -> None:
    """Factorize the interaction store into a new latent factor version."""
    if once == (every is not None):
        raise typer.BadParameter("give exactly one of --once and --every")
    interval = parse_interval(every) if every else None
    settings = start_service("refresh-factors")
    _check_schema(settings)
    if once:
        result = run_factors_once(settings, full=full)
        typer.echo(f"factors: {result.status} version={result.version_id} "
                   f"mode={result.mode} ({result.reason})")
        return
    repeat(interval, lambda: run_factors_once(settings, full=full))
