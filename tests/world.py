"""The simulator's tiny world for pipeline tests: rendered once per session, loaded into a
test's own store through the real write path."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import psycopg

from shared.db.store import write_batch
from shared.events import InvalidEvent, parse_interaction, parse_project


def simulate(root: Path, *args: str) -> Path:
    """Run `cofeat simulate` to JSON-lines files; returns the output directory."""
    out = root / "events"
    env = {"COFEAT_DATA_DIR": str(root), "PATH": "/usr/bin:/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run([sys.executable, "-m", "services", "simulate", "--preset", "tiny",
                    "--image-size", "64", "--format", "jpeg", "--out", str(out), *args],
                   env=env, check=True, capture_output=True, timeout=300)
    return out


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _parse(lines: list[bytes], parse) -> list:
    events = []
    for line in lines:
        # The simulator's deliberate invalid events are skipped; ingest dead-letters them.
        with contextlib.suppress(InvalidEvent):
            events.append(parse(line))
    return events


def load(db_url: str, events_dir: Path, start: float = 0.0, stop: float = 1.0) -> int:
    """Store the [start, stop) share of the stream (by time order) and all projects
    published so far; returns how many interactions were written."""
    interactions = _parse(_lines(events_dir / "cofeat.interactions.jsonl"), parse_interaction)
    interactions.sort(key=lambda e: e.ts_ms)
    part = interactions[int(start * len(interactions)):int(stop * len(interactions))]
    cutoff = part[-1].ts_ms if part else 0
    projects = [p for p in _parse(_lines(events_dir / "cofeat.projects.jsonl"), parse_project)
                if p.ts_ms <= cutoff]
    with psycopg.connect(db_url) as conn:
        for first in range(0, len(part), 20_000):
            write_batch(conn, part[first:first + 20_000], [], "tests", {})
        write_batch(conn, [], projects, "tests", {})
    return len(part)


def cofeat_env(**settings) -> dict[str, str]:
    """The environment of a `cofeat` process run with these settings (and no others)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("COFEAT_")}
    env.update({f"COFEAT_{name.upper()}": str(value) for name, value in settings.items()})
    return env
