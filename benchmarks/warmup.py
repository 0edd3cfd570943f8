"""The warm-up curve on a simulated world: user_recall@20 on new projects by interactions
seen, for the warm-up vector, the CNN-only vector and popularity (docs/evaluation.md).

    .venv/bin/python benchmarks/warmup.py [--preset tiny|small] [--seed 0]
        [--strengths 0.3 1 3] [--metrics ip cosine]

The world is simulated into a scratch directory and stored in a scratch database on
COFEAT_DATABASE_URL's server (dropped after): the first 70% of the stream, the real factor
refresh, the rest, the real CNN refresh (the demo's recipe for the preset), as `cofeat
eval` measures it. Only the live collaborative CNN is needed, so no other source trains.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's import

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psycopg  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe  # noqa: E402
from services.demo.steps import DEMO_ENV  # noqa: E402
from services.evaluate import evaluate, warmup  # noqa: E402
from services.refresh.cnn.service import run_cnn_once  # noqa: E402
from services.refresh.factors.service import run_factors_once  # noqa: E402
from shared.db.engine import make_engine, upgrade  # noqa: E402
from shared.images import ImageReader  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.warmup import WarmParams  # noqa: E402
from tests.world import load, simulate  # noqa: E402


def scratch_database(admin_url: str) -> str:
    name = f"cofeat_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_database(admin_url: str, url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def build(root: Path, url: str, preset: str, seed: int) -> Settings:
    simulate(root, "--preset", preset, "--seed", str(seed))
    recipe = {k.removeprefix("COFEAT_").lower(): v for k, v in DEMO_ENV[preset].items()}
    settings = Settings(database_url=url, data_dir=root, cnn_workers=0, log_format="text",
                        image_roots=str(root / "images"), **recipe)
    engine = make_engine(settings)
    upgrade(engine, settings)
    engine.dispose()
    load(url, root / "events", stop=0.7)
    assert run_factors_once(settings, full=True).status == "promoted"
    load(url, root / "events", start=0.7)
    cnn = run_cnn_once(settings, show_progress=False)
    assert cnn.status == "promoted", cnn.reason
    return settings


def measure(settings: Settings, strengths: list[float],
            metrics: list[str]) -> dict[tuple[float, str], list[dict]]:
    with psycopg.connect(settings.require_database_url()) as conn:
        inputs = evaluate.prepare(conn, settings.data_dir, evaluate.EvalConfig(),
                                  ImageReader.from_settings(settings))
        new = inputs.sets.new
        pixels = evaluate.read_images(inputs.catalog, new,
                                      inputs.plan.model_config.image_size)
        _, heads = evaluate.cnn_outputs(inputs.plan.live["model"], pixels)
        vectors = evaluate.factor_space(evaluate.REGRESS, heads, None)
        base = WarmParams.from_settings(settings)
        return {(s, m): warmup.curve(conn, inputs.catalog.ids[new], vectors, inputs.factors,
                                     replace(base, strength=s), metric=m)
                for s in strengths for m in metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3])
    parser.add_argument("--metrics", nargs="+", choices=["ip", "cosine"], default=["ip"],
                        help="how the warm-up vector is ranked (ip: as served)")
    args = parser.parse_args()
    admin = os.environ.get("COFEAT_DATABASE_URL")
    if not admin:
        sys.exit("set COFEAT_DATABASE_URL to a Postgres the benchmark may create databases on")
    root = Path(tempfile.mkdtemp(prefix="cofeat-warmup-"))
    url = scratch_database(admin)
    started = time.monotonic()
    try:
        settings = build(root, url, args.preset, args.seed)
        curves = measure(settings, args.strengths, args.metrics)
    finally:
        drop_database(admin, url)
        shutil.rmtree(root, ignore_errors=True)
    print(f"world: {args.preset}, seed {args.seed}; machine: {describe()}; "
          f"load average {os.getloadavg()[0]:.1f}; {time.monotonic() - started:.0f} s")
    for (strength, metric), rows in curves.items():
        print(f"\nprior strength {strength:g}, ranked by {metric}")
        print(warmup.markdown(rows).split("\n\n", 1)[1])
    if not any(np.isfinite(r["score"]) for rows in curves.values() for r in rows):
        sys.exit("no scores: the world has no new projects with later appreciations")


if __name__ == "__main__":
    main()
