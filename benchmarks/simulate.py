"""Simulator speed and memory: images/s and events/s at the `small` preset, peak memory of
the `behance` preset's event generation (a bounded number of chunks, in a child process so
its peak RSS is its own).

    python -m benchmarks.simulate [--images 2000] [--behance-chunks 20] [--kafka 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import describe


def bench_images(n: int, processes: int, fmt: str) -> float:
    from services.simulate.render import render_all
    from services.simulate.world import build_world, preset

    world = build_world(preset("small"))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        render_all(world, Path(folder), fmt=fmt, processes=processes, indices=range(n))
        return n / (time.perf_counter() - start)


def bench_events() -> dict:
    from services.simulate.behaviour import generate
    from services.simulate.stream import Encoder
    from services.simulate.world import build_world, preset

    world = build_world(preset("small"))
    start = time.perf_counter()
    chunks = list(generate(world))
    generated = time.perf_counter() - start
    count = sum(len(c) for c in chunks)
    encoder = Encoder(world, Path("/data/images"), "png")
    start = time.perf_counter()
    records = 0
    for chunk in chunks:
        records += len(encoder.records(chunk))
    encoded = time.perf_counter() - start
    return {"events": count, "generate_per_s": count / generated,
            "encode_per_s": records / encoded}


def bench_kafka(n: int) -> float:
    """Records/s into the configured broker (COFEAT_KAFKA_BOOTSTRAP or `cofeat dev up`)."""
    import uuid

    from services.simulate.behaviour import generate
    from services.simulate.stream import Encoder, KafkaSink, publish, records
    from services.simulate.world import build_world, preset
    from shared.kafka.admin import ensure_topics
    from shared.settings import load_settings

    settings = load_settings(topic_prefix=f"bench{uuid.uuid4().hex[:8]}.")
    ensure_topics(settings)
    world = build_world(preset("small", events=n))
    encoder = Encoder(world, Path("/data/images"), "png", settings.topic_prefix)
    stream = list(records(world, generate(world), encoder))
    start = time.perf_counter()
    publish(iter(stream), KafkaSink(settings))
    return len(stream) / (time.perf_counter() - start)


def behance_child(chunks: int) -> None:
    from services.simulate.behaviour import generate
    from services.simulate.world import build_world, preset

    start = time.perf_counter()
    world = build_world(preset("behance"))
    built = time.perf_counter() - start
    count = 0
    start = time.perf_counter()
    for chunk in generate(world, max_chunks=chunks):
        count += len(chunk)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"build_s": built, "events": count, "seconds": elapsed,
                      "chunks": chunks, "total_chunks": world.config.chunks,
                      "peak_rss_mib": peak}))


def bench_behance(chunks: int) -> dict:
    output = subprocess.run([sys.executable, "-m", "benchmarks.simulate", "--behance-child",
                             str(chunks)], check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--behance-chunks", type=int, default=20)
    parser.add_argument("--kafka", type=int, default=0,
                        help="also publish this many events to the configured broker")
    parser.add_argument("--behance-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.behance_child:
        behance_child(args.behance_child)
        return
    print(f"machine: {describe()}")
    processes = os.cpu_count() or 1
    for fmt in ("png", "jpeg"):
        rate = bench_images(args.images, processes, fmt)
        print(f"images (small preset, 128 px {fmt}, {processes} processes, {args.images} "
              f"images): {rate:,.0f} img/s -> 100,000 images in {100_000 / rate / 60:.1f} min")
    one = bench_images(args.images // 4, 1, "png")
    print(f"images, one process, png: {one:,.0f} img/s")
    events = bench_events()
    print(f"events (small preset, {events['events']:,}): generated "
          f"{events['generate_per_s']:,.0f}/s (arrays), encoded to contract records "
          f"{events['encode_per_s']:,.0f}/s (one process)")
    if args.kafka:
        rate = bench_kafka(args.kafka)
        print(f"kafka publish (kafka-python, acks=all, idempotent; {args.kafka:,} events "
              f"pre-encoded): {rate:,.0f} records/s")
    b = bench_behance(args.behance_chunks)
    rate = b["events"] / b["seconds"]
    print(f"behance preset: world built in {b['build_s']:.1f} s; generated {b['events']:,} "
          f"events in {b['chunks']} of {b['total_chunks']} chunks (a bounded run) at "
          f"{rate:,.0f}/s; peak RSS {b['peak_rss_mib']:,.0f} MiB; all chunks would take "
          f"~{b['seconds'] * b['total_chunks'] / b['chunks'] / 60:.0f} min to generate "
          "(encoding and publishing cost more)")


if __name__ == "__main__":
    main()
