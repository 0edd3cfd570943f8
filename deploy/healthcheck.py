#!/usr/bin/env python3
"""Container health probe for the cofeat images (stdlib only: the images carry no curl).

    cofeat-healthcheck              GET http://127.0.0.1:$COFEAT_METRICS_PORT/healthz
    cofeat-healthcheck --serve      GET http://127.0.0.1:$COFEAT_SERVE_PORT/healthz
    cofeat-healthcheck --heartbeat  the refresh loop (`cofeat refresh --loop`) finished a
                                    cycle less than two of its intervals ago

Exit 0 when healthy, 1 otherwise (what Docker's HEALTHCHECK and compose expect).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path


def probe_http(port: str) -> int:
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:  # URLError, HTTPError (503), refused, timeout
        print(f"{url}: {error}", file=sys.stderr)
        return 1


def probe_heartbeat() -> int:
    # Written by the loop (services/refresh/heartbeat.py) with the interval it runs at, so
    # this probe reads no interval setting of its own.
    data_dir = Path(os.environ.get("COFEAT_DATA_DIR", "/data"))
    heartbeat = data_dir / "refresh" / "heartbeat"
    try:
        beat = json.loads(heartbeat.read_text())
        age, interval = time.time() - float(beat["finished_at"]), float(beat["interval_s"])
    except FileNotFoundError:
        print(f"{heartbeat}: no refresh cycle finished yet", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"{heartbeat}: unreadable ({type(error).__name__}: {error})", file=sys.stderr)
        return 1
    if age > 2 * interval:
        print(f"{heartbeat}: last cycle {age:.0f}s ago (> 2 x {interval:.0f}s)",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if "--heartbeat" in argv:
        return probe_heartbeat()
    if "--serve" in argv:
        return probe_http(os.environ.get("COFEAT_SERVE_PORT", "8080"))
    port = os.environ.get("COFEAT_METRICS_PORT", "9100")
    if port in ("", "0"):
        print("COFEAT_METRICS_PORT is 0: /healthz is disabled", file=sys.stderr)
        return 1
    return probe_http(port)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
