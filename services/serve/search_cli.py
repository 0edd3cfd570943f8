"""`cofeat search similar|for-user`: the query API's questions from the command line, as JSON."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from shared.settings import Settings, SettingsError, exit_on_settings_error, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False)

MAX_K = 100


def _settings() -> Settings:
    try:
        settings = load_settings()
        settings.require_milvus_uri()
        return settings
    except SettingsError as error:
        exit_on_settings_error(error)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"cofeat: {message}", err=True)
    raise typer.Exit(code)


def _print(query: dict, hits) -> None:
    typer.echo(json.dumps({"query": query, "results": [hit.as_dict() for hit in hits]},
                          indent=2))


def _ask(settings: Settings, question):
    """`question(client)` against Milvus; unknown ids and Milvus errors exit 1 with a line."""
    from pymilvus.exceptions import MilvusException

    from shared.client import CofeatClient, NotFound

    client = CofeatClient.from_settings(settings)
    try:
        return question(client)
    except NotFound as error:
        _fail(str(error))
    except MilvusException as error:
        _fail(f"Milvus query failed: {error.message}")
    finally:
        client.close()


@app.command()
def similar(
    project_id: int = typer.Option(None, "--project-id", min=0, help="a project's id"),
    image: Annotated[Path | None, typer.Option(
        "--image", exists=True, dir_okay=False,
        help="an image file, embedded with the live CNN")] = None,
    k: int = typer.Option(10, "--k", min=1, max=MAX_K),
    exclude_owner: bool = typer.Option(False, "--exclude-owner",
                                       help="drop the project owner's other projects"),
) -> None:
    """Projects similar to a project (never itself) or to an image."""
    if (project_id is None) == (image is None):
        _fail("give exactly one of --project-id and --image", code=2)
    if image is not None and exclude_owner:
        _fail("--exclude-owner needs --project-id", code=2)
    settings = _settings()

    def ask(client):
        if project_id is not None:
            return ({"project_id": project_id, "k": k, "exclude_owner": exclude_owner},
                    client.similar_to_project(project_id, k, exclude_owner))
        version, hits = _similar_to_image(settings, client, image, k)
        return {"image": str(image), "cnn_version": version, "k": k}, hits

    _print(*_ask(settings, ask))


def _similar_to_image(settings: Settings, client, image: Path, k: int):
    from services.serve.live import BadImage, ModelHolder, NoModel, embed_bytes
    from shared import images

    models = ModelHolder(settings, client)
    try:
        models.refresh()
        live = models.require()
        # The caller's own file, read bounded (a FIFO or a huge file is refused, not read).
        vector = embed_bytes(live, images.local_files().read(str(image.resolve())), settings)
    except images.ImageError as error:
        _fail(f"{image}: {error.reason}")
    except (NoModel, BadImage) as error:
        _fail(f"{image}: {error}" if isinstance(error, BadImage) else str(error))
    finally:
        models.close()
    return live.version, client.similar_to_vector(vector, k)


@app.command("for-user")
def for_user(
    user_id: int = typer.Option(..., "--user-id", min=0),
    k: int = typer.Option(20, "--k", min=1, max=MAX_K),
    new_only: bool = typer.Option(False, "--new-only",
                                  help="only projects published within COFEAT_SERVE_NEW_WINDOW_S"),
    published_since: Annotated[datetime | None, typer.Option(
        "--published-since", formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"],
        help="only projects published at or after this UTC time (e.g. a simulated "
             "world's 2025-01-20); overrides --new-only's window")] = None,
) -> None:
    """Projects recommended to a user: those nearest to the user's vector."""
    from shared.client import epoch_ms

    since_ms = epoch_ms(published_since) if published_since else None
    query = {"user_id": user_id, "k": k, "new_only": new_only}
    if since_ms is not None:
        query["published_since_ms"] = since_ms
    _print(*_ask(_settings(), lambda client: (
        query, client.for_user(user_id, k, new_only, new_since_ms=since_ms))))
