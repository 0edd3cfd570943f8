"""`cofeat simulate`: a simulated creative platform publishing to Kafka (or to files)."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from shared.settings import SettingsError, exit_on_settings_error, load_settings


class ImageFormat(StrEnum):
    png = "png"
    jpeg = "jpeg"


Count = Annotated[int | None, typer.Option(min=1)]


def main(
    preset: Annotated[str, typer.Option(help="tiny | small | medium | behance")] = "small",
    users: Count = None,
    projects: Count = None,
    events: Annotated[int | None, typer.Option(
        min=0, help="interactions to generate (approximate)")] = None,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    world: Annotated[str | None, typer.Option(
        help="structure (colours drawn per project; small's default) | palette (each style "
             "its own colour scheme; tiny's default)")] = None,
    chunks: Annotated[int | None, typer.Option(min=1, help="slices of simulated time")] = None,
    days: Annotated[int | None, typer.Option(min=1, help="simulated days")] = None,
    max_chunks: Annotated[int | None, typer.Option(
        min=1, help="stop after this many chunks")] = None,
    image_size: Annotated[int, typer.Option(min=16)] = 128,
    image_format: Annotated[ImageFormat, typer.Option("--format")] = ImageFormat.png,
    no_images: Annotated[bool, typer.Option(
        "--no-images", help="skip rendering images")] = False,
    processes: Annotated[int | None, typer.Option(
        min=1, help="image rendering processes")] = None,
    out: Annotated[Path | None, typer.Option(
        help="write JSON lines here instead of Kafka")] = None,
    image_base_url: Annotated[str | None, typer.Option(
        help="publish image_uris under this http(s):// URL instead of local paths; serve "
             "COFEAT_DATA_DIR/images there (`make demo IMAGES=http` does)")] = None,
    rate: Annotated[float, typer.Option(
        min=0, help="events per second; 0 = as fast as possible")] = 0.0,
    invalid_fraction: Annotated[float, typer.Option(min=0, max=0.5)] = 0.0,
    duplicate_fraction: Annotated[float, typer.Option(min=0, max=1)] = 0.0,
    stats: Annotated[bool, typer.Option(
        "--stats", help="print the realism check only")] = False,
    filter_min: Annotated[int, typer.Option(
        min=1, help="--stats: minimum count when filtering")] = 5,
    filter_top_pct: Annotated[float, typer.Option(
        min=0, max=100, help="--stats: top percent dropped when filtering")] = 0.5,
) -> None:
    """Simulate a creative platform: images, users with hidden tastes, and their events."""
    from services.simulate import behaviour
    from services.simulate import world as world_module

    try:
        settings = load_settings()
    except SettingsError as error:
        exit_on_settings_error(error)
    if image_base_url is not None and not image_base_url.startswith(("http://", "https://")):
        raise typer.BadParameter("must start with http:// or https://",
                                 param_hint="--image-base-url")
    try:
        config = world_module.preset(preset, users=users, projects=projects, events=events,
                                     seed=seed, chunks=chunks, days=days,
                                     world=world)
    except ValueError as error:
        hint = "--world" if "world" in str(error) else "--preset"
        raise typer.BadParameter(str(error), param_hint=hint) from None
    built = world_module.build_world(config)
    if stats:
        _print_stats(built, max_chunks, filter_min, filter_top_pct, pixels=not no_images)
        return
    _write_truth(built, settings.data_dir)
    images_dir = settings.data_dir / "images"
    if not no_images:
        _render(built, images_dir, image_size, image_format.value, processes)
    chunks_iter = behaviour.generate(built, max_chunks)
    counts = _publish(built, chunks_iter, settings, images_dir, image_format.value, out,
                      rate, invalid_fraction, duplicate_fraction, image_base_url)
    where = str(out) if out else settings.require_kafka_bootstrap()
    for topic, count in sorted(counts.items()):
        typer.echo(f"{topic}: {count:,} records -> {where}")


def _print_stats(world, max_chunks, filter_min: int, filter_top_pct: float,
                 pixels: bool) -> None:
    from services.simulate import behaviour, stats

    chunk = stats.collect(behaviour.generate(world, max_chunks))
    report = stats.report(world, chunk, filter_min, filter_top_pct, pixels=pixels)
    typer.echo(stats.format_report(report))


def _write_truth(world, data_dir: Path) -> None:
    from services.simulate.world import ground_truth
    from shared import groundtruth

    path = groundtruth.write(data_dir, ground_truth(world))
    typer.echo(f"ground truth (evaluation only): {path}", err=True)


def _render(world, images_dir: Path, size: int, fmt: str, processes) -> None:
    from tqdm import tqdm

    from services.simulate.render import render_all

    with tqdm(total=world.config.projects, desc="images", unit="img", file=sys.stderr,
              disable=None) as bar:
        render_all(world, images_dir, size=size, fmt=fmt, processes=processes,
                   progress=bar.update)


def _publish(world, chunks, settings, images_dir: Path, fmt: str, out: Path | None,
             rate: float, invalid_fraction: float, duplicate_fraction: float,
             image_base_url: str | None = None):
    from tqdm import tqdm

    from services.simulate import stream

    if out is not None:
        sink = stream.FileSink(out)
    else:
        from shared.kafka.admin import ensure_topics

        ensure_topics(settings)
        sink = stream.KafkaSink(settings)
    encoder = stream.Encoder(world, images_dir, fmt, settings.topic_prefix, image_base_url)
    records = stream.records(world, chunks, encoder, invalid_fraction=invalid_fraction,
                             duplicate_fraction=duplicate_fraction)
    with tqdm(desc="events", unit="ev", file=sys.stderr, disable=None) as bar:
        return stream.publish(records, sink, rate, progress=bar.update)
