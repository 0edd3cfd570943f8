"""The one `cofeat` command. Each service contributes its own Typer app from `<service>/cli.py`;
heavy imports (torch, implicit, pymilvus) stay inside commands so `cofeat --help` is fast."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="cofeat: image features learned from social behaviour.")

# (command name, module with a Typer `app`): a sub-group, or a single command when the
# module's app has exactly one command and `single` is set.
SERVICES = [
    ("dev", "services.dev.cli", "Local stack without Docker: Postgres, Kafka broker, Milvus."),
    ("migrate", "services.migrate.cli", None),
    ("ingest", "services.ingest.cli", None),
    ("simulate", "services.simulate.cli", None),
    ("refresh", "services.refresh.cli", "Factorize interactions and train the CNN."),
    ("embed", "services.embedder.cli", None),
    ("search", "services.serve.search_cli", "Query Milvus for similar projects."),
    ("serve", "services.serve.cli", None),
    ("eval", "services.evaluate.cli", None),
    ("run", "services.supervisor.cli", None),
    ("status", "services.supervisor.status_cli", None),
    ("demo", "services.demo.cli", None),
]


def _register() -> None:
    for name, module_name, group_help in SERVICES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                continue  # service not built yet
            raise
        if group_help is None:
            app.command(name)(module.main)
        else:
            app.add_typer(module.app, name=name, help=group_help)


@app.callback()
def _root() -> None:
    """cofeat: image features learned from social behaviour."""


_register()


def main() -> None:
    app()
