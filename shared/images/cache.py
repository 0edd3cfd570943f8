"""A local, content-addressed cache of remote images, least recently used out first.

Blobs are files named by the SHA-256 of their content (two URIs with the same image share
one); a SQLite index maps each URI to its blob and keeps every blob's size and last use,
so eviction by bytes (COFEAT_IMAGE_CACHE_BYTES) is one indexed query, and the embedder, the
CNN refresh and DataLoader worker processes can share one directory safely. A blob is
checked against its name on every hit: a torn or tampered file is a miss, not an image.

An image_uri is taken to name one image for good (CDN URLs usually carry a version or a
content hash); a platform that replaces the image behind a URI should publish a new URI.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, digest TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS keys_digest ON keys (digest);
CREATE TABLE IF NOT EXISTS blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL,
                                  used REAL NOT NULL);
CREATE INDEX IF NOT EXISTS blobs_used ON blobs (used);
CREATE TABLE IF NOT EXISTS total (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER);
INSERT OR IGNORE INTO total VALUES (0, 0);
"""
EVICT_BATCH = 64


class ImageCache:
    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        self._local = threading.local()

    def __getstate__(self) -> dict:
        # SQLite connections stay in the process (and thread) that opened them.
        return {"directory": self.directory, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["max_bytes"])

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            (self.directory / "blobs").mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.directory / "index.sqlite", timeout=30,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _path(self, digest: str) -> Path:
        return self.directory / "blobs" / digest[:2] / digest

    def get(self, key: str) -> bytes | None:
        db = self._db()
        row = db.execute("SELECT digest FROM keys WHERE key = ?", (key,)).fetchone()
        data = self._blob(row[0]) if row else None
        if data is None:
            self.misses += 1
            if row:
                self._forget(db, [row[0]])
            return None
        db.execute("UPDATE blobs SET used = ? WHERE digest = ?", (time.time(), row[0]))
        self.hits += 1
        return data

    def _blob(self, digest: str) -> bytes | None:
        try:
            data = self._path(digest).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == digest else None

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{digest}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # whole or absent: a reader never sees half a blob
        db = self._db()
        with _immediate(db):
            added = db.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)",
                               (digest, len(data), time.time())).rowcount
            if added:
                db.execute("UPDATE total SET bytes = bytes + ?", (len(data),))
            db.execute("INSERT OR REPLACE INTO keys VALUES (?, ?)", (key, digest))
        self._evict(db)

    def _evict(self, db: sqlite3.Connection) -> None:
        while (excess := self.size() - self.max_bytes) > 0:
            oldest, freed = [], 0
            for digest, size in db.execute("SELECT digest, size FROM blobs ORDER BY used "
                                           "LIMIT ?", (EVICT_BATCH,)).fetchall():
                oldest.append(digest)
                freed += size
                if freed >= excess:
                    break
            if not oldest:
                return
            self._forget(db, oldest)

    def _forget(self, db: sqlite3.Connection, digests: list[str]) -> None:
        with _immediate(db):
            for digest in digests:
                size = db.execute("DELETE FROM blobs WHERE digest = ? RETURNING size",
                                  (digest,)).fetchone()
                if size:
                    db.execute("UPDATE total SET bytes = bytes - ?", (size[0],))
                db.execute("DELETE FROM keys WHERE digest = ?", (digest,))
        for digest in digests:
            self._path(digest).unlink(missing_ok=True)

    def size(self) -> int:
        return self._db().execute("SELECT bytes FROM total").fetchone()[0]


class _immediate:
    """BEGIN IMMEDIATE ... COMMIT: writers queue on SQLite's lock instead of deadlocking."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, *_) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
