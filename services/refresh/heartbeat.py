"""The refresh loop's heartbeat, what `cofeat-healthcheck --heartbeat` (deploy/healthcheck.py)
reads: COFEAT_DATA_DIR/refresh/heartbeat, JSON with when the last cycle finished and the
interval the loop runs at. The probe calls the loop healthy while that cycle finished less
than two intervals ago; it takes the interval from the file, so it needs no setting of its
own and cannot disagree with the loop."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def heartbeat_path(data_dir: Path) -> Path:
    return Path(data_dir) / "refresh" / "heartbeat"


def beat(data_dir: Path, interval_s: float) -> None:
    """Record a finished cycle; written whole and renamed, so the probe never reads half."""
    path = heartbeat_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".heartbeat.{os.getpid()}.tmp")
    partial.write_text(json.dumps({"finished_at": time.time(), "interval_s": interval_s}))
    os.replace(partial, path)
