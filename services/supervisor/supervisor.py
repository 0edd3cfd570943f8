"""`cofeat run`: the services as one supervised process tree."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

from prometheus_client import Counter, Gauge

from services.supervisor.children import Child
from shared.metrics import health

log = logging.getLogger("cofeat.run")

RESTARTS = Counter("cofeat_run_restarts_total", "Child restarts", ["service"])
UP = Gauge("cofeat_run_child_up", "1 while the child runs", ["service"])


class Supervisor:
    def __init__(self, children: list[Child], state_path: Path, max_backoff_s: float = 60.0,
                 stop_timeout_s: float = 30.0):
        self.children = children
        self.state_path = state_path
        self.max_backoff_s = max_backoff_s
        self.stop_timeout_s = stop_timeout_s
        self.stopping = False

    def stop(self, *_args) -> None:
        self.stopping = True

    def run(self, tick_s: float = 0.5) -> int:
        for child in self.children:
            child.start()
        while not self.stopping:
            self._tick()
            time.sleep(tick_s)
        log.info("stopping %d children", len(self.children))
        for child in self.children:
            child.stop(self.stop_timeout_s)
        self._write_state(stopped=True)
        return 0

    def _tick(self) -> None:
        health.beat()  # /healthz: the supervising loop turns
        for child in self.children:
            child.poll(self.max_backoff_s)
            if child.due():
                child.restarts += 1
                RESTARTS.labels(child.name).inc()
                child.start()
            UP.labels(child.name).set(1 if child.proc is not None else 0)
        down = [c.name for c in self.children if c.proc is None]
        health.set(not down, "down: " + ", ".join(down) if down else "ok")
        self._write_state()

    def _write_state(self, stopped: bool = False) -> None:
        state = {"pid": os.getpid(), "stopped": stopped, "updated": time.time(),
                 "children": [c.state() for c in self.children]}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)


def install_signal_handlers(supervisor: Supervisor) -> None:
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)


def state_path(data_dir: Path) -> Path:
    return Path(data_dir) / "run" / "state.json"
