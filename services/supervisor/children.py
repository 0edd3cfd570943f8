"""Child processes of `cofeat run`: what to start, and restarting with backoff."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from shared.settings import Settings

log = logging.getLogger("cofeat.run")

# Each service and the command line that runs it as a long-lived process.
COMMANDS = {
    "ingest": ["ingest"],
    "refresh": ["refresh", "--loop"],  # every COFEAT_REFRESH_EVERY, which it inherits
    "embed": ["embed"],
    "serve": ["serve"],
}
STABLE_AFTER_S = 60.0  # a child that ran this long starts its backoff over


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start_at: float = 0.0
    backoff_s: float = 1.0
    last_exit: int | None = None
    last_error: str = ""
    _tail: deque = field(default_factory=lambda: deque(maxlen=1))

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services", *self.argv],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env})
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def poll(self, max_backoff_s: float) -> None:
        """Notice an exit and schedule the restart."""
        if self.proc is None or self.proc.poll() is None:
            return
        self.last_exit = self.proc.returncode
        self.last_error = _last_line(self.log_path)
        ran_for = time.monotonic() - self.started_at
        if ran_for >= STABLE_AFTER_S:
            self.backoff_s = 1.0
        log.warning("%s exited with %s after %.1f s; restarting in %.1f s: %s", self.name,
                    self.last_exit, ran_for, self.backoff_s, self.last_error)
        self.proc = None
        self.next_start_at = time.monotonic() + self.backoff_s
        self.backoff_s = min(max_backoff_s, self.backoff_s * 2)

    def due(self) -> bool:
        return self.proc is None and time.monotonic() >= self.next_start_at

    def stop(self, timeout_s: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %.0f s; killing it", self.name, timeout_s)
            self.proc.kill()
            self.proc.wait()

    def state(self) -> dict:
        return {"name": self.name, "pid": self.proc.pid if self.proc else None,
                "running": self.proc is not None and self.proc.poll() is None,
                "restarts": self.restarts, "last_exit": self.last_exit,
                "last_error": self.last_error, "argv": self.argv}


def _last_line(path: Path, limit: int = 300) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 4096))
            lines = [line for line in handle.read().decode(errors="replace").splitlines()
                     if line.strip()]
        return lines[-1][:limit] if lines else ""
    except OSError:
        return ""


def plan(services: list[str], ingest_replicas: int, log_dir: Path, metrics_port: int = 0,
         embed_threads: int = 0) -> list[Child]:
    """The children to run. With a metrics port P, the supervisor serves P and child i
    serves P + 1 + i (they would otherwise all inherit P). `embed_threads` (if not 0)
    becomes the embedder's COFEAT_EMBED_TORCH_THREADS."""
    unknown = [s for s in services if s not in COMMANDS]
    if unknown:
        raise ValueError(f"unknown services {unknown}; known: {sorted(COMMANDS)}")
    children = []
    for name in services:
        argv = list(COMMANDS[name])
        copies = ingest_replicas if name == "ingest" else 1
        for n in range(copies):
            label = f"{name}-{n}" if copies > 1 else name
            port = metrics_port + 1 + len(children) if metrics_port else 0
            env = {"COFEAT_METRICS_PORT": str(port)}
            if name == "embed" and embed_threads:
                env["COFEAT_EMBED_TORCH_THREADS"] = str(embed_threads)
            children.append(Child(label, argv, log_dir / f"{label}.log", env))
    return children


def embed_threads(services: list[str], settings: Settings) -> int:
    """Torch threads for an embedder beside CNN training: half the cores. torch gives each
    process a thread per core, and two such processes on the same cores slow each other and
    hold stream events back; 0 (torch's default) when embed runs alone or the setting is
    given explicitly."""
    if ("embed_torch_threads" in settings.model_fields_set
            or not {"embed", "refresh"} <= set(services)):
        return 0
    return max(1, len(os.sched_getaffinity(0)) // 2)
