"""Milvus outages cut by a private TCP proxy: nothing lost, offsets wait for Milvus."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time

import psycopg

from shared import milvus as contract
from shared.kafka.admin import ensure_topics
from tests.helpers import Producer, wait_until
from tests.services.embedder.conftest import (
    alias_target,
    client,
    make_cnn,
    make_image,
    seed_projects,
    start_embed,
)
from tests.services.embedder.test_stream import event, visible


class Proxy:
    """127.0.0.1:<port> -> Milvus; `cut()` resets every connection and refuses new ones
    (accepted, then closed at once) until `restore()`."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                downstream.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                downstream.close()
                continue
            with self.lock:
                self.sockets += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.sockets.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def stored_offsets(db_url: str, group: str) -> int:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
                            "WHERE group_id = %s", (group,)).fetchone()[0]


def test_milvus_outage_loses_nothing(esettings, db_url, tmp_path):
    proxy = Proxy(int(esettings.milvus_uri.rsplit(":", 1)[1]))
    via_proxy = esettings.model_copy(update={"milvus_uri": f"http://127.0.0.1:{proxy.port}"})
    ensure_topics(esettings)
    seed_projects(esettings, db_url, 5)
    make_cnn(esettings, db_url, seed=1)
    log = tmp_path / "embed.log"
    c, producer = client(esettings), Producer(esettings)  # the test talks to Milvus directly
    alias = contract.alias(esettings, contract.PROJECTS)
    images = esettings.data_dir / "images"

    def publish(ids) -> None:
        producer.projects_([event("published", p, make_image(images / f"{p}.png", p))
                            for p in ids])
        producer.flush()

    proc = start_embed(via_proxy, log)
    try:
        wait_until(lambda: alias_target(c, esettings, contract.PROJECTS) is not None, 90,
                   "backfill")
        publish([100])
        wait_until(lambda: visible(c, alias, [100]) == {100}, 10, "the stream running")
        before = stored_offsets(db_url, esettings.embed_group)

        # 1. An outage the service rides out on its own.
        proxy.cut()
        publish(range(200, 210))
        time.sleep(3)
        assert stored_offsets(db_url, esettings.embed_group) == before  # not acknowledged
        proxy.restore()
        wait_until(lambda: visible(c, alias, range(200, 210)) == set(range(200, 210)), 30,
                   "events written after the outage")

        # 2. Stopped during an outage: exits 0, and a restart replays what was not written.
        proxy.cut()
        publish(range(300, 310))
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert visible(c, alias, range(300, 310)) == set()
        proxy.restore()
        proc = start_embed(via_proxy, log, "--drain")
        assert proc.wait(90) == 0
        assert visible(c, alias, range(300, 310)) == set(range(300, 310))
        assert stored_offsets(db_url, esettings.embed_group) == before + 20
    finally:
        if proc.poll() is None:
            proc.kill()
        producer.close()
        c.close()
        proxy.close()
    assert "milvus unavailable" in log.read_text()
