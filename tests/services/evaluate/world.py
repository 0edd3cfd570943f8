"""A simulated world in a test database, with a factor version fitted on its early part.

Events are stored in time order in two phases: up to `cut_quantile` of the interactions'
timestamps, then the rest. The factor version (implicit ALS, fitted here, the weights of
docs/factors.md without filtering) covers phase one only, so projects published later are
brand new to it, as after a real refresh. Also usable as a script for larger runs:

    python -m tests.services.evaluate.world DATA_DIR EVENTS_DIR DATABASE_URL
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg

from shared.artifacts import atomic_dir, version_dir, write_json
from shared.events import parse_interaction, parse_project
from shared.factors import Factors, write_factors

ROOT = Path(__file__).resolve().parents[3]
WEIGHTS = {0: 1.0, 1: 4.0, 2: 4.0, 3: 8.0}  # view, appreciate, comment, own


def simulate(data_dir: Path, events_dir: Path, *args: str) -> None:
    env = {**os.environ, "COFEAT_DATA_DIR": str(data_dir)}
    subprocess.run([sys.executable, "-m", "services", "simulate", "--out", str(events_dir),
                    "--processes", "1", *args], check=True, cwd=ROOT, env=env,
                   capture_output=True)


def read_events(events_dir: Path) -> tuple[list, list]:
    def parse(name, parser):
        path = next(Path(events_dir).glob(f"*{name}.jsonl"))
        with open(path, "rb") as handle:
            return [parser(line.rstrip(b"\n")) for line in handle]

    return parse("projects", parse_project), parse("interactions", parse_interaction)


def store_in_phases(conninfo: str, events_dir: Path, cut_quantile: float = 0.7,
                    between=None) -> int:
    """Write every event; returns the watermark (highest seq of phase one). `between()`
    runs after phase one (e.g. the real factor refresh)."""
    from shared.db.store import write_batch

    projects, interactions = read_events(events_dir)
    cut = np.quantile([e.ts_ms for e in interactions], cut_quantile)
    with psycopg.connect(conninfo) as conn:
        for early in (True, False):
            mine_p = [e for e in projects if (e.ts_ms <= cut) == early]
            mine_i = [e for e in interactions if (e.ts_ms <= cut) == early]
            for start in range(0, max(len(mine_i), 1), 200_000):
                write_batch(conn, mine_i[start:start + 200_000],
                            mine_p if start == 0 else [], "test", {})
            if early:
                watermark = conn.execute("SELECT max(seq) FROM interactions").fetchone()[0]
                conn.commit()
                if between is not None:
                    between()
    return int(watermark)


def fit_factor_version(conninfo: str, data_dir: Path, watermark: int, factors: int = 32,
                       seed: int = 0) -> int:
    """ALS on the interactions up to the watermark; inserts a promoted factor version."""
    from implicit.cpu.als import AlternatingLeastSquares
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_limits

    with psycopg.connect(conninfo) as conn:
        rows = np.array(conn.execute(
            "SELECT user_id, project_id, type FROM interactions WHERE seq <= %s",
            (watermark,)).fetchall(), dtype=np.int64)
        user_ids, users = np.unique(rows[:, 0], return_inverse=True)
        item_ids, items = np.unique(rows[:, 1], return_inverse=True)
        weight = np.vectorize(WEIGHTS.get)(rows[:, 2]).astype(np.float32)
        summed = csr_matrix((weight, (users, items)), shape=(len(user_ids), len(item_ids)))
        summed.sum_duplicates()
        summed.data = 1 + 4 * np.log1p(summed.data)  # confidence, as the refresh weighs it
        model = AlternatingLeastSquares(factors=factors, regularization=0.05, iterations=15,
                                        random_state=seed, num_threads=1)
        with threadpool_limits(1, "blas"):  # implicit parallelizes itself
            model.fit(summed.astype(np.float32), show_progress=False)
    return _insert_factors(conninfo, data_dir, watermark,
                           Factors(model.user_factors, model.item_factors, user_ids, item_ids,
                                   {}))


def style_factor_version(conninfo: str, data_dir: Path, watermark: int, k: int = 16,
                         noise: float = 0.3, seed: int = 0) -> int:
    """A factor version where style alone drives the factors: item factor = its style's
    random prototype + noise, user factor = hidden style preferences x prototypes. For
    projects and users with interactions up to the watermark, like a real version."""
    from shared import groundtruth

    truth = groundtruth.read(data_dir)
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((len(truth.user_style_pref[0]), k)).astype(np.float32)
    with psycopg.connect(conninfo) as conn:
        rows = np.array(conn.execute(
            "SELECT DISTINCT user_id, project_id FROM interactions WHERE seq <= %s",
            (watermark,)).fetchall(), dtype=np.int64)
    item_ids, user_ids = np.unique(rows[:, 1]), np.unique(rows[:, 0])
    items = prototypes[truth.style_of(item_ids)]
    items += noise * rng.standard_normal(items.shape).astype(np.float32)
    users = truth.user_style_pref[np.searchsorted(truth.user_ids, user_ids)] @ prototypes
    return _insert_factors(conninfo, data_dir, watermark,
                           Factors(users, items, user_ids, item_ids, {}))


def _insert_factors(conninfo: str, data_dir: Path, watermark: int, factors: Factors) -> int:
    with psycopg.connect(conninfo) as conn:
        version_id = conn.execute(
            "INSERT INTO model_versions (kind, watermark, artifact, status) "
            "VALUES ('factors', %s, '', 'promoted') RETURNING id", (watermark,)).fetchone()[0]
        final = version_dir(data_dir, "factors", version_id)
        factors.meta = {"version": int(version_id), "watermark": watermark}
        with atomic_dir(final) as tmp:
            write_factors(tmp, factors)
        conn.execute("UPDATE model_versions SET artifact = %s WHERE id = %s",
                     (str(final.relative_to(data_dir)), version_id))
    return int(version_id)


def insert_cnn_version(conninfo: str, data_dir: Path, factor_version_id: int, model,
                       meta: dict) -> int:
    """A promoted CNN version as the CNN refresh writes it (model.pt + meta.json)."""
    from shared.vision import save_model

    with psycopg.connect(conninfo) as conn:
        version_id = conn.execute(
            "INSERT INTO model_versions (kind, factor_version_id, params, artifact, status) "
            "VALUES ('cnn', %s, %s, '', 'promoted') RETURNING id",
            (factor_version_id, psycopg.types.json.Jsonb(meta.get("params", {})))
        ).fetchone()[0]
        final = version_dir(data_dir, "cnn", version_id)
        with atomic_dir(final) as tmp:
            save_model(tmp / "model.pt", model)
            write_json(tmp / "meta.json", {**meta, "version": version_id})
        conn.execute("UPDATE model_versions SET artifact = %s WHERE id = %s",
                     (str(final.relative_to(data_dir)), version_id))
    return int(version_id)


if __name__ == "__main__":
    data, events, url = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    mark = store_in_phases(url, events)
    print("watermark", mark, "factor version", fit_factor_version(url, data, mark, 64))
