"""Training and inference images/s of the image models on this machine, or the time the
collaborative CNN takes to reach a target style mAP on a simulated world.

    .venv/bin/python benchmarks/train.py [--batch 64] [--batches 3] [--sizes 64 128]
    .venv/bin/python benchmarks/train.py --time-to-target [--target 0.9] [--epochs 20]
        [--preset small] [--render-size 64] [--data-dir DIR]

Default mode: synthetic tensors (no decoding), channels_last, fp32 on CPU / bf16 autocast
on CUDA; plus the decode+crop+normalize rate of the data pipeline on 512 px JPEGs, per
process.

--time-to-target: the simulated world (JPEGs of --render-size px; made once under
--data-dir, reused after) goes into a scratch database on COFEAT_DATABASE_URL's server,
dropped after: the first 70% of the stream, the real factor refresh, then the rest, as
`cofeat eval` measures it (docs/evaluation.md). The collaborative CNN (regress, `small`
backbone, 64 px input) and the category-supervised one train epoch by epoch with eval's
recipe, --epochs long; after each epoch style_map@10 is scored on the held-out projects.
Time is training wall time; the scoring between epochs is left out.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's import

import argparse  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe  # noqa: E402
from shared.training.data import Augment, ImageTargets  # noqa: E402
from shared.vision import ModelConfig, autocast, build_model, pick_device  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = pick_device()
    gpu = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
    return (f"{cpu}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"torch {torch.__version__}; device {device}{gpu}")


def timed(fn, batches: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is
    the steadier figure; wall time tells what a run would see under the same load."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(batches):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, time.process_time() - cpu_started


def bench_model(backbone: str, size: int, batch: int, batches: int,
                device: torch.device) -> list[float]:
    torch.manual_seed(0)
    name, _, stem = backbone.partition(":")
    config = ModelConfig(backbone=name, out_dim=32, image_size=size,
                         stem=stem or "small-image")
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randn(batch, 32, device=device)

    def train_step() -> None:
        with autocast(device):
            out = model(x)
        loss = (1 - torch.nn.functional.cosine_similarity(out.float(), y)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def infer_step() -> None:
        with autocast(device):
            model.embed(x)

    images = batch * batches
    model.train()
    train_wall, train_cpu = timed(train_step, batches, 1, device)
    model.eval()
    infer_wall, infer_cpu = timed(infer_step, batches, 1, device)
    return [images / train_wall, images / train_cpu, images / infer_wall, images / infer_cpu]


def bench_decode(size: int, count: int = 64) -> float:
    from PIL import Image

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(count):
            path = Path(tmp) / f"{i}.jpg"
            pixels = rng.integers(0, 255, (512, 512, 3), np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            paths.append(str(path))
        data = ImageTargets(paths, np.zeros((count, 1)), size, Augment())
        started = time.perf_counter()
        for i in range(count):
            data[i]
        return count / (time.perf_counter() - started)


# -- time to a target style mAP ------------------------------------------------------


def simulated_world(data_dir: Path, preset: str, seed: int, render_size: int,
                    world: str | None = None) -> Path:
    """The world's events dir; rendered once, reused when a finished one is there.
    `world`: structure | palette (default: the preset's)."""
    events = data_dir / "events"
    done = data_dir / "complete"
    if done.exists():
        print(f"reusing the {preset} world in {data_dir}")
        return events
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    started = time.perf_counter()
    env = {**os.environ, "COFEAT_DATA_DIR": str(data_dir)}
    subprocess.run([sys.executable, "-m", "services", "simulate", "--preset", preset,
                    "--seed", str(seed), "--image-size", str(render_size), "--format", "jpeg",
                    "--out", str(events), *(["--world", world] if world else [])],
                   env=env, check=True,
                   cwd=Path(__file__).resolve().parents[1])
    done.write_text(f"{preset} seed {seed} {render_size} px {world or 'default'} world\n")
    print(f"simulated the {preset} world in {time.perf_counter() - started:.0f} s")
    return events


def scratch_database(admin_url: str) -> tuple[str, str]:
    """(name, url) of a new, migrated database on the admin URL's server."""
    import psycopg
    from sqlalchemy.engine import make_url

    from shared.db.engine import make_engine, upgrade
    from shared.settings import Settings

    name = f"cofeat_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    settings = Settings(database_url=url)
    engine = make_engine(settings)
    upgrade(engine, settings)
    engine.dispose()
    return name, url


def store_and_factorize(url: str, events: Path, run_dir: Path) -> None:
    from services.refresh.factors.service import run_factors_once
    from shared.settings import load_settings
    from tests.services.evaluate.world import store_in_phases

    settings = load_settings(database_url=url, data_dir=run_dir)
    started = time.perf_counter()

    def factorize() -> None:
        result = run_factors_once(settings, full=True, show_progress=False)
        print(f"factor version {result.version_id} {result.status}: "
              f"{settings.als_factors} factors, recall@20 {result.metrics.get('recall@20')}")

    store_in_phases(url, events, 0.7, between=factorize)
    print(f"stored the events and refreshed the factors in "
          f"{time.perf_counter() - started:.0f} s")


def style_curve(source: str, inputs, targets: np.ndarray, out_dim: int, mode: str,
                pixels: np.ndarray, work_dir: Path) -> list[dict]:
    """One point per epoch: cumulative training seconds, images seen, style mAP@10."""
    from services.evaluate import evaluate

    paths = [inputs.catalog.paths[i] for i in inputs.sets.train]
    style = inputs.catalog.style[inputs.sets.held]
    points: list[dict] = []

    def score(epoch: int, model, row: dict) -> None:
        seconds = row["seconds"] + (points[-1]["seconds"] if points else 0.0)
        points.append({"epoch": epoch + 1, "seconds": seconds,
                       "images": (epoch + 1) * len(paths),
                       "style_map": evaluate.style_map(model, pixels, style)})
        print(f"  {source:22} epoch {epoch + 1:3d}  {seconds:7.1f} s  "
              f"{points[-1]['images']:9,d} images  style_map@10 "
              f"{points[-1]['style_map']:.3f}", flush=True)

    evaluate.train_source(source, paths, targets, out_dim, mode, inputs.plan, work_dir,
                          False, on_epoch=score)
    return points


def first_reaching(points: list[dict], target: float) -> str:
    hit = next((p for p in points if p["style_map"] >= target), None)
    if hit is None:
        best = max(p["style_map"] for p in points)
        return f"not reached in {len(points)} epochs (best {best:.3f})"
    return (f"{hit['seconds']:.0f} s, {hit['images']:,} images "
            f"(epoch {hit['epoch']}, {hit['style_map']:.3f})")


def time_to_target(args) -> None:
    print(describe())
    print(machine())
    data_dir = Path(args.data_dir or f"data/bench/train-{args.preset}-s{args.seed}-"
                    f"{args.render_size}px").resolve()
    with stored_world(data_dir, args.preset, args.seed, args.render_size) as (url, run_dir):
        curves = train_curves(url, run_dir, args)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for source, points in curves.items():
            print(f"time to style_map@10 >= {args.target}: {source}: "
                  f"{first_reaching(points, args.target)}")


@contextlib.contextmanager
def stored_world(data_dir: Path, preset: str, seed: int, render_size: int,
                 world: str | None = None) -> Iterator[tuple[str, Path]]:
    """(database url, run dir) of the simulated world stored and factorized as `cofeat
    eval` measures it, in a scratch database and run dir, both removed afterwards."""
    import psycopg

    from shared.db.connect import conninfo
    from shared.settings import load_settings

    events = simulated_world(data_dir, preset, seed, render_size, world)
    admin = conninfo(load_settings().require_database_url())
    name, url = scratch_database(admin)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=data_dir))
    try:
        shutil.copytree(data_dir / "groundtruth", run_dir / "groundtruth")
        store_and_factorize(url, events, run_dir)
        yield url, run_dir
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def train_curves(url: str, run_dir: Path, args) -> dict[str, list[dict]]:
    """The collaborative and the category-supervised CNN's style curves, eval's split."""
    import psycopg

    from services.evaluate import evaluate
    from shared.training.targets import make_targets

    config = evaluate.EvalConfig(epochs=args.epochs, backbone="small", image_size=64,
                                 seed=args.seed, batch_size=args.batch, workers=args.workers,
                                 max_projects=args.max_projects, progress=False)
    from shared.images import ImageReader, Policy

    reader = ImageReader(Policy.local_files(run_dir.parent / "images"))  # the simulator's
    with psycopg.connect(url) as conn:
        inputs = evaluate.prepare(conn, run_dir, config, reader)
    sets, catalog, plan = inputs.sets, inputs.catalog, inputs.plan
    pixels = evaluate.read_images(catalog, sets.held, plan.model_config.image_size)
    factors = inputs.factors.item_factors[inputs.factors.item_rows(catalog.ids[sets.train])]
    random = evaluate.style_map(evaluate.random_init(plan, factors.shape[1], args.seed),
                                pixels, catalog.style[sets.held])
    print(f"{len(sets.train):,} training projects, {len(sets.held):,} held out "
          f"({len(sets.new):,} new); {args.epochs} epochs, batch {args.batch}, "
          f"{args.workers} loader workers; random weights: style_map@10 {random:.3f}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    regress = make_targets(factors, "regress")
    categories = catalog.category[sets.train]
    return {
        evaluate.REGRESS: style_curve(evaluate.REGRESS, inputs, regress.values,
                                      regress.out_dim, "regress", pixels, run_dir),
        evaluate.CATEGORY: style_curve(evaluate.CATEGORY, inputs, categories,
                                       int(catalog.category.max()) + 1, "pseudo-class",
                                       pixels, run_dir)}


def throughput(args) -> None:
    device = pick_device()
    print(machine())
    print(f"batch {args.batch}, {args.batches} timed batches after 1 warm-up, channels_last; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'backbone':18} {'px':>4} {'train img/s':>12} {'img/cpu-s':>10} "
          f"{'infer img/s':>12} {'img/cpu-s':>10}")
    for backbone in args.backbones:
        for size in args.sizes:
            rates = bench_model(backbone, size, args.batch, args.batches, device)
            print(f"{backbone:18} {size:4d} {rates[0]:12.1f} {rates[1]:10.1f} "
                  f"{rates[2]:12.1f} {rates[3]:10.1f}", flush=True)
    for size in args.sizes:
        print(f"decode+crop 512px JPEG -> {size}px: {bench_decode(size):.0f} img/s "
              "per worker process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--backbones", nargs="+",
                        default=["small", "resnet18", "resnet18:imagenet"],
                        help="resnet18 has the small-image stem; resnet18:imagenet the /4 one")
    parser.add_argument("--time-to-target", action="store_true",
                        help="train on a simulated world to a target style mAP instead")
    parser.add_argument("--target", type=float, default=0.9, help="style_map@10 to reach")
    # Eval trains 10; from 64 px JPEGs that schedule's learning rate decays at 0.89.
    parser.add_argument("--epochs", type=int, default=20, help="the schedule's length")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seed", type=int, default=0, help="world and CNN seed")
    parser.add_argument("--render-size", type=int, default=64,
                        help="px of the simulated JPEGs; the CNN reads 64 px either way")
    parser.add_argument("--data-dir",
                        help="default data/bench/train-<preset>-s<seed>-<render size>px; "
                        "its events name images by absolute path, so do not move it")
    parser.add_argument("--workers", type=int, default=2, help="loader processes")
    parser.add_argument("--max-projects", type=int, default=None,
                        help="score at most this many held-out projects of each kind")
    args = parser.parse_args()
    if args.time_to_target:
        time_to_target(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
