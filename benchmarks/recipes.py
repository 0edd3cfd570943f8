"""The CNN recipe sweep: backbone x input size x epochs x initialisation, each cell scored
by the collaborative CNN's style mAP@10 on held-out projects, with its training time.

    .venv/bin/python -m benchmarks.recipes [--preset small] [--world structure]
        [--render-size 128] [--max-train 3000] [--max-projects 1000]
        [--cells small:64:10 small:128:10 mobilenet_v2:128:5:imagenet ...]

A cell is BACKBONE:SIZE:EPOCHS[:INIT], INIT scratch (default) or imagenet (the packaged
MobileNetV2 weights; mobilenet_v2 only). The world is simulated once under --data-dir
(JPEGs of --render-size px, so the largest cell's size should not exceed it) and stored in
a scratch database on COFEAT_DATABASE_URL's server, dropped after: the first 70% of the
stream, the real factor refresh, then the rest, as `cofeat eval` measures it. Every cell
trains the regress CNN on the same training split (a seeded sample of --max-train of it,
to keep a sweep within an afternoon on 2 cores) with eval's recipe otherwise (batch 64,
AdamW, cosine schedule, its augmentation). Scores: style_map@10 on the held-out projects
with factors and on the brand-new ones, each against the others of its set. Training time
is wall time of the training alone; the machine and its load are printed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's import

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from benchmarks.train import stored_world  # noqa: E402

DEFAULT_CELLS = ("small:64:10", "small:128:10", "resnet18:64:10", "mobilenet_v2:128:10",
                 "mobilenet_v2:64:5:imagenet", "mobilenet_v2:128:5:imagenet")


@dataclass(frozen=True)
class Cell:
    backbone: str
    size: int
    epochs: int
    init: str = "scratch"

    @classmethod
    def parse(cls, text: str) -> Cell:
        parts = text.split(":")
        if len(parts) not in (3, 4) or parts[3:] not in ([], ["scratch"], ["imagenet"]):
            raise argparse.ArgumentTypeError(f"{text!r}: want BACKBONE:SIZE:EPOCHS[:INIT]")
        cell = cls(parts[0], int(parts[1]), int(parts[2]), *parts[3:])
        if cell.init == "imagenet" and cell.backbone != "mobilenet_v2":
            raise argparse.ArgumentTypeError(f"{text!r}: only mobilenet_v2 has packaged "
                                             "ImageNet weights")
        return cell

    def __str__(self) -> str:
        return f"{self.backbone} {self.size} px {self.epochs} ep {self.init}"


def sweep(url: str, run_dir: Path, cells: list[Cell], args) -> list[dict]:
    import psycopg

    from services.evaluate import evaluate
    from shared.images import ImageReader, Policy
    from shared.training.targets import make_targets

    config = evaluate.EvalConfig(seed=args.seed, workers=args.workers, progress=False,
                                 max_projects=args.max_projects)
    reader = ImageReader(Policy.local_files(run_dir.parent / "images"))  # the simulator's
    with psycopg.connect(url) as conn:
        inputs = evaluate.prepare(conn, run_dir, config, reader)
    sets, catalog, plan = inputs.sets, inputs.catalog, inputs.plan
    train = sets.train
    if args.max_train and len(train) > args.max_train:
        rng = np.random.default_rng(args.seed)
        train = np.sort(rng.choice(train, args.max_train, replace=False))
    factors = inputs.factors.item_factors[inputs.factors.item_rows(catalog.ids[train])]
    targets = make_targets(factors, "regress")
    paths = [catalog.paths[i] for i in train]
    print(f"{len(train):,} training projects (of {len(sets.train):,}); held out: "
          f"{len(sets.held_factor):,} with factors, {len(sets.new):,} new", flush=True)
    pixels: dict[int, np.ndarray] = {}
    rows = []
    for cell in cells:
        if cell.size not in pixels:
            pixels[cell.size] = evaluate.read_images(catalog, sets.held, cell.size)
        rows.append(run_cell(cell, plan, paths, targets, pixels[cell.size], catalog, sets,
                             run_dir, args.seed))
    return rows


def run_cell(cell: Cell, plan, paths, targets, pixels, catalog, sets, run_dir: Path,
             seed: int) -> dict:
    from services.evaluate import evaluate
    from shared import imagenet
    from shared.settings import Settings

    # resnet18 with the stem the CNN refresh uses (COFEAT_CNN_STEM, the /4 ImageNet one by
    # default), not eval's small-image stem, which costs ~5x.
    plan = replace(plan, model_config=replace(plan.model_config, backbone=cell.backbone,
                                              image_size=cell.size,
                                              stem=Settings().cnn_stem),
                   train_config=replace(plan.train_config, epochs=cell.epochs, seed=seed))
    work = run_dir / str(cell).replace(" ", "-")
    start = None
    if cell.init == "imagenet":
        start = imagenet.start_model(replace(plan.model_config, out_dim=targets.out_dim),
                                     imagenet.weights_path(), work / "imagenet.pt")
    load = os.getloadavg()[0]
    started = time.perf_counter()
    model = evaluate.train_source(evaluate.REGRESS, paths, targets.values, targets.out_dim,
                                  "regress", plan, work, False, reader=catalog.reader,
                                  init_from=start)
    seconds = time.perf_counter() - started
    features = evaluate.l2(evaluate.cnn_outputs(model, pixels)[0])
    held = np.searchsorted(sets.held, sets.held_factor)
    new = np.searchsorted(sets.held, sets.new)
    row = {"cell": str(cell), "train_s": round(seconds, 1), "load": round(load, 2),
           "held_out": evaluate.map_at_k(features[held], catalog.style[sets.held_factor],
                                         evaluate.MAP_K),
           "new": evaluate.map_at_k(features[new], catalog.style[sets.new], evaluate.MAP_K)}
    print(f"  {row['cell']:34} train {seconds:7.1f} s  style_map@10 held-out "
          f"{row['held_out']:.3f}  new {row['new']:.3f}  (load {load:.1f})", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | train s | style_map@10 held-out | style_map@10 new |",
             "|---|---|---|---|"]
    lines += [f"| {r['cell']} | {r['train_s']:.0f} | {r['held_out']:.3f} | {r['new']:.3f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--world", default="structure", choices=["structure", "palette"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render-size", type=int, default=128)
    parser.add_argument("--data-dir", help="default data/bench/recipes-<preset>-<world>-"
                        "s<seed>-<render size>px (its events name images by absolute path)")
    parser.add_argument("--max-train", type=int, default=3000,
                        help="train every cell on this many projects (0: all)")
    parser.add_argument("--max-projects", type=int, default=1000,
                        help="score at most this many held-out projects of each kind")
    parser.add_argument("--workers", type=int, default=2, help="loader processes")
    parser.add_argument("--cells", nargs="+", type=Cell.parse,
                        default=[Cell.parse(c) for c in DEFAULT_CELLS])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if max(cell.size for cell in args.cells) > args.render_size:
        parser.error("a cell's size exceeds --render-size: its images would be upscaled")
    print(describe())
    data_dir = Path(args.data_dir or f"data/bench/recipes-{args.preset}-{args.world}-"
                    f"s{args.seed}-{args.render_size}px").resolve()
    with stored_world(data_dir, args.preset, args.seed, args.render_size,
                      args.world) as (url, run_dir):
        rows = sweep(url, run_dir, args.cells, args)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
