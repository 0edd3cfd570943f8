"""Query latency and throughput: Milvus through shared/client.py, and HTTP through `cofeat serve`.

Loads N random unit vectors (dim 64, HNSW with the project's index settings) into a
collection of its own behind its own alias prefix, measures, and drops it afterwards.
Uses the configured Milvus (COFEAT_MILVUS_URI or the running `cofeat dev up` stack).

Similar-to-project and HTTP queries ask for a different project every time, across all
threads, so the client's cache of project vectors never helps them (cold); "cached" asks
for 100 projects over and over and shows what that cache saves. Latency is timed one
query at a time; QPS with --threads callers. HTTP uses a keep-alive stdlib connection per
caller, lighter than httpx, so the server rather than the client is timed. The garbage
collector's view of this process's start-up objects is frozen, as `cofeat serve` does.

    python -m benchmarks.query [--sizes 100000,400000] [--queries 2000] [--threads 4]

`benchmarks/serve.py` calls `run(...)` for the query half of the serving benchmark.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np

from benchmarks.machine import describe
from shared import milvus
from shared.client import CofeatClient
from shared.milvus import drop_prefixed
from shared.settings import Settings, load_settings

DIM = 64
BATCH = 10_000
GOAL_P99_MS = 20.0


def load(settings: Settings, count: int, dim: int = DIM, seed: int = 0) -> dict:
    """Insert `count` random unit vectors, build the HNSW index, load, alias; timings in s."""
    client = milvus.connect(settings)
    name = milvus.collection_name(settings, milvus.PROJECTS, 1)
    client.create_collection(name, schema=milvus.project_schema(dim))
    rng = np.random.default_rng(seed)
    now = int(time.time() * 1000)
    started = time.perf_counter()
    for start in range(0, count, BATCH):
        vectors = rng.normal(size=(min(BATCH, count - start), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        client.insert(name, [
            {"project_id": start + i, "embedding": v.tolist(), "model_version": 1,
             "owner_id": (start + i) % 10_000, "published_at": now - (start + i) * 1000,
             "state_version": 0}
            for i, v in enumerate(vectors)])
    client.flush(name)
    inserted = time.perf_counter()
    # Index after the bulk insert: one build per sealed segment, not per growing one.
    client.create_index(name, milvus.index_params(settings))
    _wait_for_index(client, name, count)
    indexed = time.perf_counter()
    client.load_collection(name)
    client.create_alias(name, milvus.alias(settings, milvus.PROJECTS))
    client.close()
    return {"insert_s": inserted - started, "index_s": indexed - inserted,
            "load_s": time.perf_counter() - indexed}


def _wait_for_index(client, name: str, count: int, timeout_s: float = 1800) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = client.describe_index(name, milvus.VECTOR_FIELD)
        if info.get("indexed_rows", 0) >= count and not info.get("pending_index_rows"):
            return
        time.sleep(1)
    raise TimeoutError(f"index on {name} not built after {timeout_s} s")


def drop(settings: Settings) -> None:
    client = milvus.connect(settings)
    drop_prefixed(client, settings.milvus_prefix)
    client.close()


# -- measuring --------------------------------------------------------------------------


def latency(call: Callable[[int], object], queries: int, warmup: int = 50) -> dict:
    """p50/p99/mean in ms of `call(i)`, one at a time."""
    for i in range(warmup):
        call(i)
    times = np.empty(queries)
    for i in range(queries):
        started = time.perf_counter()
        call(warmup + i)
        times[i] = time.perf_counter() - started
    ms = times * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "queries": queries}


def throughput(make_call: Callable[[], Callable[[int], object]], threads: int,
               seconds: float) -> float:
    """Queries per second with `threads` callers (each gets its own `make_call()`)."""
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def worker(slot: int) -> None:
        call, i = make_call(), slot * 1_000_000
        while time.perf_counter() < stop:
            call(i)
            i += 1
            done[slot] += 1

    workers = [threading.Thread(target=worker, args=(slot,)) for slot in range(threads)]
    started = time.perf_counter()
    for worker_thread in workers:
        worker_thread.start()
    for worker_thread in workers:
        worker_thread.join()
    return sum(done) / (time.perf_counter() - started)


def fresh_projects(count: int) -> Callable[[], int]:
    """Project ids, a different one on every call from any thread (7919 is prime, so
    n * 7919 % count visits every id once before repeating)."""
    order = itertools.count()
    return lambda: next(order) * 7919 % count


def milvus_calls(settings: Settings, count: int, seed: int = 1):
    """Factories for the client paths: by vector (one search), by project id (fetch +
    search) on fresh ids, and by project id on 100 ids asked again and again."""
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(4096, DIM)).astype(np.float32)
    fresh, hot = fresh_projects(count), rng.integers(0, count, 100)

    def by_vector():
        client = CofeatClient.from_settings(settings)
        return lambda i: client.similar_to_vector(queries[i % len(queries)], k=10)

    def by_project():
        client = CofeatClient.from_settings(settings)
        return lambda i: client.similar_to_project(fresh(), k=10)

    def cached():
        client = CofeatClient.from_settings(settings)
        return lambda i: client.similar_to_project(int(hot[i % len(hot)]), k=10)

    return by_vector, by_project, cached


# -- HTTP through `cofeat serve` --------------------------------------------------------


def start_serve(settings: Settings, port: int) -> subprocess.Popen:
    env = {**os.environ, "COFEAT_MILVUS_URI": settings.require_milvus_uri(),
           "COFEAT_MILVUS_PREFIX": settings.milvus_prefix, "COFEAT_SERVE_PORT": str(port),
           "COFEAT_DATA_DIR": tempfile.mkdtemp(prefix="cofeat-bench-"),
           "COFEAT_LOG_LEVEL": "WARNING"}
    env.pop("COFEAT_DATABASE_URL", None)  # no CNN needed: only project queries are timed
    env.pop("COFEAT_API_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "services", "serve", "--host", "127.0.0.1"],
                            env=env, stderr=subprocess.DEVNULL)
    _wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc


def _wait_http(url: str, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer")


def http_calls(port: int, count: int):
    fresh = fresh_projects(count)

    def by_project():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # keep-alive

        def call(i: int) -> None:
            connection.request("GET", f"/v1/projects/{fresh()}/similar?k=10")
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")

        return call

    return by_project


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the run ----------------------------------------------------------------------------


def run(base: Settings, sizes: list[int], queries: int = 2000, threads: int = 4,
        seconds: float = 10.0, http: bool = True) -> list[dict]:
    """One result dict per size; every collection is dropped afterwards."""
    results = []
    for count in sizes:
        settings = base.model_copy(update={"milvus_prefix": f"bench{uuid.uuid4().hex[:6]}_"})
        try:
            result = {"vectors": count, "dim": DIM, **load(settings, count)}
            gc.freeze()  # a collection pass over start-up objects is not query latency
            by_vector, by_project, cached = milvus_calls(settings, count)
            result["search"] = latency(by_vector(), queries)
            result["by_project"] = latency(by_project(), queries)
            result["cached"] = latency(cached(), queries)
            result["search_qps"] = throughput(by_vector, threads, seconds)
            result["by_project_qps"] = throughput(by_project, threads, seconds)
            if http:
                result.update(_measure_http(settings, count, queries, threads, seconds))
            # Other work on the machine shows up in p99 first: report how busy it was.
            result["load_average"] = os.getloadavg()[0]
            results.append(result)
            print(format_result(result), flush=True)
        finally:
            drop(settings)
    return results


def _measure_http(settings: Settings, count: int, queries: int, threads: int,
                  seconds: float) -> dict:
    port = _free_port()
    proc = start_serve(settings, port)
    try:
        make_call = http_calls(port, count)
        return {"http": latency(make_call(), queries),
                "http_qps": throughput(make_call, threads, seconds)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def format_result(result: dict) -> str:
    lines = [f"{result['vectors']:,} vectors x {result['dim']}: insert {result['insert_s']:.1f} s,"
             f" index {result['index_s']:.1f} s, load {result['load_s']:.1f} s"]
    for key, label in (("search", "search by vector"), ("by_project", "similar to project"),
                       ("cached", "  same, cached vectors"), ("http", "HTTP similar to project")):
        if key in result:
            r = result[key]
            verdict = "ok" if r["p99_ms"] < GOAL_P99_MS else f"over the {GOAL_P99_MS:.0f} ms goal"
            lines.append(f"  {label:24} p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
                         f"  ({verdict})")
    lines.append(f"  QPS: search {result['search_qps']:,.0f}"
                 + (f", similar to project {result['by_project_qps']:,.0f}"
                    if "by_project_qps" in result else "")
                 + (f", HTTP {result['http_qps']:,.0f}" if "http_qps" in result else "")
                 + f"; 1-min load average at the end {result['load_average']:.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,400000")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-http", action="store_true")
    args = parser.parse_args()
    print(f"machine: {describe()}; load average {os.getloadavg()[0]:.1f}")
    run(load_settings(), [int(s) for s in args.sizes.split(",")], args.queries, args.threads,
        args.seconds, http=not args.no_http)


if __name__ == "__main__":
    main()
