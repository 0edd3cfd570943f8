"""Image access benchmark: the embedder's images/s from HTTP against local files in the same
run, and the cache's hit rate across two training epochs.

N generated JPEGs are written to a folder and served from it by nginx on loopback (Debian's
/usr/sbin/nginx; without it, Python's http.server). A random-init small CNN version embeds
them with the embedder's own `Encoder`, in backfill-sized chunks, alternately from the local
paths and from http:// URLs (cache off, so every image is fetched): images/s of each and
their ratio (goal: HTTP >= 0.8x local), with COFEAT_IMAGE_FETCH_CONCURRENCY fetches in
flight and, for comparison, one. Loopback has no latency, a CDN has some: with
--latency-ms, the URLs go through a TCP proxy (its own process) that delivers every
response chunk that much later, a round trip's worth. Then two epochs of CNN training over
the HTTP URLs with the cache on: requests the server answered per epoch (from its access
log) and the hit rate.

    python -m benchmarks.images [--images 2000] [--size 256] [--rounds 3]
                                [--concurrency 16] [--latency-ms 0,20] [--epochs 2]
                                [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: halves CPU under load

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from shared.settings import Settings  # noqa: E402

NGINX = "/usr/sbin/nginx"
GOAL_RATIO = 0.8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_images(folder: Path, count: int, size: int) -> list[str]:
    """Random colour fields with grain at `size` px, JPEG quality 85: photo-like sizes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for n in range(count):
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(blocks).resize((size, size),
                                                          Image.Resampling.BILINEAR))
        grain = rng.normal(0, 18, field.shape)
        image = Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))
        name = f"{n:06d}.jpg"
        image.save(folder / name, "JPEG", quality=85)
        names.append(name)
    return names


class Server:
    """nginx (or http.server) serving `root` on loopback; counts requests it answered."""

    def __init__(self, root: Path, work: Path):
        self.port = free_port()
        self.log = work / "access.log"
        self.log.touch()
        if Path(NGINX).exists():
            self.kind = "nginx"
            conf = work / "nginx.conf"
            temp = {name: work / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
            conf.write_text(f"""
worker_processes 1;
daemon off;
pid {work / 'nginx.pid'};
error_log {work / 'error.log'};
events {{ worker_connections 512; }}
http {{
    access_log {self.log};
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path {temp['body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    server {{ listen 127.0.0.1:{self.port}; root {root}; }}
}}
""")
            command = [NGINX, "-c", str(conf), "-p", str(work), "-e", str(work / "error.log")]
        else:
            self.kind = "python http.server"
            command = [sys.executable, "-m", "http.server", str(self.port), "--bind",
                       "127.0.0.1", "--directory", str(root)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} did not start") from None
                time.sleep(0.05)

    def requests(self) -> int:
        """Requests answered so far (nginx logs each; http.server is not counted)."""
        return len(self.log.read_text().splitlines()) if self.kind == "nginx" else -1

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class DelayProxy:
    """127.0.0.1:port -> upstream, each upstream chunk delivered `latency_ms` after it came."""

    def __init__(self, upstream: int, latency_ms: float):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.images", "--proxy",
                                      str(self.port), str(upstream), str(latency_ms)])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the delay proxy did not start") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _proxy(listen: int, upstream: int, latency_s: float) -> None:
    async def pipe(reader, writer, delay: float) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + delay, data))
        except OSError:
            pass
        queue.put_nowait(None)
        await sender

    async def handle(client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pipe(client_reader, server_writer, 0.0),
                             pipe(server_reader, client_writer, latency_s),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def cnn_version(data_dir: Path) -> dict:
    from shared.vision import ModelConfig, build_model, save_model

    folder = data_dir / "models" / "cnn" / "v1"
    save_model(folder / "model.pt", build_model(ModelConfig(backbone="small", out_dim=32,
                                                            image_size=64)).eval())
    (folder / "meta.json").write_text('{"version": 1}')
    return {"id": 1, "artifact": "models/cnn/v1"}


def embed_rate(settings: Settings, uris: list[str]) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the embedder's Encoder over `uris`, in
    backfill-sized chunks. CPU time is this process's: what fetching adds to the embedder,
    less sensitive than images/s to what else runs on the machine."""
    from services.embedder.encode import Encoder
    from services.embedder.states import State
    from shared.images import ImageReader

    encoder = Encoder(settings, cnn_version(settings.data_dir),
                      ImageReader.from_settings(settings))
    items = [State(n, True, 1, 1, uri, 1) for n, uri in enumerate(uris)]
    encoder.embed(items[:64])  # warm up: threads, pools, connections
    started, cpu = time.perf_counter(), time.process_time()
    rows = 0
    for start in range(0, len(items), settings.embed_backfill_chunk):
        result = encoder.embed(items[start:start + settings.embed_backfill_chunk])
        if result.failed:
            raise RuntimeError(f"{len(result.failed)} failed: {result.failed[0][1]}")
        rows += len(result.rows)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    encoder.reader.close()
    return rows / seconds, 1000 * cpu / rows


def epochs_over_http(settings: Settings, uris: list[str], server: Server, epochs: int,
                     workers: int, work: Path) -> list[dict]:
    """CNN training over the URLs with the cache on; requests the server answered, per
    epoch."""
    import torch

    from shared.images import ImageReader
    from shared.training.train import Split, TrainConfig, train
    from shared.vision import ModelConfig

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - workers))
    reader = ImageReader.from_settings(settings)
    rows, marks = [], [(server.requests(), time.perf_counter())]

    def on_epoch(epoch, model, row) -> None:
        marks.append((server.requests(), time.perf_counter()))

    targets = np.random.default_rng(0).normal(size=(len(uris), 16)).astype(np.float32)
    train(ModelConfig(backbone="small", out_dim=16, image_size=64), Split(uris, targets,
                                                                          reader=reader),
          None, TrainConfig(epochs=epochs, batch_size=64, num_workers=workers, augment=None),
          work / "train", on_epoch=on_epoch, device=torch.device("cpu"))
    for epoch in range(epochs):
        fetched = marks[epoch + 1][0] - marks[epoch][0]
        rows.append({"epoch": epoch + 1, "fetched": fetched, "images": len(uris),
                     "hit_rate": 1 - fetched / len(uris),
                     "seconds": marks[epoch + 1][1] - marks[epoch][1]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="pixels per side")
    parser.add_argument("--rounds", type=int, default=3, help="local/HTTP alternations")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", default="0,20",
                        help="comma-separated round-trip delays to add to HTTP")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes")
    parser.add_argument("--proxy", nargs=3, help=argparse.SUPPRESS)  # the proxy's process
    args = parser.parse_args()
    if args.proxy:
        listen, upstream, latency = args.proxy
        asyncio.run(_proxy(int(listen), int(upstream), float(latency) / 1000))
        return
    print(describe())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    work.chmod(0o755)  # nginx's workers run as another user
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def run(args, work: Path) -> None:
    import torch

    data_dir = work / "data"
    images = data_dir / "images"
    names = make_images(images, args.images, args.size)
    kb = sum((images / n).stat().st_size for n in names) / len(names) / 1024
    server = Server(images, work)
    print(f"{args.images} JPEGs of {args.size} px ({kb:.0f} KB each) served by {server.kind} "
          f"on 127.0.0.1:{server.port}; CNN small at 64 px, {torch.get_num_threads()} threads")
    try:
        base = dict(data_dir=data_dir, embed_device="cpu", embed_workers=2,
                    embed_backfill_chunk=512, image_hosts="127.0.0.1", image_cache_bytes=0,
                    image_fetch_concurrency=args.concurrency)
        local = [str(images / n) for n in names]
        latencies = [float(x) for x in args.latency_ms.split(",") if x.strip()]
        proxies = {ms: DelayProxy(server.port, ms) for ms in latencies if ms > 0}
        ports = {ms: proxies[ms].port if ms in proxies else server.port for ms in latencies}
        http = {ms: [f"http://127.0.0.1:{ports[ms]}/{n}" for n in names] for ms in latencies}
        rates = {"local": []} | {f"http +{ms:g} ms": [] for ms in latencies}
        try:
            for _ in range(args.rounds):  # alternated: the machine's load drifts
                rates["local"].append(embed_rate(Settings(**base), local))
                for ms in latencies:
                    rates[f"http +{ms:g} ms"].append(embed_rate(Settings(**base), http[ms]))
            one = Settings(**{**base, "image_fetch_concurrency": 1})
            for ms in latencies:
                rates[f"http +{ms:g} ms, 1 fetch at a time"] = [embed_rate(one, http[ms])]
        finally:
            for proxy in proxies.values():
                proxy.close()
        for name, values in rates.items():
            print(f"embed {name:>34}: {np.median([v[0] for v in values]):7.0f} images/s, "
                  f"{np.median([v[1] for v in values]):5.2f} CPU ms/image (rounds: "
                  f"{', '.join(f'{v[0]:.0f}' for v in values)} images/s)")
        local_rate = np.median([v[0] for v in rates["local"]])
        local_cpu = np.median([v[1] for v in rates["local"]])
        for ms in latencies:
            values = rates[f"http +{ms:g} ms"]
            ratio = np.median([v[0] for v in values]) / local_rate
            by_cpu = local_cpu / np.median([v[1] for v in values])
            print(f"HTTP +{ms:g} ms / local, {args.concurrency} fetches in flight: {ratio:.2f} "
                  f"(goal >= {GOAL_RATIO}: {'met' if ratio >= GOAL_RATIO else 'not met'}); "
                  f"by CPU per image {by_cpu:.2f}")
        http = http[latencies[0]] if latencies else [
            f"http://127.0.0.1:{server.port}/{n}" for n in names]

        cached = Settings(**{**base, "image_cache_bytes": 2 * 1024**3,
                             "image_cache_dir": work / "cache"})
        for row in epochs_over_http(cached, http, server, args.epochs, args.workers, work):
            hit = f"{row['hit_rate']:.1%}" if row["fetched"] >= 0 else "n/a (no access log)"
            print(f"training epoch {row['epoch']}: {row['fetched']} of {row['images']} images "
                  f"fetched, cache hit rate {hit}, {row['seconds']:.1f} s")
    finally:
        server.close()


if __name__ == "__main__":
    main()
