"""`cofeat refresh ...`: the factor refresh and the CNN, once or in the one refresh loop.

`--loop` repeats every COFEAT_REFRESH_EVERY (`--every` overrides it for one process) and
writes the heartbeat `cofeat-healthcheck --heartbeat` reads (services/refresh/heartbeat.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import typer

from services.refresh.heartbeat import beat
from shared.settings import (
    Settings,
    SettingsError,
    exit_on_settings_error,
    interval_seconds,
    load_settings,
)

app = typer.Typer(add_completion=False)
log = logging.getLogger("cofeat.refresh")

ONCE = typer.Option(False, "--once", help="Run once and exit.")
LOOP = typer.Option(False, "--loop", help="Repeat every COFEAT_REFRESH_EVERY (default 10m).")
EVERY = typer.Option(None, "--every", help="Repeat at this interval instead, e.g. 10m, 1h.")
NPROC = typer.Option(1, "--nproc", min=1, help=(
    "Train with N processes on this machine (DistributedDataParallel under torchrun: gloo "
    "on CPU, one GPU each with NCCL). Under your own torchrun, its world decides."))


def parse_interval(text: str) -> float:
    """'90s', '10m', '1.5h', '1d' or plain seconds."""
    try:
        return interval_seconds(text)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def check_mode(once: bool, loop: bool, every: str | None) -> float | None:
    """Exactly one of --once and --loop/--every; returns --every's seconds, if given."""
    if once == (loop or every is not None):
        raise typer.BadParameter("give exactly one of --once and --loop (or --every)")
    return parse_interval(every) if every is not None else None


def interval(settings: Settings, every_s: float | None) -> float:
    return every_s or interval_seconds(settings.refresh_every)


def start_service(name: str, metrics: bool = True) -> Settings:
    """Settings, logging and /metrics for a refresh command; exits on bad settings."""
    from shared.metrics import serve_metrics

    try:
        settings = load_settings()
    except SettingsError as error:
        exit_on_settings_error(error)
    from shared.logs import setup_logging

    setup_logging(settings, name)
    lower_priority(settings.refresh_nice)
    if metrics:
        serve_metrics(settings.metrics_port)
    return settings


def lower_priority(nice: int) -> None:
    """Up to `nice` (a process never raises its own priority back: only the difference is
    added, and only where the platform has niceness)."""
    if nice and hasattr(os, "nice"):
        os.nice(max(0, nice - os.nice(0)))


def run_factors_once(settings: Settings, full: bool = False):
    """One factor refresh (import kept here so `cofeat --help` stays fast)."""
    from services.refresh.factors.service import run_factors_once as run

    return run(settings, full=full)


def repeat(every_s: float, step: Callable[[], object], data_dir: Path) -> None:
    """The refresh loop: `step` every `every_s` seconds, start to start. A finished run
    writes the heartbeat; a failed one is logged and the loop goes on (the database may be
    back by the next tick), so the heartbeat ages until a run succeeds again."""
    from shared.metrics import health

    while True:
        started = time.monotonic()
        try:
            step()
            health.set(True, "ok")
            beat(data_dir, every_s)
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
def refresh_group(ctx: typer.Context, once: bool = ONCE, loop: bool = LOOP,
                  every: str = EVERY) -> None:
    """Factorize interactions and train the CNN (`--once`/`--loop`: both, in that order)."""
    if ctx.invoked_subcommand is not None:
        if once or loop or every:
            raise typer.BadParameter("--once/--loop/--every go after the subcommand here")
        return
    if not (once or loop or every):
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    every_s = check_mode(once, loop, every)
    settings = start_service("refresh")
    _check_schema(settings)
    if once:
        _both(settings)
        return
    repeat(interval(settings, every_s), lambda: _both(settings), settings.data_dir)


def _both(settings: Settings) -> None:
    factors = run_factors_once(settings)
    typer.echo(f"factors: {factors.status} version={factors.version_id} ({factors.reason})")
    cnn = run_cnn_once(settings)
    typer.echo(f"cnn: {cnn.status} version={cnn.version_id} ({cnn.reason})")


def run_cnn_once(settings: Settings, full: bool = False):
    from services.refresh.cnn.service import run_cnn_once as run

    return run(settings, full=full)


@app.command("cnn")
def cnn_command(once: bool = ONCE, loop: bool = LOOP, every: str = EVERY,
                full: bool = typer.Option(False, "--full", help="Retrain from scratch."),
                nproc: int = NPROC) -> None:
    """Train the CNN to predict latent factors from images (fine-tunes the live model)."""
    every_s = check_mode(once, loop, every)
    from shared.training import distributed

    if nproc > 1 and not distributed.launched():
        mode = ["--once"] if once else ["--every", every] if every else ["--loop"]
        # torchrun takes this process's place and runs this command in each rank.
        distributed.launch(nproc, ["-m", "services", "refresh", "cnn", *mode,
                                   *(["--full"] if full else [])])
    world = distributed.join()
    if world is not None and not world.leader:
        start_service(f"refresh-cnn-rank{world.rank}", metrics=False)
        distributed.follow(world)  # rank 0 hands out the training; the rest is its own
        return
    settings = start_service("refresh-cnn")
    try:
        _cnn(settings, once, every_s, full)
    finally:
        distributed.close(world)


def _cnn(settings: Settings, once: bool, every_s: float | None, full: bool) -> None:
    _check_schema(settings)
    if once:
        result = run_cnn_once(settings, full=full)
        typer.echo(f"cnn: {result.status} version={result.version_id} "
                   f"mode={result.mode} ({result.reason})")
        return
    repeat(interval(settings, every_s),
           lambda: run_cnn_once(settings, full=full), settings.data_dir)


@app.command("factors")
def factors_command(once: bool = ONCE, loop: bool = LOOP, every: str = EVERY,
                    full: bool = typer.Option(False, "--full",
                                              help="Full refit instead of incremental.")) -> None:
    """Factorize the interaction store into a new latent factor version."""
    every_s = check_mode(once, loop, every)
    settings = start_service("refresh-factors")
    _check_schema(settings)
    if once:
        result = run_factors_once(settings, full=full)
        typer.echo(f"factors: {result.status} version={result.version_id} "
                   f"mode={result.mode} ({result.reason})")
        return
    repeat(interval(settings, every_s),
           lambda: run_factors_once(settings, full=full), settings.data_dir)
