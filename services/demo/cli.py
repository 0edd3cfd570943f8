"""`cofeat demo`: what `make demo` runs."""

from __future__ import annotations

import typer

from shared.settings import SettingsError, exit_on_settings_error, load_settings


def main(scale: str = typer.Option("small", help="tiny | small"),
         images: str = typer.Option("local", help="local | http: every reader fetches the "
                                    "images over HTTP from a local server, as from a CDN"),
         world: str = typer.Option(None, help="structure | palette: the simulated world "
                                   "(unset: the scale's own; palette ties style to colour)"),
         ) -> None:
    """Run the whole loop on a simulated platform and write the report."""
    from services.demo.run import run
    from services.demo.steps import DEMO_ENV, Demo

    if scale not in DEMO_ENV:
        raise typer.BadParameter(f"scale must be one of {sorted(DEMO_ENV)}")
    if images not in ("local", "http"):
        raise typer.BadParameter("images must be local or http")
    if world not in (None, "structure", "palette"):
        raise typer.BadParameter("world must be structure or palette")
    try:
        settings = load_settings()
    except SettingsError as error:
        exit_on_settings_error(error)
    run(Demo(settings.data_dir, scale, images, world))
