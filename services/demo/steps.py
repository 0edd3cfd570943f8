"""The demo as resumable steps: each runs `cofeat` commands and records that it finished."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("cofeat.demo")

# Settings the demo's services share: CPU-sized models and a short refresh schedule.
DEMO_ENV = {
    "small": {"COFEAT_CNN_BACKBONE": "small", "COFEAT_CNN_IMAGE_SIZE": "64",
              "COFEAT_CNN_EPOCHS": "8", "COFEAT_CNN_REFRESH_EPOCHS": "2",
              "COFEAT_ALS_FACTORS": "32", "COFEAT_REFRESH_EVERY": "60s",
              # Two epochs of fine-tuning from ImageNet per twin: 3 took 6 of the 26 min.
              "COFEAT_EVAL_IMAGENET_INIT_EPOCHS": "2"},
    # ~310 projects train on tiny: batches of 32 for 10 epochs are ~100 optimizer steps;
    # 3 epochs of 64 (15 steps) left features worse than random weights.
    "tiny": {"COFEAT_CNN_BACKBONE": "small", "COFEAT_CNN_IMAGE_SIZE": "32",
             "COFEAT_CNN_EPOCHS": "10", "COFEAT_CNN_BATCH_SIZE": "32",
             "COFEAT_CNN_REFRESH_EPOCHS": "1",
             "COFEAT_ALS_FACTORS": "16", "COFEAT_ALS_ITERATIONS": "8",
             "COFEAT_FILTER_MIN_USER_COUNT": "2", "COFEAT_FILTER_MIN_ITEM_COUNT": "2",
             "COFEAT_REFRESH_EVERY": "15s",
             # The ImageNet column's code path, at a size CI can afford (224 on small).
             "COFEAT_EVAL_IMAGENET_SIZE": "64"},
}
# The embedder checks its live collection against Postgres every minute, so the demo's few
# minutes of live stream see several checks (the report gives the drift they found).
DEMO_ENV_ALL = {"COFEAT_EMBED_RECONCILE_EVERY_S": "60"}
# Slow enough that refreshes and the embedder's model swaps happen while events stream,
# and new projects keep arriving after a model is live (freshness is measured on them).
RATES = {"small": 3000, "tiny": 250}


class Demo:
    def __init__(self, data_dir: Path, scale: str, images: str = "local",
                 world: str | None = None):
        self.data_dir = data_dir.resolve()
        self.scale = scale
        self.images = images  # "http": published as URLs of a local image server
        self.world = world  # None: the preset's own (structure on small)
        self.dir = self.data_dir / "demo"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.json"
        # The caller's own COFEAT_* settings win over the demo's defaults.
        self.env = {**DEMO_ENV_ALL, **DEMO_ENV[scale], **os.environ,
                    "COFEAT_DATA_DIR": str(self.data_dir)}

    # -- bookkeeping ---------------------------------------------------------------------

    def state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def mark(self, step: str, **facts) -> None:
        state = self.state()
        state[step] = {"done": time.time(), **facts}
        self.state_path.write_text(json.dumps(state, indent=2))

    # -- running commands ----------------------------------------------------------------

    def cofeat(self, *args: str, log_name: str | None = None, check: bool = True,
               capture: bool = False) -> subprocess.CompletedProcess:
        say(f"$ cofeat {' '.join(args)}")
        out = (self.dir / f"{log_name}.log").open("ab") if log_name else None
        result = subprocess.run([sys.executable, "-m", "services", *args], env=self.env,
                                stdout=subprocess.PIPE if capture else out,
                                stderr=out if out else None, text=capture)
        if check and result.returncode != 0:
            hint = f" (log: {self.dir / (log_name + '.log')})" if log_name else ""
            raise SystemExit(f"cofeat {args[0]} failed with exit code {result.returncode}"
                             f"{hint}")
        return result

    def background(self, *args: str, log_name: str) -> subprocess.Popen:
        say(f"$ cofeat {' '.join(args)} &   (log: demo/{log_name}.log)")
        out = (self.dir / f"{log_name}.log").open("ab")
        return subprocess.Popen([sys.executable, "-m", "services", *args], env=self.env,
                                stdout=out, stderr=subprocess.STDOUT)


    def serve_images(self, port: int) -> subprocess.Popen:
        """COFEAT_DATA_DIR/images over HTTP on loopback, as a CDN would serve them; every
        reader is allowed that one address (COFEAT_IMAGE_HOSTS) and nothing else."""
        images = self.data_dir / "images"
        images.mkdir(parents=True, exist_ok=True)
        say(f"$ python -m http.server {port} --bind 127.0.0.1 --directory {images} &")
        out = (self.dir / "images-http.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                                 "127.0.0.1", "--directory", str(images)],
                                stdout=out, stderr=subprocess.STDOUT)
        self.env.setdefault("COFEAT_IMAGE_HOSTS", "127.0.0.1")
        return proc

    def image_base_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/"


def stop(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def say(text: str) -> None:
    print(text, flush=True)
