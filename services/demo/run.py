"""`make demo`: the whole loop on a simulated platform, ending in the evaluation and a report.

Steps: local stack up → migrate → live loop (the simulator streams events at a steady rate
while ingest, the refresh schedule and the embedder run under `cofeat run`) → catch up
(ingest drained, a last refresh, embeddings drained) → evaluation → HTML report. Finished
steps are recorded in data/demo/state.json, so an interrupted demo resumes.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid

from services.demo.steps import DEMO_ENV, RATES, Demo, say, stop
from shared.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(demo: Demo) -> None:
    started = time.monotonic()
    state = demo.state()
    if (state.get("scale"), state.get("images", "local"), state.get("world")) != (
            demo.scale, demo.images, demo.world):
        # One Milvus serves the whole machine (cofeat dev up reuses a running one), so a
        # fresh demo gets collection names of its own instead of meeting an older run's.
        # Image URLs are published with their port: a resumed demo serves on the same one.
        demo.state_path.write_text(json.dumps(
            {"scale": demo.scale, "milvus_prefix": f"demo{uuid.uuid4().hex[:6]}_",
             "images": demo.images, "world": demo.world, "image_port": free_port()}))
    demo.env.setdefault("COFEAT_MILVUS_PREFIX", demo.state()["milvus_prefix"])
    say(f"== cofeat demo ({demo.scale}, images {demo.images}"
        f"{f', world {demo.world}' if demo.world else ''}) in {demo.data_dir}")
    images = demo.serve_images(demo.state()["image_port"]) if demo.images == "http" else None
    try:
        demo.cofeat("dev", "up")
        demo.cofeat("migrate")
        for step, body in (("live", live_loop), ("caught_up", catch_up), ("eval", evaluate)):
            if step not in demo.state():
                step_started = time.monotonic()
                facts = body(demo)
                demo.mark(step, seconds=round(time.monotonic() - step_started, 1), **facts)
    finally:
        if images is not None:
            stop(images, timeout_s=10)
    from services.demo.report import write_report

    path = write_report(demo)
    say((demo.data_dir / "report" / "eval.md").read_text())
    say(f"== report: {path}   ({time.monotonic() - started:.0f} s this run)")
    say(f"   query it: export COFEAT_DATA_DIR={demo.data_dir} "
        f"COFEAT_MILVUS_PREFIX={demo.env['COFEAT_MILVUS_PREFIX']}; "
        "cofeat search similar --project-id 1")


def simulate_args(demo: Demo) -> list[str]:
    args = ["simulate", "--preset", demo.scale, "--rate", str(RATES[demo.scale]),
            "--invalid-fraction", "0.002", "--duplicate-fraction", "0.01", "--format", "jpeg"]
    if demo.world:
        args += ["--world", demo.world]
    if demo.images == "http":
        args += ["--image-base-url", demo.image_base_url(demo.state()["image_port"])]
    return args


def live_loop(demo: Demo) -> dict:
    say("== live loop: simulator → Kafka → ingest → refresh (factors, CNN) → embed")
    metrics_port = free_port()
    demo.env.update({"COFEAT_RUN_SERVICES": "ingest,refresh,embed",
                     "COFEAT_METRICS_PORT": str(metrics_port)})
    supervisor = demo.background("run", log_name="services")
    try:
        demo.cofeat(*simulate_args(demo))
        wait_for_ingest(demo)
        freshness = scrape_histogram(metrics_port + 3, "cofeat_embed_freshness_seconds")
        if freshness:  # where the time went
            freshness["parts"] = freshness_parts(metrics_port + 3)
        drift = {"repaired_by_the_periodic_check": scrape_sum(
            metrics_port + 3, "cofeat_embed_drift_repaired_total")}
    finally:
        code = stop(supervisor)
        demo.env["COFEAT_METRICS_PORT"] = "0"
    return {"supervisor_exit": code, "freshness": freshness, "drift": drift}


def wait_for_ingest(demo: Demo, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = json.loads(demo.cofeat("status", "--json", capture=True).stdout)
        group = demo.env.get("COFEAT_INGEST_GROUP", Settings.model_fields["ingest_group"].default)
        lags = [row["lag"] for row in status["lag"] if row["group"] == group]
        if lags and all(lag == 0 for lag in lags):
            return
        say(f"   ingest lag {sum(lag or 0 for lag in lags):,} events")
        time.sleep(5)
    say("   ingest still lagging; the catch-up step drains it")


def catch_up(demo: Demo) -> dict:
    """Drain what is left. The factors are not refitted here when the live loop made a
    version: the events after it are the "future" the evaluation scores predictions on."""
    say("== catch up: drain ingest, make sure the CNN learned the latest factors, "
        "drain the embedder")
    demo.cofeat("ingest", "--drain", log_name="ingest-drain")
    if not has_factor_version(demo):
        demo.cofeat("refresh", "factors", "--once", log_name="refresh-final")
    demo.cofeat("refresh", "cnn", "--once", log_name="refresh-final")
    demo.cofeat("embed", "--drain", log_name="embed-drain")
    verified = demo.cofeat("embed", "--verify", log_name="embed-verify", check=False,
                           capture=True)
    lines = (verified.stdout or "").strip().splitlines()
    return {"verify": json.loads(lines[-1]) if lines else {"exit": verified.returncode}}


def evaluate(demo: Demo) -> dict:
    # The other CNNs train as the demo's CNN did from scratch (its live version is a
    # chain of fine-tunes, which records no full-training epochs).
    epochs = DEMO_ENV[demo.scale]["COFEAT_CNN_EPOCHS"]
    demo.cofeat("eval", "--out", str(demo.data_dir / "report"), "--epochs", epochs,
                log_name="eval")
    return {}


def has_factor_version(demo: Demo) -> bool:
    status = json.loads(demo.cofeat("status", "--json", capture=True).stdout)
    return any(row["kind"] == "factors" and row["status"] == "promoted"
               for row in status["versions"])


def metrics_text(port: int) -> str | None:
    """What a /metrics endpoint on this machine answers (None: not reachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return reply.read().decode()
    except OSError:
        return None


def scrape_sum(port: int, name: str) -> float | None:
    """The sum of a metric's samples on a /metrics endpoint (None: not reachable)."""
    text = metrics_text(port)
    if text is None:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith(f"{name}_created"))


LOOP_PARTS = ("Embedder.stream_step", "Lifecycle.backfill_step", "Embedder.retry_step",
              "Reconciler.step", "Lifecycle.drop_retired", "Lifecycle.reload_after_outage",
              "WarmUp.step", "Lifecycle.check_model")


def freshness_parts(port: int) -> dict:
    """The embedder's freshness taken apart: age when polled, wait for ingest, and the
    loop parts events wait behind (p99 of one turn of each)."""
    out = {"polled_age": scrape_histogram(port, "cofeat_embed_polled_age_seconds"),
           "ingest_wait": scrape_histogram(port, "cofeat_embed_ingest_wait_seconds")}
    for part in LOOP_PARTS:
        found = scrape_histogram(port, "cofeat_embed_loop_part_seconds", f'part="{part}"')
        if found:
            out[f"loop {part}"] = found
    return out


def scrape_histogram(port: int, name: str, labels: str = "") -> dict | None:
    """p50/p99 and count of a Prometheus histogram from a /metrics endpoint; `labels`: a
    `key="value"` the series must carry."""
    text = metrics_text(port)
    if text is None:
        return None
    buckets = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{") and labels in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(bound), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]

    def quantile(q: float) -> float:
        return next(bound for bound, count in buckets if count >= q * total)

    return {"count": int(total), "p50_le_s": quantile(0.5), "p99_le_s": quantile(0.99)}
