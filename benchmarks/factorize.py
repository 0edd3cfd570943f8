"""Factorization benchmark: read, full fit and incremental refresh (docs/factors.md).

    .venv/bin/python benchmarks/factorize.py --size small   [--database-url URL]
    .venv/bin/python benchmarks/factorize.py --size behance [--iterations 2]

small: 5,000 users x 10,000 projects x 1M events through Postgres and the real service
(run_factors_once): a full version, then 1% new events, an incremental version, and a full
refit of the same data to compare with. behance: 309K x 423K with ~31M non-zeros, in
memory only (no Postgres): matrix build, a few full-fit iterations (extrapolated to the
configured iteration count) and one incremental update after 1% new events.

New events come from 5% of the users, as in a 10-minute window where few users are active.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.refresh.factors import als  # noqa: E402
from services.refresh.factors.matrix import (  # noqa: E402
    MatrixParams,
    Training,
    build_training,
    changes,
)
from services.refresh.factors.pairs import add_events  # noqa: E402
from services.refresh.factors.quality import evaluate  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.services.refresh.factors.synth import (  # noqa: E402
    Events,
    make_world,
    new_events,
    pairs_of,
)

SIZES = {"small": (5_000, 10_000, 1_000_000), "behance": (309_000, 423_000, 40_000_000)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    import implicit
    import scipy
    from threadpoolctl import threadpool_info

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text()
                  .splitlines() if line.startswith("MemTotal"))
    blas = ", ".join(f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)"
                     for i in threadpool_info() if i["user_api"] == "blas")
    return (f"{platform.platform()}; {cpu}; {len(os.sched_getaffinity(0))} usable cores; "
            f"{memory} MiB RAM; load average {os.getloadavg()[0]:.1f}; python "
            f"{platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
            f"implicit {implicit.__version__}; BLAS {blas}; GPU for implicit: "
            f"{als.gpu_available()}")


def burst(world, n_events: int, rng, share_users: float = 0.05) -> Events:
    users = rng.choice(len(world.activity), size=int(len(world.activity) * share_users),
                       replace=False)
    return world.sample(n_events, rng, users=users)


# -- small: through Postgres and the service --------------------------------------------------

def run_small(database_url: str, args) -> None:
    import psycopg

    from services.refresh.factors.service import run_factors_once
    from shared.db.engine import make_engine, upgrade
    from tests.services.refresh.factors.synth import store_events

    users, items, events = SIZES["small"]
    world = make_world(users, items, seed=0)
    rng = np.random.default_rng(1)
    name = f"cofeat_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(database=name).render_as_string(hide_password=False)
    settings = Settings(database_url=url, data_dir=Path(tempfile.mkdtemp()),
                        als_iterations=args.iterations or 15, als_factors=args.factors,
                        eval_fraction=0.2, log_format="text")
    try:
        engine = make_engine(settings)
        upgrade(engine, settings)
        engine.dispose()
        start = time.perf_counter()
        with psycopg.connect(url) as conn:
            store_events(conn, world.sample(events, rng))
        print(f"small: stored {events:,} events in {time.perf_counter() - start:.1f} s")
        first = _timed_run(run_factors_once, settings, "full (cold)")
        with psycopg.connect(url) as conn:
            store_events(conn, burst(world, events // 100, rng), prefix="n")
        incremental = _timed_run(run_factors_once, settings, "incremental (1% new)")
        full = _timed_run(lambda s: run_factors_once(s, full=True), settings,
                          "full refit (warm)")
        _compare(first, incremental, full, settings.eval_k)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _timed_run(run, settings, label):
    start = time.perf_counter()
    result = run(settings)
    total = time.perf_counter() - start
    stats = result.stats
    print(f"  {label}: {result.status} v{result.version_id} ({result.reason}) total "
          f"{total:.2f} s, steps {stats['timings']}, rows {stats['rows_read']:,} "
          f"(new {stats['rows_new']:,}), matrix {stats['shape_before']} nnz "
          f"{stats['nnz_before']:,} density {stats['density_before']:.5f} -> "
          f"{stats['shape_after']} nnz {stats['nnz_after']:,} density "
          f"{stats['density_after']:.5f}; peak RSS {peak_rss_mb():.0f} MiB")
    if result.mode == "incremental":
        print(f"    re-solved {stats['changed_users']:,} users, {stats['changed_items']:,} "
              f"projects; drift {stats['drift_since_full']:.4f}")
    result.total_s = total
    return result


def _compare(first, incremental, full, k):
    key = f"recall@{k}"
    for suffix, unit in (("", "wall"), ("_cpu", "CPU")):
        fit_inc = incremental.stats["timings"]["fit_incremental" + suffix]
        fit_full = full.stats["timings"]["fit_full" + suffix]
        fit_cold = first.stats["timings"]["fit_full" + suffix]
        print(f"  incremental fit {fit_inc:.2f} {unit} s = {100 * fit_inc / fit_full:.1f}% of "
              f"the warm full refit ({fit_full:.2f} s), {100 * fit_inc / fit_cold:.1f}% of the "
              f"cold one ({fit_cold:.2f} s)")
    print(f"  end to end (wall): incremental {incremental.total_s:.2f} s = "
          f"{100 * incremental.total_s / full.total_s:.0f}% of the full refit run")
    inc, ful = incremental.metrics[key], full.metrics[key]
    print(f"  {key}: incremental {inc:.4f}, full refit {ful:.4f} "
          f"({100 * (inc - ful) / ful:+.1f}%), most popular "
          f"{full.metrics['popular_' + key]:.4f}; map@{k} incremental "
          f"{incremental.metrics[f'map@{k}']:.4f}, full {full.metrics[f'map@{k}']:.4f}; "
          f"{full.metrics['eval_users']} held-out users")


# -- behance: in memory ---------------------------------------------------------------------

def run_behance(args) -> None:
    users, items, events = SIZES["behance"]
    settings = Settings(als_factors=args.factors, eval_fraction=0.01)
    mparams = MatrixParams.from_settings(settings)
    params = als.AlsParams.from_settings(settings)
    world = make_world(users, items, seed=0)
    rng = np.random.default_rng(1)
    start = time.perf_counter()
    base = world.sample(events, rng)
    extra = burst(world, events // 100, rng)
    print(f"behance: generated {events:,} + {len(extra):,} events in "
          f"{time.perf_counter() - start:.0f} s (not timed below)")
    old = pairs_of(base, mparams.weights)
    new = new_events(extra, len(base))
    del base
    with _clock("add the new events to the previous pairs") as _:
        data, touched = add_events(old, new, mparams.weights)
    with _clock("matrix build + filter (all rows)") as _:
        current = build_training(data, mparams)
    with _clock("matrix build + filter (previous rows)") as _:
        previous = build_training(old, mparams)
    st = current.stats
    print(f"  matrix {st['shape_before']} nnz {st['nnz_before']:,} -> {st['shape_after']} "
          f"nnz {st['nnz_after']:,} (density {st['density_after']:.5f})")
    iterations = args.iterations or 2
    rng_init = np.random.default_rng(0)
    shape = previous.matrix.shape
    p_run = als.AlsParams(**{**params.__dict__, "iterations": iterations})
    with _clock(f"full fit, {iterations} iterations") as clock:
        uf, itf = als.fit_full(previous.matrix, p_run,
                               als.grow(None, None, np.arange(shape[0]), params.factors,
                                        rng_init),
                               als.grow(None, None, np.arange(shape[1]), params.factors,
                                        rng_init), show_progress=True)
    per_iteration, cpu_per_iteration = clock.seconds / iterations, clock.cpu / iterations
    full_estimate = (per_iteration * settings.als_iterations,
                     cpu_per_iteration * settings.als_iterations)
    print(f"  {per_iteration:.1f} s wall ({cpu_per_iteration:.1f} s CPU) per iteration; a "
          f"{settings.als_iterations}-iteration full fit would take ~{full_estimate[0]:.0f} s "
          f"wall, {full_estimate[1]:.0f} s CPU")
    inc = _behance_incremental(data, old, touched, current, previous, uf, itf, params,
                               mparams, full_estimate, settings.eval_k)
    if args.compare_full:
        _behance_full_refit(data, old, current, previous, uf, itf, p_run, settings.eval_k, inc)


def _behance_incremental(data, old, touched, current: Training, previous: Training, uf, itf,
                         params, mparams, full_estimate, k) -> None:
    with _clock("diff against the previous matrix") as _:
        change = changes(current, data, previous.state(old), old, touched, mparams)
    prev_users = old.user_ids[previous.user_rows]
    prev_items = old.item_ids[previous.item_cols]
    user_ids, item_ids = data.user_ids[current.user_rows], data.item_ids[current.item_cols]
    new_users = np.flatnonzero(~np.isin(user_ids, prev_users))
    new_items = np.flatnonzero(~np.isin(item_ids, prev_items))
    print(f"  changed: {len(change.users):,} users, {len(change.items):,} projects "
          f"({len(new_users):,} / {len(new_items):,} new), drift {change.drift:.4f}")
    with _clock("incremental update") as clock:
        users, items = als.update_rows(
            current.matrix, params, als.grow(prev_users, uf, user_ids, params.factors, None),
            als.grow(prev_items, itf, item_ids, params.factors, None), change.users,
            change.items, new_users, new_items)
    print(f"  incremental update = {100 * clock.seconds / full_estimate[0]:.1f}% (wall), "
          f"{100 * clock.cpu / full_estimate[1]:.1f}% (CPU) of a full fit")
    with _clock("held-out evaluation") as _:
        metrics = evaluate(users, items, current.matrix, current.heldout_user,
                           current.heldout_item, k)
    print(f"  held-out after the full fit + incremental: {metrics}")
    print(f"  peak RSS {peak_rss_mb():.0f} MiB")
    return metrics


def _behance_full_refit(data, old, current, previous, uf, itf, params, k,
                        inc_metrics) -> None:
    """A warm full refit of the new matrix with the same iterations, for comparison."""
    prev_users = old.user_ids[previous.user_rows]
    prev_items = old.item_ids[previous.item_cols]
    user_ids, item_ids = data.user_ids[current.user_rows], data.item_ids[current.item_cols]
    rng = np.random.default_rng(0)
    with _clock(f"warm full refit, {params.iterations} iterations") as _:
        users, items = als.fit_full(
            current.matrix, params, als.grow(prev_users, uf, user_ids, params.factors, rng),
            als.grow(prev_items, itf, item_ids, params.factors, rng))
    metrics = evaluate(users, items, current.matrix, current.heldout_user,
                       current.heldout_item, k)
    key = f"recall@{k}"
    print(f"  {key}: incremental {inc_metrics[key]:.4f}, warm full refit {metrics[key]:.4f} "
          f"({100 * (inc_metrics[key] - metrics[key]) / metrics[key]:+.1f}%); {metrics}")


class _clock:
    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu_start
        if not exc[0]:
            print(f"  {self.label}: {self.seconds:.2f} s wall, {self.cpu:.2f} s CPU "
                  f"(peak RSS {peak_rss_mb():.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "behance", "both"], default="small")
    parser.add_argument("--database-url", default=os.environ.get(
        "COFEAT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="admin URL: a scratch database is created and dropped")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--compare-full", action="store_true",
                        help="behance: also time a warm full refit and compare recall")
    args = parser.parse_args()
    print(machine())
    if args.size in ("small", "both"):
        run_small(args.database_url, args)
    if args.size in ("behance", "both"):
        run_behance(args)


if __name__ == "__main__":
    main()
