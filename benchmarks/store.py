"""The store at the paper's size: load, full factor refresh, 1% new events, incremental.

    python -m benchmarks.store --events 20000000 50000000 209000000 [--iterations 15]

Per size, in a scratch database (dropped afterwards unless --keep):

1. The simulator's `behance` world (309K users, 423K projects) makes that many
   interactions over a simulated year. The first 99% are bulk-loaded with binary COPY, not
   through ingest, to save time; their pairs are aggregated here with numpy and COPYed into
   `interaction_pairs` as folded (what the first full refresh would otherwise do), then the
   BRIN index is summarized and the pair table vacuumed, as autovacuum would. Interactions
   only: no project events.
2. `cofeat refresh factors --once` in a child process: a full refresh (fold, read,
   aggregate, filter, 15-iteration fit, score, write). Wall, CPU and peak RSS of that
   process, and the version's own step timings.
3. The last 1% of the stream through the ingest SQL (`shared.db.store.write_batch`,
   batches of 5,000).
4. A second refresh: incremental, from the parent's cached pairs plus the new events.
5. With --refit, a full refresh of the same data too (`--full`: folds the 1% into the
   pairs, reads them all); without it the first full refresh (99% of the data) is the
   yardstick for the incremental one.

Prints the machine; refuses a size whose estimated footprint would leave less than
--min-free-gb on the database's disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
from sqlalchemy.engine import make_url

from benchmarks.machine import describe
from services.simulate import behaviour
from services.simulate import world as world_module
from shared.db.connect import conninfo
from shared.db.engine import make_engine, upgrade
from shared.events import Interaction, InteractionType
from shared.settings import Settings

BYTES_PER_EVENT = 260  # measured at 20M: 247 (interactions, pairs, their indexes)
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds
ID_DIGITS = 12
EVENT = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", f"S{ID_DIGITS + 1}"),
                  ("seq_len", ">i4"), ("seq", ">i8"), ("user_len", ">i4"), ("user", ">i8"),
                  ("project_len", ">i4"), ("project", ">i8"), ("type_len", ">i4"),
                  ("type", ">i2"), ("ts_len", ">i4"), ("ts", ">i8")])
PAIR_FIELDS = [("user", ">i8"), ("project", ">i8"), ("views", ">i4"),
               ("appreciations", ">i4"), ("comments", ">i4"), ("owns", ">i4")]
HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
TRAILER = b"\xff\xff"
USER_PARTS = 8  # pairs are aggregated one user range at a time to bound memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[20_000_000])
    parser.add_argument("--iterations", type=int, default=None, help="ALS iterations "
                        "(default: the settings', 15)")
    parser.add_argument("--database-url", default=os.environ.get(
        "COFEAT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="admin URL: a scratch database is created and dropped")
    parser.add_argument("--min-free-gb", type=float, default=15.0)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--refit", action="store_true",
                        help="also refit in full after the new events, as the yardstick")
    args = parser.parse_args()
    print(f"machine: {describe()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    for events in args.events:
        run_size(args, events)


def run_size(args, events: int) -> None:
    free = shutil.disk_usage(_data_directory(args.database_url)).free / 2**30
    need = events * BYTES_PER_EVENT / 2**30
    print(f"\n== {events:,} events: about {need:.0f} GiB needed, {free:.0f} GiB free", flush=True)
    if free - need < args.min_free_gb:
        print(f"   skipped: would leave less than {args.min_free_gb:.0f} GiB free")
        return
    name = f"cofeat_store_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(args.database_url).set(database=name).render_as_string(hide_password=False)
    data_dir = Path(tempfile.mkdtemp(prefix="cofeat-store-", dir=_scratch_dir()))
    try:
        settings = Settings(database_url=url, data_dir=data_dir)
        engine = make_engine(settings)
        upgrade(engine, settings)
        engine.dispose()
        world = world_module.build_world(world_module.preset("behance", events=events))
        tail = load(url, world, events)
        report_sizes(url)
        env = _env(url, data_dir, args)
        full = refresh(env, url, "first full")
        ingest_tail(url, tail)
        incremental = refresh(env, url, "incremental")
        if args.refit:
            full = refresh(env, url, "full refit of the same data", "--full")
        ratio_wall = incremental["wall"] / full["wall"]
        ratio_cpu = incremental["cpu"] / full["cpu"]
        print(f"   incremental / full: {100 * ratio_wall:.1f}% of wall, "
              f"{100 * ratio_cpu:.1f}% of CPU (read included)", flush=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        if not args.keep:
            with psycopg.connect(args.database_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _data_directory(admin_url: str) -> str:
    with psycopg.connect(admin_url) as conn:
        try:
            return conn.execute("SHOW data_directory").fetchone()[0]
        except psycopg.Error:  # not a superuser: assume the database shares our disk
            return "/"


def _scratch_dir() -> str:
    return os.environ.get("COFEAT_BENCH_TMP", tempfile.gettempdir())


# -- loading --------------------------------------------------------------------------------

class PairAccumulator:
    """Event keys per user range, aggregated to pair rows at the end."""

    def __init__(self, users: int, projects: int):
        self.projects = projects
        self.bounds = np.linspace(0, users + 1, USER_PARTS + 1).astype(np.int64)
        self.keys: list[list[np.ndarray]] = [[] for _ in range(USER_PARTS)]
        self.appreciations: list[list[tuple[np.ndarray, np.ndarray]]] = [
            [] for _ in range(USER_PARTS)]

    def add(self, user_ids, project_ids, types, seqs) -> None:
        pair = user_ids * self.projects + project_ids
        part = np.searchsorted(self.bounds, user_ids, side="right") - 1
        for p in range(USER_PARTS):
            mine = part == p
            self.keys[p].append(pair[mine] * 4 + types[mine])
            liked = mine & (types == InteractionType.appreciate)
            self.appreciations[p].append((pair[liked], seqs[liked]))

    def pair_rows(self):
        """Per user range: (rows with an appreciation, rows without) as COPY bytes."""
        for p in range(USER_PARTS):
            keys = np.sort(np.concatenate(self.keys[p]))
            self.keys[p] = []
            change = np.r_[True, keys[1:] != keys[:-1]]
            runs = np.flatnonzero(change)
            counts = np.diff(np.r_[runs, len(keys)])
            run_pair, run_type = keys[runs] >> 2, keys[runs] & 3
            del keys, change
            first = np.r_[True, run_pair[1:] != run_pair[:-1]]
            pair_index = np.cumsum(first) - 1
            pairs = run_pair[first]
            columns = np.zeros((4, len(pairs)), np.int64)
            columns[run_type, pair_index] = counts
            liked = self.appreciations[p]
            self.appreciations[p] = []
            a_pair = np.concatenate([a for a, _ in liked])
            a_seq = np.concatenate([s for _, s in liked])
            last_seq = np.full(len(pairs), -1, np.int64)
            np.maximum.at(last_seq, np.searchsorted(pairs, a_pair), a_seq)
            yield self._copy(pairs, columns, last_seq)

    def _copy(self, pairs, columns, last_seq) -> tuple[bytes, bytes]:
        has = last_seq >= 0
        out = []
        for mask, with_seq in ((has, True), (~has, False)):
            fields = PAIR_FIELDS + ([("seq", ">i8")] if with_seq else [])
            spec = [("n", ">i2")]
            for field, kind in fields:
                spec += [(f"{field}_len", ">i4"), (field, kind)]
            rows = np.zeros(int(mask.sum()), np.dtype(spec))
            rows["n"] = len(fields)
            values = {"user": pairs[mask] // self.projects,
                      "project": pairs[mask] % self.projects,
                      "views": columns[0, mask], "appreciations": columns[1, mask],
                      "comments": columns[2, mask], "owns": columns[3, mask]}
            if with_seq:
                values["seq"] = last_seq[mask]
            for field, kind in fields:
                rows[f"{field}_len"] = np.dtype(kind).itemsize
                rows[field] = values[field]
            out.append(HEADER + rows.tobytes() + TRAILER)
        return out[0], out[1]


def _event_rows(seq, users, projects, types, ts_ms) -> bytes:
    rows = np.zeros(len(seq), EVENT)
    rows["fields"] = 6
    rows["id_len"], rows["seq_len"], rows["user_len"] = ID_DIGITS + 1, 8, 8
    rows["project_len"], rows["type_len"], rows["ts_len"] = 8, 2, 8
    digits = (seq[:, None] // 10 ** np.arange(ID_DIGITS - 1, -1, -1)) % 10 + ord("0")
    ids = np.c_[np.full(len(seq), ord("b")), digits].astype(np.uint8)
    rows["id"] = ids.view(f"S{ID_DIGITS + 1}").ravel()
    rows["seq"], rows["user"], rows["project"], rows["type"] = seq, users, projects, types
    rows["ts"] = ts_ms * 1000 - PG_EPOCH_US
    return rows.tobytes()


def load(url: str, world, events: int) -> list[Interaction]:
    """COPY the first 99% of the stream; returns the last 1% as contract events."""
    started = time.perf_counter()
    cut = events - events // 100
    acc = PairAccumulator(world.config.users, world.config.projects)
    tail: list[Interaction] = []
    seq = 0
    with psycopg.connect(url) as conn:
        for chunk in behaviour.generate(world):
            n = len(chunk.ts)
            seqs = np.arange(seq + 1, seq + n + 1, dtype=np.int64)
            users, projects = chunk.user + 1, chunk.project + 1
            types = chunk.kind.astype(np.int64)
            head = max(0, min(n, cut - seq))
            if head:
                with conn.cursor().copy("COPY interactions (event_id, seq, user_id, "
                                        "project_id, type, ts) FROM STDIN (FORMAT binary)") as c:
                    c.write(HEADER + _event_rows(seqs[:head], users[:head], projects[:head],
                                                 types[:head], chunk.ts[:head]) + TRAILER)
                acc.add(users[:head], projects[:head], types[:head], seqs[:head])
            tail += [Interaction(f"t{s}", InteractionType(int(k)), int(u), int(p), int(t))
                     for s, u, p, k, t in zip(seqs[head:], users[head:], projects[head:],
                                              types[head:], chunk.ts[head:], strict=True)]
            seq += n
            conn.commit()
        copied = time.perf_counter() - started
        print(f"   COPY of {cut:,} events: {copied:.0f} s ({cut / copied:,.0f} events/s)",
              flush=True)
        started = time.perf_counter()
        pairs = 0
        with conn.cursor() as cur:
            for with_seq, without_seq in acc.pair_rows():
                columns = "user_id, project_id, views, appreciations, comments, owns"
                with cur.copy(f"COPY interaction_pairs ({columns}, last_appreciation_seq) "
                              "FROM STDIN (FORMAT binary)") as c:
                    c.write(with_seq)
                with cur.copy(f"COPY interaction_pairs ({columns}) FROM STDIN "
                              "(FORMAT binary)") as c:
                    c.write(without_seq)
            cur.execute("SELECT setval(pg_get_serial_sequence('interactions', 'seq'), %s)",
                        (cut,))
            pairs = cur.execute("SELECT count(*) FROM interaction_pairs").fetchone()[0]
        conn.commit()
        # Every loaded event is committed and nothing else writes: this snapshot sees
        # exactly the events the pairs hold.
        conn.execute("UPDATE interaction_pairs_state SET snapshot = pg_current_snapshot()"
                     "::text, folded_at = now()")
        conn.commit()
        print(f"   pairs aggregated and COPYed: {pairs:,} in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT brin_summarize_new_values('interactions_ingest_xid_brin')")
        conn.execute("VACUUM (ANALYZE) interaction_pairs")
        conn.execute("ANALYZE interactions")
    print(f"   BRIN summarized, pairs vacuumed, analyzed: {time.perf_counter() - started:.0f} s",
          flush=True)
    return tail


def report_sizes(url: str) -> None:
    with psycopg.connect(url) as conn:
        for table in ("interactions", "interaction_pairs"):
            heap, total = conn.execute("SELECT pg_relation_size(%s), pg_total_relation_size(%s)",
                                       (table, table)).fetchone()
            print(f"   {table}: {heap / 2**30:.2f} GiB heap, {total / 2**30:.2f} GiB with "
                  f"indexes", flush=True)


def ingest_tail(url: str, tail: list[Interaction]) -> None:
    from shared.db.store import write_batch

    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        for offset in range(0, len(tail), 5000):
            write_batch(conn, tail[offset:offset + 5000], [], "bench", {})
    seconds = time.perf_counter() - started
    print(f"   1% new events through write_batch: {len(tail):,} in {seconds:.1f} s "
          f"({len(tail) / seconds:,.0f} events/s)", flush=True)


# -- refreshing -----------------------------------------------------------------------------

def _env(url: str, data_dir: Path, args) -> dict:
    env = {**os.environ, "COFEAT_DATABASE_URL": conninfo(url), "COFEAT_DATA_DIR": str(data_dir),
           "COFEAT_LOG_FORMAT": "text", "OMP_WAIT_POLICY": "PASSIVE"}
    if args.iterations:
        env["COFEAT_ALS_ITERATIONS"] = str(args.iterations)
    return env


def refresh(env: dict, url: str, label: str, *flags: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "services", "refresh", "factors", "--once",
                             *flags],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stderr = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"refresh failed:\n{stderr[-3000:]}")
    with psycopg.connect(url) as conn:
        mode, status_, stats = conn.execute(
            "SELECT stats->>'mode', status, stats FROM model_versions WHERE kind = 'factors' "
            "ORDER BY id DESC LIMIT 1").fetchone()
    cpu = usage.ru_utime + usage.ru_stime
    steps = ", ".join(f"{k} {v:.1f}" for k, v in stats["timings"].items()
                      if not k.endswith("_cpu"))
    print(f"   {label} refresh ({mode}, {status_}, {stats['reason']}): {wall:.1f} s wall, "
          f"{cpu:.1f} s CPU, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB; read from "
          f"{stats['read_from']} {stats['rows_read']:,} rows; steps (s): {steps}; matrix "
          f"{stats['shape_before']} nnz {stats['nnz_before']:,} -> {stats['shape_after']} "
          f"nnz {stats['nnz_after']:,}", flush=True)
    if mode == "incremental":
        print(f"     re-solved {stats['changed_users']:,} users, {stats['changed_items']:,} "
              f"projects; drift {stats['drift_since_full']:.4f}", flush=True)
    return {"wall": wall, "cpu": cpu, "mode": mode}


if __name__ == "__main__":
    main()
