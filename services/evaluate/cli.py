"""`cofeat eval --out DIR`: the paper's feature comparison on our world (docs/evaluation.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.settings import SettingsError, exit_on_settings_error, load_settings


def main(
    out: Annotated[Path, typer.Option(
        help="writes eval.md, eval.json, neighbours.png, warmup.png")],
    epochs: Annotated[int, typer.Option(
        min=1, help="training epochs (ignored when a live CNN recorded its own)")] = 10,
    backbone: Annotated[str, typer.Option(
        help="small | resnet18 | mobilenet_v2 (without a live CNN)")] = (
        "small"),
    image_size: Annotated[int, typer.Option(min=16, help="without a live CNN")] = 64,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    max_projects: Annotated[int | None, typer.Option(
        min=2, help="at most this many projects per held-out set (a seeded sample)")] = None,
    val_fraction: Annotated[float, typer.Option(
        min=0.01, max=0.9, help="CNN holdout share (without a live CNN)")] = 0.1,
    pseudo_classes: Annotated[int, typer.Option(min=2, help="K-means k (without one)")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="training batch (without one)")] = 64,
    workers: Annotated[int, typer.Option(min=0, help="image decode processes")] = 2,
    imagenet_size: Annotated[int, typer.Option(
        min=32, envvar="COFEAT_EVAL_IMAGENET_SIZE",
        help="input size of the frozen ImageNet features (224: what they were trained at; "
             "smaller is faster and weaker)")] = 224,
    imagenet_init: Annotated[bool, typer.Option(
        help="also fine-tune the collaborative and category-supervised CNNs from ImageNet "
             "(mobilenet_v2, the packaged weights)")] = True,
    imagenet_init_epochs: Annotated[int, typer.Option(
        min=1, envvar="COFEAT_EVAL_IMAGENET_INIT_EPOCHS",
        help="epochs of those fine-tunes")] = 3,
) -> None:
    """Compare collaborative CNN features with baselines on projects the CNN never saw."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: halves CPU under load
    from services.evaluate import report, warmup
    from services.evaluate.evaluate import EvalConfig, EvalError, run
    from shared.db.connect import connect
    from shared.images import ImageReader
    from shared.logs import setup_logging

    try:
        settings = load_settings()
    except SettingsError as error:
        exit_on_settings_error(error)
    setup_logging(settings, "eval")
    if backbone not in ("small", "resnet18", "mobilenet_v2"):
        raise typer.BadParameter("small, resnet18 or mobilenet_v2", param_hint="--backbone")
    config = EvalConfig(epochs=epochs, backbone=backbone, image_size=image_size, seed=seed,
                        max_projects=max_projects, val_fraction=val_fraction,
                        pseudo_classes=pseudo_classes, batch_size=batch_size,
                        workers=workers, imagenet_size=imagenet_size,
                        imagenet_init=imagenet_init,
                        imagenet_init_epochs=imagenet_init_epochs)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with connect(settings) as conn:
            outcome = run(conn, settings.data_dir, config, out / "work",
                          ImageReader.from_settings(settings))
    except EvalError as error:
        typer.echo(f"cofeat eval: {error}", err=True)
        raise typer.Exit(1) from None
    table = report.write_markdown(out / "eval.md", outcome.world, outcome.results)
    report.write_json(out / "eval.json", outcome.world, outcome.results)
    report.plot_neighbours(out / "neighbours.png", outcome.neighbours)
    warmup.plot(out / "warmup.png", outcome.results)
    typer.echo(table)
    typer.echo(warmup.markdown(outcome.results))
