"""The CNN refresh on one process against `--nproc N`: held-out score across seeds, and
wall time, on the simulator's tiny world through the real store.

    .venv/bin/python -m benchmarks.cnn_distributed [--seeds 0 1 2 3 4] [--nproc 2]
        [--recipe test|default] [--epochs E] [--data-dir DIR]

The world (64 px JPEGs) is made once under --data-dir and reused; a scratch database on
COFEAT_DATABASE_URL's server (dropped after) gets the first 70% of the stream and one
full factor refresh. Then, per seed (COFEAT_CNN_SEED: initialization, sampling order,
augmentation), `cofeat refresh cnn --once --full` runs as its own process, alone and with
`--nproc N` (torchrun, gloo on CPU), and the version row's held-out scores are read back.
The held-out split is the same for every run (it hashes project ids).

`--recipe test` is what tests/services/refresh/cnn uses (small backbone, 32 px, 3 epochs;
test_distributed.py trains 10, `--epochs 10`): the spread across seeds printed here is
where the tolerance of tests/services/refresh/cnn/test_distributed.py comes from.
`--recipe default` is the default CNN recipe (mobilenet_v2 from ImageNet, 128 px, 5
epochs). Wall time includes process start, torch import and, for N > 1, torchrun and the
process-group set-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's import

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--recipe", choices=["test", "default"], default="test")
    parser.add_argument("--epochs", type=int, default=None, help="COFEAT_CNN_EPOCHS")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    import psycopg

    from benchmarks.train import scratch_database
    from shared.db.connect import conninfo
    from shared.settings import load_settings
    from tests.world import simulate

    print(describe())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    root = (args.data_dir or Path(tempfile.gettempdir()) / "cofeat-bench-ddp").resolve()
    if not (root / "events" / "cofeat.projects.jsonl").exists():
        root.mkdir(parents=True, exist_ok=True)
        simulate(root)
    admin = conninfo(load_settings().require_database_url())
    name, url = scratch_database(admin)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    try:
        rows = runs(args, root, url, work)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        subprocess.run(["rm", "-rf", str(work)], check=False)
    report(rows, args)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def recipe(name: str) -> dict:
    if name == "default":
        from tests.services.refresh.cnn.test_service import FAST

        keep = {k: v for k, v in FAST.items() if not k.startswith("cnn_")}
        return {**keep, "cnn_min_projects": 20}
    from tests.services.refresh.cnn.test_service import FAST

    return dict(FAST)


def runs(args, root: Path, url: str, work: Path) -> list[dict]:
    import psycopg

    from services.refresh.factors.service import run_factors_once
    from shared.settings import Settings
    from tests.world import cofeat_env, load

    values = {**recipe(args.recipe), "database_url": url, "data_dir": str(work / "data"),
              "image_roots": str(root / "images")}
    if args.epochs:
        values["cnn_epochs"] = args.epochs
    load(url, root / "events", stop=0.7)
    print("factors:", run_factors_once(Settings(**values), full=True).status)
    rows = []
    for seed in args.seeds:
        for nproc in (1, args.nproc):
            env = cofeat_env(**values, cnn_seed=seed)
            command = [sys.executable, "-m", "services", "refresh", "cnn", "--once", "--full"]
            if nproc > 1:
                command += ["--nproc", str(nproc)]
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=3600)
            wall = time.perf_counter() - started
            with psycopg.connect(url) as conn:
                metrics, stats = conn.execute(
                    "SELECT metrics, stats FROM model_versions WHERE kind = 'cnn' "
                    "ORDER BY id DESC LIMIT 1").fetchone()
            assert stats.get("processes", 1) == nproc, stats
            rows.append({"seed": seed, "nproc": nproc, "wall_s": wall, **metrics})
            print(f"seed {seed} nproc {nproc}: val_score {metrics['val_score']:.4f} "
                  f"recall {metrics.get('val_recall@10', float('nan')):.3f} "
                  f"wall {wall:.1f} s", flush=True)
    return rows


def report(rows: list[dict], args) -> None:
    print(f"\nrecipe {args.recipe}, epochs {args.epochs or 'as the recipe'}; "
          f"{len(args.seeds)} seeds")
    means = {}
    for nproc in sorted({row["nproc"] for row in rows}):
        scores = [row["val_score"] for row in rows if row["nproc"] == nproc]
        walls = [row["wall_s"] for row in rows if row["nproc"] == nproc]
        means[nproc] = statistics.mean(scores)
        spread = statistics.stdev(scores) if len(scores) > 1 else float("nan")
        print(f"nproc {nproc}: val_score mean {means[nproc]:.4f} sd {spread:.4f} "
              f"range {min(scores):.4f}-{max(scores):.4f}; wall median "
              f"{statistics.median(walls):.1f} s")
    diffs = [a["val_score"] - b["val_score"] for a, b in zip(
        [r for r in rows if r["nproc"] == 1], [r for r in rows if r["nproc"] > 1],
        strict=True)]
    print("same seed, 1 process minus N: " + " ".join(f"{d:+.4f}" for d in diffs))


if __name__ == "__main__":
    main()
